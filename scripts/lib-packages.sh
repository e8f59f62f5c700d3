# Shared by scripts/package.sh and scripts/test-packages.sh: Debian's
# packaging tools, a private container store, and copying a binary with
# exactly the shared libraries it loads. Sourced after scripts/lib.sh.

# ensure_apt CMD PACKAGE...: installs the Debian packages when CMD is
# missing (as root, where apt-get exists), or says what to install.
ensure_apt() {
  local cmd=$1
  shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing $* from Debian's packages (for $cmd)" >&2
    if [ -z "${KTF_APT_UPDATED:-}" ]; then
      apt-get update -qq >/dev/null
      KTF_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "error: $cmd not found; install it (Debian: apt-get install $*)" >&2
    exit 1
  fi
}

# containers_env DIR: podman and buildah keep their images, containers and
# settings in DIR, never in the machine's store, and run the way this kind
# of host allows: vfs storage (no overlay mounts needed), runc (crun cannot
# use a hybrid cgroup hierarchy) with cgroupfs (no systemd), no default
# rlimits, events to a file (no journald).
containers_env() {
  local dir=$1
  mkdir -p "$dir/graph" "$dir/run"
  cat >"$dir/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$dir/graph"
runroot = "$dir/run"
EOF
  cat >"$dir/containers.conf" <<EOF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_STORAGE_CONF="$dir/storage.conf" CONTAINERS_CONF="$dir/containers.conf"
}

# shared_libs FILE...: the shared libraries the dynamic loader maps for
# FILE, and the loader itself, as absolute paths (from ldd).
shared_libs() {
  # (With several files ldd heads each one's list with `FILE:`.)
  ldd "$@" | awk '/:$/ { next } $2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}

# copy_with_libs ROOT FILE...: FILE and its shared libraries, at the same
# paths under ROOT (symlinks resolved: ROOT has nothing else).
copy_with_libs() {
  local root=$1 f
  shift
  for f in "$@" $(shared_libs "$@"); do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done
}
