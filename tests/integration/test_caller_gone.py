"""A caller that goes away mid-stream is one quiet line in the node log, not a traceback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from ispf.v1 import peer_pb2
from ispf_server.guard import Guard
from ispf_server.tls import channel_options
from tests.conftest import Federation

METHOD = "/ispf.v1.PeerService/ReturnTags"


def test_a_peer_gone_mid_stream_logs_no_serializer_traceback(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    punjab, sindh = federation.nodes["punjab"], federation.nodes["sindh"]
    got_first, finished = threading.Event(), threading.Event()

    def behaviour(requests: Iterator[peer_pb2.BlindedChunk], context: grpc.ServicerContext) -> None:
        try:
            next(iter(requests))
            got_first.set()
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            # What a session step does when its stream breaks: fail, after the caller left.
            raise RuntimeError("the stream broke")
        finally:
            finished.set()

    handler = grpc.method_handlers_generic_handler(
        "ispf.v1.PeerService",
        {
            "ReturnTags": grpc.stream_unary_rpc_method_handler(
                behaviour,  # type: ignore[arg-type]
                request_deserializer=peer_pb2.BlindedChunk.FromString,
                response_serializer=peer_pb2.ReturnTagsResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[Guard("punjab", punjab.revoked)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", punjab.tls.server_credentials())
    server.start()
    hold = threading.Event()

    def chunks() -> Iterator[peer_pb2.BlindedChunk]:
        yield peer_pb2.BlindedChunk(session_id="s", seq=0, values=b"\x00" * 32)
        hold.wait(10)

    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        sindh.tls.current().channel_credentials(),
        options=channel_options("punjab", 1 << 20),
    )
    try:
        call = channel.stream_unary(
            METHOD,
            request_serializer=peer_pb2.BlindedChunk.SerializeToString,
            response_deserializer=peer_pb2.ReturnTagsResponse.FromString,
        ).future(chunks())
        assert got_first.wait(10)
        call.cancel()  # the peer dies mid-stream
        assert finished.wait(10)
        time.sleep(0.3)  # grpc serialises (or not) the handler's result after it returns
    finally:
        hold.set()
        channel.close()
        server.stop(grace=None).wait()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "serializing" in m.lower()], messages
    assert any("the caller went away" in m for m in messages), messages
