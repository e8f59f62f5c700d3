//! Template mode with the real binary: one forwarder serving every sandbox
//! whose directory appears under a temporary "/run/vc", in both template
//! shapes (Cloud Hypervisor's `{ID}/clh.sock`, Firecracker's nested
//! `{ID}/root/kata.hvsock`), with spans tagged by sandbox; churn that leaves
//! nothing behind; the mkdir-to-listening latency; and, as root, the
//! privileges it keeps.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    connect_when_listening, files_named, real_agent, wait_until, Forwarder, Receiver, BIN,
};
use kata_agent_emitter::{scenario, Scenario, ScenarioOptions, WireFormat};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A forwarder in template mode on a fresh "/run/vc" under a temporary
/// directory; `template` is relative to it.
fn spawn(template: &str, extra: &[String]) -> (Forwarder, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/vc");
    let full = format!("{}/{template}", run.display());
    let mut args = vec![
        "--socket-path-template".to_string(),
        // As `kata-runtime env --json | jq .Hypervisor.SocketPath` prints it.
        format!("\"{full}\""),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend_from_slice(extra);
    (Forwarder::spawn_in(dir, PathBuf::new(), &args), run)
}

/// [`common::assert_tagged`] for whole scenarios.
fn assert_tagged(got: &[(Resource, Span)], sent: &[(String, Scenario)]) {
    let sent: Vec<_> = sent
        .iter()
        .map(|(id, sc)| (id.clone(), sc.expected.clone()))
        .collect();
    common::assert_tagged(got, &sent);
}

fn unix_listeners_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let prefix = dir.display().to_string();
    table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Cloud Hypervisor's shape: a sandbox that exists at start and sandboxes
/// created while the forwarder runs are all served, each agent connecting
/// right after its directory is made; their spans carry their sandbox ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clh_sandboxes_old_and_new_are_served_and_tagged() {
    let rx = Receiver::start().await;
    let (dir, run) = {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run/vc");
        (d, run)
    };
    std::fs::create_dir_all(run.join("vm/pre-existing")).unwrap();
    let template = format!("{}/vm/{{ID}}/clh.sock", run.display());
    let mut args = vec![
        "--socket-path-template".to_string(),
        format!("\"{template}\""),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend(rx.args("grpc"));
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;

    let mut sent = Vec::new();
    let mut agents = Vec::new();
    for (seq, id) in ["pre-existing", "sb-json", "sb-bincode"].iter().enumerate() {
        let sandbox = run.join("vm").join(id);
        std::fs::create_dir_all(&sandbox).unwrap();
        let mut agent = connect_when_listening(&sandbox.join("clh.sock_10240")).await;
        let sc = if seq == 2 {
            // A hostile agent claims to be another sandbox: its spans
            // still arrive as its own sandbox's, the claim kept apart.
            scenario(&ScenarioOptions {
                format: WireFormat::Bincode,
                seq: seq as u64,
                claimed_sandbox_id: Some("pre-existing".into()),
                ..Default::default()
            })
        } else {
            real_agent(seq as u64)
        };
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        agents.push(agent);
        sent.push((id.to_string(), sc));
    }
    let total = sent.iter().map(|(_, s)| s.expected.len()).sum();
    let got = rx.store.wait_for(total, Duration::from_secs(20)).await;
    assert_tagged(&got, &sent);

    // A sandbox going: its listener closes, its socket goes with it, and
    // its agent's connection is closed once drained.
    std::fs::remove_dir_all(run.join("vm/sb-json")).unwrap();
    wait_until("the sandbox's listener to close", &fwd, || {
        unix_listeners_under(&run.join("vm/sb-json")).is_empty()
            && fwd.stderr().contains("stopped serving")
    })
    .await;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), agents[1].read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "connection of the removed sandbox: {closed:?}"
    );
    // The others' are not.
    let open = tokio::time::timeout(Duration::from_millis(300), agents[0].read(&mut byte)).await;
    assert!(open.is_err(), "{open:?}");

    drop(agents);
    let status = fwd.terminate().await;
    assert!(status.success(), "{status:?}; stderr:\n{}", fwd.stderr());
    assert_eq!(
        files_named(&run, "clh.sock_10240"),
        Vec::<PathBuf>::new(),
        "sockets of the live sandboxes removed at exit"
    );
    assert!(unix_listeners_under(&run).is_empty());
}

