"""End to end over a real gRPC channel: every RPC, the error mapping, idempotency, etags, paging,
WatchEvents, health checking, reflection, and durability across restarts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from scaleset import Instance, Region, ScaleInPolicy
from scaleset.client import Client
from scaleset.control import make_etag
from scaleset.errors import CapacityError, ConflictError, InvalidInputError, NotFoundError
from scaleset.testing.server import ServerThread
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from tests.conftest import SIZE, take, zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "state.db"), REGION) as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.ScaleSetsStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ScaleSetsStub(channel)


def error_info(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "scaleset"
    return err.code(), info.reason


def test_scale_set_lifecycle_through_the_generated_stub(stub: pb_grpc.ScaleSetsStub) -> None:
    spec = pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    created = stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=spec, capacity=6))
    assert created.scale_set.capacity == 6 and created.scale_set.revision == 1
    assert created.scale_set.spec.orchestration_mode == pb.ORCHESTRATION_MODE_FLEXIBLE  # Azure's default
    assert created.scale_set.spec.platform_fault_domain_count == 1
    assert [c.zone for c in created.plan.creates] == ["1", "2", "3", "1", "2", "3"]
    assert all(c.reason.startswith("scale-out:") for c in created.plan.creates)

    got = stub.GetScaleSet(pb.GetScaleSetRequest(name="web"))
    assert got == created.scale_set

    scaled = stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=4, etag=got.etag))
    assert scaled.revision == 2 and scaled.plan.delete_count == 2
    assert [d.instance_id for d in scaled.plan.deletes] == [5, 4]

    summary = stub.SetCapacity(
        pb.SetCapacityRequest(name="web", capacity=10, dry_run=True, view=pb.PLAN_VIEW_SUMMARY)
    )
    assert summary.plan.create_count == 6 and not summary.plan.creates and summary.plan.dry_run
    assert stub.GetScaleSet(pb.GetScaleSetRequest(name="web")).capacity == 4

    update = pb.UpdateScaleSetRequest(
        scale_set=pb.ScaleSetSpec(
            name="web", scale_in_policy=pb.ScaleInPolicy(rules=[pb.SCALE_IN_RULE_OLDEST_VM])
        )
    )
    update.update_mask.paths.append("scale_in_policy")
    updated = stub.UpdateScaleSet(update)
    assert updated.spec.scale_in_policy.rules == [pb.SCALE_IN_RULE_OLDEST_VM] and updated.spec.zones == [
        "1",
        "2",
        "3",
    ]
    assert updated.spec.model_version == 1

    stub.DeleteScaleSet(pb.DeleteScaleSetRequest(name="web"))
    with pytest.raises(grpc.RpcError) as err:
        stub.GetScaleSet(pb.GetScaleSetRequest(name="web"))
    assert error_info(err.value) == (grpc.StatusCode.NOT_FOUND, "ResourceNotFound")


@pytest.mark.parametrize(
    ("request_", "status", "reason"),
    [
        (
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="x", orchestration_mode=99, sku=pb.Sku(name=SIZE))  # type: ignore[arg-type]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "InvalidParameter",
        ),
        (
            pb.CreateScaleSetRequest(scale_set=pb.ScaleSetSpec(name="bad name", sku=pb.Sku(name=SIZE))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "InvalidResourceName",
        ),
        (
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="x", zones=["1"], zone_balance=True, sku=pb.Sku(name=SIZE))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ZoneBalanceRequiresMultipleZones",
        ),
        (
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="x", sku=pb.Sku(name=SIZE)), capacity=5000
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OperationNotAllowed",
        ),
        (
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="x", sku=pb.Sku(name=SIZE), max_price=0.5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MaxPriceIsSupportedOnlyForAzureSpotVirtualMachines",
        ),
    ],
)
def test_errors_carry_status_and_stable_code(
    stub: pb_grpc.ScaleSetsStub, request_: pb.CreateScaleSetRequest, status: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateScaleSet(request_)
    assert error_info(err.value) == (status, reason)
    assert err.value.details()
    assert stub.ListScaleSets(pb.ListScaleSetsRequest()).scale_sets == []


def test_error_codes_through_the_client(client: Client) -> None:
    client.create_scale_set(zonal_spec(orchestration_mode="Uniform"), 3)
    with pytest.raises(ConflictError) as conflict:
        client.update_scale_set(zonal_spec(orchestration_mode="Flexible"))
    assert conflict.value.code == "PropertyChangeNotAllowed"
    with pytest.raises(NotFoundError) as missing:
        client.set_capacity("nope", 1)
    assert missing.value.code == "ResourceNotFound"
    with pytest.raises(NotFoundError) as no_instance:
        client.delete_instances("web", [99])
    assert no_instance.value.code == "InstanceNotFound"
    client.set_zone_available("1", False)
    client.set_zone_available("2", False)
    with pytest.raises(CapacityError) as blocked:
        client.set_capacity("web", 6)
    assert blocked.value.code == "TooManyZonesUnavailable"
    with pytest.raises(InvalidInputError):
        client.set_protection("web", [0], protect_from_scale_in=False, protect_from_scale_set_actions=True)
    assert client.get_scale_set("web").revision == 1


def test_request_id_makes_retries_safe(server: ServerThread, stub: pb_grpc.ScaleSetsStub) -> None:
    stub.CreateScaleSet(
        pb.CreateScaleSetRequest(
            scale_set=pb.ScaleSetSpec(name="web", zones=["1", "2"], sku=pb.Sku(name=SIZE))
        )
    )
    request = pb.SetCapacityRequest(name="web", capacity=5, request_id="retry-1")
    first = stub.SetCapacity(request)
    stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=2))
    again = stub.SetCapacity(request)
    assert again == first  # the first answer, not a second application
    got = stub.GetScaleSet(pb.GetScaleSetRequest(name="web"))
    assert got.capacity == 2 and got.revision == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=7, request_id="retry-1"))
    assert error_info(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "RequestIdReused")


def test_concurrent_duplicates_apply_once(server: ServerThread, client: Client) -> None:
    client.create_scale_set(zonal_spec(), 0)
    results = []

    def call() -> None:
        results.append(client.set_capacity("web", 30, request_id="same"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({tuple(c.instance_id for c in plan.creates) for plan in results}) == 1
    assert client.get_scale_set("web").revision == 2


def test_stale_etag_is_rejected_with_the_current_one(stub: pb_grpc.ScaleSetsStub) -> None:
    created = stub.CreateScaleSet(
        pb.CreateScaleSetRequest(scale_set=pb.ScaleSetSpec(name="web", sku=pb.Sku(name=SIZE)))
    )
    etag = created.scale_set.etag
    stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=1, etag=etag))
    with pytest.raises(grpc.RpcError) as err:
        stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=3, etag=etag))
    assert error_info(err.value) == (grpc.StatusCode.ABORTED, "EtagMismatch")
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    current = stub.GetScaleSet(pb.GetScaleSetRequest(name="web"))
    assert info.metadata["current_etag"] == current.etag and info.metadata["current_revision"] == "2"
    assert current.capacity == 1


def test_paging(client: Client, stub: pb_grpc.ScaleSetsStub) -> None:
    for n in range(5):
        client.create_scale_set(zonal_spec(f"s{n}"), 0)
    first = stub.ListScaleSets(pb.ListScaleSetsRequest(page_size=2))
    assert [s.spec.name for s in first.scale_sets] == ["s0", "s1"] and first.next_page_token
    names = [s.spec.name for s in client.list_scale_sets(page_size=2)]
    assert names == [f"s{n}" for n in range(5)]
    client.set_capacity("s0", 25)
    page = stub.ListInstances(pb.ListInstancesRequest(name="s0", page_size=10))
    assert list(page.instances.instance_id) == list(range(10)) and page.next_page_token
    assert page.instances.zone_names[0] == ""
    assert [i.instance_id for i in client.list_instances("s0", page_size=7)] == list(range(25))
    with pytest.raises(grpc.RpcError) as err:
        stub.ListInstances(pb.ListInstancesRequest(name="s0", page_token="%%%"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_instances_rpcs(client: Client) -> None:
    client.create_scale_set(
        zonal_spec(
            priority="Spot",
            eviction_policy="Delete",
            scale_in_policy=ScaleInPolicy(prioritize_unhealthy_vms=True),
        ),
        0,
    )
    client.import_instances(
        "web",
        [
            Instance(instance_id=i, zone=str(1 + i % 3), vm_size=SIZE, priority="Spot", name=f"old-{i}")
            for i in range(6)
        ],
    )
    listed = client.list_instances("web")
    assert [(i.instance_id, i.name, i.zone) for i in listed[:2]] == [(0, "old-0", "1"), (1, "old-1", "2")]
    client.set_protection("web", [0], protect_from_scale_in=True)
    client.report_health("web", [3], "Unhealthy")
    plan = client.set_capacity("web", 5)
    assert [d.instance_id for d in plan.deletes] == [3]
    eviction = client.evict("web", [1])
    assert eviction.deleted == (1,)
    deleted = client.delete_instances("web", [0])
    assert [d.instance_id for d in deleted.deletes] == [0] and "manual" in deleted.deletes[0].reason
    final = client.list_instances("web")
    assert [i.instance_id for i in final] == [2, 4, 5]


def test_region_rpcs(client: Client) -> None:
    region = client.describe_region()
    assert region.zones == ("1", "2", "3") and region.unavailable_zones == ()
    region = client.set_zone_available("3", False)
    assert region.unavailable_zones == ("3",)
    region = client.set_pool_capacity("1", SIZE, "Spot", 4, price=0.02)
    assert [(p.zone, p.available, p.price) for p in region.pools] == [("1", 4, 0.02)]
    client.set_pool_capacity("1", SIZE, "Spot", None)
    assert client.describe_region().pools[0].available is None
    assert client.echo(b"ping") == b"ping"


def test_watch_events_resume(client: Client) -> None:
    client.create_scale_set(zonal_spec(), 3)
    client.set_capacity("web", 5)
    client.set_zone_available("2", False)
    client.set_capacity("web", 4)
    events = client.watch("web", after=0)
    got = [next(events) for _ in range(3)]
    assert [(e.revision, e.type) for e in got] == [
        (1, "ScaleSetCreated"),
        (2, "CapacitySet"),
        (3, "CapacitySet"),
    ]
    assert got[1].plan is not None and [c.instance_id for c in got[1].plan.creates] == [3, 4]
    # Resume after revision 2 of the scale set; then a live event arrives.
    resumed = client.watch("web", after=2)
    assert next(resumed).revision == 3
    client.set_capacity("web", 6)
    live = next(resumed)
    assert (live.revision, live.type, live.summary) == (4, "CapacitySet", "4 -> 6 instances")
    # Global sequence: the region change is there too.
    everything = client.watch("", after=2)
    region_event = next(everything)
    assert (region_event.sequence, region_event.scale_set, region_event.type) == (
        3,
        "",
        "ZoneAvailabilityChanged",
    )
    assert region_event.resume_token == ""  # a single server resumes by sequence; tokens are a cluster's
    with pytest.raises(InvalidInputError) as token:
        next(iter(client.watch("", resume_token="YWxsOjE=")))
    assert token.value.field == "resume_token"


def test_watch_messages_sliced_from_the_shared_encoding_are_those_of_each_event_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A watch of every scale set slices its messages from the recent events encoded end to end: the same
    bytes, split at the same events, as joining each event's encoding, through runs that extend it,
    gaps, overlaps, runs older than it holds, single events past the message limit, and its bounds."""
    import random

    from scaleset import service
    from scaleset.store import EventRecord

    monkeypatch.setattr(service, "WATCH_MESSAGE_BYTES", 64)
    rng = random.Random(7)
    sizes = [rng.choice([3, 10, 30, 90]) for _ in range(50_000)]  # by sequence; some past the limit alone

    def encode(e: EventRecord) -> bytes:
        return f"<{e.sequence}>".encode().ljust(sizes[e.sequence], b".")

    def joined(batch: list[EventRecord]) -> list[bytes]:
        messages, message, size = [], b"", 0
        for field in map(encode, batch):
            if message and size + len(field) > service.WATCH_MESSAGE_BYTES:
                messages.append(message)
                message, size = b"", 0
            message, size = message + field, size + len(field)
        return [*messages, message]

    def run(first: int, n: int) -> list[EventRecord]:
        return [EventRecord.of(s, "web", s, "CapacitySet", {}, {}, 0) for s in range(first, first + n)]

    stream = service.EncodedEvents(encode, max_events=40, max_bytes=1_500)
    newest, sliced = 0, 0
    for _ in range(3_000):
        kind = rng.random()
        if kind < 0.6:  # the next run after the newest (a live watcher), sometimes overlapping it
            first = max(1, newest + 1 - rng.randrange(3))
        elif kind < 0.7:  # a gap
            first = newest + 1 + rng.randrange(1, 20)
        else:  # a run behind the newest: held, or older than held
            first = max(1, newest - rng.randrange(1, 80))
        batch = run(first, rng.randrange(1, 25))
        got = stream.messages(batch)
        if first > newest:
            assert got is not None  # a run past everything seen is always sliced
        if got is not None:
            sliced += 1
            assert got == joined(batch)
        newest = max(newest, batch[-1].sequence)
        assert len(stream._starts) <= 40 + 25 and len(stream._data) <= 1_500 + 25 * 90
    # Not a run of consecutive sequences (a filtered batch): left to the caller.
    assert stream.messages([*run(newest + 1, 1), *run(newest + 3, 1)]) is None
    assert sliced > 1_000


def test_a_watch_answers_at_once_and_ends_with_its_scale_set(stub: pb_grpc.ScaleSetsStub) -> None:
    # Unknown scale set: NOT_FOUND, not a stream that waits for the name to appear.
    with pytest.raises(grpc.RpcError) as unknown:
        next(iter(stub.WatchEvents(pb.WatchEventsRequest(scale_set="web"))))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    stub.CreateScaleSet(
        pb.CreateScaleSetRequest(scale_set=pb.ScaleSetSpec(name="web", sku=pb.Sku(name=SIZE)))
    )
    # Headers arrive before any event: a client can open the watch, then make the change it waits for.
    watch = stub.WatchEvents(pb.WatchEventsRequest(scale_set="web", after=1))
    assert ("scaleset-stream", "open") in watch.initial_metadata()
    stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=2))
    stub.DeleteScaleSet(pb.DeleteScaleSetRequest(name="web"))
    # The stream ends (OK) after the deletion of the scale set it watches.
    assert [e.type for message in watch for e in message.events] == ["CapacitySet", "ScaleSetDeleted"]
    assert watch.code() == grpc.StatusCode.OK
    # A watch that resumes before the deletion replays it, though the set is gone.
    replay = stub.WatchEvents(pb.WatchEventsRequest(scale_set="web", after=2))
    assert [e.type for message in replay for e in message.events] == ["ScaleSetDeleted"]


