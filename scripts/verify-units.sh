#!/usr/bin/env bash
# Checks the systemd units of dist/ with `systemd-analyze verify`, rendered
# for the binary just built and with the generated man page they point to.
# Fails, saying why, on any complaint.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
if ! command -v systemd-analyze >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing systemd (for systemd-analyze) from Debian's packages" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null || true
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "error: systemd-analyze not found; it is needed to verify dist/*.service.in (apt-get install systemd)" >&2
  exit 1
fi
cargo build --quiet --bin kata-trace-forwarder
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$(pwd)/$target_dir" ;; esac
bindir="$target_dir/debug"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo run --quiet -p xtask -- docs "$tmp/docs" >/dev/null
mkdir -p "$tmp/man/man1"
cp "$tmp/docs/man/kata-trace-forwarder.1" "$tmp/man/man1/"
cargo run --quiet -p xtask -- units "$bindir" "$tmp/units" >/dev/null
status=0
out=$(MANPATH="$tmp/man" systemd-analyze verify "$tmp"/units/*.service 2>&1) || status=$?
if [ "$status" -ne 0 ] || [ -n "$out" ]; then
  echo "error: systemd-analyze verify rejects the units in dist/ (exit $status):" >&2
  echo "$out" >&2
  exit 1
fi
echo "units OK: $(cd "$tmp/units" && echo *.service)"
