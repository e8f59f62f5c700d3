//! End-to-end: real agent frames (from the real opentelemetry 0.17 and 0.14
//! SDKs) through the real forwarder binary over hybrid VSOCK into an OTLP
//! receiver, checked field by field.

mod common;

use std::time::Duration;

use common::{assert_span_eq, connect_agent, find, Forwarder, Receiver};
use kata_agent_emitter::{scenario, ScenarioOptions, WireFormat};
use tokio::io::AsyncWriteExt;

async fn fidelity(format: WireFormat, protocol: &str) {
    let rx = Receiver::start().await;
    let mut args = rx.args(protocol);
    args.extend([
        "--trace-name".to_string(),
        "kata-agent-under-test".to_string(),
    ]);
    let mut fwd = Forwarder::hybrid(&args).await;

    let sc = scenario(&ScenarioOptions {
        format,
        ..Default::default()
    });
    assert!(
        sc.expected
            .iter()
            .any(|s| s.trace_id > u128::from(u64::MAX)),
        "the scenario must exercise a trace id above 2^64"
    );
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();

    let got = rx
        .store
        .wait_for(sc.expected.len(), Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), sc.expected.len(), "no span duplicated");
    for want in &sc.expected {
        let (resource, span) = find(&got, want.span_id);
        assert_span_eq(want, resource, span, "kata-agent-under-test");
    }

    drop(agent);
    let status = fwd.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        fwd.stderr()
    );
    assert!(!fwd.agent_socket.exists(), "socket removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_grpc_is_exact() {
    fidelity(WireFormat::Json, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_http_is_exact() {
    fidelity(WireFormat::Json, "http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bincode_over_grpc_is_exact() {
    fidelity(WireFormat::Bincode, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bincode_over_http_is_exact() {
    fidelity(WireFormat::Bincode, "http/protobuf").await;
}

/// 50 agents (both formats) hold their connections open while an idle
/// connection that never sends sits beside them: every span arrives. (One
/// hybrid socket is one sandbox, which may have 8 connections by default:
/// this one may have all of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_agents_and_an_idle_one() {
    let rx = Receiver::start().await;
    let mut args = rx.args("grpc");
    args.extend(["--sandbox-max-connections".into(), "51".into()]);
    let fwd = Forwarder::hybrid(&args).await;

    // Opened first, so a forwarder that served connections one at a time
    // would be stuck on it.
    let idle = connect_agent(&fwd.agent_socket).await;

    let scenarios: Vec<_> = (0..50u64)
        .map(|seq| {
            scenario(&ScenarioOptions {
                format: if seq % 2 == 0 {
                    WireFormat::Json
                } else {
                    WireFormat::Bincode
                },
                seq,
                ..Default::default()
            })
        })
        .collect();
    let mut agents = Vec::new();
    for _ in &scenarios {
        agents.push(connect_agent(&fwd.agent_socket).await);
    }
    // Every agent writes half its spans, then all write the rest: the
    // connections are open and interleaved, as on a busy host.
    for (agent, sc) in agents.iter_mut().zip(&scenarios) {
        let half = sc.frames.len() / 2;
        agent.write_all(&sc.frames[..half].concat()).await.unwrap();
    }
    for (agent, sc) in agents.iter_mut().zip(&scenarios) {
        let half = sc.frames.len() / 2;
        agent.write_all(&sc.frames[half..].concat()).await.unwrap();
    }
    let total: usize = scenarios.iter().map(|s| s.expected.len()).sum();
    let got = rx.store.wait_for(total, Duration::from_secs(30)).await;
    assert_eq!(got.len(), total);
    for sc in &scenarios {
        for want in &sc.expected {
            let (resource, span) = find(&got, want.span_id);
            assert_span_eq(want, resource, span, "kata-agent");
        }
    }
    drop(idle);
    drop(agents);
}

/// `--dump-only` needs no collector and prints OTLP JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_only_prints_otlp_json_lines() {
    let mut fwd = Forwarder::hybrid(&[
        "--dump-only".to_string(),
        "--stats-interval".to_string(),
        "50ms".to_string(),
    ])
    .await;
    let sc = scenario(&ScenarioOptions::default());
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    agent.shutdown().await.unwrap();
    drop(agent);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fwd.stdout().lines().count() < sc.expected.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "stdout:\n{}",
            fwd.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The periodic counters log saw the spans go by.
    while !fwd
        .stderr()
        .contains(&format!("\"spans_exported\":{}", sc.expected.len()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "stderr:\n{}",
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = fwd.terminate().await;
    assert!(status.success());
    let out = fwd.stdout();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), sc.expected.len());
    for want in &sc.expected {
        let hex_span = format!("{:016x}", want.span_id);
        let line = lines
            .iter()
            .find(|l| {
                l["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] == hex_span.as_str()
            })
            .unwrap_or_else(|| panic!("span {hex_span} in output:\n{out}"));
        let span = &line["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], format!("{:032x}", want.trace_id).as_str());
        assert_eq!(span["name"], want.name.as_str());
        assert_eq!(
            span["startTimeUnixNano"],
            want.start_unix_nanos.to_string().as_str(),
            "OTLP JSON writes 64-bit integers as strings"
        );
    }
}

/// An agent that writes a span every 10 ms is paced: read at the shared
/// tick, off the reactor (the `connections_paced` gauge shows it), yet
/// every span arrives exact, none waits for its batch much longer than
/// `--batch-timeout` (what a tick reads counts from the tick before), and
/// what it wrote just before SIGTERM is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_agent_is_paced_without_waiting_longer() {
    let rx = Receiver::start().await;
    let port = common::free_port();
    let mut args = rx.args("grpc");
    args.extend(["--metrics-address".to_string(), format!("127.0.0.1:{port}")]);
    // --batch-timeout 50ms (the test default): ticks of 12.5 ms.
    let mut fwd = Forwarder::hybrid(&args).await;
    let frames = kata_agent_emitter::bulk_frames(WireFormat::Json, 150, 400, 5);
    let mut agent = connect_agent(&fwd.agent_socket).await;
    let mut written = Vec::new();
    let mut paced = 0;
    let start = std::time::Instant::now();
    for (i, f) in frames.iter().enumerate() {
        let at = start + Duration::from_millis(10 * i as u64);
        tokio::time::sleep_until(at.into()).await;
        agent.write_all(f).await.unwrap();
        written.push(std::time::Instant::now());
        if i == 100 {
            paced = common::metric(port, "kata_trace_forwarder_connections_paced").await;
        }
    }
    // The last spans go out with the drain.
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert_eq!(paced, 1, "the agent was paced");
    let got = rx
        .store
        .wait_for(frames.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), frames.len(), "every span, once");
    let arrived = rx.store.arrived.lock().unwrap().clone();
    let mut worst = Duration::ZERO;
    for ((_, span), at) in got.iter().zip(&arrived) {
        let Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i)) = span
            .attributes
            .iter()
            .find(|kv| kv.key == "kata.span_index")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        else {
            panic!("span without its index");
        };
        worst = worst.max(at.saturating_duration_since(written[*i as usize]));
    }
    eprintln!("paced agent: longest wait from write to collector {worst:?}");
    // 50 ms in the batcher at most, plus the time to send (a debug build,
    // a busy machine).
    assert!(worst < Duration::from_millis(250), "{worst:?}");
}
