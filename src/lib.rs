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

// Guest data must never crash the host daemon: no unwrap, expect, panic
// or unchecked indexing outside tests (clippy -D warnings enforces it).
#![cfg_attr(
    not(test),
    warn(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod export;
pub mod listen;
pub mod metrics;
pub mod otlp;
pub mod stats;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use config::Config;
use config::{ListenConfig, Output};
use export::spool::{Spool, SpoolError};
use export::{BatchConfig, ExportError, Exporter, Sink};
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
    #[error("opening the spool: {0}")]
    OpenSpool(#[from] SpoolError),
    #[error(transparent)]
    ServeMetrics(#[from] metrics::MetricsError),
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
        Output::Dump => Sink::Dump(std::sync::Mutex::new(export::dump::DumpWriter::stdout())),
        Output::Otlp(o) => Sink::connect(o, STARTUP_CONNECT_TIMEOUT).await?,
    };
    let spool = match &config.spool_dir {
        Some(dir) => Some(Arc::new(Spool::open(dir, config.spool_max_bytes)?)),
        None => None,
    };
    let metrics = match config.metrics_address {
        Some(addr) => Some(metrics::serve(addr, Arc::clone(&stats)).await?),
        None => None,
    };

    let listener = match &config.listen {
        ListenConfig::Hybrid { socket_path, port } => {
            let path = ListenConfig::hybrid_socket(socket_path, *port);
            let mut l = listen::hybrid::HybridListener::bind(&path)?;
            if listen::privileges::is_root() {
                l.hand_removal_to_janitor()?;
                if let Some(s) = &spool {
                    listen::privileges::give_to_user(s.dir(), &config.user)?;
                }
                listen::privileges::drop_root(&config.user)?;
            }
            Listener::Hybrid(l)
        }
        ListenConfig::Vsock { cid, port } => {
            Listener::Vsock(listen::vsock::VsockListener::bind(*cid, *port)?)
        }
        ListenConfig::Template {
            template,
            port,
            max_sandboxes,
        } => {
            // Root is dropped inside, keeping only what the watcher needs.
            let user = listen::privileges::is_root().then(|| config.user.clone());
            if let (Some(user), Some(s)) = (&user, &spool) {
                listen::privileges::give_to_user(s.dir(), user)?;
            }
            let t = listen::template::TemplateListener::start(
                template.clone(),
                *port,
                *max_sandboxes,
                user,
            );
            Listener::Template(t.await?)
        }
    };
    tracing::info!(
        listen = %listener.describe(),
        export = %sink.describe(),
        service_name = %config.trace_name,
        spool = ?config.spool_dir,
        metrics = ?metrics,
        "forwarder ready"
    );

    let (queue_tx, queue_rx) =
        export::queue::bounded(config.queue_size, config.queue_bytes, Arc::clone(&stats));
    let (deadline_tx, deadline_rx) = watch::channel(None::<Instant>);
    let batch = BatchConfig {
        max_spans: config.batch_max_spans,
        timeout: config.batch_timeout,
        retry: Default::default(),
    };
    let exporter = Arc::new(Exporter {
        sink,
        spool,
        stats: Arc::clone(&stats),
        spooled: Default::default(),
    });
    let mut batcher = tokio::spawn(export::run_batcher(
        queue_rx,
        Arc::clone(&exporter),
        batch,
        deadline_rx.clone(),
    ));
    let replayer = tokio::spawn(export::run_replayer(
        Arc::clone(&exporter),
        deadline_rx.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(ConnShared {
        queue: queue_tx,
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
    if let Some(m) = &metrics {
        m.abort();
    }
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
    // A spooled batch being sent now is either delivered or stays on disk
    // for the next start; do not wait past the deadline for it.
    let replayer_abort = replayer.abort_handle();
    if tokio::time::timeout_at(deadline + Duration::from_secs(1), replayer)
        .await
        .is_err()
    {
        replayer_abort.abort();
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
