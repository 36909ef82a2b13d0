"""Benchmark support: every core benchmark has its baseline in the same run; the summary prints ratios.

Machines here are noisy, so absolute times mean little; the ratio core/baseline measured in one process
is what the README reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from scaleset.testing.postgres import PostgresServer

#: group -> {"core" | "baseline": median seconds}
MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
#: service load results by workload (echo is the baseline)
LOAD: dict[str, Any] = {}
#: executor results, as lines for the summary
EXECUTORS: dict[str, str] = {}
#: rebalance results: label -> (replacements, weighted violation left, median seconds, status)
REBALANCE: dict[str, tuple[int, int, float, str]] = {}
#: (decision, instances) -> median seconds of one decision: the scaling curve.
CURVE: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for every benchmark that needs one (each takes a fresh database)."""
    with PostgresServer() as server:
        yield server


#: The gates: the least speed-up (baseline median / core median, same run) each group must show. About
#: half of each target or of the speed-up measured when the benchmark was written, so noise on these
#: 2-core machines cannot cross them but a real regression (a lost fast path, an O(N) rescan) does.
FLOORS: dict[str, float] = {
    "scale_out_0_to_1000": 40.0,  # measured 89-109x
    "scale_out_0_to_100000": 25.0,  # measured 47-59x
    "scale_in_one_decision_1k": 30.0,  # measured 70x
    # Issue 12 aims at 150x; measured 168-192x in six runs (the core and the baseline interleaved).
    "scale_in_1k_to_0_one_at_a_time": 75.0,
    # One decision at 100,000 instances within 3x of one at 1,000 (issue 12's target; measured 1.3x
    # for a scale-in, 1.0x for a scale-out: both read the engine's kept groups).
    "scale_in_one_decision_100k_vs_1k": 1 / 3,
    "scale_out_one_decision_100k_vs_1k": 1 / 3,
    # 100,000 -> 0 one call at a time against 1,000 -> 0 a hundred times: the same number of calls, so
    # the per-call cost at 100,000 stays within 3x of that at 1,000 (measured 1.4x, one round each; a
    # pass over every instance per call would be ~50x).
    "scale_in_to_0_per_call_100k_vs_1k": 1 / 3,
    "upgrade_batches_1000": 40.0,  # measured 91-105x
    "upgrade_batches_100000": 40.0,  # measured 83-98x
    "rebalance_1000": 50.0,  # per-VM model against the pool model, measured 515x
    "autoscale_1000_sets_1h": 10.0,  # target 20x
    # The Python client's columnar listing against the raw generated stub (ratio stub/client): the
    # client may cost at most 1.5x the stub (issue 11's target).
    "client_listing_1000": 1 / 1.5,
    # The whole executor scale-out through the Controller (ledger, outcomes, re-placements) against 1,000
    # single-instance health reports: at most 25x (measured 7.7-9.2x: 17-26 us against 1.9-3.3 us per
    # instance); an O(N) step per report would cost hundreds of times more.
    "executor_scale_out_1000": 1 / 25,
    # What a snapshot exports under the lock with 10,000 autoscaled scale sets (the document and one
    # changed scale set's part) against the whole policy state the document held before (measured ~150x).
    "snapshot_10000_autoscaled_sets": 20.0,
    # The server's CPU a durable SetCapacity with 1,000 watchers of every scale set against with none, at
    # 500 calls a second (ratio quiet/loaded): at most 2.1x (measured 1.11-1.52x in sixteen runs; with each
    # event encoded once per watcher instead of once for all, 3.0x).
    "watch_fanout_1000": 1 / 2.1,
    # The same through a watch proxy (scaleset watch-proxy), which the server serves one stream: at most
    # 1.3x (measured 0.79-1.07x in ten runs, 1.05-1.11x in six more on a later host).
    "watch_proxy_1000": 1 / 1.3,
    # The same with each of the 1,000 watching one scale set from its current revision, which the proxy
    # serves from its log (measured 0.97-1.03x in two runs, 0.98-1.20x in six more on that host).
    "watch_proxy_per_set_1000": 1 / 1.3,
}


@pytest.fixture
def record(benchmark: Any) -> Any:
    """Call ``record(kind)`` after a benchmark ran, to file its median under its group. Once a group has
    both its core and its baseline, its speed-up is held to :data:`FLOORS`."""

    def _record(kind: str, median: float | None = None) -> None:
        """``median``: a side the benchmark timed itself (a baseline run between its rounds)."""
        stats = getattr(benchmark, "stats", None)
        if stats is None or not benchmark.group:
            return
        group = benchmark.group
        MEDIANS[group][kind] = stats.stats.median if median is None else median
        medians = MEDIANS[group]
        if group in FLOORS and {"core", "baseline"} <= set(medians):
            speedup = medians["baseline"] / medians["core"]
            assert speedup >= FLOORS[group], f"{group}: {speedup:.1f}x, below the gate of {FLOORS[group]}x"

    return _record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if CURVE:
        terminalreporter.section("scaleset: one decision by scale set size (median)")
        sizes = sorted({n for _, n in CURVE})
        terminalreporter.write_line(f"{'':<10}" + "".join(f"{n:>12,}" for n in sizes))
        for kind in sorted({k for k, _ in CURVE}):
            cells = "".join(
                f"{CURVE[kind, n] * 1e6:>10.1f}us" if (kind, n) in CURVE else f"{'-':>12}" for n in sizes
            )
            terminalreporter.write_line(f"{kind:<10}{cells}")
    if REBALANCE:
        terminalreporter.section("scaleset: rebalance (moves, violation left, median time)")
        for label, (moves, violation, seconds, status) in sorted(REBALANCE.items()):
            left = "-" if violation < 0 else str(violation)
            terminalreporter.write_line(
                f"{label:<22} {moves:>7} moves   violation left {left:>6}   {seconds * 1000:>9.1f} ms   {status}"
            )
    if EXECUTORS:
        terminalreporter.section(
            "scaleset: executors (1,000-instance scale-out, fake cloud, 5% injected failures)"
        )
        for label, line in EXECUTORS.items():
            terminalreporter.write_line(f"{label:<28} {line}")
    if LOAD:
        terminalreporter.section("scaleset: service load (8 in flight, 2 client processes)")
        echo = LOAD.get("echo")
        for workload, r in LOAD.items():
            ratio = f"   {r.per_second / echo.per_second:>5.2f}x echo" if echo else ""
            terminalreporter.write_line(
                f"{workload:<16} {r.per_second:>8.0f} req/s   p50 {r.p50_ms:>6.2f} ms   p99 {r.p99_ms:>6.2f} ms{ratio}"
            )
    rows = [(g, m) for g, m in sorted(MEDIANS.items()) if "core" in m]
    if not rows:
        return
    terminalreporter.section("scaleset: core vs baseline (medians, same process)")
    for group, m in rows:
        core = m["core"]
        line = f"{group:<34} core {core * 1e6:>12.1f} us"
        if "baseline" in m:
            line += f"   baseline {m['baseline'] * 1e6:>14.1f} us   speed-up {m['baseline'] / core:>8.1f}x"
        terminalreporter.write_line(line)
