//! Collectors restart and hosts reboot; the spans of a container start
//! happen once. These tests take the collector away in every way we can and
//! check that not one span is lost.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{connect_agent, free_port, metric, wait_metric, Forwarder, Receiver};
use kata_agent_emitter::{bulk_frames, scenario, ScenarioOptions, WireFormat};
use tokio::io::AsyncWriteExt;

fn metrics_args(port: u16) -> Vec<String> {
    vec!["--metrics-address".into(), format!("127.0.0.1:{port}")]
}

/// Every span id received, with how often: duplicates are allowed after a
/// crash (at-least-once), losses never.
fn span_ids(rx: &Receiver) -> HashMap<Vec<u8>, usize> {
    let mut ids = HashMap::new();
    for (_, s) in rx.store.spans.lock().unwrap().iter() {
        *ids.entry(s.span_id.clone()).or_insert(0) += 1;
    }
    ids
}

fn all_arrived(rx: &Receiver, frames_sent: &[kata_agent_emitter::ExpectedSpan]) {
    let ids = span_ids(rx);
    for want in frames_sent {
        assert!(
            ids.contains_key(want.span_id.to_be_bytes().as_slice()),
            "span {} lost",
            want.name
        );
    }
}

async fn refusing_collector(protocol: &str) {
    let rx = Receiver::start().await;
    rx.store
        .fail_first
        .store(4, std::sync::atomic::Ordering::SeqCst);
    let port = free_port();
    let mut args = rx.args(protocol);
    args.extend(metrics_args(port));
    let mut fwd = Forwarder::hybrid(&args).await;
    let sc = scenario(&ScenarioOptions::default());
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    rx.store
        .wait_for(sc.expected.len(), Duration::from_secs(30))
        .await;
    all_arrived(&rx, &sc.expected);
    assert!(wait_metric(port, "kata_trace_forwarder_export_retries_total", 4).await >= 4);
    // Counted once the collector's answer is in, a moment after it stored
    // the spans.
    let n = sc.expected.len() as u64;
    assert_eq!(
        wait_metric(port, "kata_trace_forwarder_spans_exported_total", n).await,
        n
    );
    assert!(fwd.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_refusing_the_first_exports_loses_nothing() {
    refusing_collector("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_refusing_the_first_exports_loses_nothing() {
    refusing_collector("http/protobuf").await;
}

/// A collector killed mid-stream and back 30 s later, while the agent keeps
/// sending at an ordinary rate: every span arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_and_restarted_mid_stream_loses_nothing() {
    let mut rx = Receiver::start().await;
    let port = free_port();
    let mut args = rx.args("grpc");
    args.extend(metrics_args(port));
    let mut fwd = Forwarder::hybrid(&args).await;
    let frames = bulk_frames(WireFormat::Json, 1800, 1000, 1);
    let mut agent = connect_agent(&fwd.agent_socket).await;

    agent.write_all(&frames[..300].concat()).await.unwrap();
    rx.store.wait_for(300, Duration::from_secs(30)).await;
    rx.kill();
    // 30 s of outage at 40 spans/s.
    for chunk in frames[300..1500].chunks(40) {
        agent.write_all(&chunk.concat()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rx.restart();
    agent.write_all(&frames[1500..].concat()).await.unwrap();
    rx.store.wait_for(1800, Duration::from_secs(60)).await;
    assert_eq!(span_ids(&rx).len(), 1800, "every distinct span arrived");
    assert!(metric(port, "kata_trace_forwarder_export_retries_total").await > 0);
    assert_eq!(
        metric(
            port,
            "kata_trace_forwarder_spans_dropped_total{reason=\"export\"}"
        )
        .await,
        0
    );
    assert!(fwd.terminate().await.success());
}

/// Collector down, spans sent, forwarder stopped: they go to the spool.
/// Both restarted: every span arrives exactly once, and the spool empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_forwarder_restart_and_delivers_exactly_once() {
    let mut rx = Receiver::start().await;
    rx.kill();
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().join("spool");
    let port = free_port();
    let mut args = rx.args("grpc");
    args.extend(metrics_args(port));
    args.extend([
        "--spool-dir".into(),
        spool_dir.display().to_string(),
        "--shutdown-timeout".into(),
        "1s".into(),
    ]);
    // The collector is away, so this forwarder cannot start the usual way;
    // start it while the collector is up, then take the collector down.
    rx.restart();
    let mut fwd = Forwarder::hybrid(&args).await;
    rx.kill();

    let sc = scenario(&ScenarioOptions {
        format: WireFormat::Bincode,
        ..Default::default()
    });
    let bulk = bulk_frames(WireFormat::Json, 300, 900, 2);
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    agent.write_all(&bulk.concat()).await.unwrap();
    let total = sc.expected.len() as u64 + 300;
    wait_metric(port, "kata_trace_forwarder_spans_received_total", total).await;
    drop(agent);
    let status = fwd.terminate().await;
    assert!(status.success(), "{}", fwd.stderr());
    let spooled: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "batch"))
        .collect();
    assert!(
        !spooled.is_empty(),
        "spans were spooled at shutdown:\n{}",
        fwd.stderr()
    );
    assert!(
        fwd.stderr().contains(&format!("\"spans_spooled\":{total}")),
        "{}",
        fwd.stderr()
    );
    assert_eq!(rx.store.count(), 0);

    rx.restart();
    let port2 = free_port();
    let mut args2 = rx.args("grpc");
    args2.extend(metrics_args(port2));
    args2.extend(["--spool-dir".into(), spool_dir.display().to_string()]);
    let mut fwd2 = Forwarder::hybrid(&args2).await;
    rx.store
        .wait_for(total as usize, Duration::from_secs(30))
        .await;
    let ids = span_ids(&rx);
    assert_eq!(ids.len() as u64, total);
    assert!(ids.values().all(|&n| n == 1), "exactly once");
    all_arrived(&rx, &sc.expected);
    wait_metric(port2, "kata_trace_forwarder_spans_unspooled_total", total).await;
    assert_eq!(metric(port2, "kata_trace_forwarder_spool_files").await, 0);
    assert!(fwd2.terminate().await.success());
}

/// While the collector is away and the queue fills, batches go to the spool
/// and agents keep flowing; when it is back, the spool drains into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_spills_to_the_spool_without_blocking_agents() {
    let mut rx = Receiver::start().await;
    let spool = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut args = rx.args("http/protobuf");
    args.extend(metrics_args(port));
    args.extend([
        "--spool-dir".into(),
        spool.path().display().to_string(),
        "--queue-size".into(),
        "64".into(),
        "--batch-max-spans".into(),
        "16".into(),
    ]);
    let mut fwd = Forwarder::hybrid(&args).await;
    rx.kill();
    let frames = bulk_frames(WireFormat::Bincode, 1000, 700, 3);
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&frames.concat()).await.unwrap();
    // All read off the socket though the collector is down and the queue
    // holds 64: the rest is on disk.
    wait_metric(port, "kata_trace_forwarder_spans_received_total", 1000).await;
    assert!(metric(port, "kata_trace_forwarder_spans_spooled_total").await > 0);
    rx.restart();
    rx.store.wait_for(1000, Duration::from_secs(60)).await;
    assert_eq!(span_ids(&rx).len(), 1000);
    assert!(fwd.terminate().await.success());
}

