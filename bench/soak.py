"""Soak test (on demand, not in CI): sustained durable SetCapacity load against `scaleset serve` while many
watchers stream every change, some of which never read; prints the server's RSS, CPU (share of one core),
database size and longest garbage-collection pause over time, and the unloaded vs loaded p99: as the
clients see it, and as the server measured it (the bucket of its own latency histogram, from its metrics
endpoint, that holds the 99th percentile).

The load is an open loop at ``--rate`` calls a second (default 2x TARGET_RATE), each call timed from when
it was due, in windows of WINDOW_S; ``--rate 0`` runs it closed-loop instead (as fast as the server
answers 8 calls in flight: the saturation figures). Unloaded is the same load for QUIET_WINDOWS windows
before the watchers start and as many after they stop; the summary compares the p99 of every loaded
window after the warm-up with theirs, pooled, then the median of the windows' own p99s on each side (which
one hiccup of the machine's does not move), the same median of only the windows the hypervisor stole at
most CALM_STEAL% of a core from (each window prints its share; given QUIET_WINDOWS such windows on each
side), and the worst single window. The warm-up is the first window and any that starts before every
reading watcher has replayed the history (each stream watches from the start); a reading watcher's stream
that fails resumes after its last event, as a real watcher's would, and one refused opens again (the soak
counts both). Each window also shows the watch streams served: the never-reading ones are let go once
their flow control is full and --stream-send-timeout has passed. Once the load stops, the soak waits up
to CATCH_UP_S for every reading watcher to hold the server's newest event, and says how long that took
or how far behind the furthest one was (a watcher that fell behind or stopped receiving would show
there, not in the windows' p99s).

With ``--proxy`` the watchers watch through ``scaleset watch-proxy`` (a process of its own, started before
them and stopped after them), and each window also shows the proxy's CPU and RSS.

With ``--nice N`` the watcher processes (and with ``--proxy`` the proxy) run at nice N, every thread of
them: on this machine they share 2 cores with the server and the load generator, where a deployment
would run them on machines of their own (the watchers are other people's agents) or, for a proxy on the
server's host, at a lower priority than the server.

With ``--load rust`` the open loop is made by the Rust load generator (rust/scaleset-client's
scaleset-load, built optimised on first use): the same calls on the same schedule, timed the same way,
from one process that spends a fraction of the CPU of bench/load.py's two, which share the server's cores.

With ``--watch rust`` the watchers are the Rust ones (rust/scaleset-client's scaleset-watch, built the same
way): the same streams, read or held the same way, in two processes that spend a third of the CPU of
bench/load.py's watcher processes (each message is scanned for its first and last event, not decoded).

Run: ``python bench/soak.py --minutes 2 --watchers 1000 [--proxy] [--load rust] [--watch rust]``. It starts
its own server on a free loopback port with its database in a temporary directory, and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scaleset.client import Client
from scaleset.testing.server import free_port, start_server_process

from bench.load import (
    LoadResult,
    PythonWatchers,
    RustWatchers,
    WatchProxyProcess,
    build_rust_client,
    cpu_seconds,
    create_load_sets,
    metric,
    percentile_ms,
    run_load,
    run_rust_load,
    start_proxy,
)

PROCESSES, INFLIGHT = 2, 4
#: The durable change rate a server is sized for (docs/behaviour.md): 15,000 autoscaled scale sets, each
#: changing once a minute, make 250 a second.
TARGET_RATE = 250
#: Each measured window of the open-loop load, and the most calls waiting in one client process.
WINDOW_S, OPEN_INFLIGHT = 10, 64
#: Unloaded windows, pooled (a single window's p99 moves by 2x between runs on this machine).
QUIET_WINDOWS = 3
#: Unloaded p99 before and after the watchers further apart than this: the run does not measure them.
DRIFT = 2.0
#: Windows the hypervisor stole at most this much of a core from (%), compared on their own: on this
#: machine the windows it stole a fifth of a core or more from had a median p99 18 times that of those it
#: left alone (docs/soak.md, 2026-11-29).
CALM_STEAL = 6.0
#: Seconds the reading watchers have, once the load stops, to hold every event it made.
CATCH_UP_S = 30.0


def cpu_ticks() -> tuple[int, int, int]:
    """The machine's CPU time so far, in clock ticks of all its cores (/proc/stat): busy (its processes and
    its kernel), stolen (the hypervisor running another guest on a core this one was ready to use), and in
    all (guest time is counted in user time already)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(t) for t in fields)
    return (
        user + nice + system + irq + softirq,
        steal,
        user + nice + system + idle + iowait + irq + softirq + steal,
    )


