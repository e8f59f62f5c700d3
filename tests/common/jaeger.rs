//! A real Jaeger (v2) for the end-to-end tests: one process per test, with
//! tests/jaeger-config.yaml (in-memory storage, OTLP gRPC and HTTP receivers,
//! the query service) on free loopback ports, its HTTP query API read as JSON,
//! and the comparison of what Jaeger shows against what the agent's SDK
//! produced.
//!
//! The binary is `JAEGER_BIN`, else the one scripts/setup-jaeger.sh caches.
//! Without either, the tests fail (they never skip).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kata_agent_emitter::{ExpectedSpan, ExpectedStatus, ExpectedValue};
use serde_json::{json, Value};

/// The Jaeger module version scripts/setup-jaeger.sh builds by default.
pub const JAEGER_VERSION: &str = "v1.75.0";

/// The Jaeger binary: `JAEGER_BIN`, else the cached build of
/// scripts/setup-jaeger.sh. Panics (fails the test) when there is neither.
pub fn jaeger_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("JAEGER_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "JAEGER_BIN={} is not an executable file; unset it or run scripts/setup-jaeger.sh",
            bin.display()
        );
        return bin;
    }
    let version = std::env::var("JAEGER_VERSION").unwrap_or_else(|_| JAEGER_VERSION.into());
    let cache = std::env::var_os("JAEGER_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("kata-trace-forwarder/jaeger"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/kata-trace-forwarder/jaeger"))
        })
        .unwrap_or_default();
    let bin = cache.join(&version).join("jaeger");
    assert!(
        is_executable(&bin),
        "no Jaeger binary for the end-to-end tests: JAEGER_BIN is unset and {} does not exist. \
         Run scripts/setup-jaeger.sh (builds Jaeger {version} with Go, once) or set JAEGER_BIN \
         to a Jaeger v2 binary; scripts/test.sh does this for you.",
        bin.display()
    );
    bin
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The config every test Jaeger runs with (addresses come from the
/// environment, see the file).
pub fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jaeger-config.yaml")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The loopback addresses one Jaeger listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub query_http: u16,
    pub query_grpc: u16,
}

impl Ports {
    /// Four distinct ports that are free right now.
    pub fn free() -> Ports {
        // Held together while picking so the four differ.
        let ls: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let p = |i: usize| ls[i].local_addr().unwrap().port();
        Ports {
            otlp_grpc: p(0),
            otlp_http: p(1),
            query_http: p(2),
            query_grpc: p(3),
        }
    }

    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http)
    }

    /// The OTLP endpoint for a forwarder `--otlp-protocol`.
    pub fn otlp_endpoint(&self, protocol: &str) -> String {
        match protocol {
            "grpc" => self.otlp_grpc_endpoint(),
            _ => self.otlp_http_endpoint(),
        }
    }

    /// Forwarder flags that export to this Jaeger over `protocol`.
    pub fn forwarder_args(&self, protocol: &str) -> Vec<String> {
        vec![
            "--otlp-protocol".into(),
            protocol.into(),
            "--otlp-endpoint".into(),
            self.otlp_endpoint(protocol),
        ]
    }
}

/// A running Jaeger, killed on drop.
pub struct Jaeger {
    child: Child,
    pub ports: Ports,
    dir: tempfile::TempDir,
    log: PathBuf,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Jaeger {
    /// Starts Jaeger on free ports and waits until it is ready. A start that
    /// lost one of its ports to another process is retried on new ones.
    pub async fn start() -> Jaeger {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_on(Ports::free()).await {
                Ok(j) => return j,
                Err(log) if attempt < 3 && log.contains("address already in use") => continue,
                Err(log) => panic!("Jaeger did not start:\n{log}"),
            }
        }
    }

