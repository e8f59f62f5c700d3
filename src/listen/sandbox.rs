//! Which sandbox a connection comes from, as resource attributes: from the
//! path for template and hybrid connections (`kata.sandbox.id`); for VSOCK,
//! `kata.vsock.cid`, and the sandbox id when found: Kata starts QEMU with
//! `-name sandbox-<ID>` and `guest-cid=<CID>`. Any process can claim any
//! command line: of several claimants only a lone root one is believed. The
//! `/proc` scan is bounded and cached per CID (a hit re-checked, as CIDs
//! are reused). Over 500 lines only with its tests.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::otlp::Origin;
use crate::tenant::Tenant;

pub(crate) use crate::otlp::{SANDBOX_ID, VSOCK_CID};

pub(crate) const PROC_ROOT: &str = "/proc";

const NAME_PREFIX: &str = "sandbox-";
const MAX_PROCESSES: usize = 1 << 16;
/// Most bytes of one command line read (Kata's QEMU's are a few KiB).
const MAX_CMDLINE: u64 = 256 << 10;
const MAX_CACHED: usize = 1024;
/// An unclaimed CID is not looked up again this long: a burst costs one scan.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const MAX_ID_LEN: usize = 256;

pub(crate) fn sandbox_origin(base: &Origin, sandbox_id: &str) -> Origin {
    base.clone()
        .with(SANDBOX_ID, Value::StringValue(sandbox_id.to_owned()))
}

/// Its CID, and its sandbox when `resolver` finds it (naming `tenant` too).
pub(crate) async fn vsock_origin(
    base: &Origin,
    cid: u32,
    resolver: Option<&Arc<CidResolver>>,
    tenant: &Tenant,
) -> Origin {
    let mut origin = base
        .clone()
        .with(VSOCK_CID, Value::IntValue(i64::from(cid)));
    if let Some(r) = resolver {
        if let Some(id) = r.resolve(cid).await {
            let _ = tenant.sandbox_id.set(id.clone());
            origin = origin.with(SANDBOX_ID, Value::StringValue(id));
        }
    }
    origin
}

/// The sandbox id in a hybrid listener's path laid out as Kata does:
/// `<dir>/<ID>/clh.sock_<port>` (Cloud Hypervisor, Go runtime) or
/// `<dir>/<ID>/root/kata.hvsock_<port>` (Firecracker, runtime-rs).
pub(crate) fn hybrid_sandbox_id(listen_path: &Path) -> Option<String> {
    let name = listen_path.file_name()?.to_str()?;
    let (socket, port) = name.rsplit_once('_')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let dir = listen_path.parent()?;
    let sandbox_dir = match socket {
        "clh.sock" => dir,
        "kata.hvsock" if dir.file_name()? == "root" => dir.parent()?,
        _ => return None,
    };
    let id = sandbox_dir.file_name()?.to_str()?;
    valid_id(id).then(|| id.to_owned())
}

/// What Kata accepts as a sandbox id, bounded: no separators, no controls.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QemuVm {
    pub cid: u32,
    pub sandbox_id: String,
}

/// Reads a NUL-separated command line the way Kata writes QEMU's: `-name
/// [guest=]sandbox-<ID>[,opts]` and `-device vhost-vsock-*,...,guest-cid=N`.
pub(crate) fn parse_cmdline(cmdline: &[u8]) -> Option<QemuVm> {
    let mut args = cmdline
        .split(|&b| b == 0)
        .map(|a| std::str::from_utf8(a).ok());
    let mut cid = None;
    let mut sandbox_id = None;
    while let Some(arg) = args.next() {
        match arg {
            Some("-name" | "--name") => {
                if let Some(Some(v)) = args.next() {
                    sandbox_id = name_sandbox_id(v).or(sandbox_id);
                }
            }
            Some("-device" | "--device") => {
                if let Some(Some(v)) = args.next() {
                    cid = vsock_device_cid(v).or(cid);
                }
            }
            _ => {}
        }
    }
    Some(QemuVm {
        cid: cid?,
        sandbox_id: sandbox_id?,
    })
}

