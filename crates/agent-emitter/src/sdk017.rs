//! opentelemetry 0.17 glue: the SDK generation used by Kata 3.29+, whose
//! vsock-exporter writes `serde_json::to_vec(&SpanData)` payloads.

use crate::{frame, AgentSdk, LinkSpec, RemoteSpec, SdkConfig, SpanSpec};
use async_trait::async_trait;
use otel017::sdk::export::trace::{ExportResult, SpanExporter};
use otel017::sdk::trace::{Config, IdGenerator as RandomIds, Tracer, TracerProvider};
use otel017::sdk::Resource;
use otel017::trace::{
    IdGenerator, Link, SpanContext, SpanId, TraceContextExt, TraceError, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use otel017::Context;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

otel_common!(otel017);

type Captured = Vec<(Vec<u8>, Option<ExpectedSpan>)>;

fn trace_id_u128(id: TraceId) -> u128 {
    u128::from_be_bytes(id.to_bytes())
}

fn span_id_u64(id: SpanId) -> u64 {
    u64::from_be_bytes(id.to_bytes())
}

fn flags_u8(sc: &SpanContext) -> u8 {
    sc.trace_flags().to_u8()
}

fn span_context(trace_id: u128, span_id: u64, trace_state: &[(String, String)]) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace_id.to_be_bytes()),
        SpanId::from_bytes(span_id.to_be_bytes()),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value(trace_state.iter().cloned()).expect("valid W3C trace state"),
    )
}

/// Random ids from the SDK's generator, constrained so that every trace id
/// exceeds 2^64 and every span id exceeds 2^53: the forwarder must cope with
/// ids that overflow u64 and JSON's exact-double range, and leaving that to
/// chance would make the coverage flaky.
#[derive(Debug)]
struct KataIds {
    forced_trace_id: Option<u128>,
    random: RandomIds,
}

impl IdGenerator for KataIds {
    fn new_trace_id(&self) -> TraceId {
        if let Some(id) = self.forced_trace_id {
            return TraceId::from_bytes(id.to_be_bytes());
        }
        loop {
            let id = self.random.new_trace_id();
            if trace_id_u128(id) > 1 << 64 {
                return id;
            }
        }
    }

    fn new_span_id(&self) -> SpanId {
        loop {
            let id = self.random.new_span_id();
            if span_id_u64(id) > 1 << 53 {
                return id;
            }
        }
    }
}

/// Stand-in for Kata's vsock-exporter: same serialization and framing, but
/// the frame goes to memory instead of a VSOCK stream.
#[derive(Debug)]
struct CaptureExporter {
    out: Arc<Mutex<Captured>>,
    raw: Option<Arc<Mutex<Vec<SpanData>>>>,
}

#[async_trait]
impl SpanExporter for CaptureExporter {
    async fn export(&mut self, batch: Vec<SpanData>) -> ExportResult {
        for span in batch {
            let payload = serde_json::to_vec(&span).map_err(|e| TraceError::from(e.to_string()))?;
            let expected = self.raw.as_ref().map(|_| expected_from(&span));
            self.out
                .lock()
                .expect("capture lock")
                .push((frame(&payload), expected));
            if let Some(raw) = &self.raw {
                raw.lock().expect("capture lock").push(span);
            }
        }
        Ok(())
    }
}

/// The agent's SDK configuration: its id generator, span limits and resource.
fn sdk_config(config: &SdkConfig) -> Config {
    let l = config.limits;
    Config::default()
        .with_id_generator(KataIds {
            forced_trace_id: config.trace_id,
            random: RandomIds::default(),
        })
        .with_max_attributes_per_span(l.attributes_per_span)
        .with_max_events_per_span(l.events_per_span)
        .with_max_links_per_span(l.links_per_span)
        .with_max_attributes_per_event(l.attributes_per_event)
        .with_max_attributes_per_link(l.attributes_per_link)
        .with_resource(Resource::new(to_key_values(config.resource.clone())))
}

pub(crate) struct Sdk {
    provider: TracerProvider,
    tracer: Tracer,
    random: KataIds,
}

/// Builds a provider like the agent's, runs `script` against it and returns
/// the frames in export order (with expectations if `keep` is set).
pub(crate) fn run(config: &SdkConfig, keep: bool, script: impl FnOnce(&Sdk)) -> Captured {
    run_raw(config, keep, script).0
}

/// Like [`run`], also returning the `SpanData` values the exporter received
/// (empty unless `keep`), so tests can compare them with decoded payloads.
pub(crate) fn run_raw(
    config: &SdkConfig,
    keep: bool,
    script: impl FnOnce(&Sdk),
) -> (Captured, Vec<SpanData>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let raw = keep.then(|| Arc::new(Mutex::new(Vec::new())));
    let exporter = CaptureExporter {
        out: out.clone(),
        raw: raw.clone(),
    };
    let provider = TracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_config(sdk_config(config))
        .build();
    let sdk = Sdk::new(provider);
    script(&sdk);
    // The simple processor exports on its own thread; dropping the last
    // provider handle shuts it down, which blocks until the queue is drained.
    let Sdk {
        provider, tracer, ..
    } = sdk;
    drop(tracer);
    drop(provider);
    let captured = std::mem::take(&mut *out.lock().expect("capture lock"));
    let raw = raw
        .map(|r| std::mem::take(&mut *r.lock().expect("capture lock")))
        .unwrap_or_default();
    (captured, raw)
}