/// Firecracker's shape nests the socket under `{ID}/root/`: the forwarder
/// waits for `root/` (and here, first, for the sandboxes' directory itself,
/// which does not exist when it starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_sandboxes_wait_for_their_root_directory() {
    let rx = Receiver::start().await;
    let (mut fwd, run) = spawn(
        "firecracker/{ID}/root/kata.hvsock",
        &rx.args("http/protobuf"),
    );
    fwd.wait_listening().await;
    assert!(
        fwd.stderr().contains("does not exist yet; waiting for it"),
        "{}",
        fwd.stderr()
    );

    let mut sent = Vec::new();
    let mut agents = Vec::new();
    for (seq, id) in ["fc-1", "fc-2"].iter().enumerate() {
        let sandbox = run.join("firecracker").join(id);
        std::fs::create_dir_all(&sandbox).unwrap();
        // The jailer makes root/ a moment later; nothing listens before.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(files_named(&sandbox, "kata.hvsock_10240").is_empty());
        std::fs::create_dir(sandbox.join("root")).unwrap();
        let mut agent = connect_when_listening(&sandbox.join("root/kata.hvsock_10240")).await;
        let sc = real_agent(100 + seq as u64);
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        agents.push(agent);
        sent.push((id.to_string(), sc));
    }
    // And one made in one go, `mkdir -p`-style.
    let sandbox = run.join("firecracker/fc-3/root");
    std::fs::create_dir_all(&sandbox).unwrap();
    let mut agent = connect_when_listening(&sandbox.join("kata.hvsock_10240")).await;
    let sc = scenario(&ScenarioOptions {
        seq: 103,
        format: WireFormat::Bincode,
        ..Default::default()
    });
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    agents.push(agent);
    sent.push(("fc-3".to_string(), sc));

    let total = sent.iter().map(|(_, s)| s.expected.len()).sum();
    let got = rx.store.wait_for(total, Duration::from_secs(20)).await;
    assert_tagged(&got, &sent);
    drop(agents);
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(files_named(&run, "kata.hvsock_10240").is_empty());
}

/// A pre-existing Firecracker sandbox (root/ already there) is served at
/// start, and so is one whose root/ appears later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_pre_existing_sandbox_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/vc");
    std::fs::create_dir_all(run.join("firecracker/old/root")).unwrap();
    std::fs::create_dir_all(run.join("firecracker/half")).unwrap();
    let args = vec![
        "--dump-only".to_string(),
        "--socket-path-template".to_string(),
        format!("{}/firecracker/{{ID}}/root/kata.hvsock", run.display()),
    ];
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;
    let sock = run.join("firecracker/old/root/kata.hvsock_10240");
    assert!(sock.exists(), "served before ready is logged");
    let mut agent = connect_when_listening(&sock).await;
    std::fs::create_dir(run.join("firecracker/half/root")).unwrap();
    let mut agent2 =
        connect_when_listening(&run.join("firecracker/half/root/kata.hvsock_10240")).await;
    for (a, id) in [(&mut agent, "old"), (&mut agent2, "half")] {
        let sc = real_agent(0);
        a.write_all(&sc.stream_bytes()).await.unwrap();
        a.shutdown().await.unwrap();
        wait_until("the spans on stdout", &fwd, || {
            fwd.stdout().contains(&format!(
                r#""key":"kata.sandbox.id","value":{{"stringValue":"{id}"}}"#
            ))
        })
        .await;
    }
    assert!(fwd.terminate().await.success());
}

