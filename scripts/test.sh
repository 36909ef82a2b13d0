#!/usr/bin/env bash
# The one test command (README): installs scaleset with its test extras (a release build of the Rust
# core), then runs every test: Rust unit and property tests, the native module's type stubs, the Python
# suite (unit, property, end-to-end gRPC), and the benchmarks once as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check '.[test]'
cargo test --quiet --manifest-path rust/Cargo.toml --workspace
python3 -m mypy.stubtest scaleset._core
python3 -m mypy
python3 -m pytest
python3 -m pytest bench --benchmark-disable -q
