//! One agent connection, any transport: read, [`crate::ingest`], queue. A
//! full export queue stops this task reading its socket: the backpressure
//! path to the guest. A bad length prefix, a read error or a stream ending
//! mid-frame ends this connection only. A state machine, stepped per read:
//!
//! ```text
//!   Live ---- slow agent ---> Parked ---- busy or quiet ---> Live
//!     \                          |
//!      +--- stopping ---> Draining <--- stopping (seen at a tick)
//!   any --- handed over, or stopping into systemd's store --> Leaving
//! ```
//!
//! Parked: a slow agent, read at a shared tick ([`super::pacing`]).
//! Draining: read until quiet or the deadline, so what the agent wrote is
//! not lost. Leaving: a successor (paused between reads, a partial frame
//! going along) or systemd's store holds it: end without a read or a close.
//! What was read is always queued; then a sandbox over its span rate waits.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::addr::Peer;
use crate::export::queue::QueueSender;
use crate::handover::fdstore::Stored;
use crate::handover::wire::ConnState;
use crate::ingest::{Ingest, Ingested, ReadBuffer};
use crate::lifeline::{After, Lifeline, Next};
use crate::otlp::Origin;
use crate::stats::{GaugeGuard, Stats};
use crate::tenant::{LimitReason, Tenant, TenantConn, Tenants};
use crate::wire::FrameError;

use super::pacing::{Pacing, Park, Rate, EMPTY_TICKS};

pub(crate) struct ConnShared {
    pub queue: QueueSender,
    pub stats: Arc<Stats>,
    pub tenants: Arc<Tenants>,
    pub max_frame_size: usize,
    /// Draining ends after this long quiet.
    pub drain_idle: Duration,
    /// The clock slow agents are read on; `None`: every read on arrival.
    pub pacing: Option<Pacing>,
}

/// The accept loop's id (for a hand-over's piece) and what a predecessor knew.
pub(crate) struct Start {
    pub listener: u64,
    pub resume: Option<ConnState>,
}

/// Until it closes, fails, is drained or is left for a successor.
pub(crate) async fn serve<S: Park>(
    stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: Arc<Origin>,
    conn: TenantConn,
    life: Lifeline,
    start: Start,
) {
    let _open = shared.stats.connections_open.hold();
    // In systemd's store (when it keeps one) while the agent is connected.
    let stored = Stored::connection(stream.as_fd());
    let tenant = &conn.0;
    let mut input = ReadBuffer::default();
    let max = shared.max_frame_size;
    let announced = start.resume.is_some();
    let mut ingest = match start.resume {
        Some(r) if r.lost => Ingest::resume_lost(peer, origin, max),
        Some(r) => {
            input.bytes().extend_from_slice(&r.partial);
            Ingest::resume(peer, origin, max, r.format, r.spans, r.decode_errors)
        }
        None => Ingest::new(peer, origin, max),
    };
    ingest.set_tenant(Arc::clone(tenant));
    let state = if life.shutdown.is_stopping() {
        State::Draining(stream)
    } else {
        State::Live(stream)
    };
    let now = Instant::now();
    let mut c = Conn {
        peer,
        shared,
        tenant,
        listener: start.listener,
        life,
        state,
        ingest,
        input,
        ready: Vec::new(),
        rate: Rate::new(now),
        last_read: now,
        since: now,
        more: false,
        wake: false,
        announced,
    };
    let end = loop {
        if let Some(end) = c.step().await {
            break end;
        }
    };
    c.finish(end, stored);
}

enum State<'a, S> {
    Live(S),
    /// Read at ticks; counted in `connections_paced` while so.
    Parked {
        file: std::fs::File,
        /// Empty ticks in a row.
        quiet: u32,
        _paced: GaugeGuard<'a>,
    },
    Draining(S),
    /// Between two states, or ended.
    Gone,
}

impl<S: AsFd> State<'_, S> {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            State::Live(s) | State::Draining(s) => Some(s.as_fd()),
            State::Parked { file, .. } => Some(file.as_fd()),
            State::Gone => None,
        }
    }
}

enum End {
    /// The agent closed its end (an error if it cut a frame short).
    Closed(Result<(), FrameError>),
    /// Nothing more is read: drained, failed, or the exporter is gone.
    Stopped(Result<(), FrameError>),
    HandedOver,
}

