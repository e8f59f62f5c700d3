#!/usr/bin/env bash
# Builds Jaeger (v2, the OpenTelemetry-Collector-based binary) from the Go
# module proxy, once, and prints the path of the cached binary. Later runs
# reuse it. Used by the end-to-end tests (through scripts/test.sh).
#
#   JAEGER_VERSION   module version to build        (default v1.75.0)
#   JAEGER_CACHE_DIR where built binaries are kept  (default ~/.cache/kata-trace-forwarder/jaeger)
set -euo pipefail
version=${JAEGER_VERSION:-v1.75.0}
cache=${JAEGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-trace-forwarder/jaeger}
bin="$cache/$version/jaeger"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
. "$(dirname "$0")/lib.sh"
ensure_go "Jaeger ($version)" "Install Go 1.24.6 or newer, or set JAEGER_BIN to an existing Jaeger v2 binary."
tmp="$cache/$version.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "== building Jaeger $version from the Go module proxy (first run only; takes minutes)" >&2
start=$(date +%s)
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
# `go install module@version` refuses modules whose go.mod has replace
# directives (Jaeger's has one), so fetch the module's source through the
# proxy and build it as the main module instead.
# (go mod download -json reports a failure inside its JSON, on stdout.)
if ! info=$(go mod download -json "github.com/jaegertracing/jaeger@$version") ||
  ! dir=$(printf '%s\n' "$info" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p') ||
  [ -z "$dir" ] || [ ! -d "$dir" ]; then
  printf '%s\n' "${info:-}" | sed -n 's/^[[:space:]]*"Error": /   /p' >&2
  echo "error: could not download github.com/jaegertracing/jaeger@$version from the Go module proxy ($(go env GOPROXY))." >&2
  exit 1
fi
cp -r "$dir" "$tmp/src"
chmod -R u+w "$tmp/src"
# -v names each package as it is compiled: print a running count so a long
# build shows progress without flooding the log. Only what Go reports as a
# problem is printed as is: `# package` headers, `file.go:line:col: message`
# lines and their indented continuations, and `go: ` lines other than
# downloads. (A package name is never one of those, even when it contains
# "error", like internal/oserror.)
set +e # a failed build is reported below, not by set -e
(cd "$tmp/src" && go build -v -trimpath -o "$tmp/jaeger" ./cmd/jaeger) 2>&1 |
  go_progress "$start"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] || [ ! -x "$tmp/jaeger" ]; then
  echo "error: building Jaeger $version failed (go build exit $status); see the lines above." >&2
  exit 1
fi
mkdir -p "$cache/$version"
mv "$tmp/jaeger" "$bin"
echo "== Jaeger $version built in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
