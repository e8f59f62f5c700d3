#!/usr/bin/env bash
# Everything CI runs: formatting, lints, and every test (unit, integration
# with the real binary, real-SDK agent frames, end-to-end into a real Jaeger).
# Needs a Rust toolchain, and Go with the Go module proxy to build Jaeger and
# an OpenTelemetry Collector once (scripts/setup-jaeger.sh and
# scripts/setup-otelcol.sh; or set JAEGER_BIN and OTELCOL_BIN). The
# packages and the image are installed and run for real as root
# (scripts/test-packages.sh, with podman, buildah and rpm from Debian's).
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

# The secured-export tests (tests/otelcol.rs) run a real OpenTelemetry
# Collector, built with the collector's own builder; they fail without one.
echo "== OpenTelemetry Collector for the secured-export tests"
if [ -z "${OTELCOL_BIN:-}" ]; then
  if ! OTELCOL_BIN=$(scripts/setup-otelcol.sh); then
    echo "error: no OpenTelemetry Collector for the tests (see above): install Go with access" >&2
    echo "       to the Go module proxy and rerun, or set OTELCOL_BIN to a collector built by" >&2
    echo "       scripts/setup-otelcol.sh." >&2
    exit 1
  fi
fi
export OTELCOL_BIN
echo "   OTELCOL_BIN=$OTELCOL_BIN"

echo "== cargo fmt --check"
cargo fmt --all -- --check
# Top-level modules in src/ must not import each other in a cycle: the
# check prints the module graph, and the cycle when there is one.
echo "== module graph"
cargo run --quiet -p xtask -- check-modules
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The VM suite (tests/vm.rs) boots real guests: it needs QEMU, a VSOCK
# backend, a guest kernel and initramfs (scripts/setup-vm.sh gets them
# once). It fails without them; only KTF_NO_VM=1 leaves it out.
vm_skip=()
if [ "${KTF_NO_VM:-}" = 1 ]; then
  echo "== VM suite: not run (KTF_NO_VM=1)"
  vm_skip=(--skip vm_guest)
else
  echo "== VM suite: QEMU, vhost-device-vsock, guest kernel and initramfs"
  if ! vm_kit=$(scripts/setup-vm.sh --with-tests); then
    echo "error: the VM suite cannot run here (see above); KTF_NO_VM=1 leaves it out." >&2
    exit 1
  fi
  while IFS= read -r line; do
    export "${line?}"
    echo "   $line"
  done <<<"$vm_kit"
fi

# The hand-over tests upgrade the test (debug) build to this one, a
# different build of the binary; the benchmark smoke run below uses it too.
echo "== release build of the forwarder"
cargo build --release --quiet --bin kata-trace-forwarder
export KTF_OTHER_BUILD="${CARGO_TARGET_DIR:-target}/release/kata-trace-forwarder"
echo "== cargo test"
log=$(mktemp)
# The VM suite's figures per scenario (spans sent, arrived, duplicated;
# seconds), repeated at the end.
KTF_VM_FIGURES=$(mktemp)
export KTF_VM_FIGURES
trap 'rm -f "$log" "$KTF_VM_FIGURES"' EXIT
cargo test --workspace -- "${vm_skip[@]}" 2>&1 | tee "$log"
echo "== benchmarks: build them, and a seconds-long smoke run of the harness (nothing is timed)"
cargo bench --workspace --no-run --quiet
scripts/bench.sh --smoke
echo "== systemd units (systemd-analyze verify)"
scripts/verify-units.sh
# The .deb, the .rpm and the image from the release build above, installed
# and run for real; its own closing line counts below.
echo "== packages and image (scripts/test-packages.sh)"
pkglog=$(mktemp)
trap 'rm -f "$log" "$KTF_VM_FIGURES" "$pkglog"' EXIT
scripts/test-packages.sh 2>&1 | tee "$pkglog"

if [ "${KTF_NO_VM:-}" = 1 ]; then
  echo "VM suite: not run (KTF_NO_VM=1); the count below leaves it out"
else
  echo "VM suite figures:"
  sed 's/^/   /' "$KTF_VM_FIGURES"
fi
# One closing line for the whole suite: the last 'test result' cargo prints
# is a crate's (often empty) doc-test run, not the total.
awk -v pkg="$pkglog" '
     FILENAME != pkg && /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     FILENAME == pkg && /^packages: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log" "$pkglog"