def test_health_checking_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="scaleset.v1.ScaleSets")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"scaleset.v1.ScaleSets", "scaleset.v1.Regions", "grpc.health.v1.Health"} <= names
        assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
        # grpc.reflection.v1 answers too (same messages on the wire), with the file's comments.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = v1(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="scaleset.v1.ScaleSets")])
        )
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(f)
            for f in reply.file_descriptor_response.file_descriptor_proto
        ]
        (ours,) = [f for f in files if f.name == "scaleset/v1/scaleset.proto"]
        comments = " ".join(loc.leading_comments for loc in ours.source_code_info.location)
        assert "Resume after this per-scale-set revision" in comments


def test_state_survives_restarts_with_and_without_snapshots(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION, snapshot_every=3) as first, Client(first.target) as c:
        c.create_scale_set(zonal_spec(), 5)
        c.set_zone_available("2", False)
        c.set_capacity("web", 9)
        c.set_protection("web", [1], protect_from_scale_in=True)
        c.update_scale_set(zonal_spec(sku=__import__("scaleset").Sku(name="Standard_D4s_v5")))
        c.set_capacity("web", 11)
        before = (c.get_scale_set("web"), c.list_instances("web"), c.describe_region())
    with ServerThread(db, REGION) as second, Client(second.target) as c:
        after = (c.get_scale_set("web"), c.list_instances("web"), c.describe_region())
        assert after == before
        plan = c.set_capacity("web", 12)  # ids continue where they left off
        assert plan.creates[0].instance_id == 11


