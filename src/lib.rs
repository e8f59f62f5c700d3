//! `kata-trace-forwarder`: receives Kata Containers agent trace spans from guest
//! VMs over (hybrid) VSOCK and exports them to an OpenTelemetry collector over
//! OTLP: `listen` -> `ingest` -> `export` (ARCHITECTURE.md maps the modules).
//! [`run`] reaches the collector and binds; [`serve`] runs until stopped.

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
#![warn(unreachable_pub)]

pub mod addr;
pub mod config;
mod events;
pub mod export;
pub mod handover;
pub mod ingest;
pub mod janitor;
pub(crate) mod lifeline;
pub mod listen;
pub mod logging;
mod metrics;
pub mod otlp;
pub mod shutdown;
pub mod stats;
pub mod status;
pub mod tenant;
mod untrusted;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use config::Config;
use config::Output;
use export::spool::{Spool, SpoolError};
use export::{ExportError, Exporter, Sink};
use handover::server::{started_with, BRIDGE_ENV, TAKE_OVER_ENV};
use handover::{HandoffListener, Upgrade};
use listen::connection::ConnShared;
use listen::{ListenError, Listeners};
use shutdown::{Mode, Shutdown};
use stats::{DropReason, Snapshot, Stats};

/// Well inside the 10 s in which users expect a missing collector reported.
pub(crate) const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// During shutdown, a connection quiet this long is done.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// How long past the shutdown deadline an export attempt in flight may take.
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
    #[error(transparent)]
    HandOver(#[from] handover::HandOverError),
}

pub struct Finished {
    pub summary: Snapshot,
    /// Everything went to the bridge of a `SIGHUP` upgrade: the caller is
    /// to execute the upgraded binary now, outside the async runtime.
    pub reexec: Option<handover::Reexec>,
}

/// Runs until `stop`, then drains and flushes within `config.shutdown_timeout`.
/// Checks the collector first (a missing one leaves no socket behind), then
/// takes over or binds, then drops root. Each `sighup` hands everything to
/// `upgrade`'s binary (made early: one sent during the start waits, harmless).
pub async fn run(
    config: Config,
    stop: impl Future<Output = ()>,
    upgrade: Option<Upgrade>,
    sighup: Option<tokio::signal::unix::Signal>,
) -> Result<Finished, RunError> {
    // A bridge hands everything back to the process that started it, and
    // to no other of its user's: its pid, now.
    let parent = started_with(BRIDGE_ENV).then(|| nix::unistd::getppid().as_raw());
    let out = || Box::new(std::io::BufWriter::new(std::io::stdout()));
    let sink = match &config.output {
        Output::Dump(d) if d.format == config::DumpFormat::Tree => Sink::tree(out(), d),
        Output::Dump(_) => Sink::dump(out()),
        Output::Otlp(o) => Sink::connect(o, STARTUP_CONNECT_TIMEOUT).await?,
    };
    let spool_dir = config.spool.as_ref().map(|s| s.dir.as_path());
    if let Some(dir) = spool_dir {
        // While still root, so that it can be handed to the user we become.
        Spool::create_dir(dir)?;
    }
    let shutdown = Shutdown::new();
    let taken = match &config.handoff {
        // A bad or foreign state is logged, and we start clean; a forwarder
        // that refuses is an error (starting clean would serve beside it).
        Some(path) if config.take_over || started_with(TAKE_OVER_ENV) => {
            let (p, max) = (path.clone(), config.max_frame_size);
            let taking = tokio::task::spawn_blocking(move || handover::take_over(&p, max));
            match taking.await {
                Ok(Ok(t)) => t,
                Ok(Err(e @ handover::HandOverError::Refused(_))) => return Err(e.into()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, handoff = %path.display(), "taking over from the running forwarder failed; starting clean");
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "taking over: the task failed; starting clean");
                    None
                }
            }
        }
        _ => None,
    };
    let mut hand_over = Handover {
        upgrade,
        sighup,
        parent,
        ..Handover::default()
    };
    let (inherited, from) = match taken {
        // Bound as at any start (so that the successor ends with exactly
        // the predecessor's privileges), on what was handed over.
        Some(t) => {
            (hand_over.listener, hand_over.ack) = (t.handoff, Some(t.ack));
            let inherited = listen::inherited::Inherited::new(t.listeners, t.connections)?;
            (Some(Arc::new(inherited)), Some(t.from_pid))
        }
        None => {
            // Bound before the listeners: binding them drops root, and the
            // hand-off directory is root's.
            let user = listen::privileges::is_root().then_some(config.listen.user.as_str());
            hand_over.listener = config.handoff.as_ref().and_then(|path| {
                HandoffListener::bind(path, user)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "no hand-off socket: this forwarder cannot hand over to a successor")
                    })
                    .ok()
            });
            // What a previous process left in systemd's store is served on.
            let left = handover::fdstore::take_back();
            let inherited = (!left.is_empty())
                .then(|| listen::inherited::Inherited::from_store(left))
                .transpose()?;
            (inherited.map(Arc::new), None)
        }
    };
    let listeners =
        listen::bind_inheriting(&config.listen, spool_dir, &shutdown, inherited).await?;
    if let Some(from) = from {
        tracing::info!(from, listeners = %listeners.describe(), "took over from the running forwarder");
        // The bridge of our own upgrade is our child: reaped once it has
        // flushed and exited. Anyone else's is not (ECHILD at once).
        tokio::task::spawn_blocking(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(from as i32), None);
        });
    }
    serve_inner(&config, listeners, sink, shutdown, stop, hand_over).await
}

