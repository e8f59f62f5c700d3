#!/usr/bin/env bash
# The end-to-end benchmark (results and method: BENCHMARKS.md). Builds the
# release forwarder exactly as users build it, and the harness
# (crates/bench, a separate package), then runs the harness against that
# binary. Arguments go to the harness (`scripts/bench.sh --help`);
# `--smoke` is the seconds-long run CI does, which checks that the harness
# works and times nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust

target=${CARGO_TARGET_DIR:-target}
# Two builds, not one: built together, the harness's dependency features
# (a gRPC server for its sink) would also be compiled into the forwarder.
cargo build --release --quiet --bin kata-trace-forwarder
cargo build --release --quiet -p kata-trace-bench
exec "$target/release/ktf-bench" --forwarder "$target/release/kata-trace-forwarder" "$@"
