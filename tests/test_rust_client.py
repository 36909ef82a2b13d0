"""A second language against a real server: the Rust (tonic) client in rust/scaleset-client, generated from
the same proto, runs its conformance steps (create, scale, list with paging, watch, every kind of error
decoded from its status details, a rolling upgrade, a rebalance) against a fresh server."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scaleset import Region
from scaleset.testing.server import ServerThread

RUST = Path(__file__).resolve().parent.parent / "rust"


def test_the_rust_client_passes_its_conformance_run(tmp_path: Path) -> None:
    # Built by the test command's cargo step already; this only links what changed.
    subprocess.run(
        ["cargo", "build", "--quiet", "-p", "scaleset-client", "--bin", "scaleset-conformance"],
        cwd=RUST,
        check=True,
        timeout=1200,
    )
    binary = RUST / "target" / "debug" / "scaleset-conformance"
    with ServerThread(
        str(tmp_path / "state.db"), Region(zones=["1", "2", "3"], fault_domains_per_zone=3)
    ) as s:
        run = subprocess.run([str(binary), f"http://{s.target}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    steps = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(steps) == 14 and run.stdout.rstrip().endswith("every step passed"), run.stdout
