"""A second language against a real server: the Rust (tonic) client in rust/scaleset-client, generated from
the same proto, runs its conformance steps (create, scale, list with paging, watch, every kind of error
decoded from its status details, a rolling upgrade, a rebalance) against a fresh server; and the soak's Rust
load generator makes the calls it is asked for."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scaleset import Region, ScaleSetSpec, Sku
from scaleset.client import Client
from scaleset.testing.server import ServerThread

RUST = Path(__file__).resolve().parent.parent / "rust"


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
