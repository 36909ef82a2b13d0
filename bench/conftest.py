"""Benchmark support: every core benchmark has its baseline in the same run; the summary prints ratios.

Machines here are noisy, so absolute times mean little; the ratio core/baseline measured in one process
is what the README reports.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

#: group -> {"core" | "baseline": median seconds}
MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
#: service load results by workload (echo is the baseline)
LOAD: dict[str, Any] = {}
#: rebalance results: label -> (replacements, weighted violation left, median seconds, status)
REBALANCE: dict[str, tuple[int, int, float, str]] = {}


@pytest.fixture
def record(benchmark: Any) -> Any:
    """Call ``record(kind)`` after a benchmark ran, to file its median under its group."""

    def _record(kind: str) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None and benchmark.group:
            MEDIANS[benchmark.group][kind] = stats.stats.median

    return _record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REBALANCE:
        terminalreporter.section("scaleset: rebalance (moves, violation left, median time)")
        for label, (moves, violation, seconds, status) in sorted(REBALANCE.items()):
            left = "-" if violation < 0 else str(violation)
            terminalreporter.write_line(
                f"{label:<22} {moves:>7} moves   violation left {left:>6}   {seconds * 1000:>9.1f} ms   {status}"
            )
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