struct Conn<'a, S> {
    peer: Peer,
    shared: &'a ConnShared,
    tenant: &'a Arc<Tenant>,
    listener: u64,
    life: Lifeline,
    state: State<'a, S>,
    ingest: Ingest,
    input: ReadBuffer,
    ready: Vec<Ingested>,
    rate: Rate,
    /// What a paced read brings may have arrived any time after this.
    last_read: Instant,
    /// When what is being queued arrived, at the earliest (for latency).
    since: Instant,
    /// The last read filled its room: more is waiting, read on at once.
    more: bool,
    /// A parked agent went quiet: back on the reactor.
    wake: bool,
    /// Announced as an agent once it sends something: one that ends before
    /// its first byte is a liveness probe (a forwarder starting beside us).
    announced: bool,
}

impl<'a, S: Park> Conn<'a, S> {
    /// One turn: queue what was read, give way to a hand-over, read again.
    async fn step(&mut self) -> Option<End> {
        if let Some(end) = self.deliver().await {
            return Some(end);
        }
        if let Some(end) = self.between_reads().await {
            return Some(end);
        }
        self.read().await
    }

    /// Queues the frames read, then holds the sandbox to its span rate.
    async fn deliver(&mut self) -> Option<End> {
        let shared = self.shared;
        let stats = &*shared.stats;
        let tenant = self.tenant;
        let split = self
            .ingest
            .frames(self.input.bytes(), stats, &mut self.ready);
        let (peer, listener) = (self.peer, self.listener);
        let mut spans = 0;
        for Ingested { record, cost } in self.ready.drain(..) {
            spans += record.count;
            tenant.count_received(record.count, self.since);
            // What is read is queued even if a hand-over asks for a pause
            // meanwhile: the spans are this process's to export.
            let send = shared.queue.send(record, cost, tenant, self.since);
            let (ingest, input, state) = (&self.ingest, &mut self.input, &self.state);
            let piece = || {
                let fd = state.fd()?;
                reading(ingest, input.bytes(), peer).piece(&fd, listener)
            };
            if self.life.paused_while(send, piece).await.is_err() {
                // The exporter is gone: the process is going down.
                return Some(End::Stopped(Ok(())));
            }
        }
        if let Err(e) = split {
            return Some(End::Stopped(Err(e)));
        }
        let draining = matches!(self.state, State::Draining(_));
        // Stopping into systemd's store: done between two frames.
        if draining && self.life.leaves() && self.ingest.between_frames(self.input.bytes()) {
            return Some(End::Stopped(Ok(())));
        }
        if self.input.is_quiet() {
            self.ingest.shrink();
        } else if !matches!(self.state, State::Parked { .. }) {
            // More is probably ready: the others read first (parked: once
            // a tick anyway), so a busy agent cannot starve a quiet one.
            tokio::task::yield_now().await;
        }
        let over = tenant.take_tokens(spans, Instant::now());
        // This guest alone waits; not while draining (the deadline bounds it).
        if let (Some(wait), false) = (over, draining) {
            tenant.throttled(stats, LimitReason::Rate, wait);
            let next = tokio::select! {
                _ = tokio::time::sleep(wait) => None,
                next = self.life.next() => Some(next),
            };
            // A pause is reported between reads, next.
            if next == Some(Next::Drain) {
                return self.drain();
            }
        }
        None
    }

    /// Between two reads (only a partial frame in hand): a hand-over's turn.
    async fn between_reads(&mut self) -> Option<End> {
        if self.life.pause_due() {
            let piece = self.state.fd().and_then(|fd| {
                reading(&self.ingest, self.input.bytes(), self.peer).piece(&fd, self.listener)
            });
            self.life.report(piece);
        }
        match self.life.settled().await? {
            After::Leave => Some(End::HandedOver),
            After::Drain => self.drain(),
            After::Resume => None,
        }
    }

