#!/usr/bin/env bash
# Release artifacts, all with the same stripped release binary:
#   deb    a Debian package (dpkg-deb; dist/deb/)
#   rpm    an RPM package (rpmbuild; dist/rpm/kata-trace-forwarder.spec)
#   image  an OCI image FROM scratch: the binary, exactly the shared
#          libraries it loads, /etc/passwd with nobody (it drops to it),
#          and the CA roots (an https collector); saved as an OCI archive
#          (`podman load -i FILE`) and built with buildah, no registry.
#
#   scripts/package.sh [deb] [rpm] [image]     # none: all three
#
# Writes them to ${CARGO_TARGET_DIR:-target}/packages/ and prints their
# paths. Reuses the release build when it is fresh (scripts/test.sh makes
# it). dpkg-deb, rpmbuild and buildah are Debian's own (installed when
# missing): no tool to build. (cargo-deb and cargo-generate-rpm took 1.5 and
# 5 CPU-minutes to build here, past the budget of the whole packaging test.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. scripts/lib-packages.sh
ensure_rust

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(deb rpm image)
for w in "${want[@]}"; do
  case "$w" in deb | rpm | image) ;; *)
    echo "usage: scripts/package.sh [deb] [rpm] [image]" >&2
    exit 2
    ;;
  esac
done

BIN=kata-trace-forwarder
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$(pwd)/$target_dir" ;; esac
out="$target_dir/packages"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg="$work/stage"

echo "== release build (a no-op when fresh)" >&2
cargo build --release --locked --quiet --bin "$BIN"
version=$("$target_dir/release/$BIN" --version | awk '{ print $2 }')

echo "== staging the binary, docs and units" >&2
rm -rf "$pkg"
mkdir -p "$pkg/units"
# The release profile keeps line tables (debug = 1) for profiling; the
# packages do not ship them.
strip --strip-unneeded --remove-section=.comment -o "$pkg/$BIN" "$target_dir/release/$BIN"
cargo run --quiet -p xtask -- docs "$pkg" >/dev/null
gzip -9n "$pkg/man/$BIN.1"
cargo run --quiet -p xtask -- units /usr/bin "$pkg/units" >/dev/null
cp dist/$BIN.default "$pkg/"

for w in "${want[@]}"; do
  case "$w" in
  deb)
    ensure_apt dpkg-shlibdeps dpkg-dev
    echo "== deb" >&2
    # What make install installs, for /usr, in Debian's places.
    root="$work/deb"
    install -D -m 0755 "$pkg/$BIN" "$root/usr/bin/$BIN"
    install -D -m 0644 "$pkg/man/$BIN.1.gz" "$root/usr/share/man/man1/$BIN.1.gz"
    install -D -m 0644 "$pkg/completions/$BIN.bash" "$root/usr/share/bash-completion/completions/$BIN"
    install -D -m 0644 "$pkg/completions/_$BIN" "$root/usr/share/zsh/vendor-completions/_$BIN"
    install -D -m 0644 "$pkg/completions/$BIN.fish" "$root/usr/share/fish/vendor_completions.d/$BIN.fish"
    install -D -m 0644 -t "$root/usr/lib/systemd/system" "$pkg"/units/*.service
    install -D -m 0644 "$pkg/$BIN.default" "$root/etc/default/$BIN"
    install -D -m 0644 dist/deb/copyright "$root/usr/share/doc/$BIN/copyright"
    install -d "$root/DEBIAN"
    install -m 0755 dist/deb/postinst dist/deb/prerm dist/deb/postrm "$root/DEBIAN/"
    echo "/etc/default/$BIN" >"$root/DEBIAN/conffiles"
    (cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    # dpkg-shlibdeps wants a source package's debian/control beside it.
    mkdir -p "$work/shlibdeps/debian" && touch "$work/shlibdeps/debian/control"
    depends=$(cd "$work/shlibdeps" && dpkg-shlibdeps -O "$root/usr/bin/$BIN" | sed -n 's/^shlibs:Depends=//p')
    arch=$(dpkg --print-architecture)
    sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" \
      -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" dist/deb/control.in >"$root/DEBIAN/control"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$out/${BIN}_${version}-1_$arch.deb" >/dev/null
    ls "$out/${BIN}_${version}-1_$arch.deb"
    ;;
  rpm)
    ensure_apt rpmbuild rpm
    echo "== rpm" >&2
    rpmbuild -bb --quiet --define "_topdir $work/rpmbuild" --define "_sourcedir $pkg" \
      --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
      --define "ktf_version $version" dist/rpm/$BIN.spec >/dev/null
    ls "$out/$BIN-$version-1."*.rpm
    ;;
  image)
    ensure_apt buildah buildah
    echo "== image" >&2
    containers_env "$work/containers"
    root="$work/rootfs"
    install -D -m 0755 "$pkg/$BIN" "$root/usr/bin/$BIN"
    # shellcheck disable=SC2046 # one path a word
    copy_with_libs "$root" $(shared_libs "$pkg/$BIN")
    mkdir -p "$root/etc/ssl/certs"
    printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    # Only files: no NSS modules to load in an image.
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$root" / >/dev/null
    buildah config \
      --entrypoint "[\"/usr/bin/$BIN\"]" --cmd --kata-host \
      --label org.opencontainers.image.title="$BIN" \
      --label org.opencontainers.image.version="$version" \
      --label org.opencontainers.image.licenses=Apache-2.0 \
      "$ctr"
    archive="$out/$BIN-$version.oci.tar"
    rm -f "$archive"
    buildah commit --quiet --rm "$ctr" "oci-archive:$archive:$BIN:$version" >/dev/null
    ls "$archive"
    ;;
  esac
done
