//! Shared harness for the integration tests: the real forwarder binary as a
//! child process, an in-process OTLP receiver (gRPC and HTTP) that records
//! what it is sent, and field-by-field comparison against what the real
//! agent SDK produced.

#![allow(dead_code)]

pub mod agents;
pub mod certs;
pub mod handover;
pub mod jaeger;
pub mod otelcol;
pub mod vm;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kata_agent_emitter::{ExpectedKind, ExpectedSpan, ExpectedStatus, ExpectedValue};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, Span};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub const BIN: &str = env!("CARGO_BIN_EXE_kata-trace-forwarder");
/// A kata-deploy-like tree of Kata configurations (`--kata-root`).
pub const KATA_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kata-host");
/// The attribute that names a span's sandbox: the host's word.
pub const SANDBOX_ID: &str = "kata.sandbox.id";
/// Where an agent's own claim to a sandbox id is kept.
pub const CLAIMED_SANDBOX_ID: &str = "kata.guest.claimed.sandbox.id";
/// Where kata-deploy puts the configurations, under the root.
pub const KATA_DEPLOY: &str = "opt/kata/share/defaults/kata-containers";

/// What the receiver was sent.
#[derive(Default)]
pub struct Store {
    pub spans: Mutex<Vec<(Resource, Span)>>,
    pub requests: AtomicUsize,
    /// Answer this many requests with a retryable failure first.
    pub fail_first: AtomicUsize,
    /// Requests that came gzipped (`grpc-encoding` / `Content-Encoding`).
    pub gzipped: AtomicUsize,
    /// When each span of `spans` arrived, in the same order.
    pub arrived: Mutex<Vec<Instant>>,
    /// A slow collector: over gRPC, each request is answered only after as
    /// long as its spans take at this many spans per second (0: at once).
    pub spans_per_second: std::sync::atomic::AtomicU64,
    notify: Notify,
}

impl Store {
    fn record(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        let mut arrived = self.arrived.lock().unwrap();
        let now = Instant::now();
        for rs in req.resource_spans {
            let resource = rs.resource.unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((resource.clone(), s));
                    arrived.push(now);
                }
            }
        }
        drop((spans, arrived));
        self.notify.notify_waiters();
    }

    /// How long a request of `n` spans takes at `spans_per_second`.
    fn pace(&self, n: usize) -> Duration {
        match self.spans_per_second.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(n as f64 / rate as f64),
        }
    }

    /// Whether this request should fail (and count it).
    fn should_fail(&self) -> bool {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub fn count(&self) -> usize {
        self.spans.lock().unwrap().len()
    }

    /// Waits until at least `n` spans arrived; panics with what did arrive
    /// otherwise.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<(Resource, Span)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.count() >= n {
                return self.spans.lock().unwrap().clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.count();
                assert!(got >= n, "expected {n} spans within {timeout:?}, got {got}");
            }
        }
    }
}

pub struct Receiver {
    pub store: Arc<Store>,
    pub grpc_endpoint: String,
    pub http_endpoint: String,
    grpc_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    /// The receiver runs on a runtime of its own, so that "killing the
    /// collector" can drop every listener and connection at once.
    runtime: Option<tokio::runtime::Runtime>,
}

struct GrpcService(Arc<Store>);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.should_fail() {
            return Err(tonic::Status::unavailable("injected failure"));
        }
        if request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v == "gzip")
        {
            self.0.gzipped.fetch_add(1, Ordering::SeqCst);
        }
        let req = request.into_inner();
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        tokio::time::sleep(self.0.pace(n)).await;
        self.0.record(req);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn bind_std(addr: &str) -> std::net::TcpListener {
    // After a kill, the old port may take a moment to be free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true).unwrap();
                return l;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }
}

impl Receiver {
    /// Starts gRPC and HTTP OTLP receivers on free loopback ports.
    pub async fn start() -> Receiver {
        let store = Arc::new(Store::default());
        let grpc = bind_std("127.0.0.1:0");
        let http = bind_std("127.0.0.1:0");
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let runtime = Self::serve(Arc::clone(&store), grpc, http);
        Receiver {
            store,
            grpc_endpoint: format!("http://{grpc_addr}"),
            http_endpoint: format!("http://{http_addr}"),
            grpc_addr,
            http_addr,
            runtime: Some(runtime),
        }
    }

