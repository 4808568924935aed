"""The node's own store: one SQLite file per node (the default), or one PostgreSQL
database shared by the node's replicas; in rooms that each own their tables.

* `db`: the database interface, ``with db.transaction()``, and the SQLite backend;
  `postgres`: the PostgreSQL backend; `transfer`: moving a store between them
* `registry`: records, the change log and registry version, planning's reads
* `sessions`: sessions and their match rows
* `auditlog`: log entries, checkpoints, cosignatures, witnessed checkpoints
* `meta`: settings and counters by key; `budgets`: peers' query budgets
* `pairs`: pair keys, kept tag state, sorted runs and their staging, lookups, deltas

`Store` opens the file and composes the rooms (``store.registry``,
``store.sessions``, ...). This is the only place raw ID numbers are kept: in the
registry, its change log and the pair state, nowhere outside the store. Every
write is one transaction: a batch of records lands whole or not at all, and a
session's results become visible together with its COMPLETED state, so partial
results are never shown as final. Nothing above this package sees SQL, a
connection or a cursor.
"""

from ispf_server.storage.store import Store

__all__ = ["Store"]
