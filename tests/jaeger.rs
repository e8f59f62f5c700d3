//! End-to-end against a real Jaeger (v2, built by scripts/setup-jaeger.sh):
//! real agent frames (from the real opentelemetry 0.17 and 0.14 SDKs) go
//! through the real forwarder binary over hybrid VSOCK into Jaeger, and
//! Jaeger's HTTP query API must show them, mapped as Jaeger maps OTLP.
//!
//! Each test starts its own Jaeger on free loopback ports. Without a Jaeger
//! binary the tests fail, telling how to get one.

mod common;

use std::time::Duration;

use common::jaeger::{assert_jaeger_span, process, span, span_id_hex, trace_id_hex, Jaeger, Ports};
use common::{connect_agent, Forwarder};
use kata_agent_emitter::{scenario, RemoteParent, Scenario, ScenarioOptions, WireFormat};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(30);

/// Writes the scenario's frames as one agent and waits for its whole trace.
async fn send_and_fetch(jaeger: &Jaeger, fwd: &Forwarder, sc: &Scenario) -> Value {
    let trace_id = sc.expected[0].trace_id;
    assert!(
        sc.expected.iter().all(|s| s.trace_id == trace_id),
        "the scenario is one trace"
    );
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();
    let trace = jaeger
        .wait_for_trace(trace_id, sc.expected.len(), WAIT)
        .await;
    drop(agent);
    trace
}

fn tag<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == key)
        .unwrap_or_else(|| panic!("no tag {key} in {:#}", span["tags"]))
}

