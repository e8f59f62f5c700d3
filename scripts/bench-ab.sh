#!/usr/bin/env bash
# Side-by-side comparison of forwarder builds or settings (BENCHMARKS.md):
# runs the harness's max-rate scenario once per variant, round after round,
# alternating variants so that a noisy machine affects them all alike, then
# prints each variant's median spans per forwarder CPU-second.
#
#   scripts/bench-ab.sh ROUNDS VARIANT...
#   VARIANT = name=/path/to/kata-trace-forwarder[,ENV=VALUE...][,--flag=value...][,++--harness-flag...]
#
# `--flag` goes to the forwarder; `++--flag` to the harness (e.g. `++--sink-tls`,
# a collector that speaks TLS). Besides spans per CPU-second, it prints the bytes
# per span that reached the collector.
#
# Example: a copy of a build from another commit against the current one, and
# the current one with two worker threads:
#   cp target/release/kata-trace-forwarder /tmp/fwd-old   # (on the old commit)
#   scripts/bench-ab.sh 6 old=/tmp/fwd-old new=target/release/kata-trace-forwarder \
#       two=target/release/kata-trace-forwarder,--worker-threads=2
#
# With `--scenarios=LIST` first, each round runs those harness scenarios
# instead (e.g. `--scenarios=quiet,throttled`; harness flags such as
# `++--formats=json` go in each variant), and it prints each variant's median
# of every figure they report, one row a figure.
set -euo pipefail
cd "$(dirname "$0")/.."
scenarios=
if [[ ${1:-} == --scenarios=* ]]; then
  scenarios=${1#--scenarios=}
  shift
fi
if [ $# -lt 2 ]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
rounds=$1
shift
target=${CARGO_TARGET_DIR:-target}
bench="$target/release/ktf-bench"
[ -x "$bench" ] || cargo build --release --quiet -p kata-trace-bench

# A variant's binary, environment and harness arguments, from NAME=BIN,...
variant() {
  name=${1%%=*}
  IFS=, read -r -a parts <<<"${1#*=}"
  bin=${parts[0]}
  envs=() args=()
  for p in "${parts[@]:1}"; do
    case $p in
      ++*) args+=("${p#++}") ;;
      --*) args+=("--forwarder-arg=$p") ;;
      *) envs+=("$p") ;;
    esac
  done
}

if [ -n "$scenarios" ]; then
  runs=$(mktemp -d)
  trap 'rm -rf "$runs"' EXIT
  for ((round = 1; round <= rounds; round++)); do
    for v in "$@"; do
      variant "$v"
      env ${envs[@]+"${envs[@]}"} "$bench" --forwarder "$bin" --scenarios "$scenarios" --runs 1 \
        --json "$runs/$name.$round.json" ${args[@]+"${args[@]}"} >"$runs/$name.$round.log" 2>&1 ||
        echo "round $round/$rounds $name: the harness failed (see its log: $runs/$name.$round.log)" >&2
      echo "round $round/$rounds $name done" >&2
    done
  done
  # The harness writes one figure a line: `"key": value,`.
  figures() { cat "$runs/$1".*.json 2>/dev/null | sed -n 's/^ *"\([a-z0-9_.]*\)": \(-\{0,1\}[0-9.e+-]*\),\{0,1\}$/\1 \2/p'; }
  printf '| figure |'
  for v in "$@"; do printf ' %s |' "${v%%=*}"; done
  printf '\n|---|'
  for v in "$@"; do printf -- '---:|'; done
  printf '\n'
  for key in $(for v in "$@"; do figures "${v%%=*}"; done | awk '{ print $1 }' | sort -u); do
    printf '| %s |' "$key"
    for v in "$@"; do
      figures "${v%%=*}" | awk -v k="$key" '$1 == k { print $2 }' | sort -g |
        awk '{ a[NR] = $1 } END { if (NR == 0) printf " n/a |"; else if (NR % 2) printf " %.4g |", a[(NR + 1) / 2]; else printf " %.4g |", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
    done
    printf '\n'
  done
  exit 0
fi

declare -A json bincode jwire bwire
for ((round = 1; round <= rounds; round++)); do
  for v in "$@"; do
    variant "$v"
    out=$(env ${envs[@]+"${envs[@]}"} "$bench" --forwarder "$bin" --scenarios max --runs 1 \
      ${args[@]+"${args[@]}"} 2>&1 | grep -E '^   (json|bincode) max' || true)
    j=$(awk '/json max:/ { print $5 }' <<<"$out")
    b=$(awk '/bincode max:/ { print $5 }' <<<"$out")
    jw=$(awk '/json max wire:/ { print $4 }' <<<"$out")
    bw=$(awk '/bincode max wire:/ { print $4 }' <<<"$out")
    echo "round $round/$rounds $name: json $j, bincode $b spans/CPU-s; wire $jw, $bw bytes/span" >&2
    json[$name]+=" $j"
    bincode[$name]+=" $b"
    jwire[$name]+=" $jw"
    bwire[$name]+=" $bw"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
echo "| variant | JSON spans/CPU-s, median [range] | bincode spans/CPU-s, median [range] | JSON / bincode bytes per span on the wire |"
echo "|---|---:|---:|---:|"
for v in "$@"; do
  name=${v%%=*}
  printf '| %s | %.0f [%s] | %.0f [%s] | %.0f / %.0f |\n' "$name" \
    "$(median <<<"${json[$name]}")" "$(range <<<"${json[$name]}")" \
    "$(median <<<"${bincode[$name]}")" "$(range <<<"${bincode[$name]}")" \
    "$(median <<<"${jwire[$name]}")" "$(median <<<"${bwire[$name]}")"
done
