//! Hand-over with the real binary: agents that behave like the Kata
//! exporter (one connection, never re-dialled, any write error fatal) keep
//! streaming while the forwarder is upgraded by SIGHUP (to a binary that
//! replaced the one it runs) and taken over by a new process. Every span
//! arrives exactly once, no agent sees an error; a frame split across a
//! hand-over arrives exact; a failed upgrade changes nothing; another user
//! cannot take over; a VSOCK listener is handed over. Template mode hands
//! over its sandboxes the same way, and its successor keeps exactly the
//! one capability its watcher needs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agents::{alive, assert_exactly_once, signal, wait_gone, wait_spans, Agents};
use common::handover::{longest_gap, spawn, Setup, STEPS};
use common::{assert_span_eq, connect_agent, find, Receiver, BIN};
use kata_agent_emitter::{scenario, ScenarioOptions, WireFormat};
use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;

/// The longest gap between spans around each step of [`STEPS`].
fn report_gaps(what: &str, gaps: &[(usize, Duration)]) {
    for (step, gap) in gaps {
        let how = STEPS[*step];
        eprintln!("{what}, step {step} ({how}): longest gap between spans {gap:?}");
    }
}

/// Each hand-over's log line, as the old process wrote it; printed with
/// how long the agents' sockets went unread, as it measured.
fn handed_over(setup: &Setup) -> Vec<serde_json::Value> {
    let handed: Vec<serde_json::Value> = setup
        .log()
        .lines()
        .filter(|l| l.contains("handed over: every listener"))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for v in &handed {
        eprintln!(
            "hand-over to {}: paused {} with {} listeners and {} connections",
            v["successor"], v["paused_for"], v["listeners"], v["connections"]
        );
    }
    handed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_a_takeover_lose_nothing_under_load() {
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let mut pid = setup.wait_ready(1).await;
    assert_eq!(pid, setup.first.id() as i32);
    // About 200 spans/s from three agents, both formats.
    let agents = Agents::start(&setup.agent_socket, 3, 67).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut gaps = Vec::new();
    for step in 0..4 {
        let at = Instant::now();
        pid = setup.hand_over(pid, step).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        gaps.push((step, longest_gap(&rx, at, Duration::from_millis(500))));
        assert!(setup.agent_socket.exists(), "the socket stays in place");
    }
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&rx, sent);
    report_gaps("hybrid", &gaps);
    // Each SIGHUP is two hand-overs (to the bridge and back), a takeover one.
    assert_eq!(handed_over(&setup).len(), 7);

    signal(pid, Signal::SIGTERM);
    wait_gone(pid).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup.agent_socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !setup.agent_socket.exists(),
        "the last forwarder to exit removes the socket (its janitor, as root)"
    );
}

