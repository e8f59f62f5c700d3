//! A fast OTLP/gRPC collector that only counts.
//!
//! It takes `TraceService/Export` requests as raw bytes and walks just the
//! protobuf it needs (request -> resource spans -> scope spans -> span), so
//! it costs little next to the forwarder it measures. When a run tracks
//! latency it also reads each span's id and stamps its receipt against the
//! instant the agent wrote that span.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Receipt minus write, in nanoseconds, one per span received.
    pub latencies: Mutex<Vec<u64>>,
    /// Spans received that were not (yet) marked written: should be none.
    pub unmatched: AtomicU64,
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
            latencies: Mutex::new(Vec::with_capacity(span_ids.len())),
            unmatched: AtomicU64::new(0),
        }
    }
}

/// What the sink has counted, shared with the harness.
pub struct SinkState {
    pub epoch: Instant,
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
                        let written = t
                            .index
                            .get(&id)
                            .map_or(0, |&i| t.written[i].load(Ordering::Acquire));
                        if written == 0 {
                            t.unmatched.fetch_add(1, Ordering::Relaxed);
                        } else {
                            lat.push(now.saturating_sub(written));
                        }
                    }
                    if let Ok(mut l) = t.latencies.lock() {
                        l.extend(lat);
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

/// Starts the sink on a free loopback port; returns its state and endpoint.
pub async fn start(epoch: Instant) -> Result<(Arc<SinkState>, String)> {
    let state = Arc::new(SinkState {
        epoch,
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
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
        if let Err(e) = res {
            eprintln!("sink stopped: {e}");
        }
    });
    Ok((state, format!("http://{addr}")))
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
