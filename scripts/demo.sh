#!/usr/bin/env bash
# See agent spans flow with nothing else installed: the forwarder runs in
# --dump-only mode on a temporary hybrid-VSOCK socket and the bundled sample
# agent sends it real Kata agent frames (the real opentelemetry 0.17 SDK's
# JSON, as Kata 3.29+ sends, and the 0.14 SDK's bincode, as Kata 2.2-3.28
# send). Each span comes out as one OTLP JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust

echo "== building (first run takes a few minutes)" >&2
cargo build --quiet --workspace --bins

dir=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

target/debug/kata-trace-forwarder --dump-only --log-format text \
  --socket-path "$dir/kata.hvsock" >"$dir/spans.jsonl" 2>"$dir/forwarder.log" &
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

echo "== sample agent (Kata 3.29+ JSON frames)" >&2
target/debug/kata-agent-emitter --socket "$dir/kata.hvsock_10240" --format json
echo "== sample agent (Kata 2.2-3.28 bincode frames)" >&2
target/debug/kata-agent-emitter --socket "$dir/kata.hvsock_10240" --format bincode

# A graceful stop flushes every span before the forwarder exits.
kill -TERM "$pid"
wait "$pid"
pid=

echo "== forwarder log" >&2
cat "$dir/forwarder.log" >&2
echo "== spans (OTLP JSON, one per line)" >&2
cat "$dir/spans.jsonl"
echo "== $(wc -l <"$dir/spans.jsonl") spans forwarded" >&2
