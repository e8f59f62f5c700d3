#!/usr/bin/env bash
# The release artifacts (scripts/package.sh), installed and run for real;
# part of scripts/test.sh, after its release build, which they reuse:
#   deb        its files and control data; dpkg -i, reinstall, -r and -P on
#              this machine, where systemd is not running (the maintainer
#              scripts must not fail); the installed units pass
#              systemd-analyze verify; the settings file is kept as edited
#   rpm        its files, flags and scriptlets; installed, upgraded and
#              erased in a scratch root (rpm --root) whose /bin/sh runs them
#   both       their scripts' systemd branches, with a systemctl stub and
#              /run/systemd/system in a mount namespace: what they call
#   image      at most 15 MB; exactly the binary, its shared libraries and
#              /etc; podman runs it: --version, and tests/packages.rs (agents
#              on the host, spans to a collector on the host; the plan from
#              the DaemonSet's mount of the fixture node)
#   daemonset  deploy/kubernetes/check: the manifest decoded strictly into
#              k8s.io/api's apps/v1 DaemonSet (go test; Go module proxy)
# Needs root (dpkg, podman). Installs podman, buildah, runc and rpm from
# Debian's packages when missing. Refuses to run where a kata-trace-forwarder
# package is installed already: it installs and purges its own.
# Ends with 'packages: N passed, N failed'; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. scripts/lib-packages.sh
ensure_rust

if [ "$(id -u)" != 0 ]; then
  echo "error: scripts/test-packages.sh installs packages and runs containers: run it as root" >&2
  exit 1
fi
if dpkg-query -W -f '${Status}' kata-trace-forwarder 2>/dev/null | grep -q installed; then
  echo "error: a kata-trace-forwarder package is installed here; this test installs and purges" >&2
  echo "       its own: remove it first (dpkg -P kata-trace-forwarder)" >&2
  exit 1
