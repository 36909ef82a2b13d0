from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from scaleset import Engine, Instance, Region, ScaleSetSpec, Sku
from scaleset.client import Client

SIZE = "Standard_D2s_v5"


@pytest.fixture
def region() -> Region:
    return Region(zones=["1", "2", "3"], fault_domains_per_zone=5)


@pytest.fixture
def engine(region: Region) -> Engine:
    return Engine(region)


def zonal_spec(name: str = "web", **kwargs: object) -> ScaleSetSpec:
    fields: dict[str, object] = {"zones": ["1", "2", "3"], "sku": Sku(name=SIZE)}
    fields.update(kwargs)
    return ScaleSetSpec(name=name, **fields)  # type: ignore[arg-type]


def zone_counts(engine: Engine, name: str) -> dict[str | None, int]:
    return dict(sorted(Counter(i.zone for i in engine.get_scale_set(name).instances).items(), key=str))


def priority_counts(engine: Engine, name: str) -> tuple[int, int]:
    c = Counter(i.priority for i in engine.get_scale_set(name).instances)
    return c["Regular"], c["Spot"]


def instances_in(zones: dict[str, Iterable[int]], **kwargs: object) -> list[Instance]:
    """Instances with the given ids per zone, e.g. {"1": [3, 4], "2": [2]}."""
    return [
        Instance(instance_id=i, zone=z, vm_size=SIZE, **kwargs)  # type: ignore[arg-type]
        for z, ids in zones.items()
        for i in ids
    ]


T = TypeVar("T")


def take(items: Iterator[T], n: int) -> list[T]:
    """The first ``n`` items of a (possibly endless) stream, such as a watch."""
    out: list[T] = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


def details_of(call: object) -> tuple[grpc.StatusCode, list[object]]:
    """The status code and the ErrorInfo / BadRequest / RetryInfo details of a failing gRPC call."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    found: list[object] = []
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found.append(message)
    return caught.value.code(), found  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One real PostgreSQL (Debian's) for the session, in a temporary directory on a free port; tests take
    a fresh database each with ``postgres.create_database()``."""
    from scaleset.testing.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


def flood(c: Client, rounds: int) -> None:
    """Changes of scale set "web" whose events carry large plans (999 instances each; above 1,000 only
    counts) to overflow what gRPC's flow control lets a watcher hold unread."""
    for _ in range(rounds):
        c.set_capacity("web", 999)
        c.set_capacity("web", 0)


def flood_until_a_watch_is_taken(changes: Client, watches: Client) -> None:
    """Floods (through ``changes``) until a watcher that stopped reading is let go: ``watches``, whose only
    watch slot it held, is then given a new watch (from the first event). Fails after 30 rounds."""
    from scaleset.errors import CapacityError

    for _ in range(30):
        flood(changes, 25)
        time.sleep(0.6)
        watch = watches.watch()
        try:
            assert next(watch).sequence == 1
            return
        except CapacityError:
            continue
        finally:
            watch.close()
    pytest.fail("the watcher that stopped reading was never let go")


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "the condition") -> None:
    """Polls ``condition`` until it holds; fails after ``timeout`` seconds, naming ``what`` it waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
