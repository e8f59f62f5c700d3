//! `--kata-host` with the real binary on a fixture tree like a kata-deploy
//! node's (tests/fixtures/kata-host: one configuration per hypervisor and
//! runtime, under a `--kata-root`): the plan `--print` shows; one forwarder
//! serving every hybrid template end to end (spans tagged with their
//! sandbox) and VSOCK bound; configurations added, removed and broken while
//! it runs; unusable, unknown and tracing-off configurations each saying
//! so; several listeners from the manual flags; and the Kubernetes
//! manifest's arguments accepted by the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    connect_within, files_named, print_plan, real_agent, string_attr, templates, wait_until,
    Forwarder, Receiver, BIN,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const SANDBOX_ID: &str = "kata.sandbox.id";
use common::{KATA_DEPLOY as DEPLOY, KATA_FIXTURE as FIXTURE};

fn config_report<'a>(plan: &'a serde_json::Value, file_end: &str) -> &'a serde_json::Value {
    plan["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"].as_str().unwrap().ends_with(file_end))
        .unwrap_or_else(|| panic!("no report for {file_end}: {plan:#}"))
}

fn spawn_kata_host(dir: tempfile::TempDir, root: &Path, extra: &[String]) -> Forwarder {
    common::kata_host_forwarder(Path::new(BIN), dir, root, extra)
}

/// Where the forwarder listens for sandbox `id` of `template`.
fn listen_path(template: &str, id: &str, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", template.replace("{ID}", id)))
}

/// Sends one untagged scenario per sandbox, over its template's socket, and
/// checks every span arrived once with its sandbox's id.
async fn spans_tagged_per_sandbox(rx: &Receiver, sandboxes: &[(String, PathBuf)], seq0: u64) {
    let before = rx.store.count();
    let mut sent = Vec::new();
    let mut agents = Vec::new();
    for (i, (id, socket)) in sandboxes.iter().enumerate() {
        let mut agent = connect_within(socket, Duration::from_secs(10)).await;
        let sc = real_agent(seq0 + i as u64);
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        agents.push(agent);
        sent.push((id.clone(), sc));
    }
    let total: usize = sent.iter().map(|(_, s)| s.expected.len()).sum();
    let got = rx
        .store
        .wait_for(before + total, Duration::from_secs(20))
        .await;
    let got = &got[before..];
    assert_eq!(got.len(), total, "every span once");
    for (id, sc) in &sent {
        for want in &sc.expected {
            let (resource, _) = common::find(got, want.span_id);
            assert_eq!(
                string_attr(&resource.attributes, SANDBOX_ID).as_deref(),
                Some(id.as_str()),
                "span '{}'",
                want.name
            );
        }
    }
}