fi
start=$(date +%s)
# section TITLE: a header with the seconds spent so far (the budget).
section() { echo "== $1 (at $(($(date +%s) - start)) s)"; }
section "podman, runc, buildah, rpm (Debian's packages, when missing)"
missing=()
for c in podman runc buildah rpm; do command -v $c >/dev/null 2>&1 || missing+=("$c"); done
[ ${#missing[@]} = 0 ] || ensure_apt "${missing[0]}" "${missing[@]}"

tmp=$(mktemp -d)
# Before anything can fail: cleanup's podman must act on this store alone.
containers_env "$tmp/containers"
cleanup() {
  if dpkg-query -W -f '${Status}' kata-trace-forwarder 2>/dev/null | grep -q 'ok'; then
    dpkg -P kata-trace-forwarder >/dev/null 2>&1 || true
  fi
  rm -f /etc/systemd/system/multi-user.target.wants/kata-trace-forwarder-host.service
  podman rm -af -t 0 >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

section "building the packages and the image (scripts/package.sh)"
mapfile -t artifacts < <(scripts/package.sh deb rpm image)
deb=${artifacts[0]} rpm=${artifacts[1]} archive=${artifacts[2]}
target_dir="${CARGO_TARGET_DIR:-target}"
version=$("$target_dir/release/kata-trace-forwarder" --version | awk '{ print $2 }')
BIN=kata-trace-forwarder
echo "   $(du -h "$deb" | cut -f1) $deb"
echo "   $(du -h "$rpm" | cut -f1) $rpm"
echo "   $(du -h "$archive" | cut -f1) $archive"
image=$(podman load -q -i "$archive" | sed -n 's/^Loaded image[^:]*: //p' | head -1)
echo "   image $image (podman load, private store)"
export deb rpm archive version image tmp BIN

passed=0 failed=0
# check NAME FUNCTION: runs FUNCTION in its own bash with errexit (which a
# function called from an `if` would not have), and counts it.
check() {
  local name=$1 fn=$2 out rc=0
  out=$(bash -c "set -euo pipefail; $fn" 2>&1) || rc=$?
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1))
    echo "ok    $name"
  else
    failed=$((failed + 1))
    echo "FAIL  $name (exit $rc)"
  fi
  [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
}

# same WHAT WANT GOT: fails showing the difference.
same() {
  if [ "$2" != "$3" ]; then
    echo "$1 differs (- want, + got):"
    diff <(printf '%s\n' "$2") <(printf '%s\n' "$3") | sed -n 's/^</-/p; s/^>/+/p'
    return 1
  fi
}

UNITS="kata-trace-forwarder.service kata-trace-forwarder-hybrid.service kata-trace-forwarder-host.service"
SETTINGS=/etc/default/kata-trace-forwarder
EDIT="KATA_TRACE_FORWARDER_ARGS=--log-format text # edited by the operator"

deb_contents() {
  same "files (mode, owner, path)" "\
-rw-r--r-- root/root ./etc/default/kata-trace-forwarder
-rwxr-xr-x root/root ./usr/bin/kata-trace-forwarder
-rw-r--r-- root/root ./usr/lib/systemd/system/kata-trace-forwarder-host.service
-rw-r--r-- root/root ./usr/lib/systemd/system/kata-trace-forwarder-hybrid.service
-rw-r--r-- root/root ./usr/lib/systemd/system/kata-trace-forwarder.service
-rw-r--r-- root/root ./usr/share/bash-completion/completions/kata-trace-forwarder
-rw-r--r-- root/root ./usr/share/doc/kata-trace-forwarder/copyright
-rw-r--r-- root/root ./usr/share/fish/vendor_completions.d/kata-trace-forwarder.fish
-rw-r--r-- root/root ./usr/share/man/man1/kata-trace-forwarder.1.gz
-rw-r--r-- root/root ./usr/share/zsh/vendor-completions/_kata-trace-forwarder" \
    "$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort -k3)"
  same "control" "kata-trace-forwarder $version-1 $(dpkg --print-architecture)" \
    "$(dpkg-deb -f "$deb" Package Version Architecture | awk '{ printf "%s%s", (NR > 1 ? " " : ""), $2 }')"
  dpkg-deb -f "$deb" Depends | grep -q '^libc6 (>= 2\.[0-9]*), libgcc-s1 (>= ' ||
    { echo "Depends is not libc6, libgcc-s1 (dpkg-shlibdeps): $(dpkg-deb -f "$deb" Depends)"; exit 1; }
  same "conffiles" "$SETTINGS" "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)"
  same "control files" "conffiles control md5sums postinst* postrm* prerm*" \
    "$(dpkg-deb --ctrl-tarfile "$deb" | tar -tvf - | awk '$1 !~ /^d/ { sub("^./", "", $6); print $6 ($1 ~ /x/ ? "*" : "") }' | sort | xargs)"
  echo "$(dpkg-deb -f "$deb" Depends)"
}

deb_install() {
  [ ! -d /run/systemd/system ] || echo "note: systemd runs here, the scripts' systemctl calls ran"
  dpkg -i "$deb" >/dev/null
  same "status" "install ok installed" "$(dpkg-query -W -f '${Status}' $BIN)"
  out=$(dpkg --verify $BIN) || { echo "dpkg --verify (md5sums): $out"; exit 1; }
  same "installed binary" "$BIN $version" "$(/usr/bin/$BIN --version)"
  for u in $UNITS; do
    grep -q "^ExecStart=/usr/bin/$BIN " "/usr/lib/systemd/system/$u" || { echo "$u does not run /usr/bin/$BIN"; exit 1; }
  done
  # shellcheck disable=SC2086 # one unit a word
  out=$(cd /usr/lib/systemd/system && systemd-analyze verify $UNITS 2>&1)
  [ -z "$out" ] || { echo "systemd-analyze verify: $out"; exit 1; }
  same "man page" /usr/share/man/man1/$BIN.1.gz "$(man -w $BIN)"
}

deb_reinstall_keeps_edited_settings() {
  echo "$EDIT" >>"$SETTINGS"
  dpkg -i "$deb" >/dev/null
  grep -qx "$EDIT" "$SETTINGS" || { echo "the edit to $SETTINGS was lost"; exit 1; }
}

deb_remove_then_purge() {
  # Enabled as an operator would (systemctl works on the files without a
  # running systemd): removal must take the enablement with it.
  systemctl enable kata-trace-forwarder-host.service >/dev/null 2>&1
  wants=/etc/systemd/system/multi-user.target.wants/kata-trace-forwarder-host.service
  [ -L "$wants" ] || { echo "systemctl enable made no $wants"; exit 1; }
  dpkg -r $BIN >/dev/null
  same "status after -r" "deinstall ok config-files" "$(dpkg-query -W -f '${Status}' $BIN)"
  for f in /usr/bin/$BIN /usr/lib/systemd/system/kata-trace-forwarder.service "$wants"; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || { echo "$f is left after dpkg -r"; exit 1; }
  done
  grep -qx "$EDIT" "$SETTINGS" || { echo "dpkg -r did not keep $SETTINGS"; exit 1; }
  # What a --spool-dir under the units' StateDirectory= left.
  mkdir -p /var/lib/kata-trace-forwarder/spool
  dpkg -P $BIN >/dev/null
  [ ! -e "$SETTINGS" ] || { echo "$SETTINGS is left after dpkg -P"; exit 1; }
  [ ! -e /var/lib/kata-trace-forwarder ] || { echo "/var/lib/kata-trace-forwarder is left after dpkg -P"; exit 1; }
  if dpkg-query -W -f '${Status}' $BIN 2>/dev/null | grep -q 'ok'; then
    echo "still known to dpkg: $(dpkg-query -W -f '${Status}' $BIN)"
    exit 1
  fi
}

rpm_contents() {
  same "files (mode, owner, flags, path)" "\
-rw-r--r-- root cn- /etc/default/kata-trace-forwarder
-rwxr-xr-x root - /usr/bin/kata-trace-forwarder
-rw-r--r-- root - /usr/lib/systemd/system/kata-trace-forwarder-host.service
-rw-r--r-- root - /usr/lib/systemd/system/kata-trace-forwarder-hybrid.service
-rw-r--r-- root - /usr/lib/systemd/system/kata-trace-forwarder.service
-rw-r--r-- root - /usr/share/bash-completion/completions/kata-trace-forwarder
-rw-r--r-- root - /usr/share/fish/vendor_completions.d/kata-trace-forwarder.fish
-rw-r--r-- root d- /usr/share/man/man1/kata-trace-forwarder.1.gz
-rw-r--r-- root - /usr/share/zsh/site-functions/_kata-trace-forwarder" \
    "$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEFLAGS:fflags}- %{FILENAMES}\n]' "$rpm" | sort -k4)"
  same "header" "kata-trace-forwarder $version 1 x86_64" \
    "$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}' "$rpm")"
  rpm -qp --requires "$rpm" | grep -q '^libc\.so\.6(GLIBC_' || { echo "no libc.so.6 requirement: $(rpm -qp --requires "$rpm" | xargs)"; exit 1; }
  same "scriptlets" "postinstall preuninstall postuninstall" \
    "$(rpm -qp --scripts "$rpm" | sed -n 's/^\([a-z]*\) scriptlet.*/\1/p' | xargs)"
  echo "requires: $(rpm -qp --requires "$rpm" | sed -n 's/^\([^(]*\)().*/\1/p' | sort -u | xargs)"
}