/// 200 sandboxes created (an agent connecting to each right after mkdir)
/// and removed leave no listener, socket file, or descriptor behind. The
/// mkdir-to-listening latency of each is measured on the way and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_200_sandboxes_leaves_nothing_behind() {
    const N: usize = 200;
    let (mut fwd, run) = spawn("vm/{ID}/clh.sock", &["--dump-only".to_string()]);
    let vm = run.join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    fwd.wait_listening().await;
    let pid = fwd.pid();

    // Warm up once, so that what is made lazily on first use is counted in
    // the baseline.
    std::fs::create_dir(vm.join("warmup")).unwrap();
    drop(connect_when_listening(&vm.join("warmup/clh.sock_10240")).await);
    std::fs::remove_dir_all(vm.join("warmup")).unwrap();
    wait_until("the warm-up sandbox to go", &fwd, || {
        unix_listeners_under(&vm).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = fd_count(pid);
    let threads_before = thread_count(pid);

    let frame = scenario(&ScenarioOptions::default()).frames[0].clone();
    let mut latencies = Vec::with_capacity(N);
    let mut agents = Vec::with_capacity(N);
    // In waves of 50 live sandboxes, as a busy host would have them.
    for wave in 0..N / 50 {
        let mut ids = Vec::new();
        for i in 0..50 {
            let id = format!("churn-{wave}-{i}");
            let sock = vm.join(&id).join("clh.sock_10240");
            let made = Instant::now();
            std::fs::create_dir(vm.join(&id)).unwrap();
            // Poll for a connectable socket right after mkdir.
            let mut agent = loop {
                match std::os::unix::net::UnixStream::connect(&sock) {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(made.elapsed() < Duration::from_secs(10), "{id}: {e}");
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            };
            latencies.push(made.elapsed());
            std::io::Write::write_all(&mut agent, &frame).unwrap();
            agents.push(agent);
            ids.push(id);
        }
        // The sandboxes live until their agents' spans are out.
        let want = (wave + 1) * 50;
        wait_until("the wave's spans", &fwd, || {
            fwd.stdout().lines().count() >= want
        })
        .await;
        for id in &ids {
            std::fs::remove_dir_all(vm.join(id)).unwrap();
        }
    }
    drop(agents);
    wait_until("every churned listener to close", &fwd, || {
        unix_listeners_under(&vm).is_empty()
    })
    .await;
    // Connections drain for a moment after their sandbox goes.
    let mut fds_after = fd_count(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds_after > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds_after = fd_count(pid);
    }
    let spans = fwd.stdout().lines().count();
    let threads_after = thread_count(pid);

    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[N - 1],
    );
    println!(
        "template mode, {N} sandboxes: mkdir-to-listening p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         forwarder fds before {fds_before}, after {fds_after}; threads before {threads_before}, \
         after {threads_after}; {spans} spans dumped"
    );
    assert_eq!(fds_after, fds_before, "descriptors leaked");
    assert_eq!(spans, N, "one span from each sandbox");
    assert!(
        p99 < Duration::from_millis(100),
        "p99 {p99:?} (goal 20 ms; 100 ms allowed on a loaded machine)"
    );
    assert!(files_named(&run, "clh.sock_10240").is_empty());

    // Sandboxes still running at exit: their sockets are removed, their
    // directories left alone.
    for i in 0..5 {
        std::fs::create_dir(vm.join(format!("live-{i}"))).unwrap();
        drop(connect_when_listening(&vm.join(format!("live-{i}/clh.sock_10240"))).await);
    }
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(files_named(&run, "clh.sock_10240").is_empty());
    assert!(vm.join("live-4").is_dir());
}

/// Beyond --max-sandboxes, a sandbox is logged and left alone; it is served
/// once another goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_beyond_the_cap_wait_for_a_slot() {
    let (mut fwd, run) = spawn(
        "vm/{ID}/clh.sock",
        &[
            "--dump-only".to_string(),
            "--max-sandboxes".to_string(),
            "2".to_string(),
        ],
    );
    let vm = run.join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    fwd.wait_listening().await;
    for id in ["a", "b"] {
        std::fs::create_dir(vm.join(id)).unwrap();
        connect_when_listening(&vm.join(id).join("clh.sock_10240")).await;
    }
    std::fs::create_dir(vm.join("c")).unwrap();
    wait_until("the cap to be logged", &fwd, || {
        fwd.stderr()
            .contains("sandbox limit reached (--max-sandboxes)")
    })
    .await;
    assert!(!vm.join("c/clh.sock_10240").exists());
    std::fs::remove_dir_all(vm.join("a")).unwrap();
    connect_when_listening(&vm.join("c/clh.sock_10240")).await;
    assert!(fwd.terminate().await.success());
}

