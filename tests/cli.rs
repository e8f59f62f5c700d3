//! The binary's contract with operators: flags, errors, startup checks,
//! socket handling, and both listener kinds.

mod common;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_agent, Forwarder, Receiver, BIN};
use kata_agent_emitter::{scenario, ScenarioOptions};
use tokio::io::AsyncWriteExt;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (code, out, _) = run(&["-v"]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for needle in [
        "QEMU",
        "Cloud Hypervisor",
        "Firecracker",
        "--socket-path",
        "--otlp-protocol",
        "--dump-only",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

#[test]
fn invalid_values_are_clear_errors() {
    for (args, needle) in [
        (vec!["--vsock-port", "0"], "port must not be 0"),
        (vec!["--vsock-port", "ten"], "not a port number"),
        (vec!["--socket-path", ""], "a value is required"),
        (vec!["--trace-name", ""], "a value is required"),
        (vec!["--otlp-endpoint", ""], "a value is required"),
        (vec!["--otlp-protocol", "udp"], "unknown OTLP protocol"),
        (vec!["--log-level", "verbose"], "invalid value"),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?} should be a usage error: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in:\n{err}"
        );
    }
    // Without a scheme, only gRPC has a rule (TLS unless insecure, as the
    // OTLP exporter spec says); an HTTP endpoint needs its scheme.
    let (code, _, err) = run(&[
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        "localhost:4318",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid OTLP endpoint 'localhost:4318'"),
        "{err}"
    );
}

/// The documented contract: no collector, no forwarder. It exits non-zero
/// within 10 s and names the endpoint it tried.
#[test]
fn exits_with_clear_error_when_collector_is_unreachable() {
    for protocol in ["grpc", "http/protobuf"] {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let started = Instant::now();
        let (code, _, err) = run(&[
            "--otlp-protocol",
            protocol,
            "--otlp-endpoint",
            &endpoint,
            "--socket-path",
            sock.to_str().unwrap(),
        ]);
        let took = started.elapsed();
        assert_ne!(code, 0, "{protocol}: {err}");
        assert!(took < Duration::from_secs(10), "{protocol}: took {took:?}");
        assert!(
            err.contains(&format!("127.0.0.1:{port}")),
            "{protocol}: endpoint not named:\n{err}"
        );
        assert!(err.contains("cannot reach the OTLP collector"), "{err}");
        assert!(
            !dir.path().join("s.sock_10240").exists(),
            "no socket is left behind when startup fails"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_a_stale_socket() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("clh.sock");
    let agent_socket = dir.path().join("clh.sock_10240");
    // A socket file nobody listens on any more, as a killed forwarder leaves.
    drop(StdUnixListener::bind(&agent_socket).unwrap());
    assert!(agent_socket.exists());

    let mut args = vec![
        "--socket-path".to_string(),
        socket_path.display().to_string(),
    ];
    args.extend(rx.args("grpc"));
    let mut fwd = Forwarder::spawn_in(dir, socket_path, &args);
    fwd.wait_listening().await;
    assert!(
        fwd.stderr().contains("replacing stale socket"),
        "{}",
        fwd.stderr()
    );

    let sc = scenario(&ScenarioOptions::default());
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    rx.store
        .wait_for(sc.expected.len(), Duration::from_secs(20))
        .await;
    assert!(fwd.terminate().await.success());
}

/// Starts a dump-only forwarder on `socket_path` and expects it to refuse
/// with exit code 1 and `needle` in its error.
fn refuses_to_start(socket_path: &std::path::Path, needle: &str) {
    let (code, _, err) = run(&[
        "--dump-only",
        "--socket-path",
        socket_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(needle), "expected '{needle}' in:\n{err}");
}

#[test]
fn never_deletes_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("fc.sock_10240");
    std::fs::write(&victim, b"precious").unwrap();
    refuses_to_start(
        &dir.path().join("fc.sock"),
        "is not a socket; refusing to replace it",
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn refuses_a_socket_another_forwarder_is_listening_on() {
    let dir = tempfile::tempdir().unwrap();
    let _live = StdUnixListener::bind(dir.path().join("a.sock_10240")).unwrap();
    refuses_to_start(
        &dir.path().join("a.sock"),
        "in use by another live listener",
    );
}

#[test]
fn says_when_the_sandbox_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    refuses_to_start(
        &dir.path().join("no-such-sandbox").join("clh.sock"),
        "does not exist: create the sandbox directory first",
    );
}

/// Standard VSOCK: the host kernel here has AF_VSOCK but no loopback, so
/// this shows the listener binds and listens (and holds its port: a second
/// forwarder on the same port is refused), which is all the AF_VSOCK-specific
/// code does before handing streams to the shared connection path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_and_listens_on_af_vsock() {
    let port = 20000 + (std::process::id() % 20000);
    let port_s = port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = ["--dump-only", "--vsock-cid", "any", "--vsock-port", &port_s]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut first = Forwarder::spawn_in(dir, Default::default(), &args);
    first.wait_listening().await;
    assert!(
        first
            .stderr()
            .contains(&format!("vsock cid any port {port}")),
        "{}",
        first.stderr()
    );
    let listening = std::fs::read_to_string("/proc/net/vsock").ok();
    if let Some(table) = listening {
        // Columns: ... local address (cid:port in hex) ... state 0A = listen.
        let hex_port = format!("{port:08X}");
        assert!(
            table.lines().any(|l| l.contains(&hex_port)),
            "port {port} not in /proc/net/vsock:\n{table}"
        );
    }
    let (code, _, err) = run(&["--dump-only", "--vsock-port", &port_s]);
    assert_eq!(code, 1, "second bind must fail: {err}");
    assert!(
        err.contains(&format!("binding VSOCK cid any port {port}")),
        "{err}"
    );
    assert!(first.terminate().await.success());
}

/// As root in hybrid mode, the forwarder binds, then runs as `nobody` with
/// no capabilities; the socket is still removed at exit (by its janitor).
/// As another user it simply keeps that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_root_after_binding_and_still_cleans_up() {
    let mut fwd = Forwarder::hybrid(&["--dump-only".to_string()]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", fwd.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    let uids = field("Uid:");
    let me = nix::unistd::getuid().as_raw().to_string();
    if me == "0" {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let nobody = nobody.uid.as_raw().to_string();
        assert!(
            uids.iter().all(|u| *u == nobody),
            "real, effective, saved, fs uids: {uids:?}"
        );
        assert_eq!(field("CapEff:"), vec!["0000000000000000"]);
        assert_eq!(field("CapPrm:"), vec!["0000000000000000"]);
        assert!(fwd.stderr().contains("dropped root privileges"));
    } else {
        assert!(uids.iter().all(|u| *u == me), "{uids:?}");
    }
    assert!(fwd.agent_socket.exists());
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(
        !fwd.agent_socket.exists(),
        "socket removed at exit:\n{}",
        fwd.stderr()
    );
}
