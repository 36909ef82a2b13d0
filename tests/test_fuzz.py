"""Fuzzing a live server (issue 13): random bytes and random well-formed messages for every unary method of
every service. Whatever a client sends, the answer is never INTERNAL or UNKNOWN, and the server stays up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scaleset import Region
from scaleset.testing.server import ServerThread
from scaleset.v1 import scaleset_pb2 as pb

from tests.conftest import SIZE

METHODS = [
    (service.name, method)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
    if not method.server_streaming
]
NAMES = st.sampled_from(["web", "", "nope", "x" * 300, "ünï", "1", "2", "Standard_D2s_v5", "PT5M"])


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(NAMES, st.text(max_size=40))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64
        )
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 6)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 10), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    return st.binary(max_size=20)


@st.composite
def message(draw: st.DrawFn, descriptor: Any, depth: int = 0) -> bytes:
    cls = _classes[descriptor.full_name]
    msg = cls()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth >= 3 or field.message_type.full_name not in _classes:
                continue
            items = (
                draw(st.lists(message(field.message_type, depth + 1), max_size=2))
                if field.is_repeated
                else [draw(message(field.message_type, depth + 1))]
            )
            for raw in items:
                target = getattr(msg, field.name).add() if field.is_repeated else getattr(msg, field.name)
                target.MergeFromString(raw)
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=3)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg.SerializeToString()


_classes = {
    m.DESCRIPTOR.full_name: m for m in vars(pb).values() if isinstance(m, type) and hasattr(m, "DESCRIPTOR")
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = str(tmp_path_factory.mktemp("fuzz") / "state.db")
    with ServerThread(db, Region(zones=["1", "2", "3"], fault_domains_per_zone=3), instance_limit=2000) as s:
        with grpc.insecure_channel(s.target) as ch:
            create = ch.unary_unary("/scaleset.v1.ScaleSets/CreateScaleSet")
            spec = pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
            create(pb.CreateScaleSetRequest(scale_set=spec, capacity=3).SerializeToString())
        yield s


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_no_request_gets_internal_or_unknown(server: ServerThread, data: st.DataObject) -> None:
    service, method = data.draw(st.sampled_from(METHODS))
    payload = data.draw(st.one_of(message(method.input_type), st.binary(max_size=64)))
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary(f"/scaleset.v1.{service}/{method.name}")
        try:
            call(payload, timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{service}.{method.name}: {err.code()} {err.details()}"
            )