/// When the socket is removed by someone else while the sandbox directory
/// stays (as a recursive delete does first), the forwarder stops serving it
/// and never puts a socket back into a directory being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_socket_is_not_recreated() {
    let (mut fwd, run) = spawn("vm/{ID}/clh.sock", &["--dump-only".to_string()]);
    let sandbox = run.join("vm/s");
    std::fs::create_dir_all(&sandbox).unwrap();
    fwd.wait_listening().await;
    let sock = sandbox.join("clh.sock_10240");
    connect_when_listening(&sock).await;
    std::fs::remove_file(&sock).unwrap();
    wait_until("the sandbox to be retired", &fwd, || {
        fwd.stderr().contains("its socket was removed")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!sock.exists());
    std::fs::remove_dir(&sandbox).unwrap();
    std::fs::create_dir(&sandbox).unwrap();
    connect_when_listening(&sock).await;
    assert!(fwd.terminate().await.success());
}

/// As root, the forwarder runs as `nobody`; only its sandbox watcher thread
/// keeps a capability, CAP_DAC_OVERRIDE, and nothing else even in its
/// bounding set. (As another user it keeps that user.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_only_the_watcher_keeps_cap_dac_override() {
    let (mut fwd, run) = spawn("vm/{ID}/clh.sock", &["--dump-only".to_string()]);
    std::fs::create_dir_all(run.join("vm/x")).unwrap();
    fwd.wait_listening().await;
    // It can still make sockets in root's directories.
    connect_when_listening(&run.join("vm/x/clh.sock_10240")).await;
    let me = nix::unistd::getuid();
    let tasks: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{}/task", fwd.pid()))
        .unwrap()
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap();
            (comm.trim().to_owned(), status)
        })
        .collect();
    let field = |status: &str, name: &str| -> Vec<String> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    let expected_uid = if me.is_root() {
        nix::unistd::User::from_name("nobody")
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    } else {
        me.as_raw()
    };
    assert!(tasks.iter().any(|(c, _)| c == "ktf-sandboxes"), "{tasks:?}");
    for (comm, status) in &tasks {
        let uids = field(status, "Uid:");
        assert!(
            uids.iter().all(|u| *u == expected_uid.to_string()),
            "{comm}: uids {uids:?}"
        );
        if !me.is_root() {
            continue;
        }
        let (eff, prm, bnd) = (
            field(status, "CapEff:")[0].clone(),
            field(status, "CapPrm:")[0].clone(),
            field(status, "CapBnd:")[0].clone(),
        );
        if comm == "ktf-sandboxes" {
            // Bit 1: CAP_DAC_OVERRIDE.
            assert_eq!(
                (eff.as_str(), prm.as_str()),
                ("0000000000000002", "0000000000000002"),
                "{comm}"
            );
            assert_eq!(bnd, "0000000000000002", "{comm}: bounding set");
        } else {
            assert_eq!(
                (eff.as_str(), prm.as_str()),
                ("0000000000000000", "0000000000000000"),
                "{comm}"
            );
        }
    }
    if me.is_root() {
        assert!(fwd
            .stderr()
            .contains("CAP_DAC_OVERRIDE, on the sandbox watcher thread only"));
    }
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(
        !run.join("vm/x/clh.sock_10240").exists(),
        "removed with the kept capability"
    );
}

fn run_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_templates_are_usage_errors() {
    for (args, needle) in [
        (
            vec!["--socket-path-template", "/run/vc/vm/clh.sock"],
            "has no {ID}",
        ),
        (
            vec!["--socket-path-template", "/run/vc/vm/x{ID}/clh.sock"],
            "whole path component",
        ),
        (
            vec!["--socket-path-template", "/run/vc/vm/{ID}"],
            "followed by the socket's file name",
        ),
        (
            vec!["--socket-path-template", "vm/{ID}/clh.sock"],
            "not an absolute path",
        ),
        (
            vec!["--socket-path-template", "/run/{ID}/{ID}/s"],
            "it must appear once",
        ),
        (
            vec![
                "--socket-path-template",
                "/a/{ID}/s",
                "--socket-path",
                "/a/b/s",
            ],
            "cannot be used with",
        ),
        (
            vec!["--socket-path-template", "/a/{ID}/s", "--vsock-cid", "3"],
            "cannot be used with",
        ),
        (
            vec![
                "--socket-path-template",
                "/a/{ID}/s",
                "--max-sandboxes",
                "0",
            ],
            "must be",
        ),
    ] {
        let (code, err) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in:\n{err}"
        );
    }
}
