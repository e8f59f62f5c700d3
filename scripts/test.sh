#!/usr/bin/env bash
# Everything CI runs: formatting, lints, and every test (unit, integration
# with the real binary, real-SDK agent frames, end-to-end into a real Jaeger).
# Needs a Rust toolchain, and Go with the Go module proxy to build Jaeger once
# (scripts/setup-jaeger.sh; or set JAEGER_BIN to a Jaeger v2 binary).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust

# The Jaeger end-to-end tests (tests/jaeger.rs) need a Jaeger binary; they
# fail without one, and so does this script: it never skips them.
echo "== Jaeger for the end-to-end tests"
if [ -z "${JAEGER_BIN:-}" ]; then
  if ! JAEGER_BIN=$(scripts/setup-jaeger.sh); then
    echo "error: no Jaeger for the end-to-end tests (see above): install Go 1.24.6 or newer with access" >&2
    echo "       to the Go module proxy and rerun, or set JAEGER_BIN to a Jaeger v2 binary." >&2
    exit 1
  fi
fi
export JAEGER_BIN
echo "   JAEGER_BIN=$JAEGER_BIN"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
echo "== benchmarks: build them, and a seconds-long smoke run of the harness (nothing is timed)"
cargo bench --workspace --no-run --quiet
scripts/bench.sh --smoke
echo "== systemd units (systemd-analyze verify)"
scripts/verify-units.sh

# One closing line for the whole suite: the last 'test result' cargo prints
# is a crate's (often empty) doc-test run, not the total.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
