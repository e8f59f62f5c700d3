#!/usr/bin/env bash
# See agent spans flow with nothing else installed: the forwarder runs in
# --dump-only mode on a temporary hybrid-VSOCK socket and the bundled sample
# agent sends it real Kata agent frames (the real opentelemetry 0.17 SDK's
# JSON, as Kata 3.29+ sends, and the 0.14 SDK's bincode, as Kata 2.2-3.28
# send). Each trace comes out as an indented tree (--dump-format tree);
# with --json, each span as one OTLP JSON line, as a pipe gets by default.
#
# --vm: the agent runs in real guests instead (what tests/vm.rs boots, got by
# scripts/setup-vm.sh): a Linux VM under QEMU per format, its agent writing
# over AF_VSOCK to the host as Kata's does, relayed by a vhost-user VSOCK
# backend to the forwarder's socket as Cloud Hypervisor does.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
vm=
format=tree
for arg in "$@"; do
  case "$arg" in
    --vm) vm=1 ;;
    --json) format=otlp-json ;;
    *) echo "usage: $0 [--vm] [--json]" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-target}

echo "== building (first run takes a few minutes)" >&2
cargo build --quiet --workspace --bins
if [ -n "$vm" ]; then
  echo "== the guest: QEMU, vhost-device-vsock, kernel and initramfs (scripts/setup-vm.sh)" >&2
  kit=$(scripts/setup-vm.sh)
  while IFS= read -r line; do export "${line?}"; done <<<"$kit"
fi

dir=$(mktemp -d)
pid=
guest_pids=()
cleanup() {
  for p in "${guest_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# guest FORMAT: boots a VM whose agent sends one kitchen-sink trace in
# FORMAT, waits for it to power off, and stops its backend.
guest() {
  local g="$dir/guest-$1" qemu backend
  mkdir "$g"
  "$KTF_VM_BACKEND" --vm "guest-cid=3,socket=$g/vhost.sock,uds-path=$dir/kata.hvsock" \
    >"$g/backend.log" 2>&1 &
  backend=$!
  guest_pids=("$backend")
  for _ in $(seq 1 200); do [ -S "$g/vhost.sock" ] && break; sleep 0.05; done
  timeout 120 "$KTF_VM_QEMU" -accel "$KTF_VM_ACCEL" -m 256M -smp 1 -nographic -nodefaults -no-reboot \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -chardev "socket,id=vsock,path=$g/vhost.sock" -device vhost-user-vsock-pci,chardev=vsock \
    -serial "file:$g/console" -serial "file:$g/manifest" \
    -kernel "$KTF_VM_KERNEL" -initrd "$KTF_VM_INITRAMFS" \
    -append "console=ttyS0 quiet panic=-1 -- --format $1 --traces 1" </dev/null >"$g/qemu.log" 2>&1 &
  qemu=$!
  guest_pids=("$backend" "$qemu")
  wait "$qemu" || { echo "error: the guest failed:" >&2; cat "$g/qemu.log" "$g/console" >&2; exit 1; }
  kill "$backend" 2>/dev/null || true
  wait "$backend" 2>/dev/null || true
  guest_pids=()
  grep -a 'ktf-init' "$g/console" | sed 's/.*ktf-init/ktf-init/' | tr -d '\r' >&2
  echo "   its manifest: $(grep -c '^KTF {"span"' "$g/manifest") spans sent; $(grep -a '^KTF {"done"' "$g/manifest" | tr -d '\r')" >&2
}

# The format is given: stdout is a file here, which would get JSON lines.
"$target/debug/kata-trace-forwarder" --dump-only --dump-format "$format" --log-format text \
  --socket-path "$dir/kata.hvsock" >"$dir/spans.out" 2>"$dir/forwarder.log" &
pid=$!
for _ in $(seq 1 200); do
  [ -S "$dir/kata.hvsock_10240" ] && break
  sleep 0.05
done
if [ ! -S "$dir/kata.hvsock_10240" ]; then
  echo "error: forwarder did not start:" >&2
  cat "$dir/forwarder.log" >&2
  exit 1
fi

if [ -n "$vm" ]; then
  echo "== a guest whose agent sends Kata 3.29+ JSON frames ($KTF_VM_ACCEL)" >&2
  guest json
  echo "== a guest whose agent sends Kata 2.2-3.28 bincode frames ($KTF_VM_ACCEL)" >&2
  guest bincode
else
  echo "== sample agent (Kata 3.29+ JSON frames)" >&2
  "$target/debug/kata-agent-emitter" --socket "$dir/kata.hvsock_10240" --format json
  echo "== sample agent (Kata 2.2-3.28 bincode frames)" >&2
  "$target/debug/kata-agent-emitter" --socket "$dir/kata.hvsock_10240" --format bincode
fi

# A graceful stop flushes every span before the forwarder exits.
kill -TERM "$pid"
wait "$pid"
pid=

echo "== forwarder log" >&2
cat "$dir/forwarder.log" >&2
if [ "$format" = tree ]; then
  echo "== traces (name, duration, start offset in the trace, status, attributes; · marks an event)" >&2
  cat "$dir/spans.out"
  # Span lines: neither a trace header nor an event.
  echo "== $(grep -cvE '^(trace |[[:space:]]*· )' "$dir/spans.out") spans forwarded" >&2
else
  echo "== spans (OTLP JSON, one per line)" >&2
  cat "$dir/spans.out"
  echo "== $(wc -l <"$dir/spans.out") spans forwarded" >&2
fi
