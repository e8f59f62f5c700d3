//! One agent connection: read, hand the bytes to [`crate::ingest`], queue
//! what comes back, and drain at shutdown.
//!
//! The same code serves every transport once a stream is accepted. Sending
//! into the bounded export queue waits when the queue is full, which stops
//! this task reading its socket: that is the backpressure path to the
//! guest. A length prefix over the limit, a read error, or a stream that
//! ends mid-frame ends this connection only.
//!
//! Once shutdown begins, a connection keeps reading until its agent has
//! been quiet for [`ConnShared::drain_idle`] or the shutdown deadline
//! passes, so that what the agent already wrote is not lost.
//!
//! When the forwarder hands its connections to a successor
//! ([`crate::handover`]), a connection pauses between two reads: what it
//! read of a frame not yet whole, and what it found (the format), go to the
//! successor with the socket, and it stops without another read. If the
//! successor does not take it, it reads on.
//!
//! A connection whose agent writes little and often is paced
//! ([`super::pacing`]): read at a shared tick, off the reactor, rather than
//! woken for every span.
//!
//! Each connection belongs to a sandbox ([`crate::tenant`]): what it read
//! is always queued, and then, if the sandbox is over its span rate, the
//! connection waits before reading again. A read that filled the buffer
//! yields to the other connections before the next one, so an agent that
//! always has data ready cannot starve one that has a little.

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::addr::Peer;
use crate::events::{emit, AgentConnected, AgentDisconnected, Throttled};
use crate::export::queue::QueueSender;
use crate::handover::hub::{Member, Outcome};
use crate::handover::{ConnLink, Resume};
use crate::ingest::{Ingest, Ingested, ReadBuffer};
use crate::otlp::Origin;
use crate::shutdown::{Mode, Shutdown};
use crate::stats::{Gauge, GaugeGuard, Stats};
use crate::tenant::{LimitReason, Tenant, TenantConn, TenantKey, Tenants};
use crate::wire::FrameError;

use super::pacing::{Pacing, Park, Quiet, Rate};

/// What every connection task shares.
pub(crate) struct ConnShared {
    pub queue: QueueSender,
    pub stats: Arc<Stats>,
    /// Every sandbox's share of the forwarder.
    pub tenants: Arc<Tenants>,
    pub max_frame_size: usize,
    /// After shutdown starts, a connection keeps reading until it has been
    /// quiet this long.
    pub drain_idle: Duration,
    /// The clock slow agents are read on; `None`: every read on arrival.
    pub pacing: Option<Pacing>,
}

/// A connection's stream: on the reactor, or parked and read at ticks.
/// A parked one counts itself in `connections_paced` for as long as it is
/// parked.
enum Reader<'a, S> {
    Live(S),
    Parked {
        file: std::fs::File,
        quiet: Quiet,
        _paced: GaugeGuard<'a>,
    },
}

impl<'a, S: Park> Reader<'a, S> {
    fn park(self, paced: &'a Gauge) -> std::io::Result<Self> {
        match self {
            Reader::Live(s) => Ok(Reader::Parked {
                file: s.park()?,
                quiet: Quiet::default(),
                _paced: paced.hold(),
            }),
            parked => Ok(parked),
        }
    }

    fn unpark(self) -> std::io::Result<Self> {
        match self {
            Reader::Parked { file, .. } => Ok(Reader::Live(S::unpark(file)?)),
            live => Ok(live),
        }
    }

    fn is_parked(&self) -> bool {
        matches!(self, Reader::Parked { .. })
    }
}

impl<S: AsFd> AsFd for Reader<'_, S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Reader::Live(s) => s.as_fd(),
            Reader::Parked { file, .. } => file.as_fd(),
        }
    }
}

impl ConnShared {
    /// The tenant for `key`; one outside the registry (limits, but no
    /// series of its own) when `--max-sandboxes` are tracked already.
    pub(crate) fn tenant(&self, key: TenantKey) -> Arc<Tenant> {
        match self.tenants.get(key.clone()) {
            Some(t) => t,
            None => Tenant::standalone(key, self.tenants.limits()),
        }
    }
}

