"""Bad or unlucky input gets INVALID_ARGUMENT with the field at fault, never INTERNAL, and changes nothing
(issue 13's "wrong answers" that this round fixed; each was observed on the earlier code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from scaleset import Controller, Engine, Region, RollingUpgradePolicy, Sku, UpgradePolicy
from scaleset.errors import CapacityError, InvalidInputError
from scaleset.testing.server import ServerThread
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from tests.conftest import SIZE, details_of, zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[pb_grpc.ScaleSetsStub]:
    with (
        ServerThread(str(tmp_path / "state.db"), REGION) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        s = pb_grpc.ScaleSetsStub(ch)
        s.CreateScaleSet(
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE)),
                capacity=3,
            )
        )
        yield s


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return]


def test_a_forged_page_token_is_invalid_not_internal(stub: pb_grpc.ScaleSetsStub) -> None:
    # "wrI=" decodes to "²", which str.isdigit() accepts but int() does not.
    assert code_of(lambda: stub.ListInstances(pb.ListInstancesRequest(name="web", page_token="wrI="))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_watching_after_2_to_the_63_is_invalid(stub: pb_grpc.ScaleSetsStub) -> None:
    assert code_of(lambda: next(iter(stub.WatchEvents(pb.WatchEventsRequest(after=2**63))))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_set_capacity_without_a_capacity_changes_nothing(stub: pb_grpc.ScaleSetsStub) -> None:
    assert (
        code_of(lambda: stub.SetCapacity(pb.SetCapacityRequest(name="web")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert stub.GetScaleSet(pb.GetScaleSetRequest(name="web")).capacity == 3
    assert stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=0)).plan.capacity_after == 0


@pytest.mark.parametrize("pause", ["PT" + "9" * 400 + "S", "P9999999999999D", "P8D"])
def test_absurd_rolling_upgrade_pauses_are_refused_at_the_door(pause: str) -> None:
    c = Controller(REGION)
    spec = zonal_spec(
        upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy(pause_time_between_batches=pause))
    )
    with pytest.raises(InvalidInputError) as caught:
        c.create_scale_set(spec)
    assert len(str(caught.value)) < 300  # the 400-digit input is not echoed whole


def test_huge_names_are_refused_and_not_echoed() -> None:
    c = Controller(REGION)
    with pytest.raises(InvalidInputError) as big_sku:
        c.create_scale_set(zonal_spec(sku=Sku(name="S" * 1_000_000)))
    assert big_sku.value.field == "sku.name" and len(str(big_sku.value)) < 300
    with pytest.raises(InvalidInputError) as big_name:
        c.create_scale_set(zonal_spec(name="n" * 8192))
    assert len(str(big_name.value)) < 300
    with pytest.raises(InvalidInputError) as big_pool:
        c.set_pool_capacity("1", "P" * 10_000, "Regular", 1)
    assert big_pool.value.field == "pool.vm_size"


def test_failed_creates_do_not_fill_the_size_table() -> None:
    """Before, 65,535 failing creates that each named a new size refused every new size until restart."""
    e = Engine(Region(zones=["1"]))
    e.set_zone_available("1", False)  # every create fails after its sizes were looked up
    for k in range(66_000):
        with pytest.raises(CapacityError):
            e.create_scale_set(zonal_spec(f"s{k}", zones=["1"], sku=Sku(name=f"Size_{k}")), 1)
    e.set_zone_available("1", True)
    e.create_scale_set(zonal_spec("ok", zones=["1"], sku=Sku(name="Brand_New_Size")), 1)
    assert e.capacity("ok") == 1


def test_the_instance_limit_is_bounded() -> None:
    with pytest.raises(InvalidInputError) as caught:
        Engine(REGION, instance_limit=10**13)
    assert caught.value.field == "instance_limit"
    e = Engine(REGION, instance_limit=10_000_000)
    e.create_scale_set(zonal_spec())
    with pytest.raises(CapacityError):
        e.set_capacity("web", 10**12, dry_run=True)  # refused by the limit, not an allocation abort
    assert dataclasses.is_dataclass(e.get_spec("web"))


def test_garbage_request_bytes_are_invalid_argument(tmp_path: Path) -> None:
    with (
        ServerThread(str(tmp_path / "state.db"), REGION) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        raw = ch.unary_unary("/scaleset.v1.ScaleSets/GetScaleSet")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        truncated = pb.GetScaleSetRequest(name="web").SerializeToString()[:-2]
        with pytest.raises(grpc.RpcError) as short:
            raw(truncated, timeout=10)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_one_request_id_in_flight_for_two_requests_never_shares_a_reply(tmp_path: Path) -> None:
    import asyncio

    from scaleset import commands as cmd

    with ServerThread(str(tmp_path / "state.db"), REGION) as server:
        control = server.control

        async def both() -> list[object]:
            await control.mutate(
                method="CreateScaleSet",
                command=cmd.CreateScaleSet(zonal_spec(), 2),
                encode=lambda o: pb.CreateScaleSetResponse(),
            )
            scale = control.mutate(
                method="SetCapacity",
                command=cmd.SetCapacity("web", 5),
                request_id="same",
                payload=b"scale",
                encode=lambda o: pb.SetCapacityResponse(revision=o.revision),
            )
            delete = control.mutate(
                method="DeleteScaleSet",
                command=cmd.DeleteScaleSet("web"),
                request_id="same",
                payload=b"delete",
                encode=lambda o: pb.DeleteScaleSetResponse(revision=o.revision),
            )
            return await asyncio.gather(scale, delete, return_exceptions=True)

        scaled, deleted = server.call(both())
        assert isinstance(scaled, pb.SetCapacityResponse) and scaled.revision == 2
        assert isinstance(deleted, InvalidInputError) and deleted.code == "RequestIdReused"
        assert control.controller.capacity("web") == 5  # the set still exists


def test_a_database_is_used_by_one_server_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scaleset.cli import main
    from scaleset.errors import ConflictError, UnavailableError
    from scaleset.store import SQLiteStore

    db = str(tmp_path / "state.db")
    first = SQLiteStore(db)
    with pytest.raises(ConflictError) as caught:
        SQLiteStore(db)
    assert caught.value.code == "DatabaseInUse"
    assert main(["serve", "--db", db, "--port", "0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error [DatabaseInUse]:") and "\n" not in err
    first.close()
    SQLiteStore(db).close()  # free again
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UnavailableError) as bad:
        SQLiteStore(str(damaged))
    assert bad.value.code == "DatabaseDamaged"


def test_watch_streams_are_bounded_and_big_replies_fit(tmp_path: Path) -> None:
    from scaleset.client import Client
    from scaleset.errors import CapacityError as TooMany

    with ServerThread(str(tmp_path / "state.db"), REGION, max_watchers=1, instance_limit=200_000) as server:
        with Client(server.target) as c, Client(server.target, retries=0) as other:
            c.create_scale_set(zonal_spec(), 1)
            first = iter(c.watch("web"))
            next(first)
            with pytest.raises(TooMany) as caught:
                next(iter(other.watch("web")))
            assert caught.value.code == "TooManyWatchers"
            del first
            # A 100,000-instance plan (about 32 MB) comes back in full: client and server limits agree.
            plan = other.set_capacity("web", 100_000)
            assert len(plan.creates) == 99_999


def test_db_check_rebuilds_the_state_or_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scaleset.cli import main

    db = str(tmp_path / "state.db")
    with ServerThread(db, REGION) as server:
        from scaleset.client import Client

        with Client(server.target) as c:
            c.create_scale_set(zonal_spec(), 4)
    assert main(["db", "check", "--db", db]) == 0
    assert "ok: 1 scale sets, 4 instances" in capsys.readouterr().out
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"\0" * 4096)
    assert main(["db", "check", "--db", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error [DatabaseDamaged]") and "\n" not in err
    # A scale set's snapshot part whose instances encoding was cut short (compression intact), or whose
    # bytes are not compressed data at all: the message names the scale set.
    import sqlite3
    import zlib

    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM snapshot_parts WHERE name = 'web'").fetchone()
        for part in (zlib.compress(zlib.decompress(data)[:-3]), b"\x00\x11"):
            conn.execute("UPDATE snapshot_parts SET data = ? WHERE name = 'web'", (part,))
            conn.commit()
            assert main(["db", "check", "--db", db]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error [DatabaseDamaged]") and "\n" not in err
            assert "the stored snapshot of scale set 'web' is damaged" in err


def test_invalid_fields_come_back_as_a_bad_request_at_their_path_in_the_request(
    stub: pb_grpc.ScaleSetsStub,
) -> None:
    spec = pb.ScaleSetSpec(name="api", zones=["1", "9"], sku=pb.Sku(name=SIZE))
    code, details = details_of(lambda: stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=spec)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = details
    assert info.reason == "InvalidParameter" and info.metadata["field"] == "zones"  # type: ignore[attr-defined]
    (violation,) = bad.field_violations  # type: ignore[attr-defined]
    assert violation.field == "scale_set.zones" and "9" in violation.description
    # A field of the request itself keeps its own path.
    code, details = details_of(lambda: stub.SetCapacity(pb.SetCapacityRequest(name="web")))
    assert [v.field for v in details[1].field_violations] == ["capacity"]  # type: ignore[attr-defined]


def test_status_codes_say_what_a_client_should_do(stub: pb_grpc.ScaleSetsStub) -> None:
    # Each was another code before (issue 11): FAILED_PRECONDITION, FAILED_PRECONDITION, RESOURCE_EXHAUSTED.
    existing = pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    code, (info, *_) = details_of(lambda: stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=existing)))
    assert (code, info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ScaleSetAlreadyExists")  # type: ignore[attr-defined]
    stale = stub.GetScaleSet(pb.GetScaleSetRequest(name="web")).etag
    stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=4))
    code, (info, *_) = details_of(
        lambda: stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=5, etag=stale))
    )
    assert (code, info.reason) == (grpc.StatusCode.ABORTED, "EtagMismatch")  # type: ignore[attr-defined]
    code, (info, bad) = details_of(
        lambda: stub.SetCapacity(pb.SetCapacityRequest(name="web", capacity=2**64 - 1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # never satisfiable, so not RESOURCE_EXHAUSTED
    assert [v.field for v in bad.field_violations] == ["capacity"]  # type: ignore[attr-defined]
    assert stub.GetScaleSet(pb.GetScaleSetRequest(name="web")).capacity == 4


def test_an_etag_is_tied_to_its_scale_set(stub: pb_grpc.ScaleSetsStub) -> None:
    other = pb.ScaleSetSpec(name="api", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=other, capacity=3))
    web, api = (stub.GetScaleSet(pb.GetScaleSetRequest(name=n)) for n in ("web", "api"))
    assert web.revision == api.revision and web.etag != api.etag
    assert code_of(
        lambda: stub.SetCapacity(pb.SetCapacityRequest(name="api", capacity=1, etag=web.etag))
    ) == (grpc.StatusCode.ABORTED)
    stub.SetCapacity(pb.SetCapacityRequest(name="api", capacity=1, etag=api.etag))


def test_a_page_token_is_good_only_for_its_own_query(stub: pb_grpc.ScaleSetsStub) -> None:
    other = pb.ScaleSetSpec(name="api", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    stub.CreateScaleSet(pb.CreateScaleSetRequest(scale_set=other, capacity=3))
    first = stub.ListInstances(pb.ListInstancesRequest(name="web", page_size=2))
    assert first.next_page_token
    rest = stub.ListInstances(
        pb.ListInstancesRequest(name="web", page_size=2, page_token=first.next_page_token)
    )
    assert list(rest.instances.instance_id) == [2]
    # The same token on another scale set was an empty page with OK; now it is refused.
    code, (info, bad) = details_of(
        lambda: stub.ListInstances(pb.ListInstancesRequest(name="api", page_token=first.next_page_token))
    )
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidPageToken")  # type: ignore[attr-defined]
    assert [v.field for v in bad.field_violations] == ["page_token"]  # type: ignore[attr-defined]


def test_updates_follow_aip_134(stub: pb_grpc.ScaleSetsStub) -> None:
    # No mask: only the fields the request sets change (this failed on "zone cannot be removed").
    bigger = stub.UpdateScaleSet(
        pb.UpdateScaleSetRequest(scale_set=pb.ScaleSetSpec(name="web", sku=pb.Sku(name="Standard_D4s_v5")))
    )
    assert bigger.spec.sku.name == "Standard_D4s_v5" and list(bigger.spec.zones) == ["1", "2", "3"]
    # "*" replaces the whole spec.
    whole = pb.ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=pb.Sku(name=SIZE))
    request = pb.UpdateScaleSetRequest(scale_set=whole)
    request.update_mask.paths.append("*")
    assert stub.UpdateScaleSet(request).spec.sku.name == SIZE
    request.update_mask.paths.append("sku")
    assert code_of(lambda: stub.UpdateScaleSet(request)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_retry_matches_its_request_id_on_meaning_not_bytes(stub: pb_grpc.ScaleSetsStub) -> None:
    unset = pb.SetCapacityRequest(name="web", capacity=5, request_id="same-meaning")
    full = pb.SetCapacityRequest(name="web", capacity=5, request_id="same-meaning", view=pb.PLAN_VIEW_FULL)
    first = stub.SetCapacity(unset)
    assert stub.SetCapacity(full) == first  # the first answer, not RequestIdReused
    assert stub.GetScaleSet(pb.GetScaleSetRequest(name="web")).revision == first.revision
    summary = pb.SetCapacityRequest(
        name="web", capacity=5, request_id="same-meaning", view=pb.PLAN_VIEW_SUMMARY
    )
    assert code_of(lambda: stub.SetCapacity(summary)) == grpc.StatusCode.INVALID_ARGUMENT


def test_connections_beyond_the_limit_are_closed_until_one_ends(tmp_path: Path) -> None:
    """`serve --max-connections 3`: a fourth client connection is closed as it arrives (UNAVAILABLE), and
    accepted once one of the three has gone."""
    import signal
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from scaleset.testing.server import free_port, start_server_process

    port = free_port()
    proc = start_server_process(
        tmp_path / "state.db", port, tmp_path / "server.log", "--max-connections", "3"
    )

    def connect() -> grpc.Channel:  # a connection of its own (channels would otherwise share one)
        return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])

    def check(channel: grpc.Channel) -> int:
        return int(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        )

    try:
        held = [connect() for _ in range(3)]
        deadline = time.monotonic() + 30
        while True:  # the start-up check's own connection may take a moment to go
            try:
                assert all(check(c) == health_pb2.HealthCheckResponse.SERVING for c in held)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "three connections were never all accepted"
                time.sleep(0.2)
        with connect() as fourth, pytest.raises(grpc.RpcError) as refused:
            check(fourth)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        held.pop().close()
        while True:
            with connect() as again:
                try:
                    assert check(again) == health_pb2.HealthCheckResponse.SERVING
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline + 30, "no connection accepted after one ended"
                    time.sleep(0.2)
        for c in held:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_message_left_out_where_one_is_required_is_invalid_at_its_path(tmp_path: Path) -> None:
    # An autoscale profile without its capacity (or a rule without its trigger) reached the policies as a
    # placeholder and failed there with INTERNAL (found by the fuzz).
    with (
        ServerThread(str(tmp_path / "state.db"), REGION) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        pb_grpc.ScaleSetsStub(ch).CreateScaleSet(
            pb.CreateScaleSetRequest(
                scale_set=pb.ScaleSetSpec(name="web", zones=["1"], sku=pb.Sku(name=SIZE))
            )
        )
        autoscale = pb_grpc.AutoscaleStub(ch)
        bounds = pb.AutoscaleCapacity(minimum=1, maximum=2, default=1)
        for profile, path in (
            (pb.AutoscaleProfile(name="p"), "profiles[0].capacity"),
            (
                pb.AutoscaleProfile(name="p", capacity=bounds, rules=[pb.ScaleRule()]),
                "profiles[0].rules[0].metric_trigger",
            ),
        ):
            setting = pb.AutoscaleSetting(profiles=[profile])
            request = pb.SetAutoscaleSettingRequest(name="web", setting=setting)
            code, details = details_of(lambda r=request: autoscale.SetAutoscaleSetting(r))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in details[1].field_violations] == [f"setting.{path}"]  # type: ignore[attr-defined]
        assert server.control.sequence == 1  # the create: nothing refused was logged