/// Template mode, 20 sandboxes with an agent each (200 spans/s in all),
/// through three upgrades by SIGHUP (twice to a new binary) and a takeover:
/// every span arrives exactly once with its own sandbox's id, and no agent
/// sees an error. Each successor also serves a sandbox that appears after
/// it started; started as root, it does so as nobody, with CAP_DAC_OVERRIDE
/// on its watcher thread and no capability on any other, as the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_mode_hands_over_twenty_sandboxes() {
    let rx = Receiver::start().await;
    let ids: Vec<String> = (0..20).map(|i| format!("sandbox-{i:02}")).collect();
    let mut setup = Setup::start_template(&rx, |vm| {
        for id in &ids {
            std::fs::create_dir(vm.join(id)).unwrap();
        }
    });
    let mut pid = setup.wait_ready(1).await;
    assert_watcher_alone_privileged(pid);
    let vm = setup.agent_socket.clone();
    let socket = |id: &str| vm.join(id).join("clh.sock_10240");
    let sockets: Vec<PathBuf> = ids.iter().map(|id| socket(id)).collect();
    let agents = Agents::start_on(&sockets, 10).await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut gaps = Vec::new();
    for step in 0..4 {
        let at = Instant::now();
        pid = setup.hand_over(pid, step).await;
        assert_watcher_alone_privileged(pid);
        // A sandbox that appears now is the successor's to bind.
        let late = format!("late-{step}");
        std::fs::create_dir(vm.join(&late)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(socket(&late)).is_err() {
            assert!(
                Instant::now() < deadline,
                "successor {pid} does not serve a new sandbox; log:\n{}",
                setup.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        gaps.push((step, longest_gap(&rx, at, Duration::from_millis(500))));
        for s in &sockets {
            assert!(s.exists(), "{} stays in place", s.display());
        }
    }
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&rx, sent);
    {
        let got = rx.store.spans.lock().unwrap();
        let mut per_sandbox = std::collections::BTreeMap::new();
        for (resource, _) in got.iter() {
            let id = common::string_attr(&resource.attributes, "kata.sandbox.id");
            *per_sandbox.entry(id).or_insert(0usize) += 1;
        }
        let seen: Vec<String> = per_sandbox.keys().flatten().cloned().collect();
        assert_eq!(seen, ids, "every span carries its own sandbox's id");
    }
    report_gaps("template", &gaps);
    let handed = handed_over(&setup);
    assert_eq!(handed.len(), 7);
    for v in &handed {
        assert!(v["connections"].as_u64() >= Some(20), "{v}");
    }

    signal(pid, Signal::SIGTERM);
    wait_gone(pid).await;
    for s in sockets.iter().chain([&socket("late-3")]) {
        assert!(
            !s.exists(),
            "the last forwarder removes {} as it stops",
            s.display()
        );
    }
}

/// `--kata-host` on a host with a Cloud Hypervisor and (where the kernel
/// has AF_VSOCK) a QEMU configuration: upgraded by SIGHUP to a new binary,
/// then taken over. The VSOCK listener and every sandbox go along, five
/// agents' spans arrive exactly once with no write error, and each
/// successor serves a sandbox that appears after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kata_host_mode_is_handed_over() {
    // A port of its own: the tests of this file run at once.
    let port = 40000 + std::process::id() % 10000;
    let vsock =
        tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(u32::MAX, port)).is_ok();
    let rx = Receiver::start().await;
    let ids: Vec<String> = (0..5).map(|i| format!("kh-{i}")).collect();
    let mut setup = Setup::start_in(
        &rx,
        |dir| {
            let root = dir.join("host");
            let deploy = root.join(common::KATA_DEPLOY);
            std::fs::create_dir_all(&deploy).unwrap();
            let fixture = Path::new(common::KATA_FIXTURE).join(common::KATA_DEPLOY);
            let mut configs = vec!["configuration-clh.toml"];
            if vsock {
                configs.push("configuration-qemu.toml");
            }
            for c in configs {
                std::fs::copy(fixture.join(c), deploy.join(c)).unwrap();
            }
            let vm = root.join("run/vc/vm");
            for id in &ids {
                std::fs::create_dir_all(vm.join(id)).unwrap();
            }
            let flags = ["--kata-host", "--kata-root", &root.display().to_string()]
                .map(String::from)
                .into_iter()
                .chain(["--vsock-port".to_string(), port.to_string()])
                .collect();
            (flags, vm)
        },
        &[],
    );
    let mut pid = setup.wait_ready(1).await;
    let vm = setup.agent_socket.clone();
    let socket = |id: &str| vm.join(id).join(format!("clh.sock_{port}"));
    let sockets: Vec<PathBuf> = ids.iter().map(|id| socket(id)).collect();
    let agents = Agents::start_on(&sockets, 40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for step in [1, 3] {
        pid = setup.hand_over(pid, step).await;
        assert_watcher_alone_privileged(pid);
        let late = format!("late-{step}");
        std::fs::create_dir(vm.join(&late)).unwrap();
        common::connect_within(&socket(&late), Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&rx, sent);
    let ready = setup
        .log()
        .lines()
        .rfind(|l| l.contains("forwarder ready"))
        .unwrap()
        .to_owned();
    assert!(ready.contains("kata-host"), "{ready}");
    if vsock {
        assert!(
            ready.contains(&format!("vsock cid any port {port}")),
            "the successor serves VSOCK: {ready}"
        );
        // Still held: by the last successor, not by a forwarder that died.
        assert!(
            tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(u32::MAX, port)).is_err(),
            "the VSOCK port is held"
        );
    }
    assert_eq!(handed_over(&setup).len(), 3);
    signal(pid, Signal::SIGTERM);
    wait_gone(pid).await;
    for s in &sockets {
        assert!(!s.exists(), "{} removed at the end", s.display());
    }
}

