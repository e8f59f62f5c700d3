//! Who the hand-off socket trusts, and upgrades under signals, with the
//! real binary started as root (it runs as nobody): another process of
//! nobody's cannot take the agents, pause them, or make a root successor
//! delete a file; a trusted peer that fails to take over is backed off;
//! bursts of SIGHUP and a SIGTERM during an upgrade neither kill the
//! service nor orphan its bridge; the hand-off socket is removed at exit.
//!
//! The attacker is this test binary itself, run again as nobody in the
//! mode named by [`HELPER`] (see [`helper_process`]).

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::agents::{alive, assert_exactly_once, signal, wait_gone, wait_spans, Agents};
use common::handover::{longest_gap, spawn, Setup};
use common::{Receiver, BIN};
use kata_trace_forwarder::handover::wire::{self, ListenerKind, ListenerState, State};
use kata_trace_forwarder::handover::{fds, REQUEST};
use nix::sys::signal::Signal;

/// Selects the attacker's part in a run of this binary as nobody.
const HELPER: &str = "KTF_TRUST_HELPER";
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// Runs this test binary as nobody in helper `mode` with `env`; returns
/// what it reported (its lines starting `HELPER:`).
fn as_nobody(mode: &str, env: &[(&str, String)]) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "helper_process",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(HELPER, mode)
    .uid(NOBODY)
    .gid(NOBODY);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helper {mode}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        // The harness may have begun the line ("test helper_process ... ").
        .filter_map(|l| l.split_once("HELPER: ").map(|(_, said)| said))
        .map(String::from)
        .collect()
}