def _stored_parts(db: str) -> dict[str, int]:
    """Each scale set's stored snapshot part, by the sequence of the snapshot that wrote it."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT name, sequence FROM snapshot_parts").fetchall())


def test_a_snapshot_writes_again_only_the_scale_sets_that_changed(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec("big"), 1000)
        c.create_scale_set(zonal_spec("small"), 3)
        c.create_scale_set(zonal_spec("gone"), 1)
        server.call(server.control._snapshot())
        first = _stored_parts(db)
        assert first.keys() == {"big", "small", "gone"} and len(set(first.values())) == 1
        c.set_capacity("small", 4, dry_run=True)
        c.set_zone_available("2", False)  # the region's, in the document
        server.call(server.control._snapshot())
        assert _stored_parts(db) == first, "dry runs and region changes write no part"
        c.set_capacity("small", 5)
        c.delete_scale_set("gone")
        server.call(server.control._snapshot())
        second = _stored_parts(db)
        assert second.keys() == {"big", "small"}
        assert second["big"] == first["big"] and second["small"] > first["small"]
        before = (c.list_instances("big"), c.list_instances("small"), c.describe_region())
    with ServerThread(db, REGION) as again, Client(again.target) as c:
        assert (c.list_instances("big"), c.list_instances("small"), c.describe_region()) == before
        assert [s.spec.name for s in c.list_scale_sets()] == ["big", "small"]


def _stored_document(db: str) -> dict[str, Any]:
    import json
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (state,) = conn.execute("SELECT state FROM snapshots ORDER BY sequence DESC LIMIT 1").fetchone()
    return json.loads(state)  # type: ignore[no-any-return]


def test_a_scale_sets_policy_state_is_saved_with_it_and_written_again_only_when_it_changed(
    tmp_path: Path,
) -> None:
    """The policies' state of a scale set (here its autoscale setting and repairs) is in its part, not in
    the document, so a snapshot rewrites only what changed; a change to policies alone (no instance
    moved) writes the part again, a restart reads it back, and the state of a name whose scale set was
    deleted (an autoscale setting outlives it) stays in the document."""
    from scaleset import AutoscaleCapacity, AutoscaleProfile, AutoscaleSetting

    def setting(maximum: int) -> AutoscaleSetting:
        return AutoscaleSetting([AutoscaleProfile("default", AutoscaleCapacity(1, maximum, 1))])

    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server, Client(server.target) as c:
        for name in ("auto", "still", "gone"):
            c.create_scale_set(zonal_spec(name), 1)
            c.set_autoscale_setting(name, setting(5))
        c.set_repairs_service_state("still", "Suspended")
        server.call(server.control._snapshot())
        first = _stored_parts(db)
        policies = _stored_document(db)["controller"]["policies"]
        assert first.keys() == {"auto", "still", "gone"}
        assert policies["autoscale"] == {} and policies["repairs"] == {}, "live scale sets' state is in parts"
        c.set_autoscale_setting("auto", setting(7))  # policies only: no instance changes
        c.delete_scale_set("gone")
        server.call(server.control._snapshot())
        second = _stored_parts(db)
        assert second.keys() == {"auto", "still"}
        assert second["auto"] > first["auto"] and second["still"] == first["still"]
        assert list(_stored_document(db)["controller"]["policies"]["autoscale"]) == ["gone"]
        server.control._snapshot_sequence = server.control.sequence  # restart from this snapshot alone
    with ServerThread(db, REGION) as again, Client(again.target) as c:
        policies = again.control.controller.policies
        assert c.get_autoscale_setting("auto") == setting(7) and c.get_autoscale_setting("still") == setting(
            5
        )
        assert policies.get_autoscale_setting("gone") == setting(5)
        assert policies.export_scale_set("still")["repairs"]["service_state"] == "Suspended"


def test_policy_state_in_an_older_snapshots_document_moves_to_the_parts(tmp_path: Path) -> None:
    """Versions before per-set policy state kept every scale set's in the document, and parts without it:
    such a snapshot loads, and the next one writes those scale sets' parts with their policies."""
    from scaleset import AutoscaleCapacity, AutoscaleProfile, AutoscaleSetting
    from scaleset.store import Snapshot, encode_part

    auto = AutoscaleSetting([AutoscaleProfile("default", AutoscaleCapacity(1, 4, 1))])
    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec("web"), 2)
        c.set_autoscale_setting("web", auto)
        control = server.control
        controller = control.controller
        old = Snapshot(
            control.sequence,
            {
                "controller": controller.export_state(scale_sets=False)
                | {"policies": controller.policies.export()},
                "revisions": dict(control.revisions),
                "region_revision": control.region_revision,
            },
            {"web": encode_part(controller.engine.export_scale_set("web"))},
        )
        server.call(asyncio.to_thread(control._store.save_snapshot, old))
        control._snapshot_sequence = control.sequence  # nothing left for the stop's snapshot
    with ServerThread(db, REGION) as again, Client(again.target) as c:
        assert c.get_autoscale_setting("web") == auto
        again.call(again.control._snapshot())
        assert _stored_document(db)["controller"]["policies"]["autoscale"] == {}
        again.control._snapshot_sequence = again.control.sequence
    with ServerThread(db, REGION) as third, Client(third.target) as c:
        assert c.get_autoscale_setting("web") == auto