/// The plan of the kata-deploy-like tree: each configuration's line, the
/// deduplicated listeners, under the root.
#[test]
fn print_shows_the_plan_of_every_configuration() {
    let (_dir, root) = common::fixture_host();
    let (code, plan, stderr) = print_plan(&root, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let r = root.display();
    assert_eq!(plan["listeners"][0]["kind"], "vsock", "{plan:#}");
    assert_eq!(
        templates(&plan),
        [
            format!("{r}/run/kata/{{ID}}/ch-vm.sock"),
            format!("{r}/run/kata/{{ID}}/root/kata.hvsock"),
            format!("{r}/run/vc/firecracker/{{ID}}/root/kata.hvsock"),
            format!("{r}/run/vc/vm/{{ID}}/clh.sock"),
        ]
    );
    for (file, runtime) in [
        ("/configuration-qemu.toml", "go"),
        ("/configuration-clh.toml", "go"),
        ("/configuration-fc.toml", "go"),
        ("runtime-rs/configuration-dragonball.toml", "runtime-rs"),
        (
            "runtime-rs/configuration-qemu-runtime-rs.toml",
            "runtime-rs",
        ),
        (
            "runtime-rs/configuration-cloud-hypervisor.toml",
            "runtime-rs",
        ),
        ("runtime-rs/configuration-fc-runtime-rs.toml", "runtime-rs"),
    ] {
        let c = config_report(&plan, file);
        assert_eq!(
            (c["status"].as_str(), c["runtime"].as_str()),
            (Some("serves"), Some(runtime)),
            "{c:#}"
        );
    }
    let gpu = config_report(&plan, "configuration-qemu-nvidia-gpu.toml");
    assert_eq!(gpu["status"], "skipped");
    assert!(
        gpu["skipped"][0]
            .as_str()
            .unwrap()
            .contains("enable_tracing"),
        "{gpu:#}"
    );
    let sv = config_report(&plan, "configuration-stratovirt.toml");
    assert_eq!(sv["status"], "skipped");
    assert!(sv["skipped"][0]
        .as_str()
        .unwrap()
        .contains("unknown hypervisor section [hypervisor.stratovirt]"));
    // One log line per configuration, on stderr.
    assert_eq!(
        stderr.matches("kata configuration: ").count(),
        9,
        "{stderr}"
    );

    // KATA_CONF_FILE is read first, under the root.
    std::fs::create_dir_all(root.join("srv")).unwrap();
    std::fs::write(
        root.join("srv/mine.toml"),
        "[hypervisor.clh]\n[agent.kata]\nenable_tracing = true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--kata-host", "--print", "--kata-root"])
        .arg(&root)
        .env("KATA_CONF_FILE", "/srv/mine.toml")
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["configs"][0]["file"], "/srv/mine.toml");
    assert_eq!(plan["configs"][0]["status"], "serves");
}

/// One forwarder, every runtime class of the tree: VSOCK bound, and a
/// sandbox of each hybrid template served end to end, each span with its
/// sandbox's id; what it serves is what `--print` planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forwarder_serves_every_hypervisor_and_runtime() {
    let rx = Receiver::start().await;
    let (dir, root) = common::fixture_host();
    let (code, plan, stderr) = print_plan(&root, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let planned = templates(&plan);
    let mut fwd = spawn_kata_host(dir, &root, &rx.args("grpc"));
    fwd.wait_listening().await;
    let log = fwd.stderr();
    let ready = log
        .lines()
        .find(|l| l.contains("forwarder ready"))
        .unwrap()
        .to_owned();
    // The plan is what is served: VSOCK and each template, nothing else.
    assert!(ready.contains("vsock cid any port 10240"), "{ready}");
    for t in &planned {
        assert!(ready.contains(&format!("unix:{t}_10240")), "{t} in {ready}");
    }
    assert_eq!(ready.matches("unix:").count(), planned.len(), "{ready}");
    assert_eq!(
        log.matches("kata-host: serving").count(),
        planned.len() + 1,
        "{log}"
    );
    // The skipped ones say why.
    for needle in [
        "configuration-qemu-nvidia-gpu.toml",
        "enable_tracing is not true",
        "unknown hypervisor section [hypervisor.stratovirt]",
    ] {
        assert!(log.contains(needle), "{needle}: {log}");
    }

    // A sandbox per template, its directories as its VMM makes them.
    let sandboxes: Vec<(String, PathBuf)> = planned
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = format!("sandbox-{i}");
            let socket = listen_path(t, &id, 10240);
            std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
            (id, socket)
        })
        .collect();
    spans_tagged_per_sandbox(&rx, &sandboxes, 300).await;

    let status = fwd.terminate().await;
    assert!(status.success(), "{status:?}; stderr:\n{}", fwd.stderr());
    assert_eq!(
        files_named(&root.join("run"), "_10240"),
        Vec::<PathBuf>::new(),
        "every socket removed at exit"
    );
}

