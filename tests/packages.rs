//! The release image, run by podman the way the DaemonSet runs it (not
//! privileged, every capability dropped but the four the forwarder uses, a
//! read-only root, no new privileges): agents on the host reach it through
//! a host directory, and their spans reach a collector on the host.
//!
//! scripts/test-packages.sh builds the image and runs these with KTF_IMAGE
//! set and podman pointed at its private store (CONTAINERS_CONF,
//! CONTAINERS_STORAGE_CONF); a plain `cargo test` leaves them ignored.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agents::{assert_exactly_once, wait_spans, Agents};
use common::{assert_span_eq, find, send_both_formats, Receiver, KATA_DEPLOY, KATA_FIXTURE};

/// As deploy/kubernetes/kata-trace-forwarder.yaml's securityContext
/// (deploy/kubernetes/check holds the manifest to it).
const DAEMONSET_SECURITY: &[&str] = &[
    "--read-only",
    "--cap-drop",
    "all",
    "--cap-add",
    "DAC_OVERRIDE,SETUID,SETGID,SETPCAP",
    "--security-opt",
    "no-new-privileges",
];

fn image() -> String {
    std::env::var("KTF_IMAGE")
        .expect("KTF_IMAGE is not set: scripts/test-packages.sh builds the image and runs these")
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// A detached container, removed however the test ends.
struct Container(String);

impl Container {
    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn inspect(&self, format: &str) -> String {
        text(&podman(&["inspect", "--format", format, &self.0]).stdout)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

/// The real uid of a host process (the container's, seen from the host).
fn uid_of(pid: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image: scripts/test-packages.sh"]
async fn image_forwards_host_agents_spans_to_a_host_collector() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let socket = dir.path().join("kata.hvsock");
    let agent_socket = dir.path().join("kata.hvsock_10240");
    let name = format!("ktf-test-{}", std::process::id());
    let volume = format!("{d}:{d}");
    let (image, socket_arg, handoff) = (
        image(),
        socket.display().to_string(),
        format!("{d}/handoff.sock"),
    );
    let mut args = vec!["run", "-d", "--name", &name, "--network", "host"];
    args.extend(DAEMONSET_SECURITY);
    args.extend(["-v", &volume, &image]);
    args.extend([
        "--socket-path",
        &socket_arg,
        "--batch-timeout",
        "50ms",
        "--handoff-socket",
        &handoff,
    ]);
    let otlp = rx.args("grpc");
    args.extend(otlp.iter().map(String::as_str));
    let out = podman(&args);
    assert!(out.status.success(), "podman run: {}", text(&out.stderr));
    let ctr = Container(name);

    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr.logs().contains("forwarder ready") {
        assert!(
            Instant::now() < deadline,
            "not ready in the container:\n{}",
            ctr.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Started as root, it became nobody: the image's /etc/passwd has it.
    let pid = ctr.inspect("{{.State.Pid}}");
    assert_eq!(uid_of(&pid), 65534, "the forwarder's uid, pid {pid}");

    // Both wire formats, field by field, through the real SDKs' frames.
    let want = send_both_formats(&agent_socket).await;
    let got = rx.store.wait_for(want.len(), Duration::from_secs(30)).await;
    for w in &want {
        let (resource, span) = find(&got, w.span_id);
        assert_span_eq(w, resource, span, "kata-agent");
    }
    // Then a steady load from four agents: every span exactly once.
    let agents = Agents::start(&agent_socket, 4, 250).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (sent, errors) = agents.finish().await;
    assert_eq!(errors, 0, "no agent saw a write error");
    let total = want.len() + sent;
    wait_spans(&rx, total).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&rx, total);
    println!("image: {total} spans from host agents reached the host collector");

    // SIGTERM (podman stop) drains, exits 0 and removes its socket.
    let out = podman(&["stop", "-t", "20", &ctr.0]);
    assert!(out.status.success(), "podman stop: {}", text(&out.stderr));
    assert_eq!(ctr.inspect("{{.State.ExitCode}}"), "0", "{}", ctr.logs());
    assert!(
        !agent_socket.exists(),
        "socket left behind:\n{}",
        ctr.logs()
    );
}

/// The DaemonSet's mount of kata-deploy's configurations, and the plan the
/// image makes from them: every runtime class of the fixture node.
#[test]
#[ignore = "needs the image: scripts/test-packages.sh"]
fn image_plans_the_kata_host_from_the_daemonset_mount() {
    let defaults = Path::new(KATA_FIXTURE).join(KATA_DEPLOY);
    let defaults = defaults.parent().unwrap().display().to_string();
    let volume = format!("{defaults}:/opt/kata/share/defaults:ro");
    let image = image();
    let mut args = vec!["run", "--rm", "--network", "none"];
    args.extend(DAEMONSET_SECURITY);
    args.extend(["-v", &volume, &image, "--kata-host", "--print"]);
    let out = podman(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let templates: Vec<&str> = plan["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["template"].as_str())
        .collect();
    assert_eq!(templates.len(), 4, "{plan:#}");
    for t in &templates {
        assert!(
            t.starts_with("/run/vc/") || t.starts_with("/run/kata/"),
            "{t}: not under the DaemonSet's sandbox mounts"
        );
    }
    for c in plan["configs"].as_array().unwrap() {
        let f = c["file"].as_str().unwrap();
        assert!(f.starts_with("/opt/kata/share/defaults/"), "{f}");
    }
}
