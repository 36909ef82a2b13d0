"""Durable SetCapacity/s with 1, 2 and 3 servers of a cluster (`serve --cluster` on one PostgreSQL), against
the single server on SQLite in the same run: the same 192 scale sets, the same load (3 client processes,
each talking to one server, 4 calls in flight each); every server answers for every scale set and
forwards to the partition's owner. Each configuration's rate is gated as a share of a reference SQLite
server's, measured right before and after it (RESULTS).

Run: ``pytest bench/test_bench_cluster.py --benchmark-only -s``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from scaleset.postgres import ClusterDirectory
from scaleset.testing.postgres import PostgresServer
from scaleset.testing.server import free_port, start_server_process
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from bench.load import create_load_sets, load_server, run_load

PROCESSES, INFLIGHT = 3, 4
#: Gates, as shares of rates measured in the same run. One server of a cluster against the single SQLite
#: server: every call crosses a second gRPC hop (front to partition) and commits to PostgreSQL.
ONE_SERVER_FLOOR = 0.25
#: Two or three servers against one: on this 2-core machine they share the same two cores (and
#: PostgreSQL's), so more servers cannot add throughput here; the gate holds that sharing the scale sets
#: out costs no collapse (half the rate at most).
MORE_SERVERS_FLOOR = 0.5
#: Each configuration's rate as a share of a reference SQLite server's, measured right before and right
#: after it (half the configuration's calls each time): the machine's speed moves by 2x within a minute,
#: and the configurations run one after another (a fresh-ci run once measured 2 servers at 0.45x one,
#: with the machine at a fifth of its usual speed for part of the run).
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single SQLite server with the load's scale sets, idle but for the reference loads."""
    with load_server(tmp_path_factory.mktemp("reference"), PROCESSES) as (target, _):
        yield target


def start_cluster(
    url: str, size: int, tmp: Path, *flags: str
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``size`` servers on ``url``; returns once they own every partition, evenly."""
    ports = [free_port() for _ in range(size)]
    procs = [
        start_server_process(
            tmp / f"unused-{port}.db", port, tmp / f"server-{port}.log", "--store", url, "--cluster", *flags
        )
        for port in ports
    ]
    deadline = time.monotonic() + 60
    while True:
        found = ClusterDirectory.read(url)
        if found is not None:
            partitions, _, owners = found
            counts = [
                sum(1 for server, _, age in owners.values() if server == f"127.0.0.1:{p}" and age < 3)
                for p in ports
            ]
            if sum(counts) == partitions and max(counts) - min(counts) <= 1:
                return procs, [f"127.0.0.1:{p}" for p in ports]
        assert time.monotonic() < deadline, f"partitions not shared out: {found}"
        time.sleep(0.2)


@contextlib.contextmanager
def serving(
    servers: str, postgres: PostgresServer, tmp: Path, *flags: str
) -> Iterator[tuple[list[str], str]]:
    """``servers`` ("sqlite", or "cluster-<size>" on a fresh PostgreSQL database) with the load's small
    scale sets; yields their targets and the database URL ("" for SQLite), then stops them cleanly."""
    url = ""
    if servers == "sqlite":
        port = free_port()
        procs = [start_server_process(tmp / "state.db", port, tmp / "server.log", *flags)]
        targets = [f"127.0.0.1:{port}"]
    else:
        url = postgres.create_database()
        procs, targets = start_cluster(url, int(servers.split("-")[1]), tmp, *flags)
    try:
        create_load_sets(targets[0], PROCESSES)
        yield targets, url
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=120) == 0


@pytest.mark.parametrize("servers", ["sqlite", "cluster-1", "cluster-2", "cluster-3"])
def test_durable_set_capacity_by_servers(
    benchmark: Any, postgres: PostgresServer, tmp_path: Path, servers: str, reference: str
) -> None:
    benchmark.group = "durable_set_capacity_by_servers"
    n = 10 if benchmark.disabled else 200
    with serving(servers, postgres, tmp_path) as (targets, _):
        before = run_load(reference, "set_capacity", PROCESSES, INFLIGHT, n // 2)
        result = benchmark.pedantic(
            run_load, args=(targets, "set_capacity", PROCESSES, INFLIGHT, n), rounds=1, iterations=1
        )
        after = run_load(reference, "set_capacity", PROCESSES, INFLIGHT, n // 2)
        assert before.errors == after.errors == 0
        assert result.errors == 0 and result.requests == PROCESSES * INFLIGHT * n
        with grpc.insecure_channel(
            targets[-1]
        ) as channel:  # every acknowledged call is there, from any server
            stub = pb_grpc.ScaleSetsStub(channel)
            for p in range(PROCESSES):
                got = stub.GetScaleSet(pb.GetScaleSetRequest(name=f"load-{p}-0"))
                assert got.revision == n + 1
    benchmark.extra_info.update(
        {"requests_per_second": round(result.per_second), "p99_ms": round(result.p99_ms, 2)}
    )
    if benchmark.disabled:
        return
    machine = (before.per_second + after.per_second) / 2
    RESULTS[servers] = result.per_second / machine
    print(
        f"\n{servers}: {result.per_second:.0f} durable SetCapacity/s, p99 {result.p99_ms:.1f} ms "
        f"(the reference server {before.per_second:.0f}/s before, {after.per_second:.0f}/s after: "
        f"{RESULTS[servers]:.2f}x)"
    )
    if len(RESULTS) == 4:
        one = RESULTS["cluster-1"] / RESULTS["sqlite"]
        more = {k: RESULTS[k] / RESULTS["cluster-1"] for k in ("cluster-2", "cluster-3")}
        print(
            f"cluster-1/sqlite {one:.2f}x; "
            + ", ".join(f"{k}/cluster-1 {v:.2f}x" for k, v in more.items())
            + " (each against the reference server around it)"
        )
        assert one >= ONE_SERVER_FLOOR, (
            f"one cluster server at {one:.2f}x the SQLite server, below {ONE_SERVER_FLOOR}x"
        )
        for k, v in more.items():
            assert v >= MORE_SERVERS_FLOOR, f"{k} at {v:.2f}x one server, below {MORE_SERVERS_FLOOR}x"


#: Gates for durable SetCapacity on one 100,000-instance scale set, on the single SQLite server and on
#: clusters of 1, 2 and 3: the rate as a share of the rate on small scale sets in the same server(s) and
#: run (all calls on the big set queue on one scale set, so on one partition), and the database growth
#: per acknowledged call (issue 12's target of 2 KB): writes carry the change, not the set.
BIG_SET_FLOOR = 0.3
BIG_BYTES_PER_CALL = 2048
BIG_RESULTS: dict[str, float] = {}


def database_bytes(servers: str, tmp: Path, url: str) -> int:
    if servers == "sqlite":
        return sum(f.stat().st_size for f in tmp.glob("state.db*"))
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("servers", ["sqlite", "cluster-1", "cluster-2", "cluster-3"])
def test_durable_set_capacity_on_a_100k_scale_set_by_servers(
    benchmark: Any, postgres: PostgresServer, tmp_path: Path, servers: str
) -> None:
    benchmark.group = "durable_set_capacity_big_set_by_servers"
    n = 10 if benchmark.disabled else 100
    with serving(servers, postgres, tmp_path, "--instance-limit", "200000") as (targets, url):
        with grpc.insecure_channel(targets[0]) as channel:
            spec = pb.ScaleSetSpec(name="big", zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5"))
            pb_grpc.ScaleSetsStub(channel).CreateScaleSet(
                pb.CreateScaleSetRequest(scale_set=spec, capacity=100_000, view=pb.PLAN_VIEW_SUMMARY),
                timeout=120,
            )
        small = run_load(targets, "set_capacity", PROCESSES, INFLIGHT, n)
        # Warm-up past the first snapshot of the big set (taken once 1 MiB of log follows its creation);
        # later ones replace it in place (half its size of log apart), so growth is measured after it.
        run_load(targets, "set_capacity_big", PROCESSES, INFLIGHT, 3 * n)
        before = database_bytes(servers, tmp_path, url)
        big = benchmark.pedantic(
            run_load, args=(targets, "set_capacity_big", PROCESSES, INFLIGHT, n), rounds=1, iterations=1
        )
        grown = (database_bytes(servers, tmp_path, url) - before) / big.requests
        assert small.errors == big.errors == 0 and big.requests == PROCESSES * INFLIGHT * n
        with grpc.insecure_channel(targets[-1]) as channel:  # acknowledged, from any server
            got = pb_grpc.ScaleSetsStub(channel).GetScaleSet(pb.GetScaleSetRequest(name="big"))
            assert got.revision == 1 + 4 * PROCESSES * INFLIGHT * n and got.capacity in (100_000, 100_001)
    if benchmark.disabled:
        return
    share = big.per_second / small.per_second
    BIG_RESULTS[servers] = big.per_second
    print(
        f"\n100,000-instance set, {servers}: {big.per_second:.0f}/s p99 {big.p99_ms:.1f} ms against "
        f"{small.per_second:.0f}/s p99 {small.p99_ms:.1f} ms on small sets ({share:.2f}x); "
        f"database +{grown:.0f} B per call"
    )
    if len(BIG_RESULTS) == 4:
        print(
            ", ".join(
                f"{k}/sqlite {v / BIG_RESULTS['sqlite']:.2f}x"
                for k, v in BIG_RESULTS.items()
                if k != "sqlite"
            )
        )
    assert share >= BIG_SET_FLOOR, f"{share:.2f}x the small-set rate, below {BIG_SET_FLOOR}x"
    assert grown <= BIG_BYTES_PER_CALL, (
        f"the database grew {grown:.0f} B per call, above {BIG_BYTES_PER_CALL}"
    )
