"""Watch fan-out: what 1,000 watch streams of every scale set add to the server's cost of a durable
SetCapacity, against the same load with no watcher, in the same run.

The load is the soak's open loop (bench/soak.py) at 500 calls a second; the cost is the server process's
CPU time (every thread, from /proc) per call. Every change goes to every watcher, but each event is
encoded once and a watcher's message is a slice of the encoded run (service.EncodedEvents), sent at most
WATCH_MESSAGES_PER_SECOND times a second across the watchers. The gate holds the CPU a call with the
watchers to at most 2.1 times that without: measured 1.18-1.52x (0.9-1.1 ms a call quiet, 1.2-1.4 ms with
the watchers); with each event encoded once per watcher instead (tried, to check the gate), 3.0x.
Every watcher must end on the last change.

Run: ``pytest bench/test_bench_watch.py --benchmark-only -s``. The server runs as ``scaleset serve`` in its
own process, its SQLite file in a temporary directory; the watchers run in a process of their own.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scaleset.testing.server import free_port, start_server_process

from bench.load import LoadResult, cpu_seconds, create_load_sets, run_load, watch_every_set

PROCESSES, INFLIGHT, RATE, WINDOW_S = 2, 64, 500, 10
LOAD_SETS = 64  # per client process (create_load_sets)
WATCHERS = 1000
GROUP = "watch_fanout_1000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("watch")
    port = free_port()
    proc = start_server_process(
        tmp / "state.db", port, tmp / "server.log", "--max-watchers", str(WATCHERS + 10)
    )
    target = f"127.0.0.1:{port}"
    create_load_sets(target, PROCESSES, LOAD_SETS)
    yield target, proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def cpu_per_call(target: str, pid: int, windows: int) -> tuple[float, list[LoadResult]]:
    """``windows`` windows of the open-loop load: the server's CPU seconds a call, and each window."""
    calls = max(1, round(RATE / PROCESSES * WINDOW_S / INFLIGHT))
    cpu = cpu_seconds(pid)
    runs = [run_load(target, "set_capacity", PROCESSES, INFLIGHT, calls, rate=RATE) for _ in range(windows)]
    for r in runs:
        assert r.errors == 0
    return (cpu_seconds(pid) - cpu) / sum(r.requests for r in runs), runs


def test_watch_fanout(benchmark: Any, record: Any, server: tuple[str, int]) -> None:
    target, pid = server
    benchmark.group = GROUP
    windows = 1 if benchmark.disabled else 2
    _, warm_up = cpu_per_call(target, pid, 1)  # the scale sets' first changes, the server's caches
    quiet, quiet_runs = cpu_per_call(target, pid, windows)

    ctx = multiprocessing.get_context("spawn")
    asks, answers = ctx.Queue(), ctx.Queue()
    watchers = ctx.Process(target=watch_every_set, args=(target, WATCHERS, asks, answers), daemon=True)
    watchers.start()
    try:
        time.sleep(5)  # every stream open and caught up with the history
        loaded, loaded_runs = benchmark.pedantic(
            cpu_per_call, args=(target, pid, windows), rounds=1, iterations=1
        )
        # The load has stopped: within a few turns of WATCH_MESSAGES_PER_SECOND every stream has the last
        # change (each call made an event, and each scale set's creation one before them).
        calls = sum(r.requests for r in warm_up + quiet_runs + loaded_runs) + PROCESSES * LOAD_SETS
        lasts: list[int] = []
        for _ in range(30):
            asks.put("last")
            lasts = answers.get(timeout=30)
            if min(lasts) == max(lasts) >= calls:
                break
            time.sleep(1)
        assert min(lasts) == max(lasts) >= calls, (
            f"watchers behind or ended: last sequences {min(lasts)}..{max(lasts)}, at least {calls} changes"
        )
    finally:
        asks.put(None)
        watchers.join(timeout=30)
        if watchers.is_alive():
            watchers.kill()

    p99 = max(r.p99_ms for r in loaded_runs) / max(r.p99_ms for r in quiet_runs)
    benchmark.extra_info.update(
        {
            "server_cpu_us_per_call_quiet": round(quiet * 1e6),
            "server_cpu_us_per_call_watched": round(loaded * 1e6),
            "worst_window_p99_ratio": round(p99, 2),
        }
    )
    # The summary's "speed-up" is quiet / loaded: held to at least 1 / 2.1 (conftest.FLOORS).
    record("core", loaded)
    record("baseline", quiet)