    /// Kills the receiver: listeners and open connections vanish at once,
    /// as when a collector process dies.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Starts it again on the same ports, keeping what it had received.
    pub fn restart(&mut self) {
        self.kill();
        let grpc = bind_std(&self.grpc_addr.to_string());
        let http = bind_std(&self.http_addr.to_string());
        self.runtime = Some(Self::serve(Arc::clone(&self.store), grpc, http));
    }

    fn serve(
        store: Arc<Store>,
        grpc: std::net::TcpListener,
        http: std::net::TcpListener,
    ) -> tokio::runtime::Runtime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let grpc = TcpListener::from_std(grpc).unwrap();
        let http = TcpListener::from_std(http).unwrap();
        let svc = TraceServiceServer::new(GrpcService(Arc::clone(&store)))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        runtime.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
                .await;
        });
        let http_store = Arc::clone(&store);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = http.accept().await else {
                    continue;
                };
                let store = Arc::clone(&http_store);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = Arc::clone(&store);
                        async move {
                            let path_ok = req.uri().path() == "/v1/traces";
                            let gzipped = req
                                .headers()
                                .get("content-encoding")
                                .is_some_and(|v| v == "gzip");
                            let mut body = req.into_body().collect().await?.to_bytes();
                            if gzipped {
                                use std::io::Read;
                                store.gzipped.fetch_add(1, Ordering::SeqCst);
                                let mut plain = Vec::new();
                                let _ =
                                    flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain);
                                body = Bytes::from(plain);
                            }
                            let resp = if !path_ok {
                                hyper::Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::new()))
                            } else if store.should_fail() {
                                hyper::Response::builder()
                                    .status(503)
                                    .body(Full::new(Bytes::from_static(b"injected failure")))
                            } else {
                                match ExportTraceServiceRequest::decode(body) {
                                    Ok(r) => {
                                        store.record(r);
                                        hyper::Response::builder()
                                            .status(200)
                                            .header("content-type", "application/x-protobuf")
                                            .body(Full::new(Bytes::from(
                                                ExportTraceServiceResponse::default()
                                                    .encode_to_vec(),
                                            )))
                                    }
                                    Err(_) => hyper::Response::builder()
                                        .status(400)
                                        .body(Full::new(Bytes::new())),
                                }
                            };
                            Ok::<_, hyper::Error>(resp.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        runtime
    }

    /// Forwarder flags that point at this receiver over `protocol`.
    pub fn args(&self, protocol: &str) -> Vec<String> {
        let endpoint = match protocol {
            "grpc" => &self.grpc_endpoint,
            _ => &self.http_endpoint,
        };
        vec![
            "--otlp-protocol".into(),
            protocol.into(),
            "--otlp-endpoint".into(),
            endpoint.clone(),
        ]
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The forwarder binary running as a child process.
pub struct Forwarder {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The `--socket-path` given (hybrid mode).
    pub socket_path: PathBuf,
    /// The Unix socket agents connect to: `<socket_path>_<port>`.
    pub agent_socket: PathBuf,
    stderr: PathBuf,
    stdout: PathBuf,
}

impl Forwarder {
    /// Spawns the forwarder in hybrid mode on a fresh temporary directory,
    /// with `extra` flags, and waits until it listens.
    pub async fn hybrid(extra: &[String]) -> Forwarder {
        let f = Self::spawn_hybrid(extra);
        f.wait_listening().await;
        f
    }

    /// Spawns without waiting.
    pub fn spawn_hybrid(extra: &[String]) -> Forwarder {
        Self::spawn_hybrid_exe(Path::new(BIN), extra)
    }

    /// [`Forwarder::hybrid`] running `exe` (another build of the binary).
    pub async fn hybrid_exe(exe: &Path, extra: &[String]) -> Forwarder {
        let f = Self::spawn_hybrid_exe(exe, extra);
        f.wait_listening().await;
        f
    }

    fn spawn_hybrid_exe(exe: &Path, extra: &[String]) -> Forwarder {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("kata.hvsock");
        let mut args: Vec<String> = vec![
            "--socket-path".into(),
            socket_path.display().to_string(),
            "--batch-timeout".into(),
            "50ms".into(),
        ];
        args.extend_from_slice(extra);
        Self::spawn_exe(exe, dir, socket_path, &args)
    }

    pub fn spawn_in(dir: tempfile::TempDir, socket_path: PathBuf, args: &[String]) -> Forwarder {
        Self::spawn_exe(Path::new(BIN), dir, socket_path, args)
    }

    /// [`Forwarder::spawn_in`], running `exe` (another build of the binary).
    pub fn spawn_exe(
        exe: &Path,
        dir: tempfile::TempDir,
        socket_path: PathBuf,
        args: &[String],
    ) -> Forwarder {
        let stderr = dir.path().join("forwarder.stderr");
        let stdout = dir.path().join("forwarder.stdout");
        // Its own hand-off socket, in its own directory, unless the test
        // names one: tests must not leave sockets under /run, nor find
        // each other's there.
        let mut args = args.to_vec();
        if !args.iter().any(|a| a == "--handoff-socket") {
            args.push("--handoff-socket".into());
            args.push(dir.path().join("handoff.sock").display().to_string());
        }
        let child = Command::new(exe)
            .args(&args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let agent_socket = PathBuf::from(format!("{}_10240", socket_path.display()));
        Forwarder {
            child,
            dir,
            socket_path,
            agent_socket,
            stderr,
            stdout,
        }
    }

    /// Polls until the forwarder logs that it is ready.
    pub async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.stderr().contains("forwarder ready") {
            assert!(
                Instant::now() < deadline,
                "forwarder did not become ready; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait(Duration::from_secs(20)).await
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "forwarder still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects as an agent would through a hybrid-VSOCK VMM.
pub async fn connect_agent(path: &Path) -> tokio::net::UnixStream {
    tokio::net::UnixStream::connect(path)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()))
}

fn kind(k: ExpectedKind) -> span::SpanKind {
    match k {
        ExpectedKind::Client => span::SpanKind::Client,
        ExpectedKind::Server => span::SpanKind::Server,
        ExpectedKind::Producer => span::SpanKind::Producer,
        ExpectedKind::Consumer => span::SpanKind::Consumer,
        ExpectedKind::Internal => span::SpanKind::Internal,
    }
}

fn status_code(s: ExpectedStatus) -> status::StatusCode {
    match s {
        ExpectedStatus::Unset => status::StatusCode::Unset,
        ExpectedStatus::Ok => status::StatusCode::Ok,
        ExpectedStatus::Error => status::StatusCode::Error,
    }
}

/// The OTLP form of an expected value.
pub fn any_value(v: &ExpectedValue) -> AnyValue {
    use any_value::Value as V;
    let wrap = |v| AnyValue { value: Some(v) };
    let arr = |values: Vec<AnyValue>| {
        wrap(V::ArrayValue(
            opentelemetry_proto::tonic::common::v1::ArrayValue { values },
        ))
    };
    match v {
        ExpectedValue::Bool(b) => wrap(V::BoolValue(*b)),
        ExpectedValue::I64(i) => wrap(V::IntValue(*i)),
        ExpectedValue::F64(f) => wrap(V::DoubleValue(*f)),
        ExpectedValue::String(s) => wrap(V::StringValue(s.clone())),
        ExpectedValue::BoolArray(xs) => arr(xs.iter().map(|&b| wrap(V::BoolValue(b))).collect()),
        ExpectedValue::I64Array(xs) => arr(xs.iter().map(|&i| wrap(V::IntValue(i))).collect()),
        ExpectedValue::F64Array(xs) => arr(xs.iter().map(|&f| wrap(V::DoubleValue(f))).collect()),
        ExpectedValue::StringArray(xs) => {
            arr(xs.iter().map(|s| wrap(V::StringValue(s.clone()))).collect())
        }
    }
}

fn kvs(expected: &[(String, ExpectedValue)]) -> Vec<KeyValue> {
    expected
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(any_value(v)),
            key_strindex: 0,
        })
        .collect()
}

fn sorted(mut v: Vec<KeyValue>) -> Vec<KeyValue> {
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v
}

/// Asserts that `got` is exactly `want` in every field the agent sent, and
/// that its resource is the agent's with `service.name` = `service_name`.
pub fn assert_span_eq(want: &ExpectedSpan, resource: &Resource, got: &Span, service_name: &str) {
    let ctx = format!("span '{}'", want.name);
    assert_eq!(
        got.trace_id,
        want.trace_id.to_be_bytes().to_vec(),
        "{ctx}: trace_id"
    );
    assert_eq!(
        got.span_id,
        want.span_id.to_be_bytes().to_vec(),
        "{ctx}: span_id"
    );
    let parent = if want.parent_span_id == 0 {
        Vec::new()
    } else {
        want.parent_span_id.to_be_bytes().to_vec()
    };
    assert_eq!(got.parent_span_id, parent, "{ctx}: parent_span_id");
    assert_eq!(got.name, want.name, "{ctx}: name");
    assert_eq!(got.kind, kind(want.kind) as i32, "{ctx}: kind");
    assert_eq!(
        got.start_time_unix_nano, want.start_unix_nanos,
        "{ctx}: start"
    );
    assert_eq!(got.end_time_unix_nano, want.end_unix_nanos, "{ctx}: end");
    assert_eq!(
        got.flags & 0xff,
        u32::from(want.trace_flags),
        "{ctx}: flags"
    );
    assert_eq!(got.trace_state, want.trace_state, "{ctx}: trace_state");
    assert_eq!(
        sorted(got.attributes.clone()),
        kvs(&want.attributes),
        "{ctx}: attributes"
    );
    assert_eq!(
        got.dropped_attributes_count, want.dropped_attributes_count,
        "{ctx}: dropped attributes"
    );
    assert_eq!(got.events.len(), want.events.len(), "{ctx}: event count");
    for (g, w) in got.events.iter().zip(&want.events) {
        assert_eq!(g.name, w.name, "{ctx}: event name");
        assert_eq!(g.time_unix_nano, w.time_unix_nanos, "{ctx}: event time");
        assert_eq!(g.attributes, kvs(&w.attributes), "{ctx}: event attributes");
        assert_eq!(
            g.dropped_attributes_count, w.dropped_attributes_count,
            "{ctx}: event dropped attributes"
        );
    }
    assert_eq!(
        got.dropped_events_count, want.dropped_events_count,
        "{ctx}: dropped events"
    );
    assert_eq!(got.links.len(), want.links.len(), "{ctx}: link count");
    for (g, w) in got.links.iter().zip(&want.links) {
        assert_eq!(
            g.trace_id,
            w.trace_id.to_be_bytes().to_vec(),
            "{ctx}: link trace_id"
        );
        assert_eq!(
            g.span_id,
            w.span_id.to_be_bytes().to_vec(),
            "{ctx}: link span_id"
        );
        assert_eq!(g.trace_state, w.trace_state, "{ctx}: link trace_state");
        assert_eq!(g.attributes, kvs(&w.attributes), "{ctx}: link attributes");
        assert_eq!(
            g.dropped_attributes_count, w.dropped_attributes_count,
            "{ctx}: link dropped attributes"
        );
    }
    assert_eq!(
        got.dropped_links_count, want.dropped_links_count,
        "{ctx}: dropped links"
    );
    let st = got.status.clone().unwrap_or_default();
    assert_eq!(
        st.code,
        status_code(want.status) as i32,
        "{ctx}: status code"
    );
    assert_eq!(st.message, want.status_message, "{ctx}: status message");

    let mut want_res: Vec<(String, ExpectedValue)> = want
        .resource
        .iter()
        .filter(|(k, _)| k != "service.name")
        .cloned()
        .collect();
    want_res.push((
        "service.name".into(),
        ExpectedValue::String(service_name.into()),
    ));
    want_res.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        sorted(resource.attributes.clone()),
        kvs(&want_res),
        "{ctx}: resource"
    );
}

