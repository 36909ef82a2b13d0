#!/usr/bin/env bash
# The one test command (README, CONTRIBUTING, CI): installs scaleset with its test extras (a release build
# of the Rust core), then runs every gate: formatters and linters (ruff, cargo fmt, clippy), Rust unit and
# property tests, the native module's type stubs, mypy strict, the Python suite (unit, property,
# architecture, schema, end-to-end gRPC), and the benchmarks with their speed-up floors.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step install
python3 -m pip install --quiet --disable-pip-version-check '.[test]'
# Real components, not mocks: the autoscale tests start Debian's Prometheus themselves (a temporary
# directory, a free port, stopped afterwards); it only has to be installed.
# The PostgreSQL store's tests start Debian's PostgreSQL the same way (scaleset/testing/postgres.py).
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "lint: ruff check, ruff format --check, cargo fmt --check, cargo clippy -D warnings"
python3 -m ruff check python tests bench scripts build_backend.py
python3 -m ruff format --check python tests bench scripts build_backend.py
cargo fmt --manifest-path rust/Cargo.toml --all -- --check
cargo clippy --quiet --manifest-path rust/Cargo.toml --workspace --all-targets -- -D warnings

step "api: buf lint, buf breaking against the committed v1 contract (api/scaleset-v1.binpb)"
buf lint
buf breaking --against api/scaleset-v1.binpb

step "rust: unit and property tests"
cargo test --quiet --manifest-path rust/Cargo.toml --workspace

step "types: stubtest, mypy strict"
python3 -m mypy.stubtest scaleset._core
python3 -m mypy

step "python: tests"
python3 -m pytest

step "benchmarks: gated speed-ups (ratios against same-run baselines)"
python3 -m pytest bench --benchmark-only -q
