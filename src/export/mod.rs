//! Export: batching, retry, and the transports that reach the collector.
//!
//! Batches are encoded once and sent one at a time (a slow collector fills
//! the queue). A request found too large is sent as its halves, down to one
//! span, so one sandbox's huge span costs no other anything. With a
//! [`spool`], a batch failing as the queue fills, or left at the shutdown
//! deadline, goes to disk (else it is counted as dropped).

pub(crate) mod body;
pub(crate) mod coalesce;
pub(crate) mod dump;
pub mod grpc;
pub mod http;
pub(crate) mod queue;
mod replay;
pub(crate) mod retry;
mod sink;
mod split;
pub mod spool;
pub mod tls;
pub(crate) mod tree;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{BatchConfig, DumpConfig, OtlpConfig, OtlpProtocol};
use crate::events::{BatchDone, Delivery};
use crate::otlp::record::decode_request;
use crate::otlp::{encode, encode_request, EncodedRequest, EncodedResource, SpanRecord};
use crate::shutdown::Shutdown;
use crate::stats::{DropReason, Stats};
use crate::tenant::Tenant;
use queue::{QueueReceiver, Queued};
use retry::{Backoff, Classify, Retry, RetryPolicy};
use spool::Spool;

pub(crate) use replay::run_replayer;
pub(crate) use sink::run_sink_ticker;
pub use sink::Sink;
use split::{halves_of, split_batch, split_half};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot reach the OTLP collector at {endpoint}: {reason} (start the collector before the forwarder, or use --dump-only)")]
    Connect { endpoint: String, reason: String },
    #[error("exporting to {endpoint} {source}")]
    Send { endpoint: String, source: SendError },
    #[error("writing spans to stdout: {0}")]
    WriteDump(#[source] std::io::Error),
    #[error("TLS with the OTLP collector at {endpoint} failed: {reason} (check --otlp-certificate, and --otlp-client-certificate/--otlp-client-key if the collector wants a client certificate)")]
    TlsHandshake { endpoint: String, reason: String },
    #[error("setting up TLS for {endpoint}: {source}")]
    LoadTls {
        endpoint: String,
        source: tls::TlsError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("over gRPC: {0}")]
    Grpc(#[source] grpc::GrpcError),
    #[error("over HTTP: {0}")]
    Http(#[source] http::HttpError),
}

impl ExportError {
    /// What a batch that failed for good with this error counts as.
    fn drop_reason(&self) -> DropReason {
        match self {
            ExportError::WriteDump(_) => DropReason::Export,
            e if e.retry() == Retry::TooLarge => DropReason::TooLarge,
            _ => DropReason::Rejected,
        }
    }
}

impl Classify for ExportError {
    fn retry(&self) -> Retry {
        match self {
            ExportError::Connect { .. } => Retry::Retryable,
            ExportError::Send { source, .. } => match source {
                SendError::Grpc(e) => e.retry(),
                SendError::Http(e) => e.retry(),
            },
            ExportError::WriteDump(_)
            | ExportError::LoadTls { .. }
            | ExportError::TlsHandshake { .. } => Retry::Never,
        }
    }
}

/// An error and its causes as one line, leaving out a cause whose text its
/// parent already shows.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    for inner in std::iter::successors(e.source(), |e| e.source()) {
        let text = inner.to_string();
        if !s.contains(&text) {
            s = format!("{s}: {text}");
        }
    }
    s
}

/// `s` cut to at most `max` bytes, at a character's boundary.
fn cut(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// How the collector has answered lately, for `status` (noted per request).
#[derive(Default)]
pub(crate) struct Health(std::sync::Mutex<HealthSnapshot>);

/// When a request last went through, and when the last one failed and why
/// (milliseconds since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthSnapshot {
    pub last_success_unix_ms: Option<u64>,
    pub last_failure: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub at_unix_ms: u64,
    pub error: String,
}

pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Health {
    fn note<T>(&self, res: &Result<T, ExportError>) {
        let at_unix_ms = unix_ms(std::time::SystemTime::now());
        let mut h = lock(&self.0);
        match res {
            Ok(_) => h.last_success_unix_ms = Some(at_unix_ms),
            Err(e) => {
                // Longest error text kept for `status`.
                let error = cut(error_chain(e), 512);
                h.last_failure = Some(Failure { at_unix_ms, error });
            }
        }
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        lock(&self.0).clone()
    }
}

/// What the batcher and the replayer share.
pub(crate) struct Exporter {
    pub(crate) sink: Sink,
    pub(crate) spool: Option<Arc<Spool>>,
    stats: Arc<Stats>,
    /// Wakes the replayer.
    spooled: Notify,
    pub(crate) health: Health,
}

/// A writer's lock; one poisoned by a panic mid-write still writes.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Exporter {
    pub(crate) fn new(sink: Sink, spool: Option<Arc<Spool>>, stats: Arc<Stats>) -> Exporter {
        Exporter {
            sink,
            spool,
            stats,
            spooled: Notify::new(),
            health: Health::default(),
        }
    }

    async fn send(&self, body: &EncodedRequest) -> Result<ExportTraceServiceResponse, ExportError> {
        let res = self.sink.send(body).await;
        self.health.note(&res);
        res
    }

    /// Sends a batch, retrying; with a spool, one failing while the queue
    /// fills (or past the shutdown deadline) goes to disk (a full spool: kept
    /// in memory until time is up). What became of it, attempts, last error.
    async fn deliver(
        &self,
        body: EncodedRequest,
        spans: u64,
        shutdown: &Shutdown,
        filling_up: impl Fn() -> bool,
    ) -> (Delivery, u32, Option<ExportError>) {
        let stats = &*self.stats;
        let spooling = self.spool.is_some();
        // Past the shutdown deadline, no export that may take a timeout.
        if spooling && shutdown.past_deadline() {
            let delivery = match self.spool_batch(body, spans).await {
                true => Delivery::Spooled,
                false => Delivery::Dropped(DropReason::Shutdown),
            };
            return (delivery, 0, None);
        }
        let mut may_give_up = spooling;
        let mut attempts = 0;
        loop {
            let give_up = || may_give_up && filling_up();
            let run = retry::EXPORT
                .run(shutdown, give_up, |attempt| {
                    stats.export_attempt(attempt);
                    let body = &body;
                    async move {
                        let res = self.send(body).await;
                        if let Err(error) = &res {
                            let retry = error.retry();
                            tracing::warn!(attempt, %error, ?retry, "export attempt failed");
                        }
                        res
                    }
                })
                .await;
            attempts += run.attempts;
            let error = match run.result {
                Ok(resp) => return (delivered(&resp), attempts, None),
                Err(e) => e,
            };
            // Trying the same request again cannot help.
            let delivery = if matches!(error.retry(), Retry::Never | Retry::TooLarge) {
                Delivery::Dropped(error.drop_reason())
            } else if spooling && self.spool_batch(body.clone(), spans).await {
                Delivery::Spooled
            } else if spooling && run.gave_up && !shutdown.past_deadline() {
                // The spool is full: keep retrying from memory.
                may_give_up = false;
                continue;
            } else if shutdown.deadline().is_some() {
                Delivery::Dropped(DropReason::Shutdown)
            } else {
                Delivery::Dropped(DropReason::Export)
            };
            return (delivery, attempts, Some(error));
        }
    }

    /// Writes a batch to the spool; whether it is now safe on disk.
    async fn spool_batch(&self, body: EncodedRequest, spans: u64) -> bool {
        let Some(spool) = self.spool.clone() else {
            return false;
        };
        let n = u32::try_from(spans).unwrap_or(u32::MAX);
        match tokio::task::spawn_blocking(move || spool.write(&body, n)).await {
            Ok(Ok(true)) => {
                self.spooled.notify_one();
                return true;
            }
            Ok(Ok(false)) => self.stats.spool_was_full(spans),
            Ok(Err(e)) => tracing::error!(error = %e, spans, "spooling failed"),
            Err(e) => tracing::error!(error = %e, "spool writer task failed"),
        }
        false
    }
}