/// Started as root, a template-mode forwarder runs as nobody, and only its
/// sandbox watcher thread holds a capability: CAP_DAC_OVERRIDE, which it
/// needs to make and remove sockets in root's sandbox directories.
fn assert_watcher_alone_privileged(pid: i32) {
    if !nix::unistd::getuid().is_root() {
        return;
    }
    let field = |status: &str, key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = field(&status, "Uid:");
    assert!(uid.starts_with("65534"), "runs as nobody: Uid {uid}");
    let mut privileged = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let caps = (field(&status, "CapEff:"), field(&status, "CapPrm:"));
        let ambient = field(&status, "CapAmb:");
        assert_eq!(ambient, "0000000000000000", "nothing passed on");
        if caps != ("0000000000000000".into(), "0000000000000000".into()) {
            privileged.push((field(&status, "Name:"), caps.0, caps.1));
        }
    }
    let dac = "0000000000000002".to_string();
    assert_eq!(
        privileged,
        vec![("ktf-sandboxes".to_string(), dac.clone(), dac)],
        "pid {pid}: CAP_DAC_OVERRIDE on the watcher thread, nothing elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_split_across_the_hand_over_arrives_exact() {
    let rx = Receiver::start().await;
    let setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    for format in WireFormat::ALL {
        let sc = scenario(&ScenarioOptions {
            format,
            ..Default::default()
        });
        let before = rx.store.count();
        let mut agent = connect_agent(&setup.agent_socket).await;
        let k = sc.frames.len() / 2;
        agent.write_all(&sc.frames[..k].concat()).await.unwrap();
        let cut = sc.frames[k].len() / 2;
        agent.write_all(&sc.frames[k][..cut]).await.unwrap();
        wait_spans(&rx, before + k).await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let n = setup.ready_pids().len();
        let taker = spawn(Path::new(BIN), &setup.args, &setup.stderr, None);
        std::mem::forget(taker);
        let next = setup.wait_ready(n + 1).await;
        wait_gone(setup.ready_pids()[n - 1]).await;
        let _ = next;

        agent.write_all(&sc.frames[k][cut..]).await.unwrap();
        agent.write_all(&sc.frames[k + 1..].concat()).await.unwrap();
        let got = rx
            .store
            .wait_for(before + sc.expected.len(), Duration::from_secs(20))
            .await;
        assert_eq!(got.len(), before + sc.expected.len());
        for want in &sc.expected {
            let (resource, span) = find(&got, want.span_id);
            assert_span_eq(want, resource, span, "kata-agent");
        }
    }
    let last = *setup.ready_pids().last().unwrap();
    assert_ne!(last, pid);
    signal(last, Signal::SIGTERM);
    wait_gone(last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_old_process_serving() {
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let agents = Agents::start(&setup.agent_socket, 2, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A binary that exits 1 at once.
    let new = setup.dir.path().join("bin/new");
    std::fs::write(&new, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, &setup.exe).unwrap();
    signal(pid, Signal::SIGHUP);
    setup
        .wait_log("upgrade failed: the new binary exited", 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // No binary at all.
    std::fs::remove_file(&setup.exe).unwrap();
    signal(pid, Signal::SIGHUP);
    setup
        .wait_log("upgrade failed: the new binary did not start", 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0);
    wait_spans(&rx, sent).await;
    assert_exactly_once(&rx, sent);
    assert_eq!(setup.ready_pids(), vec![pid], "still the first forwarder");
    signal(pid, Signal::SIGTERM);
    assert!(setup.first.wait().unwrap().success());
}

/// An upgrade whose last step fails: the bridge serves everything, and the
/// old process, still flushing (the collector refuses for a while), cannot
/// become the new binary because the package was removed meanwhile. The
/// bridge serves on as the service's process; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_cannot_execute_leaves_the_bridge_serving() {
    use std::sync::atomic::Ordering::SeqCst;
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &["--shutdown-timeout", "20s"]);
    let pid = setup.wait_ready(1).await;
    let agents = Agents::start(&setup.agent_socket, 2, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // What the old process has read is still to export when it hands over.
    rx.store.fail_first.store(usize::MAX / 2, SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(pid, Signal::SIGHUP);
    setup.wait_log("handed over: every listener", 1).await;
    std::fs::remove_file(&setup.exe).unwrap();
    rx.store.fail_first.store(0, SeqCst);
    setup
        .wait_log("the bridge serves on as the service's process", 1)
        .await;
    assert!(setup.first.wait().unwrap().success(), "the old one exits 0");
    let bridge = setup.ready_pids()[1];
    assert!(alive(bridge));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0);
    wait_spans(&rx, sent).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_exactly_once(&rx, sent);
    assert_eq!(setup.ready_pids(), vec![pid, bridge]);
    signal(bridge, Signal::SIGTERM);
    wait_gone(bridge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_by_another_user_is_refused() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: starting a taker as another user needs root");
        return;
    }
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    // Let anyone connect, so that the credentials check is what refuses.
    let handoff = setup.dir.path().join("handoff.sock");
    std::fs::set_permissions(&handoff, std::fs::Permissions::from_mode(0o777)).unwrap();
    let agents = Agents::start(&setup.agent_socket, 1, 100).await;
    let mut taker = spawn(Path::new(BIN), &setup.args, &setup.stderr, Some(4242));
    let status = taker.wait().unwrap();
    assert!(!status.success(), "the taker cannot start: {status:?}");
    setup
        .wait_log("hand-off socket: refused a takeover", 1)
        .await;
    assert!(setup.log().contains("\"uid\":4242"), "{}", setup.log());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0);
    wait_spans(&rx, sent).await;
    assert_exactly_once(&rx, sent);
    assert_eq!(setup.ready_pids(), vec![pid]);
    signal(pid, Signal::SIGTERM);
    assert!(setup.first.wait().unwrap().success());
}

/// AF_VSOCK: bound, handed over, and the successor holds it (no loopback
/// here, so no connection: binding the port again fails while it listens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vsock_listener_is_handed_over() {
    let port = 20000 + (std::process::id() % 20000);
    if tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(u32::MAX, port)).is_err() {
        eprintln!("skipped: this kernel has no AF_VSOCK");
        return;
    }
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("forwarder.stderr");
    let mut args = rx.args("grpc");
    args.extend(
        [
            "--vsock-port",
            &port.to_string(),
            "--handoff-socket",
            &dir.path().join("handoff.sock").display().to_string(),
        ]
        .map(String::from),
    );
    let mut first = spawn(Path::new(BIN), &args, &stderr, None);
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log().contains("forwarder ready") {
        assert!(Instant::now() < deadline, "{}", log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let taker = spawn(Path::new(BIN), &args, &stderr, None);
    let taker_pid = taker.id() as i32;
    std::mem::forget(taker);
    let status = first.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", log());
    let l = log();
    assert!(l.contains("took over from the running forwarder"), "{l}");
    assert!(l.contains(&format!("vsock cid any port {port}")), "{l}");
    assert!(alive(taker_pid));
    let again = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(u32::MAX, port));
    assert!(again.is_err(), "the successor listens on port {port}");
    signal(taker_pid, Signal::SIGTERM);
    wait_gone(taker_pid).await;
    let freed = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(u32::MAX, port));
    assert!(freed.is_ok(), "and lets go of it at exit");
}