impl Sdk {
    fn new(provider: TracerProvider) -> Sdk {
        // The agent's tracer is unversioned and named after the binary.
        let tracer = provider.versioned_tracer("kata-agent", None, None);
        Sdk {
            provider,
            tracer,
            random: KataIds {
                forced_trace_id: None,
                random: RandomIds::default(),
            },
        }
    }

    fn link(&self, l: LinkSpec) -> Link {
        Link::new(
            span_context(l.trace_id, l.span_id, &l.trace_state),
            to_key_values(l.attributes),
        )
    }
}

impl AgentSdk for Sdk {
    type Cx = Context;

    fn root(&self, parent: Option<&RemoteSpec>) -> Context {
        match parent {
            Some(p) => Context::new().with_remote_span_context(span_context(
                p.trace_id,
                p.span_id,
                &p.trace_state,
            )),
            None => Context::new(),
        }
    }

    fn start(&self, parent: &Context, spec: SpanSpec) -> Context {
        let links: Vec<Link> = spec.links.into_iter().map(|l| self.link(l)).collect();
        let builder = self
            .tracer
            .span_builder(spec.name)
            .with_kind(to_kind(spec.kind))
            .with_start_time(spec.start)
            .with_attributes(to_key_values(spec.attributes))
            .with_links(links);
        let span = self.tracer.build_with_context(builder, parent);
        parent.with_span(span)
    }

    fn ids(&self, cx: &Context) -> (u128, u64) {
        let span = cx.span();
        let sc = span.span_context();
        (trace_id_u128(sc.trace_id()), span_id_u64(sc.span_id()))
    }

    fn set_attribute(&self, cx: &Context, key: &str, value: ExpectedValue) {
        cx.span()
            .set_attribute(KeyValue::new(Key::new(key.to_string()), to_value(value)));
    }

    fn add_event(
        &self,
        cx: &Context,
        name: &str,
        at: SystemTime,
        attributes: Vec<(String, ExpectedValue)>,
    ) {
        cx.span()
            .add_event_with_timestamp(name.to_string(), at, to_key_values(attributes));
    }

    fn set_status(&self, cx: &Context, status: ExpectedStatus, message: &str) {
        cx.span().set_status(to_status(status), message.to_string());
    }

    fn end(&self, cx: Context, at: SystemTime) {
        cx.span().end_with_timestamp(at);
    }

    fn random_trace_id(&self) -> u128 {
        trace_id_u128(self.random.new_trace_id())
    }

    fn random_span_id(&self) -> u64 {
        span_id_u64(self.random.new_span_id())
    }
}

/// Kata's vsock-exporter on a live connection: every span of a batch is one
/// frame, written as the exporter writes it (header, then payload).
#[derive(Debug)]
struct StreamExporter<W> {
    conn: W,
    written: Arc<Mutex<std::io::Result<u64>>>,
}

#[async_trait]
impl<W: Write + Send + std::fmt::Debug + 'static> SpanExporter for StreamExporter<W> {
    async fn export(&mut self, batch: Vec<SpanData>) -> ExportResult {
        let mut written = self.written.lock().expect("written lock");
        for span in batch {
            let Ok(count) = written.as_mut() else {
                break;
            };
            let payload = serde_json::to_vec(&span).map_err(|e| TraceError::from(e.to_string()))?;
            let result = self
                .conn
                .write_all(&(payload.len() as u64).to_be_bytes())
                .and_then(|()| self.conn.write_all(&payload));
            match result {
                Ok(()) => *count += 1,
                Err(e) => *written = Err(e),
            }
        }
        Ok(())
    }
}

/// Like [`run`], but through the batch span processor (its default
/// configuration, on the SDK's `TokioCurrentThread` runtime) exporting to
/// `conn`, live.
/// Returns the spans written, or the first write error (after which the
/// rest are not written, as a dead connection would have it).
pub(crate) fn run_batched<W: Write + Send + std::fmt::Debug + 'static>(
    config: &SdkConfig,
    conn: W,
    script: impl FnOnce(&Sdk),
) -> std::io::Result<u64> {
    let written = Arc::new(Mutex::new(Ok(0)));
    let exporter = StreamExporter {
        conn,
        written: written.clone(),
    };
    // The processor makes its schedule's timer where it is built, so it is
    // built in a runtime whose own thread drives that timer.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()?;
    let provider = {
        let _in_runtime = rt.enter();
        TracerProvider::builder()
            .with_batch_exporter(exporter, otel017::runtime::TokioCurrentThread)
            .with_config(sdk_config(config))
            .build()
    };
    let sdk = Sdk::new(provider);
    script(&sdk);
    // Dropping the last provider handle shuts the processor down, which
    // exports what is left and blocks until it is written.
    drop(sdk);
    drop(rt);
    let mut w = written.lock().expect("written lock");
    std::mem::replace(&mut *w, Ok(0))
}
