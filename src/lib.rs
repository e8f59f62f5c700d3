//! `kata-trace-forwarder`: receives Kata Containers agent trace spans from
//! guest VMs over VSOCK or hybrid VSOCK and exports them to an
//! OpenTelemetry collector over OTLP.
//!
//! The data path, one module per stage:
//!
//! ```text
//! listen (accept, frames) -> wire (decode SpanData) -> otlp (convert) -> export (batch, retry, send)
//! ```
//!
//! [`config`] turns flags and environment into a validated [`Config`];
//! [`run`] wires the stages together and owns startup and shutdown.

pub mod config;
pub mod export;
pub mod listen;
pub mod otlp;
pub mod stats;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use config::Config;
use config::{ListenConfig, Output};
use export::{BatchConfig, ExportError, Sink};
use listen::connection::ConnShared;
use listen::{ListenError, Listener};
use stats::{Snapshot, Stats};

/// How long startup waits for the collector: well inside the 10 s within
/// which users expect a missing collector to be reported.
pub const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// During shutdown, a connection that has been quiet this long is done.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    ConnectCollector(#[from] ExportError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// Runs the forwarder until `shutdown` completes, then drains and flushes
/// within `config.shutdown_timeout`. Returns the final counters.
///
/// Startup order matters to users: the collector is checked first (a
/// missing collector is an error, and leaves no socket behind), then the
/// listener is bound, then root is dropped.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Snapshot, RunError> {
    let stats = Arc::new(Stats::default());

    let sink = match &config.output {
        Output::Dump => Sink::Dump(export::dump::DumpWriter::stdout()),
        Output::Otlp(o) => Sink::connect(o, STARTUP_CONNECT_TIMEOUT).await?,
    };

    let listener = match &config.listen {
        ListenConfig::Hybrid { socket_path, port } => {
            let path = ListenConfig::hybrid_socket(socket_path, *port);
            let mut l = listen::hybrid::HybridListener::bind(&path)?;
            if listen::privileges::is_root() {
                l.hand_removal_to_janitor()?;
                listen::privileges::drop_root(&config.user)?;
            }
            Listener::Hybrid(l)
        }
        ListenConfig::Vsock { cid, port } => {
            Listener::Vsock(listen::vsock::VsockListener::bind(*cid, *port)?)
        }
    };
    tracing::info!(
        listen = %listener.describe(),
        export = %sink.describe(),
        service_name = %config.trace_name,
        "forwarder ready"
    );

    let (tx, rx) = mpsc::channel(config.queue_size);
    let (deadline_tx, deadline_rx) = watch::channel(None::<Instant>);
    let batch = BatchConfig {
        max_spans: config.batch_max_spans,
        timeout: config.batch_timeout,
        retry: Default::default(),
    };
    let mut batcher = tokio::spawn(export::run_batcher(
        rx,
        sink,
        batch,
        Arc::clone(&stats),
        deadline_rx.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(ConnShared {
        tx,
        stats: Arc::clone(&stats),
        origin: otlp::Origin {
            service_name: config.trace_name.clone(),
            extra: Vec::new(),
        },
        max_frame_size: config.max_frame_size,
        drain_idle: DRAIN_IDLE,
        deadline: deadline_rx,
    });
    let tracker = TaskTracker::new();
    let acceptor = tokio::spawn(listen::accept_loop(
        listener,
        Arc::clone(&shared),
        config.max_connections,
        stop_rx,
        tracker.clone(),
    ));
    drop(shared);
    let reporter = tokio::spawn(report_stats(Arc::clone(&stats), config.stats_interval));

    tokio::select! {
        _ = shutdown => {}
        // The batcher only ends early if it panicked; nothing can be
        // exported any more, so stop rather than accept spans to lose.
        res = &mut batcher => tracing::error!(?res, "exporter stopped unexpectedly"),
    }

    reporter.abort();
    let deadline = Instant::now() + config.shutdown_timeout;
    tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: draining connections and flushing");
    let _ = deadline_tx.send(Some(deadline));
    let _ = stop_tx.send(true);
    if let Err(e) = acceptor.await {
        tracing::error!(error = %e, "accept loop failed");
    }
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline");
    }
    // One export attempt may be in flight at the deadline; give it a moment
    // to finish rather than cut a request in half.
    if tokio::time::timeout_at(deadline + Duration::from_secs(1), &mut batcher)
        .await
        .is_err()
    {
        batcher.abort();
        tracing::warn!("exporter did not finish by the shutdown deadline");
    }

    let snap = stats.snapshot();
    let accounted = snap.spans_exported + snap.spans_rejected + snap.spans_dropped();
    let lost = snap.spans_received.saturating_sub(accounted);
    Stats::add(&stats.spans_dropped_shutdown, lost);
    Ok(stats.snapshot())
}

/// Logs the counters every `interval` in which they changed, so a quiet
/// host stays quiet in the logs.
async fn report_stats(stats: Arc<Stats>, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut last = stats.snapshot();
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tick.tick().await;
        let now = stats.snapshot();
        if now != last {
            tracing::info!(
                stats = %serde_json::to_string(&now).unwrap_or_default(),
                "counters"
            );
            last = now;
        }
    }
}