/// The collector took a batch: how many of its spans it refused anyway.
fn delivered(resp: &ExportTraceServiceResponse) -> Delivery {
    let rejected = match &resp.partial_success {
        Some(p) if p.rejected_spans > 0 || !p.error_message.is_empty() => {
            tracing::warn!(
                rejected_spans = p.rejected_spans,
                message = %p.error_message,
                "collector accepted the batch only in part"
            );
            u64::try_from(p.rejected_spans).unwrap_or(0)
        }
        _ => 0,
    };
    Delivery::Delivered { rejected }
}

/// A batch's request so far: spans, and encoded bytes (each resource's
/// with its framing once).
#[derive(Default)]
struct Weight {
    spans: usize,
    bytes: usize,
    /// Counted already (a few: one per sandbox or connection).
    resources: Vec<Arc<EncodedResource>>,
}

impl Weight {
    /// The bytes `q`'s resource adds if it is new to the batch.
    fn resource_cost(&self, q: &Queued) -> usize {
        let r = &q.record.resource;
        if self.resources.iter().any(|have| Arc::ptr_eq(have, r)) {
            0
        } else {
            encode::RESOURCE_FRAMING + r.bytes().len()
        }
    }

    fn add(&mut self, q: &Queued) {
        let cost = self.resource_cost(q);
        if cost > 0 {
            self.resources.push(Arc::clone(&q.record.resource));
        }
        self.spans += q.record.count;
        self.bytes += cost + q.record.spans.len();
    }
}

pub(crate) async fn run_batcher(
    mut rx: QueueReceiver,
    exporter: Arc<Exporter>,
    cfg: BatchConfig,
    shutdown: Shutdown,
) {
    let mut buf: Vec<Queued> = Vec::with_capacity(cfg.max_spans);
    // What does not fit a batch (from the record crossing a bound on) waits for the next.
    let mut carry: Vec<Queued> = Vec::new();
    loop {
        buf.append(&mut carry);
        if buf.is_empty() && rx.recv_many(&mut buf, cfg.max_spans).await == 0 {
            break;
        }
        let mut weight = Weight::default();
        buf.iter().for_each(|q| weight.add(q));
        // From the oldest span's arrival (a paced read may bring it late).
        let oldest = |q: &[Queued]| q.iter().map(|q| q.since).min();
        let mut flush_at = oldest(&buf).unwrap_or_else(Instant::now) + cfg.timeout;
        let deadline = tokio::time::sleep_until(flush_at);
        tokio::pin!(deadline);
        let mut closed = false;
        while weight.spans < cfg.max_spans && weight.bytes < cfg.max_bytes {
            let want = cfg.max_spans - weight.spans;
            let before = buf.len();
            tokio::select! {
                n = rx.recv_many(&mut buf, want) => if n == 0 { closed = true; break },
                _ = &mut deadline => break,
            }
            let new = buf.get(before..).unwrap_or_default();
            new.iter().for_each(|q| weight.add(q));
            if let Some(at) = oldest(new).map(|t| t + cfg.timeout) {
                if at < flush_at {
                    flush_at = at;
                    deadline.as_mut().reset(at);
                }
            }
        }
        if weight.spans > cfg.max_spans || weight.bytes > cfg.max_bytes {
            carry = split_batch(&mut buf, &cfg);
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(cfg.max_spans));
        flush(&exporter, batch, &shutdown, &rx).await;
        if closed && carry.is_empty() {
            break;
        }
    }
}

/// Part of a batch on its way: its records, and each one's sandbox.
struct Piece {
    records: Vec<SpanRecord>,
    tenants: Vec<Arc<Tenant>>,
}