    async fn read(&mut self) -> Option<End> {
        if let Err(e) = self.pace() {
            return Some(End::Stopped(Err(FrameError::Read(e))));
        }
        let read = match &mut self.state {
            State::Draining(stream) => {
                let idle_at = Instant::now() + self.shared.drain_idle;
                let deadline = self.life.shutdown.deadline();
                let until = deadline.map_or(idle_at, |d| d.min(idle_at));
                match tokio::time::timeout_at(until, self.input.read_async(stream)).await {
                    Ok(r) => r,
                    // A frame in hand is cut, unless systemd's store keeps it.
                    Err(_) if !self.life.leaves() => {
                        return Some(End::Stopped(self.ingest.eof(self.input.bytes())));
                    }
                    Err(_) => return Some(End::Stopped(Ok(()))),
                }
            }
            State::Live(stream) => {
                let read = tokio::select! {
                    r = self.input.read_async(stream) => r,
                    next = self.life.next() => match next {
                        Next::Drain => return self.drain(),
                        Next::Pause => return None,
                    },
                };
                self.last_read = Instant::now();
                self.since = self.last_read;
                read
            }
            State::Parked { file, quiet, .. } => {
                let shared = self.shared;
                let pacing = shared.pacing.as_ref()?;
                self.input.prepare();
                if !self.more {
                    // Stopping is seen at the tick: cheaper than waiting on it.
                    pacing.tick().await;
                    if self.life.shutdown.is_stopping() {
                        return self.drain();
                    }
                    // Arrived since the last read (one not fitting keeps it).
                    self.since = self.last_read;
                }
                self.last_read = Instant::now();
                match self.input.read_from(file) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.more = false;
                        self.rate.add(0, self.last_read);
                        // Quiet a while: back on the reactor, where quiet is free.
                        *quiet += 1;
                        self.wake = *quiet >= EMPTY_TICKS;
                        return None;
                    }
                    r => {
                        *quiet = 0;
                        r
                    }
                }
            }
            State::Gone => return Some(End::Stopped(Ok(()))),
        };
        match read {
            Ok((0, _)) => Some(End::Closed(self.ingest.eof(self.input.bytes()))),
            Ok((n, filled)) => {
                if !self.announced {
                    self.announced = true;
                    self.tenant.agent_connected(self.peer);
                }
                self.more = filled;
                self.wake = false;
                self.rate.add(n, self.last_read);
                None
            }
            Err(e) => Some(End::Stopped(Err(FrameError::Read(e)))),
        }
    }

    /// Parks a slow agent; one that speeds up or goes quiet is unparked.
    fn pace(&mut self) -> std::io::Result<()> {
        let shared = self.shared;
        let parked = matches!(self.state, State::Parked { .. });
        let busy = self.more && !parked;
        let slow = shared.pacing.is_some() && !self.wake && !busy && self.rate.is_slow();
        self.state = match (std::mem::replace(&mut self.state, State::Gone), slow) {
            (State::Live(s), true) => State::Parked {
                file: s.park()?,
                quiet: 0,
                _paced: shared.stats.connections_paced.hold(),
            },
            (State::Parked { file, .. }, false) => State::Live(S::unpark(file)?),
            (other, _) => other,
        };
        Ok(())
    }

    /// Stopping, or a hand-over went on without it: read until quiet.
    fn drain(&mut self) -> Option<End> {
        let stream = match std::mem::replace(&mut self.state, State::Gone) {
            State::Live(s) | State::Draining(s) => s,
            State::Parked { file, .. } => match S::unpark(file) {
                Ok(s) => s,
                Err(e) => return Some(End::Stopped(Err(FrameError::Read(e)))),
            },
            State::Gone => return Some(End::Stopped(Ok(()))),
        };
        self.state = State::Draining(stream);
        None
    }

    /// Logs and counts how it ended; leaves it to a successor or the store.
    fn finish(self, end: End, stored: Stored) {
        let peer = self.peer;
        let end = match end {
            End::HandedOver => {
                tracing::debug!(%peer, spans = self.ingest.spans(), "connection handed over");
                stored.keep();
                return;
            }
            // Into systemd's store (a frame in hand: the next one skips it).
            End::Stopped(Ok(())) if self.life.leaves() => {
                stored.keep();
                let spans = self.ingest.spans();
                tracing::debug!(%peer, spans, "connection left in systemd's store");
                return;
            }
            End::Closed(r) | End::Stopped(r) => r,
        };
        drop(stored);
        if !self.announced && end.is_ok() {
            tracing::debug!(%peer, "a connection ended without sending anything (not an agent: a liveness probe?)");
            return;
        }
        let (tenant, stats, end) = (self.tenant, &self.shared.stats, end.as_ref().map(drop));
        tenant.agent_disconnected(stats, peer, &self.ingest, end);
    }
}

/// What the reader knows, for a successor to go on from.
fn reading(ingest: &Ingest, buffered: &[u8], peer: Peer) -> ConnState {
    ConnState {
        listener: 0,
        cid: match peer {
            Peer::Vsock { cid } => Some(cid),
            Peer::Unix => None,
        },
        partial: ingest.unread(buffered),
        format: ingest.format(),
        spans: ingest.spans(),
        decode_errors: ingest.decode_errors(),
        lost: false,
    }
}
