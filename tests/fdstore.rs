//! systemd's file descriptor store, with systemd played by the test (never
//! booted here): a datagram socket as `$NOTIFY_SOCKET` that keeps what the
//! forwarder gives it (`FDSTORE=1`, `FDNAME=`, the descriptor by
//! `SCM_RIGHTS`, one copy of each open file), lets go of what it removes
//! (`FDSTOREREMOVE=1`), and passes the store to the next process as systemd
//! does (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`, descriptors from 3).
//!
//! A stop and start (what `systemctl restart` does) costs the agents
//! nothing: every span arrives exactly once, and none of them sees an error.
//! After a crash, a connection resumes at its next whole frame, the rest of
//! the frame the dead process had begun skipped and counted.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agents::{assert_exactly_once, signal, wait_spans, Agents};
use common::{connect_agent, exit_summary, Receiver, BIN};
use kata_agent_emitter::{bulk_frames, WireFormat};
use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::AsyncWriteExt;

/// systemd's side of the store.
struct FakeSystemd {
    dir: tempfile::TempDir,
    sock: UnixDatagram,
    path: PathBuf,
    store: Vec<(String, OwnedFd)>,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        // The forwarder becomes nobody (started as root): it must reach
        // the notify socket and, for its successor, nothing else of ours.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        sock.set_nonblocking(true).unwrap();
        FakeSystemd {
            dir,
            sock,
            path,
            store: Vec::new(),
        }
    }

    /// Takes every message sent so far.
    fn pump(&mut self) {
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 8]);
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => panic!("notify socket: {e}"),
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw.into_iter().map(|r| {
                        // SAFETY: just received, ours alone.
                        unsafe { std::os::fd::FromRawFd::from_raw_fd(r) }
                    }));
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::to_owned)
            };
            let name = field("FDNAME=").unwrap_or_default();
            if field("FDSTORE=").as_deref() == Some("1") {
                for fd in fds {
                    let same = |a: &OwnedFd| {
                        let (x, y) = (
                            nix::sys::stat::fstat(a.as_fd()).unwrap(),
                            nix::sys::stat::fstat(fd.as_fd()).unwrap(),
                        );
                        (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
                    };
                    // One copy of an open file, as systemd keeps.
                    if !self.store.iter().any(|(_, f)| same(f)) {
                        self.store.push((name.clone(), fd));
                    }
                }
            } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
                self.store.retain(|(n, _)| *n != name);
            }
        }
    }

    fn count(&self, prefix: &str) -> usize {
        self.store
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .count()
    }

    /// Starts the forwarder as the unit's process, passing it the store
    /// when `pass` (descriptors from 3, for its pid: the shell's, which it
    /// execs).
    fn start(&self, args: &[String], stderr: &Path, pass: bool) -> Child {
        let passed: Vec<RawFd> = match pass {
            true => self.store.iter().map(|(_, f)| f.as_raw_fd()).collect(),
            false => Vec::new(),
        };
        let names: Vec<&str> = match pass {
            true => self.store.iter().map(|(n, _)| n.as_str()).collect(),
            false => Vec::new(),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(BIN)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env("FDSTORE", "64")
            .env("LISTEN_FDS", passed.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: between fork and exec only dup and dup2, which are
        // async-signal-safe, on descriptors this process holds.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first: a source may sit where a target is.
                let high: Vec<RawFd> = passed
                    .iter()
                    .map(|&f| nix::libc::fcntl(f, nix::libc::F_DUPFD_CLOEXEC, 200))
                    .collect();
                for (i, &f) in high.iter().enumerate() {
                    if f < 0 || nix::libc::dup2(f, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }
}

/// A hybrid forwarder's flags, its socket in `dir`.
fn flags(rx: &Receiver, dir: &Path) -> (Vec<String>, PathBuf) {
    let socket = dir.join("kata.hvsock");
    let mut args = rx.args("grpc");
    args.extend(
        [
            "--socket-path",
            &socket.display().to_string(),
            "--handoff-socket",
            "none",
            "--batch-timeout",
            "20ms",
        ]
        .map(String::from),
    );
    (args, PathBuf::from(format!("{}_10240", socket.display())))
}

/// The fake systemd, and the unit's first process started under it (with
/// nothing passed) and ready: its flags, agent socket and log.
async fn start_first(rx: &Receiver) -> (FakeSystemd, Vec<String>, PathBuf, PathBuf, Child) {
    let sd = FakeSystemd::new();
    let (args, socket) = flags(rx, sd.dir.path());
    let stderr = sd.dir.path().join("forwarder.stderr");
    let first = sd.start(&args, &stderr, false);
    wait_log(&stderr, "forwarder ready", 1).await;
    (sd, args, socket, stderr, first)
}

async fn wait_log(stderr: &Path, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "'{needle}' x{n} not in:\n{log}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A stop and a start, as `systemctl restart` does with a store: the first
/// process leaves the listener (with its janitor's pipe) and every agent
/// connection in the store; the next takes them back; the agents, which
/// never dial again, see nothing. Once systemd lets go of the store (the
/// unit stopped for good), the janitor removes the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_agent_connection_in_the_store() {
    let rx = Receiver::start().await;
    let (mut sd, args, socket, stderr, mut first) = start_first(&rx).await;
    let agents = Agents::start(&socket, 3, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sd.pump();
    assert_eq!(sd.count("ktf-l-"), 1, "{:?}", sd.store);
    assert_eq!(sd.count("ktf-c-"), 3, "{:?}", sd.store);
    let root = nix::unistd::getuid().is_root();
    assert_eq!(
        sd.count("ktf-j-"),
        usize::from(root),
        "the janitor's pipe, as root"
    );

    signal(first.id() as i32, Signal::SIGTERM);
    assert!(first.wait().unwrap().success());
    sd.pump();
    assert_eq!(sd.count("ktf-c-"), 3, "left in the store: {:?}", sd.store);
    assert!(socket.exists(), "the socket stays for the next process");

    let mut second = sd.start(&args, &stderr, true);
    let log = wait_log(&stderr, "forwarder ready", 2).await;
    assert!(
        log.contains("took back the listeners and agent connections systemd kept"),
        "{log}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_exactly_once(&rx, sent);

    // The agents closed: their connections left the store.
    sd.pump();
    assert_eq!(sd.count("ktf-c-"), 0, "{:?}", sd.store);
    signal(second.id() as i32, Signal::SIGTERM);
    assert!(second.wait().unwrap().success());
    let log = std::fs::read_to_string(&stderr).unwrap();
    let last = log
        .lines()
        .rfind(|l| l.contains("forwarder stopped"))
        .unwrap();
    assert_eq!(
        exit_summary(last)["bytes_skipped"],
        0,
        "nothing to skip: {last}"
    );
    sd.pump();
    sd.store.clear();
    if root {
        let deadline = Instant::now() + Duration::from_secs(5);
        while socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !socket.exists(),
            "removed by the janitor once systemd let go"
        );
    }
}

/// A crash in the middle of a frame: the connection, kept in the store,
/// goes to the next process, which skips the rest of that frame (counted)
/// and reads every later one; the agent sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_kept_connection_resumes_at_its_next_whole_frame() {
    let rx = Receiver::start().await;
    let (mut sd, args, socket, stderr, mut first) = start_first(&rx).await;
    let frames = bulk_frames(WireFormat::Bincode, 5, 600, 31);
    let mut agent = connect_agent(&socket).await;
    agent.write_all(&frames[0]).await.unwrap();
    wait_spans(&rx, 1).await;
    let half = frames[1].len() / 2;
    agent.write_all(&frames[1][..half]).await.unwrap();
    // Read by the first process (a paced read comes within a tick), then
    // lost with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(first.id() as i32, Signal::SIGKILL);
    let _ = first.wait();
    sd.pump();
    assert_eq!(sd.count("ktf-c-"), 1, "{:?}", sd.store);

    agent.write_all(&frames[1][half..]).await.unwrap();
    for f in &frames[2..] {
        agent.write_all(f).await.unwrap();
    }
    let mut second = sd.start(&args, &stderr, true);
    wait_log(&stderr, "forwarder ready", 2).await;
    wait_log(
        &stderr,
        "restored connection: skipped to the next whole frame",
        1,
    )
    .await;
    wait_spans(&rx, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.store.count(), 4, "frame 0, then frames 2 to 4");
    for f in &frames[2..] {
        agent.write_all(f).await.unwrap();
    }
    wait_spans(&rx, 7).await;
    drop(agent);
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(second.id() as i32, Signal::SIGTERM);
    assert!(second.wait().unwrap().success());
    let log = std::fs::read_to_string(&stderr).unwrap();
    let summary = exit_summary(&log);
    assert_eq!(
        summary["bytes_skipped"],
        (frames[1].len() - half) as u64,
        "the rest of the frame begun: {summary}"
    );
}