# A root with nothing but /bin/sh (and its libraries): enough for the
# scriptlets, which rpm runs chrooted there.
rpm_root() {
  r=$tmp/rpmroot
  if [ ! -d "$r" ]; then
    copy_with_libs "$r" /bin/sh
    mkdir -p "$r/tmp" "$r/var/tmp" "$r/dev"
    mknod -m 666 "$r/dev/null" c 1 3
    rpm --root "$r" --initdb
  fi
}

# rpm_in_root ARGS...: rpm on the scratch root; a failed scriptlet, which
# rpm only warns about, fails it.
rpm_in_root() {
  out=$(rpm --root "$r" --force-debian "$@" 2>&1) || { echo "$out"; return 1; }
  [ -z "$out" ] || echo "$out"
  if grep -q 'scriptlet failed' <<<"$out"; then return 1; fi
}

rpm_install_in_a_root() {
  rpm_root
  # --nodeps: the scratch root has no packages; its Requires are checked above.
  rpm_in_root -i --nodeps "$rpm"
  same "query" "$BIN-$version-1.x86_64" "$(rpm --root "$r" -q $BIN)"
  same "installed binary" "$BIN $version" "$("$r/usr/bin/$BIN" --version)"
  out=$(rpm --root "$r" -V --nodeps $BIN) || { echo "rpm -V: $out"; exit 1; }
  grep -q "^ExecStart=/usr/bin/$BIN --kata-host " "$r/usr/lib/systemd/system/kata-trace-forwarder-host.service"
}

