"""Pair state: what a node keeps per (peer, epoch) so that reconciliation can be
incremental and online checks answered (`state`): pair keys and their re-key
counters (`keys`), sorted runs (`runs`) and their staging (`staging`), lookups
(`lookups`) and the deltas a session commits (`deltas`). `Pairs` is the store's
room for it."""

from ispf_server.storage.pairs.access import Pairs

__all__ = ["Pairs"]
