#!/usr/bin/env bash
# Gets what the VM tests (tests/vm.rs) boot, once, into a cache, and prints
# it as KTF_VM_*=VALUE lines (also left in the cache's kit.env, where the
# tests find them when run by hand). Progress goes to stderr.
#   - QEMU (qemu-system-x86_64 with vhost-user-vsock-pci): apt-get install
#     qemu-system-x86 where it is missing, as root on Debian/Ubuntu;
#   - vhost-device-vsock (the vhost-user VSOCK backend, hybrid convention):
#     cargo install --root <cache>;
#   - the guest kernel and busybox: Debian's linux-image-amd64 and
#     busybox-static, fetched with apt-get download and unpacked into the
#     cache (nothing is installed on the host);
#   - the initramfs, written by the project's own crates/guest-image around
#     the agent emitter built from this tree (rebuilt every run: cheap);
#   - which accelerator boots the guest here: KVM if /dev/kvm can, else TCG
#     (a probe boot, remembered per host kernel and QEMU). If neither can,
#     it says so and fails.
#
#   KTF_VM_CACHE_DIR  the cache (default ~/.cache/kata-trace-forwarder/vm)
#
# --with-tests: build the workspace's tests in the same cargo run as the
# agent (scripts/test.sh builds them next anyway): the agent then shares
# their dependencies' build, where alone it would build them once more,
# with other features (a minute on a fresh machine).
set -euo pipefail
with_tests=
case "${1:-}" in
  --with-tests) with_tests=--tests ;;
  "") ;;
  *) echo "usage: $0 [--with-tests]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
cache=${KTF_VM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-trace-forwarder/vm}
backend_version=0.3.0
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$cache"
start=$(date +%s)
say() { echo "   $* ($(( $(date +%s) - start ))s)" >&2; }
fail() {
  echo "error: $*" >&2
  echo "       (KTF_NO_VM=1 leaves the VM suite out, and scripts/test.sh then says it was not run)" >&2
  exit 1
}
apt_updated=
apt_update() {
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -q >"$cache/apt.log" 2>&1 || fail "apt-get update failed; see $cache/apt.log"
    apt_updated=1
  fi
}
can_apt() { command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null && [ "$(id -u)" = 0 ]; }

# QEMU.
qemu=$(command -v qemu-system-x86_64 || true)
if [ -z "$qemu" ]; then
  can_apt || fail "the VM tests need QEMU (qemu-system-x86_64 with vhost-user-vsock-pci, e.g. Debian's qemu-system-x86), and it is not installed; this script installs it only as root with apt-get."
  apt_update
  say "installing QEMU (apt-get install qemu-system-x86)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 \
    >>"$cache/apt.log" 2>&1 || fail "apt-get install qemu-system-x86 failed; see $cache/apt.log"
  qemu=$(command -v qemu-system-x86_64) || fail "qemu-system-x86_64 not found after installing qemu-system-x86"
fi
"$qemu" -device help 2>/dev/null | grep -q '"vhost-user-vsock-pci"' ||
  fail "$qemu has no vhost-user-vsock-pci device (QEMU 7.0 or newer has it)"

# The VSOCK backend.
backend_root="$cache/vhost-device-vsock-$backend_version"
backend="$backend_root/bin/vhost-device-vsock"
if [ ! -x "$backend" ]; then
  say "building vhost-device-vsock $backend_version (cargo install, first run only)"
  nice cargo install --quiet --locked --version "$backend_version" --root "$backend_root" vhost-device-vsock \
    >"$cache/cargo-install.log" 2>&1 || fail "cargo install vhost-device-vsock failed; see $cache/cargo-install.log"
fi

