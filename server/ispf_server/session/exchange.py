"""The exchange of a session, the same for both roles: what each chunk of a stream
must be, the blinding pipelines, and the wrappers that keep a stream's errors."""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import grpc

from ispf.blinding import TAG_BYTES
from ispf.errors import ProtocolViolation
from ispf.keys import BlindingKey, ForumSalt
from ispf.nid import PackedNids
from ispf.protocol import MAX_CHUNK_VALUES
from ispf.v1 import peer_pb2
from ispf_server.pool import BlindingPool, pipelined
from ispf_server.records import split_records

MAX_REMOVED = 1_000_000
SESSION_KEY = "ispf-session-id"  # metadata naming the session of a streaming call
T = TypeVar("T")
S = TypeVar("S", list[bytes], PackedNids)


def chunked(items: S, size: int) -> Iterator[S]:
    """Consecutive slices of at most `size` (a list's, or packed IDs' without a copy)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def checked_chunks(
    chunks: Iterable[peer_pb2.BlindedChunk],
    *,
    session_id: str,
    item_bytes: int,
    announced: int,
    what: str,
) -> Iterator[bytes]:
    """Yield chunk payloads, enforcing session id, sequence, size and announced total."""
    total = 0
    for seq, ch in enumerate(chunks):
        if ch.session_id != session_id:
            raise ProtocolViolation(f"{what}: chunk {seq} belongs to another session")
        if ch.seq != seq:
            raise ProtocolViolation(f"{what}: chunk {ch.seq} arrived where chunk {seq} was due")
        n, rem = divmod(len(ch.values), item_bytes)
        if rem or n == 0:
            raise ProtocolViolation(
                f"{what}: chunk {seq} holds {len(ch.values)} bytes, not a positive "
                f"multiple of {item_bytes}"
            )
        if n > MAX_CHUNK_VALUES:
            raise ProtocolViolation(
                f"{what}: chunk {seq} holds {n} values, at most {MAX_CHUNK_VALUES}"
            )
        total += n
        if total > announced:
            raise ProtocolViolation(f"{what}: more than the {announced} values announced")
        yield ch.values
    if total != announced:
        raise ProtocolViolation(f"{what}: stream ended after {total} of {announced} values")


def in_step(
    responses: Iterable[peer_pb2.BlindedChunk], session_id: str, sizes: deque[int]
) -> Iterator[bytes]:
    """Mutual mode: answer chunk i must hold exactly the tags for request chunk i
    (`sizes`: how many values each request chunk held, appended as they are sent)."""
    for seq, ch in enumerate(responses):
        if (
            ch.session_id != session_id
            or ch.seq != seq
            or not sizes
            or len(ch.values) != sizes.popleft() * TAG_BYTES
        ):
            raise ProtocolViolation(f"Reblind answer chunk {seq} does not match request")
        yield ch.values
    if sizes:
        raise ProtocolViolation("Reblind answer ended early")


def parse_removed(
    packed: bytes, held: Callable[[list[bytes]], dict[bytes, str]], who: str
) -> list[bytes]:
    """The peer's removed tags (a sync session's): each must be one we hold for it."""
    if len(packed) % TAG_BYTES:
        raise ProtocolViolation(f"removed tags of {who} are not whole 16-byte tags")
    tags = split_records(packed, TAG_BYTES)
    if len(tags) > MAX_REMOVED:
        raise ProtocolViolation(f"{len(tags)} removed tags, at most {MAX_REMOVED}")
    if len(set(tags)) != len(tags):
        raise ProtocolViolation(f"{who} removed the same tag twice")
    unknown = len(tags) - len(held(tags)) if tags else 0
    if unknown:
        raise ProtocolViolation(f"{who} removed {unknown} tags this node never held")
    return tags


# -- the blinding pipelines --------------------------------------------------


def blinded(
    pool: BlindingPool, salt: ForumSalt, key: BlindingKey, chunks: Iterable[PackedNids]
) -> Iterator[tuple[int, bytes]]:
    """Own IDs hashed to the curve and blinded, chunk by chunk through the pool, in
    order: (how many, the points packed)."""
    for digits, packed in pipelined(
        lambda d: pool.hash_and_blind(salt, key, d), chunks, pool.depth
    ):
        yield len(digits), packed


def reblinded(pool: BlindingPool, key: BlindingKey, values: Iterable[bytes]) -> Iterator[bytes]:
    """The peer's blinded points blinded again into tags, chunk by chunk, in order."""
    for _, tags in pipelined(lambda v: pool.reblind(key, v, TAG_BYTES), values, pool.depth):
        yield tags


def chunk_stream(session_id: str, payloads: Iterable[bytes]) -> Iterator[peer_pb2.BlindedChunk]:
    """Payloads as a stream's chunks, numbered from 0."""
    for seq, values in enumerate(payloads):
        yield peer_pb2.BlindedChunk(session_id=session_id, seq=seq, values=values)


# -- streams and threads -----------------------------------------------------


class Captured:
    """Errors raised inside request iterators, which gRPC would otherwise swallow."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def wrap(self, gen: Iterator[T]) -> Iterator[T]:
        try:
            yield from gen
        except BaseException as exc:
            self.errors.append(exc)

    def reraise(self) -> None:
        if self.errors:
            raise self.errors[0]


def stream_call(
    call: Callable[[Iterator[peer_pb2.BlindedChunk]], T],
    requests: Iterator[peer_pb2.BlindedChunk],
) -> T:
    """A client-streaming call whose own failure, raised while making the requests,
    explains the peer's complaint (it is raised rather than the RpcError)."""
    captured = Captured()
    try:
        result = call(captured.wrap(requests))
    except grpc.RpcError:
        captured.reraise()
        raise
    captured.reraise()
    return result


def in_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """Run `fn` in a new thread (with this thread's log context); its result or error."""
    fut: Future[T] = Future()
    ctx = contextvars.copy_context()

    def run() -> None:
        try:
            fut.set_result(ctx.run(fn))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut
