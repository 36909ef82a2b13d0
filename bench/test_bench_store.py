"""Durable SetCapacity through `scaleset serve` on each store: the embedded SQLite file (the baseline) and
PostgreSQL (Debian's, started for the run in a temporary directory), same load, same run.

Run: ``pytest bench/test_bench_store.py --benchmark-only -s``.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from scaleset.testing.postgres import PostgresServer
from scaleset.testing.server import free_port, start_server_process
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

from bench.load import create_load_sets, run_load

PROCESSES, INFLIGHT = 2, 4
#: Gate: PostgreSQL's durable throughput as a share of SQLite's in the same run (measured 0.84x: each
#: group commit is a round trip to another process, and PostgreSQL fsyncs its WAL as SQLite does).
FLOOR = 0.4
RESULTS: dict[str, float] = {}


def serve(store: str, postgres: PostgresServer | None, tmp: Path, *flags: str) -> tuple[Any, str]:
    """A server on ``store`` with the load's 128 small scale sets; returns its process and target."""
    port = free_port()
    extra = ("--store", postgres.create_database()) if store == "postgresql" and postgres else ()
    proc = start_server_process(tmp / "state.db", port, tmp / "server.log", *extra, *flags)
    target = f"127.0.0.1:{port}"
    create_load_sets(target, PROCESSES)
    return proc, target


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_durable_set_capacity(benchmark: Any, postgres: PostgresServer, tmp_path: Path, store: str) -> None:
    benchmark.group = "durable_set_capacity_by_store"
    n = 10 if benchmark.disabled else 300
    proc, target = serve(store, postgres, tmp_path)
    try:
        result = benchmark.pedantic(
            run_load, args=(target, "set_capacity", PROCESSES, INFLIGHT, n), rounds=1, iterations=1
        )
        assert result.errors == 0 and result.requests == PROCESSES * INFLIGHT * n
        with grpc.insecure_channel(target) as channel:  # every acknowledged call is there
            got = pb_grpc.ScaleSetsStub(channel).GetScaleSet(pb.GetScaleSetRequest(name="load-0-0"))
            assert got.revision == n + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    benchmark.extra_info.update(
        {"requests_per_second": round(result.per_second), "p99_ms": round(result.p99_ms, 2)}
    )
    if not benchmark.disabled:
        RESULTS[store] = result.per_second
        print(f"\n{store}: {result.per_second:.0f} durable SetCapacity/s, p99 {result.p99_ms:.1f} ms")
        if len(RESULTS) == 2:
            share = RESULTS["postgresql"] / RESULTS["sqlite"]
            print(f"postgresql/sqlite: {share:.2f}x")
            assert share >= FLOOR, f"PostgreSQL at {share:.2f}x SQLite, below the gate of {FLOOR}x"


#: Gate: durable SetCapacity on small sets while the server also holds 4 sets of 100,000 instances, and
#: on one of those sets itself, as a share of the small-set rate before they were created, same server
#: and run (issue 12's target 0.8x with p99 under 20 ms; measured 1.0-1.1x beside them and 0.99-1.2x on
#: one, p99 6-8 ms: snapshots are taken by bytes of log and write only the sets that changed, and a
#: decision reads the kept groups; beside 8 such sets with whole-state snapshots every 1,000 changes it
#: was 0.19x).
BIG_STATE_FLOOR = 0.5