/// Under systemd (`Type=notify`): READY=1 with the PID, RELOADING=1 on
/// SIGHUP, then MAINPID= and READY=1 again from the same pid (the bridge
/// never claims to be the service); nothing says STOPPING=1 until the
/// service stops. NOTIFY_SOCKET is a datagram
/// socket of the test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_and_the_same_main_pid() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // The upgraded process may run as nobody (started as root).
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut setup = Setup::start(&rx, &[]);
    // Setup started it without NOTIFY_SOCKET: start another, with it.
    let _ = setup.first.kill();
    let _ = setup.first.wait();
    std::fs::write(&setup.stderr, "").unwrap();
    let mut cmd = Command::new(&setup.exe);
    cmd.args(&setup.args)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&setup.stderr)
                .unwrap(),
        );
    setup.first = cmd.spawn().unwrap();
    let first = setup.first.id();
    let mut seen: Vec<String> = Vec::new();
    // Waits for a message containing `want` among those from `from` on.
    let recv_until = |from: usize, want: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while !seen.iter().skip(from).any(|m| m.contains(want)) {
            let n = notify
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no '{want}': {e}; got {seen:?}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    recv_until(0, &format!("MAINPID={first}\nREADY=1"), &mut seen);
    signal(first as i32, Signal::SIGHUP);
    recv_until(0, "RELOADING=1", &mut seen);
    let reloading = seen.len();
    // The bridge says nothing; the service's process, re-executed, is
    // ready again under the same pid.
    recv_until(reloading, &format!("MAINPID={first}\nREADY=1"), &mut seen);
    setup.wait_ready(3).await;
    let bridge = setup.ready_pids()[1];
    assert!(
        !seen
            .iter()
            .any(|m| m.contains(&format!("MAINPID={bridge}"))),
        "{seen:?}"
    );
    wait_gone(bridge).await;
    assert!(alive(first as i32), "the service keeps its pid");
    assert!(!seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    signal(first as i32, Signal::SIGTERM);
    recv_until(0, "STOPPING=1", &mut seen);
    assert!(setup.first.wait().unwrap().success());
}
