//! Test-support emitter that produces trace frames byte-for-byte as the Kata
//! Containers agent does, so the forwarder can be tested against the real wire
//! format instead of a hand-written imitation. Every span is created by driving
//! the real opentelemetry SDK (TracerProvider + simple span processor) and is
//! captured by a custom `SpanExporter` that serializes the SDK's own `SpanData`
//! exactly like Kata's `vsock-exporter`.
//!
//! Wire format: the agent connects once and keeps the connection open; each
//! span is one frame made of an 8-byte big-endian `u64` payload length followed
//! by the payload. Kata 3.29+ sends `serde_json::to_vec(&SpanData)` of
//! opentelemetry 0.17 ([`WireFormat::Json`]); Kata 2.2–3.28 sends
//! `bincode::serialize(&SpanData)` (bincode 1.3 default options) of
//! opentelemetry 0.14 ([`WireFormat::Bincode`]).
//!
//! Alongside the frames, [`scenario`] returns [`ExpectedSpan`]s extracted from
//! the very `SpanData` values the SDK handed to the exporter, so tests can
//! assert the forwarder's output field by field.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Payload encoding used by a given generation of the Kata agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireFormat {
    /// Kata 3.29+: `serde_json` of opentelemetry 0.17 `SpanData`.
    Json,
    /// Kata 2.2–3.28: `bincode` 1.3 of opentelemetry 0.14 `SpanData`.
    Bincode,
}

impl WireFormat {
    /// Both formats, handy for tests that must cover each one.
    pub const ALL: [WireFormat; 2] = [WireFormat::Json, WireFormat::Bincode];

    /// The opentelemetry crate version whose `SpanData` this format carries.
    pub fn otel_version(self) -> &'static str {
        match self {
            WireFormat::Json => "0.17.0",
            WireFormat::Bincode => "0.14.0",
        }
    }
}

impl FromStr for WireFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(WireFormat::Json),
            "bincode" => Ok(WireFormat::Bincode),
            other => Err(format!(
                "unknown wire format {other:?} (expected \"json\" or \"bincode\")"
            )),
        }
    }
}

impl fmt::Display for WireFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireFormat::Json => "json",
            WireFormat::Bincode => "bincode",
        })
    }
}

/// Remote parent span context, as the Kata runtime passes it to the agent in
/// ttrpc metadata (W3C `traceparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteParent {
    pub trace_id: u128,
    pub span_id: u64,
}

/// Knobs for [`scenario`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioOptions {
    pub format: WireFormat,
    /// Forces this trace id for the whole trace (through a custom
    /// `IdGenerator`); by default a random id above 2^64 is used. Ignored when
    /// `parent` is set, because the SDK then takes the trace id from it.
    pub trace_id: Option<u128>,
    /// If set, the root span is a child of this remote, sampled span context
    /// (which carries the trace state `kata=shim-v2-{seq},rojo=00f067aa0ba902b7`,
    /// as a runtime's `tracestate` header would).
    pub parent: Option<RemoteParent>,
    /// The agent resource's `service.name`.
    pub service_name: String,
    /// Mixed into names and attributes so many agents produce distinguishable
    /// spans.
    pub seq: u64,
    /// A hostile agent: puts this `kata.sandbox.id` on its own resource.
    /// The real Kata agent sets no such attribute (only the host knows which
    /// sandbox a connection comes from), so by default there is none.
    pub claimed_sandbox_id: Option<String>,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            format: WireFormat::Json,
            trace_id: None,
            parent: None,
            service_name: "kata-agent".to_string(),
            seq: 0,
            claimed_sandbox_id: None,
        }
    }
}

/// Frames of one agent trace plus the matching expectations.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Each frame is the 8-byte big-endian length followed by the payload,
    /// in the order the agent would write them (span end order).
    pub frames: Vec<Vec<u8>>,
    /// One entry per frame, same order.
    pub expected: Vec<ExpectedSpan>,
}

impl Scenario {
    /// All frames concatenated, as they would appear on the agent's stream.
    pub fn stream_bytes(&self) -> Vec<u8> {
        self.frames.concat()
    }
}

