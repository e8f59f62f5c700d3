//! `--metrics-address`: the counters in the Prometheus text format.
//!
//! A deliberately small HTTP/1.1 endpoint (hyper) that renders a snapshot
//! of [`Stats`] at `GET /metrics`. Counters get the `_total` suffix; the
//! dropped-span and decode-error families carry their reason or kind as a
//! label, so `sum()` over the label gives the whole.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;
use crate::stats::{Field, Kind, Snapshot, Stats, Value};

const PREFIX: &str = "kata_trace_forwarder";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The running endpoint.
pub struct MetricsServer {
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}/metrics", self.addr)
    }
}

/// Binds `addr` and serves `/metrics` until shutdown begins.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.stopping() => return,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let stats = Arc::clone(&stats);
                    async move { Ok::<_, Infallible>(respond(&req, &stats)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(MetricsServer { addr })
}

fn respond(req: &Request<hyper::body::Incoming>, stats: &Stats) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&stats.snapshot()),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".to_owned(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// Renders a snapshot in the Prometheus text exposition format. Each
/// metric's kind comes from its declaration; a family is one metric with
/// its label, so `sum()` over the label gives the whole.
pub(crate) fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    for Field {
        name,
        help,
        kind,
        value,
    } in snap.fields()
    {
        let (metric, kind) = match kind {
            Kind::Counter => (format!("{PREFIX}_{name}_total"), "counter"),
            Kind::Gauge => (format!("{PREFIX}_{name}"), "gauge"),
        };
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        match value {
            Value::Scalar(v) => {
                let _ = writeln!(out, "{metric} {v}");
            }
            Value::Family(label, values) => {
                for (l, v) in values {
                    let _ = writeln!(out, "{metric}{{{label}=\"{l}\"}} {v}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_labelled_families() {
        let stats = Stats::default();
        stats.spans_received.add(7);
        let _open = stats.connections_open.hold();
        stats
            .decode_errors
            .inc(crate::wire::DecodeErrorKind::Bincode);
        stats
            .spans_dropped
            .add(crate::stats::DropReason::Shutdown, 2);
        let text = render(&stats.snapshot());
        assert!(
            text.contains("kata_trace_forwarder_spans_received_total 7\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE kata_trace_forwarder_connections_open gauge\n"));
        assert!(text.contains("kata_trace_forwarder_connections_open 1\n"));
        assert!(text.contains("kata_trace_forwarder_decode_errors_total{kind=\"bincode\"} 1\n"));
        assert!(text.contains("kata_trace_forwarder_spans_dropped_total{reason=\"shutdown\"} 2\n"));
        assert_eq!(
            text.matches("# TYPE kata_trace_forwarder_spans_dropped_total")
                .count(),
            1
        );
        // Every sample line is `name[{labels}] value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with(PREFIX), "{line}");
            value.parse::<u64>().unwrap();
        }
    }
}
