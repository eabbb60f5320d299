#!/usr/bin/env bash
# Runs every Tidepool check: rustfmt and clippy, then builds (or reuses from
# its cache) the real control plane the tests run against, runs the whole
# Cargo workspace's tests, and ends with one line that adds up every suite.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests run besides our own programs, from Debian's packages:
# cc for the fake NVML library of the GPU tests, ip and tc for the shaped
# network namespaces of the accuracy tests, promtool to check /metrics,
# sshd as the peer of the ssh probe, Chromium for the web UI's tests.
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
command -v promtool >/dev/null || missing+=(prometheus)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A fresh clone gains nothing from incremental compilation, and its caches
# would double the target directory (3.4 GiB of 7.4 GiB measured), which is
# more disk than a CI machine may have free. Report the free space up front so
# a full disk reads as that, not as a compiler crash.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
df -h . | awk 'NR == 2 { print "tidepool: " $4 " free on " $6 " before the build" }'

# Formatting and lints first: they are cheap and fail fast.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

# The web UI: its packages from npm, its type check and build (web/dist,
# which the gateway's tests serve), and its unit tests.
web_log=$(mktemp)
log=$(mktemp)
trap 'rm -f "$log" "$web_log"' EXIT
npm --prefix web ci --no-audit --no-fund --loglevel=error
npm --prefix web run build --silent
NO_COLOR=1 npm --prefix web test --silent 2>&1 | tee "$web_log"

TIDEPOOL_CONTROL_PLANE_BIN=$(tests/control-plane/build.sh)
export TIDEPOOL_CONTROL_PLANE_BIN

status=0
cargo test --workspace --locked --no-fail-fast --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?

# cargo prints one "test result" line per suite, Vitest one "Tests" line;
# add them up.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^ *Tests +[0-9]/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^skipped/) s += $i } }
     END { printf "tidepool: %d passed, %d failed, %d skipped\n", p, f, s }' "$web_log" "$log"
exit "$status"