def machine_busy(since: tuple[int, int, int]) -> tuple[float, float]:
    """How busy the machine's cores were since a reading of cpu_ticks, and how much of them was stolen, in %
    of one core."""
    now = cpu_ticks()
    cores = 100 * (os.cpu_count() or 1) / max(1, now[2] - since[2])
    return (now[0] - since[0]) * cores, (now[1] - since[1]) * cores


def renice(pid: int, niceness: int) -> None:
    """Every thread of process ``pid`` at ``niceness`` (Linux keeps a niceness per thread; threads started
    later take their starter's)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def latency_buckets(
    metrics_port: int, histogram: str = "scaleset_rpc_latency_seconds", label: str = 'method="SetCapacity"'
) -> dict[float, float]:
    """One of the server's histograms (by default its own SetCapacity latency): cumulative counts by upper
    bound (seconds) of the series with ``label``, read from its metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{histogram}_bucket{{") and label in line:
            bound = re.search(r'le="([^"]+)"', line)
            if bound:
                counts[float(bound.group(1))] = float(line.rsplit(" ", 1)[1])
    return counts


def gc_pauses(metrics_port: int) -> dict[str, dict[float, float]]:
    """The server's garbage-collection pauses by generation (its scaleset_gc_pause_seconds histogram)."""
    return {g: latency_buckets(metrics_port, "scaleset_gc_pause_seconds", f'generation="{g}"') for g in "012"}


def gc_summary(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> tuple[str, int]:
    """Between two readings of gc_pauses: the histogram bucket holding the longest pause ("<=5" ms) and
    the number of full collections."""
    longest = 0.0
    for g, counts in after.items():
        total = counts.get(float("inf"), 0) - before[g].get(float("inf"), 0)
        if total:
            longest = max(
                longest, next(b for b in sorted(counts) if counts[b] - before[g].get(b, 0) >= total)
            )
    full = after["2"].get(float("inf"), 0) - before["2"].get(float("inf"), 0)
    return (f"<={longest * 1000:g}" if longest else "-"), int(full)


def p99_bound_ms(before: dict[float, float], after: dict[float, float]) -> str:
    """The histogram bucket holding the 99th percentile of the calls between two readings ("<=20" ms)."""
    bounds = sorted(after)
    total = after[bounds[-1]] - before.get(bounds[-1], 0)
    for bound in bounds:
        if total and after[bound] - before.get(bound, 0) >= 0.99 * total:
            return f"<={bound * 1000:g}"
    return "-"


def pooled_p99(windows: list[LoadResult]) -> float:
    """The p99 of every call of several windows, in milliseconds."""
    return percentile_ms(sorted(t for r in windows for t in r.latencies), 0.99)


def db_mb(db: Path) -> float:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file()) / 1e6


def head_sequence(target: str) -> int:
    """The sequence of the server's last event: in the soak every event is a change of one of its scale
    sets, each of which counts its own in its revision."""
    with Client(target) as client:
        return sum(s.revision for s in client.list_scale_sets(1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2 * TARGET_RATE, help="calls a second; 0: closed loop")
    parser.add_argument(
        "--watch-messages-per-second",
        type=float,
        help="passed to the server and the proxy (default: theirs)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="the watchers watch through `scaleset watch-proxy` (its own process), not the server",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the watcher processes and the proxy (they stand in for other machines)",
    )
    parser.add_argument(
        "--load",
        choices=("python", "rust"),
        default="python",
        help="the load generator: bench/load.py's client processes, or the Rust one (open loop only)",
    )
    parser.add_argument(
        "--watch",
        choices=("python", "rust"),
        default="python",
        help="the watcher processes: bench/load.py's (asyncio gRPC), or the Rust ones (scaleset-watch)",
    )
    args = parser.parse_args()
    if args.load == "rust" and not args.rate:
        parser.error("--load rust makes the open loop only: give a --rate above 0")
    rust_load = build_rust_client("scaleset-load") if args.load == "rust" else None
    rust_watch = build_rust_client("scaleset-watch") if args.watch == "rust" else None

    def load(window: int) -> LoadResult:
        if rust_load is not None:
            return run_rust_load(rust_load, target, args.rate, WINDOW_S, PROCESSES, OPEN_INFLIGHT)
        if not args.rate:
            return run_load(target, "set_capacity", PROCESSES, INFLIGHT, window)
        calls = max(1, round(args.rate / PROCESSES * WINDOW_S / OPEN_INFLIGHT))
        return run_load(target, "set_capacity", PROCESSES, OPEN_INFLIGHT, calls, rate=args.rate)

    pacing = (
        ["--watch-messages-per-second", str(args.watch_messages_per_second)]
        if args.watch_messages_per_second
        else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        db, port, metrics_port = Path(tmp) / "soak.db", free_port(), free_port()
        proc = start_server_process(
            db,
            port,
            Path(tmp) / "server.log",
            "--metrics-port",
            str(metrics_port),
            "--max-watchers",
            str(args.watchers + 10),
            "--event-retention",
            "20000",
            "--request-retention",
            "20000",
            *pacing,
        )
        target = f"127.0.0.1:{port}"
        proxy: WatchProxyProcess | None = None
        try:
            create_load_sets(target, PROCESSES)
            seen = latency_buckets(metrics_port)

            # The p99 of every unloaded window, and every loaded one after the warm-up, that the hypervisor
            # stole at most CALM_STEAL% of a core from.
            calm: dict[str, list[float]] = {"unloaded": [], "loaded": []}

            def quiet() -> tuple[list[LoadResult], str]:
                """QUIET_WINDOWS windows with no watcher, and what they did (calls a second, p99 pooled and
                by window with the share of a core stolen in each, the server's own p99, its CPU and the
                machine's)."""
                nonlocal seen
                began, cpu, ticks = time.monotonic(), cpu_seconds(proc.pid), cpu_ticks()
                runs, stolen = [], []
                for _ in range(QUIET_WINDOWS):
                    window = cpu_ticks()
                    runs.append(load(100))
                    stolen.append(machine_busy(window)[1])
                calm["unloaded"] += [r.p99_ms for r, s in zip(runs, stolen, strict=True) if s <= CALM_STEAL]
                busy = (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - began) * 100
                server = p99_bound_ms(seen, seen := latency_buckets(metrics_port))
                return runs, (
                    f"{sum(r.requests for r in runs) / sum(r.seconds for r in runs):.0f}/s p99 "
                    f"{pooled_p99(runs):.1f} ms (windows {', '.join(f'{r.p99_ms:.1f}' for r in runs)} ms, "
                    f"stolen in them {', '.join(f'{s:.0f}' for s in stolen)}% of a core; in the server "
                    f"{server} ms, CPU {busy:.0f}% of a core; the machine's cores "
                    "{:.0f}% of one, {:.0f}% stolen)".format(*machine_busy(ticks))
                )

            # Unloaded: QUIET_WINDOWS windows of the same load before the watchers start, and as many after
            # they stop, pooled (the machine's speed drifts over minutes: the two sides bracket the loaded run).
            before, unloaded = quiet()
            # With --proxy the watchers watch through a watch proxy: the server serves it one stream.
            proxy = (
                start_proxy(target, args.watchers, Path(tmp), *pacing, metrics=True) if args.proxy else None
            )
            watched = target if proxy is None else proxy.target
            if proxy is not None:
                renice(proxy.pid, args.nice)
            # The watchers run in two processes of their own, one reading, one not; the reading one's
            # streams resume after a failure, as real watchers do.
            head = head_sequence(target)
            procs = [
                PythonWatchers(watched, args.watchers // 2, reads=reads, resume=reads)
                if rust_watch is None
                else RustWatchers(rust_watch, watched, args.watchers // 2, reads=reads, resume=reads)
                for reads in (True, False)
            ]
            for w in procs:
                renice(w.pid, args.nice)

            def reading() -> tuple[int, int]:
                """The reading watchers: the first event of the last message every stream has (each has every
                event before it), and how often one opened again."""
                return procs[0].least("first")

            time.sleep(2)
            mode = (
                (f"open loop at {args.rate:.0f}/s" if args.rate else "closed loop")
                + (" (the Rust load generator)" if rust_load else "")
                + (" with the Rust watchers" if rust_watch else "")
            )
            print(
                f"{mode}; unloaded before: {unloaded}; {args.watchers} watchers, half never read"
                + (f", at nice {args.nice}" if args.nice else "")
            )
            print(
                f"{'minute':>7} {'req/s':>8} {'p99 ms':>8} {'server':>8} {'CPU %':>6} {'errors':>7} {'RSS MB':>8} "
                f"{'DB MB':>8} {'watchers':>8} {'GC ms':>6} {'full':>4} {'machine %':>9} {'stolen %':>8}"
                + ("" if proxy is None else f" {'proxy CPU %':>11} {'proxy RSS MB':>12}")
            )

            def watching() -> int:
                """Watch streams served: by the server, or by the proxy."""
                if proxy is None:
                    return metric(metrics_port, "scaleset_watchers")
                return metric(proxy.metrics_port, "scaleset_proxy_watchers")

            seen, collected = latency_buckets(metrics_port), gc_pauses(metrics_port)
            deadline = time.monotonic() + args.minutes * 60
            # The warm-up: the first window, and every window that starts before each reading watcher has
            # the history as it stood when they started (every stream replays it from the start).
            worst, replaying = 0.0, True
            loaded: list[tuple[bool, LoadResult]] = []  # (warm-up, what it measured) a window
            while time.monotonic() < deadline:
                warm_up = replaying or not loaded
                began, cpu, ticks = time.monotonic(), cpu_seconds(proc.pid), cpu_ticks()
                proxy_cpu = 0.0 if proxy is None else cpu_seconds(proxy.pid)
                r = load(300)
                busy = (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - began) * 100
                cores, stolen = machine_busy(ticks)
                if not warm_up and stolen <= CALM_STEAL:
                    calm["loaded"].append(r.p99_ms)
                server = p99_bound_ms(seen, seen := latency_buckets(metrics_port))
                longest, full = gc_summary(collected, collected := gc_pauses(metrics_port))
                worst = max(worst, r.p99_ms)
                loaded.append((warm_up, r))
                replaying = replaying and reading()[0] <= head
                minute = args.minutes - (deadline - time.monotonic()) / 60
                print(
                    f"{minute:7.1f} {r.per_second:8.0f} {r.p99_ms:8.1f} {server:>8} {busy:6.0f} {r.errors:7d} "
                    f"{rss_mb(proc.pid):8.1f} {db_mb(db):8.1f} {watching():8d} {longest:>6} {full:4d} "
                    f"{cores:9.0f} {stolen:8.0f}"
                    + (
                        ""
                        if proxy is None
                        else f" {(cpu_seconds(proxy.pid) - proxy_cpu) / (time.monotonic() - began) * 100:11.0f}"
                        f" {rss_mb(proxy.pid):12.1f}"
                    )
                    + ("  warm-up" if warm_up else "")
                )
            let_go = (
                metric(metrics_port, 'scaleset_slow_consumers_total{method="WatchEvents"}')
                if proxy is None
                else metric(proxy.metrics_port, "scaleset_proxy_slow_consumers_total")
            )
            print(
                f"watchers let go as too slow to read: {let_go}; reading watchers' streams opened again "
                f"(a connection refused, or a resume): {reading()[1]}"
            )
            # The reading watchers kept up: each holds the server's newest event.
            newest, stopped = head_sequence(target), time.monotonic()
            while (held := procs[0].least("last")[0]) < newest and time.monotonic() - stopped < CATCH_UP_S:
                time.sleep(0.2)
            if held >= newest:
                print(
                    f"every reading watcher had the server's newest event ({newest}) "
                    f"{time.monotonic() - stopped:.1f} s after the load stopped"
                )
            else:
                print(
                    f"the reading watchers were still behind {CATCH_UP_S:g} s after the load stopped: the "
                    f"furthest behind at event {held} of {newest} (-1: its stream ended)"
                )
            for w in procs:
                w.stop()
            if proxy is not None:
                proxy.stop()
            time.sleep(2)
            after, unloaded = quiet()
            print(f"unloaded after: {unloaded}")
            quiet_p99 = pooled_p99(before + after)
            sides_p99 = {name: pooled_p99(side) for name, side in (("before", before), ("after", after))}
            steady = [r for warm_up, r in loaded if not warm_up]
            if steady:
                p99 = pooled_p99(steady)
                sides = " and ".join(f"{p99 / side:.1f}x {name}" for name, side in sides_p99.items())
                print(
                    f"loaded p99 after the warm-up ({sum(w for w, _ in loaded)} windows) {p99:.1f} ms = "
                    f"{p99 / quiet_p99:.1f}x unloaded "
                    f"({quiet_p99:.1f} ms, before and after pooled; {sides}); worst window {worst:.1f} ms "
                    f"= {worst / quiet_p99:.1f}x"
                )
                # A hiccup of the machine's in one window moves the pooled p99 (about a tenth of the loaded
                # calls are in one window), and a 2-minute run has twice the unloaded windows to catch one.
                typical = statistics.median(r.p99_ms for r in steady)
                quiet_typical = statistics.median(r.p99_ms for r in before + after)
                print(
                    f"median window's p99: loaded {typical:.1f} ms = {typical / quiet_typical:.1f}x unloaded "
                    f"({quiet_typical:.1f} ms)"
                )
                # The same, of the windows the hypervisor left (nearly) alone: what it takes is neither the
                # server's doing nor the watchers'.
                calm_from = f"windows the hypervisor stole at most {CALM_STEAL:.0f}% of a core from"
                counts = {side: len(p99s) for side, p99s in calm.items()}
                if min(counts.values()) >= QUIET_WINDOWS:
                    left, quiet_left = (statistics.median(calm[side]) for side in ("loaded", "unloaded"))
                    print(
                        f"{calm_from}: median p99 loaded {left:.1f} ms ({counts['loaded']} windows) = "
                        f"{left / quiet_left:.1f}x unloaded ({quiet_left:.1f} ms, "
                        f"{counts['unloaded']} windows)"
                    )
                else:
                    print(
                        f"{calm_from}: too few to compare ({counts['loaded']} loaded, {counts['unloaded']} "
                        f"unloaded; at least {QUIET_WINDOWS} on each side)"
                    )
            else:
                print(
                    "no window after the warm-up: a reading watcher never had the history (or its stream ended)"
                )
            low, high = sorted(sides_p99.values())
            if high > DRIFT * low:
                print(
                    f"the unloaded windows before and after differ by {high / low:.1f}x: the "
                    "machine's speed drifted during the run (or its load generator stalled), so the ratio "
                    "above does not measure the watchers; run again"
                )
        finally:
            if proxy is not None:
                proxy.stop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