rpm_upgrade_keeps_edited_settings_then_erase() {
  rpm_root
  echo "$EDIT" >>"$r$SETTINGS"
  rpm_in_root -U --replacepkgs --nodeps "$rpm"
  grep -qx "$EDIT" "$r$SETTINGS" || { echo "the edit to $SETTINGS was lost"; exit 1; }
  rpm_in_root -e $BIN
  for f in /usr/bin/$BIN /usr/lib/systemd/system/kata-trace-forwarder.service "$SETTINGS"; do
    [ ! -e "$r$f" ] || { echo "$f is left after rpm -e"; exit 1; }
  done
  grep -qx "$EDIT" "$r$SETTINGS.rpmsave" || { echo "rpm -e did not save the edited $SETTINGS"; exit 1; }
}

# The scripts' systemd branches, which a machine without systemd never
# takes: run with /run/systemd/system present (a tmpfs on /run in a mount
# namespace of their own) and a systemctl stub that logs its arguments.
scripts_with_systemd_running() {
  d=$tmp/systemd
  mkdir -p "$d/bin" "$d/deb"
  printf '#!/bin/sh\necho "systemctl $*" >>"$STUB_LOG"\n' >"$d/bin/systemctl"
  chmod +x "$d/bin/systemctl"
  dpkg-deb --ctrl-tarfile "$deb" | tar -xf - -C "$d/deb"
  for t in POSTIN PREUN POSTUN; do rpm -qp --qf "%{$t}" "$rpm" >"$d/rpm-$t"; done
  export STUB_LOG=$d/log
  run() {
    : >"$STUB_LOG"
    unshare -m sh -c 'mount -t tmpfs none /run && mkdir -p /run/systemd/system && exec "$@"' \
      sh env PATH="$d/bin:$PATH" sh "$@"
    cat "$STUB_LOG"
  }
  reload="systemctl --system daemon-reload"
  reload_running="systemctl --system try-reload-or-restart $UNITS"
  stop="systemctl --system stop $UNITS
systemctl --system --no-reload disable $UNITS"
  same "deb postinst, install" "$reload" "$(run "$d/deb/postinst" configure '')"
  same "deb postinst, upgrade" "$reload
$reload_running" "$(run "$d/deb/postinst" configure 0.0.1-1)"
  same "deb prerm, upgrade" "" "$(run "$d/deb/prerm" upgrade 9.9.9-1)"
  same "deb prerm, remove" "$stop" "$(run "$d/deb/prerm" remove)"
  same "deb postrm, remove" "$reload" "$(run "$d/deb/postrm" remove)"
  same "rpm %post, install" "$reload" "$(run "$d/rpm-POSTIN" 1)"
  same "rpm %post, upgrade" "$reload
$reload_running" "$(run "$d/rpm-POSTIN" 2)"
  same "rpm %preun, upgrade" "" "$(run "$d/rpm-PREUN" 1)"
  same "rpm %preun, erase" "$stop" "$(run "$d/rpm-PREUN" 0)"
  same "rpm %postun" "$reload" "$(run "$d/rpm-POSTUN" 0)"
}