#[derive(Default)]
struct Handover {
    /// `None`: this forwarder never hands over.
    listener: Option<HandoffListener>,
    upgrade: Option<Upgrade>,
    sighup: Option<tokio::signal::unix::Signal>,
    /// In a bridge: the process to hand back to.
    parent: Option<i32>,
    /// Owed to the predecessor once serving (this forwarder took over).
    ack: Option<handover::Ack>,
}

/// Serves `listeners` into `sink` until `stop` completes, then stops
/// through `shutdown` (the one the listeners were bound under) within
/// `config.shutdown_timeout`; the sockets are removed on the way out.
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    sink: Sink,
    shutdown: Shutdown,
    stop: impl Future<Output = ()>,
) -> Result<Snapshot, RunError> {
    serve_inner(config, listeners, sink, shutdown, stop, Handover::default())
        .await
        .map(|f| f.summary)
}

async fn serve_inner(
    config: &Config,
    mut listeners: Listeners,
    sink: Sink,
    shutdown: Shutdown,
    stop: impl Future<Output = ()>,
    mut hand_over: Handover,
) -> Result<Finished, RunError> {
    let taken_over = hand_over.ack.is_some();
    if let Some(ack) = hand_over.ack {
        // The listeners are ours, registered with this runtime: from here
        // on the predecessor will not read again.
        ack.send()?;
        if let Some(h) = hand_over.listener.as_mut() {
            h.remove = true;
        }
    }
    let hub = handover::hub::Hub::new();
    let mut server = hand_over.listener.map(|h| {
        listeners.hub = Some(Arc::clone(&hub));
        // Without an upgrade to start, SIGHUP stays with the loop below.
        let on_hup = hand_over
            .upgrade
            .and_then(|u| Some((u, hand_over.sighup.take()?)));
        let launcher = listeners.launcher();
        handover::server::Server::new(h, Arc::clone(&hub), on_hup, launcher, hand_over.parent)
    });
    if let Some(mut hup) = hand_over.sighup {
        // SIGHUP must not kill a forwarder that cannot upgrade.
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::error!("SIGHUP: no hand-off socket, so no upgrade; still serving");
            }
        });
    }
    let stats = Arc::new(Stats::default());
    let tenants = Arc::new(tenant::Tenants::new(config.listen.tenants));
    let spool = (config.spool.as_ref())
        .map(|s| Spool::open(&s.dir, s.max_bytes, Arc::clone(&stats)).map(Arc::new))
        .transpose()?;
    let metrics = match config.metrics_address {
        // The predecessor lets go of the address as it stops: bind it in
        // the background, rather than hold the agents up.
        Some(addr) if taken_over => {
            let (s, t) = (Arc::clone(&stats), Arc::clone(&tenants));
            tokio::spawn(metrics::serve_when_free(addr, s, t, shutdown.clone()));
            None
        }
        Some(addr) => Some(metrics::serve(addr, &stats, &tenants, &shutdown).await?),
        None => None,
    };
    tracing::info!(
        listen = %listeners.describe(),
        export = %sink.describe(),
        service_name = %config.service_name,
        spool = ?config.spool.as_ref().map(|s| &s.dir),
        metrics = ?metrics,
        handoff = ?server.as_ref().map(|s| s.listener.path.clone()),
        pid = std::process::id(),
        "forwarder ready"
    );
    // A bridge is not the service's process: its parent, re-executed,
    // takes everything back and says it is ready.
    if !started_with(BRIDGE_ENV) {
        handover::server::notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
        ]);
    }

    let queue = &config.queue;
    let (queue_tx, queue_rx) =
        export::queue::bounded(queue.max_spans, queue.max_bytes, Arc::clone(&stats));
    let exporter = Arc::new(Exporter::new(sink, spool, Arc::clone(&stats)));
    if let Some(s) = server.as_mut() {
        s.status = Some(Arc::new(status::Board::new(
            Arc::clone(&stats),
            Arc::clone(&tenants),
            Arc::clone(&exporter),
            listeners.each(),
        )));
    }
    let mut batcher = tokio::spawn(export::run_batcher(
        queue_rx,
        Arc::clone(&exporter),
        config.batch,
        shutdown.clone(),
    ));
    tokio::spawn(export::run_sink_ticker(
        Arc::clone(&exporter),
        shutdown.clone(),
    ));
    let mut replayer = tokio::spawn(export::run_replayer(
        Arc::clone(&exporter),
        shutdown.clone(),
    ));
    let shared = Arc::new(ConnShared {
        queue: queue_tx,
        stats: Arc::clone(&stats),
        tenants: Arc::clone(&tenants),
        max_frame_size: config.max_frame_size,
        drain_idle: DRAIN_IDLE,
        pacing: listen::pacing::Pacing::for_batch_timeout(config.batch.timeout),
    });
    let origin = Arc::new(otlp::Origin {
        service_name: config.service_name.clone(),
        extra: Vec::new(),
    });
    // The queue closes, and the batcher ends, once the last connection has
    // let go of `shared`.
    let listening = tokio::spawn(listen::serve(listeners, shared, origin, shutdown.clone()));
    tokio::spawn(report_stats(
        Arc::clone(&stats),
        config.stats_interval,
        shutdown.clone(),
    ));

    let (mode, reexec) = until_stopped(stop, server.as_mut(), &mut batcher).await;
    // A successor that connects from now on finds nobody, and starts clean.
    drop(server);

    let deadline = Instant::now() + config.shutdown_timeout;
    let what = match mode {
        Mode::Drain => "shutting down: draining connections and flushing",
        Mode::HandOver => "handed over: flushing what was read before",
        Mode::Store => "shutting down: the agents' connections stay in systemd's file descriptor store for the next process; flushing",
    };
    tracing::info!(timeout = ?config.shutdown_timeout, "{what}");
    if mode != Mode::HandOver {
        // Not after a hand-over: the service goes on, in the successor.
        handover::server::notify(&[sd_notify::NotifyState::Stopping]);
    }
    shutdown.begin(mode, deadline);
    if let Err(e) = listening.await {
        tracing::error!(error = %e, "listeners failed");
    }
    finish("exporter", &mut batcher, deadline + FLUSH_GRACE).await;
    finish("spool replayer", &mut replayer, deadline + FLUSH_GRACE).await;
    if let Err(e) = exporter.sink.finish() {
        tracing::warn!(error = %e, "cannot write the trace trees to stdout");
    }

    let snap = stats.snapshot();
    let accounted = snap.spans_exported + snap.spans_rejected + snap.spans_dropped.total();
    let lost = snap.spans_received.saturating_sub(accounted);
    stats.spans_dropped.add(DropReason::Shutdown, lost);
    Ok(Finished {
        summary: stats.snapshot(),
        reexec,
    })
}

