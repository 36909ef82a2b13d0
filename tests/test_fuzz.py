"""Fuzzing live servers (issue 13): random bytes, random messages, and valid requests with a few fields
changed, for every method of every service. Whatever a client sends, the answer is never INTERNAL or
UNKNOWN, a unary call is answered, the server stays up, and a call it refuses leaves its state as it was.
Between calls the servers' clocks move on and their time-driven policies advance, which never fails on
what was accepted; and every 100 calls, and at the end, each server's state is what its store replays."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scaleset import (
    AutomaticRepairsPolicy,
    AutoscaleCapacity,
    AutoscaleProfile,
    AutoscaleSetting,
    MetricTrigger,
    PriorityMixPolicy,
    Recurrence,
    RecurrentSchedule,
    Region,
    RollingUpgradePolicy,
    ScaleAction,
    ScaleRule,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    UpgradePolicy,
    VmSize,
)
from scaleset.cli import open_store
from scaleset.client import Client
from scaleset.control import ControlPlane
from scaleset.convert import autoscale_setting_to_proto, spec_to_proto
from scaleset.model import LifecycleHook
from scaleset.store import backup
from scaleset.testing.server import ServerThread
from scaleset.v1 import scaleset_pb2 as pb

from tests.conftest import SIZE

METHODS = [
    (service.name, method)
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
#: How long the fuzz waits for a stream's first message: a watch from the last change, or a lease with no
#: operation to lease, rightly waits for one.
STREAM_WAIT_S = 0.5
#: Calls a run makes: in the test suite the same 1,000 every time (a gate that a change breaks, not one that
#: a new random draw may fail); on demand more, drawn afresh (SCALESET_FUZZ_EXAMPLES=20000).
EXAMPLES = int(os.environ.get("SCALESET_FUZZ_EXAMPLES", "0")) or None
#: Strings a field may get: the fuzz's names (scale sets, hook, metric, size, quota family, zones), update
#: mask paths, durations, and ones that are wrong.
NAMES = st.sampled_from(
    [
        *("web", "mix", "drain", "cpu", "Standard_D2s_v5", "standardDSv5Family", "1", "2", "3", "PT5M"),
        *("model_version", "upgrade_policy", "sku", "zones", "automatic_repairs_policy", "lifecycle_hooks"),
        *("PT0S", "", "nope", "x" * 300, "ünï"),
    ]
)


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

#: A scale set with most of the policies a spec can carry (a Spot mix of two sizes, rolling upgrades,
#: repairs, a lifecycle hook, a Spot max price), and an autoscale setting with a metric rule and a weekly
#: profile.
RICH = spec_to_proto(
    ScaleSetSpec(
        name="mix",
        zones=["1", "2", "3"],
        sku_profile=SkuProfile([VmSize(SIZE), VmSize("Standard_D4s_v5")]),
        priority="Spot",
        eviction_policy="Delete",
        max_price=0.5,
        priority_mix_policy=PriorityMixPolicy(1, 50),
        upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy(pause_time_between_batches="PT1S")),
        automatic_repairs_policy=AutomaticRepairsPolicy(True, "PT10M"),
        lifecycle_hooks=[LifecycleHook("drain")],
    )
)
SETTING = autoscale_setting_to_proto(
    AutoscaleSetting(
        [
            AutoscaleProfile(
                "default",
                AutoscaleCapacity(2, 10, 3),
                [ScaleRule(MetricTrigger("cpu", "GreaterThan", 70), ScaleAction("Increase", value=2))],
            ),
            AutoscaleProfile(
                "weekend",
                AutoscaleCapacity(1, 4, 1),
                recurrence=Recurrence(RecurrentSchedule("UTC", ["Saturday"], [8], [0])),
            ),
        ]
    )
)
#: A well-formed request for each method, on the fuzz's scale set "web" (instances 1 and 2 among its own),
#: for mutations to start from: mostly valid calls with one to three fields changed reach the checks and the
#: engine behind the first field's validation.
VALID: dict[str, Message] = {
    "CreateScaleSet": pb.CreateScaleSetRequest(scale_set=RICH, capacity=4),
    "GetScaleSet": pb.GetScaleSetRequest(name="web"),
    "ListScaleSets": pb.ListScaleSetsRequest(page_size=2),
    "UpdateScaleSet": pb.UpdateScaleSetRequest(
        scale_set=spec_to_proto(ScaleSetSpec("web", zones=["1", "2", "3"], sku=Sku(SIZE), model_version=2)),
        update_mask={"paths": ["model_version"]},
    ),
    "DeleteScaleSet": pb.DeleteScaleSetRequest(name="web"),
    "SetCapacity": pb.SetCapacityRequest(name="web", capacity=6),
    "ImportInstances": pb.ImportInstancesRequest(
        name="web", instances=[pb.Instance(instance_id=900, zone="1", vm_size=SIZE)]
    ),
    "ListInstances": pb.ListInstancesRequest(name="web", page_size=2),
    "DeleteInstances": pb.DeleteInstancesRequest(name="web", instance_ids=[1]),
    "EvictInstances": pb.EvictInstancesRequest(name="web", instance_ids=[2]),
    "SetInstanceProtection": pb.SetInstanceProtectionRequest(
        name="web", instance_ids=[1, 2], protect_from_scale_in=True
    ),
    "ReportInstanceHealth": pb.ReportInstanceHealthRequest(
        name="web", reports=[pb.HealthReport(instance_ids=[1], health=pb.HEALTH_UNHEALTHY)]
    ),
    "WatchEvents": pb.WatchEventsRequest(scale_set="web"),
    "Rebalance": pb.RebalanceRequest(name="web", max_replacements=2, dry_run=True),
    "StartRollingUpgrade": pb.StartRollingUpgradeRequest(name="web"),
    "GetRollingUpgrade": pb.GetRollingUpgradeRequest(name="web"),
    "CancelRollingUpgrade": pb.CancelRollingUpgradeRequest(name="web"),
    "UpgradeInstances": pb.UpgradeInstancesRequest(name="web", instance_ids=[1]),
    "SetRepairsServiceState": pb.SetRepairsServiceStateRequest(
        name="web", state=pb.REPAIRS_SERVICE_STATE_SUSPENDED
    ),
    "SetAutoscaleSetting": pb.SetAutoscaleSettingRequest(name="web", setting=SETTING),
    "GetAutoscaleSetting": pb.GetAutoscaleSettingRequest(name="web"),
    "DeleteAutoscaleSetting": pb.DeleteAutoscaleSettingRequest(name="web"),
    "ReportMetrics": pb.ReportMetricsRequest(
        name="web",
        series=[
            pb.MetricSeries(
                metric_name="cpu", samples=[pb.MetricSample(time_unix_ms=int(time.time() * 1000), value=80.0)]
            )
        ],
    ),
    "EvaluateAutoscale": pb.EvaluateAutoscaleRequest(name="web"),
    "ListAutoscaleHistory": pb.ListAutoscaleHistoryRequest(name="web", page_size=2),
    "GetRegion": pb.GetRegionRequest(),
    "SetZoneAvailability": pb.SetZoneAvailabilityRequest(zone="3", available=False),
    "SetPoolCapacity": pb.SetPoolCapacityRequest(
        pool=pb.Pool(zone="2", vm_size=SIZE, priority=pb.PRIORITY_SPOT, available=5, price=0.01)
    ),
    "SetCoreQuota": pb.SetCoreQuotaRequest(family="standardDSv5Family", cores=400),
    "Echo": pb.EchoRequest(payload=b"x"),
    "LeaseOperations": pb.LeaseOperationsRequest(executor_id="e1", max_in_flight=4, lease_seconds=30),
    "ReportOperation": pb.ReportOperationRequest(
        executor_id="e1", operation_id=1, outcome=pb.OPERATION_OUTCOME_SUCCEEDED
    ),
    "AcknowledgeScheduledEvent": pb.AcknowledgeScheduledEventRequest(name="web", event_id=1),
    "CompleteLifecycleAction": pb.CompleteLifecycleActionRequest(
        name="web", instance_id=1, hook="drain", result=pb.LIFECYCLE_HOOK_DEFAULT_RESULT_CONTINUE
    ),
    "RecordLifecycleActionHeartbeat": pb.RecordLifecycleActionHeartbeatRequest(
        name="web", instance_id=1, hook="drain"
    ),
    "GetFleetStatus": pb.GetFleetStatusRequest(name="web"),
}


#: More starting points for the methods whose paths depend on the scale set's policies: "mix" upgrades by
#: rolling batches, "web" (once updated) automatically.
MORE_VALID: dict[str, list[Message]] = {
    "UpdateScaleSet": [
        pb.UpdateScaleSetRequest(
            scale_set=pb.ScaleSetSpec(name="mix", model_version=3), update_mask={"paths": ["model_version"]}
        ),
        pb.UpdateScaleSetRequest(
            scale_set=pb.ScaleSetSpec(name="web", upgrade_policy={"mode": pb.UPGRADE_MODE_AUTOMATIC}),
            update_mask={"paths": ["upgrade_policy"]},
        ),
    ],
    "SetCapacity": [pb.SetCapacityRequest(name="mix", capacity=7)],
    "StartRollingUpgrade": [pb.StartRollingUpgradeRequest(name="mix")],
    "CancelRollingUpgrade": [pb.CancelRollingUpgradeRequest(name="mix")],
    "UpgradeInstances": [pb.UpgradeInstancesRequest(name="mix", instance_ids=[0, 1])],
    "Rebalance": [pb.RebalanceRequest(name="mix", max_surge=1)],
    "EvictInstances": [pb.EvictInstancesRequest(name="mix", instance_ids=[0])],
    "CompleteLifecycleAction": [pb.CompleteLifecycleActionRequest(name="mix", instance_id=4, hook="drain")],
    # A Spot price above "mix"'s max price schedules evictions, which an executor acknowledges.
    "SetPoolCapacity": [
        pb.SetPoolCapacityRequest(pool=pb.Pool(zone="1", vm_size=SIZE, priority=pb.PRIORITY_SPOT, price=0.9))
    ],
    "AcknowledgeScheduledEvent": [pb.AcknowledgeScheduledEventRequest(name="mix", event_id=1)],
    "LeaseOperations": [pb.LeaseOperationsRequest(executor_id="e2", zones=["2"], max_in_flight=1)],
    "ReportOperation": [
        pb.ReportOperationRequest(
            executor_id="e1",
            operation_id=2,
            outcome=pb.OPERATION_OUTCOME_FAILED,
            error_code="ZonalAllocationFailed",
        )
    ],
}


def _mutate(draw: st.DrawFn, msg: Any) -> None:
    """Changes one field somewhere in ``msg``: a scalar set to a value of its type (often out of range), a
    repeated field refilled, a message cleared or changed within, an element of a list changed, dropped or
    duplicated."""
    if not msg.DESCRIPTOR.fields:
        return
    field = draw(st.sampled_from(list(msg.DESCRIPTOR.fields)))
    value = getattr(msg, field.name)
    if field.message_type is None:
        if field.is_repeated:
            del value[:]
            value.extend(draw(st.lists(scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    elif field.is_repeated:
        how = draw(st.sampled_from(["change", "drop", "duplicate", "add"]) if value else st.just("add"))
        if how == "add":
            _mutate(draw, value.add())
        else:
            item = draw(st.integers(0, len(value) - 1))
            if how == "change":
                _mutate(draw, value[item])
            elif how == "drop":
                del value[item]
            else:
                value.add().CopyFrom(value[item])
    elif draw(st.integers(0, 4)) == 0:
        msg.ClearField(field.name)
    else:
        _mutate(draw, value)


@st.composite
def mutated(draw: st.DrawFn, valid: Message) -> bytes:
    """``valid`` with one to three of its fields changed (:func:`_mutate`)."""
    msg = type(valid)()
    msg.CopyFrom(valid)
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, msg)
    return msg.SerializeToString()


REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)
#: Every this many calls to a server, :func:`replays` checks it.
REPLAY_EVERY = 100
#: How far a server's clock moves on before a call: mostly not at all or a little, sometimes past a lease,
#: a lifecycle hook's or a repair's grace period, an autoscale cooldown, or a day.
CLOCK_STEPS = [0, 0, 1, 10, 60, 600, 3600, 86_400]


class Clock:
    """A server's clock, which the fuzz moves on between calls (from the real time when it starts)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Fuzzed:
    """A live server, its clock, its database and the calls the fuzz made to it."""

    server: ServerThread
    clock: Clock
    db: Path
    calls: int = 0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Fuzzed]]:
    """Two servers: one applying plans as made, one handing them to executors (so that leases, operation
    reports and lifecycle hooks have something to act on)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    clocks = Clock(), Clock()
    with (
        ServerThread(str(tmp / "immediate.db"), REGION, instance_limit=2000, clock=clocks[0]) as immediate,
        ServerThread(
            str(tmp / "executors.db"),
            REGION,
            instance_limit=2000,
            clock=clocks[1],
            executors=True,
            snapshot_every=40,  # its state is restored from a snapshot as well as replayed
        ) as executors,
    ):
        yield [
            Fuzzed(immediate, clocks[0], tmp / "immediate.db"),
            Fuzzed(executors, clocks[1], tmp / "executors.db"),
        ]


def with_scale_sets(server: ServerThread) -> None:
    """Creates the fuzz's scale sets "web" (3 instances) and "mix" (:data:`RICH`, 4) where a call deleted
    them, so that most calls find them, with the region's quotas, pools and zones set free first (calls
    before may have left no room for them)."""
    names = server.call(server.control.inspect(lambda c: set(c.scale_set_names())))
    web = pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    missing = [(spec, capacity) for spec, capacity in ((web, 3), (RICH, 4)) if spec.name not in names]
    if not missing:
        return
    with Client(server.target) as client:
        region = client.describe_region()
        for quota in region.core_quotas:
            client.set_core_quota(quota.family, None)
        for pool in region.pools:
            client.set_pool_capacity(pool.zone, pool.vm_size, pool.priority, None, restricted=False)
        for zone in region.unavailable_zones:
            client.set_zone_available(zone, True)
    with grpc.insecure_channel(server.target) as ch:
        create = ch.unary_unary("/scaleset.v1.ScaleSets/CreateScaleSet")
        for spec, capacity in missing:
            with contextlib.suppress(grpc.RpcError):  # no room left by the scale sets calls created
                create(pb.CreateScaleSetRequest(scale_set=spec, capacity=capacity).SerializeToString())


def exported(control: ControlPlane) -> tuple[int, str]:
    """A control plane's state: the sequence of its last change, and everything its engine and policies
    hold (but the time of the latest call, which a refused one may move on)."""
    held = {k: v for k, v in control.controller.export_state().items() if k != "now"}
    return control.sequence, json.dumps(held, sort_keys=True, default=str)


def state(server: ServerThread) -> tuple[int, str]:
    """:func:`exported` of a live server, with no change in progress."""
    return server.call(server.control.inspect(lambda _: exported(server.control)))  # type: ignore[no-any-return]


def replays(fuzzed: Fuzzed) -> None:
    """A backup of the server's database (made while it runs, as `scaleset db backup` makes one) loads,
    its newest snapshot and the events since replayed, to the state the server holds: whatever the fuzz got
    accepted, and the policies' advances in between, is logged in full and replays the same."""
    server = fuzzed.server
    server.call(server.control.settled())
    live = state(server)
    copy = fuzzed.db.with_name(f"backup-{fuzzed.db.name}")
    backup(str(fuzzed.db), str(copy))
    store = open_store(str(copy))
    try:
        replayed = ControlPlane(store, REGION, instance_limit=2000)
        replayed.check()
    finally:
        store.close()
    again = exported(replayed)
    assert again == live, f"replayed, the state differs: {differences(again, live)}"