/// Finds the received span with `span_id`.
pub fn find(got: &[(Resource, Span)], span_id: u64) -> &(Resource, Span) {
    let id = span_id.to_be_bytes().to_vec();
    let matches: Vec<_> = got.iter().filter(|(_, s)| s.span_id == id).collect();
    assert_eq!(
        matches.len(),
        1,
        "span {span_id:016x} received {} times",
        matches.len()
    );
    matches[0]
}

/// Runs the binary against `args` and returns (exit code, stderr) once it
/// exits, or `None` for the code if it is still running after 10 s (then
/// it is killed). It serves a hybrid socket in a directory of its own.
pub fn run_to_exit(args: &[String]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .args(["--socket-path", &sock.display().to_string()])
        .arg("--handoff-socket")
        .arg(dir.path().join("handoff.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (code, stderr)
}

/// One agent per wire format writes its whole scenario to the forwarder's
/// socket; returns what the collector must receive.
pub async fn send_both_formats(socket: &Path) -> Vec<ExpectedSpan> {
    use tokio::io::AsyncWriteExt;
    let mut want = Vec::new();
    for format in kata_agent_emitter::WireFormat::ALL {
        let sc = kata_agent_emitter::scenario(&kata_agent_emitter::ScenarioOptions {
            format,
            ..Default::default()
        });
        let mut agent = connect_agent(socket).await;
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        want.extend(sc.expected);
    }
    want
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes `/metrics` and returns `name`'s value (`name` with its labels,
/// as the page writes them).
pub async fn metric(port: u16, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

/// Polls `/metrics` until `name` is at least `at_least` (30 s at most).
pub async fn wait_metric(port: u16, name: &str, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(port, name).await;
        if v >= at_least {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stuck at {v}, want {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The counters the forwarder logged as its summary when it stopped.
pub fn exit_summary(log: &str) -> serde_json::Value {
    let line = log
        .lines()
        .find(|l| l.contains("forwarder stopped"))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["summary"].clone()
}

/// Connects as the VMM would relay the agent, retrying (bounded) until the
/// forwarder has made the socket.
pub async fn connect_when_listening(path: &Path) -> tokio::net::UnixStream {
    connect_within(path, Duration::from_secs(10)).await
}

/// [`connect_when_listening`], with its own bound.
pub async fn connect_within(path: &Path, within: Duration) -> tokio::net::UnixStream {
    let deadline = Instant::now() + within;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("{} not listening after {within:?}: {e}", path.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Polls `cond` until it holds, for 20 s at most; then fails with the
/// forwarder's log.
pub async fn wait_until(what: &str, fwd: &Forwarder, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; stderr:\n{}",
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks each span each sandbox's agent sent arrived exactly, with one
/// `kata.sandbox.id`, its sandbox directory's: the host's word wins. An
/// agent that claimed another id keeps its claim under
/// `kata.guest.claimed.sandbox.id`; the rest is the agent's resource.
pub fn assert_tagged(got: &[(Resource, Span)], sent: &[(String, Vec<ExpectedSpan>)]) {
    let total: usize = sent.iter().map(|(_, s)| s.len()).sum();
    assert_eq!(got.len(), total, "every span once");
    for (id, sc) in sent {
        for want in sc {
            let (resource, span) = find(got, want.span_id);
            assert_eq!(
                string_attr(&resource.attributes, SANDBOX_ID),
                Some(id.clone()),
                "span '{}'",
                want.name
            );
            let ids = resource.attributes.iter().filter(|kv| kv.key == SANDBOX_ID);
            assert_eq!(ids.count(), 1);
            let mut rest = resource.clone();
            rest.attributes.retain(|kv| kv.key != SANDBOX_ID);
            let mut want = want.clone();
            for (k, _) in &mut want.resource {
                if k == SANDBOX_ID {
                    *k = CLAIMED_SANDBOX_ID.into();
                }
            }
            assert_span_eq(&want, &rest, span, "kata-agent");
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// A temporary directory holding the fixture tree ([`KATA_FIXTURE`]) at
/// `<dir>/host`.
pub fn fixture_host() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    copy_tree(Path::new(KATA_FIXTURE), &root);
    (dir, root)
}

/// `--kata-host --print` on `root`: exit code, the plan, stderr.
pub fn print_plan(root: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(BIN)
        .args(["--kata-host", "--print", "--kata-root"])
        .arg(root)
        .args(extra)
        .env_remove("KATA_CONF_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let plan = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code(),
        plan,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The plan's templates, in its order.
pub fn templates(plan: &serde_json::Value) -> Vec<String> {
    plan["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["template"].as_str().map(str::to_owned))
        .collect()
}

/// `--kata-host` on the tree at `root`, running `exe`.
pub fn kata_host_forwarder(
    exe: &Path,
    dir: tempfile::TempDir,
    root: &Path,
    extra: &[String],
) -> Forwarder {
    let mut args = vec![
        "--kata-host".to_string(),
        "--kata-root".to_string(),
        root.display().to_string(),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend_from_slice(extra);
    Forwarder::spawn_exe(exe, dir, PathBuf::new(), &args)
}

/// Every file below `dir` whose name ends with `suffix`.
pub fn files_named(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if e.file_name().to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found
}

/// A string attribute's value, if `key` is there and a string.
pub fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// A JSON scenario of a real agent, which names no sandbox of its own:
/// the id on its spans is the forwarder's. `seq` tells agents apart.
pub fn real_agent(seq: u64) -> kata_agent_emitter::Scenario {
    kata_agent_emitter::scenario(&kata_agent_emitter::ScenarioOptions {
        seq,
        ..Default::default()
    })
}
