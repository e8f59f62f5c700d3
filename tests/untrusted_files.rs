//! Files and sockets a less privileged party can plant or race (issue 19):
//! each test plays the attack with the real binary, as the issue found it.
//! The attacker steps run as `nobody`, the user the forwarder becomes when
//! started as root; tests that need root say so and pass without it.
//!
//! Over 500 lines: one attack per finding, each with its set-up in full.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_when_listening, send_both_formats, wait_until, Forwarder, Receiver, BIN};

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody").unwrap().unwrap()
}

/// Runs `prog args` as `nobody`; panics unless it succeeds.
fn as_nobody(prog: &str, args: &[&OsStr]) {
    let u = nobody();
    let out = Command::new(prog)
        .args(args)
        .uid(u.uid.as_raw())
        .gid(u.gid.as_raw())
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as nobody: {prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory others may enter (a test's own tempdir is 0700).
fn open_up(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn owner(p: &Path) -> (u32, u32) {
    let md = std::fs::symlink_metadata(p).unwrap();
    (md.uid(), md.gid())
}

/// A hybrid forwarder exporting to `rx` with its spool in `spool`.
async fn with_spool(rx: &Receiver, spool: &Path, extra: &[&str]) -> Forwarder {
    let mut args = rx.args("grpc");
    args.extend(["--spool-dir".into(), spool.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Forwarder::hybrid(&args).await
}

/// Finding 1: `nobody` owns the spool after a first run, plants symlinks
/// to a root-only file under a batch's name and any other name, and waits
/// for the next start as root to hand it the file. Nothing is handed over,
/// and neither is a directory when the spool directory itself is a symlink
/// `nobody` placed in a directory of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_the_spool_hands_nothing_to_nobody() {
    if !is_root() {
        eprintln!("skipped: needs root (the forwarder must start as root and drop to nobody)");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    open_up(base.path());
    let spool = base.path().join("spool");
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("shadow");
    std::fs::write(&secret, b"root:secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Reachable by nobody (so that the symlinks resolve), not writable.
    open_up(secret_dir.path());
    let rx = Receiver::start().await;

    let mut first = with_spool(&rx, &spool, &[]).await;
    assert!(first.terminate().await.success(), "{}", first.stderr());
    let u = nobody();
    assert_eq!(
        owner(&spool),
        (u.uid.as_raw(), u.gid.as_raw()),
        "the spool is handed to nobody"
    );

    // The attacker, as nobody.
    for name in ["00000000000000000001.batch", "evil"] {
        as_nobody(
            "ln",
            &[
                "-s".as_ref(),
                secret.as_os_str(),
                spool.join(name).as_os_str(),
            ],
        );
    }
    // A hard link to a root file, as nobody could make one where
    // fs.protected_hardlinks is off (made by root here, which it is not).
    let linked = secret_dir.path().join("linked");
    std::fs::write(&linked, b"root only\n").unwrap();
    std::fs::hard_link(&linked, spool.join("00000000000000000002.batch")).unwrap();

    let mut second = with_spool(&rx, &spool, &[]).await;
    assert!(second.terminate().await.success(), "{}", second.stderr());
    assert_eq!(owner(&secret), (0, 0), "the symlink's target stays root's");
    assert_eq!(owner(&linked), (0, 0), "the hard link's file stays root's");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().mode() & 0o777,
        0o600,
        "{}",
        second.stderr()
    );

    // The spool directory itself replaced by a symlink to a directory of
    // root's, in a directory nobody owns.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(u.uid), Some(u.gid)).unwrap();
    as_nobody(
        "ln",
        &[
            "-s".as_ref(),
            secret_dir.path().as_os_str(),
            theirs.join("spool").as_os_str(),
        ],
    );
    let mut args = rx.args("grpc");
    args.extend([
        "--spool-dir".into(),
        theirs.join("spool").display().to_string(),
    ]);
    let third = Forwarder::spawn_hybrid(&args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !third.stderr().contains("forwarder ready") && Instant::now() < deadline {
        if exited(&third) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        owner(secret_dir.path()),
        (0, 0),
        "a root directory behind a planted symlink stays root's; stderr:\n{}",
        third.stderr()
    );
    assert!(
        third.stderr().contains("not followed") || third.stderr().contains("symlink"),
        "the start refuses it, saying why: {}",
        third.stderr()
    );
}

/// Whether the forwarder has exited. Read from /proc, not reaped: its
/// `Child` reaps it (a pid reaped behind its back could be reused by the
/// time it is killed).
fn exited(f: &Forwarder) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", f.pid())) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Runs `prog args` as the spool's user: `nobody` when the forwarder
/// starts as root, else this one.
fn plant(prog: &str, args: &[&OsStr]) {
    if is_root() {
        as_nobody(prog, args);
    } else {
        assert!(Command::new(prog).args(args).status().unwrap().success());
    }
}

/// A spool file as the forwarder writes one (see `export::spool`), of one
/// span named `name`.
fn spool_file(name: &str, span_id: [u8; 8]) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![7; 16],
                    span_id: span_id.to_vec(),
                    name: name.into(),
                    start_time_unix_nano: 1,
                    end_time_unix_nano: 2,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let body = req.encode_to_vec();
    let mut f = Vec::new();
    f.extend_from_slice(b"KTFSPOOL");
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(body.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    f.extend_from_slice(&body);
    f
}

fn vm_hwm_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Finding 7: under batches' names, the spool's user plants a FIFO, a
/// symlink to `/dev/zero` and a file larger than `--spool-max-bytes`, in
/// front of a real batch. The replayer sets each aside and sends the real
/// one, the forwarder's memory stays small, and SIGTERM ends it promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_spool_files_neither_block_nor_exhaust_the_replayer() {
    let base = tempfile::tempdir().unwrap();
    open_up(base.path());
    let spool = base.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    if is_root() {
        // As the first run leaves it: nobody's.
        let u = nobody();
        nix::unistd::chown(&spool, Some(u.uid), Some(u.gid)).unwrap();
    }
    let name = |seq: u64| spool.join(format!("{seq:020}.batch"));
    plant("mkfifo", &[name(1).as_os_str()]);
    plant(
        "ln",
        &["-s".as_ref(), "/dev/zero".as_ref(), name(2).as_os_str()],
    );
    plant(
        "truncate",
        &["-s".as_ref(), "8M".as_ref(), name(3).as_os_str()],
    );
    let real = base.path().join("real");
    std::fs::write(&real, spool_file("the real batch", [4; 8])).unwrap();
    open_up(&real);
    plant("cp", &[real.as_os_str(), name(4).as_os_str()]);

    let rx = Receiver::start().await;
    let mut fwd = with_spool(&rx, &spool, &["--spool-max-bytes", "1MiB"]).await;
    let got = rx.store.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].1.name, "the real batch", "{}", fwd.stderr());
    wait_until("the planted files set aside", &fwd, || {
        (1..=3).all(|seq| spool.join(format!("{seq:020}.damaged")).exists())
    })
    .await;
    let hwm = vm_hwm_kib(fwd.pid());
    eprintln!("forwarder peak RSS: {hwm} KiB");
    assert!(hwm < 100 << 10, "peak RSS {hwm} KiB");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd.pid()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = fwd.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", fwd.stderr());
    // Each refused for what it is: the oversized one unread, not found
    // damaged after reading it whole.
    let log = fwd.stderr();
    for reason in [
        "not a regular file",
        "a symlink",
        "larger than the spool's size bound",
    ] {
        assert!(log.contains(reason), "{reason}: {log}");
    }
}

/// Finding 8: a FIFO named like kata-deploy's configuration files makes
/// `--kata-host --print` fail at once, naming it, instead of hanging.
#[test]
fn a_fifo_configuration_fails_kata_host_print_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("opt/kata/share/defaults/kata-containers");
    std::fs::create_dir_all(&deploy).unwrap();
    let fifo = deploy.join("configuration-evil.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mut child = Command::new(BIN)
        .args(["--kata-host", "--print", "--kata-root"])
        .arg(dir.path())
        .env_remove("KATA_CONF_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("--kata-host --print still running after 10 s: stuck on the FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("configuration-evil.toml") && stderr.contains("a FIFO"),
        "{stderr}"
    );
}

/// Finding 8, at run time: a FIFO configuration appearing while
/// `--kata-host` runs is reported and skipped; the configuration watcher
/// still follows the next change, and SIGTERM ends the forwarder promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_configuration_at_run_time_stops_neither_the_watcher_nor_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let deploy = root.join("opt/kata/share/defaults/kata-containers");
    std::fs::create_dir_all(&deploy).unwrap();
    let tracing = "[agent.kata]\nenable_tracing = true\n";
    std::fs::write(
        deploy.join("configuration-clh.toml"),
        format!("[hypervisor.clh]\n{tracing}"),
    )
    .unwrap();
    let args = vec![
        "--kata-host".to_string(),
        "--kata-root".to_string(),
        root.display().to_string(),
        "--dump-only".to_string(),
    ];
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;
    nix::unistd::mkfifo(
        &deploy.join("configuration-evil.toml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    wait_until("the FIFO reported", &fwd, || {
        fwd.stderr().contains("configuration-evil.toml") && fwd.stderr().contains("a FIFO")
    })
    .await;
    std::fs::write(
        deploy.join("configuration-fc.toml"),
        format!("[hypervisor.firecracker]\n{tracing}"),
    )
    .unwrap();
    wait_until("the next configuration followed", &fwd, || {
        fwd.stderr().contains("firecracker/{ID}/root/kata.hvsock")
    })
    .await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd.pid()),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(
        fwd.wait(Duration::from_secs(10)).await.success(),
        "{}",
        fwd.stderr()
    );
}

/// A forwarder started for a race, with its log.
struct Racer {
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Racer {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn gone(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Whether `pid` is this forwarder (or, under strace, its tracee).
    fn is(&self, pid: i32) -> bool {
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        pid as u32 == self.child.id() || parent == Some(self.child.id())
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a forwarder on `socket_path`, through `wrapper` if given.
fn racer(socket_path: &Path, wrapper: &[&str]) -> Racer {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut cmd = match wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("--socket-path")
        .arg(socket_path)
        .arg("--dump-only")
        .arg("--handoff-socket")
        .arg(dir.path().join("handoff.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    Racer {
        child: cmd.spawn().unwrap(),
        log,
        _dir: dir,
    }
}

/// Waits until each racer is up or gone, then checks that exactly one is
/// up, that the others refused, and that the socket at the path is the
/// survivor's: a connection to it reaches the survivor's process.
async fn one_survivor(racers: &mut [Racer], agent_socket: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !racers
        .iter_mut()
        .all(|f| f.gone() || f.stderr().contains("forwarder ready"))
    {
        assert!(Instant::now() < deadline, "{what}: not settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let up: Vec<usize> = (0..racers.len()).filter(|&i| !racers[i].gone()).collect();
    let logs: Vec<String> = racers.iter().map(Racer::stderr).collect();
    assert_eq!(
        up.len(),
        1,
        "{what}: exactly one forwarder stays up; stderr:\n{}",
        logs.join("\n---\n")
    );
    for (i, log) in logs.iter().enumerate() {
        assert!(i == up[0] || log.contains("in use"), "{what}: {log}");
    }
    let s = std::os::unix::net::UnixStream::connect(agent_socket).unwrap_or_else(|e| {
        panic!(
            "{what}: the survivor's socket is not on the path: {e}\n{}",
            logs[up[0]]
        )
    });
    let cred =
        nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).unwrap();
    assert!(
        racers[up[0]].is(cred.pid()),
        "{what}: reached pid {}",
        cred.pid()
    );
}

/// A directory with a stale socket at `<dir>/kata.hvsock_10240` (bound,
/// then closed without removing the file, as a killed forwarder leaves
/// it): the `--socket-path` and the agents' socket.
fn stale_socket() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("kata.hvsock");
    let agent_socket = PathBuf::from(format!("{}_10240", socket_path.display()));
    drop(std::os::unix::net::UnixListener::bind(&agent_socket).unwrap());
    (dir, socket_path, agent_socket)
}

/// Finding 9: forwarders started at once over a stale socket. Exactly one
/// stays up, the others refuse (the socket is in use), and the path leads
/// to the survivor.
///
/// Two processes meet in the window between the look at the old socket and
/// the new one listening only by chance (microseconds, against tens of
/// milliseconds of start-up), so the window is first held open: the first
/// forwarder runs under strace, which delays the return of each `bind` by
/// a second, and the second starts while the first's new socket is bound
/// but not yet listening (when, without the lock, the second takes it for
/// stale, removes it and binds its own). Then groups of plain starts race
/// as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_over_a_stale_socket_leave_one_forwarder_on_the_path() {
    let strace = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if strace {
        let (_dir, socket_path, agent_socket) = stale_socket();
        // Binds: the hand-off socket's, then the agents'.
        let slow = racer(
            &socket_path,
            &[
                "strace",
                "-f",
                "-qq",
                "--seccomp-bpf",
                "-o",
                "/dev/null",
                "-e",
                "trace=bind",
                "-e",
                "inject=bind:delay_exit=1000000",
            ],
        );
        tokio::time::sleep(Duration::from_millis(1400)).await;
        let fast = racer(&socket_path, &[]);
        one_survivor(&mut [slow, fast], &agent_socket, "held open").await;
    } else {
        eprintln!("strace not found: the race is only left to chance");
    }
    const RACERS: usize = 4;
    for round in 0..20 {
        let (_dir, socket_path, agent_socket) = stale_socket();
        let mut racers: Vec<Racer> = (0..RACERS).map(|_| racer(&socket_path, &[])).collect();
        one_survivor(&mut racers, &agent_socket, &format!("round {round}")).await;
    }
}

/// Finding 11: a forwarder's "is this socket live?" probe (a second one
/// starting on the same path connects and closes) is not logged as an
/// agent; a real agent still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_liveness_probe_is_not_logged_as_an_agent() {
    let mut first = Forwarder::hybrid(&["--dump-only".to_string()]).await;
    let args = [
        "--socket-path".to_string(),
        first.socket_path.display().to_string(),
        "--dump-only".to_string(),
    ];
    let mut second = Forwarder::spawn_in(
        tempfile::tempdir().unwrap(),
        first.socket_path.clone(),
        &args,
    );
    let status = second.wait(Duration::from_secs(20)).await;
    assert!(!status.success());
    assert!(second.stderr().contains("in use"), "{}", second.stderr());
    // Whatever the first makes of the probe is logged by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.stderr().contains("agent connected"),
        "the probe was logged as an agent:\n{}",
        first.stderr()
    );
    send_both_formats(&first.agent_socket).await;
    wait_until("a real agent logged", &first, || {
        first.stderr().contains("agent connected")
    })
    .await;
    assert!(first.terminate().await.success());
}

/// Finding 11: a template sandbox's directory moved away (renamed out of
/// the sandboxes' directory) while its socket is served: the socket does
/// not stay behind where the directory now is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_moved_away_while_served_leaves_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/vc");
    let elsewhere = dir.path().join("elsewhere");
    let args = vec![
        "--socket-path-template".to_string(),
        format!("{}/vm/{{ID}}/clh.sock", run.display()),
        "--dump-only".to_string(),
    ];
    std::fs::create_dir_all(run.join("vm/moved")).unwrap();
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;
    connect_when_listening(&run.join("vm/moved/clh.sock_10240")).await;
    std::fs::rename(run.join("vm/moved"), &elsewhere).unwrap();
    wait_until("the moved sandbox stopped", &fwd, || {
        fwd.stderr().contains("stopped serving")
    })
    .await;
    let left = elsewhere.join("clh.sock_10240");
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !left.exists(),
        "the socket stayed in the moved directory; stderr:\n{}",
        fwd.stderr()
    );
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
}