/// A configuration added while the forwarder runs is served within a
/// second; removed, it is no longer served or watched; broken, it keeps
/// what it had, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_followed_at_run_time() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let deploy = root.join(DEPLOY);
    std::fs::create_dir_all(&deploy).unwrap();
    std::fs::copy(
        Path::new(FIXTURE)
            .join(DEPLOY)
            .join("configuration-qemu.toml"),
        deploy.join("configuration-qemu.toml"),
    )
    .unwrap();
    // A Cloud Hypervisor sandbox already there when its class is installed.
    let sandbox = root.join("run/vc/vm/sb-late");
    std::fs::create_dir_all(&sandbox).unwrap();
    let socket = sandbox.join("clh.sock_20001");

    // A VSOCK port of its own: the tests of this file run at once.
    let mut extra = vec!["--vsock-port".to_string(), "20001".to_string()];
    extra.extend(rx.args("grpc"));
    let mut fwd = spawn_kata_host(dir, &root, &extra);
    fwd.wait_listening().await;
    assert!(!socket.exists());

    // kata-deploy installs the class: written elsewhere, renamed in.
    let clh = std::fs::read(
        Path::new(FIXTURE)
            .join(DEPLOY)
            .join("configuration-clh.toml"),
    )
    .unwrap();
    std::fs::write(root.join("clh.tmp"), &clh).unwrap();
    let added = Instant::now();
    std::fs::rename(root.join("clh.tmp"), deploy.join("configuration-clh.toml")).unwrap();
    let agent = connect_within(&socket, Duration::from_secs(5)).await;
    let took = added.elapsed();
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    drop(agent);
    spans_tagged_per_sandbox(&rx, &[("sb-late".to_string(), socket.clone())], 400).await;

    // A broken rewrite keeps it served, with the error naming the file.
    std::fs::write(
        deploy.join("configuration-clh.toml"),
        "[hypervisor.clh\nthis is not toml",
    )
    .unwrap();
    wait_until("the broken configuration to be reported", &fwd, || {
        let log = fwd.stderr();
        log.contains("kata configuration: unusable")
            && log.contains("parsing Kata configuration /opt/kata/share/defaults/kata-containers/configuration-clh.toml")
            && log.contains("keeping what it was served for")
    })
    .await;
    assert!(UnixStream::connect(&socket).await.is_ok(), "still served");

    // Removed: its sandboxes' listeners close and their sockets go; a new
    // sandbox is not served.
    std::fs::remove_file(deploy.join("configuration-clh.toml")).unwrap();
    wait_until("the template to stop", &fwd, || {
        fwd.stderr().contains("kata-host: no longer serving") && !socket.exists()
    })
    .await;
    let after = root.join("run/vc/vm/sb-after");
    std::fs::create_dir_all(&after).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!after.join("clh.sock_20001").exists(), "no longer watched");
    assert!(UnixStream::connect(&socket).await.is_err());

    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
}