# The guest's kernel and busybox, from Debian's packages.
guest="$cache/guest"
if [ ! -f "$guest/.unpacked" ]; then
  can_apt || fail "the guest kernel and busybox come from Debian's packages (apt-get download), and apt-get/dpkg-deb are missing or this is not root."
  apt_update
  debs="$cache/debs"
  rm -rf "$debs" "$guest" && mkdir -p "$debs"
  kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [ -n "$kernel_pkg" ] || fail "apt knows no linux-image-amd64 (is this Debian, with its package lists?)"
  say "downloading $kernel_pkg and busybox-static (apt-get download)"
  (cd "$debs" && apt-get -o APT::Sandbox::User=root download -q "$kernel_pkg" busybox-static) \
    >>"$cache/apt.log" 2>&1 || fail "apt-get download $kernel_pkg busybox-static failed; see $cache/apt.log"
  mkdir -p "$guest.tmp"
  for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$guest.tmp"; done
  rm -rf "$debs"
  touch "$guest.tmp/.unpacked"
  mv "$guest.tmp" "$guest"
fi
bzimage=$(ls "$guest"/boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$bzimage" ] || fail "no kernel in $guest/boot; remove $guest and retry"

# The initramfs around the agent built from this tree, and the kernel as
# an ELF image that QEMU boots directly (PVH), skipping the bzImage's
# decompression: most of a guest's boot time under TCG.
say "building the guest agent (kata-agent-emitter) and crates/guest-image${with_tests:+, with the workspace tests}"
cargo build --quiet --workspace $with_tests --bin kata-agent-emitter --bin guest-image ||
  fail "building the guest agent failed (see above)"
kernel="$guest/vmlinux"
if [ ! -f "$kernel" ]; then
  "$target/debug/guest-image" vmlinux "$bzimage" "$kernel" || fail "could not unpack $bzimage"
fi
initramfs="$cache/initramfs.cpio"
"$target/debug/guest-image" initramfs "$guest" "$target/debug/kata-agent-emitter" "$initramfs"

# What boots it here: a probe, remembered for this host kernel and QEMU.
# (no_timer_check: as tests/common/vm.rs boots it, which says why.)
probe() { # ACCEL SECONDS: boots the guest in probe mode
  local dir
  dir=$(mktemp -d)
  timeout "$2" "$qemu" -accel "$1" -m 256M -smp 1 -nographic -nodefaults -no-reboot \
    -serial "file:$dir/console" -kernel "$kernel" -initrd "$initramfs" \
    -append "console=ttyS0 quiet panic=-1 no_timer_check -- probe" </dev/null >"$dir/qemu" 2>&1 || true
  local ok=1
  grep -q 'ktf-init: probe ok' "$dir/console" 2>/dev/null || ok=0
  if [ "$ok" = 0 ]; then
    echo "   $1 did not boot the guest: $(tail -n 2 "$dir/qemu" "$dir/console" 2>/dev/null | tr '\n' ' ' | cut -c1-300)" >&2
  fi
  rm -rf "$dir"
  [ "$ok" = 1 ]
}
stamp="$cache/probe.$(uname -r).$("$qemu" --version | head -n 1 | tr -c 'A-Za-z0-9.\n' _).$(basename "$bzimage")"
accel=
if [ -f "$stamp" ]; then
  accel=$(cat "$stamp")
else
  if [ -d /sys/module/kvm_pvm ]; then
    # It runs PVM guest kernels only, and hangs on a stock one.
    say "KVM here is kvm-pvm, which cannot boot a stock kernel: not probed"
  elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    # A KVM that works boots this guest in well under a second.
    say "probing KVM"
    probe kvm 10 && accel=kvm
  fi
  if [ -z "$accel" ]; then
    say "probing TCG"
    probe tcg 120 && accel=tcg
  fi
  if [ -z "$accel" ]; then
    echo "error: neither KVM nor TCG can boot the VM tests' guest on this machine (see above)." >&2
    exit 1
  fi
  echo "$accel" >"$stamp"
fi
say "the guest boots with $accel"

kit="KTF_VM_QEMU=$qemu
KTF_VM_BACKEND=$backend
KTF_VM_KERNEL=$kernel
KTF_VM_INITRAMFS=$initramfs
KTF_VM_ACCEL=$accel"
printf '%s\n' "$kit" >"$cache/kit.env"
printf '%s\n' "$kit"