def differences(replayed: tuple[int, str], live: tuple[int, str]) -> list[str]:
    """Where a replayed state (:func:`exported`) differs from the live one: up to five paths."""
    found = [f"sequence: replayed {replayed[0]}, live {live[0]}"] if replayed[0] != live[0] else []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(found) >= 5 or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}/{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for k, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{k}]")
        else:
            found.append(f"{path}: replayed {str(a)[:200]}, live {str(b)[:200]}")

    walk(json.loads(replayed[1]), json.loads(live[1]), "")
    return found


def starting_points(name: str, now: float) -> list[Message]:
    """The valid requests of method ``name``, metric samples timed at the server's clock ``now``."""
    found = [VALID[name], *MORE_VALID.get(name, [])]
    if name != "ReportMetrics":
        return found
    timed = []
    for valid in found:
        msg = pb.ReportMetricsRequest()
        msg.CopyFrom(valid)
        for series in msg.series:
            for sample in series.samples:
                sample.time_unix_ms = int(now * 1000)
        timed.append(msg)
    return timed


def as_long_as_it_takes(test: Any) -> Any:
    """On demand the fuzz takes as long as it takes (20,000 calls: 15-20 minutes), beyond the suite's
    300 s per test."""
    return pytest.mark.timeout(0)(test) if EXAMPLES else test