/// A configuration that is not TOML stops `--print` and the start, naming
/// the file; a missing directory is no error.
#[test]
fn garbage_configuration_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let etc = root.join("etc/kata-containers");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("configuration.toml"),
        "[hypervisor.qemu\nnot = toml = at all",
    )
    .unwrap();
    let (code, plan, stderr) = print_plan(&root, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(plan["configs"][0]["status"], "error", "{plan:#}");
    assert!(
        stderr.contains("parsing Kata configuration /etc/kata-containers/configuration.toml"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args(["--kata-host", "--dump-only", "--kata-root"])
        .arg(&root)
        .env_remove("KATA_CONF_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("parsing Kata configuration /etc/kata-containers/configuration.toml"),
        "{stderr}"
    );

    // Nothing at all under the root: an empty plan, exit 0.
    let empty = tempfile::tempdir().unwrap();
    let (code, plan, stderr) = print_plan(empty.path(), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(plan["listeners"], serde_json::json!([]));
}

/// The manual flags: VSOCK beside two templates in one forwarder, each
/// template's sandboxes served and tagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsock_beside_several_templates() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let clh = format!("{}/vc/vm/{{ID}}/clh.sock", run.display());
    let fc = format!("{}/vc/firecracker/{{ID}}/root/kata.hvsock", run.display());
    // A VSOCK port of its own: the tests of this file run at once.
    let mut args = vec![
        "--vsock-port".to_string(),
        "20002".to_string(),
        "--vsock".to_string(),
        "--socket-path-template".to_string(),
        clh.clone(),
        "--socket-path-template".to_string(),
        fc.clone(),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend(rx.args("http/protobuf"));
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;
    let ready = fwd.stderr();
    assert!(ready.contains("vsock cid any port 20002"), "{ready}");
    let sandboxes: Vec<(String, PathBuf)> = [("a", &clh), ("b", &fc)]
        .iter()
        .map(|(id, t)| {
            let socket = listen_path(t, id, 20002);
            std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
            (id.to_string(), socket)
        })
        .collect();
    spans_tagged_per_sandbox(&rx, &sandboxes, 500).await;
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(files_named(&run, "_20002").is_empty());
}

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/kata-trace-forwarder.yaml"
);

/// The list under `key:` (a block sequence of scalars, one a line), as the
/// manifest writes its container's args.
fn yaml_list(text: &str, key: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}:"));
    let Some(head) = lines.next() else {
        return Vec::new();
    };
    let indent = head.len() - head.trim_start().len();
    lines
        .take_while(|l| {
            let t = l.trim_start();
            t.starts_with("- ") && l.len() - t.len() >= indent
        })
        .map(|l| {
            let v = l.trim_start()[2..].trim();
            v.trim_matches('"').trim_matches('\'').to_owned()
        })
        .collect()
}

/// The DaemonSet's arguments are the binary's: run with them (plus the
/// fixture's root and --print), it accepts them and plans every runtime
/// class of the tree; what it reads and serves is under what the manifest
/// mounts; the collector comes from the environment.
#[test]
fn kubernetes_manifest_arguments_are_accepted() {
    let text = std::fs::read_to_string(MANIFEST).unwrap();
    let args = yaml_list(&text, "args");
    assert!(args.contains(&"--kata-host".to_string()), "{args:?}");
    assert!(text.contains("name: OTEL_EXPORTER_OTLP_ENDPOINT"));
    assert!(text.contains("katacontainers.io/kata-runtime: \"true\""));
    assert!(text.contains("privileged: false"));
    let (_dir, root) = common::fixture_host();
    let out = Command::new(BIN)
        .args(&args)
        .arg("--kata-root")
        .arg(&root)
        .arg("--print")
        .env_remove("KATA_CONF_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(templates(&plan).len(), 4, "{plan:#}");

    let mount_paths: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .map(str::to_owned)
        .collect();
    assert!(!mount_paths.is_empty());
    let r = root.display().to_string();
    for t in templates(&plan) {
        let host_path = t.strip_prefix(&r).unwrap();
        assert!(
            mount_paths
                .iter()
                .any(|m| host_path.starts_with(&format!("{m}/"))),
            "{host_path} is not under a mount: {mount_paths:?}"
        );
    }
    for c in plan["configs"].as_array().unwrap() {
        let f = c["file"].as_str().unwrap();
        assert!(
            mount_paths.iter().any(|m| f.starts_with(&format!("{m}/"))),
            "{f} is not under a mount: {mount_paths:?}"
        );
    }
    // A rolling update hands over: the new pod starts beside the old one
    // and finds it at a hand-off socket on a host mount both have.
    let at = args.iter().position(|a| a == "--handoff-socket");
    let handoff = at.and_then(|i| args.get(i + 1)).expect("--handoff-socket");
    assert!(
        mount_paths
            .iter()
            .any(|m| handoff.starts_with(&format!("{m}/"))),
        "{handoff} is not under a mount: {mount_paths:?}"
    );
    assert!(text.contains("maxSurge: 1") && text.contains("maxUnavailable: 0"));
}
