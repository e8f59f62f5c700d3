#!/usr/bin/env bash
# Everything CI runs: formatting, lints, and every test (unit, integration
# with the real binary, real-SDK agent frames). Needs only a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace
