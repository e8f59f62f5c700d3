//! The exporter's limits, tried as a hostile guest, a hostile collector and
//! a hostile local user would: one sandbox's over-large spans against a
//! collector's request limit (a real OpenTelemetry Collector over gRPC, a
//! 413-answering receiver over HTTP), collectors whose successful answers
//! are too long or never end, and half-sent requests held open against the
//! metrics endpoint.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::otelcol::{Otelcol, Security};
use common::{free_port, metric, string_attr, Forwarder, Receiver};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kata_agent_emitter::{bulk_frames, WireFormat};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SANDBOX_ID: &str = "kata.sandbox.id";

/// Spans as a collector received them.
type Spans = Arc<Mutex<Vec<(Resource, Span)>>>;

fn record(into: &Spans, req: ExportTraceServiceRequest) {
    let mut spans = into.lock().unwrap();
    for rs in req.resource_spans {
        let resource = rs.resource.unwrap_or_default();
        for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            spans.push((resource.clone(), s));
        }
    }
}

/// A template-mode forwarder on a fresh `/run/vc/vm`, with `args`; returns
/// it and the directory its sandboxes appear in.
async fn forwarder_for_sandboxes(args: &[String]) -> (Forwarder, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("run/vc/vm");
    std::fs::create_dir_all(&vm).unwrap();
    let mut all = vec![
        "--socket-path-template".to_string(),
        format!("{}/{{ID}}/clh.sock", vm.display()),
    ];
    all.extend_from_slice(args);
    let fwd = Forwarder::spawn_in(dir, PathBuf::new(), &all);
    fwd.wait_listening().await;
    (fwd, vm)
}

/// Sandbox `id` appears, and its agent connects.
async fn agent_of(vm: &Path, id: &str) -> tokio::net::UnixStream {
    std::fs::create_dir_all(vm.join(id)).unwrap();
    common::connect_when_listening(&vm.join(id).join("clh.sock_10240")).await
}

/// How many spans of sandbox `id` arrived, and the largest of them.
fn arrived_from(spans: &[(Resource, Span)], id: &str) -> (usize, usize) {
    let mine: Vec<_> = spans
        .iter()
        .filter(|(r, _)| string_attr(&r.attributes, SANDBOX_ID).as_deref() == Some(id))
        .collect();
    let largest = mine.iter().map(|(_, s)| s.encoded_len()).max().unwrap_or(0);
    (mine.len(), largest)
}

fn dropped(id: &str, reason: &str) -> String {
    format!(
        "kata_trace_forwarder_sandbox_spans_dropped_total{{sandbox=\"{id}\",reason=\"{reason}\"}}"
    )
}