/// `sandbox-<ID>[,debug-threads=on]` or `guest=sandbox-<ID>,...`.
fn name_sandbox_id(value: &str) -> Option<String> {
    let mut opts = value.split(',').enumerate();
    let guest = opts.find_map(|(i, opt)| match opt.strip_prefix("guest=") {
        Some(g) => Some(g),
        None if i == 0 && !opt.contains('=') => Some(opt),
        None => None,
    })?;
    let id = guest.strip_prefix(NAME_PREFIX)?;
    valid_id(id).then(|| id.to_owned())
}

/// `vhost-vsock-pci,id=vsock-...,guest-cid=3,...` (also `-ccw`, `-device`).
fn vsock_device_cid(value: &str) -> Option<u32> {
    let mut opts = value.split(',');
    let driver = opts.next()?;
    let driver = driver.strip_prefix("driver=").unwrap_or(driver);
    if !driver.starts_with("vhost-vsock") {
        return None;
    }
    opts.find_map(|o| o.strip_prefix("guest-cid="))?
        .parse()
        .ok()
}

/// A CID's process and sandbox, or until when none is looked for again.
enum Cached {
    Found(u32, String),
    Missing(Instant),
}

/// Finds a guest CID's sandbox through a `/proc`.
pub(crate) struct CidResolver {
    proc_root: PathBuf,
    cache: Mutex<HashMap<u32, Cached>>,
}

impl CidResolver {
    pub(crate) fn new(proc_root: impl Into<PathBuf>) -> CidResolver {
        CidResolver {
            proc_root: proc_root.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The sandbox id of the VM with `cid`, off the async threads.
    pub(crate) async fn resolve(self: &Arc<Self>, cid: u32) -> Option<String> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.resolve_blocking(cid))
            .await
            .ok()
            .flatten()
    }

