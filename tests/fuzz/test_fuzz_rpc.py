"""Hypothesis over every RPC's request messages, and raw bytes, against a live node.

Whatever arrives, the node answers with OK or a precise client-side status —
never INTERNAL, UNKNOWN or a dropped connection — and keeps serving.
Budget: ISPF_FUZZ_EXAMPLES per RPC (default 20 in CI); for a long run:

    ISPF_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ispf.identity import node_hostname
from ispf.v1 import audit_pb2, internal_pb2, peer_pb2
from ispf_server.pool import BlindingPool
from tests.conftest import Federation, start_federation

EXAMPLES = int(os.environ.get("ISPF_FUZZ_EXAMPLES", "20"))
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
SERVICES = {
    peer_pb2.DESCRIPTOR.services_by_name["PeerService"]: ("node", "sindh"),
    internal_pb2.DESCRIPTOR.services_by_name["RegistryService"]: ("client", "punjab"),
    internal_pb2.DESCRIPTOR.services_by_name["ReconciliationService"]: ("client", "punjab"),
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"]: ("auditor", "auditor"),
}
METHODS = [(m, cred) for svc, cred in SERVICES.items() for m in svc.methods]
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.one_of(
        st.text(max_size=30),
        st.sampled_from(["sindh", "punjab", "kp", "BISP", "enrolled", "3520212345671", ""]),
    ),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=80),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_ENUM: st.integers(0, 5),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(), st.sampled_from([0.0, 10.0, 100.0])),
}


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            one = messages(f.message_type, depth + 1)
        else:
            one = SCALARS[f.type]
        is_repeated = f.is_repeated
        fields[f.name] = st.lists(one, max_size=3) if is_repeated else one
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    pool = BlindingPool(0)
    f = start_federation(tmp_path_factory.mktemp("fuzz"), ["punjab", "sindh"], pool)
    f.load("punjab", [("P1", "3520212345671", "BISP", "enrolled")])
    f.load("sindh", [("S1", "3520212345671", "SSPA", "enrolled")])
    assert f.reconcile("punjab", "sindh").state == internal_pb2.SESSION_STATE_COMPLETED
    yield f
    f.close()
    pool.close()


def open_channel(fed: Federation, stem: str, name: str) -> grpc.Channel:
    lay = fed.layout
    d: Path = {
        "node": lay.node_dir(name),
        "client": lay.client_dir(name),
        "auditor": lay.auditor_dir(name),
    }[stem]
    creds = grpc.ssl_channel_credentials(
        root_certificates=lay.ca_cert.read_bytes(),
        private_key=(d / f"{stem}.key").read_bytes(),
        certificate_chain=(d / f"{stem}.pem").read_bytes(),
    )
    return grpc.secure_channel(
        f"127.0.0.1:{fed.ports['punjab']}",
        creds,
        options=[("grpc.ssl_target_name_override", node_hostname("punjab"))],
    )


def status_of(ch: grpc.Channel, method: MethodDescriptor, payload: list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    call = getattr(ch, kind)(path)
    meta = (("ispf-session-id", "00000000-0000-4000-8000-000000000000"),)
    try:
        arg = iter(payload) if method.client_streaming else payload[0]
        result = call(arg, timeout=10, metadata=meta)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def still_serving(fed: Federation) -> None:
    with open_channel(fed, "client", "punjab") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("method", "cred"), METHODS, ids=lambda x: getattr(x, "name", ""))
def test_any_request_message_gets_a_precise_answer(
    fed: Federation, method: MethodDescriptor, cred: tuple[str, str]
) -> None:
    with open_channel(fed, *cred) as ch:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.lists(messages(method.input_type), min_size=1, max_size=3))
        def check(reqs: list[Any]) -> None:
            code = status_of(ch, method, [r.SerializeToString() for r in reqs])
            assert code in ACCEPTABLE, f"{method.full_name} answered {code}"

        check()
    still_serving(fed)


@pytest.mark.parametrize(("method", "cred"), METHODS, ids=lambda x: getattr(x, "name", ""))
def test_any_bytes_get_a_precise_answer(
    fed: Federation, method: MethodDescriptor, cred: tuple[str, str]
) -> None:
    with open_channel(fed, *cred) as ch:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
        def check(payload: list[bytes]) -> None:
            code = status_of(ch, method, payload)
            assert code in ACCEPTABLE, f"{method.full_name} answered {code}"

        check()
    still_serving(fed)
