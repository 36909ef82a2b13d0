"""Watch fan-out: what 1,000 watch streams of every scale set add to the server's cost of a durable
SetCapacity, against the same load with no watcher, in the same run: served by the server itself, and
through a watch proxy (`scaleset watch-proxy`), which the server serves one stream.

The load is the soak's open loop (bench/soak.py) at 500 calls a second; the cost is the server process's CPU
time (every thread, from /proc) per call. Every change goes to every watcher, but each event is encoded once
and a watcher's message is a slice of the encoded run (service.EncodedEvents), sent at most
WATCH_MESSAGES_PER_SECOND times a second across the watchers. The gate holds the CPU a call with the watchers
to at most 2.1 times that without: measured 1.11-1.52x in sixteen runs, once 1.85x with the machine at its
slowest (README, Benchmarks); with each event encoded once per watcher instead (tried, to check the gate),
3.0x. Through the proxy the gate holds the server's CPU a call to at most 1.3 times that without: measured
0.79-1.07x in ten runs, 1.05-1.11x in six more on a later host (the proxy's own CPU a call, 0.47 ms, is
recorded, ungated). The third case is 1,000 agents each watching one scale set (seven or eight to each of the
128) from its current revision through the proxy, which serves them from its log: the same gate, measured
1.03x and 0.97x, 0.98-1.20x in six more on that host, and the proxy must have passed none of them through to
the server. Each measures once every stream is open and has caught up with the history, and every stream must
end on the last change (of its scale set).

Run: ``pytest bench/test_bench_watch.py --benchmark-only -s``. The server runs as ``scaleset serve`` in its
own process, its SQLite file in a temporary directory; the watchers run in a process of their own, and
the proxy in another.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scaleset.client import Client

from bench.load import (
    LoadResult,
    WatchProxyProcess,
    cpu_seconds,
    load_server,
    metric,
    run_load,
    run_watchers,
    start_proxy,
)

PROCESSES, INFLIGHT, RATE, WINDOW_S = 2, 64, 500, 10
LOAD_SETS = 64  # per client process (create_load_sets)
WATCHERS = 1000
#: Who serves the watchers: the server, or a proxy; "proxy_per_set": each watcher watches one scale set
#: (1,000 over the LOAD_SETS * PROCESSES scale sets) from its current revision, which the proxy serves from
#: its log.
GROUPS = {
    "server": "watch_fanout_1000",
    "proxy": "watch_proxy_1000",
    "proxy_per_set": "watch_proxy_per_set_1000",
}


@dataclass
class Server:
    target: str
    pid: int
    #: Changes made so far, each an event (every stream of every scale set must end on the last).
    changes: int

    def revisions(self) -> dict[str, int]:
        """Each scale set's revision (every stream of one scale set must end on it)."""
        with Client(self.target) as client:
            return {s.spec.name: s.revision for s in client.list_scale_sets(1000)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with load_server(
        tmp_path_factory.mktemp("watch"), PROCESSES, LOAD_SETS, "--max-watchers", str(WATCHERS + 10)
    ) as (target, pid):
        yield Server(target, pid, PROCESSES * LOAD_SETS)


def cpu_per_call(server: Server, windows: int) -> tuple[float, list[LoadResult]]:
    """``windows`` windows of the open-loop load: the server's CPU seconds a call, and each window."""
    calls = max(1, round(RATE / PROCESSES * WINDOW_S / INFLIGHT))
    cpu = cpu_seconds(server.pid)
    runs = [
        run_load(server.target, "set_capacity", PROCESSES, INFLIGHT, calls, rate=RATE) for _ in range(windows)
    ]
    for r in runs:
        assert r.errors == 0
    made = sum(r.requests for r in runs)
    server.changes += made
    return (cpu_seconds(server.pid) - cpu) / made, runs


def caught_up(asks: Any, answers: Any, wanted: list[int], timeout: float) -> bool:
    """Whether every watcher's stream reaches where ``wanted`` says (the last event's sequence, or watching
    one scale set, its revision) within ``timeout`` seconds; says how many do not if not."""
    deadline = time.monotonic() + timeout
    while True:
        asks.put("last")
        lasts: list[int] = answers.get(timeout=30)[0]
        if lasts == wanted:
            return True
        if time.monotonic() > deadline:
            behind = [(last, want) for last, want in zip(lasts, wanted, strict=True) if last != want]
            print(
                f"{len(behind)} watchers behind or ended (where they are, where they should be): {behind[:5]}"
            )
            return False
        time.sleep(1)


@pytest.mark.parametrize("via", list(GROUPS))
def test_watch_fanout(benchmark: Any, record: Any, server: Server, via: str, tmp_path: Path) -> None:
    benchmark.group = GROUPS[via]
    windows = 1 if benchmark.disabled else 2
    cpu_per_call(server, 1)  # the scale sets' first changes, the server's caches
    quiet, quiet_runs = cpu_per_call(server, windows)

    sets = sorted(server.revisions().items()) if via == "proxy_per_set" else []
    proxy: WatchProxyProcess | None = None
    if via != "server":
        proxy = start_proxy(server.target, WATCHERS, tmp_path, metrics=True)
    ctx = multiprocessing.get_context("spawn")
    asks, answers = ctx.Queue(), ctx.Queue()
    watched = server.target if proxy is None else proxy.target

    def wanted() -> list[int]:
        """Where every stream must be once it has every change."""
        if not sets:
            return [server.changes] * WATCHERS
        revisions = server.revisions()
        return [revisions[sets[k % len(sets)][0]] for k in range(WATCHERS)]

    watchers = ctx.Process(
        target=run_watchers, args=(watched, WATCHERS, asks, answers), kwargs={"sets": sets}, daemon=True
    )
    watchers.start()
    try:
        # Every stream open and caught up (with the history, up to ~40,000 events each, watching every
        # scale set) before measuring.
        assert caught_up(asks, answers, wanted(), timeout=300)
        if proxy is not None:
            deadline = time.monotonic() + 60
            while metric(proxy.metrics_port, "scaleset_proxy_watchers") < WATCHERS:
                assert time.monotonic() < deadline, "the proxy does not serve every watcher's stream"
                time.sleep(0.5)
        proxy_cpu = 0.0 if proxy is None else cpu_seconds(proxy.pid)
        loaded, loaded_runs = benchmark.pedantic(cpu_per_call, args=(server, windows), rounds=1, iterations=1)
        if proxy is not None:
            proxied = (cpu_seconds(proxy.pid) - proxy_cpu) / sum(r.requests for r in loaded_runs)
            benchmark.extra_info["proxy_cpu_us_per_call"] = round(proxied * 1e6)
        # The load has stopped: within a few turns of WATCH_MESSAGES_PER_SECOND every stream has the last
        # change (each call made an event, and each scale set's creation one before them).
        assert caught_up(asks, answers, wanted(), timeout=30)
        if proxy is not None:
            # Every watch served from the proxy's log: the server served the proxy its one stream.
            assert metric(proxy.metrics_port, "scaleset_proxy_passed_through_total") == 0
    finally:
        asks.put(None)
        watchers.join(timeout=30)
        if watchers.is_alive():
            watchers.kill()
        if proxy is not None:
            proxy.stop()

    p99 = max(r.p99_ms for r in loaded_runs) / max(r.p99_ms for r in quiet_runs)
    benchmark.extra_info.update(
        {
            "server_cpu_us_per_call_quiet": round(quiet * 1e6),
            "server_cpu_us_per_call_watched": round(loaded * 1e6),
            "worst_window_p99_ratio": round(p99, 2),
        }
    )
    # The summary's "speed-up" is quiet / loaded: held to at least 1 / 2.1 served by the server, 1 / 1.3
    # through the proxy (conftest.FLOORS).
    record("core", loaded)
    record("baseline", quiet)
