//! A fast OTLP/gRPC collector that only counts.
//!
//! It takes `TraceService/Export` requests as raw bytes and walks just the
//! protobuf it needs (request -> resource spans -> scope spans -> span), so
//! it costs little next to the forwarder it measures. It accepts gzipped
//! requests, can serve over TLS (a certificate made at start, whose CA the
//! forwarder is told to trust), and counts the bytes that reach it on the
//! wire, before TLS and decompression. When a run tracks
//! latency it also reads each span's id, stamps its receipt against the
//! instant the agent wrote that span, counts how many times each span came
//! (lost, or sent twice), and keeps each request's arrival.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::{Context as _, Result};
use bytes::{Buf, Bytes};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Request, Response, Status};

const SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Span ids a latency run sent, and when each was written.
pub struct LatencyTrack {
    /// Span id -> index into `written`.
    pub index: HashMap<u64, usize>,
    /// Nanoseconds since the sink's epoch at which the agent wrote the span;
    /// 0 until written.
    pub written: Vec<AtomicU64>,
    /// How many times each span was received: a span lost stays at 0, one
    /// sent twice reaches 2.
    pub received: Vec<AtomicU32>,
    /// Receipt minus write, in nanoseconds, one per span received.
    pub latencies: Mutex<Vec<u64>>,
    /// Spans received that were not (yet) marked written: should be none.
    pub unmatched: AtomicU64,
    /// Nanoseconds since the sink's epoch of every request received, in
    /// order: the gaps between them are what a collector sees of a pause.
    pub arrivals: Mutex<Vec<u64>>,
}

impl LatencyTrack {
    pub fn new(span_ids: &[u64]) -> Self {
        Self {
            index: span_ids
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i))
                .collect(),
            written: span_ids.iter().map(|_| AtomicU64::new(0)).collect(),
            received: span_ids.iter().map(|_| AtomicU32::new(0)).collect(),
            latencies: Mutex::new(Vec::with_capacity(span_ids.len())),
            unmatched: AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
        }
    }
}

/// What the sink has counted, shared with the harness.
pub struct SinkState {
    pub epoch: Instant,
    /// Bytes read off the forwarder's connections, as they came on the wire.
    pub wire_bytes: Arc<AtomicU64>,
    pub spans: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Nanoseconds since `epoch` of the latest request received.
    pub last_receipt_ns: AtomicU64,
    pub track: Mutex<Option<Arc<LatencyTrack>>>,
}

impl SinkState {
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Acquire)
    }

    fn receive(&self, body: &[u8]) {
        let now = self.now_ns();
        let track = self.track.lock().ok().and_then(|t| t.clone());
        let mut ids = Vec::new();
        let want_ids = track.is_some();
        match count_spans(body, want_ids.then_some(&mut ids)) {
            Some(n) => {
                if let Some(t) = track {
                    let mut lat = Vec::with_capacity(ids.len());
                    for id in ids {
                        let written = t.index.get(&id).map_or(0, |&i| {
                            t.received[i].fetch_add(1, Ordering::Relaxed);
                            t.written[i].load(Ordering::Acquire)
                        });
                        if written == 0 {
                            t.unmatched.fetch_add(1, Ordering::Relaxed);
                        } else {
                            lat.push(now.saturating_sub(written));
                        }
                    }
                    if let Ok(mut l) = t.latencies.lock() {
                        l.extend(lat);
                    }
                    if let Ok(mut a) = t.arrivals.lock() {
                        a.push(now);
                    }
                }
                self.last_receipt_ns.store(now, Ordering::Release);
                self.spans.fetch_add(n, Ordering::AcqRel);
            }
            None => {
                self.bad_requests.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection, counting the bytes read from it.
struct Counted<T> {
    inner: T,
    bytes: Arc<AtomicU64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the gRPC server is handed: a connection, plain or TLS.
struct Conn(Box<dyn Io>);

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// A TLS server configuration for `localhost`, and its CA as PEM.
fn tls_server() -> Result<(tokio_rustls::TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert =
        CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca, &ca_key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes())?],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem()))
}

