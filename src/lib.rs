//! `kata-trace-forwarder`: receives Kata Containers agent trace spans from
//! guest VMs over VSOCK or hybrid VSOCK and exports them to an
//! OpenTelemetry collector over OTLP.
//!
//! The data path, one module per stage:
//!
//! ```text
//! listen (bind, accept, read) -> ingest (frames -> spans -> encoded records)
//!     -> export (queue, batch, retry, spool, send)
//! ```
//!
//! `ingest` uses [`wire`] (framing and the agent's span model) and [`otlp`]
//! (conversion). [`config`] turns flags and environment into a validated
//! [`Config`], grouped by the stage that reads it; [`addr`] holds the
//! address types both config and listen use. [`run`] binds, reaches the
//! collector and calls [`serve`], which runs the stages on bound listeners
//! and a sink until told to stop; tests call `serve` in-process. Every
//! task stops through one [`shutdown::Shutdown`]; every count goes through
//! an event that also logs it, and the counters are declared once in
//! [`stats`].

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

pub mod addr;
pub mod config;
mod events;
pub mod export;
pub mod ingest;
pub mod listen;
mod metrics;
pub mod otlp;
pub mod shutdown;
pub mod stats;
pub mod tenant;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use config::Config;
use config::Output;
use export::spool::{Spool, SpoolError};
use export::{ExportError, Exporter, Sink};
use listen::connection::ConnShared;
use listen::{ListenError, Listeners};
use shutdown::{Mode, Shutdown};
use stats::{DropReason, Snapshot, Stats};

/// How long startup waits for the collector: well inside the 10 s within
/// which users expect a missing collector to be reported.
pub const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// During shutdown, a connection that has been quiet this long is done.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// One export attempt may be in flight at the shutdown deadline: how long
/// past it the exporter may take to finish rather than cut it in half.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

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

/// Runs the forwarder until `stop` completes, then drains and flushes
/// within `config.shutdown_timeout`. Returns the final counters.
///
/// Startup order matters to users: the collector is checked first (a
/// missing collector is an error, and leaves no socket behind), then the
/// listeners are bound, then root is dropped.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Result<Snapshot, RunError> {
    let sink = match &config.export.output {
        Output::Dump => Sink::dump(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Output::Otlp(o) => Sink::connect(o, STARTUP_CONNECT_TIMEOUT).await?,
    };
    let spool_dir = config.export.spool.as_ref().map(|s| s.dir.as_path());
    if let Some(dir) = spool_dir {
        // Before root is dropped, so that it can still be made and handed
        // to the user the forwarder becomes.
        Spool::create_dir(dir)?;
    }
    let shutdown = Shutdown::new();
    let listeners = listen::bind(&config.listen, spool_dir, &shutdown).await?;
    serve(&config, listeners, sink, shutdown, stop).await
}

/// Serves `listeners` into `sink` until `stop` completes, then stops
/// through `shutdown` (the one the listeners were bound under): stop
/// accepting, drain the connections, flush, all within
/// `config.shutdown_timeout`. Returns the final counters. The listeners are
/// dropped, and their sockets removed, on the way out.
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    sink: Sink,
    shutdown: Shutdown,
    stop: impl Future<Output = ()>,
) -> Result<Snapshot, RunError> {
    let stats = Arc::new(Stats::default());
    let tenants = Arc::new(tenant::Tenants::new(config.listen.tenants));
    let spool = match &config.export.spool {
        Some(s) => Some(Arc::new(Spool::open(
            &s.dir,
            s.max_bytes,
            Arc::clone(&stats),
        )?)),
        None => None,
    };
    let metrics = match config.telemetry.metrics_address {
        Some(addr) => Some(
            metrics::serve(
                addr,
                Arc::clone(&stats),
                Arc::clone(&tenants),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    tracing::info!(
        listen = %listeners.describe(),
        export = %sink.describe(),
        service_name = %config.ingest.service_name,
        spool = ?config.export.spool.as_ref().map(|s| &s.dir),
        metrics = ?metrics,
        "forwarder ready"
    );

    let queue = &config.export.queue;
    let (queue_tx, queue_rx) =
        export::queue::bounded(queue.max_spans, queue.max_bytes, Arc::clone(&stats));
    let exporter = Arc::new(Exporter::new(sink, spool, Arc::clone(&stats)));
    let mut batcher = tokio::spawn(export::run_batcher(
        queue_rx,
        Arc::clone(&exporter),
        config.export.batch,
        shutdown.clone(),
    ));
    let mut replayer = tokio::spawn(export::run_replayer(
        Arc::clone(&exporter),
        shutdown.clone(),
    ));
    let shared = Arc::new(ConnShared {
        queue: queue_tx,
        stats: Arc::clone(&stats),
        tenants,
        max_frame_size: config.ingest.max_frame_size,
        drain_idle: DRAIN_IDLE,
        pacing: listen::pacing::Pacing::for_batch_timeout(config.export.batch.timeout),
    });
    let origin = Arc::new(otlp::Origin {
        service_name: config.ingest.service_name.clone(),
        extra: Vec::new(),
    });
    // The queue closes, and the batcher ends, once the last connection has
    // let go of `shared`.
    let listening = tokio::spawn(listen::serve(listeners, shared, origin, shutdown.clone()));
    tokio::spawn(report_stats(
        Arc::clone(&stats),
        config.telemetry.stats_interval,
        shutdown.clone(),
    ));

    tokio::select! {
        _ = stop => {}
        // The batcher only ends early if it panicked; nothing can be
        // exported any more, so stop rather than accept spans to lose.
        res = &mut batcher => tracing::error!(?res, "exporter stopped unexpectedly"),
    }

    let deadline = Instant::now() + config.shutdown_timeout;
    tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: draining connections and flushing");
    shutdown.begin(Mode::Drain, deadline);
    // Phase one: stop accepting, drain the connections (bounded by the
    // deadline inside).
    if let Err(e) = listening.await {
        tracing::error!(error = %e, "listeners failed");
    }
    // Phase two: flush what was read.
    finish("exporter", &mut batcher, deadline + FLUSH_GRACE).await;
    // A spooled batch being sent now is either delivered or stays on disk
    // for the next start.
    finish("spool replayer", &mut replayer, deadline + FLUSH_GRACE).await;

    let snap = stats.snapshot();
    let accounted = snap.spans_exported + snap.spans_rejected + snap.spans_dropped.total();
    let lost = snap.spans_received.saturating_sub(accounted);
    stats.spans_dropped.add(DropReason::Shutdown, lost);
    Ok(stats.snapshot())
}

/// Waits for a stage's task until `at`, then abandons it: a process that is
/// exiting must not hang on a collector that does not answer.
async fn finish(what: &str, task: &mut tokio::task::JoinHandle<()>, at: Instant) {
    if tokio::time::timeout_at(at, &mut *task).await.is_err() {
        task.abort();
        tracing::warn!(stage = what, "did not finish by the shutdown deadline");
    }
}

/// Logs the counters every `interval` in which they changed, so a quiet
/// host stays quiet in the logs, until shutdown begins.
async fn report_stats(stats: Arc<Stats>, interval: Duration, shutdown: Shutdown) {
    if interval.is_zero() {
        return;
    }
    let mut last = stats.snapshot();
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.stopping() => return,
        }
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
