//! `--dump-only --dump-format tree`: the real binary prints what a real
//! agent's SDK sent as indented trees on stdout.

mod common;

use common::{connect_agent, wait_until, Forwarder};
use kata_agent_emitter::{scenario, Scenario, ScenarioOptions};
use tokio::io::AsyncWriteExt;

/// Sends the scenario as one agent connection that then closes.
async fn send(fwd: &Forwarder, sc: &Scenario) {
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    agent.shutdown().await.unwrap();
}

async fn tree_forwarder(extra: &[&str]) -> Forwarder {
    let mut args = vec!["--dump-only".to_string(), "--dump-format=tree".to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    Forwarder::hybrid(&args).await
}

/// The agent's scenario under a span of the runtime's in `trace_id`.
fn under_the_runtime(trace_id: u128) -> Scenario {
    scenario(&ScenarioOptions {
        parent: Some(kata_agent_emitter::RemoteParent {
            trace_id,
            span_id: 0x00f0_67aa_0ba9_02b7,
        }),
        ..Default::default()
    })
}

/// The indentation of the line that starts with `name` (after the spaces).
fn indent_of(out: &str, name: &str) -> usize {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"));
    line.len() - line.trim_start().len()
}

#[tokio::test]
async fn dump_tree_prints_each_trace_as_an_indented_tree() {
    let mut fwd = tree_forwarder(&["--dump-linger=300ms"]).await;
    let sc = scenario(&ScenarioOptions::default());
    send(&fwd, &sc).await;

    // The second tree hangs under the runtime's span, which never comes
    // here: it shows after the linger, while the forwarder runs.
    wait_until("both trees printed", &fwd, || {
        fwd.stdout().contains("start_container")
    })
    .await;
    let status = fwd.terminate().await;
    assert!(status.success());
    let out = fwd.stdout();

    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("trace "), "a trace header first:\n{out}");
    assert!(!out.contains('\x1b'), "no colour in a pipe:\n{out}");
    let root = indent_of(&out, "create_container");
    assert_eq!(root, 2, "{out}");
    assert_eq!(indent_of(&out, "do_create_container"), root + 2, "{out}");
    assert_eq!(indent_of(&out, "mount  "), root + 4, "{out}");
    assert_eq!(indent_of(&out, "mount_storage"), root + 6, "{out}");
    assert_eq!(indent_of(&out, "setup_cgroups"), root + 4, "{out}");
    assert_eq!(
        indent_of(&out, "publish_container_event"),
        root + 2,
        "{out}"
    );
    // Siblings by start time: mount, setup_cgroups, start_process.
    let at = |name: &str| out.find(&format!("  {name}  ")).unwrap();
    assert!(at("mount") < at("setup_cgroups") && at("setup_cgroups") < at("start_process"));
    let storage = out
        .lines()
        .find(|l| l.trim_start().starts_with("mount_storage"))
        .unwrap();
    assert!(storage.contains("ERROR: mount failed"), "{storage}");
    // Every span of the scenario is printed once.
    for want in &sc.expected {
        let name: String = want
            .name
            .chars()
            .take(20)
            .filter(|c| !c.is_control())
            .collect();
        assert!(out.contains(&name), "{} missing:\n{out}", want.name);
    }
}

/// As in Kata, every agent span hangs under the runtime's, which goes to
/// the collector and never here: the trees show after `--dump-linger`,
/// while the forwarder runs, their top spans marked.
#[tokio::test]
async fn dump_tree_prints_a_trace_without_its_root_after_the_linger() {
    let fwd = tree_forwarder(&["--dump-linger=200ms"]).await;
    let sc = under_the_runtime(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
    let sent = std::time::Instant::now();
    send(&fwd, &sc).await;
    wait_until("the lingering trace printed", &fwd, || {
        fwd.stdout().contains("oom_event_listener")
    })
    .await;
    assert!(sent.elapsed() >= std::time::Duration::from_millis(200));
    let out = fwd.stdout();
    assert!(
        out.starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736"),
        "{out}"
    );
    for top in ["create_container", "start_container"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("  {top}  ")))
            .unwrap_or_else(|| panic!("{top} at the top in:\n{out}"));
        assert!(line.ends_with("[parent not received]"), "{line}");
    }
}

/// What is still lingering when the forwarder stops is printed on the way
/// out, not lost.
#[tokio::test]
async fn dump_tree_prints_what_it_holds_at_exit() {
    let mut fwd = tree_forwarder(&["--dump-linger=10m", "--stats-interval=50ms"]).await;
    let sc = under_the_runtime(7);
    send(&fwd, &sc).await;
    let written = format!("\"spans_exported\":{}", sc.expected.len());
    wait_until("the spans reached the tree", &fwd, || {
        fwd.stderr().contains(&written)
    })
    .await;
    assert_eq!(fwd.stdout(), "", "held for the linger");
    assert!(fwd.terminate().await.success());
    let out = fwd.stdout();
    assert!(
        out.starts_with("trace 00000000000000000000000000000007"),
        "{out}"
    );
    assert!(out.contains("\n      oom_event_listener  "), "{out}");
}
