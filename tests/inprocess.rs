//! The forwarder run in-process through `kata_trace_forwarder::serve`, on
//! listeners and a sink the test makes itself: the entry point an embedder
//! or a test uses, beside the tests that spawn the binary. Agent frames come
//! from the real opentelemetry 0.17 and 0.14 SDKs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use common::{assert_span_eq, find, Receiver};
use kata_agent_emitter::{scenario, ScenarioOptions, WireFormat};
use kata_trace_forwarder::config::{Cli, Output};
use kata_trace_forwarder::export::Sink;
use kata_trace_forwarder::listen::hybrid::HybridListener;
use kata_trace_forwarder::listen::{Listener, Listeners};
use kata_trace_forwarder::shutdown::Shutdown;
use kata_trace_forwarder::{serve, Config};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// A validated configuration from these flags, with no environment.
fn config(args: &[&str]) -> Config {
    let cli =
        Cli::try_parse_from(std::iter::once("kata-trace-forwarder").chain(args.iter().copied()))
            .expect("flags parse");
    cli.into_config(&|_: &str| None).expect("flags are valid")
}

/// A hybrid listener in a fresh directory, and where agents connect.
fn hybrid(dir: &tempfile::TempDir) -> (Listeners, std::path::PathBuf) {
    let path = dir.path().join("kata.hvsock_1024");
    let listener = HybridListener::bind(&path).expect("bind");
    (Listeners::new(vec![Listener::Hybrid(listener)], 16), path)
}

/// Both wire formats' scenarios, written by one agent each, arrive through
/// an in-process forwarder exactly as the real SDKs produced them; stopping
/// drains, returns the counters and removes the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_both_formats_in_process_into_a_collector() {
    let rx = Receiver::start().await;
    let cfg = config(&[
        "--otlp-endpoint",
        &rx.grpc_endpoint,
        "--trace-name",
        "in-process",
    ]);
    let Output::Otlp(otlp) = &cfg.output else {
        panic!("expected OTLP output");
    };
    let sink = Sink::connect(otlp, Duration::from_secs(5))
        .await
        .expect("collector reachable");
    let dir = tempfile::tempdir().unwrap();
    let (listeners, socket) = hybrid(&dir);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let forwarder = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        serve(&cfg, listeners, sink, Shutdown::new(), stop).await
    });

    let scenarios: Vec<_> = WireFormat::ALL
        .into_iter()
        .map(|format| {
            scenario(&ScenarioOptions {
                format,
                ..Default::default()
            })
        })
        .collect();
    let mut agents = Vec::new();
    for sc in &scenarios {
        let mut agent = UnixStream::connect(&socket).await.expect("connect");
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        agents.push(agent);
    }
    let want: usize = scenarios.iter().map(|s| s.expected.len()).sum();
    let got = rx.store.wait_for(want, Duration::from_secs(20)).await;
    assert_eq!(got.len(), want, "no span lost or duplicated");
    for sc in &scenarios {
        for span in &sc.expected {
            let (resource, got) = find(&got, span.span_id);
            assert_span_eq(span, resource, got, "in-process");
        }
    }

    drop(agents);
    stop_tx.send(()).unwrap();
    let summary = forwarder.await.unwrap().expect("serve ends cleanly");
    assert_eq!(summary.spans_received, want as u64);
    assert_eq!(summary.spans_exported, want as u64);
    assert_eq!(summary.spans_json + summary.spans_bincode, want as u64);
    assert!(summary.spans_json > 0 && summary.spans_bincode > 0);
    assert_eq!(summary.spans_dropped.total(), 0);
    assert_eq!(summary.connections_accepted, 2);
    assert_eq!(
        summary.connections_open, 0,
        "every connection guard dropped"
    );
    assert!(
        !socket.exists(),
        "the listener's socket is removed on the way out"
    );
}

/// What a test's writer collects.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The dump sink honours the same contract as the collectors: spans an agent
/// wrote just before stopping are drained and written as OTLP JSON lines,
/// one per span, and counted as exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_into_the_dump_sink() {
    let cfg = config(&["--dump-only", "--batch-timeout", "10s"]);
    let out = Shared::default();
    let sink = Sink::dump(Box::new(out.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (listeners, socket) = hybrid(&dir);
    let sc = scenario(&ScenarioOptions {
        format: WireFormat::Bincode,
        ..Default::default()
    });
    let (written_tx, written_rx) = oneshot::channel::<()>();
    let agent = {
        let socket = socket.clone();
        let bytes = sc.stream_bytes();
        tokio::spawn(async move {
            let mut agent = UnixStream::connect(&socket).await.expect("connect");
            agent.write_all(&bytes).await.unwrap();
            let _ = written_tx.send(());
            // Held open: shutdown must drain it, not wait for it to close.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(agent);
        })
    };
    // Stop as soon as the agent has written: the batch timeout (10 s) has
    // not fired, so only the drain and flush at shutdown can deliver.
    let stop = async {
        let _ = written_rx.await;
    };
    let summary = serve(&cfg, listeners, sink, Shutdown::new(), stop)
        .await
        .expect("serve ends cleanly");
    agent.abort();

    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), sc.expected.len(), "{text}");
    for want in &sc.expected {
        let id = format!("{:016x}", want.span_id);
        assert!(
            lines.iter().any(
                |l| l["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] == id.as_str()
            ),
            "span {id} missing from:\n{text}"
        );
    }
    assert_eq!(summary.spans_exported, sc.expected.len() as u64);
    assert_eq!(summary.spans_dropped.total(), 0);
}
