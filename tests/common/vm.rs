//! Real guests for tests/vm.rs: QEMU boots Debian's kernel with the
//! initramfs `xtask initramfs` writes (busybox, the VSOCK modules, the agent
//! emitter), its VSOCK device served over vhost-user by vhost-device-vsock,
//! which relays a guest's `connect(CID 2, port P)` to `<uds-path>_P` on the
//! host, as Cloud Hypervisor and Firecracker do: the forwarder's socket.
//!
//! The pieces come from scripts/setup-vm.sh, through the environment
//! (`KTF_VM_*`, as scripts/test.sh exports them) or else the `kit.env` it
//! leaves in its cache. Without them the tests fail, saying how to get them;
//! `KTF_NO_VM=1` alone turns the suite off (scripts/test.sh then skips it
//! and says so). Every QEMU and backend is killed by pid when its `Guest`
//! drops, whatever happened, and by the kernel if the test process dies.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kata_agent_emitter::guest::Report;
use nix::sys::signal::Signal;

/// What a guest is made of, and how to run it.
#[derive(Debug, Clone)]
pub struct Kit {
    pub qemu: PathBuf,
    pub backend: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// `tcg` or `kvm`: what scripts/setup-vm.sh saw boot the guest here.
    pub accel: String,
}

const KIT_VARS: [&str; 5] = [
    "KTF_VM_QEMU",
    "KTF_VM_BACKEND",
    "KTF_VM_KERNEL",
    "KTF_VM_INITRAMFS",
    "KTF_VM_ACCEL",
];

impl Kit {
    /// The kit, or `None` when `KTF_NO_VM=1` turned the suite off. Fails
    /// the test when a piece is missing.
    pub fn get() -> Option<Kit> {
        if std::env::var("KTF_NO_VM").is_ok_and(|v| v == "1") {
            eprintln!("KTF_NO_VM=1: the VM suite is not run");
            return None;
        }
        let cached = cache_dir().join("kit.env");
        let file = std::fs::read_to_string(&cached).unwrap_or_default();
        let var = |name: &str| -> String {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    file.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no {name} for the VM tests: neither in the environment nor in {}. \
                         Run scripts/setup-vm.sh (scripts/test.sh does), or set KTF_NO_VM=1 \
                         to leave the VM suite out. Needs: {KIT_VARS:?}",
                        cached.display()
                    )
                })
        };
        let kit = Kit {
            qemu: var("KTF_VM_QEMU").into(),
            backend: var("KTF_VM_BACKEND").into(),
            kernel: var("KTF_VM_KERNEL").into(),
            initramfs: var("KTF_VM_INITRAMFS").into(),
            accel: var("KTF_VM_ACCEL"),
        };
        for p in [&kit.qemu, &kit.backend, &kit.kernel, &kit.initramfs] {
            assert!(
                p.is_file(),
                "{} is missing: run scripts/setup-vm.sh",
                p.display()
            );
        }
        Some(kit)
    }
}

/// The kit of the `vsock-local` guest: `kit`'s initramfs followed by a
/// second archive (the kernel unpacks both, the second over the first)
/// with the release forwarder, its libraries, the `vsock_loopback` module
/// and an init that knows the scenario, so that an initramfs made before
/// the release build still serves. The forwarder: `KTF_OTHER_BUILD`, else
/// the release build beside the test build (the debug one is too big for
/// the guest's memory).
pub fn vsock_local_kit(kit: &Kit, dir: &Path) -> Kit {
    let release = std::env::var_os("KTF_OTHER_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let bin = PathBuf::from(super::BIN);
            let target = bin.parent().and_then(Path::parent).unwrap_or(&bin);
            target.join("release/kata-trace-forwarder")
        });
    assert!(
        release.is_file(),
        "no release forwarder at {} for the vsock-local guest: \
         cargo build --release --bin kata-trace-forwarder (scripts/test.sh does)",
        release.display()
    );
    let guest_root = kit.kernel.parent().unwrap();
    let overlay = dir.join("overlay.cpio");
    ktf_guest_image::initramfs(
        guest_root,
        &[("kata-trace-forwarder", release.as_path())],
        &overlay,
    )
    .unwrap_or_else(|e| panic!("the vsock-local initramfs: {e}"));
    let mut both = std::fs::read(&kit.initramfs).unwrap();
    both.extend(std::fs::read(&overlay).unwrap());
    let initramfs = dir.join("vsock-local.cpio");
    std::fs::write(&initramfs, both).unwrap();
    Kit {
        initramfs,
        ..kit.clone()
    }
}