impl Piece {
    /// Splits off the second half, by spans: what is left holds the first.
    fn split_half(&mut self) -> Piece {
        let (records, shared) = split_half(&mut self.records);
        let whole = self.records.len() - usize::from(shared);
        let tenants = self.tenants.split_off(whole.min(self.tenants.len()));
        self.tenants
            .extend(tenants.first().filter(|_| shared).cloned());
        Piece { records, tenants }
    }
}

async fn flush(exporter: &Exporter, batch: Vec<Queued>, shutdown: &Shutdown, rx: &QueueReceiver) {
    // The queue's byte permits and the sandboxes' shares are held until
    // this returns: the data is in memory until then.
    let (records, held): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|q| (q.record, (q.permit, q.share)))
        .unzip();
    let tenants = held.iter().map(|(_, s)| Arc::clone(&s.tenant)).collect();
    // Halves of a request too large come back here, the first sent first.
    let mut pieces = vec![Piece { records, tenants }];
    while let Some(mut piece) = pieces.pop() {
        let spans: u64 = piece.records.iter().map(|r| r.count as u64).sum();
        let body = encode_request(&piece.records);
        let bytes = body.len();
        let (delivery, attempts, error) = exporter
            .deliver(body, spans, shutdown, || rx.is_filling_up())
            .await;
        let error = error.as_ref().map(|e| e as &dyn std::fmt::Display);
        match delivery {
            Delivery::Dropped(DropReason::TooLarge) if spans > 1 => {
                tracing::debug!(
                    spans,
                    bytes,
                    "request too large for the collector; sending its halves"
                );
                pieces.push(piece.split_half());
                pieces.push(piece);
                continue;
            }
            Delivery::Dropped(DropReason::TooLarge) => {
                if let Some(tenant) = piece.tenants.first() {
                    tenant.span_too_large(bytes, error.unwrap_or(&"too large"));
                }
            }
            _ => {
                for (tenant, r) in piece.tenants.iter().zip(&piece.records) {
                    let n = r.count as u64;
                    match delivery {
                        Delivery::Dropped(reason) => tenant.dropped.add(reason, n),
                        Delivery::Delivered { .. } => tenant.exported.add(n),
                        Delivery::Spooled => tenant.spooled.add(n),
                    }
                }
            }
        }
        BatchDone {
            spans,
            delivery,
            attempts,
            error,
            from_spool: false,
        }
        .emit(&exporter.stats);
    }
    drop(held);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantLimits;
    use crate::otlp::encode::SCOPE_SPANS_SPAN_KEY;
    use crate::tenant::{TenantKey, Tenants};
    use bytes::Bytes;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use sink::Transport;

    /// `count` encoded spans of `payload` bytes each (under 128: one length
    /// byte), as the queue holds them.
    fn spans(count: usize, payload: usize) -> Bytes {
        let one = [
            &[SCOPE_SPANS_SPAN_KEY, payload as u8][..],
            &vec![7; payload],
        ]
        .concat();
        Bytes::from(one.repeat(count))
    }

    /// Records as the batcher receives them: `(sandbox, spans, bytes)`.
    async fn queued(tenants: &Tenants, records: &[(&str, Bytes, usize)]) -> Vec<Queued> {
        let (tx, mut rx) = queue::bounded(1 << 20, 1 << 30, Arc::new(Stats::default()));
        let resource = Arc::new(EncodedResource::new(Resource::default()));
        for (id, bytes, count) in records {
            let tenant = tenants.get(TenantKey::Sandbox((*id).into())).unwrap();
            let record = SpanRecord {
                resource: Arc::clone(&resource),
                spans: bytes.clone(),
                count: *count,
            };
            tx.send(record, bytes.len(), &tenant, Instant::now())
                .await
                .unwrap();
        }
        let mut out = Vec::new();
        while out.len() < records.len() {
            rx.recv_many(&mut out, 1 << 20).await;
        }
        out
    }

    fn cfg(max_bytes: usize) -> BatchConfig {
        BatchConfig {
            max_spans: 512,
            max_bytes,
            timeout: Duration::from_millis(200),
        }
    }

    fn records_of(b: &[Queued]) -> Vec<SpanRecord> {
        b.iter().map(|q| q.record.clone()).collect()
    }

    /// A batch closes where the next span would take its request past the
    /// byte bound, inside a record if need be; a span larger than a whole
    /// request goes alone.
    #[tokio::test]
    async fn batches_close_before_the_byte_bound() {
        let tenants = Tenants::new(TenantLimits::default());
        // Spans of 102 bytes on the wire; the resource's framing is 33 more.
        let mut buf = queued(
            &tenants,
            &[
                ("a", spans(3, 100), 3),
                ("a", spans(5, 100), 5),
                ("a", spans(4, 100), 4),
            ],
        )
        .await;
        let carry = split_batch(&mut buf, &cfg(1000));
        let taken: Vec<usize> = buf.iter().map(|q| q.record.count).collect();
        assert_eq!(taken, [3, 5, 1]);
        assert_eq!(carry.iter().map(|q| q.record.count).sum::<usize>(), 3);
        let request = encode_request(&records_of(&buf));
        assert!(request.len() <= 1000, "{}", request.len());
        assert!(request.len() + 102 > 1000, "{}", request.len());

        let mut buf = queued(&tenants, &[("a", spans(2, 100), 2)]).await;
        let carry = split_batch(&mut buf, &cfg(50));
        assert_eq!((buf.len(), buf[0].record.count), (1, 1));
        assert_eq!(carry.iter().map(|q| q.record.count).sum::<usize>(), 1);
    }

    /// A piece splits in halves by spans, each span kept with its sandbox.
    #[tokio::test]
    async fn a_piece_splits_in_halves_keeping_each_span_s_sandbox() {
        let tenants = Tenants::new(TenantLimits::default());
        let batch = queued(
            &tenants,
            &[
                ("a", spans(3, 10), 3),
                ("b", spans(4, 20), 4),
                ("c", spans(1, 30), 1),
            ],
        )
        .await;
        let mut first = Piece {
            records: records_of(&batch),
            tenants: batch.iter().map(|q| Arc::clone(&q.share.tenant)).collect(),
        };
        let second = first.split_half();
        let shape = |p: &Piece| {
            p.records
                .iter()
                .zip(&p.tenants)
                .map(|(r, t)| (t.label().to_owned(), r.count, r.spans.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shape(&first),
            [("a".into(), 3, 36), ("b".into(), 1, 22)],
            "{:?}",
            shape(&first)
        );
        assert_eq!(shape(&second), [("b".into(), 3, 66), ("c".into(), 1, 32)]);
    }

    /// The replayer waits as the export policy says: a collector that
    /// throttles with `Retry-After` is left alone that long (at 250 ms and
    /// 500 ms of its own backoff, the replayer would ask again thrice in
    /// a second), and the batch is sent, once, when it answers.
    #[tokio::test]
    async fn the_replayer_obeys_a_throttling_collector() {
        use super::http::tests::{receiver, response, transport};
        let endpoint = receiver(|n| match n {
            0 | 1 => response(429, &[("retry-after", "1")], Vec::new()),
            _ => response(200, &[], Vec::new()),
        })
        .await;
        let stats = Arc::new(Stats::default());
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20, Arc::clone(&stats)).unwrap());
        assert!(spool.write(&EncodedRequest::from(Bytes::new()), 3).unwrap());
        let sink = Sink(Transport::Http(Box::new(transport(endpoint).await)));
        let exporter = Arc::new(Exporter::new(sink, Some(spool), Arc::clone(&stats)));
        let shutdown = Shutdown::new();
        let started = Instant::now();
        let task = tokio::spawn(run_replayer(exporter, shutdown.clone()));
        while stats.spool_files.get() > 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "not delivered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "asked again after {took:?}");
        assert_eq!(stats.spans_exported.get(), 3);
        assert_eq!(stats.export_attempts.get(), 3, "one request an answer");
        shutdown.begin(crate::shutdown::Mode::Drain, Instant::now());
        task.await.unwrap();
    }
}
