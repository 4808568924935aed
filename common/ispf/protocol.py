"""The numbers both ends of a connection must agree on (the wire's, not a node's).

Every limit here is checked by the side that receives and respected by the side
that sends; changing one is a protocol change (`PROTOCOL_VERSION` for the peer
session, a release note for the client's limits). A node's own tuning (sort
budgets, batch sizes it chooses for itself) lives with the code it tunes.
"""

from __future__ import annotations

# The peer session (PeerService): initiator and responder.
PROTOCOL_VERSION = 1  # a session's version; the responder refuses any other
MAX_CHUNK_VALUES = 65_536  # values (points or tags) per streamed chunk, at most

# The client's calls to its own node.
MAX_CHECK_IDS = 1000  # IDs per online check request (CheckService), at most
MAX_DEADLINE_MS = 60_000  # an online check's wait for the provinces, at most (a thread each)
MAX_RECORDS_PER_MESSAGE = 50_000  # records per registry load request or stream message
MAX_LOG_ENTRIES = 1000  # audit-log entries per GetEntries answer, at most

__all__ = [
    "MAX_CHECK_IDS",
    "MAX_CHUNK_VALUES",
    "MAX_DEADLINE_MS",
    "MAX_LOG_ENTRIES",
    "MAX_RECORDS_PER_MESSAGE",
    "PROTOCOL_VERSION",
]