/// Format-independent view of one exported `SpanData`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpectedSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: u64,
    pub trace_flags: u8,
    pub is_remote: bool,
    /// W3C string "k1=v1,k2=v2" in the SDK's own order ("" if none).
    pub trace_state: String,
    pub name: String,
    pub kind: ExpectedKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// Sorted by key.
    pub attributes: Vec<(String, ExpectedValue)>,
    pub dropped_attributes_count: u32,
    pub events: Vec<ExpectedEvent>,
    pub dropped_events_count: u32,
    pub links: Vec<ExpectedLink>,
    pub dropped_links_count: u32,
    pub status: ExpectedStatus,
    pub status_message: String,
    /// Sorted by key; empty when the SDK sent no resource.
    pub resource: Vec<(String, ExpectedValue)>,
}

impl ExpectedSpan {
    /// Looks up a span attribute by key.
    pub fn attribute(&self, key: &str) -> Option<&ExpectedValue> {
        lookup(&self.attributes, key)
    }

    /// Looks up a resource attribute by key.
    pub fn resource_attribute(&self, key: &str) -> Option<&ExpectedValue> {
        lookup(&self.resource, key)
    }
}

fn lookup<'a>(kvs: &'a [(String, ExpectedValue)], key: &str) -> Option<&'a ExpectedValue> {
    kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExpectedKind {
    Client,
    Server,
    Producer,
    Consumer,
    Internal,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ExpectedValue {
    Bool(bool),
    I64(i64),
    F64(#[serde(with = "guest::f64_bits")] f64),
    String(String),
    BoolArray(Vec<bool>),
    I64Array(Vec<i64>),
    F64Array(#[serde(with = "guest::f64_bits_vec")] Vec<f64>),
    StringArray(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpectedEvent {
    pub name: String,
    pub time_unix_nanos: u64,
    /// In the order they were recorded.
    pub attributes: Vec<(String, ExpectedValue)>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpectedLink {
    pub trace_id: u128,
    pub span_id: u64,
    pub trace_state: String,
    /// In the order they were recorded.
    pub attributes: Vec<(String, ExpectedValue)>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExpectedStatus {
    Unset,
    Ok,
    Error,
}

/// Prefixes `payload` with its 8-byte big-endian length, as the agent's
/// vsock-exporter writes it.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Drives the real SDK through the "kitchen sink" agent trace and returns its
/// frames together with expectations extracted from the exported `SpanData`.
///
/// Eleven spans, in end order, all in one trace:
/// - `create_container` (Server, root or child of `opts.parent`; every
///   attribute type, an event, a link with trace state, status Ok)
///   - `do_create_container` (Internal)
///     - `mount` (Internal)
///       - `mount_storage <weird text> seq=N` (Client; escape-needing and
///         non-ASCII name, key, values and event name; status Error)
///     - `setup_cgroups` (Internal; overflows every span limit, so all dropped
///       counts are non-zero)
///     - `start_process` (Internal) → `oci_hook prestart` (Client)
///   - `publish_container_event` (Producer)
/// - `start_container` (Server, child of a remote runtime span whose context
///   carries a trace state, inherited by its subtree)
///   - `do_start_container` (Internal) → `oom_event_listener` (Consumer)
pub fn scenario(opts: &ScenarioOptions) -> Scenario {
    let config = scenario_config(opts);
    let captured = match opts.format {
        WireFormat::Json => sdk017::run(&config, true, |sdk| kitchen_sink(sdk, opts)),
        WireFormat::Bincode => sdk014::run(&config, true, |sdk| kitchen_sink(sdk, opts)),
    };
    let mut frames = Vec::with_capacity(captured.len());
    let mut expected = Vec::with_capacity(captured.len());
    for (f, e) in captured {
        frames.push(f);
        expected.push(e.expect("scenario keeps expectations"));
    }
    Scenario { frames, expected }
}

fn scenario_config(opts: &ScenarioOptions) -> SdkConfig {
    SdkConfig {
        limits: SCENARIO_LIMITS,
        resource: agent_resource(opts),
        trace_id: opts.trace_id,
    }
}

/// `n` simple agent RPC spans, one frame each, whose payloads are close to
/// `approx_bytes` (padded through a realistic `req` attribute). A payload can
/// never be smaller than the bare span, see [`bulk_min_payload`]. Meant for
/// load tests and benchmarks, so no expectations are kept; the attribute
/// `kata.span_index` (0..n) lets a test check that every span arrived once.
pub fn bulk_frames(format: WireFormat, n: usize, approx_bytes: usize, seq: u64) -> Vec<Vec<u8>> {
    if n == 0 {
        return Vec::new();
    }
    run_bulk(format, &bulk_specs(format, n, approx_bytes, seq), seq)
}

fn bulk_specs(format: WireFormat, n: usize, approx_bytes: usize, seq: u64) -> Vec<BulkSpan> {
    // Payload size depends on the name and on the encoding, so measure each
    // RPC name once with an empty request and pad the real spans to the target.
    let base = bulk_base_sizes(format, n.max(1), seq);
    (0..n)
        .map(|index| {
            let rpc = index % BULK_RPCS.len();
            BulkSpan {
                index,
                rpc,
                req_len: approx_bytes.saturating_sub(base[rpc]),
            }
        })
        .collect()
}

/// The smallest payload [`bulk_frames`] can produce for `format`: a real SDK
/// span carries a fixed skeleton (ids, times, evicted-collection metadata,
/// resource): about 800-850 bytes in JSON and 400 in bincode.
pub fn bulk_min_payload(format: WireFormat) -> usize {
    bulk_base_sizes(format, 1, 0).into_iter().max().unwrap_or(0)
}

fn bulk_base_sizes(format: WireFormat, n: usize, seq: u64) -> Vec<usize> {
    let calibration: Vec<BulkSpan> = (0..BULK_RPCS.len())
        .map(|rpc| BulkSpan {
            // The largest index has the most digits in JSON.
            index: n.saturating_sub(1),
            rpc,
            req_len: 0,
        })
        .collect();
    run_bulk(format, &calibration, seq)
        .iter()
        .map(|f| f.len() - 8)
        .collect()
}

fn bulk_config(format: WireFormat) -> SdkConfig {
    SdkConfig {
        limits: Limits::SDK_DEFAULT,
        // Like a real agent, which only gets the SDK's service.name: keeps
        // the per-span skeleton small so modest payload sizes are reachable.
        resource: vec![
            (
                "service.name".into(),
                ExpectedValue::String("kata-agent".into()),
            ),
            (
                "kata.version".into(),
                ExpectedValue::String(agent_version(format).into()),
            ),
        ],
        trace_id: None,
    }
}

fn run_bulk(format: WireFormat, specs: &[BulkSpan], seq: u64) -> Vec<Vec<u8>> {
    let config = bulk_config(format);
    let captured = match format {
        WireFormat::Json => sdk017::run(&config, false, |sdk| {
            bulk_spans(sdk, specs, seq, &mut |_| {})
        }),
        WireFormat::Bincode => sdk014::run(&config, false, |sdk| {
            bulk_spans(sdk, specs, seq, &mut |_| {})
        }),
    };
    captured.into_iter().map(|(f, _)| f).collect()
}

/// A Kata 3.29+ agent at its own pace, live: `rate` spans per second for
/// `duration`, each made and ended when it is due, like [`bulk_frames`]'
/// (payloads close to `approx_bytes`), through opentelemetry 0.17's *batch*
/// span processor at its default schedule, as the agent configures it
/// (a batch every 5 s, or as soon as 512 spans wait, whichever comes first;
/// `OTEL_BSP_*` apply, as they do to the agent), and written to `conn` one
/// frame per span as Kata's vsock-exporter writes them (header, then
/// payload). So the forwarder sees what a real agent sends: bursts of
/// hundreds of frames, seconds apart. Blocks until the last batch is
/// written. Returns the spans written, or the first write error.
pub fn live_agent<W>(
    conn: W,
    rate: f64,
    duration: Duration,
    approx_bytes: usize,
    seq: u64,
) -> std::io::Result<u64>
where
    W: std::io::Write + Send + fmt::Debug + 'static,
{
    let n = (rate * duration.as_secs_f64()) as usize;
    let specs = bulk_specs(WireFormat::Json, n, approx_bytes, seq);
    let config = bulk_config(WireFormat::Json);
    let start = std::time::Instant::now();
    let mut pace = |i: usize| {
        let due = start + Duration::from_secs_f64(i as f64 / rate.max(f64::MIN_POSITIVE));
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    };
    sdk017::run_batched(&config, conn, |sdk| bulk_spans(sdk, &specs, seq, &mut pace))
}

/// Nanoseconds since the Unix epoch, the unit `ExpectedSpan` uses.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("span times are after the epoch")
        .as_nanos() as u64
}

// ---------------------------------------------------------------------------
// Format-independent scenario description, executed against either SDK.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Limits {
    attributes_per_span: u32,
    events_per_span: u32,
    links_per_span: u32,
    attributes_per_event: u32,
    attributes_per_link: u32,
}

impl Limits {
    const SDK_DEFAULT: Limits = Limits {
        attributes_per_span: 128,
        events_per_span: 128,
        links_per_span: 128,
        attributes_per_event: 128,
        attributes_per_link: 128,
    };
}

// Small enough that the "setup_cgroups" span overflows every limit through the
// SDK's own eviction, large enough that the other spans keep all their data.
const SCENARIO_LIMITS: Limits = Limits {
    attributes_per_span: 16,
    events_per_span: 4,
    links_per_span: 2,
    attributes_per_event: 4,
    attributes_per_link: 3,
};

struct SdkConfig {
    limits: Limits,
    resource: Vec<(String, ExpectedValue)>,
    trace_id: Option<u128>,
}

/// A remote span context (always sampled, as the runtime only propagates
/// sampled traces to the agent).
struct RemoteSpec {
    trace_id: u128,
    span_id: u64,
    trace_state: Vec<(String, String)>,
}

struct LinkSpec {
    trace_id: u128,
    span_id: u64,
    trace_state: Vec<(String, String)>,
    attributes: Vec<(String, ExpectedValue)>,
}

struct SpanSpec {
    name: String,
    kind: ExpectedKind,
    start: SystemTime,
    attributes: Vec<(String, ExpectedValue)>,
    links: Vec<LinkSpec>,
}

impl SpanSpec {
    fn new(name: impl Into<String>, kind: ExpectedKind, start: SystemTime) -> Self {
        SpanSpec {
            name: name.into(),
            kind,
            start,
            attributes: Vec::new(),
            links: Vec::new(),
        }
    }

    fn attr(mut self, key: &str, value: ExpectedValue) -> Self {
        self.attributes.push((key.to_string(), value));
        self
    }

    fn link(mut self, link: LinkSpec) -> Self {
        self.links.push(link);
        self
    }
}

/// The operations the agent performs on the SDK, implemented once per
/// opentelemetry version so the same script yields both wire formats.
trait AgentSdk {
    /// An opentelemetry `Context`, holding the active span once started.
    type Cx;

    fn root(&self, parent: Option<&RemoteSpec>) -> Self::Cx;
    fn start(&self, parent: &Self::Cx, spec: SpanSpec) -> Self::Cx;
    /// (trace id, span id) of the span held by `cx`.
    fn ids(&self, cx: &Self::Cx) -> (u128, u64);
    fn set_attribute(&self, cx: &Self::Cx, key: &str, value: ExpectedValue);
    fn add_event(
        &self,
        cx: &Self::Cx,
        name: &str,
        at: SystemTime,
        attributes: Vec<(String, ExpectedValue)>,
    );
    fn set_status(&self, cx: &Self::Cx, status: ExpectedStatus, message: &str);
    fn end(&self, cx: Self::Cx, at: SystemTime);
    /// Random ids from the SDK's generator, for contexts outside this agent.
    fn random_trace_id(&self) -> u128;
    fn random_span_id(&self) -> u64;
}

fn agent_resource(opts: &ScenarioOptions) -> Vec<(String, ExpectedValue)> {
    use ExpectedValue::*;
    let mut resource = vec![
        ("service.name".into(), String(opts.service_name.clone())),
        (
            "kata.version".into(),
            String(agent_version(opts.format).to_string()),
        ),
        // The agent is the guest's init process.
        ("process.pid".into(), I64(1)),
        ("kata.debug_console".into(), Bool(false)),
        (
            "kata.guest.features".into(),
            StringArray(vec!["seccomp".into(), "agent-policy".into()]),
        ),
    ];
    if let Some(id) = &opts.claimed_sandbox_id {
        resource.push(("kata.sandbox.id".into(), String(id.clone())));
    }
    resource
}

/// Newest Kata release speaking each format.
fn agent_version(format: WireFormat) -> &'static str {
    match format {
        WireFormat::Json => "3.29.0",
        WireFormat::Bincode => "3.28.0",
    }
}

fn container_id(seq: u64) -> String {
    format!("c0ffee{seq:010x}4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4")
}

/// Strings that exercise every escaping path of the JSON encoder and the
/// UTF-8 handling of the forwarder: non-ASCII, quotes, backslashes, newline,
/// tab, C0 controls, DEL and U+2028 (a JSON-legal line separator).
const WEIRD: &str =
    "naïve ✓ 漢字 🚀 \"quoted\" back\\slash\nnew line\ttab \u{1}\u{1b}\u{7f}\u{2028}";

fn kitchen_sink<S: AgentSdk>(sdk: &S, opts: &ScenarioOptions) {
    use ExpectedKind::*;
    use ExpectedValue as V;

    let seq = opts.seq;
    let cid = container_id(seq);
    // Odd sub-microsecond offsets so nanosecond precision is exercised: from
    // a whole microsecond, so that no offset lands on one by chance (the
    // clock's own nanoseconds did, once in a thousand runs).
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let t0 = UNIX_EPOCH + Duration::from_micros(since_epoch.as_micros() as u64);
    let at = |micros: u64| t0 + Duration::from_nanos(micros * 1_000 + 123 + seq % 877);
    let seq_i64 = seq as i64;
    let trace_state = vec![
        ("kata".to_string(), format!("shim-v2-{seq}")),
        ("rojo".to_string(), "00f067aa0ba902b7".to_string()),
    ];

    // Tree 1: the runtime's CreateContainer RPC.
    let parent = opts.parent.map(|p| RemoteSpec {
        trace_id: p.trace_id,
        span_id: p.span_id,
        trace_state: trace_state.clone(),
    });
    let root_cx = sdk.root(parent.as_ref());
    let sandbox_link = LinkSpec {
        trace_id: sdk.random_trace_id(),
        span_id: sdk.random_span_id(),
        trace_state: vec![("congo".into(), "t61rcWkgMzE".into())],
        attributes: vec![
            ("link.reason".into(), V::String("sandbox creation".into())),
            ("link.seq".into(), V::I64(seq_i64)),
        ],
    };
    let rpc = sdk.start(
        &root_cx,
        SpanSpec::new("create_container", Server, at(0))
            .attr("mod", V::String("rpc.rs".into()))
            .attr("container_id", V::String(cid.clone()))
            .attr("kata.seq", V::I64(seq_i64))
            .attr("bool.true", V::Bool(true))
            .attr("bool.false", V::Bool(false))
            .attr("i64.negative", V::I64(-42))
            .attr("i64.min", V::I64(i64::MIN))
            .attr("i64.max", V::I64(i64::MAX))
            .attr("f64.fractional", V::F64(1234.5678))
            .attr("f64.negative", V::F64(-0.000123))
            .attr("string.weird", V::String(WEIRD.into()))
            .attr("array.bool", V::BoolArray(vec![true, false, true]))
            .attr("array.i64", V::I64Array(vec![i64::MIN, -1, 0, 1, i64::MAX]))
            .attr(
                "array.f64",
                V::F64Array(vec![0.1, -1.25, 1e300, 6.02214076e23, f64::MIN_POSITIVE]),
            )
            .attr(
                "array.string",
                V::StringArray(vec![
                    "naïve ✓".into(),
                    "漢字 🚀".into(),
                    "quote\"back\\slash".into(),
                    "line\nbreak\ttab\u{1}".into(),
                    String::new(),
                ]),
            )
            .link(sandbox_link),
    );
    // Tree 2 must share the trace id the SDK picked (or inherited) here.
    let (trace_id, _) = sdk.ids(&rpc);
    sdk.add_event(
        &rpc,
        "request received ✓ «CreateContainerRequest»",
        at(3),
        vec![
            ("req.bytes".into(), V::I64(4096)),
            ("naïve.key ✓".into(), V::String("漢字 🚀".into())),
            ("ratio".into(), V::F64(0.25)),
        ],
    );

    let do_create = sdk.start(
        &rpc,
        SpanSpec::new("do_create_container", Internal, at(10))
            .attr("container_id", V::String(cid.clone()))
            .attr("kata.seq", V::I64(seq_i64)),
    );

    let mount = sdk.start(
        &do_create,
        SpanSpec::new("mount", Internal, at(20))
            .attr("mount.count", V::I64(3))
            .attr("kata.seq", V::I64(seq_i64)),
    );
    let storage = sdk.start(
        &mount,
        SpanSpec::new(format!("mount_storage {WEIRD} seq={seq}"), Client, at(25))
            .attr(
                "mount.source",
                V::String(format!(
                    "/run/kata-containers/shared/containers/{cid}/rootfs"
                )),
            )
            .attr("mount.fstype", V::String("virtiofs".into()))
            .attr(WEIRD, V::String(WEIRD.into())),
    );
    sdk.add_event(
        &storage,
        &format!("retry {WEIRD}"),
        at(30),
        vec![
            ("errno".into(), V::I64(-16)),
            (
                "error".into(),
                V::String("EBUSY: \"device or resource busy\"\n".into()),
            ),
        ],
    );
    sdk.set_status(
        &storage,
        ExpectedStatus::Error,
        "mount failed: \"EBUSY\" at C:\\kata\\rootfs ✓ 漢字\n\tretry 1/3",
    );
    sdk.end(storage, at(40));
    sdk.set_attribute(&mount, "mount.retries", V::I64(1));
    sdk.end(mount, at(45));

    // Overflows every span limit so the SDK itself evicts data and counts it.
    let link = |i: i64| LinkSpec {
        trace_id: sdk.random_trace_id(),
        span_id: sdk.random_span_id(),
        trace_state: vec![("kata".into(), format!("cg{i}"))],
        attributes: (0..5)
            .map(|k| (format!("link{i}.attr{k}"), V::I64(i * 10 + k)))
            .collect(),
    };
    let mut cg_spec = SpanSpec::new("setup_cgroups", Internal, at(50))
        .link(link(0))
        .link(link(1))
        .link(link(2));
    for k in 0..20 {
        cg_spec = cg_spec.attr(&format!("cgroup.attr{k:02}"), V::I64(k));
    }
    let cgroups = sdk.start(&do_create, cg_spec);
    for e in 0..6u64 {
        sdk.add_event(
            &cgroups,
            &format!("cgroup step {e}"),
            at(51 + e),
            (0..6)
                .map(|k| (format!("step{e}.attr{k}"), V::I64((e * 10 + k) as i64)))
                .collect(),
        );
    }
    sdk.end(cgroups, at(60));

    let start_process = sdk.start(
        &do_create,
        SpanSpec::new("start_process", Internal, at(61))
            .attr("exec_id", V::String(cid.clone()))
            .attr("process.args", V::StringArray(vec!["/pause".into()]))
            .attr("kata.seq", V::I64(seq_i64)),
    );
    let hook = sdk.start(
        &start_process,
        SpanSpec::new("oci_hook prestart", Client, at(62))
            .attr(
                "hook.path",
                V::String("/usr/share/oci/hooks/prestart/nvidia".into()),
            )
            .attr("hook.timeout_secs", V::F64(2.5)),
    );
    sdk.end(hook, at(70));
    sdk.end(start_process, at(80));
    sdk.end(do_create, at(85));

    let publish = sdk.start(
        &rpc,
        SpanSpec::new("publish_container_event", Producer, at(86))
            .attr("event.topic", V::String("/tasks/create".into())),
    );
    sdk.end(publish, at(88));

    sdk.set_attribute(&rpc, "rpc.result", V::String("ok".into()));
    sdk.set_status(&rpc, ExpectedStatus::Ok, "");
    sdk.end(rpc, at(90));

    // Tree 2: StartContainer, always under a remote runtime span that carries
    // a trace_state, so the state is present even when `opts.parent` is None.
    let runtime = RemoteSpec {
        trace_id,
        span_id: opts
            .parent
            .map_or_else(|| sdk.random_span_id(), |p| p.span_id),
        trace_state,
    };
    let root2 = sdk.root(Some(&runtime));
    let rpc2 = sdk.start(
        &root2,
        SpanSpec::new("start_container", Server, at(100))
            .attr("mod", V::String("rpc.rs".into()))
            .attr("container_id", V::String(cid.clone()))
            .attr("kata.seq", V::I64(seq_i64)),
    );
    let do_start = sdk.start(
        &rpc2,
        SpanSpec::new("do_start_container", Internal, at(101)).attr("container_id", V::String(cid)),
    );
    let oom = sdk.start(
        &do_start,
        SpanSpec::new("oom_event_listener", Consumer, at(102))
            .attr("event.source", V::String("cgroup.events".into())),
    );
    sdk.add_event(&oom, "armed", at(103), Vec::new());
    sdk.end(oom, at(104));
    sdk.end(do_start, at(105));
    sdk.set_status(&rpc2, ExpectedStatus::Ok, "");
    sdk.end(rpc2, at(106));
}

const BULK_RPCS: [&str; 8] = [
    "create_container",
    "start_container",
    "exec_process",
    "wait_process",
    "read_stdout",
    "stats_container",
    "update_routes",
    "remove_container",
];

struct BulkSpan {
    index: usize,
    rpc: usize,
    req_len: usize,
}

/// `pace` is called before each span is made, with its index: a live agent
/// sleeps there until the span is due.
fn bulk_spans<S: AgentSdk>(sdk: &S, specs: &[BulkSpan], seq: u64, pace: &mut dyn FnMut(usize)) {
    use ExpectedValue as V;
    let t0 = SystemTime::now();
    let trace_id = sdk.random_trace_id();
    let cid = container_id(seq);
    for s in specs {
        pace(s.index);
        let runtime = RemoteSpec {
            trace_id,
            span_id: sdk.random_span_id(),
            trace_state: Vec::new(),
        };
        let root = sdk.root(Some(&runtime));
        let start = t0 + Duration::from_nanos(s.index as u64 * 10_000 + 7);
        // Shaped like the Debug-formatted request the agent's trace_rpc_call!
        // records, padded to reach the requested payload size.
        let mut req = format!(
            "{}Request {{ container_id: \"{cid}\", pad: \"",
            camel(BULK_RPCS[s.rpc])
        );
        req.push_str(&"x".repeat(s.req_len.saturating_sub(req.len() + 3)));
        req.push_str("\" }");
        // Everything is ASCII, so cutting anywhere keeps valid UTF-8.
        req.truncate(s.req_len);
        let cx = sdk.start(
            &root,
            SpanSpec::new(BULK_RPCS[s.rpc], ExpectedKind::Server, start)
                .attr("mod", V::String("rpc.rs".into()))
                .attr("kata.seq", V::I64(seq as i64))
                .attr("kata.span_index", V::I64(s.index as i64))
                .attr("req", V::String(req)),
        );
        sdk.set_status(&cx, ExpectedStatus::Ok, "");
        sdk.end(cx, start + Duration::from_nanos(4_321));
    }
}

fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Per-version SDK glue. The two opentelemetry versions expose structurally
// identical `Value`/`SpanData` types, so conversions are generated once.
// ---------------------------------------------------------------------------

macro_rules! otel_common {
    ($ot:ident) => {
        use crate::{
            ExpectedEvent, ExpectedKind, ExpectedLink, ExpectedSpan, ExpectedStatus, ExpectedValue,
        };
        use $ot::sdk::export::trace::SpanData;
        use $ot::trace::{SpanKind, StatusCode};
        use $ot::{Array, Key, KeyValue, Value};

        pub(crate) fn to_value(v: ExpectedValue) -> Value {
            match v {
                ExpectedValue::Bool(b) => Value::Bool(b),
                ExpectedValue::I64(i) => Value::I64(i),
                ExpectedValue::F64(f) => Value::F64(f),
                ExpectedValue::String(s) => Value::String(s.into()),
                ExpectedValue::BoolArray(a) => Value::Array(Array::Bool(a)),
                ExpectedValue::I64Array(a) => Value::Array(Array::I64(a)),
                ExpectedValue::F64Array(a) => Value::Array(Array::F64(a)),
                ExpectedValue::StringArray(a) => {
                    Value::Array(Array::String(a.into_iter().map(Into::into).collect()))
                }
            }
        }

        pub(crate) fn from_value(v: &Value) -> ExpectedValue {
            match v {
                Value::Bool(b) => ExpectedValue::Bool(*b),
                Value::I64(i) => ExpectedValue::I64(*i),
                Value::F64(f) => ExpectedValue::F64(*f),
                Value::String(s) => ExpectedValue::String(s.to_string()),
                Value::Array(Array::Bool(a)) => ExpectedValue::BoolArray(a.clone()),
                Value::Array(Array::I64(a)) => ExpectedValue::I64Array(a.clone()),
                Value::Array(Array::F64(a)) => ExpectedValue::F64Array(a.clone()),
                Value::Array(Array::String(a)) => {
                    ExpectedValue::StringArray(a.iter().map(|s| s.to_string()).collect())
                }
            }
        }

        pub(crate) fn to_key_values(kvs: Vec<(String, ExpectedValue)>) -> Vec<KeyValue> {
            kvs.into_iter()
                .map(|(k, v)| KeyValue::new(Key::new(k), to_value(v)))
                .collect()
        }

        fn from_key_values(kvs: &[KeyValue]) -> Vec<(String, ExpectedValue)> {
            kvs.iter()
                .map(|kv| (kv.key.as_str().to_string(), from_value(&kv.value)))
                .collect()
        }

        fn sorted<'a>(
            kvs: impl Iterator<Item = (&'a Key, &'a Value)>,
        ) -> Vec<(String, ExpectedValue)> {
            let mut out: Vec<_> = kvs
                .map(|(k, v)| (k.as_str().to_string(), from_value(v)))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }

        pub(crate) fn to_kind(kind: ExpectedKind) -> SpanKind {
            match kind {
                ExpectedKind::Client => SpanKind::Client,
                ExpectedKind::Server => SpanKind::Server,
                ExpectedKind::Producer => SpanKind::Producer,
                ExpectedKind::Consumer => SpanKind::Consumer,
                ExpectedKind::Internal => SpanKind::Internal,
            }
        }

        pub(crate) fn to_status(status: ExpectedStatus) -> StatusCode {
            match status {
                ExpectedStatus::Unset => StatusCode::Unset,
                ExpectedStatus::Ok => StatusCode::Ok,
                ExpectedStatus::Error => StatusCode::Error,
            }
        }

        /// Reads everything the wire carries out of the SDK's own `SpanData`.
        pub(crate) fn expected_from(span: &SpanData) -> ExpectedSpan {
            let sc = &span.span_context;
            ExpectedSpan {
                trace_id: trace_id_u128(sc.trace_id()),
                span_id: span_id_u64(sc.span_id()),
                parent_span_id: span_id_u64(span.parent_span_id),
                trace_flags: flags_u8(sc),
                is_remote: sc.is_remote(),
                trace_state: sc.trace_state().header(),
                name: span.name.to_string(),
                kind: match span.span_kind {
                    SpanKind::Client => ExpectedKind::Client,
                    SpanKind::Server => ExpectedKind::Server,
                    SpanKind::Producer => ExpectedKind::Producer,
                    SpanKind::Consumer => ExpectedKind::Consumer,
                    SpanKind::Internal => ExpectedKind::Internal,
                },
                start_unix_nanos: crate::unix_nanos(span.start_time),
                end_unix_nanos: crate::unix_nanos(span.end_time),
                attributes: sorted(span.attributes.iter()),
                dropped_attributes_count: span.attributes.dropped_count(),
                events: span
                    .events
                    .iter()
                    .map(|e| ExpectedEvent {
                        name: e.name.to_string(),
                        time_unix_nanos: crate::unix_nanos(e.timestamp),
                        attributes: from_key_values(&e.attributes),
                        dropped_attributes_count: e.dropped_attributes_count,
                    })
                    .collect(),
                dropped_events_count: span.events.dropped_count(),
                links: span
                    .links
                    .iter()
                    .map(|l| ExpectedLink {
                        trace_id: trace_id_u128(l.span_context().trace_id()),
                        span_id: span_id_u64(l.span_context().span_id()),
                        trace_state: l.span_context().trace_state().header(),
                        attributes: from_key_values(l.attributes()),
                        dropped_attributes_count: l.dropped_attributes_count(),
                    })
                    .collect(),
                dropped_links_count: span.links.dropped_count(),
                status: match span.status_code {
                    StatusCode::Unset => ExpectedStatus::Unset,
                    StatusCode::Ok => ExpectedStatus::Ok,
                    StatusCode::Error => ExpectedStatus::Error,
                },
                status_message: span.status_message.to_string(),
                resource: span
                    .resource
                    .as_ref()
                    .map(|r| sorted(r.iter()))
                    .unwrap_or_default(),
            }
        }
    };
}

pub mod guest;
mod sdk014;
mod sdk017;

#[cfg(test)]
mod tests;