/// Serves one connection until the agent closes it, it fails, or shutdown
/// has drained it. `origin` is this connection's: the service name plus
/// what is known of its sandbox (id, VSOCK CID); `conn` is its slot among
/// its sandbox's connections. `shutdown` is the forwarder's, or its
/// sandbox's. `link` ties it to hand-overs: the one it came from, if any,
/// and the pause of the next.
pub(crate) async fn serve<S>(
    stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: Arc<Origin>,
    conn: TenantConn,
    shutdown: &Shutdown,
    link: ConnLink,
) where
    S: Park,
{
    let stats = &*shared.stats;
    let tenant = conn.tenant();
    let _open = stats.connections_open.hold();
    let mut input = ReadBuffer::default();
    let ConnLink {
        mut member,
        listener,
        resume,
    } = link;
    // In systemd's store (when it keeps one) while the agent is connected.
    let stored = crate::handover::fdstore::Stored::connection(stream.as_fd());
    // A connection is announced as an agent's once it sends something: one
    // that ends before its first byte is no agent (a forwarder starting
    // beside this one asking "is this socket live?" connects and closes).
    let mut announced = resume.is_some();
    let mut ingest = match resume {
        Some(r) if r.lost => Ingest::resume_lost(peer, origin, shared.max_frame_size),
        Some(r) => {
            input.bytes().extend_from_slice(&r.partial);
            Ingest::resume(
                peer,
                origin,
                shared.max_frame_size,
                r.format,
                r.spans,
                r.decode_errors,
            )
        }
        None => Ingest::new(peer, origin, shared.max_frame_size),
    };
    ingest.set_tenant(Arc::clone(tenant));
    let mut ready: Vec<Ingested> = Vec::new();
    let mut draining = shutdown.is_stopping();
    let mut reader = Some(Reader::Live(stream));
    let mut rate = Rate::new(Instant::now());
    // When the last read happened: what a paced read brings may have
    // arrived any time after it.
    let mut last_read = Instant::now();
    let mut since = last_read;
    // The last read filled its room: more is waiting, read on at once.
    let mut more = false;
    // A parked agent went quiet: back on the reactor.
    let mut wake = false;

    // The agent closed its end.
    let mut closed = false;
    let end: Result<(), FrameError> = 'conn: loop {
        let split = ingest.frames(input.bytes(), stats, &mut ready);
        let mut spans = 0;
        for Ingested { record, cost } in ready.drain(..) {
            spans += record.count;
            tenant.received.add(record.count as u64);
            // What is read is queued even if a hand-over asks for a pause
            // meanwhile: the spans are this process's to export.
            let send = shared.queue.send(record, cost, tenant, since);
            let sent = match (member.as_mut(), reader.as_ref()) {
                (Some(m), Some(r)) => {
                    let piece = || reading(&ingest, input.bytes()).piece(r, peer, listener);
                    report_while(m, send, piece).await
                }
                _ => send.await,
            };
            if sent.is_err() {
                // The exporter is gone: the process is going down.
                break 'conn Ok(());
            }
        }
        if let Err(e) = split {
            break Err(e);
        }
        // Stopping for a restart with systemd's store: done at the first
        // place between two frames (the next process starts there).
        if draining
            && ingest.between_frames(input.bytes())
            && shutdown.phase().is_some_and(|p| p.mode == Mode::Store)
        {
            break Ok(());
        }
        if input.is_quiet() {
            ingest.shrink();
        } else if !reader.as_ref().is_some_and(Reader::is_parked) {
            // More is probably ready: let the other connections read first.
            // (A parked connection reads once a tick: no need.)
            tokio::task::yield_now().await;
        }
        let over = tenant.take_tokens(spans, Instant::now());
        if let (Some(wait), false) = (over, draining) {
            emit!(
                stats,
                Throttled {
                    tenant,
                    reason: LimitReason::Rate,
                    wait,
                }
            );
            // Backpressure on this guest alone. Draining at shutdown reads
            // on regardless: the deadline bounds it.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.stopping() => { draining = true; }
                _ = pause_asked(&mut member) => {}
            }
        }

        // Between two reads, with only a frame not yet whole in hand: where
        // a hand-over takes this connection.
        if let (Some(m), Some(r)) = (member.as_mut(), reader.as_ref()) {
            if m.pause_due() {
                m.report(reading(&ingest, input.bytes()).piece(r, peer, listener));
            }
        }
        if let Some(m) = member.as_mut().filter(|m| m.awaiting_outcome()) {
            match m.outcome().await {
                Outcome::HandedOver => {
                    tracing::debug!(%peer, spans = ingest.spans(), "connection handed over");
                    stored.keep();
                    return;
                }
                Outcome::Stop => draining = true,
                Outcome::Resumed => {}
            }
        }

        // On the reactor or off it: a slow agent is paced; one that speeds
        // up, goes quiet, or is being drained is read on arrival.
        let parked = reader.as_ref().is_some_and(Reader::is_parked);
        // A live read that filled its room is a busy agent: not paced yet.
        let busy = more && !parked;
        let pace = shared
            .pacing
            .as_ref()
            .filter(|_| !draining && !wake && !busy && rate.is_slow());
        let moved = match (reader.take(), parked, pace.is_some()) {
            (Some(r), false, true) => r.park(&stats.connections_paced),
            (Some(r), true, false) => r.unpark(),
            (Some(r), _, _) => Ok(r),
            (None, _, _) => break Ok(()),
        };
        let current = match moved {
            Ok(r) => reader.insert(r),
            Err(e) => break Err(FrameError::Read(e)),
        };

        let buf = input.prepare();
        let read = match current {
            Reader::Live(stream) if draining => {
                let idle_at = Instant::now() + shared.drain_idle;
                let until = shutdown.deadline().map_or(idle_at, |d| d.min(idle_at));
                let read = tokio::time::timeout_at(until, stream.read_buf(buf)).await;
                match read {
                    Ok(r) => r.map(|n| (n, n >= input.spare())),
                    Err(_) => break Ok(()),
                }
            }
            Reader::Live(stream) => {
                let read = tokio::select! {
                    r = stream.read_buf(buf) => r,
                    _ = shutdown.stopping() => { draining = true; continue; }
                    _ = pause_asked(&mut member) => continue,
                };
                last_read = Instant::now();
                since = last_read;
                read.map(|n| (n, n >= input.spare()))
            }
            Reader::Parked { file, quiet, .. } => {
                let Some(pacing) = pace else { continue };
                if !more {
                    // Shutdown is seen at the tick, no later than one tick
                    // after it began: cheaper than waiting on it as well,
                    // a tick at a time, on every parked connection.
                    pacing.tick().await;
                    if shutdown.is_stopping() {
                        draining = true;
                        continue;
                    }
                    // Arrived since the last read; what did not fit that
                    // read keeps the time it had.
                    since = last_read;
                }
                last_read = Instant::now();
                match input.read_from(file) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        more = false;
                        rate.add(0, last_read);
                        // Quiet for a while: back on the reactor, where
                        // quiet costs nothing.
                        wake = quiet.empty();
                        continue;
                    }
                    r => {
                        quiet.reset();
                        r
                    }
                }
            }
        };
        match read {
            Ok((0, _)) => {
                closed = true;
                break ingest.eof(input.bytes());
            }
            Ok((n, filled)) => {
                if !announced {
                    announced = true;
                    emit!(stats, AgentConnected { peer, tenant });
                }
                more = filled;
                wake = false;
                rate.add(n, last_read);
                if !reader.as_ref().is_some_and(Reader::is_parked) {
                    input.filled(n);
                }
            }
            Err(e) => break Err(FrameError::Read(e)),
        }
    };

    // Stopping with systemd's store and the agent still there: left in the
    // store for the next process, not closed (at the deadline with a frame
    // in hand too: the next process finds the next whole frame).
    if end.is_ok() && !closed && shutdown.phase().is_some_and(|p| p.mode == Mode::Store) {
        stored.keep();
        tracing::debug!(%peer, spans = ingest.spans(), "connection left in systemd's store");
        return;
    }
    drop(stored);
    if !announced && end.is_ok() {
        tracing::debug!(%peer, "a connection ended without sending anything (not an agent: a liveness probe?)");
        return;
    }
    emit!(
        stats,
        AgentDisconnected {
            peer,
            tenant,
            spans: ingest.spans(),
            decode_errors: ingest.decode_errors(),
            format: ingest.format(),
            end: end.as_ref().map(drop),
        }
    );
}

/// What the reader knows, for a successor to go on from: the converse of
/// `Ingest::resume` at the start of [`serve`].
fn reading(ingest: &Ingest, buffered: &[u8]) -> Resume {
    Resume {
        partial: ingest.unread(buffered),
        format: ingest.format(),
        spans: ingest.spans(),
        decode_errors: ingest.decode_errors(),
        lost: false,
    }
}

/// Resolves when a hand-over asks `member` to pause; never without one.
async fn pause_asked(member: &mut Option<Member>) {
    match member {
        Some(m) => m.pause_asked().await,
        None => std::future::pending().await,
    }
}

/// Awaits `fut`; if a hand-over asks for a pause meanwhile, reports
/// `piece()` at once (what it describes does not change while `fut` runs)
/// and goes on waiting.
async fn report_while<F: std::future::Future>(
    member: &mut Member,
    fut: F,
    piece: impl FnOnce() -> Option<crate::handover::hub::Piece>,
) -> F::Output {
    tokio::pin!(fut);
    if !member.pause_due() {
        tokio::select! {
            out = &mut fut => return out,
            _ = member.pause_asked() => {}
        }
    }
    member.report(piece());
    fut.await
}