/// Sandbox `good` sends 5 small spans; sandbox `bad` sends eight of 900 KB
/// (each well under a collector's 4 MiB request limit, together nearly
/// twice it) and one of 5 MB (over the limit alone), all within one batch
/// timeout. Every span but bad's 5 MB one must arrive, and that one be
/// counted as too large, against `bad` only.
async fn one_sandbox_s_large_spans_against(
    protocol: &str,
    endpoint: String,
    received: impl Fn() -> Vec<(Resource, Span)>,
    extra: &[&str],
) {
    let port = free_port();
    let mut args: Vec<String> = [
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        &endpoint,
        "--max-frame-size",
        "8MiB",
        // Long enough that, without a byte bound, all 14 spans make one
        // request.
        "--batch-timeout",
        "1s",
        "--metrics-address",
        &format!("127.0.0.1:{port}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let (mut fwd, vm) = forwarder_for_sandboxes(&args).await;

    let mut good = agent_of(&vm, "good").await;
    let mut bad = agent_of(&vm, "bad").await;
    good.write_all(&bulk_frames(WireFormat::Bincode, 5, 1_000, 1).concat())
        .await
        .unwrap();
    let mut frames = bulk_frames(WireFormat::Bincode, 8, 900_000, 2);
    frames.insert(
        4,
        bulk_frames(WireFormat::Bincode, 1, 5_000_000, 3).remove(0),
    );
    bad.write_all(&frames.concat()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received();
        let (good, bad) = (arrived_from(&got, "good"), arrived_from(&got, "bad"));
        if good.0 >= 5 && bad.0 >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "good: {good:?}, bad: {bad:?} (count, largest) arrived; stderr:\n{}",
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::wait_metric(port, &dropped("bad", "too_large"), 1).await;
    // A moment for anything else to arrive that should not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = received();
    let (good_n, _) = arrived_from(&got, "good");
    let (bad_n, bad_largest) = arrived_from(&got, "bad");
    assert_eq!(good_n, 5, "good's spans, each once");
    assert_eq!(bad_n, 8, "bad's 900 KB spans, each once");
    assert!(bad_largest < 1 << 20, "{bad_largest}");
    assert_eq!(metric(port, &dropped("bad", "too_large")).await, 1);
    for reason in ["too_large", "rejected", "export", "shutdown"] {
        assert_eq!(metric(port, &dropped("good", reason)).await, 0, "{reason}");
    }
    assert_eq!(metric(port, &dropped("bad", "rejected")).await, 0);
    assert_eq!(
        metric(
            port,
            "kata_trace_forwarder_spans_dropped_total{reason=\"too_large\"}"
        )
        .await,
        1
    );
    drop((good, bad));
    assert!(fwd.terminate().await.success());
}

/// [`one_sandbox_s_large_spans_against`] a real OpenTelemetry Collector
/// over gRPC, with its default 4 MiB limit (`RESOURCE_EXHAUSTED` without a
/// retry hint), passing what it takes on to the tests' receiver.
async fn through_a_collector(extra: &[&str]) {
    let rx = Receiver::start().await;
    let upstream = rx.grpc_endpoint.trim_start_matches("http://").to_owned();
    let collector =
        tokio::task::spawn_blocking(move || Otelcol::start(&Security::default(), &upstream))
            .await
            .unwrap();
    one_sandbox_s_large_spans_against(
        "grpc",
        collector.endpoint("grpc", "http"),
        || rx.store.spans.lock().unwrap().clone(),
        extra,
    )
    .await;
}

/// The probe's case, with the default byte bound per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sandbox_s_large_spans_cannot_get_another_s_dropped_grpc_collector() {
    through_a_collector(&[]).await;
}

/// With a byte bound above the collector's limit, the requests themselves
/// are too large: each is sent again in halves, down to the span that is
/// too large alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_the_collector_is_sent_in_halves_grpc_collector() {
    through_a_collector(&["--batch-max-bytes", "64MiB"]).await;
}

/// An OTLP/HTTP receiver that answers 413 to a request over `limit` bytes,
/// and 503 to any while the flag it returns is set.
async fn http_receiver_with_limit(limit: usize) -> (SocketAddr, Spans, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let store = Arc::clone(&spans);
    let down = Arc::new(AtomicBool::new(false));
    let is_down = Arc::clone(&down);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (store, is_down) = (Arc::clone(&store), Arc::clone(&is_down));
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (store, is_down) = (Arc::clone(&store), Arc::clone(&is_down));
                    async move {
                        let read = Limited::new(req.into_body(), limit).collect().await;
                        let status = match read {
                            _ if is_down.load(Ordering::SeqCst) => 503,
                            Ok(body) => match ExportTraceServiceRequest::decode(body.to_bytes()) {
                                Ok(r) => {
                                    record(&store, r);
                                    200
                                }
                                Err(_) => 400,
                            },
                            Err(_) => 413,
                        };
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans, down)
}

/// Over HTTP, a collector that takes 2 MiB at most answers 413 to the
/// default 3 MiB requests, and to bad's 5 MB span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_the_collector_is_sent_in_halves_http_413() {
    let (addr, spans, _) = http_receiver_with_limit(2 << 20).await;
    one_sandbox_s_large_spans_against(
        "http/protobuf",
        format!("http://{addr}"),
        || spans.lock().unwrap().clone(),
        &[],
    )
    .await;
}

