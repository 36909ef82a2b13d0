"""The Python clients mirror the in-process Controller: the same return types where the wire carries them,
the same errors, a blocking and an asyncio flavour with the same methods, retries that honour RetryInfo."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaleset import Controller, Region
from scaleset.client import AsyncClient, Client
from scaleset.errors import AccessDeniedError, CapacityError, ConflictError, InternalError, InvalidInputError
from scaleset.testing.server import ServerThread

from tests.conftest import zonal_spec

REGION = Region(zones=["1", "2", "3"], fault_domains_per_zone=3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(str(tmp_path / "state.db"), REGION) as s:
        yield s


def public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def test_both_clients_have_the_same_methods_with_the_same_parameters() -> None:
    sync, asynchronous = public(Client), public(AsyncClient)
    assert sync.keys() == asynchronous.keys()
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name


def test_the_client_returns_what_the_controller_returns(server: ServerThread) -> None:
    local = Controller(REGION)
    with Client(server.target) as c:
        spec = zonal_spec()
        assert c.create_scale_set(spec, 5) == local.create_scale_set(spec, 5)
        assert c.set_capacity("web", 2) == local.set_capacity("web", 2)
        # Columns as the engine keys them, with no object per row; rows as Instances on request.
        assert c.instance_columns("web") == local.instance_columns("web")
        assert c.instance_columns("web", page_size=1) == local.instance_columns("web")  # pages joined
        zones = c.instance_columns("web")["zone"]
        assert (len(zones), zones[0], zones[-1], zones[:1]) == (2, "1", "2", ["1"])
        assert c.list_instances("web") == list(local.get_scale_set("web").instances)
        assert c.describe_region() == local.describe_region()


def test_a_rebalance_plan_is_the_controllers_type_with_the_same_content(server: ServerThread) -> None:
    from scaleset.model import RebalancePlan

    local = Controller(REGION)
    with Client(server.target) as c:
        for side in (local, c):
            side.set_zone_available("1", False)
            side.create_scale_set(zonal_spec(), 9)
            side.set_zone_available("1", True)
        for dry_run in (True, False):
            remote, here = (
                c.rebalance("web", max_surge=2, dry_run=dry_run),
                local.rebalance("web", max_surge=2, dry_run=dry_run),
            )
            assert isinstance(remote, RebalancePlan)
            for name in ("status", "dry_run", "replacements", "violation_before", "violation_after", "violation_bound",
                         "zone_counts_before", "zone_counts_after", "fault_domain_counts_before",
                         "fault_domain_counts_after", "creates", "deletes", "created_ids", "score_after",
                         "time_limit_s"):  # fmt: skip
                assert getattr(remote, name) == getattr(here, name), name
            assert [(w.creates, w.deletes) for w in remote.waves] == [
                (w.creates, w.deletes) for w in here.waves
            ]
            # The solve's stages, all but their times.
            assert [(s.objective, s.status, s.value, s.bound) for s in remote.stages] == [
                (s.objective, s.status, s.value, s.bound) for s in here.stages
            ]
            assert len(remote.stages) == 4 and all(s.seconds > 0 for s in remote.stages)
        # Without a limit, both solve with the default for the set's size; a given one travels.
        assert remote.time_limit_s == pytest.approx(1.0 + 9 / 250_000)
        assert c.rebalance("web", time_limit_s=3.0).time_limit_s == 3.0


def test_a_rolling_upgrade_is_the_controllers_type_with_the_same_state(tmp_path: Path) -> None:
    import dataclasses

    from scaleset import RollingUpgradePolicy, Sku, UpgradePolicy
    from scaleset.policies.upgrade import RollingUpgrade

    clock = [1_700_000_000.0]
    local = Controller(REGION)
    spec = zonal_spec(
        upgrade_policy=UpgradePolicy("Rolling", RollingUpgradePolicy(max_batch_instance_percent=50))
    )
    with ServerThread(str(tmp_path / "state.db"), REGION, clock=lambda: clock[0]) as s, Client(s.target) as c:
        for side in (local, c):
            side.create_scale_set(spec, 4, **({"now": clock[0]} if side is local else {}))
            side.update_scale_set(dataclasses.replace(spec, sku=Sku(name="Standard_D4s_v5")))
        assert c.get_rolling_upgrade("web") is None is local.get_rolling_upgrade("web")
        remote, here = c.start_rolling_upgrade("web"), local.start_rolling_upgrade("web", now=clock[0])
        assert isinstance(remote, RollingUpgrade) and remote == here
        assert c.get_rolling_upgrade("web") == local.get_rolling_upgrade("web")
        assert c.cancel_rolling_upgrade("web") == local.cancel_rolling_upgrade("web", now=clock[0])


def test_errors_are_the_same_classes_with_code_and_field(server: ServerThread) -> None:
    with Client(server.target, retries=0) as c:
        c.create_scale_set(zonal_spec(), 1)
        with pytest.raises(ConflictError) as exists:
            c.create_scale_set(zonal_spec())
        assert exists.value.code == "ScaleSetAlreadyExists"
        with pytest.raises(InvalidInputError) as bad:
            c.create_scale_set(zonal_spec("api", zones=["1", "9"]))
        assert (bad.value.code, bad.value.field) == ("InvalidParameter", "zones")
        with pytest.raises(CapacityError):
            c.set_capacity("web", 5000)


def test_unauthenticated_and_internal_are_their_own_kinds() -> None:
    import grpc
    from scaleset.client import _Failure

    class Failed(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "no"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    assert isinstance(_Failure.of(Failed(grpc.StatusCode.UNAUTHENTICATED)).exception(), AccessDeniedError)
    assert isinstance(_Failure.of(Failed(grpc.StatusCode.PERMISSION_DENIED)).exception(), AccessDeniedError)
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        failure = _Failure.of(Failed(code))
        assert isinstance(failure.exception(), InternalError) and not failure.retryable


def test_a_rate_limited_call_is_retried_after_the_delay_the_server_asks_for(tmp_path: Path) -> None:
    with ServerThread(str(tmp_path / "state.db"), REGION, rate_limit=20) as s:
        with Client(s.target, retries=0) as impatient:
            with pytest.raises(CapacityError) as limited:
                for _ in range(100):
                    impatient.echo(b"x")
            assert limited.value.code == "RateLimited"
        with Client(s.target, retries=5) as patient:
            for _ in range(60):  # three times the burst: the client waits as RetryInfo says
                assert patient.echo(b"y") == b"y"


def test_the_asyncio_client_end_to_end(server: ServerThread) -> None:
    async def run() -> None:
        async with AsyncClient(server.target) as c:
            plan = await c.create_scale_set(zonal_spec(), 3)
            assert len(plan.creates) == 3
            watch = c.watch("web")
            first = await anext(watch)
            assert first.type == "ScaleSetCreated"
            await c.set_capacity("web", 5)
            assert (await anext(watch)).type == "CapacitySet"
            await watch.aclose()
            columns = await c.instance_columns("web")
            assert columns["instance_id"] == [0, 1, 2, 3, 4]
            assert len(await c.list_scale_sets()) == 1
            with pytest.raises(ConflictError) as stale:
                await c.set_capacity("web", 1, etag='W/"1-00000000"')
            assert stale.value.code == "EtagMismatch"

    asyncio.run(run())


def test_a_plan_bigger_than_a_reply_is_applied_and_answered_with_its_counts(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a 1,000,000-instance plan was applied and then failed to send (209 MB against the 64 MB
    limit), and its retry failed the same way. Now it is answered with its counts, like a summary view."""
    from scaleset import convert

    monkeypatch.setattr(convert, "MAX_PLAN_ITEMS", 20)  # the server runs in this process
    with Client(server.target) as client:
        client.create_scale_set(zonal_spec(), 0)
        plan = client.set_capacity("web", 30, request_id="grow-30")
        assert (plan.create_count, len(plan.creates), plan.items_omitted) == (30, 0, True)
        again = client.set_capacity("web", 30, request_id="grow-30")  # the retry gets the same answer
        assert (again.create_count, again.items_omitted) == (30, True)
        small = client.set_capacity("web", 35)
        assert (small.create_count, len(small.creates), small.items_omitted) == (5, 5, False)
        summary = client.set_capacity("web", 36, summary_only=True)
        assert (summary.create_count, len(summary.creates), summary.items_omitted) == (1, 0, True)
        assert client.get_scale_set("web").capacity == 36
