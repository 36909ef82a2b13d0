"""A second language against a real server: the Rust (tonic) client in rust/scaleset-client, generated from
the same proto, runs its conformance steps (create, scale, list with paging, watch, every kind of error
decoded from its status details, a rolling upgrade, a rebalance) against a fresh server; and the soak's Rust
load generator makes the calls it is asked for, and its Rust watchers follow every change."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from scaleset import Region, ScaleSetSpec, Sku
from scaleset.client import Client
from scaleset.testing.server import ServerThread, free_port, start_server_process

RUST = Path(__file__).resolve().parent.parent / "rust"
sys.path.insert(0, str(RUST.parent))
from bench.load import RustWatchers  # noqa: E402 - the soak's, as it runs them


def built(binary: str) -> Path:
    """The client crate's ``binary``, built by the test command's cargo step already (this only links what
    changed)."""
    subprocess.run(
        ["cargo", "build", "--quiet", "-p", "scaleset-client", "--bin", binary],
        cwd=RUST,
        check=True,
        timeout=1200,
    )
    return RUST / "target" / "debug" / binary


def test_the_rust_client_passes_its_conformance_run(tmp_path: Path) -> None:
    binary = built("scaleset-conformance")
    with ServerThread(
        str(tmp_path / "state.db"), Region(zones=["1", "2", "3"], fault_domains_per_zone=3)
    ) as s:
        run = subprocess.run([str(binary), f"http://{s.target}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    steps = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(steps) == 14 and run.stdout.rstrip().endswith("every step passed"), run.stdout


def test_the_rust_load_generator_makes_every_call_of_its_schedule(tmp_path: Path) -> None:
    """bench/soak.py --load rust: 200 calls at 200 a second over two connections with two scale sets each
    (load-<connection>-<set>), each set visited 50 times, alternating 10 and 11 instances."""
    binary = built("scaleset-load")
    names = [f"load-{p}-{k}" for p in range(2) for k in range(2)]
    with ServerThread(str(tmp_path / "state.db"), Region(zones=["1", "2", "3"])) as s, Client(s.target) as c:
        for name in names:
            c.create_scale_set(ScaleSetSpec(name=name, zones=["1", "2", "3"], sku=Sku("Standard_D2s_v5")), 10)
        flags = "--rate 200 --seconds 1 --processes 2 --per-process 2 --inflight 4".split()
        load = [str(binary), "--target", f"http://{s.target}"]
        run = subprocess.run([*load, *flags], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        first, *latencies = run.stdout.splitlines()
        calls, errors, seconds = first.split()
        assert (int(calls), int(errors), len(latencies)) == (200, 0, 200)
        # Due over 995 ms, the last call answered after it.
        assert 0.995 <= float(seconds) < 30 and all(int(us) > 0 for us in latencies)
        # Each set's 50 calls (10, 11, ..., 11) each made a revision after the create's.
        assert {(i.capacity, i.revision) for i in map(c.get_scale_set, names)} == {(11, 51)}
        bad = subprocess.run([*load, "--rate", "0"], capture_output=True)
        assert bad.returncode != 0 and b"--rate" in bad.stderr


def test_the_rust_watchers_follow_every_change_resume_after_a_failure_and_hold_when_not_reading(
    tmp_path: Path,
) -> None:
    """bench/soak.py --watch rust: reading streams opened before the server listens open again and follow
    every change, and resume after it is killed; never-reading ones take their first message only."""
    binary, port = built("scaleset-watch"), free_port()
    target = f"127.0.0.1:{port}"
    readers = RustWatchers(binary, target, 3, reads=True, resume=True)
    holders: RustWatchers | None = None
    server: subprocess.Popen[bytes] | None = None

    def serve() -> subprocess.Popen[bytes]:
        return start_server_process(tmp_path / "state.db", port, tmp_path / "server.log")

    def until(watchers: RustWatchers, sequence: int) -> tuple[int, int]:
        """The watchers' least last event, and their reopened streams, once it is ``sequence``."""
        deadline = time.monotonic() + 60
        while (answer := watchers.least("last"))[0] != sequence and time.monotonic() < deadline:
            time.sleep(0.1)
        return answer

    try:
        time.sleep(0.5)  # every stream fails at least once: nothing listens yet
        server = serve()
        with Client(target) as c:
            spec = ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=Sku("Standard_D2s_v5"))
            c.create_scale_set(spec, 3)
            for capacity in range(4, 8):
                c.set_capacity("web", capacity)
        # Events 1 (the create) to 5; each stream opened again at least once before the server listened.
        last, reopened = until(readers, 5)
        assert last == 5 and reopened >= 3
        # Opened now, their first message is the history: events 1 to 5.
        holders = RustWatchers(binary, target, 2, reads=False, resume=False)
        assert until(holders, 5)[0] == 5
        first, _ = readers.least("first")
        assert 1 <= first <= 5  # each stream's last message began with one of the events it holds
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = serve()
        with Client(target) as c:
            c.set_capacity("web", 2)  # event 6
        last, resumed = until(readers, 6)
        assert last == 6 and resumed >= reopened + 3  # each of the three resumed after event 5
        # The never-reading streams still hold their first message: they read nothing after it, not even
        # that their server went away.
        assert holders.least("last")[0] == 5
    finally:
        readers.stop()
        if holders is not None:
            holders.stop()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    bad = subprocess.run([str(binary), "--target", f"http://{target}", "--streams", "1", "--reads", "maybe"])
    assert bad.returncode != 0