image_size() {
  size=$(podman image inspect --format '{{.Size}}' "$image")
  echo "$size bytes ($(du -h "$archive" | cut -f1) archive)"
  [ "$size" -le 15000000 ] || { echo "over 15 MB"; exit 1; }
}

image_contents() {
  ctr=$(podman create "$image")
  got=$(podman export "$ctr" | tar -tf - | grep -v '/$' | sort)
  podman rm "$ctr" >/dev/null
  want=$( (printf '%s\n' usr/bin/$BIN etc/passwd etc/group etc/nsswitch.conf etc/ssl/certs/ca-certificates.crt
    shared_libs "$target_dir/release/$BIN") | sed 's|^/||' | sort)
  same "files in the image" "$want" "$got"
  same "entrypoint and command" '["/usr/bin/kata-trace-forwarder"] ["--kata-host"]' \
    "$(podman image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$image")"
}

image_version() {
  same "podman run $image --version" "$BIN $version" \
    "$(podman run --rm --network none "$image" --version)"
}

export UNITS SETTINGS EDIT target_dir
export -f same shared_libs copy_with_libs rpm_in_root deb_contents deb_install deb_reinstall_keeps_edited_settings \
  deb_remove_then_purge rpm_contents rpm_root rpm_install_in_a_root \
  rpm_upgrade_keeps_edited_settings_then_erase scripts_with_systemd_running image_size image_contents image_version

section "deb"
check "deb: files, control (Depends from dpkg-shlibdeps), md5sums, conffiles, scripts" deb_contents
check "deb: dpkg -i without a running systemd; binary, units, man page" deb_install
check "deb: reinstall keeps the edited $SETTINGS" deb_reinstall_keeps_edited_settings
check "deb: dpkg -r disables the units, keeps the settings; dpkg -P removes them and the state" deb_remove_then_purge
section "rpm"
check "rpm: files, flags, header, requires, scriptlets" rpm_contents
check "rpm: install into a scratch root, its scriptlets run" rpm_install_in_a_root
check "rpm: upgrade keeps the edited settings; erase saves them (.rpmsave)" rpm_upgrade_keeps_edited_settings_then_erase
check "deb and rpm scripts where systemd runs: upgrade reloads, removal stops and disables" scripts_with_systemd_running
section "image"
check "image: size" image_size
check "image: the binary, its shared libraries and /etc, nothing else" image_contents
check "image: podman run --version" image_version

# tests/packages.rs: each of its tests counts.
section "image: tests/packages.rs (podman, agents and collector on the host)"
log="$tmp/cargo-test.log"
rc=0
KTF_IMAGE="$image" RUST_BACKTRACE=0 cargo test --quiet --test packages -- --ignored --nocapture --test-threads 1 >"$log" 2>&1 || rc=$?
sed 's/^/      /' "$log"
read -r p f < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
  END { print p + 0, f + 0 }' "$log")
[ "$rc" = 0 ] || [ "$f" -gt 0 ] || f=1
passed=$((passed + p)) failed=$((failed + f))

section "daemonset: deploy/kubernetes/check (go test)"
ensure_go "the DaemonSet check" "Install Go 1.26 or newer, with the Go module proxy."
rc=0
(cd deploy/kubernetes/check && go test -count=1 -v ./...) >"$log" 2>&1 || rc=$?
grep -E -e '^(--- |FAIL|ok|PASS)' -e '_test\.go:' "$log" | sed 's/^/      /'
p=$(grep -c '^--- PASS' "$log" || true)
f=$(grep -c '^--- FAIL' "$log" || true)
[ "$rc" = 0 ] || [ "$f" -gt 0 ] || { f=1; sed 's/^/      /' "$log"; }
passed=$((passed + p)) failed=$((failed + f))

echo "   (all: $(($(date +%s) - start)) s)"
echo "packages: $passed passed, $failed failed"
[ "$failed" = 0 ]
