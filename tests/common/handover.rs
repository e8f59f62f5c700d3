//! A forwarder followed through its hand-overs with the real binary: the
//! setup the hand-over tests share (started as the tests' user, its
//! successors followed by pid, its log read for what each did).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::agents::{alive, signal, wait_gone};
use super::{Receiver, BIN};

/// A forwarder started from `exe`, whose successors (SIGHUP children,
/// takers) are not our children: they are followed by pid.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub exe: PathBuf,
    pub args: Vec<String>,
    /// Hybrid mode's socket; in template mode, the sandboxes' directory.
    pub agent_socket: PathBuf,
    pub stderr: PathBuf,
    pub first: Child,
}

/// Another build of the binary to upgrade to: the release build when
/// `KTF_OTHER_BUILD` names it (scripts/test.sh builds it), otherwise a copy
/// of the one under test, which is then only another file.
pub fn other_build() -> &'static str {
    static OTHER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OTHER.get_or_init(|| match std::env::var("KTF_OTHER_BUILD") {
        Ok(p) if Path::new(&p).is_file() => {
            let differs = std::fs::read(&p).ok() != std::fs::read(BIN).ok();
            assert!(differs, "{p} is the very build under test");
            p
        }
        _ => {
            eprintln!("KTF_OTHER_BUILD not set: upgrading to a copy of the binary under test");
            BIN.to_owned()
        }
    })
}

/// The hand-overs the tests make, in order (see [`Setup::hand_over`]).
pub const STEPS: [&str; 4] = [
    "SIGHUP",
    "SIGHUP, another build",
    "SIGHUP, new binary",
    "takeover",
];

/// Template mode's sandbox directory layout, Cloud Hypervisor's.
pub const TEMPLATE: &str = "{ID}/clh.sock";

impl Setup {
    /// Hybrid mode.
    pub fn start(rx: &Receiver, extra: &[&str]) -> Setup {
        Self::start_in(
            rx,
            |dir| {
                let s = dir.join("kata.hvsock").display().to_string();
                let agent = PathBuf::from(format!("{s}_10240"));
                (vec!["--socket-path".to_string(), s], agent)
            },
            extra,
        )
    }

    /// Template mode, serving the sandboxes of `<dir>/vm`; `prepare` makes
    /// some there before the forwarder starts.
    pub fn start_template(rx: &Receiver, prepare: impl FnOnce(&Path)) -> Setup {
        Self::start_in(
            rx,
            |dir| {
                let vm = dir.join("vm");
                std::fs::create_dir(&vm).unwrap();
                prepare(&vm);
                let t = vm.join(TEMPLATE).display().to_string();
                (vec!["--socket-path-template".to_string(), t], vm)
            },
            &[],
        )
    }

    /// `listen(dir)` makes what the forwarder serves in `dir` and says
    /// how: its flags, and the agents' socket (or the sandboxes' directory).
    pub fn start_in(
        rx: &Receiver,
        listen: impl FnOnce(&Path) -> (Vec<String>, PathBuf),
        extra: &[&str],
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        // Started as root, the forwarder becomes nobody: its successor,
        // started by SIGHUP as nobody, must reach the binary and the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = bin.join("kata-trace-forwarder");
        std::fs::copy(BIN, &exe).unwrap();
        let (listen, agent_socket) = listen(dir.path());
        let mut args = rx.args("grpc");
        args.extend(listen);
        args.extend(
            [
                "--handoff-socket",
                &dir.path().join("handoff.sock").display().to_string(),
                "--batch-timeout",
                "20ms",
                "--sandbox-max-connections",
                "32",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let stderr = dir.path().join("forwarder.stderr");
        let first = spawn(&exe, &args, &stderr, None);
        Setup {
            agent_socket,
            dir,
            exe,
            args,
            stderr,
            first,
        }
    }

    /// Hand-over `step` of [`STEPS`] from `pid`; returns the pid that
    /// serves then. An upgrade by SIGHUP keeps the pid: the process hands
    /// everything to a bridge (the new binary, its child), becomes the new
    /// binary itself, and takes everything back, the bridge then exiting.
    /// A takeover is another process, and the old one exits 0.
    pub async fn hand_over(&mut self, pid: i32, step: usize) -> i32 {
        let before = self.ready_pids().len();
        match step {
            // The same file.
            0 => signal(pid, Signal::SIGHUP),
            // The binary replaced (a new file at the path, as a package
            // upgrade does): first by another build of it, then again.
            1 | 2 => {
                let new = self.dir.path().join("bin/kata-trace-forwarder.new");
                std::fs::copy(if step == 1 { other_build() } else { BIN }, &new).unwrap();
                std::fs::rename(&new, &self.exe).unwrap();
                signal(pid, Signal::SIGHUP);
            }
            // A new process with the same flags takes over.
            _ => {
                let taker = spawn(Path::new(BIN), &self.args, &self.stderr, None);
                std::mem::forget(taker);
                let next = self.wait_ready(before + 1).await;
                assert_ne!(next, pid);
                wait_gone(pid).await;
                if pid == self.first.id() as i32 {
                    let status = self.first.wait().unwrap();
                    assert!(status.success(), "the first forwarder exits 0: {status:?}");
                }
                return next;
            }
        }
        let again = self.wait_ready(before + 2).await;
        let bridge = self.ready_pids()[before];
        assert_ne!(bridge, pid, "a bridge of its own");
        assert_eq!(again, pid, "the upgraded binary serves under the same pid");
        wait_gone(bridge).await;
        assert!(alive(pid));
        pid
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Pids of the "forwarder ready" lines, in order.
    pub fn ready_pids(&self) -> Vec<i32> {
        self.log()
            .lines()
            .filter(|l| l.contains("forwarder ready"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }

    /// Waits until `n` forwarders have become ready; returns the last pid.
    pub async fn wait_ready(&self, n: usize) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids = self.ready_pids();
            if pids.len() >= n {
                return pids[n - 1];
            }
            assert!(
                Instant::now() < deadline,
                "{n} forwarders not ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `needle` has been logged `n` times.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "'{needle}' not logged {n} times; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Whatever failed, leave no forwarder behind.
        for pid in self.ready_pids() {
            if alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

pub fn spawn(exe: &Path, args: &[String], stderr: &Path, uid: Option<u32>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid);
    }
    // A copy of the binary is briefly open for writing in a child that
    // another test thread forked meanwhile (until that child's exec closes
    // it), and executing it then fails with ETXTBSY: wait that out.
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            spawned => return spawned.unwrap(),
        }
    }
}

/// The longest gap between two spans' arrivals within `window` of `at`.
pub fn longest_gap(rx: &Receiver, at: Instant, window: Duration) -> Duration {
    let arrived = rx.store.arrived.lock().unwrap();
    let near: Vec<Instant> = arrived
        .iter()
        .copied()
        .filter(|t| *t + window >= at && *t <= at + window)
        .collect();
    near.windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or(window)
}
