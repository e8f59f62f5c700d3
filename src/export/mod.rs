//! Export: batching, retry, and the transports that reach the collector.
//!
//! Converted spans arrive on one bounded channel from every connection. The
//! batcher sends a batch when it holds `batch_max_spans` spans or when its
//! oldest span has waited `batch_timeout`, grouped by resource, encoded once.
//! One export is in flight at a time: while the collector is slow or away,
//! the batcher waits in its retry loop, the channel fills, and the
//! connection tasks stop reading their sockets, so backpressure reaches the
//! guest instead of memory growing here.
//!
//! With a spool ([`spool`]), a batch that keeps failing while the queue is
//! filling up goes to disk instead, so agents keep flowing; a replayer sends
//! spooled batches once the collector answers again. At shutdown, what
//! cannot be sent by the deadline is spooled too, or else counted as
//! dropped.

pub mod body;
pub mod coalesce;
pub mod dump;
pub mod grpc;
pub mod http;
pub mod queue;
pub mod retry;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{OtlpConfig, OtlpProtocol};
use crate::otlp::{encode_request, EncodedRequest};
use crate::stats::Stats;
use queue::{QueueReceiver, Queued};
use retry::{Classify, Retry, RetryPolicy};
use spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot reach the OTLP collector at {endpoint}: {reason} (start the collector before the forwarder, or use --dump-only)")]
    Connect { endpoint: String, reason: String },
    #[error("exporting to {endpoint} over gRPC: {source}")]
    SendGrpc {
        endpoint: String,
        #[source]
        source: grpc::GrpcError,
    },
    #[error("exporting to {endpoint} over HTTP: {source}")]
    SendHttp {
        endpoint: String,
        #[source]
        source: http::HttpError,
    },
    #[error("writing spans to stdout: {0}")]
    WriteDump(#[source] std::io::Error),
}

impl Classify for ExportError {
    fn retry(&self) -> Retry {
        match self {
            ExportError::Connect { .. } => Retry::Retryable,
            ExportError::SendGrpc { source, .. } => source.retry(),
            ExportError::SendHttp { source, .. } => source.retry(),
            ExportError::WriteDump(_) => Retry::Never,
        }
    }
}

/// The host (IPv6 without its brackets) and port to dial for an endpoint.
pub(crate) fn host_port(uri: &::http::Uri) -> (String, u16) {
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.to_owned(), uri.port_u16().unwrap_or(80))
}

pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Where batches go.
pub enum Sink {
    Grpc(grpc::GrpcTransport),
    Http(Box<http::HttpTransport>),
    Dump(std::sync::Mutex<dump::DumpWriter>),
}