/// The attacker, when run as such (otherwise nothing). Modes:
/// - `ptrace`: attaches to the process `KTF_PID` as a debugger would.
/// - `take-ack`, `take-noack`, `take-hold`: asks the forwarder at
///   `KTF_HANDOFF` for everything, then acknowledges, closes without
///   acknowledging, or holds the connection for 3 s without reading.
/// - `fake-predecessor`: listens at `KTF_HANDOFF` and answers one
///   successor with a state naming `KTF_VICTIM` (identity `KTF_IDENTITY`,
///   `dev:ino`) as its hand-off socket, then a check that fails.
#[test]
fn helper_process() {
    let Ok(mode) = std::env::var(HELPER) else {
        return;
    };
    let report = |what: &str| println!("HELPER: {what}");
    if mode == "ptrace" {
        let pid = nix::unistd::Pid::from_raw(std::env::var("KTF_PID").unwrap().parse().unwrap());
        return match nix::sys::ptrace::attach(pid) {
            Ok(()) => {
                let _ = nix::sys::wait::waitpid(pid, None);
                let _ = nix::sys::ptrace::detach(pid, None);
                report("ATTACHED")
            }
            Err(e) => report(&format!("DENIED {e}")),
        };
    }
    let path = PathBuf::from(std::env::var("KTF_HANDOFF").unwrap());
    match mode.as_str() {
        "take-ack" | "take-noack" | "take-hold" => {
            let mut s = match UnixStream::connect(&path) {
                Ok(s) => s,
                Err(e) => return report(&format!("CONNECT_FAILED {e}")),
            };
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            if s.write_all(&REQUEST).is_err() {
                return report("CLOSED");
            }
            if mode == "take-hold" {
                std::thread::sleep(Duration::from_secs(3));
            }
            let mut tag = [0u8; 1];
            match s.read(&mut tag) {
                Ok(1) if tag[0] == b'S' => {}
                Ok(1) if tag[0] == b'R' => return report("REFUSED"),
                Ok(n) => return report(&format!("CLOSED {n} {tag:?}")),
                Err(e) => return report(&format!("CLOSED {e}")),
            }
            let mut head = [0u8; wire::HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let header = wire::decode_header(&head).unwrap();
            let mut rest = vec![0u8; header.body_len + wire::TRAILER_LEN];
            s.read_exact(&mut rest).unwrap();
            let got = fds::recv(s.as_fd(), header.descriptors).unwrap();
            report(&format!("GOT_STATE {} descriptors", got.len()));
            if mode == "take-ack" {
                s.write_all(b"A").unwrap();
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        "fake-predecessor" => {
            let victim = PathBuf::from(std::env::var("KTF_VICTIM").unwrap());
            let identity = std::env::var("KTF_IDENTITY").unwrap();
            let (dev, ino) = identity.split_once(':').unwrap();
            let identity = (dev.parse().unwrap(), ino.parse().unwrap());
            let listener = UnixListener::bind(&path).unwrap();
            report("LISTENING");
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = [0u8; 8];
            if s.read_exact(&mut req).is_err() {
                return report("NO_REQUEST");
            }
            let (a, _b) = UnixStream::pair().unwrap();
            let state = State {
                pid: std::process::id(),
                listeners: vec![
                    ListenerState {
                        kind: ListenerKind::Handoff {
                            path: victim.clone(),
                            identity,
                        },
                        janitor: false,
                    },
                    // A listener that is not one: the check that fails
                    // once the hand-off socket is adopted.
                    ListenerState {
                        kind: ListenerKind::Hybrid {
                            path: victim,
                            identity,
                        },
                        janitor: false,
                    },
                ],
                connections: vec![],
            };
            s.write_all(b"S").unwrap();
            s.write_all(&wire::encode(&state).unwrap()).unwrap();
            fds::send(s.as_fd(), &[listener.as_fd(), a.as_fd()]).unwrap();
            let mut ack = [0u8; 1];
            let _ = s.read(&mut ack);
            report("SENT_STATE");
        }
        other => panic!("no helper mode {other}"),
    }
}

/// Finding 2: a process of nobody's (the forwarder's user, shared with
/// other services) asks the hand-off socket for everything, then holds,
/// closes without acknowledging, or acknowledges. Each is refused before
/// anything is paused or sent: it gets no descriptor, the agents are
/// never held up, and the forwarder serves on (it does not exit 0 to a
/// "successor").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_the_forwarders_user_cannot_take_over() {
    if !is_root() {
        eprintln!("skipped: acting as nobody needs root");
        return;
    }
    let rx = Receiver::start().await;
    let setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let agents = Agents::start(&setup.agent_socket, 2, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handoff = setup.dir.path().join("handoff.sock");
    for mode in ["take-hold", "take-noack", "take-ack"] {
        let at = Instant::now();
        let env = [("KTF_HANDOFF", handoff.display().to_string())];
        let said = tokio::task::spawn_blocking(move || as_nobody(mode, &env))
            .await
            .unwrap();
        eprintln!("{mode}: the attacker says {said:?}");
        assert!(
            !said.iter().any(|l| l.starts_with("GOT_STATE")),
            "{mode}: the attacker got the forwarder's sockets: {said:?}"
        );
        assert!(
            said.iter().any(|l| l.starts_with("CLOSED")),
            "{mode}: closed without a word: {said:?}"
        );
        assert!(alive(pid), "{mode}: the forwarder serves on");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let gap = longest_gap(&rx, at, at.elapsed() + Duration::from_millis(300));
        assert!(
            gap < Duration::from_millis(700),
            "{mode}: agents held up {gap:?}"
        );
    }
    let log = setup.log();
    assert!(
        !log.contains("handing over to a successor"),
        "nothing paused: {log}"
    );
    assert_eq!(
        log.matches("hand-off socket: refused a takeover").count(),
        3,
        "{log}"
    );
    assert!(log.contains(&format!("\"uid\":{NOBODY}")), "{log}");
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    assert_exactly_once(&rx, sent);
    assert_eq!(setup.ready_pids(), vec![pid]);
    signal(pid, Signal::SIGTERM);
    wait_gone(pid).await;
}

/// A trusted peer (root) that asks and never acknowledges holds the agents
/// up once, for a bounded time, and is then refused for a while instead of
/// pausing them again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_fails_to_take_over_is_backed_off() {
    let rx = Receiver::start().await;
    let setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let handoff = setup.dir.path().join("handoff.sock");
    let ask = |hold: bool| {
        let handoff = handoff.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(&handoff).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(&REQUEST).unwrap();
            let mut tag = [0u8; 1];
            s.read_exact(&mut tag).unwrap();
            let started = Instant::now();
            if hold {
                // The state and descriptors, then no acknowledgement:
                // the forwarder gives up and resumes on its own.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
            (tag[0], started.elapsed())
        })
    };
    let (tag, held) = ask(true).await.unwrap();
    assert_eq!(tag, b'S', "root may take over");
    assert!(
        held < Duration::from_secs(7),
        "the agents were held up for {held:?}"
    );
    let (tag, _) = ask(false).await.unwrap();
    assert_eq!(tag, b'R', "asked again at once: refused, backing off");
    setup
        .wait_log("backing off after failed hand-overs", 1)
        .await;
    assert!(alive(pid));
    assert_eq!(setup.ready_pids(), vec![pid]);
    signal(pid, Signal::SIGTERM);
    wait_gone(pid).await;
}

/// Finding 3: a fake predecessor running as nobody, listening where a root
/// successor looks for the running forwarder, names a root file as its
/// hand-off socket and then fails a check. The successor takes nothing
/// from a socket root did not make: the file stays, and it starts clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_successor_takes_nothing_from_a_fake_predecessor() {
    if !is_root() {
        eprintln!("skipped: acting as nobody needs root");
        return;
    }
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A root file in a root directory.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "root's").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let md = std::fs::metadata(&victim).unwrap();
    // Where nobody can listen.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    nix::unistd::chown(&open, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    let handoff = open.join("handoff.sock");
    let env = [
        ("KTF_HANDOFF", handoff.display().to_string()),
        ("KTF_VICTIM", victim.display().to_string()),
        ("KTF_IDENTITY", format!("{}:{}", md.dev(), md.ino())),
    ];
    let fake = tokio::task::spawn_blocking(move || as_nobody("fake-predecessor", &env));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !handoff.exists() {
        assert!(
            Instant::now() < deadline,
            "the fake predecessor never listened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stderr = dir.path().join("forwarder.stderr");
    let mut args = rx.args("grpc");
    args.extend(
        [
            "--socket-path",
            &dir.path().join("kata.hvsock").display().to_string(),
            "--handoff-socket",
            &handoff.display().to_string(),
        ]
        .map(String::from),
    );
    /// Whatever fails, the successor does not outlive the test.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut successor = Reaped(spawn(Path::new(BIN), &args, &stderr, None));
    let successor = &mut successor.0;
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log().contains("forwarder ready") {
        assert!(Instant::now() < deadline, "{}", log());
        assert!(successor.try_wait().unwrap().is_none(), "{}", log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The fake predecessor is done once the successor let go of it.
    let said = fake.await.unwrap();
    assert!(
        victim.exists(),
        "a root successor deleted the file a fake predecessor named: {said:?}\n{}",
        log()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's");
    assert!(
        log().contains("not a forwarder we trust"),
        "{said:?}\n{}",
        log()
    );
    assert!(!log().contains("took over from"), "{}", log());
    signal(successor.id() as i32, Signal::SIGTERM);
    assert!(successor.wait().unwrap().success(), "{}", log());
}

/// Waits until only `pid` serves: every other forwarder that became ready
/// (the bridges of upgrades) is gone and `pid` was the last to become
/// ready, for a moment. Fails if the service dies meanwhile.
async fn settle(setup: &Setup, pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut stable = 0;
    let mut last = 0;
    while stable < 5 {
        assert!(
            alive(pid),
            "{what}: the service (pid {pid}) died; log:\n{}",
            setup.log()
        );
        assert!(
            Instant::now() < deadline,
            "{what}: never settled; log:\n{}",
            setup.log()
        );
        let pids = setup.ready_pids();
        let settled =
            pids.last() == Some(&pid) && pids.iter().filter(|p| **p != pid).all(|p| !alive(*p));
        stable = if settled && pids.len() == last {
            stable + 1
        } else {
            0
        };
        last = pids.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Finding 5: bursts of ten SIGHUPs 10 ms apart, again and again. The
/// service's pid survives each (as one upgrade or several in a row), no
/// bridge is left behind, and every span arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_sighup_never_kill_the_service() {
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let agents = Agents::start(&setup.agent_socket, 2, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for burst in 0..6 {
        for _ in 0..10 {
            signal(pid, Signal::SIGHUP);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        settle(&setup, pid, &format!("burst {burst}")).await;
    }
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&rx, sent);
    let upgrades = setup
        .log()
        .matches("upgrade: becoming the new binary")
        .count();
    eprintln!("6 bursts of 10 SIGHUPs: {upgrades} upgrades");
    assert!(upgrades >= 6, "at least one upgrade per burst");
    signal(pid, Signal::SIGTERM);
    assert!(setup.first.wait().unwrap().success());
}

/// Finding 5: a SIGTERM 5 ms after a SIGHUP, in several trials: the
/// service stops cleanly (exit 0, not killed by the signal), and no bridge
/// is left serving on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_an_upgrade_stops_the_service_cleanly() {
    let rx = Receiver::start().await;
    for trial in 0..4 {
        let mut setup = Setup::start(&rx, &[]);
        let pid = setup.wait_ready(1).await;
        let agents = Agents::start(&setup.agent_socket, 2, 100).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(pid, Signal::SIGHUP);
        tokio::time::sleep(Duration::from_millis(5 + 20 * trial)).await;
        signal(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = setup.first.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "trial {trial}: the service did not stop; log:\n{}",
                setup.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "trial {trial}: the service exits 0: {status:?}; log:\n{}",
            setup.log()
        );
        let log = setup.log();
        eprintln!(
            "trial {trial}: stop waited for the upgrade: {}, executed the new binary: {}, it stopped: {}",
            log.contains("stop asked during an upgrade"),
            log.contains("upgrade: becoming the new binary"),
            log.matches("forwarder stopped").count()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for other in setup.ready_pids() {
            while alive(other) {
                assert!(
                    Instant::now() < deadline,
                    "trial {trial}: pid {other} serves on after the service stopped; log:\n{}",
                    setup.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = agents.finish().await;
    }
}

/// Finding 11: started as root, the forwarder runs as nobody and cannot
/// remove its hand-off socket from root's directory itself: its janitor
/// does, at the end, through an upgrade too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hand_off_socket_is_removed_at_exit() {
    if !is_root() {
        eprintln!("skipped: a directory nobody cannot write needs root");
        return;
    }
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let handoff = setup.dir.path().join("handoff.sock");
    assert!(handoff.exists());
    let pid = setup.hand_over(pid, 0).await;
    signal(pid, Signal::SIGTERM);
    assert!(setup.first.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while handoff.exists() {
        assert!(
            Instant::now() < deadline,
            "the hand-off socket is left behind; log:\n{}",
            setup.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A SIGHUP upgrade starts the new binary from a process already running
/// as nobody, which the kernel does not close to others of that user as it
/// does one that changed user: another process of nobody's must still not
/// be able to attach to the service (and so read every agent's spans, or
/// hold the janitor's pipe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_of_the_forwarders_user_can_attach_to_it_after_an_upgrade() {
    if !is_root() {
        eprintln!("skipped: acting as nobody needs root");
        return;
    }
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    signal(pid, Signal::SIGHUP);
    settle(&setup, pid, "upgrade").await;
    assert!(
        setup.log().contains("upgrade: becoming the new binary"),
        "{}",
        setup.log()
    );
    let env = [("KTF_PID", pid.to_string())];
    let said = tokio::task::spawn_blocking(move || as_nobody("ptrace", &env))
        .await
        .unwrap();
    assert!(said.iter().any(|l| l.starts_with("DENIED")), "{said:?}");
    signal(pid, Signal::SIGTERM);
    assert!(setup.first.wait().unwrap().success(), "{}", setup.log());
}
