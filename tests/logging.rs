//! `--log-format json` read as a log pipeline reads it: every line of the
//! real binary's stderr is one JSON object, each key in it once (a reader
//! keeps only the last of two), and the counters are an object, not a JSON
//! document in a string.

mod common;

use std::fmt;
use std::path::PathBuf;

use common::{connect_when_listening, real_agent, wait_until, Forwarder};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// A JSON object's keys, in order, duplicates kept (serde_json's own map
/// keeps the last value of a key, and so hides them).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Each line as JSON, after checking that no key in it is there twice.
fn parse_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|line| {
            let Keys(keys) = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
            for (i, k) in keys.iter().enumerate() {
                assert!(!keys[..i].contains(k), "key {k:?} twice in: {line}");
            }
            serde_json::from_str(line).unwrap()
        })
        .collect()
}

fn with_message<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["message"] == message).collect()
}

/// Template mode (whose connections are served inside the sandbox's
/// tracing span): an agent connects, sends its spans and goes; the
/// counters are logged while it runs and when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_have_each_key_once_and_counters_as_objects() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/vc");
    let template = format!("{}/vm/{{ID}}/clh.sock", run.display());
    let args: Vec<String> = [
        "--socket-path-template",
        &format!("\"{template}\""),
        "--dump-only",
        "--log-format",
        "json",
        "--stats-interval",
        "50ms",
        "--batch-timeout",
        "50ms",
    ]
    .map(String::from)
    .to_vec();
    let mut fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;

    let sandbox = run.join("vm/sb-1");
    std::fs::create_dir_all(&sandbox).unwrap();
    let mut agent = connect_when_listening(&sandbox.join("clh.sock_10240")).await;
    let sc = real_agent(0);
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    agent.shutdown().await.unwrap();
    drop(agent);
    // The counters after the agent's spans: a line from before them may
    // come first on a busy machine.
    let spans = sc.expected.len() as u64;
    wait_until("the agent's end and the counters", &fwd, || {
        let log = fwd.stderr();
        // (A line still being written is skipped here.)
        let lines: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        log.contains("agent disconnected")
            && with_message(&lines, "counters")
                .iter()
                .any(|c| c["stats"]["spans_received"] == spans)
    })
    .await;
    let status = fwd.terminate().await;
    assert!(status.success(), "{status:?}; stderr:\n{}", fwd.stderr());

    let lines = parse_lines(&fwd.stderr());

    let [connected] = &with_message(&lines, "agent connected")[..] else {
        panic!("one 'agent connected' in:\n{}", fwd.stderr())
    };
    assert_eq!(connected["sandbox"], "sb-1", "{connected}");
    let [gone] = &with_message(&lines, "agent disconnected")[..] else {
        panic!("one 'agent disconnected' in:\n{}", fwd.stderr())
    };
    assert_eq!(gone["spans"], spans, "the count survives: {gone}");
    // The sandbox's span is still there, under its own key.
    assert_eq!(
        gone["span_list"],
        serde_json::json!([{"name": "sandbox", "id": "sb-1"}]),
        "{gone}"
    );

    let counters = with_message(&lines, "counters");
    assert!(!counters.is_empty());
    for c in &counters {
        assert!(c["stats"].is_object(), "an object: {c}");
    }
    assert!(counters
        .iter()
        .any(|c| c["stats"]["spans_received"] == spans));
    let [stopped] = &with_message(&lines, "forwarder stopped")[..] else {
        panic!("one 'forwarder stopped' in:\n{}", fwd.stderr())
    };
    let summary = &stopped["summary"];
    assert!(summary.is_object(), "an object: {stopped}");
    assert_eq!(summary["spans_received"], spans);
    assert_eq!(summary["connections_open"], 0);
}
