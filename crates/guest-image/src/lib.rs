//! `guest-image initramfs GUEST_ROOT AGENT OUT`: the guest of the VM tests
//! (tests/vm.rs), written as a newc cpio archive the kernel unpacks as its
//! root: busybox, an init that loads the VSOCK modules and runs the agent,
//! the agent emitter with exactly the shared libraries `ldd` names (there is
//! no musl target here to build a static one), and the kernel modules the
//! virtio VSOCK transport needs, in dependency order (read from each
//! module's own `depends=`). GUEST_ROOT holds Debian's linux-image and
//! busybox-static packages unpacked (scripts/setup-vm.sh).
//!
//! `guest-image vmlinux BZIMAGE OUT`: the kernel's ELF image out of its
//! bzImage, which QEMU boots directly (PVH): under TCG, decompressing the
//! bzImage takes a guest 6 of its 8 seconds.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules the guest loads; their dependencies come along.
/// `vsock_loopback` carries connections to CID 1 (`VMADDR_CID_LOCAL`)
/// inside the guest: the `vsock-local` scenario's only transport.
const MODULES: [&str; 3] = ["vmw_vsock_virtio_transport", "virtio_pci", "vsock_loopback"];

/// Where the agent writes its manifest: the second serial port, which
/// carries nothing else (the kernel's console is the first).
const INIT: &str = r#"#!/bin/busybox sh
# The VM tests' guest init (written by `xtask initramfs`). Arguments after
# `--` on the kernel command line are the agent's; `probe` only checks that
# the guest boots and has VSOCK. `vsock-local [cut] [upgrade] FORMAT...`:
# the forwarder (an initramfs with /bin/kata-trace-forwarder) listens on
# AF_VSOCK as on a host, one agent per FORMAT connects to it at CID 1
# through vsock_loopback, all at once. `cut`: one more, killed in the
# middle of a frame after 120 whole ones. `upgrade`: the agents stream
# (12 traces each, 20 frames a second) and the forwarder is upgraded by
# SIGHUP once each has sent 10 spans. Then the manifests, the forwarder's
# dump and its log go out on the second serial port, one after the other.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in $($bb cat /modules/order); do
  $bb insmod /modules/$m.ko || echo "ktf-init: insmod $m failed"
done
# until_seen N TEXT: waits (60 s at most) until N lines of the forwarder's
# log have TEXT.
until_seen() {
  t=0
  until [ "$($bb grep -c "$2" /forwarder.log)" -ge "$1" ] || [ $t -ge 600 ]; do
    $bb sleep 0.1; t=$((t + 1))
  done
}
# Spans the agents (not the victim) have written whole so far.
spans_sent() { $bb cat /manifest.[1-9]* | $bb grep -c '^KTF {"span"'; }
# Whether every agent has written N spans whole.
each_sent() {
  for m in /manifest.[1-9]*; do
    [ "$($bb grep -c '^KTF {"span"' $m)" -ge "$1" ] || return 1
  done
}
if [ "$1" = probe ]; then
  [ -c /dev/vsock ] && echo "ktf-init: probe ok" || echo "ktf-init: probe: no /dev/vsock"