def call(target: str, service: str, method: Any, payload: bytes) -> grpc.StatusCode:
    """One call with ``payload`` as its request; the status it ends with (a stream: once its first message
    is in)."""
    path = f"/scaleset.v1.{service}/{method.name}"
    with grpc.insecure_channel(target) as ch:
        try:
            if method.server_streaming:
                replies = ch.unary_stream(path)(payload, timeout=STREAM_WAIT_S)
                next(iter(replies), None)
                replies.cancel()
            else:
                ch.unary_unary(path)(payload, timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{service}.{method.name}: {err.code()} {err.details()}"
            )
            hung = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming
            assert not hung, f"{service}.{method.name} did not answer within 30 s"
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@settings(
    max_examples=EXAMPLES or 1000,
    derandomize=EXAMPLES is None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
@as_long_as_it_takes
def test_no_request_gets_internal_or_unknown_and_a_refused_one_changes_nothing(
    servers: list[Fuzzed], data: st.DataObject
) -> None:
    fuzzed = data.draw(st.sampled_from(servers))
    server = fuzzed.server
    fuzzed.clock.now += data.draw(st.sampled_from(CLOCK_STEPS))
    server.call(server.control.advance())  # what the policy loop does: it must not fail on what was accepted
    assert server.control.policy_failures == 0, "a policy step failed (the server logged it)"
    with_scale_sets(server)
    service, method = data.draw(st.sampled_from(METHODS))
    payload = data.draw(
        st.one_of(
            st.sampled_from(starting_points(method.name, fuzzed.clock.now)).flatmap(mutated),
            message(method.input_type),
            st.binary(max_size=64),
        )
    )
    before = state(server)
    code = call(server.target, service, method, payload)
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        assert state(server) == before, f"{service}.{method.name} refused with {code} changed the state"
    fuzzed.calls += 1
    if fuzzed.calls % REPLAY_EVERY == 0:
        replays(fuzzed)


def test_each_fuzzed_server_holds_what_its_store_replays(servers: list[Fuzzed]) -> None:
    """After the fuzz (it runs first), once more: :func:`replays`."""
    for fuzzed in servers:
        with_scale_sets(fuzzed.server)  # (something to replay when this test runs alone)
        replays(fuzzed)