    /// Starts Jaeger on `ports` and waits until its query API answers and
    /// both OTLP ports accept connections. `Err` carries Jaeger's log when it
    /// exited instead.
    pub async fn start_on(ports: Ports) -> Result<Jaeger, String> {
        let bin = jaeger_bin();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("jaeger.log");
        let out = File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(format!("file:{}", config_path().display()))
            .env("JAEGER_OTLP_GRPC", format!("127.0.0.1:{}", ports.otlp_grpc))
            .env("JAEGER_OTLP_HTTP", format!("127.0.0.1:{}", ports.otlp_http))
            .env(
                "JAEGER_QUERY_HTTP",
                format!("127.0.0.1:{}", ports.query_http),
            )
            .env(
                "JAEGER_QUERY_GRPC",
                format!("127.0.0.1:{}", ports.query_grpc),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut j = Jaeger {
            child,
            ports,
            dir,
            log,
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = j.child.try_wait().unwrap() {
                return Err(format!("Jaeger exited with {status}; log:\n{}", j.log()));
            }
            if j.ready().await {
                return Ok(j);
            }
            assert!(
                Instant::now() < deadline,
                "Jaeger not ready after 60s; log:\n{}",
                j.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self) -> bool {
        let accepts = |port: u16| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(200),
            )
            .is_ok()
        };
        accepts(self.ports.otlp_grpc)
            && accepts(self.ports.otlp_http)
            && matches!(self.get("/api/services").await, Ok((200, _)))
    }

    /// Jaeger's own log (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Forwarder flags that export to this Jaeger over `protocol`.
    pub fn forwarder_args(&self, protocol: &str) -> Vec<String> {
        self.ports.forwarder_args(protocol)
    }

    /// GET on the query service: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, Vec<u8>), String> {
        let uri: hyper::Uri = format!("http://127.0.0.1:{}{path}", self.ports.query_http)
            .parse()
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.get(uri))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body.to_vec()))
    }

    /// GET returning JSON, panicking on anything but 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// `/api/traces/{id}`: the whole response (`data` holds the traces), or
    /// `None` while Jaeger does not know the trace (404).
    pub async fn trace_response(&self, trace_id: u128) -> Option<Value> {
        let path = format!("/api/traces/{}", trace_id_hex(trace_id));
        let (status, body) = self.get(&path).await.unwrap();
        match status {
            404 => None,
            200 => Some(serde_json::from_slice(&body).unwrap()),
            s => panic!("GET {path}: {s}: {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Polls until Jaeger has at least `n` spans of the trace, then returns
    /// the trace (`data[0]`) after checking it is the only one and has
    /// exactly `n` spans.
    pub async fn wait_for_trace(&self, trace_id: u128, n: usize, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let resp = self.trace_response(trace_id).await;
            let got = resp
                .as_ref()
                .map_or(0, |r| r["data"][0]["spans"].as_array().map_or(0, Vec::len));
            if got >= n {
                let mut resp = resp.unwrap();
                let data = resp["data"].as_array().unwrap();
                assert_eq!(data.len(), 1, "one trace for {trace_id:032x}: {resp:#}");
                assert_eq!(
                    got, n,
                    "exactly {n} spans in trace {trace_id:032x}: {resp:#}"
                );
                assert_eq!(resp["errors"], Value::Null, "query errors: {resp:#}");
                return resp["data"][0].take();
            }
            assert!(
                Instant::now() < deadline,
                "Jaeger has {got} of {n} spans of trace {trace_id:032x} after {timeout:?}; \
                 Jaeger log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A trace id as Jaeger writes it: 16 hex digits when it fits in 64 bits,
/// else 32.
pub fn trace_id_hex(id: u128) -> String {
    if id >> 64 == 0 {
        format!("{id:016x}")
    } else {
        format!("{id:032x}")
    }
}

pub fn span_id_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// The span of `trace` with `span_id`.
pub fn span(trace: &Value, span_id: u64) -> &Value {
    let id = span_id_hex(span_id);
    let spans: Vec<&Value> = trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["spanID"] == id.as_str())
        .collect();
    assert_eq!(spans.len(), 1, "span {id} found {} times", spans.len());
    spans[0]
}

/// The process (`serviceName`, `tags`) a span of `trace` belongs to.
pub fn process<'a>(trace: &'a Value, span: &Value) -> &'a Value {
    let pid = span["processID"].as_str().unwrap();
    let p = &trace["processes"][pid];
    assert!(
        p.is_object(),
        "process {pid} not in {:#}",
        trace["processes"]
    );
    p
}

const JS_MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A Jaeger tag (or log field) as `{key, type, value}` JSON. Jaeger has no
/// array type: the OTLP array arrives as a string holding the array as JSON.
pub fn jaeger_tag(key: &str, v: &ExpectedValue) -> Value {
    let (ty, value) = match v {
        ExpectedValue::Bool(b) => ("bool", json!(b)),
        // Beyond JavaScript's safe integers (2^53 - 1) Jaeger writes the
        // int64 as a decimal string, so the UI does not round it.
        ExpectedValue::I64(i) if i.unsigned_abs() > JS_MAX_SAFE_INTEGER => {
            ("int64", json!(i.to_string()))
        }
        ExpectedValue::I64(i) => ("int64", json!(i)),
        ExpectedValue::F64(f) => ("float64", json!(f)),
        ExpectedValue::String(s) => ("string", json!(s)),
        ExpectedValue::BoolArray(xs) => ("string", json!(json!(xs).to_string())),
        ExpectedValue::I64Array(xs) => ("string", json!(json!(xs).to_string())),
        ExpectedValue::F64Array(xs) => ("string", json!(json!(xs).to_string())),
        ExpectedValue::StringArray(xs) => ("string", json!(json!(xs).to_string())),
    };
    json!({ "key": key, "type": ty, "value": value })
}

fn is_array(v: &ExpectedValue) -> bool {
    matches!(
        v,
        ExpectedValue::BoolArray(_)
            | ExpectedValue::I64Array(_)
            | ExpectedValue::F64Array(_)
            | ExpectedValue::StringArray(_)
    )
}

/// Compares Jaeger tags with the expected ones, in any order. Arrays must be
/// string tags whose JSON text decodes to exactly the expected elements (Go
/// and serde_json spell some floats differently, e.g. `1e+300` / `1e300`).
pub fn assert_tags(ctx: &str, got: &Value, want: &[(String, ExpectedValue)], extra: &[Value]) {
    let got = got.as_array().cloned().unwrap_or_default();
    let mut want_tags: Vec<(Value, bool)> = want
        .iter()
        .map(|(k, v)| (jaeger_tag(k, v), is_array(v)))
        .collect();
    want_tags.extend(extra.iter().map(|t| (t.clone(), false)));
    let key = |t: &Value| t["key"].as_str().unwrap_or_default().to_string();
    let mut got_keys: Vec<String> = got.iter().map(key).collect();
    let mut want_keys: Vec<String> = want_tags.iter().map(|(t, _)| key(t)).collect();
    got_keys.sort();
    want_keys.sort();
    assert_eq!(got_keys, want_keys, "{ctx}: tag keys");
    for (w, array) in &want_tags {
        let g = got.iter().find(|g| g["key"] == w["key"]).unwrap();
        if *array {
            assert_eq!(
                g["type"], "string",
                "{ctx}: array tag {} is a string",
                w["key"]
            );
            let parse = |v: &Value| -> Value {
                serde_json::from_str(v["value"].as_str().unwrap_or_else(|| {
                    panic!(
                        "{ctx}: array tag {} value {} is not a string",
                        w["key"], v["value"]
                    )
                }))
                .unwrap_or_else(|e| panic!("{ctx}: array tag {} is not JSON: {e}", w["key"]))
            };
            assert_eq!(parse(g), parse(w), "{ctx}: array tag {}", w["key"]);
        } else {
            assert_eq!(g, w, "{ctx}: tag {}", w["key"]);
        }
    }
}

/// Microseconds since the epoch, as Jaeger's JSON writes times (truncated).
pub fn micros(nanos: u64) -> u64 {
    nanos / 1_000
}

/// Asserts that Jaeger's view of a span (and its process) is exactly what
/// OTLP carries of `want`, as Jaeger maps it: see docs/collectors.md, "With Jaeger".
pub fn assert_jaeger_span(trace: &Value, want: &ExpectedSpan, service_name: &str) {
    let got = span(trace, want.span_id);
    let ctx = format!("Jaeger span '{}' ({:016x})", want.name, want.span_id);
    assert_eq!(
        got["traceID"],
        trace_id_hex(want.trace_id).as_str(),
        "{ctx}: traceID"
    );
    assert_eq!(
        got["operationName"],
        want.name.as_str(),
        "{ctx}: operationName"
    );
    assert_eq!(
        got["startTime"],
        micros(want.start_unix_nanos),
        "{ctx}: startTime (µs)"
    );
    assert_eq!(
        got["duration"],
        (want.end_unix_nanos - want.start_unix_nanos) / 1_000,
        "{ctx}: duration (µs)"
    );
    // A parent that is not in the trace (the runtime's span, when only the
    // agent's spans were sent) is flagged, and that is the only warning.
    let parent_known = want.parent_span_id == 0
        || trace["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["spanID"] == span_id_hex(want.parent_span_id).as_str());
    let warnings = if parent_known {
        Value::Null
    } else {
        json!([format!(
            "invalid parent span IDs={}; skipping clock skew adjustment",
            span_id_hex(want.parent_span_id)
        )])
    };
    assert_eq!(got["warnings"], warnings, "{ctx}: warnings");

    // The parent first as CHILD_OF, then every link as FOLLOWS_FROM.
    let mut refs = Vec::new();
    if want.parent_span_id != 0 {
        refs.push(json!({
            "refType": "CHILD_OF",
            "traceID": trace_id_hex(want.trace_id),
            "spanID": span_id_hex(want.parent_span_id),
        }));
    }
    for l in &want.links {
        refs.push(json!({
            "refType": "FOLLOWS_FROM",
            "traceID": trace_id_hex(l.trace_id),
            "spanID": span_id_hex(l.span_id),
        }));
    }
    assert_eq!(got["references"], json!(refs), "{ctx}: references");

    let kind = format!("{:?}", want.kind).to_lowercase();
    let mut extra = vec![json!({"key": "span.kind", "type": "string", "value": kind})];
    match want.status {
        ExpectedStatus::Unset => {}
        ExpectedStatus::Ok => {
            extra.push(json!({"key": "otel.status_code", "type": "string", "value": "OK"}))
        }
        ExpectedStatus::Error => {
            extra.push(json!({"key": "otel.status_code", "type": "string", "value": "ERROR"}));
            extra.push(json!({"key": "error", "type": "bool", "value": true}));
        }
    }
    if !want.status_message.is_empty() {
        extra.push(json!({
            "key": "otel.status_description", "type": "string", "value": want.status_message,
        }));
    }
    if !want.trace_state.is_empty() {
        extra.push(json!({
            "key": "w3c.tracestate", "type": "string", "value": want.trace_state,
        }));
    }
    assert_tags(&ctx, &got["tags"], &want.attributes, &extra);

    // Events become logs: the name as the field `event`, then the attributes.
    let logs = got["logs"].as_array().cloned().unwrap_or_default();
    assert_eq!(logs.len(), want.events.len(), "{ctx}: log count");
    for (g, w) in logs.iter().zip(&want.events) {
        let lctx = format!("{ctx}: log '{}'", w.name);
        assert_eq!(
            g["timestamp"],
            micros(w.time_unix_nanos),
            "{lctx}: timestamp (µs)"
        );
        let event = json!({"key": "event", "type": "string", "value": w.name});
        assert_tags(&lctx, &g["fields"], &w.attributes, &[event]);
    }

    let p = process(trace, got);
    assert_eq!(p["serviceName"], service_name, "{ctx}: serviceName");
    let resource: Vec<_> = want
        .resource
        .iter()
        .filter(|(k, _)| k != "service.name")
        .cloned()
        .collect();
    assert_tags(&format!("{ctx}: process"), &p["tags"], &resource, &[]);
}