/// SIGTERM mid-stream: every span written before the signal is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_delivers_everything_already_written() {
    let rx = Receiver::start().await;
    let mut fwd = Forwarder::hybrid(&rx.args("grpc")).await;
    let a = bulk_frames(WireFormat::Json, 1500, 1000, 4);
    let b = bulk_frames(WireFormat::Bincode, 1500, 600, 5);
    let mut agent_a = connect_agent(&fwd.agent_socket).await;
    let mut agent_b = connect_agent(&fwd.agent_socket).await;
    let (a, b) = (a.concat(), b.concat());
    let (ra, rb) = tokio::join!(agent_a.write_all(&a), agent_b.write_all(&b));
    ra.unwrap();
    rb.unwrap();
    // Signal at once, with the agents' connections still open.
    let status = fwd.terminate().await;
    assert!(status.success(), "{}", fwd.stderr());
    let got = rx.store.wait_for(3000, Duration::from_secs(10)).await;
    assert_eq!(span_ids(&rx).len(), 3000, "got {}", got.len());
    drop((agent_a, agent_b));
}

/// The queue is bounded in bytes too: with the collector away and no spool,
/// the forwarder stops reading once it holds `--queue-bytes`, so the agent
/// is held back (backpressure), and nothing is lost when the collector
/// returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_bound_turns_an_outage_into_backpressure() {
    let mut rx = Receiver::start().await;
    let port = free_port();
    let mut args = rx.args("grpc");
    args.extend(metrics_args(port));
    args.extend(["--queue-bytes".into(), "64KiB".into()]);
    let mut fwd = Forwarder::hybrid(&args).await;
    rx.kill();
    let frames = bulk_frames(WireFormat::Json, 1000, 1000, 6);
    let mut agent = connect_agent(&fwd.agent_socket).await;
    let bytes = frames.concat();
    let writer = tokio::spawn(async move {
        agent.write_all(&bytes).await.unwrap();
        agent
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = metric(port, "kata_trace_forwarder_spans_received_total").await;
    // 64 KiB of ~1 KiB spans queued, plus what one socket read (at most
    // 64 KiB) decoded and is waiting for room: far from the 1000 sent.
    assert!(held <= 140, "read {held} spans past a 64 KiB bound");
    assert!(!writer.is_finished(), "the agent is held back");
    rx.restart();
    let _agent = writer.await.unwrap();
    rx.store.wait_for(1000, Duration::from_secs(60)).await;
    assert_eq!(span_ids(&rx).len(), 1000);
    assert!(fwd.terminate().await.success());
}