/// The spans of a `--dump-only --dump-format otlp-json` output among
/// other lines: one `TracesData` a line.
pub fn dumped_spans(
    text: &str,
) -> Vec<(
    opentelemetry_proto::tonic::resource::v1::Resource,
    opentelemetry_proto::tonic::trace::v1::Span,
)> {
    use opentelemetry_proto::tonic::trace::v1::TracesData;
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("{\"resourceSpans\""))
        .flat_map(|l| {
            let data: TracesData =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("dump line {l:?}: {e}"));
            data.resource_spans.into_iter().flat_map(|rs| {
                let resource = rs.resource.unwrap_or_default();
                rs.scope_spans
                    .into_iter()
                    .flat_map(|s| s.spans)
                    .map(move |s| (resource.clone(), s))
            })
        })
        .collect()
}

/// scripts/setup-vm.sh's cache (`KTF_VM_CACHE_DIR`, else under the user's
/// cache directory).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KTF_VM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("kata-trace-forwarder/vm"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/kata-trace-forwarder/vm"))
        })
        .unwrap_or_default()
}

/// The forwarder the VM suite runs: the release build when scripts/test.sh
/// names it (`KTF_OTHER_BUILD`), else the test build.
pub fn forwarder_bin() -> PathBuf {
    std::env::var_os("KTF_OTHER_BUILD")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(super::BIN))
}

/// Kills `child` when the test process dies, however it dies: no QEMU or
/// backend may outlive the suite.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe, and nothing else runs in the
    // child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        })
    }
}

/// One VM: QEMU and its VSOCK backend.
pub struct Guest {
    pub name: String,
    qemu: Child,
    backend: Child,
    dir: tempfile::TempDir,
    /// When QEMU was started.
    pub started: Instant,
    exit: Option<ExitStatus>,
}

impl Guest {
    /// Boots a guest whose VSOCK (CID `cid`) is relayed to `<uds_path>_P`,
    /// its agent run with `agent_args`.
    pub fn boot(kit: &Kit, name: &str, uds_path: &Path, cid: u32, agent_args: &[&str]) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let vhost = dir.path().join("vhost.sock");
        let log = |n: &str| File::create(dir.path().join(n)).unwrap();
        let mut backend = die_with_parent(
            Command::new(&kit.backend)
                .arg("--vm")
                .arg(format!(
                    "guest-cid={cid},socket={},uds-path={}",
                    vhost.display(),
                    uds_path.display()
                ))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log("backend.log"))
                .stderr(log("backend.log")),
        )
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", kit.backend.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vhost.exists() {
            if Instant::now() > deadline || backend.try_wait().unwrap().is_some() {
                let _ = backend.kill();
                let _ = backend.wait();
                panic!(
                    "vhost-device-vsock made no socket; its log:\n{}",
                    std::fs::read_to_string(dir.path().join("backend.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mem = "256M";
        // no_timer_check, as Kata boots its guests: early in boot the
        // kernel counts timer interrupts over a busy-wait, and a TCG vCPU
        // starved by a loaded host misses them and panics ("IO-APIC +
        // timer doesn't work!"; seen once in a loaded VM suite run).
        let append = format!(
            "console=ttyS0 quiet panic=-1 no_timer_check -- {}",
            agent_args.join(" ")
        );
        let started = Instant::now();
        let qemu = die_with_parent(
            Command::new(&kit.qemu)
                .args(["-accel", &kit.accel, "-m", mem, "-smp", "1"])
                .args(["-nographic", "-nodefaults", "-no-reboot"])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                ])
                .args(["-numa", "node,memdev=mem"])
                .args([
                    "-chardev",
                    &format!("socket,id=vsock,path={}", vhost.display()),
                ])
                .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
                .arg("-serial")
                .arg(format!("file:{}", dir.path().join("console.log").display()))
                .arg("-serial")
                .arg(format!(
                    "file:{}",
                    dir.path().join("manifest.log").display()
                ))
                .arg("-kernel")
                .arg(&kit.kernel)
                .arg("-initrd")
                .arg(&kit.initramfs)
                .args(["-append", &append])
                .stdin(Stdio::null())
                .stdout(log("qemu.log"))
                .stderr(log("qemu.log")),
        )
        .spawn();
        let qemu = match qemu {
            Ok(q) => q,
            Err(e) => {
                let _ = backend.kill();
                let _ = backend.wait();
                panic!("starting {}: {e}", kit.qemu.display());
            }
        };
        Guest {
            name: name.to_string(),
            qemu,
            backend,
            dir,
            started,
            exit: None,
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default()
    }

    /// The console, QEMU's and the backend's logs, for a failure message.
    pub fn logs(&self) -> String {
        format!(
            "guest {}: console:\n{}\nQEMU:\n{}\nvhost-device-vsock:\n{}",
            self.name,
            self.read("console.log"),
            self.read("qemu.log"),
            self.read("backend.log")
        )
    }

    /// Everything the second serial port carried so far.
    pub fn second_port(&self) -> String {
        self.read("manifest.log")
    }

    /// The manifest so far.
    pub fn reports(&self) -> Vec<Report> {
        Report::parse_all(&self.read("manifest.log"))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Waits until a manifest line satisfies `pred`; returns it.
    pub async fn wait_report(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Report) -> bool,
    ) -> Report {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.reports().into_iter().find(|r| pred(r)) {
                return r;
            }
            let exited = self.qemu.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "guest {}: no {what} after {:?} (QEMU {exited:?})\n{}",
                self.name,
                self.started.elapsed(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the guest to power off, then stops its backend; fails
    /// unless QEMU exited 0 with the agent's `Done` and no write error.
    /// Returns the manifest.
    pub async fn wait_done(&mut self, timeout: Duration) -> Vec<Report> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.qemu.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "guest {} still running after {timeout:?}\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.exit = Some(status);
        self.stop_backend();
        let reports = self.reports();
        assert!(status.success(), "QEMU exited {status}\n{}", self.logs());
        match reports.last() {
            Some(Report::Done { errors: 0, .. }) => {}
            _ => panic!(
                "guest {}: the agent did not finish without errors: {reports:?}\n{}",
                self.name,
                self.logs()
            ),
        }
        reports
    }

    /// The VMM dies: QEMU and its VSOCK backend SIGKILLed (Cloud
    /// Hypervisor's and Firecracker's VSOCK device is in their process).
    pub fn kill(&mut self) {
        let _ = self.qemu.kill();
        self.exit = self.qemu.wait().ok();
        self.stop_backend();
    }

    fn stop_backend(&mut self) {
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        self.stop_backend();
    }
}

/// The spans a manifest reports with their expectations, in sending order.
pub fn spans(reports: &[Report]) -> Vec<kata_agent_emitter::ExpectedSpan> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Span(s) => Some((**s).clone()),
            _ => None,
        })
        .collect()
}

