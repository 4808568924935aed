"""Starting this node's sessions: one at a time per pair (whichever side began it),
each in a thread of its own, or in the caller's thread for an online check's sync.

The node composes one `Launcher`; the responder takes its pair locks too, so an
initiated and an answered session with one peer never run at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ispf.errors import PolicyRefused, PreconditionFailed
from ispf.keys import ForumSalt
from ispf.v1 import common_pb2, peer_pb2_grpc
from ispf_server.policy import Policy
from ispf_server.session.initiator import Ask, Initiator, Peer, initiate
from ispf_server.session.lifecycle import SessionContext
from ispf_server.session.progress import ProgressBoard, Snapshot
from ispf_server.storage.store import PairLock


class Launcher:
    """Initiated sessions: `start` (in a thread of its own), `sync_with` (in the
    caller's), the pairs' locks (`pair_lock`), and `join` at shutdown."""

    def __init__(
        self,
        ctx: SessionContext,
        board: ProgressBoard,
        *,
        policy: Callable[[], Policy],
        salt: Callable[[], ForumSalt],
        stub: Callable[[str], peer_pb2_grpc.PeerServiceStub],
        call_deadline: float,
        session_deadline: float,
    ) -> None:
        self.ctx, self.board = ctx, board
        self._policy, self._salt, self._stub = policy, salt, stub
        self._call_deadline, self._session_deadline = call_deadline, session_deadline
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def pair_lock(self, peer: str) -> PairLock:
        """One session at a time per pair, whichever side started it (sync state), and
        whichever replica of a shared store runs it."""
        return self.ctx.store.pair_lock(peer)

    def start(self, ask: Ask) -> Snapshot:
        """Begin a session with `ask.peer` in a thread of its own; its first status."""
        initiator = self._initiator(ask)
        sid = initiator.facts.session_id
        t = threading.Thread(target=initiator.run, name=f"session-{sid[:8]}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return initiator.progress.snapshot()

    def sync_with(self, peer: str) -> None:
        """Run a sync session with the peer in this thread (to freshen the check index)."""
        initiator = self._initiator(Ask(peer, "reconciliation", common_pb2.MODE_MUTUAL))
        initiator.run()
        snap = initiator.progress.snapshot()
        if snap.state != "COMPLETED":
            raise PreconditionFailed(f"sync with {peer} failed: {snap.error}")

    def join(self, timeout: float) -> None:
        """Wait (up to `timeout` seconds each) for the sessions started here to end."""
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=timeout)

    def _initiator(self, ask: Ask) -> Initiator:
        if ask.peer == self.ctx.province:
            raise PolicyRefused("a node cannot reconcile with itself")
        stub = self._stub(ask.peer)
        return initiate(
            self.ctx,
            self.board,
            ask,
            policy=self._policy(),
            salt=self._salt(),
            peer=lambda sync: Peer(
                stub,
                self._call_deadline,
                self._session_deadline,
                self.pair_lock(ask.peer) if sync else None,
            ),
        )
