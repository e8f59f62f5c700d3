//! `--metrics-address`: [`Stats`] in the Prometheus text format at `GET /metrics`
//! (hyper, HTTP/1.1), then each sandbox's own series (`sandbox` label, bounded
//! by `--max-sandboxes`). Anyone who can reach the address can connect, so the
//! endpoint keeps to a budget (connections, a request head's time and size, a
//! deadline in all) that never takes the agents' file descriptors and memory.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::shutdown::Shutdown;
use crate::stats::{DropReason, Kind, Label, Snapshot, Stats, Value};
use crate::tenant::{LimitReason, Tenant, Tenants};

const PREFIX: &str = "kata_trace_forwarder";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A scraper or two, with room to spare.
pub(crate) const MAX_CONNECTIONS: usize = 64;
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// hyper's read buffer bounds a request head (a scrape's is a few hundred
/// bytes; 8 KiB is the least hyper takes).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("binding the metrics endpoint on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Gives the URL it serves at (a `SocketAddr` always makes one).
pub(crate) async fn serve(
    addr: SocketAddr,
    stats: &Arc<Stats>,
    tenants: &Arc<Tenants>,
    shutdown: &Shutdown,
) -> Result<http::Uri, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stats, tenants, shutdown) = (Arc::clone(stats), Arc::clone(tenants), shutdown.clone());
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
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over the budget: closed at once, not queued.
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let (stats, tenants) = (Arc::clone(&stats), Arc::clone(&tenants));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    std::future::ready(Ok::<_, Infallible>(respond(&req, &stats, &tenants)))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_REQUEST_HEAD)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
                drop(slot);
            });
        }
    });
    Ok(format!("http://{addr}/metrics").parse().unwrap_or_default())
}

/// [`serve`], retrying for a few seconds while the forwarder this one took
/// over from still holds the address.
pub(crate) async fn serve_when_free(
    addr: SocketAddr,
    stats: Arc<Stats>,
    tenants: Arc<Tenants>,
    shutdown: Shutdown,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match serve(addr, &stats, &tenants, &shutdown).await {
            Ok(m) => {
                tracing::info!(metrics = ?m, "serving metrics");
                return;
            }
            Err(e) if tokio::time::Instant::now() >= deadline || shutdown.is_stopping() => {
                tracing::error!(error = %e, "no metrics endpoint");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    stats: &Stats,
    tenants: &Tenants,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut page = render(&stats.snapshot());
        render_sandboxes(&mut page, tenants);
        (StatusCode::OK, EXPOSITION, page)
    } else {
        let body = "not found; try /metrics\n".to_owned();
        (StatusCode::NOT_FOUND, "text/plain", body)
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Counters get `_total`; a family is one metric with its label, so `sum()`
/// over the label gives the whole.
pub(crate) fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    for f in snap.fields() {
        let (metric, kind) = match f.kind {
            Kind::Counter => (format!("{PREFIX}_{}_total", f.name), "counter"),
            Kind::Gauge => (format!("{PREFIX}_{}", f.name), "gauge"),
        };
        let _ = writeln!(out, "# HELP {metric} {}\n# TYPE {metric} {kind}", f.help);
        write_samples(&mut out, &metric, "", f.value);
    }
    out
}

/// `labels` (`sandbox="..."`, or none) go before a family's own label.
fn write_samples(out: &mut String, metric: &str, labels: &str, value: Value) {
    let _ = match value {
        Value::Scalar(v) if labels.is_empty() => writeln!(out, "{metric} {v}"),
        Value::Scalar(v) => writeln!(out, "{metric}{{{labels}}} {v}"),
        Value::Family(name, values) => {
            let sep = if labels.is_empty() { "" } else { "," };
            for (l, v) in values {
                let _ = writeln!(out, "{metric}{{{labels}{sep}{name}=\"{l}\"}} {v}");
            }
            Ok(())
        }
    };
}

/// The per-sandbox families: name, kind, help, and one sandbox's value.
type SandboxFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Tenant) -> Value,
);

const SANDBOX_FAMILIES: [SandboxFamily; 4] = [
    (
        "sandbox_connections_open",
        "gauge",
        "Agent connections open, per sandbox.",
        |t| Value::Scalar(t.connections() as u64),
    ),
    (
        "sandbox_spans_received_total",
        "counter",
        "Spans decoded, per sandbox.",
        |t| Value::Scalar(t.received.get()),
    ),
    (
        "sandbox_spans_dropped_total",
        "counter",
        "Spans dropped, per sandbox and reason.",
        |t| Value::Family(DropReason::NAME, t.dropped.snapshot().iter().collect()),
    ),
    (
        "sandbox_limited_total",
        "counter",
        "Times a sandbox ran into one of its limits, per sandbox and limit.",
        |t| Value::Family(LimitReason::NAME, t.limited.snapshot().iter().collect()),
    ),
];

fn render_sandboxes(out: &mut String, tenants: &Tenants) {
    let live: Vec<_> = tenants
        .live()
        .into_iter()
        .map(|t| (format!("sandbox=\"{}\"", escape_label(t.label())), t))
        .collect();
    for (name, kind, help, value) in SANDBOX_FAMILIES {
        let m = format!("{PREFIX}_{name}");
        let _ = writeln!(out, "# HELP {m} {help}\n# TYPE {m} {kind}");
        for (sandbox, t) in &live {
            write_samples(out, &m, sandbox, value(t));
        }
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        let tenants = Tenants::new(crate::config::TenantLimits::default());
        let t = tenants
            .get(crate::tenant::TenantKey::Sandbox("sb-\"1\"".into()))
            .unwrap();
        t.received.add(3);
        t.limited.inc(LimitReason::Rate);
        let _conn = t.try_connect().unwrap();
        let mut text = text;
        render_sandboxes(&mut text, &tenants);
        assert!(
            text.contains(
                "kata_trace_forwarder_sandbox_spans_received_total{sandbox=\"sb-\\\"1\\\"\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("kata_trace_forwarder_sandbox_limited_total{sandbox=\"sb-\\\"1\\\"\",reason=\"rate\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "kata_trace_forwarder_sandbox_connections_open{sandbox=\"sb-\\\"1\\\"\"} 1\n"
            ),
            "{text}"
        );
        drop((_conn, t));
        let mut gone = String::new();
        render_sandboxes(&mut gone, &tenants);
        assert!(
            !gone.contains("sandbox=\""),
            "series go with the sandbox: {gone}"
        );
        // Every sample line is `name[{labels}] value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with(PREFIX), "{line}");
            value.parse::<u64>().unwrap();
        }
    }

    /// The exposition adds `_total` to a counter: a counter whose own name
    /// ends with it would be exported as `..._total_total`.
    #[test]
    fn no_metric_name_doubles_its_suffix() {
        let text = render(&Stats::default().snapshot());
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(!line.contains("_total_total"), "{line}");
        }
        for f in Stats::default().snapshot().fields() {
            assert!(
                f.kind != Kind::Counter || !f.name.ends_with("_total"),
                "counter {} would be exported as {}_total",
                f.name,
                f.name
            );
        }
        assert!(text.contains("# TYPE kata_trace_forwarder_connections_accepted_total counter\n"));
        for (name, kind, _, _) in SANDBOX_FAMILIES {
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name}");
            assert!(!name.ends_with("_total_total"), "{name}");
        }
    }
}