def test_a_snapshot_that_fails_to_store_leaves_its_changes_for_the_next(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec("web"), 3)
        server.call(server.control._snapshot())
        c.set_capacity("web", 5)
        store = server.control._store
        real = store.save_snapshot

        def full(_: object) -> int:
            raise OSError("disk full")

        store.save_snapshot = full  # type: ignore[method-assign]
        with pytest.raises(OSError):
            server.call(server.control._snapshot())
        store.save_snapshot = real  # type: ignore[method-assign]
        server.call(server.control._snapshot())
        before = c.list_instances("web")
        server.control._snapshot_sequence = server.control.sequence
    with ServerThread(db, REGION) as again, Client(again.target) as c:
        assert c.list_instances("web") == before and len(before) == 5


def test_a_whole_state_snapshot_from_an_older_version_loads_and_is_rewritten_in_parts(tmp_path: Path) -> None:
    from scaleset.store import Snapshot

    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server, Client(server.target) as c:
        c.create_scale_set(zonal_spec("web"), 7)
        c.set_protection("web", [2], protect_from_scale_in=True)
        before = (c.get_scale_set("web"), c.list_instances("web"))
        control = server.control
        # What the last version stored: the whole engine in the document, no parts.
        old = Snapshot(
            control.sequence,
            {
                "engine": control.controller.export_state(),
                "revisions": dict(control.revisions),
                "region_revision": control.region_revision,
            },
            {"web": None},
        )
        server.call(asyncio.to_thread(control._store.save_snapshot, old))
        assert _stored_parts(db) == {}
        control._snapshot_sequence = control.sequence  # nothing left for the stop's snapshot
    with ServerThread(db, REGION) as again, Client(again.target) as c:
        assert (c.get_scale_set("web"), c.list_instances("web")) == before
        again.call(again.control._snapshot())
        assert _stored_parts(db).keys() == {"web"}
    with ServerThread(db, REGION) as third, Client(third.target) as c:
        assert (c.get_scale_set("web"), c.list_instances("web")) == before