impl Sink {
    /// Opens the configured transport, failing if the collector cannot be
    /// reached within `connect_timeout`.
    pub async fn connect(cfg: &OtlpConfig, connect_timeout: Duration) -> Result<Self, ExportError> {
        Ok(match cfg.protocol {
            OtlpProtocol::Grpc => {
                Sink::Grpc(grpc::GrpcTransport::connect(cfg, connect_timeout).await?)
            }
            OtlpProtocol::HttpProtobuf => Sink::Http(Box::new(
                http::HttpTransport::connect(cfg, connect_timeout).await?,
            )),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Grpc(t) => format!("otlp grpc {}", t.endpoint()),
            Sink::Http(t) => format!("otlp http/protobuf {}", t.endpoint()),
            Sink::Dump(_) => "stdout (OTLP JSON lines)".to_owned(),
        }
    }

    async fn send(&self, body: &EncodedRequest) -> Result<ExportTraceServiceResponse, ExportError> {
        match self {
            Sink::Grpc(t) => t
                .export(body)
                .await
                .map_err(|source| ExportError::SendGrpc {
                    endpoint: t.endpoint().to_owned(),
                    source,
                }),
            Sink::Http(t) => t
                .export(body)
                .await
                .map_err(|source| ExportError::SendHttp {
                    endpoint: t.endpoint(),
                    source,
                }),
            Sink::Dump(_) => Ok(ExportTraceServiceResponse::default()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_spans: usize,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// What the batcher and the replayer share.
pub struct Exporter {
    pub sink: Sink,
    pub spool: Option<Arc<Spool>>,
    pub stats: Arc<Stats>,
    /// Wakes the replayer when a batch has been spooled.
    pub spooled: Notify,
}

/// Receives spans until every sender is gone, exporting them in batches.
///
/// `deadline` is set at shutdown: retries stop at it, and what cannot be
/// sent by then is spooled, or counted as dropped.
pub async fn run_batcher(
    mut rx: QueueReceiver,
    exporter: Arc<Exporter>,
    cfg: BatchConfig,
    mut deadline: watch::Receiver<Option<Instant>>,
) {
    let mut buf: Vec<Queued> = Vec::with_capacity(cfg.max_spans);
    // A record holds the spans of one socket read; what does not fit a batch
    // (the tail of the record that crosses `max_spans`, and the records
    // after it) waits here for the next one.
    let mut carry: Vec<Queued> = Vec::new();
    let spans_in = |q: &[Queued]| q.iter().map(|q| q.record.count).sum::<usize>();
    loop {
        buf.append(&mut carry);
        if buf.is_empty() && rx.recv_many(&mut buf, cfg.max_spans).await == 0 {
            break;
        }
        let mut spans = spans_in(&buf);
        let flush_at = Instant::now() + cfg.timeout;
        let mut closed = false;
        while spans < cfg.max_spans {
            let want = cfg.max_spans - spans;
            let before = buf.len();
            tokio::select! {
                n = rx.recv_many(&mut buf, want) => if n == 0 { closed = true; break },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
            spans += spans_in(buf.get(before..).unwrap_or_default());
        }
        if spans > cfg.max_spans {
            let mut fit = 0;
            let cut = buf
                .iter()
                .position(|q| {
                    let over = fit + q.record.count > cfg.max_spans;
                    if !over {
                        fit += q.record.count;
                    }
                    over
                })
                .unwrap_or(buf.len());
            carry = buf.split_off(cut);
            let room = cfg.max_spans - fit;
            if room > 0 {
                if let Some(head) = carry.first_mut().and_then(|q| q.split_to(room)) {
                    buf.push(head);
                }
            }
            if buf.is_empty() {
                // Splitting failed (it cannot): an oversized batch rather
                // than none.
                buf.push(carry.remove(0));
            }
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(cfg.max_spans));
        flush(&exporter, batch, &cfg.retry, &mut deadline, &rx).await;
        if closed && carry.is_empty() {
            break;
        }
    }
    if let Sink::Dump(w) = &exporter.sink {
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.flush() {
            tracing::error!(error = %e, "flushing stdout failed");
        }
    }
}

fn past(deadline: &watch::Receiver<Option<Instant>>) -> bool {
    deadline.borrow().is_some_and(|d| Instant::now() >= d)
}

async fn flush(
    exporter: &Exporter,
    batch: Vec<Queued>,
    policy: &RetryPolicy,
    deadline: &mut watch::Receiver<Option<Instant>>,
    rx: &QueueReceiver,
) {
    let stats = &*exporter.stats;
    let count = batch.iter().map(|q| q.record.count as u64).sum::<u64>();
    // The queue's byte permits are held until this function returns: the
    // data is in memory until then, encoded or not.
    let (records, _permits): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.record, q.permit)).unzip();
    if let Sink::Dump(w) = &exporter.sink {
        let res = w
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_spans(records);
        match res {
            Ok(()) => Stats::add(&stats.spans_exported, count),
            Err(e) => {
                Stats::add(&stats.spans_dropped_export, count);
                tracing::error!(error = %e, spans = count, "writing spans to stdout failed");
            }
        }
        return;
    }
    // The spans are encoded already; this frames them into one request.
    let body = encode_request(&records);
    drop(records);

    let spool = exporter.spool.as_deref();
    // Past the shutdown deadline, do not start another export that could
    // take a full timeout: go straight to disk.
    if spool.is_some() && past(deadline) {
        spool_or_drop(exporter, body, count, true).await;
        return;
    }
    let mut may_give_up = spool.is_some();
    loop {
        let give_up = || may_give_up && rx.is_filling_up();
        let outcome = policy
            .run(deadline, give_up, |attempt| {
                Stats::inc(&stats.export_attempts);
                if attempt > 1 {
                    Stats::inc(&stats.export_retries);
                }
                let body = &body;
                let sink = &exporter.sink;
                async move {
                    let res = sink.send(body).await;
                    if let Err(e) = &res {
                        tracing::warn!(attempt, error = %e, retry = ?e.retry(), "export attempt failed");
                    }
                    res
                }
            })
            .await;
        match outcome.result {
            Ok(resp) => {
                account_success(stats, &resp, count);
                tracing::debug!(spans = count, attempts = outcome.attempts, "batch exported");
                return;
            }
            Err(e) if e.retry() == Retry::Never => {
                Stats::inc(&stats.export_failures);
                Stats::add(&stats.spans_dropped_rejected, count);
                tracing::error!(error = %e, spans = count, "collector rejected the batch for good; spans dropped");
                return;
            }
            Err(e) => {
                if spool.is_some() {
                    tracing::warn!(error = %e, spans = count, attempts = outcome.attempts, "collector unavailable; spooling batch");
                    if spool_or_drop(exporter, body.clone(), count, false).await {
                        return;
                    }
                    if outcome.gave_up && !past(deadline) {
                        // The spool is full: keep the batch in memory and
                        // the backpressure on, retrying until time is up.
                        may_give_up = false;
                        continue;
                    }
                }
                Stats::inc(&stats.export_failures);
                if deadline.borrow().is_some() {
                    Stats::add(&stats.spans_dropped_shutdown, count);
                } else {
                    Stats::add(&stats.spans_dropped_export, count);
                }
                tracing::error!(
                    error = %e,
                    spans = count,
                    attempts = outcome.attempts,
                    "giving up on batch; spans dropped"
                );
                return;
            }
        }
    }
}

fn account_success(stats: &Stats, resp: &ExportTraceServiceResponse, count: u64) {
    let rejected = resp
        .partial_success
        .as_ref()
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
        .min(count);
    if let Some(p) = &resp.partial_success {
        if p.rejected_spans > 0 || !p.error_message.is_empty() {
            tracing::warn!(
                rejected_spans = p.rejected_spans,
                message = %p.error_message,
                "collector accepted the batch only in part"
            );
        }
    }
    Stats::add(&stats.spans_rejected, rejected);
    Stats::add(&stats.spans_exported, count - rejected);
}

/// Writes a batch to the spool. Returns whether it is now safe on disk; if
/// not and `final_` is set, the spans are counted as dropped.
async fn spool_or_drop(
    exporter: &Exporter,
    body: EncodedRequest,
    count: u64,
    final_: bool,
) -> bool {
    let stats = &*exporter.stats;
    let Some(spool) = exporter.spool.clone() else {
        return false;
    };
    let spans = u32::try_from(count).unwrap_or(u32::MAX);
    let res = tokio::task::spawn_blocking(move || spool.write(&body, spans)).await;
    let stored = match res {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) => {
            Stats::inc(&stats.spool_full);
            tracing::warn!(spans = count, "spool is full (--spool-max-bytes)");
            false
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, spans = count, "spooling failed");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "spool writer task failed");
            false
        }
    };
    if let Some(spool) = &exporter.spool {
        stats.set_spool(spool.bytes(), spool.len());
    }
    if stored {
        Stats::add(&stats.spans_spooled, count);
        exporter.spooled.notify_one();
    } else if final_ {
        Stats::add(&stats.spans_dropped_shutdown, count);
        tracing::error!(spans = count, "could not spool at shutdown; spans dropped");
    }
    stored
}

/// Sends spooled batches, oldest first, whenever the collector answers,
/// until shutdown starts (what is left stays for the next run).
pub async fn run_replayer(exporter: Arc<Exporter>, mut deadline: watch::Receiver<Option<Instant>>) {
    let Some(spool) = exporter.spool.clone() else {
        return;
    };
    let stats = &*exporter.stats;
    let mut backoff = Duration::from_millis(250);
    stats.set_spool(spool.bytes(), spool.len());
    loop {
        if deadline.borrow().is_some() {
            return;
        }
        let Some(seq) = spool.oldest() else {
            tokio::select! {
                _ = exporter.spooled.notified() => continue,
                _ = deadline.changed() => return,
            }
        };
        let reader = Arc::clone(&spool);
        let batch = match tokio::task::spawn_blocking(move || reader.read(seq)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                if matches!(e, SpoolError::Damaged { .. }) {
                    Stats::inc(&stats.spool_damaged);
                }
                tracing::error!(error = %e, "skipping spool file");
                stats.set_spool(spool.bytes(), spool.len());
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "spool reader task failed");
                return;
            }
        };
        Stats::inc(&stats.export_attempts);
        match exporter.sink.send(&batch.body).await {
            Ok(resp) => {
                account_success(stats, &resp, u64::from(batch.spans));
                Stats::add(&stats.spans_unspooled, u64::from(batch.spans));
                spool.remove(seq);
                stats.set_spool(spool.bytes(), spool.len());
                tracing::info!(
                    spans = batch.spans,
                    left = spool.len(),
                    "sent spooled batch"
                );
                backoff = Duration::from_millis(250);
            }
            Err(e) if e.retry() == Retry::Never => {
                Stats::inc(&stats.export_failures);
                Stats::add(&stats.spans_dropped_rejected, u64::from(batch.spans));
                tracing::error!(error = %e, spans = batch.spans, "collector rejected a spooled batch for good; removing it");
                spool.remove(seq);
                stats.set_spool(spool.bytes(), spool.len());
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in = ?backoff, "collector still unavailable for spooled batches");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = deadline.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