elif [ "$1" = vsock-local ]; then
  shift
  # Made before the forwarder's shell opens it: until_seen reads it at once.
  : >/forwarder.log
  /bin/kata-trace-forwarder --dump-only --dump-format otlp-json >/dump 2>/forwarder.log &
  fwd=$!
  until_seen 1 "forwarder ready"
  # The victim's manifest is /manifest.0, the agents' /manifest.1 on: it
  # is first on the port, and the last line there is an agent's Done.
  agents= n=0 victim= upgrade= traces=2 rate=
  for f in "$@"; do
    case $f in
      cut)
        : >/manifest.0
        /bin/kata-agent-emitter --vsock 1:10240 --manifest /manifest.0 --format json \
          --bulk 400 --rate 100 --cut-after 120 &
        victim=$! ;;
      upgrade) upgrade=1 traces=12 rate="--rate 20" ;;
      *)
        n=$((n + 1))
        : >/manifest.$n
        /bin/kata-agent-emitter --vsock 1:10240 --manifest /manifest.$n --format $f \
          --traces $traces $rate &
        agents="$agents $!" ;;
    esac
  done
  if [ -n "$victim" ]; then
    t=0
    until $bb grep -q '"cut"' /manifest.0 || [ $t -ge 1200 ]; do
      $bb sleep 0.1; t=$((t + 1))
    done
    $bb sleep 1
    $bb kill -KILL $victim
    wait $victim
    # The forwarder has read the cut frame's end before it is told to
    # stop: what is checked is a running forwarder's count, not whether
    # the end beats SIGTERM's drain (200 ms of quiet) on a busy guest.
    until_seen 1 "stream ended inside a frame"
  fi
  if [ -n "$upgrade" ]; then
    # Every agent connected and streaming: the hand-over takes them all.
    t=0
    until each_sent 10 || [ $t -ge 600 ]; do
      $bb sleep 0.1; t=$((t + 1))
    done
    before=$(spans_sent)
    $bb kill -HUP $fwd
    # The old process, its bridge, the new binary under the old pid.
    until_seen 3 "forwarder ready"
    echo "ktf-init: upgrade: spans sent before $before, when done $(spans_sent)" >/upgrade
  fi
  for a in $agents; do wait $a; done
  # Likewise every agent's end is read before SIGTERM.
  until_seen $n "agent disconnected"
  $bb kill -TERM $fwd; wait $fwd
  echo "ktf-init: forwarder exit $?"
  $bb cat /manifest.* /dump /forwarder.log /upgrade >/dev/ttyS1 2>/dev/null
else
  echo "ktf-init: agent $*"
  /bin/kata-agent-emitter --vsock 2:10240 --manifest /dev/ttyS1 "$@"
  echo "ktf-init: agent exit $?"
fi
$bb poweroff -f
"#;

/// Writes the initramfs for the guest whose Debian packages are unpacked in
/// `guest_root` (linux-image-*, busybox-static), with each `(name, exe)` of
/// `bins` as /bin/NAME: the agent, and for the `vsock-local` scenario the
/// forwarder (in an archive the kernel unpacks after the agent's, over it).
pub fn initramfs(guest_root: &Path, bins: &[(&str, &Path)], out: &Path) -> io::Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens it for init's stdio before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read(guest_root.join("bin/busybox"))?,
    );
    for (name, exe) in bins {
        cpio.file(&format!("bin/{name}"), 0o755, &fs::read(exe)?);
        for lib in shared_libraries(exe)? {
            let inside = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
            let mut dir = PathBuf::new();
            for part in inside.parent().into_iter().flat_map(Path::components) {
                dir.push(part);
                cpio.dir(&dir.to_string_lossy());
            }
            cpio.file(&inside.to_string_lossy(), 0o755, &fs::read(&lib)?);
        }
    }
    let modules = kernel_modules(guest_root)?;
    let mut order = String::new();
    for (name, path) in &modules {
        cpio.file(&format!("modules/{name}.ko"), 0o644, &fs::read(path)?);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    // Written aside and renamed: a test never boots half an archive.
    let tmp = out.with_extension("tmp");
    fs::File::create(&tmp)?.write_all(&cpio.finish())?;
    fs::rename(&tmp, out)
}

/// Writes the ELF kernel a bzImage carries: its payload (x86 boot protocol
/// 2.08+: `payload_offset` and `payload_length` in the setup header, from
/// the protected-mode code that follows the `setup_sects` sectors),
/// decompressed by the tool its magic names.
pub fn vmlinux(bzimage: &Path, out: &Path) -> io::Result<()> {
    let image = fs::read(bzimage)?;
    let payload = bzimage_payload(&image)?;
    let tool = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ["xz", "-dc", "--single-stream"].as_slice(),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => return Err(io::Error::other("unknown bzImage payload compression")),
    };
    let tmp = out.with_extension("tmp");
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(fs::File::create(&tmp)?)
        .spawn()
        .map_err(|e| io::Error::other(format!("{}: {e}", tool[0])))?;
    // The tool writes to a file, never to a pipe of ours: feeding it all
    // first cannot deadlock.
    let fed = child.stdin.take().map(|mut i| i.write_all(payload));
    let status = child.wait()?;
    if !status.success() || !matches!(fed, Some(Ok(()))) {
        return Err(io::Error::other(format!("{} failed: {status}", tool[0])));
    }
    let elf = fs::read(&tmp)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(io::Error::other(
            "the bzImage's payload is not an ELF kernel",
        ));
    }
    fs::rename(&tmp, out)
}