/// A batch spooled while the collector was away, under a bound larger
/// than the collector's limit (a collector that changed, or a
/// predecessor's spool): when it is replayed and found too large, its
/// halves are sent instead, and every span arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_batch_too_large_for_the_collector_is_sent_in_halves() {
    let (addr, spans, down) = http_receiver_with_limit(2 << 20).await;
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().join("spool");
    // In hybrid mode, with a batch timeout long enough that the spans make
    // one batch.
    let start = |extra: Vec<String>| async move {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("kata.hvsock");
        let mut args = vec![
            "--socket-path".to_string(),
            socket_path.display().to_string(),
        ];
        args.extend(extra);
        let fwd = Forwarder::spawn_in(dir, socket_path, &args);
        fwd.wait_listening().await;
        fwd
    };
    let args: Vec<String> = [
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &format!("http://{addr}"),
        "--spool-dir",
        &spool_dir.display().to_string(),
        "--batch-timeout",
        "1s",
        "--shutdown-timeout",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let port = free_port();
    let mut first_args = args.clone();
    first_args.extend(["--metrics-address".into(), format!("127.0.0.1:{port}")]);
    let mut first = start(first_args).await;
    down.store(true, Ordering::SeqCst);
    let mut frames = bulk_frames(WireFormat::Bincode, 5, 1_000, 6);
    frames.extend(bulk_frames(WireFormat::Bincode, 3, 900_000, 7));
    let mut agent = common::connect_agent(&first.agent_socket).await;
    agent.write_all(&frames.concat()).await.unwrap();
    common::wait_metric(port, "kata_trace_forwarder_spans_received_total", 8).await;
    drop(agent);
    assert!(first.terminate().await.success(), "{}", first.stderr());
    let spooled = common::exit_summary(&first.stderr());
    assert_eq!(spooled["spans_spooled"], 8, "{spooled}");
    // One batch of 2.7 MB, over the collector's 2 MiB.
    let files = common::files_named(&spool_dir, ".batch");
    assert_eq!(files.len(), 1, "{files:?}");
    let size = std::fs::metadata(&files[0]).unwrap().len();
    assert!(size > 2 << 20, "{size}");
    assert!(spans.lock().unwrap().is_empty());

    down.store(false, Ordering::SeqCst);
    let port = free_port();
    let mut second_args = args;
    second_args.extend(["--metrics-address".into(), format!("127.0.0.1:{port}")]);
    let mut second = start(second_args).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while spans.lock().unwrap().len() < 8 {
        assert!(Instant::now() < deadline, "stderr:\n{}", second.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::wait_metric(port, "kata_trace_forwarder_spans_unspooled_total", 8).await;
    assert_eq!(metric(port, "kata_trace_forwarder_spool_files").await, 0);
    assert!(second.terminate().await.success());
    let counters = common::exit_summary(&second.stderr());
    assert_eq!(counters["spans_dropped"], 0, "{counters}");
    assert_eq!(counters["spans_exported"], 8, "{counters}");
    let got = spans.lock().unwrap();
    let mut indexes: Vec<_> = got
        .iter()
        .map(|(_, s)| (s.encoded_len() > 1 << 19, index_of(s)))
        .collect();
    indexes.sort_unstable();
    assert_eq!(
        indexes,
        [
            (false, 0),
            (false, 1),
            (false, 2),
            (false, 3),
            (false, 4),
            (true, 0),
            (true, 1),
            (true, 2)
        ],
        "each span exactly once"
    );
}

/// The `kata.span_index` the agent emitter gave a span.
fn index_of(s: &Span) -> i64 {
    let v = s
        .attributes
        .iter()
        .find(|kv| kv.key == "kata.span_index")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref());
    match v {
        Some(Value::IntValue(i)) => *i,
        other => panic!("kata.span_index: {other:?}"),
    }
}

/// How a hostile collector answers a successful export.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with a 2 MiB body.
    Huge,
    /// 200, a first piece of the body, and then nothing, ever.
    Endless,
}

/// An OTLP/HTTP receiver that takes every request and answers `answer`.
async fn hostile_http_receiver(answer: Answer) -> (SocketAddr, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let store = Arc::clone(&spans);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let store = Arc::clone(&store);
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        if let Ok(r) = ExportTraceServiceRequest::decode(body) {
                            record(&store, r);
                        }
                        let first =
                            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![0u8; 1024])));
                        let body: http_body_util::combinators::BoxBody<Bytes, std::io::Error> =
                            match answer {
                                Answer::Huge => Full::new(Bytes::from(vec![b'x'; 2 << 20]))
                                    .map_err(|never| match never {})
                                    .boxed(),
                                Answer::Endless => StreamBody::new(futures_util::StreamExt::chain(
                                    futures_util::stream::iter([first]),
                                    futures_util::stream::pending(),
                                ))
                                .boxed(),
                            };
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(200)
                                .header("content-type", "application/x-protobuf")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

