#!/usr/bin/env bash
# Builds an OpenTelemetry Collector with the collector's own builder
# (go.opentelemetry.io/collector/cmd/builder, "ocb") from the Go module proxy,
# once, and prints the path of the cached binary. Later runs reuse it. Used by
# the end-to-end tests that forward through a real collector.
#
# The collector has: receivers otlp; exporters otlp (gRPC), otlphttp, debug;
# extensions bearertokenauth (contrib). The builder manifest is written below.
#
#   OTELCOL_BUILDER_VERSION  builder and core component version (default v0.165.0)
#   OTELCOL_CONTRIB_VERSION  contrib component version (default v0.165.1 for
#                            builder v0.165.0, else the builder version)
#   OTELCOL_CACHE_DIR        where built binaries are kept
#                            (default ~/.cache/kata-trace-forwarder/otelcol)
set -euo pipefail
version=${OTELCOL_BUILDER_VERSION:-v0.165.0}
# Contrib v0.165.1 is the patch release that goes with core v0.165.0.
if [ "$version" = v0.165.0 ]; then default_contrib=v0.165.1; else default_contrib=$version; fi
contrib=${OTELCOL_CONTRIB_VERSION:-$default_contrib}
cache=${OTELCOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-trace-forwarder/otelcol}
bin="$cache/$version/otelcol"
# The component part of the builder manifest. A copy is kept beside the binary,
# so a cached collector built from another component list is rebuilt.
components="receivers:
  - gomod: go.opentelemetry.io/collector/receiver/otlpreceiver $version
exporters:
  - gomod: go.opentelemetry.io/collector/exporter/otlpexporter $version
  - gomod: go.opentelemetry.io/collector/exporter/otlphttpexporter $version
  - gomod: go.opentelemetry.io/collector/exporter/debugexporter $version
extensions:
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/extension/bearertokenauthextension $contrib"
stamp="$cache/$version/components.yaml"
if [ -x "$bin" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$components" ]; then
  echo "$bin"
  exit 0
fi
. "$(dirname "$0")/lib.sh"
ensure_go "the OpenTelemetry Collector ($version)" "Install Go 1.26 or newer, or set OTELCOL_BIN to an existing collector binary."
tmp="$cache/$version.tmp.$$"
mkdir -p "$tmp"
heartbeat=
trap '[ -z "$heartbeat" ] || kill "$heartbeat" 2>/dev/null; rm -rf "$tmp"' EXIT
echo "== building the OpenTelemetry Collector $version with its builder, from the Go module proxy (first run only; takes minutes)" >&2
start=$(date +%s)
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

# A line on stderr every 30s while a step that prints nothing runs. (sleep gets
# no copy of stdout or stderr, so it cannot hold a caller's pipe open.)
start_heartbeat() {
  (while sleep 30 </dev/null >/dev/null 2>&1; do
    printf '   ... still %s (%ds)\n' "$1" $(($(date +%s) - start)) >&2
  done) &
  heartbeat=$!
}
stop_heartbeat() {
  kill "$heartbeat" 2>/dev/null || true
  wait "$heartbeat" 2>/dev/null || true
  heartbeat=
}

# 1. The builder itself, into a GOBIN of our own (not the user's).
echo "   installing go.opentelemetry.io/collector/cmd/builder@$version" >&2
start_heartbeat "installing the builder"
set +e # a failure is reported below, not by set -e
(cd "$tmp" && GOBIN="$tmp/bin" go install "go.opentelemetry.io/collector/cmd/builder@$version") 2>&1 |
  grep -v '^go: downloading ' >&2
status=${PIPESTATUS[0]}
set -e
stop_heartbeat
if [ "$status" -ne 0 ] || [ ! -x "$tmp/bin/builder" ]; then
  echo "error: could not install go.opentelemetry.io/collector/cmd/builder@$version from the Go module proxy ($(go env GOPROXY)); see the lines above." >&2
  exit 1
fi

# 2. The manifest (the builder's documented keys: dist, and gomod lists).
# Confmap providers (env, file, http, https, yaml) and the telemetry module
# are the builder's defaults for its own version.
cat >"$tmp/manifest.yaml" <<EOF
dist:
  module: kata-trace-forwarder/otelcol
  name: otelcol
  description: OpenTelemetry Collector for the kata-trace-forwarder end-to-end tests
  version: ${version#v}
  output_path: $tmp/dist
$components
EOF

# 3. The builder writes the sources, runs go mod tidy and downloads every
# module (it prints nothing meanwhile: a heartbeat shows it is alive). It is
# told to skip compiling so the build can run with -v below and show progress.
# (It also makes an otelcol-distribution* dir in TMPDIR that it never uses or
# removes: TMPDIR points into our temp dir so that one is cleaned up too.)
echo "   generating the sources and downloading the modules (builder --config manifest.yaml)" >&2
start_heartbeat "downloading modules"
set +e
(cd "$tmp" && TMPDIR="$tmp" "$tmp/bin/builder" --config "$tmp/manifest.yaml" --skip-compilation) 2>&1 |
  awk '/^[[:space:]]*go: downloading / { d++; next } { print > "/dev/stderr"; fflush() }
       END { if (d) printf "   (%d \"go: downloading\" lines left out)\n", d > "/dev/stderr" }'
status=${PIPESTATUS[0]}
set -e
stop_heartbeat
if [ "$status" -ne 0 ] || [ ! -f "$tmp/dist/go.sum" ]; then
  echo "error: the builder could not prepare the collector $version (exit $status): a module may be missing from the Go module proxy ($(go env GOPROXY)), or need a newer Go than $(go env GOVERSION); see the lines above." >&2
  exit 1
fi

# 4. Compile as the builder would (go build -trimpath -ldflags='-s -w' with
# CGO_ENABLED=0), plus -v: it names each package as it is compiled, shown as a
# running count so a long build shows progress without flooding the log. Only
# what Go reports as a problem is printed as is: `# package` headers,
# `file.go:line:col: message` lines and their indented continuations, and
# `go: ` lines other than downloads.
echo "   compiling the collector ($(($(date +%s) - start))s so far)" >&2
set +e
(cd "$tmp/dist" && CGO_ENABLED=0 go build -v -trimpath -ldflags='-s -w' -o "$tmp/dist/otelcol" .) 2>&1 |
  go_progress "$start"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] || [ ! -x "$tmp/dist/otelcol" ]; then
  echo "error: building the OpenTelemetry Collector $version failed (go build exit $status); see the lines above." >&2
  exit 1
fi
mkdir -p "$cache/$version"
printf '%s\n' "$components" >"$tmp/components.yaml"
mv "$tmp/dist/otelcol" "$bin"
mv "$tmp/components.yaml" "$stamp"
echo "== OpenTelemetry Collector $version built in $(($(date +%s) - start))s: $bin" >&2
echo "$bin"
