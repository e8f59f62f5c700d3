# Shared by the project's scripts: find the Rust toolchain or say clearly
# why there is none. Sourced, not run.

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: no Rust toolchain (cargo) found. Install Rust 1.85 or newer (https://rustup.rs) and retry." >&2
    exit 1
  fi
  local v
  v=$(rustc --version | awk '{print $2}')
  case "$v" in
    1.[0-7][0-9].*|1.8[0-4].*)
      echo "error: rustc $v is too old; this project needs 1.85 or newer." >&2
      exit 1 ;;
  esac
}

# ensure_go WHAT HINT: puts Go on PATH (it may be installed in
# /usr/local/go) or says clearly what cannot be built without it.
ensure_go() {
  if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "error: Go is needed to build $1 for the end-to-end tests, and 'go' is not on PATH." >&2
    echo "       $2" >&2
    exit 1
  fi
}

# go_progress START: reads `go build -v` output and prints a running count
# of modules downloaded and packages compiled (seconds since START) to
# stderr, so a long build shows progress without flooding the log. Only what
# Go reports as a problem is printed as is: `# package` headers,
# `file.go:line:col: message` lines and their indented continuations, and
# `go: ` lines other than downloads.
go_progress() {
  awk -v start="$1" '
    /^go: downloading / { d++; if (d % 100 == 0) { printf "   downloaded %d modules (%ds)\n", d, systime()-start > "/dev/stderr"; fflush() } next }
    /^#/ || /^go: / || /^[^[:space:]]*\.go:[0-9]+(:[0-9]+)?: / || /^[[:space:]]/ { print > "/dev/stderr"; fflush(); next }
    { n++; if (n % 100 == 0) { printf "   compiled %d packages (%ds)\n", n, systime()-start > "/dev/stderr"; fflush() } }
  '
}