/// 20 spans to a collector whose 200 comes with `answer`: each arrives
/// exactly once, and the batch counts as exported.
async fn a_success_is_a_success(answer: Answer) {
    let (addr, spans) = hostile_http_receiver(answer).await;
    let args: Vec<String> = [
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &format!("http://{addr}"),
        "--otlp-timeout",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let mut fwd = Forwarder::hybrid(&args).await;
    let mut agent = common::connect_agent(&fwd.agent_socket).await;
    agent
        .write_all(&bulk_frames(WireFormat::Json, 20, 1_000, 4).concat())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans.lock().unwrap().len() < 20 {
        assert!(Instant::now() < deadline, "stderr:\n{}", fwd.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Before the fix the same batch came again, and again, within seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(agent);
    assert!(fwd.terminate().await.success());
    let got = spans.lock().unwrap();
    let mut indexes: Vec<i64> = got.iter().map(|(_, s)| index_of(s)).collect();
    indexes.sort_unstable();
    assert_eq!(
        indexes,
        (0..20).collect::<Vec<_>>(),
        "each span exactly once"
    );
    let counters = common::exit_summary(&fwd.stderr());
    assert_eq!(counters["spans_exported"], 20, "{counters}");
    assert_eq!(counters["export_failures"], 0, "{counters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_a_2_mib_body_is_a_success() {
    a_success_is_a_success(Answer::Huge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_whose_body_never_ends_is_a_success() {
    a_success_is_a_success(Answer::Endless).await;
}

/// The soft limit on open files of this process (whose own soft limit is
/// the hard one's again afterwards), for as long as `f` runs.
fn with_fd_limit<T>(soft: u64, f: impl FnOnce() -> T) -> T {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .expect("Max open files in /proc/self/limits")
        .to_owned();
    let set = |soft: &str| {
        let out = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={soft}:{hard}"))
            .output()
            .expect("run prlimit");
        assert!(out.status.success(), "{out:?}");
    };
    set(&soft.to_string());
    let out = f();
    set(&hard);
    out
}

/// A local user opens 400 connections to the metrics port, each with half
/// a request, and holds them, against a forwarder whose file descriptors
/// are limited to 256. Agents must still connect and their spans arrive,
/// and once the header timeout has closed the half-sent requests, a scrape
/// is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_metrics_requests_cannot_starve_the_agents() {
    let rx = Receiver::start().await;
    let port = free_port();
    let mut args = rx.args("grpc");
    args.extend(["--metrics-address".into(), format!("127.0.0.1:{port}")]);
    // The forwarder drops root at once, and this container has no
    // CAP_SYS_RESOURCE to lower its limit after that: it inherits ours,
    // lowered while it is started.
    let mut fwd = with_fd_limit(256, || Forwarder::spawn_hybrid(&args));
    fwd.wait_listening().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fwd.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "{limits}"
    );
    // The endpoint answers before the attack.
    metric(port, "kata_trace_forwarder_connections_open").await;

    let mut held = Vec::new();
    for _ in 0..400 {
        // A forwarder out of descriptors stops accepting: once its backlog
        // is full too, connecting hangs, and the attacker has what it came
        // for.
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(1), connect).await else {
            break;
        };
        // Writes may fail once the forwarder has closed its end: that is
        // a refusal, and the point.
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Half: ")
            .await;
        held.push(s);
    }
    // Give the forwarder time to accept them all (or fail to).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut agent = common::connect_agent(&fwd.agent_socket).await;
    agent
        .write_all(&bulk_frames(WireFormat::Bincode, 10, 500, 5).concat())
        .await
        .unwrap();
    let started = Instant::now();
    while rx.store.count() < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the agent's spans did not arrive while the metrics port was held: {} of 10; stderr:\n{}",
            rx.store.count(),
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The header timeout frees the slots: a whole scrape is answered again,
    // while the half-sent connections are still held on our side.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut text = String::new();
        if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .is_ok()
            && s.read_to_string(&mut text).await.is_ok()
        {
            if let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("kata_trace_forwarder_spans_exported_total "))
            {
                break v.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "no scrape answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(spans, "10");
    // Every half-sent connection was closed by the forwarder.
    for s in &mut held {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a half-sent request is not held open")
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    drop(held);
    assert!(
        !fwd.stderr().contains("Too many open files"),
        "{}",
        fwd.stderr()
    );
    assert!(fwd.terminate().await.success());
}
