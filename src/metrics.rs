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
use tokio::task::JoinHandle;

use crate::stats::{Snapshot, Stats, GAUGES};

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
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}/metrics", self.addr)
    }
}

impl MetricsServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `/metrics` until aborted.
pub async fn serve(addr: SocketAddr, stats: Arc<Stats>) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
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
    Ok(MetricsServer { addr, task })
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

/// Renders a snapshot in the Prometheus text exposition format.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut labelled_done = [false; 2];
    for (name, help, value) in snap.fields() {
        let family = [
            ("spans_dropped_", "spans_dropped", "reason"),
            ("decode_errors_", "decode_errors", "kind"),
        ]
        .iter()
        .enumerate()
        .find(|(_, (prefix, _, _))| name.starts_with(prefix));
        if let Some((i, (prefix, family, label))) = family {
            let metric = format!("{PREFIX}_{family}_total");
            if let Some(done @ false) = labelled_done.get_mut(i) {
                *done = true;
                let _ = writeln!(out, "# HELP {metric} {family} by {label}");
                let _ = writeln!(out, "# TYPE {metric} counter");
            }
            let _ = writeln!(
                out,
                "{metric}{{{label}=\"{}\"}} {value}",
                &name[prefix.len()..]
            );
            continue;
        }
        if name == "decode_errors" {
            // The labelled family above adds up to it.
            continue;
        }
        let gauge = GAUGES.contains(&name);
        let metric = if gauge {
            format!("{PREFIX}_{name}")
        } else {
            format!("{PREFIX}_{name}_total")
        };
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(
            out,
            "# TYPE {metric} {}",
            if gauge { "gauge" } else { "counter" }
        );
        let _ = writeln!(out, "{metric} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_labelled_families() {
        let stats = Stats::default();
        Stats::add(&stats.spans_received, 7);
        Stats::inc(&stats.connections_open);
        stats.decode_error("bincode");
        Stats::add(&stats.spans_dropped_shutdown, 2);
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