def test_metrics_count_rpcs(server: ServerThread, client: Client) -> None:
    client.create_scale_set(zonal_spec(), 2)
    with pytest.raises(NotFoundError):
        client.get_scale_set("missing")
    registry = server.metrics.registry
    assert (
        registry.get_sample_value("scaleset_rpc_requests_total", {"method": "CreateScaleSet", "code": "OK"})
        == 1
    )
    assert (
        registry.get_sample_value(
            "scaleset_rpc_requests_total", {"method": "GetScaleSet", "code": "NOT_FOUND"}
        )
        == 1
    )
    assert registry.get_sample_value("scaleset_instances") == 2


def test_rebalance_rpc_plans_applies_and_survives_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as first, Client(first.target) as c:
        c.set_zone_available("1", False)
        c.create_scale_set(zonal_spec(), 12)
        c.set_zone_available("1", True)
        dry = c.rebalance("web", max_surge=2)
        assert dry.status == "OPTIMAL" and dry.dry_run and dry.replacements == 4 and len(dry.waves) == 2
        assert (
            dry.violation_before["zones"] == 8
            and dry.violation_after["zones"] == 0
            and dry.violation_bound == 0
        )
        assert c.get_scale_set("web").revision == 1
        applied = c.rebalance("web", dry_run=False, request_id="rb-1")
        again = c.rebalance("web", dry_run=False, request_id="rb-1")
        assert not applied.dry_run and again.creates == applied.creates and again.deletes == applied.deletes
        assert [w.creates[0].instance_id for w in applied.waves] == [12, 13, 14, 15]
        assert [c.instance_id for c in applied.creates] == [12, 13, 14, 15] == list(applied.created_ids)
        info = c.get_scale_set("web")
        assert info.revision == 2 and info.capacity == 12
        # Watchers see the applied moves as a plan: the created and the deleted instances.
        (event,) = [e for e in take(c.watch("web"), 2) if e.type == "ScaleSetRebalanced"]
        assert event.plan is not None
        assert [p.instance_id for p in event.plan.creates] == [12, 13, 14, 15] and len(
            event.plan.deletes
        ) == 4
        before = c.list_instances("web")
        with pytest.raises(ConflictError) as stale:
            c.rebalance("web", dry_run=False, etag=make_etag("web", 1))
        assert stale.value.code == "EtagMismatch"
    with ServerThread(db, REGION) as second, Client(second.target) as c:
        assert c.list_instances("web") == before
        assert c.rebalance("web").replacements == 0