async fn agent_spans_into_jaeger(format: WireFormat, protocol: &str) {
    let jaeger = Jaeger::start().await;
    let mut fwd = Forwarder::hybrid(&jaeger.forwarder_args(protocol)).await;
    let sc = scenario(&ScenarioOptions {
        format,
        ..Default::default()
    });
    let trace = send_and_fetch(&jaeger, &fwd, &sc).await;

    assert_eq!(
        trace["traceID"],
        trace_id_hex(sc.expected[0].trace_id).as_str()
    );
    let processes = trace["processes"].as_object().unwrap();
    assert_eq!(processes.len(), 1, "one process: {processes:#?}");
    for want in &sc.expected {
        assert_jaeger_span(&trace, want, "kata-agent");
    }

    // What the generic comparison implies, spelled out on the richest spans.
    let rpc = sc
        .expected
        .iter()
        .find(|s| s.name == "create_container")
        .unwrap();
    let got = span(&trace, rpc.span_id);
    assert_eq!(tag(got, "array.bool")["value"], "[true,false,true]");
    assert_eq!(
        tag(got, "array.i64")["value"],
        "[-9223372036854775808,-1,0,1,9223372036854775807]"
    );
    assert_eq!(
        tag(got, "array.f64")["value"],
        "[0.1,-1.25,1e+300,6.02214076e+23,2.2250738585072014e-308]",
        "Go's JSON spelling of the floats"
    );
    assert_eq!(
        tag(got, "i64.min")["value"],
        i64::MIN.to_string(),
        "a string beyond 2^53"
    );
    assert_eq!(tag(got, "i64.negative")["value"], -42);
    assert_eq!(tag(got, "otel.status_code")["value"], "OK");
    assert_eq!(
        got["references"][0]["refType"], "FOLLOWS_FROM",
        "root span: only its link"
    );
    assert_eq!(
        got["references"][0]["spanID"],
        span_id_hex(rpc.links[0].span_id).as_str()
    );
    let failed = sc
        .expected
        .iter()
        .find(|s| s.name.starts_with("mount_storage"))
        .unwrap();
    let got = span(&trace, failed.span_id);
    assert_eq!(tag(got, "error")["value"], true);
    assert_eq!(tag(got, "otel.status_code")["value"], "ERROR");
    assert_eq!(
        tag(got, "otel.status_description")["value"],
        failed.status_message.as_str()
    );
    assert_eq!(
        got["logs"][0]["timestamp"],
        failed.events[0].time_unix_nanos / 1000
    );
    assert_eq!(
        process(&trace, got)["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == "kata.guest.features")
            .unwrap()["value"],
        r#"["seccomp","agent-policy"]"#
    );

    let status = fwd.terminate().await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        fwd.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_agent_over_grpc_into_jaeger() {
    agent_spans_into_jaeger(WireFormat::Json, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_agent_over_http_into_jaeger() {
    agent_spans_into_jaeger(WireFormat::Json, "http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bincode_agent_over_grpc_into_jaeger() {
    agent_spans_into_jaeger(WireFormat::Bincode, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bincode_agent_over_http_into_jaeger() {
    agent_spans_into_jaeger(WireFormat::Bincode, "http/protobuf").await;
}

/// The trace as Kata produces it: the runtime (here: the current
/// opentelemetry SDK and its OTLP exporter, as the Go runtime uses) exports
/// its `CreateContainer` span straight to Jaeger and hands its context to the
/// agent (ttrpc metadata in Kata); the agent's spans come through the
/// forwarder. Jaeger joins them into one trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_trace_joins_the_runtime_trace() {
    use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::WithExportConfig as _;

    let jaeger = Jaeger::start().await;
    let fwd = Forwarder::hybrid(&jaeger.forwarder_args("grpc")).await;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(jaeger.ports.otlp_grpc_endpoint())
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("kata-runtime")
                .build(),
        )
        .build();
    let tracer = provider.tracer("kata-runtime-under-test");
    let mut runtime_span = tracer
        .span_builder("CreateContainer")
        .with_kind(SpanKind::Client)
        .with_attributes([KeyValue::new("sandbox_id", "kata-e2e")])
        .start(&tracer);
    let cx = runtime_span.span_context().clone();
    assert!(cx.is_sampled());
    let runtime_trace = u128::from_be_bytes(cx.trace_id().to_bytes());
    let runtime_id = u64::from_be_bytes(cx.span_id().to_bytes());

    let sc = scenario(&ScenarioOptions {
        format: WireFormat::Json,
        parent: Some(RemoteParent {
            trace_id: runtime_trace,
            span_id: runtime_id,
        }),
        ..Default::default()
    });
    assert!(sc.expected.iter().all(|s| s.trace_id == runtime_trace));
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&sc.stream_bytes()).await.unwrap();

    // The simple processor exports synchronously: off the async workers.
    tokio::task::spawn_blocking(move || {
        runtime_span.end();
        provider.shutdown().unwrap();
    })
    .await
    .unwrap();

    let trace = jaeger
        .wait_for_trace(runtime_trace, sc.expected.len() + 1, WAIT)
        .await;
    drop(agent);

    let mut services: Vec<&str> = trace["processes"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["serviceName"].as_str().unwrap())
        .collect();
    services.sort();
    assert_eq!(services, ["kata-agent", "kata-runtime"]);

    let runtime = span(&trace, runtime_id);
    assert_eq!(runtime["operationName"], "CreateContainer");
    assert_eq!(process(&trace, runtime)["serviceName"], "kata-runtime");
    assert_eq!(
        runtime["references"],
        serde_json::json!([]),
        "the runtime span is the root"
    );

    for want in &sc.expected {
        assert_jaeger_span(&trace, want, "kata-agent");
    }
    // Both RPC roots of the agent hang under the runtime span.
    for name in ["create_container", "start_container"] {
        let want = sc.expected.iter().find(|s| s.name == name).unwrap();
        assert_eq!(want.parent_span_id, runtime_id, "{name}");
        let got = span(&trace, want.span_id);
        assert_eq!(got["references"][0]["refType"], "CHILD_OF", "{name}");
        assert_eq!(
            got["references"][0]["spanID"],
            span_id_hex(runtime_id).as_str(),
            "{name}"
        );
        assert_eq!(
            got["references"][0]["traceID"],
            trace_id_hex(runtime_trace).as_str(),
            "{name}"
        );
        // Inside its parent in time.
        let (start, dur) = (&got["startTime"], &got["duration"]);
        let (pstart, pdur) = (&runtime["startTime"], &runtime["duration"]);
        let (start, dur, pstart, pdur) = (
            start.as_u64().unwrap(),
            dur.as_u64().unwrap(),
            pstart.as_u64().unwrap(),
            pdur.as_u64().unwrap(),
        );
        assert!(
            pstart <= start && start + dur <= pstart + pdur,
            "{name} inside CreateContainer"
        );
    }
}

/// The documented contract with a real Jaeger: not up when the forwarder
/// starts, the forwarder exits non-zero naming the endpoint; once Jaeger is
/// up on that endpoint, a second start works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_fails_clearly_before_jaeger_is_up_then_works() {
    let ports = Ports::free();
    for protocol in ["grpc", "http/protobuf"] {
        let mut fwd = Forwarder::spawn_hybrid(&ports.forwarder_args(protocol));
        let status = fwd.wait(Duration::from_secs(20)).await;
        let err = fwd.stderr();
        assert_eq!(status.code(), Some(1), "{protocol}: {err}");
        assert!(
            err.contains("cannot reach the OTLP collector"),
            "{protocol}: {err}"
        );
        assert!(
            err.contains(&ports.otlp_endpoint(protocol)),
            "{protocol}: endpoint not named:\n{err}"
        );
    }

    let jaeger = Jaeger::start_on(ports)
        .await
        .unwrap_or_else(|log| panic!("Jaeger on the same ports: {log}"));
    for protocol in ["grpc", "http/protobuf"] {
        let mut fwd = Forwarder::hybrid(&ports.forwarder_args(protocol)).await;
        let sc = scenario(&ScenarioOptions::default());
        let trace = send_and_fetch(&jaeger, &fwd, &sc).await;
        for want in &sc.expected {
            assert_jaeger_span(&trace, want, "kata-agent");
        }
        let status = fwd.terminate().await;
        assert!(
            status.success(),
            "{protocol}: exit {status:?}; stderr:\n{}",
            fwd.stderr()
        );
    }
}
