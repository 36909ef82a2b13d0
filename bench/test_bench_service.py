"""Service load: durable SetCapacity and 1,000-instance ListInstances against a trivial Echo RPC on the same
server (the baseline), from several client processes with 8 calls in flight.

Run: ``pytest bench/test_bench_service.py --benchmark-only -s``. The server runs as ``scaleset serve`` in
its own process with its SQLite file in a temporary directory; every acknowledged SetCapacity is durable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from bench import conftest
from bench.conftest import LOAD, MEDIANS
from bench.load import load_server, run_load

PROCESSES = 2
INFLIGHT = 4  # per process: 8 in flight
#: Gates: the least throughput of each workload as a share of Echo's in the same run (about half of what
#: was measured: SetCapacity 0.56x, ListInstances 0.94-1.01x).
FLOORS = {"set_capacity": 0.25, "list_instances": 0.45}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with load_server(tmp_path_factory.mktemp("load"), PROCESSES, INFLIGHT) as (target, _):
        with grpc.insecure_channel(target) as channel:
            spec = pb.ScaleSetSpec(name="listing", zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5"))
            pb_grpc.ScaleSetsStub(channel).CreateScaleSet(
                pb.CreateScaleSetRequest(scale_set=spec, capacity=1000)
            )
        yield target


def calls(benchmark: Any, full: int) -> int:
    return 10 if benchmark.disabled else full


@pytest.mark.parametrize(
    ("workload", "full_calls"),
    [("echo", 1500), ("set_capacity", 400), ("list_instances", 400)],
)
def test_load(benchmark: Any, target: str, workload: str, full_calls: int) -> None:
    benchmark.group = "service_load"
    n = calls(benchmark, full_calls)
    result = benchmark.pedantic(
        run_load, args=(target, workload, PROCESSES, INFLIGHT, n), rounds=1, iterations=1
    )
    assert result.errors == 0
    assert result.requests == PROCESSES * INFLIGHT * n
    benchmark.extra_info.update(
        {
            "requests_per_second": round(result.per_second),
            "p50_ms": round(result.p50_ms, 2),
            "p99_ms": round(result.p99_ms, 2),
        }
    )
    if not benchmark.disabled:
        LOAD[workload] = result
        if workload in FLOORS and "echo" in LOAD:
            share = result.per_second / LOAD["echo"].per_second
            assert share >= FLOORS[workload], (
                f"{workload}: {share:.2f}x echo, below the gate of {FLOORS[workload]}x"
            )
    if workload == "set_capacity":
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScaleSetsStub(channel)
            for p in range(PROCESSES):
                for k in range(INFLIGHT):
                    got = stub.GetScaleSet(pb.GetScaleSetRequest(name=f"load-{p}-{k}"))
                    # Each slot alternated 10 and 11 and ended on its last call's value; every call was one revision.
                    assert got.capacity == 10 + (n - 1) % 2
                    assert got.revision >= n + 1


def test_client_listing(benchmark: Any, target: str) -> None:
    """A 1,000-instance listing through the Python client (columns, as Controller.instance_columns) against
    the raw generated stub decoding the same reply, one call at a time, in the same process. The two are
    timed in turns (300 of each, interleaved), so a busy moment of the machine or the server slows both
    alike and the gated ratio of medians stays what it is."""
    import statistics

    from scaleset.client import Client

    group = benchmark.group = "client_listing_1000"
    request = pb.ListInstancesRequest(name="listing", page_size=10_000)
    with (
        grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel,
        Client(target) as client,
    ):
        stub = pb_grpc.ScaleSetsStub(channel)
        stub_s: list[float] = []
        client_s: list[float] = []
        for _ in range(30 if benchmark.disabled else 300):
            started = time.perf_counter()
            reply = stub.ListInstances(request)
            stub_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            columns = client.instance_columns("listing")
            client_s.append(time.perf_counter() - started)
        assert len(reply.instances.instance_id) == 1000
        assert len(columns["instance_id"]) == 1000 and len(set(columns["zone"])) == 3
        assert list(columns["instance_id"]) == list(reply.instances.instance_id)
        columns = benchmark(client.instance_columns, "listing")  # pytest-benchmark's own table
    MEDIANS[group]["core"], MEDIANS[group]["baseline"] = (
        statistics.median(client_s),
        statistics.median(stub_s),
    )
    ratio = MEDIANS[group]["baseline"] / MEDIANS[group]["core"]
    floor = conftest.FLOORS[group]
    assert ratio >= floor, f"{group}: {ratio:.2f}x, below the gate of {floor:.2f}x"