/// Milliseconds of guest uptime at the first frame it wrote.
pub fn first_frame_ms(reports: &[Report]) -> Option<u64> {
    reports.iter().find_map(|r| match r {
        Report::FirstFrame { uptime_ms } => Some(*uptime_ms),
        _ => None,
    })
}

/// Reports one scenario's figures on stderr and, when scripts/test.sh asks
/// (`KTF_VM_FIGURES`, a file), for its closing note.
pub fn figures(
    scenario: &str,
    what: &str,
    sent: usize,
    arrived: usize,
    duplicated: usize,
    t0: Instant,
) {
    let line = format!(
        "{scenario}: {what}: sent {sent}, arrived {arrived}, duplicated {duplicated}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    eprintln!("vm figures: {line}");
    if let Some(path) = std::env::var_os("KTF_VM_FIGURES") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A forwarder in template mode, Cloud Hypervisor's layout, on a fresh
/// "/run/vc/vm": returns it and the template.
pub async fn template_forwarder(extra: &[String]) -> (super::Forwarder, String) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/vc/vm");
    std::fs::create_dir_all(&run).unwrap();
    let template = format!("{}/{{ID}}/clh.sock", run.display());
    let mut args = vec![
        "--socket-path-template".to_string(),
        template.clone(),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend_from_slice(extra);
    let f = super::Forwarder::spawn_exe(&forwarder_bin(), dir, PathBuf::new(), &args);
    f.wait_listening().await;
    (f, template)
}

/// Makes sandbox `id`'s directory of `template`, as the runtime does before
/// it starts the VMM, and waits until the forwarder listens in it. Returns
/// the VMM's socket: the backend's `uds-path`.
pub async fn make_sandbox(template: &str, id: &str) -> PathBuf {
    let vmm = PathBuf::from(template.replace("{ID}", id));
    std::fs::create_dir_all(vmm.parent().unwrap()).unwrap();
    let listening = PathBuf::from(format!("{}_10240", vmm.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening.exists() {
        assert!(
            Instant::now() < deadline,
            "the forwarder does not listen at {}",
            listening.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    vmm
}

/// An integer attribute's value, if `key` is there and an int.
pub fn int_attr(
    attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<i64> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    })
}

/// The `kata.span_index` of every bulk span that arrived from `sandbox`
/// (by its `kata.sandbox.id`; every span when `None`), sorted.
pub fn bulk_indices(
    got: &[(
        opentelemetry_proto::tonic::resource::v1::Resource,
        opentelemetry_proto::tonic::trace::v1::Span,
    )],
    sandbox: Option<&str>,
) -> Vec<i64> {
    let mut idx: Vec<i64> = got
        .iter()
        .filter(|(r, _)| {
            sandbox.is_none_or(|id| {
                super::string_attr(&r.attributes, super::SANDBOX_ID).as_deref() == Some(id)
            })
        })
        .filter_map(|(_, s)| int_attr(&s.attributes, "kata.span_index"))
        .collect();
    idx.sort_unstable();
    idx
}

/// How many of sorted `indices` repeat one before them.
pub fn duplicates(indices: &[i64]) -> usize {
    indices.windows(2).filter(|w| w[0] == w[1]).count()
}