/// Starts the sink on a free loopback port; returns its state, its
/// endpoint, and the flags the forwarder needs for it (with `tls_dir`, the
/// sink speaks TLS and its CA is written there for `--otlp-certificate`).
pub async fn start(
    epoch: Instant,
    tls_dir: Option<&std::path::Path>,
) -> Result<(Arc<SinkState>, String, Vec<String>)> {
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let state = Arc::new(SinkState {
        epoch,
        wire_bytes: Arc::clone(&wire_bytes),
        spans: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        bad_requests: AtomicU64::new(0),
        last_receipt_ns: AtomicU64::new(0),
        track: Mutex::new(None),
    });
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the sink")?;
    let addr = listener.local_addr()?;
    let (tls, endpoint, flags) = match tls_dir {
        Some(dir) => {
            let (acceptor, ca) = tls_server()?;
            let ca_file = dir.join("sink-ca.pem");
            std::fs::write(&ca_file, ca)?;
            (
                Some(acceptor),
                format!("https://localhost:{}", addr.port()),
                vec![format!("--otlp-certificate={}", ca_file.display())],
            )
        }
        None => (None, format!("http://{addr}"), Vec::new()),
    };
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let counted = Counted {
                inner: tcp,
                bytes: Arc::clone(&wire_bytes),
            };
            let tx = conn_tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let conn = match tls {
                    Some(acceptor) => match acceptor.accept(counted).await {
                        Ok(s) => Conn(Box::new(s)),
                        Err(e) => {
                            eprintln!("sink: TLS handshake failed: {e}");
                            return;
                        }
                    },
                    None => Conn(Box::new(counted)),
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    let svc = SinkService(Arc::clone(&state));
    tokio::spawn(async move {
        // Large HTTP/2 windows, as collectors have in effect (Go gRPC grows
        // its windows by BDP estimation): with the 64 KiB default, every
        // 512-span request waits for several window updates from a sink
        // that shares two cores with eight busy agents, and the harness
        // would measure its own scheduling instead of the forwarder.
        let res = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conn_rx))
            .await;
        if let Err(e) = res {
            eprintln!("sink stopped: {e}");
        }
    });
    Ok((state, endpoint, flags))
}

/// Walks an `ExportTraceServiceRequest`, counting spans and optionally
/// collecting their span ids. `None` if the bytes are not such a request.
pub fn count_spans(req: &[u8], mut ids: Option<&mut Vec<u64>>) -> Option<u64> {
    let mut n = 0;
    for_each_len_field(req, 1, |resource_spans| {
        for_each_len_field(resource_spans, 2, |scope_spans| {
            for_each_len_field(scope_spans, 2, |span| {
                n += 1;
                if let Some(ids) = ids.as_deref_mut() {
                    let mut id = None;
                    for_each_len_field(span, 2, |b| {
                        id = b.try_into().ok().map(u64::from_be_bytes);
                        Some(())
                    })?;
                    ids.push(id.unwrap_or(0));
                }
                Some(())
            })
        })
    })?;
    Some(n)
}

/// Calls `f` with the payload of every length-delimited field `field` in
/// `msg`, skipping the others.
fn for_each_len_field(
    mut msg: &[u8],
    field: u64,
    mut f: impl FnMut(&[u8]) -> Option<()>,
) -> Option<()> {
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                let body = msg.get(..len)?;
                msg = &msg[len..];
                if key >> 3 == field {
                    f(body)?;
                }
            }
            5 => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(())
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

#[derive(Clone)]
struct SinkService(Arc<SinkState>);

impl tonic::server::NamedService for SinkService {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for SinkService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = Arc::clone(&self.0);
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                response.headers_mut().insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                Ok(response)
            });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .apply_max_message_size_config(Some(64 << 20), None);
            Ok(grpc.unary(Export(state), req).await)
        })
    }
}

struct Export(Arc<SinkState>);

impl tonic::server::UnaryService<Bytes> for Export {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        self.0.receive(request.get_ref());
        // An empty ExportTraceServiceResponse encodes to no bytes.
        std::future::ready(Ok(Response::new(Bytes::new())))
    }
}

/// Request bodies as bytes, responses written through.
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
