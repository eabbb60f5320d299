#!/usr/bin/env bash
# Runs every Tidepool test: builds (or reuses from its cache) the real control
# plane the tests run against, then the whole Cargo workspace's tests.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

TIDEPOOL_CONTROL_PLANE_BIN=$(tests/control-plane/build.sh)
export TIDEPOOL_CONTROL_PLANE_BIN

cargo test --workspace --locked --no-fail-fast "$@"