    pub(crate) fn resolve_blocking(&self, cid: u32) -> Option<String> {
        let now = Instant::now();
        match self.lock().get(&cid) {
            Some(Cached::Found(pid, sandbox_id)) => {
                // The pid may have gone, or its CID been given to a new VM.
                let same = self
                    .read_vm(*pid)
                    .is_some_and(|vm| vm.cid == cid && vm.sandbox_id == *sandbox_id);
                if same {
                    return Some(sandbox_id.clone());
                }
            }
            Some(Cached::Missing(until)) if now < *until => return None,
            _ => {}
        }
        let found = self.scan(cid);
        let entry = match &found {
            Some((pid, id)) => Cached::Found(*pid, id.clone()),
            None => Cached::Missing(now + NEGATIVE_TTL),
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED && !cache.contains_key(&cid) {
            cache.retain(|_, c| !matches!(c, Cached::Missing(until) if *until <= now));
            if cache.len() >= MAX_CACHED {
                // Full of live ones: start over (a miss costs one scan).
                cache.clear();
            }
        }
        cache.insert(cid, entry);
        match &found {
            Some((pid, id)) => {
                tracing::debug!(cid, pid, sandbox = %id, "resolved VSOCK CID to sandbox")
            }
            None => tracing::debug!(cid, "no QEMU process found for VSOCK CID"),
        }
        found.map(|(_, id)| id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Cached>> {
        // Consistent after every statement: a panic leaves nothing half-done.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_vm(&self, pid: u32) -> Option<QemuVm> {
        let mut buf = Vec::new();
        File::open(self.proc_root.join(pid.to_string()).join("cmdline"))
            .ok()?
            .take(MAX_CMDLINE)
            .read_to_end(&mut buf)
            .ok()?;
        parse_cmdline(&buf)
    }

    /// One answer only if the claims agree, or exactly one claimant is root's.
    fn scan(&self, cid: u32) -> Option<(u32, String)> {
        let dir = std::fs::read_dir(&self.proc_root).ok()?;
        let mut claims: Vec<(u32, String)> = Vec::new();
        for entry in dir.take(MAX_PROCESSES).flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(vm) = self.read_vm(pid) {
                if vm.cid == cid && claims.len() < 16 {
                    claims.push((pid, vm.sandbox_id));
                }
            }
        }
        let first = claims.first()?.clone();
        if claims.iter().all(|(_, id)| *id == first.1) {
            return Some(first);
        }
        let by_root: Vec<_> = claims
            .into_iter()
            .filter(|(pid, _)| {
                let proc = std::fs::metadata(self.proc_root.join(pid.to_string()));
                proc.is_ok_and(|m| m.uid() == 0)
            })
            .collect();
        match by_root.as_slice() {
            [one] => Some(one.clone()),
            _ => {
                tracing::debug!(
                    cid,
                    "several processes claim this VSOCK CID; not naming a sandbox"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut v = args.join("\0").into_bytes();
        v.push(0);
        v
    }

    /// A command line shaped like the one Kata's runtime gives QEMU.
    fn kata_qemu(id: &str, cid: u32) -> Vec<u8> {
        cmdline(&[
            "/opt/kata/bin/qemu-system-x86_64",
            "-name",
            &format!("sandbox-{id},debug-threads=on"),
            "-uuid",
            "0a2b1c3d-0000-4000-8000-000000000000",
            "-machine",
            "q35,accel=kvm",
            "-device",
            "virtio-serial-pci,disable-modern=false,id=serial0",
            "-device",
            &format!(
                "vhost-vsock-pci,disable-modern=false,vhostfd=3,id=vsock-{cid},guest-cid={cid}"
            ),
            "-daemonize",
        ])
    }

    #[test]
    fn parses_kata_qemu_command_lines() {
        let id = "5f3c0d9a6e1b4a0c8d7e2f1a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e";
        assert_eq!(
            parse_cmdline(&kata_qemu(id, 3)),
            Some(QemuVm {
                cid: 3,
                sandbox_id: id.into()
            })
        );
        let plain = cmdline(&[
            "qemu",
            "-name",
            "guest=sandbox-foo,debug-threads=on",
            "-device",
            "vhost-vsock-ccw,guest-cid=4294967294",
        ]);
        assert_eq!(
            parse_cmdline(&plain),
            Some(QemuVm {
                cid: 4294967294,
                sandbox_id: "foo".into()
            })
        );
        for bad in [
            cmdline(&["qemu", "-name", "sandbox-foo"]),
            cmdline(&["qemu", "-device", "vhost-vsock-pci,guest-cid=3"]),
            cmdline(&[
                "qemu",
                "-name",
                "vm-foo",
                "-device",
                "vhost-vsock-pci,guest-cid=3",
            ]),
            cmdline(&[
                "qemu",
                "-name",
                "sandbox-",
                "-device",
                "vhost-vsock-pci,guest-cid=3",
            ]),
            cmdline(&[
                "qemu",
                "-name",
                "sandbox-a/b",
                "-device",
                "vhost-vsock-pci,guest-cid=3",
            ]),
            cmdline(&[
                "qemu",
                "-name",
                "sandbox-a",
                "-device",
                "virtio-net-pci,guest-cid=3",
            ]),
            cmdline(&[
                "qemu",
                "-name",
                "sandbox-a",
                "-device",
                "vhost-vsock-pci,guest-cid=x",
            ]),
            cmdline(&["qemu", "-name", "sandbox-a", "-device"]),
            b"\xff\xfe-name\0sandbox-a".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(
                parse_cmdline(&bad),
                None,
                "{:?}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    fn fake_proc(procs: &[(u32, Vec<u8>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, cmd) in procs {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("cmdline"), cmd).unwrap();
        }
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("uptime"), "1 1").unwrap();
        dir
    }

    #[test]
    fn resolves_through_an_injected_proc_and_caches() {
        let proc = fake_proc(&[
            (100, cmdline(&["bash"])),
            (200, kata_qemu("alpha", 3)),
            (300, kata_qemu("beta", 4)),
        ]);
        let r = CidResolver::new(proc.path());
        assert_eq!(r.resolve_blocking(3).as_deref(), Some("alpha"));
        assert_eq!(r.resolve_blocking(4).as_deref(), Some("beta"));
        assert_eq!(r.resolve_blocking(5), None);

        // The VM with CID 3 is gone and a new one got its CID: the cached
        // answer is re-checked, not trusted.
        std::fs::write(proc.path().join("200/cmdline"), b"").unwrap();
        std::fs::create_dir(proc.path().join("400")).unwrap();
        std::fs::write(proc.path().join("400/cmdline"), kata_qemu("gamma", 3)).unwrap();
        assert_eq!(r.resolve_blocking(3).as_deref(), Some("gamma"));

        // A miss is remembered for a moment: a VM that just started is
        // found once that has passed.
        std::fs::create_dir(proc.path().join("500")).unwrap();
        std::fs::write(proc.path().join("500/cmdline"), kata_qemu("delta", 5)).unwrap();
        assert_eq!(r.resolve_blocking(5), None);
        r.lock().clear();
        assert_eq!(r.resolve_blocking(5).as_deref(), Some("delta"));
    }

    #[test]
    fn conflicting_claims_name_no_sandbox_unless_one_is_roots() {
        let proc = fake_proc(&[(10, kata_qemu("real", 7)), (11, kata_qemu("fake", 7))]);
        let r = CidResolver::new(proc.path());
        // Both claimants have the test's owner: either both are root's or
        // neither is, and in both cases neither is believed.
        assert_eq!(r.resolve_blocking(7), None);
        // Agreeing claims (QEMU and, say, a wrapper with the same args) do.
        let proc = fake_proc(&[(10, kata_qemu("same", 8)), (11, kata_qemu("same", 8))]);
        let r = CidResolver::new(proc.path());
        assert_eq!(r.resolve_blocking(8).as_deref(), Some("same"));
    }

    #[test]
    fn cache_stays_bounded() {
        let proc = fake_proc(&[]);
        let r = CidResolver::new(proc.path());
        for cid in 0..(MAX_CACHED as u32 * 3) {
            assert_eq!(r.resolve_blocking(cid), None);
            assert!(r.lock().len() <= MAX_CACHED);
        }
    }

    /// The real `/proc`: a live process whose command line has Kata's QEMU
    /// shape (a shell that sleeps, given QEMU's arguments) is found.
    #[test]
    fn resolves_a_live_process_in_the_real_proc() {
        let cid = 3_000_000_000 + std::process::id() % 1_000_000;
        let id = format!("live-{}", std::process::id());
        let mut child = std::process::Command::new("/bin/sh")
            // Not `exec`ed away: a shell runs a last command in its place.
            .args(["-c", "sleep 30; exit 0", "qemu-system-x86_64", "-name"])
            .arg(format!("sandbox-{id},debug-threads=on"))
            .arg("-device")
            .arg(format!(
                "vhost-vsock-pci,id=vsock-1,guest-cid={cid},vhostfd=3"
            ))
            .spawn()
            .unwrap();
        // Spawning returns once the exec has begun; the new command line is
        // in place a moment later.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.windows(5).any(|w| w == b"-name")) {
            assert!(
                Instant::now() < deadline,
                "the child never showed its arguments"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = Arc::new(CidResolver::new(PROC_ROOT));
        let got = r.resolve_blocking(cid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got.as_deref(), Some(id.as_str()));
    }

    /// A host with one Kata QEMU, sandbox `id` at CID `cid`; the origin
    /// of a connection from `cid`, and its tenant.
    async fn one_qemu(
        id: &str,
        cid: u32,
    ) -> (tempfile::TempDir, Arc<CidResolver>, Origin, Arc<Tenant>) {
        let proc = fake_proc(&[(42, kata_qemu(id, cid))]);
        let r = Arc::new(CidResolver::new(proc.path()));
        let base = Origin {
            service_name: "kata-agent".into(),
            extra: Vec::new(),
        };
        let limits = crate::config::TenantLimits::default();
        let tenant = Tenant::standalone(crate::tenant::TenantKey::Cid(cid), &limits);
        let o = vsock_origin(&base, cid, Some(&r), &tenant).await;
        (proc, r, o, tenant)
    }

    #[tokio::test]
    async fn vsock_origin_has_an_int_cid_and_the_sandbox() {
        let (_proc, r, o, tenant) = one_qemu("sb", 9).await;
        assert_eq!(tenant.label(), "sb", "the tenant is named by its sandbox");
        let get = |k: &str| {
            o.extra
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(get(VSOCK_CID), Some(Value::IntValue(9)));
        assert_eq!(get(SANDBOX_ID), Some(Value::StringValue("sb".into())));
        let limits = crate::config::TenantLimits::default();
        let other = Tenant::standalone(crate::tenant::TenantKey::Cid(10), &limits);
        let base = Origin {
            service_name: "kata-agent".into(),
            extra: Vec::new(),
        };
        let o = vsock_origin(&base, 10, Some(&r), &other).await;
        assert_eq!(o.extra.len(), 1, "unresolved: the CID only");
        assert_eq!(other.label(), "vsock:10");
    }

    /// A guest on VSOCK claiming another sandbox's id and CID: the spans
    /// carry the host's (its CID, its QEMU's sandbox), the claims apart.
    #[tokio::test]
    async fn a_vsock_guest_cannot_claim_another_identity() {
        let (_proc, _r, origin, _tenant) = one_qemu("attacker", 9).await;
        let payload = r#"{"span_context":{"trace_id":1,"span_id":1,"trace_flags":1,"is_remote":false,"trace_state":null},"parent_span_id":0,"span_kind":"Internal","name":"n","start_time":{"secs_since_epoch":1,"nanos_since_epoch":2},"end_time":{"secs_since_epoch":1,"nanos_since_epoch":3},"attributes":{"map":{},"evict_list":[],"max_len":128,"dropped_count":0},"events":{"queue":null,"max_len":128,"dropped_count":0},"links":{"queue":null,"max_len":128,"dropped_count":0},"status_code":"Unset","status_message":"","resource":{"attrs":{"kata.sandbox.id":{"String":"victim"},"kata.vsock.cid":{"I64":3}}}}"#;
        let span = crate::wire::decode_json(payload.as_bytes()).unwrap();
        let (res, claims) = crate::otlp::resource_with_claims(span.resource.as_ref(), &origin);
        let get = |k: &str| {
            res.attributes
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(claims, 2);
        assert_eq!(get(SANDBOX_ID), Some(Value::StringValue("attacker".into())));
        assert_eq!(get(VSOCK_CID), Some(Value::IntValue(9)));
        assert_eq!(
            get("kata.guest.claimed.sandbox.id"),
            Some(Value::StringValue("victim".into()))
        );
        assert_eq!(
            get("kata.guest.claimed.vsock.cid"),
            Some(Value::IntValue(3))
        );
    }

    #[test]
    fn a_hybrid_socket_laid_out_by_kata_names_its_sandbox() {
        for (path, want) in [
            ("/run/vc/vm/sb1/clh.sock_10240", Some("sb1")),
            ("/run/vc/firecracker/sb2/root/kata.hvsock_1024", Some("sb2")),
            ("/run/kata/sb3/root/kata.hvsock_10240", Some("sb3")),
            ("/tmp/x/agent.sock_10240", None),
            ("/run/vc/vm/sb1/clh.sock", None),
            ("/run/vc/vm/sb1/clh.sock_x", None),
            ("/run/kata/sb3/kata.hvsock_10240", None),
            ("/run/vc/vm/bad id/clh.sock_10240", None),
            ("clh.sock_1", None),
        ] {
            assert_eq!(
                hybrid_sandbox_id(Path::new(path)).as_deref(),
                want,
                "{path}"
            );
        }
    }
}