fn bzimage_payload(image: &[u8]) -> io::Result<&[u8]> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let bad = || io::Error::other("not a bzImage with a payload (boot protocol 2.08 or newer)");
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad());
    }
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => n as usize,
        None => return Err(bad()),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248).ok_or_else(bad)?;
    let len = u32_at(0x24c).ok_or_else(bad)?;
    image.get(start..start + len).ok_or_else(bad)
}

/// The libraries `ldd` names for `exe`, the loader included (not the vDSO).
fn shared_libraries(exe: &Path) -> io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ldd {}: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// [`MODULES`] and everything they depend on, each after its dependencies:
/// (name, file) in load order.
fn kernel_modules(guest_root: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut found = BTreeMap::new();
    for version in fs::read_dir(guest_root.join("lib/modules"))? {
        index_modules(&version?.path().join("kernel"), &mut found)?;
    }
    let mut order = Vec::new();
    for m in MODULES {
        visit(m, &found, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

fn index_modules(dir: &Path, found: &mut BTreeMap<String, PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&path, found)?;
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".ko") {
            found.insert(stem.replace('-', "_"), path);
        } else if name.contains(".ko.") {
            // Debian 12's kernels ship them plain; a compressed one would
            // need decompressing here, which busybox insmod cannot do.
            found
                .entry(name[..name.find(".ko.").unwrap_or(0)].replace('-', "_"))
                .or_insert(path);
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    found: &BTreeMap<String, PathBuf>,
    order: &mut Vec<(String, PathBuf)>,
    stack: &mut Vec<String>,
) -> io::Result<()> {
    if order.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    if stack.iter().any(|n| n == name) {
        return Err(io::Error::other(format!(
            "kernel modules depend on each other in a cycle: {stack:?}"
        )));
    }
    let path = found
        .get(name)
        .ok_or_else(|| io::Error::other(format!("kernel module {name} not found")))?;
    if path.extension().is_none_or(|e| e != "ko") {
        return Err(io::Error::other(format!(
            "{} is compressed; only plain .ko modules are supported",
            path.display()
        )));
    }
    let bytes = fs::read(path)?;
    stack.push(name.to_string());
    for dep in module_depends(&bytes) {
        visit(&dep, found, order, stack)?;
    }
    stack.pop();
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A newc ("070701") cpio archive, in memory, as the kernel's initramfs
/// unpacker reads it: each entry a header of thirteen 8-digit hex fields,
/// the name NUL-terminated, name and data each padded to 4 bytes.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: Vec<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn dir(&mut self, name: &str) {
        if !self.dirs.iter().any(|d| d == name) {
            self.dirs.push(name.to_string());
            self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: the same archive for the same inputs
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_laid_out_as_the_kernel_reads_them() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.dir("bin");
        c.file("bin/x", 0o755, b"hello");
        c.char_device("dev/console", 5, 1);
        let a = c.finish();
        assert_eq!(a.len() % 4, 0);
        // Header (110) + "bin\0" (4, padded to 116).
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[110..114], b"bin\0");
        let file = 116;
        assert_eq!(&a[file..file + 6], b"070701");
        let field = |at: usize, i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&a[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(file, 1), S_IFREG | 0o755);
        assert_eq!(field(file, 6), 5, "file size");
        assert_eq!(field(file, 11), 6, "name size with its NUL");
        // Name "bin/x\0" ends at 116+110+6 = 232 (a multiple of 4), then data.
        assert_eq!(&a[232..237], b"hello");
        let dev = 240;
        assert_eq!(field(dev, 1), S_IFCHR | 0o600);
        assert_eq!((field(dev, 9), field(dev, 10)), (5, 1));
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn ldd_output_names_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_payload_is_found_by_the_setup_header() {
        let mut image = vec![0u8; 4096];
        image[0x1f1] = 2;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        image[3 * 512 + 100..3 * 512 + 106].copy_from_slice(b"\xfd7zXZ\0");
        assert_eq!(bzimage_payload(&image).unwrap(), b"\xfd7zXZ\0");
        image[0x24c..0x250].copy_from_slice(&9999u32.to_le_bytes());
        assert!(bzimage_payload(&image).is_err());
        assert!(bzimage_payload(b"MZ").is_err());
    }

    #[test]
    fn depends_come_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), ["virtio", "virtio_ring"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }
}
