"""The data-sharing policy: who may match what, for which purpose, and how much.

One reviewed, versioned TOML file per node, reloaded when it changes (no
restart); each change is recorded in the audit log with the file's SHA-256.
A peer that is not listed is refused. Example::

    version = 3

    [peers.sindh]
    purposes = ["reconciliation", "statistics"]
    collections = ["BISP-KAFAALAT"]         # own programmes it may match against; [] = all
    disclose = ["BISP-KAFAALAT/*"]          # labels it may learn, PROGRAMME/status, * wildcards
    count_only = false                      # true: only count-only sessions, either way
    max_set_size = 2000000                  # largest set it may submit in one session
    probes_per_minute = 60                  # online checks (planned; parsed and kept)
    probes_per_day = 20000
    # Bounds on what a peer may ask (hostile-peer limits; see docs/security.md):
    budget_multiple = 4        # values it may submit per epoch, as a multiple of the
    budget_daily = 100000      #   registry size it declares, plus this much a day
    min_set_size = 100         # smallest set of a count-only or filtered session
    max_open_sessions = 4      # sessions it may hold open here at once
    session_idle_seconds = 600 # an open session left idle this long is failed

The policy binds both directions: as responder the node refuses requests
outside it; as initiator it never discloses labels the peer may not learn,
and never runs a session the policy would refuse from that peer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ispf.errors import ConfigError, PolicyRefused
from ispf.peertext import untrusted
from ispf.records import Label

log = logging.getLogger(__name__)

DEFAULT_MAX_SET = 50_000_000
DEFAULT_BUDGET_MULTIPLE = 4
DEFAULT_BUDGET_DAILY = 100_000
DEFAULT_MIN_SET = 100
# Seven provinces: a peer runs one sync at a time and a few one-offs beside it.
DEFAULT_MAX_OPEN = 4
DEFAULT_IDLE_SECONDS = 600
_PEER_KEYS = {
    "purposes",
    "collections",
    "disclose",
    "count_only",
    "max_set_size",
    "rekey_after_days",
    "probes_per_minute",
    "probes_per_day",
    "budget_multiple",
    "budget_daily",
    "min_set_size",
    "max_open_sessions",
    "session_idle_seconds",
}


@dataclass(frozen=True)
class PeerPolicy:
    peer: str
    purposes: frozenset[str]
    collections: frozenset[str] = frozenset()
    disclose: tuple[str, ...] = ("*",)
    count_only: bool = False
    max_set_size: int = DEFAULT_MAX_SET
    probes_per_minute: int = 60
    probes_per_day: int = 10_000
    # Days a (peer, epoch) pair key is used before the next run re-keys (fresh pair
    # key, that pair's state dropped, the run full); 0: one key for the whole epoch.
    rekey_after_days: int = 0
    budget_multiple: int = DEFAULT_BUDGET_MULTIPLE
    budget_daily: int = DEFAULT_BUDGET_DAILY
    min_set_size: int = DEFAULT_MIN_SET
    max_open_sessions: int = DEFAULT_MAX_OPEN
    session_idle_seconds: int = DEFAULT_IDLE_SECONDS

    def budget_allowance(self, declared: int, days: int) -> int:
        """Values the peer may submit in an epoch: a multiple of the registry size it
        declared (at most `max_set_size`) for each re-key period begun (each begins
        with a full run under fresh keys; one period where `rekey_after_days` is 0),
        and `budget_daily` for each day (UTC) since it first submitted any in the
        epoch, that one included."""
        days = max(days, 1)
        periods = 1 + (days - 1) // self.rekey_after_days if self.rekey_after_days else 1
        return (
            self.budget_multiple * min(declared, self.max_set_size) * periods
            + self.budget_daily * days
        )

    def may_disclose(self, label: Label) -> bool:
        """Is `label` one the peer may be told (`disclose`'s patterns)?"""
        text = f"{label.programme}/{label.status}"
        return any(fnmatch.fnmatchcase(text, p) for p in self.disclose)

    def in_collections(self, programme: str) -> bool:
        return not self.collections or programme in self.collections

    def may_learn(self, label: Label) -> bool:
        """May the peer learn of a record under `label` (in its collections, a label it
        may be told)? The one rule for what a labelled session names. Registries
        have few distinct labels and many records: each label is decided once."""
        cache: dict[Label, bool] = self.__dict__.setdefault("_learn_cache", {})
        found = cache.get(label)
        if found is None:
            found = cache[label] = self.in_collections(label.programme) and self.may_disclose(label)
        return found


@dataclass(frozen=True)
class Policy:
    version: int
    digest: str
    peers: dict[str, PeerPolicy] = field(default_factory=dict)

    def for_peer(self, peer: str) -> PeerPolicy:
        pp = self.peers.get(peer)
        if pp is None:
            raise PolicyRefused(
                f"peer {peer} is not in this node's policy (version {self.version})"
            )
        return pp

    def check_session(self, peer: str, purpose: str, count_only: bool) -> PeerPolicy:
        """Raise PolicyRefused (with the reason) unless the policy allows such a session."""
        pp = self.for_peer(peer)
        if purpose not in pp.purposes:
            allowed = ", ".join(sorted(pp.purposes)) or "none"
            raise PolicyRefused(
                f"purpose '{untrusted(purpose, 64)}' is not allowed for peer {peer} by policy "
                f"version {self.version} (allowed: {allowed})"
            )
        if pp.count_only and not count_only:
            raise PolicyRefused(
                f"policy version {self.version} allows only count-only sessions with {peer}"
            )
        return pp


def _strings(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where} must be a list of strings")
    return tuple(v)


def _int(v: Any, where: str, low: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{where} must be an integer of at least {low}")
    return v


def parse_policy(data: bytes, where: str) -> Policy:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"policy {where} is not valid TOML: {exc}") from exc
    version = _int(doc.get("version"), f"{where}: version", 1)
    peers: dict[str, PeerPolicy] = {}
    for name, v in doc.get("peers", {}).items():
        w = f"{where} [peers.{name}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{w} must be a table")
        unknown = set(v) - _PEER_KEYS
        if unknown:
            raise ConfigError(f"{w}: unknown setting(s) {', '.join(sorted(unknown))}")
        count_only = v.get("count_only", False)
        if not isinstance(count_only, bool):
            raise ConfigError(f"{w}: count_only must be true or false")
        peers[name] = PeerPolicy(
            peer=name,
            purposes=frozenset(_strings(v.get("purposes", []), f"{w}: purposes")),
            collections=frozenset(_strings(v.get("collections", []), f"{w}: collections")),
            disclose=_strings(v.get("disclose", ["*"]), f"{w}: disclose"),
            count_only=count_only,
            max_set_size=_int(v.get("max_set_size", DEFAULT_MAX_SET), f"{w}: max_set_size", 1),
            probes_per_minute=_int(v.get("probes_per_minute", 60), f"{w}: probes_per_minute"),
            probes_per_day=_int(v.get("probes_per_day", 10_000), f"{w}: probes_per_day"),
            rekey_after_days=_int(v.get("rekey_after_days", 0), f"{w}: rekey_after_days"),
            budget_multiple=_int(
                v.get("budget_multiple", DEFAULT_BUDGET_MULTIPLE), f"{w}: budget_multiple"
            ),
            budget_daily=_int(v.get("budget_daily", DEFAULT_BUDGET_DAILY), f"{w}: budget_daily"),
            min_set_size=_int(v.get("min_set_size", DEFAULT_MIN_SET), f"{w}: min_set_size", 1),
            max_open_sessions=_int(
                v.get("max_open_sessions", DEFAULT_MAX_OPEN), f"{w}: max_open_sessions", 1
            ),
            session_idle_seconds=_int(
                v.get("session_idle_seconds", DEFAULT_IDLE_SECONDS), f"{w}: session_idle_seconds", 1
            ),
        )
    return Policy(version, hashlib.sha256(data).hexdigest(), peers)


class PolicyFile:
    """The policy in force, reloaded from its file whenever the file changes.

    A new file that does not parse is refused (logged); the previous policy
    stays in force. `on_change` is called with each policy that takes effect.
    """

    def __init__(self, path: Path, on_change: Callable[[Policy], None]) -> None:
        self.path = path
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._policy = self._read()
        self._stamp = self._stat()
        on_change(self._policy)

    def _stat(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size

    def _read(self) -> Policy:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(f"policy file {self.path} does not exist") from exc
        return parse_policy(data, str(self.path))

    def current(self) -> Policy:
        with self._lock:
            try:
                stamp = self._stat()
            except FileNotFoundError:
                log.error(
                    "policy file %s vanished; keeping version %d", self.path, self._policy.version
                )
                return self._policy
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    new = self._read()
                except ConfigError as exc:
                    log.error(
                        "new policy refused, keeping version %d: %s",
                        self._policy.version,
                        exc.message,
                    )
                    return self._policy
                if new.digest != self._policy.digest:
                    log.info(
                        "policy version %d (sha256 %s) takes effect", new.version, new.digest[:16]
                    )
                    self._policy = new
                    self._on_change(new)
            return self._policy
