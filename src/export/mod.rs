//! Export: batching, retry, and the transports that reach the collector.
//!
//! Converted spans arrive on one bounded channel from every connection. The
//! batcher sends a batch when it holds `batch_max_spans` spans or when its
//! oldest span has waited `batch_timeout`, grouped by resource, encoded once.
//! One export is in flight at a time: while the collector is slow or away,
//! the batcher waits in its retry loop, the channel fills, and the
//! connection tasks stop reading their sockets, so backpressure reaches the
//! guest instead of memory growing here.

pub mod dump;
pub mod grpc;
pub mod http;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{OtlpConfig, OtlpProtocol};
use crate::otlp::{group_by_resource, SpanRecord};
use crate::stats::Stats;
use retry::{Classify, Retry, RetryPolicy};

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
    Dump(dump::DumpWriter),
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

    async fn send(&self, body: Bytes) -> Result<ExportTraceServiceResponse, ExportError> {
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

/// Receives spans until every sender is gone, exporting them in batches.
///
/// `deadline` is set at shutdown: retries stop at it, and what cannot be
/// sent by then is counted as dropped.
pub async fn run_batcher(
    mut rx: mpsc::Receiver<SpanRecord>,
    mut sink: Sink,
    cfg: BatchConfig,
    stats: Arc<Stats>,
    mut deadline: watch::Receiver<Option<Instant>>,
) {
    let mut buf: Vec<SpanRecord> = Vec::with_capacity(cfg.max_spans);
    loop {
        if rx.recv_many(&mut buf, cfg.max_spans).await == 0 {
            break;
        }
        let flush_at = Instant::now() + cfg.timeout;
        let mut closed = false;
        while buf.len() < cfg.max_spans {
            let want = cfg.max_spans - buf.len();
            tokio::select! {
                n = rx.recv_many(&mut buf, want) => if n == 0 { closed = true; break },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(cfg.max_spans));
        flush(&mut sink, batch, &cfg.retry, &stats, &mut deadline).await;
        if closed {
            break;
        }
    }
    if let Sink::Dump(w) = &mut sink {
        if let Err(e) = w.flush() {
            tracing::error!(error = %e, "flushing stdout failed");
        }
    }
}

async fn flush(
    sink: &mut Sink,
    batch: Vec<SpanRecord>,
    policy: &RetryPolicy,
    stats: &Stats,
    deadline: &mut watch::Receiver<Option<Instant>>,
) {
    let count = batch.len() as u64;
    if let Sink::Dump(w) = sink {
        let res = w.write_spans(batch);
        match res {
            Ok(()) => Stats::add(&stats.spans_exported, count),
            Err(e) => {
                Stats::add(&stats.spans_dropped_export, count);
                tracing::error!(error = %e, spans = count, "writing spans to stdout failed");
            }
        }
        return;
    }
    let request = ExportTraceServiceRequest {
        resource_spans: group_by_resource(batch),
    };
    let body = Bytes::from(request.encode_to_vec());
    drop(request);
    let outcome = policy
        .run(deadline, |attempt| {
            Stats::inc(&stats.export_attempts);
            if attempt > 1 {
                Stats::inc(&stats.export_retries);
            }
            let body = body.clone();
            let sink = &*sink;
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
            let rejected = resp
                .partial_success
                .as_ref()
                .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
            if let Some(p) = &resp.partial_success {
                if p.rejected_spans > 0 || !p.error_message.is_empty() {
                    tracing::warn!(
                        rejected_spans = p.rejected_spans,
                        message = %p.error_message,
                        "collector accepted the batch only in part"
                    );
                }
            }
            let rejected = rejected.min(count);
            Stats::add(&stats.spans_rejected, rejected);
            Stats::add(&stats.spans_exported, count - rejected);
            tracing::debug!(spans = count, attempts = outcome.attempts, "batch exported");
        }
        Err(e) => {
            Stats::inc(&stats.export_failures);
            let shutting_down = deadline.borrow().is_some();
            if shutting_down {
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
        }
    }
}