def test_durable_set_capacity_beside_big_scale_sets(benchmark: Any, tmp_path: Path) -> None:
    benchmark.group = "durable_set_capacity_big_state"
    n = 20 if benchmark.disabled else 300
    db = tmp_path / "state.db"
    proc, target = serve("sqlite", None, tmp_path, "--instance-limit", "200000")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScaleSetsStub(channel)
            spec = pb.ScaleSetSpec(zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5"))
            small = run_load(target, "set_capacity", PROCESSES, INFLIGHT, n)
            for i in range(4):
                spec.name = "big" if i == 0 else f"big-{i}"
                request = pb.CreateScaleSetRequest(
                    scale_set=spec, capacity=100_000, view=pb.PLAN_VIEW_SUMMARY
                )
                stub.CreateScaleSet(request, timeout=120)
        run_load(
            target, "set_capacity", PROCESSES, INFLIGHT, 4 * n
        )  # past the first snapshot of the big state
        size = db.stat().st_size + db.with_name(db.name + "-wal").stat().st_size
        big = benchmark.pedantic(
            run_load, args=(target, "set_capacity", PROCESSES, INFLIGHT, n), rounds=1, iterations=1
        )
        grown = db.stat().st_size + db.with_name(db.name + "-wal").stat().st_size - size
        # And on one of the big sets itself: 100,000 <-> 100,001, one decision each.
        on_big = run_load(target, "set_capacity_big", PROCESSES, INFLIGHT, n)
        assert small.errors == big.errors == on_big.errors == 0 and big.requests == PROCESSES * INFLIGHT * n
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    if not benchmark.disabled:
        share = big.per_second / small.per_second
        print(
            f"\nbeside 4 x 100,000 instances: {big.per_second:.0f}/s p99 {big.p99_ms:.1f} ms against "
            f"{small.per_second:.0f}/s p99 {small.p99_ms:.1f} ms ({share:.2f}x); "
            f"database +{grown / big.requests:.0f} B per call"
        )
        assert share >= BIG_STATE_FLOOR, (
            f"{share:.2f}x the small-state rate, below the gate of {BIG_STATE_FLOOR}x"
        )
        on_share = on_big.per_second / small.per_second
        print(
            f"on a 100,000-instance set: {on_big.per_second:.0f}/s p99 {on_big.p99_ms:.1f} ms ({on_share:.2f}x)"
        )
        assert on_share >= BIG_STATE_FLOOR, (
            f"{on_share:.2f}x the small-set rate on a big set, below the gate of {BIG_STATE_FLOOR}x"
        )


#: Gates: a restart to SERVING, as a multiple of an empty server's start in the same run (process start
#: and imports included in both; the empty start measures 0.28-0.34 s). Issue 12's targets: under 3 s
#: with a 1,000,000-instance snapshot (measured 0.8-1.0 s with per-scale-set binary parts, 2.3-3.5x;
#: the whole-state JSON snapshot before cost about 1.4 s more), and under 2 s replaying 100,000 logged
#: single-instance changes (measured 1.4-1.8 s, 4.3-6x: about 1.2-1.5 s of replay, 12-15 us per logged
#: change, most of it Python's decoding and the command's facade around the core's 3 us decision; a
#: pass over every instance per change, as before the kept groups, took 16 s).
RESTART_CEILING = 6.0
REPLAY_CEILING = 12.0
FLAGS = ("--instance-limit", "1000000")


def create_and_stop(db: Path, log: Path, capacity: int) -> None:
    """A server on ``db`` that creates one scale set of ``capacity`` and stops cleanly (which snapshots)."""
    port = free_port()
    proc = start_server_process(db, port, log, *FLAGS)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        spec = pb.ScaleSetSpec(name="huge", zones=["1", "2", "3"], sku=pb.Sku(name="Standard_D2s_v5"))
        request = pb.CreateScaleSetRequest(scale_set=spec, capacity=capacity, view=pb.PLAN_VIEW_SUMMARY)
        pb_grpc.ScaleSetsStub(channel).CreateScaleSet(request, timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


def timed_restart(benchmark: Any, db: Path, log: Path, capacity: int, revision: int) -> tuple[float, float]:
    """Seconds to SERVING for a restart on ``db`` (checked: scale set "huge" at ``capacity`` and
    ``revision``) and for an empty server, in the same run."""
    import time

    tmp = db.parent
    started = time.perf_counter()
    empty = start_server_process(tmp / "empty.db", free_port(), tmp / "empty.log")
    empty_s = time.perf_counter() - started
    empty.send_signal(signal.SIGTERM)
    assert empty.wait(timeout=60) == 0

    port = free_port()
    started = time.perf_counter()
    proc = benchmark.pedantic(lambda: start_server_process(db, port, log, *FLAGS), rounds=1, iterations=1)
    restart_s = time.perf_counter() - started
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            got = pb_grpc.ScaleSetsStub(channel).GetScaleSet(pb.GetScaleSetRequest(name="huge"))
            assert (got.capacity, got.revision) == (capacity, revision)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    return restart_s, empty_s


def test_restart_with_a_million_instance_snapshot(benchmark: Any, tmp_path: Path) -> None:
    benchmark.group = "restart"
    capacity = 10_000 if benchmark.disabled else 1_000_000
    create_and_stop(tmp_path / "big.db", tmp_path / "big.log", capacity)
    restart_s, empty_s = timed_restart(benchmark, tmp_path / "big.db", tmp_path / "big.log", capacity, 1)
    if not benchmark.disabled:
        ratio = restart_s / empty_s
        print(
            f"\nrestart with {capacity:,} instances: {restart_s:.2f} s to SERVING, empty {empty_s:.2f} s ({ratio:.1f}x)"
        )
        assert ratio <= RESTART_CEILING, f"{ratio:.1f}x an empty start, above {RESTART_CEILING}x"


def test_restart_replaying_100k_logged_single_instance_changes(benchmark: Any, tmp_path: Path) -> None:
    from scaleset.commands import SetCapacity
    from scaleset.store import EventRecord, SQLiteStore

    benchmark.group = "restart"
    capacity = 1_000 if benchmark.disabled else 100_000
    db, log = tmp_path / "log.db", tmp_path / "log.log"
    create_and_stop(db, log, capacity)
    # The log a server writes for `capacity` one-instance scale-ins after its snapshot, written straight
    # to the store (the same records; a server would take a minute to write them durably one by one).
    store = SQLiteStore(str(db))
    snapshot, tail = store.load()
    assert snapshot is not None and not tail
    sequence, start_ms = snapshot.sequence, 1_800_000_000_000
    for first in range(0, capacity, 10_000):
        store.append(
            [
                EventRecord.of(
                    sequence + k + 1,
                    "huge",
                    k + 2,
                    SetCapacity.event_type,
                    SetCapacity("huge", capacity - k - 1).encode(),
                    {"text": "one fewer"},
                    start_ms + k,
                )
                for k in range(first, min(first + 10_000, capacity))
            ],
            [],
        )
    store.close()
    restart_s, empty_s = timed_restart(benchmark, db, log, 0, capacity + 1)
    if not benchmark.disabled:
        ratio = restart_s / empty_s
        print(
            f"\nrestart replaying {capacity:,} logged scale-ins: {restart_s:.2f} s to SERVING, "
            f"empty {empty_s:.2f} s ({ratio:.1f}x)"
        )
        assert ratio <= REPLAY_CEILING, f"{ratio:.1f}x an empty start, above {REPLAY_CEILING}x"


# ----- a snapshot's cost under the lock with 10,000 autoscaled scale sets ------------------------------


@pytest.fixture(scope="module")
def autoscaled() -> Any:
    """A controller with 10,000 scale sets of 2 instances, each with an autoscale setting of two rules."""
    from scaleset import (
        AutoscaleCapacity,
        AutoscaleProfile,
        AutoscaleSetting,
        Controller,
        MetricTrigger,
        Region,
        ScaleAction,
        ScaleRule,
        ScaleSetSpec,
        Sku,
    )

    rules = (
        ScaleRule(MetricTrigger("cpu", "GreaterThan", 70), ScaleAction("Increase")),
        ScaleRule(MetricTrigger("cpu", "LessThan", 30), ScaleAction("Decrease")),
    )
    setting = AutoscaleSetting((AutoscaleProfile("default", AutoscaleCapacity(2, 50, 2), rules),))
    controller = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    for i in range(AUTOSCALED):
        controller.create_scale_set(
            ScaleSetSpec(f"s{i}", zones=["1", "2", "3"], sku=Sku("Standard_D2s_v5")), 2
        )
        controller.set_autoscale_setting(f"s{i}", setting)
    return controller


AUTOSCALED = 10_000


def test_snapshot_under_the_lock_with_10k_autoscaled_sets(
    benchmark: Any, record: Any, autoscaled: Any
) -> None:
    benchmark.group = "snapshot_10000_autoscaled_sets"

    def export() -> tuple[dict[str, Any], dict[str, Any]]:
        return autoscaled.export_state(scale_sets=False), autoscaled.export_scale_set("s7")

    document, part = benchmark(export)
    record("core")
    assert document["policies"]["autoscale"] == {} and "autoscale" in part["policies"]


def test_snapshot_whole_policy_state_with_10k_autoscaled_sets(
    benchmark: Any, record: Any, autoscaled: Any
) -> None:
    benchmark.group = "snapshot_10000_autoscaled_sets"
    policies = benchmark.pedantic(autoscaled.policies.export, rounds=3)
    record("baseline")
    assert len(policies["autoscale"]) == AUTOSCALED