/// Serves until asked to stop, the exporter fails, or a hand-over commits.
async fn until_stopped(
    stop: impl Future<Output = ()>,
    server: Option<&mut handover::server::Server>,
    batcher: &mut tokio::task::JoinHandle<()>,
) -> (Mode, Option<handover::Reexec>) {
    let mut upgrading = server.as_ref().map(|s| s.upgrading());
    // Without a server, a branch that never matches.
    let handing_over = futures_util::future::OptionFuture::from(server.map(|s| s.run()));
    // A stop during an upgrade waits for it to settle (not leaving the new binary
    // serving alone), then stops here or in the upgraded binary once it is back.
    let stop_asked = std::sync::atomic::AtomicBool::new(false);
    let stopped = async {
        stop.await;
        if let Some(u) = upgrading.as_mut().filter(|u| *u.borrow()) {
            tracing::info!("stop asked during an upgrade: stopping once it is settled");
            stop_asked.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = u.wait_for(|under_way| !under_way).await;
        }
    };
    // With systemd's store, the next process takes the connections from it.
    let stop_mode = match handover::fdstore::enabled() {
        true => Mode::Store,
        false => Mode::Drain,
    };
    tokio::select! {
        () = stopped => (stop_mode, None),
        // The batcher only ends early if it panicked; nothing can be
        // exported any more, so stop rather than accept spans to lose.
        res = batcher => {
            tracing::error!(?res, "exporter stopped unexpectedly");
            (Mode::Drain, None)
        }
        Some(done) = handing_over => {
            tracing::info!(successor = done.successor_pid, "the successor serves every agent now");
            let stop = stop_asked.load(std::sync::atomic::Ordering::Relaxed);
            (Mode::HandOver, done.reexec.map(|r| handover::Reexec { stop, ..r }))
        }
    }
}

/// Abandons the task at `at`: an exiting process must not hang on a
/// collector that does not answer.
async fn finish(what: &str, task: &mut tokio::task::JoinHandle<()>, at: Instant) {
    if tokio::time::timeout_at(at, &mut *task).await.is_err() {
        task.abort();
        tracing::warn!(stage = what, "did not finish by the shutdown deadline");
    }
}

/// Only intervals in which they changed, so that a quiet host stays quiet.
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
            tracing::info!(stats = %logging::Json(&now), "counters");
            last = now;
        }
    }
}
