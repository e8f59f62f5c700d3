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
//! Each connection belongs to a sandbox ([`crate::tenant`]): what it read
//! is always queued, and then, if the sandbox is over its span rate, the
//! connection waits before reading again. A read that filled the buffer
//! yields to the other connections before the next one, so an agent that
//! always has data ready cannot starve one that has a little.

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::addr::Peer;
use crate::events::{emit, AgentConnected, AgentDisconnected, Throttled};
use crate::export::queue::QueueSender;
use crate::handover::hub::{Member, Outcome};
use crate::handover::{ConnLink, Resume};
use crate::ingest::{Ingest, Ingested, ReadBuffer};
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tenant::{LimitReason, Tenant, TenantConn, TenantKey, Tenants};
use crate::wire::FrameError;

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
    mut stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: Arc<Origin>,
    conn: TenantConn,
    shutdown: &Shutdown,
    link: ConnLink,
) where
    S: AsyncRead + AsFd + Unpin,
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
    let mut ingest = match resume {
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
        None => {
            emit!(stats, AgentConnected { peer, tenant });
            Ingest::new(peer, origin, shared.max_frame_size)
        }
    };
    ingest.set_tenant(Arc::clone(tenant));
    let mut ready: Vec<Ingested> = Vec::new();
    let mut draining = shutdown.is_stopping();

    let end: Result<(), FrameError> = 'conn: loop {
        let split = ingest.frames(input.bytes(), stats, &mut ready);
        let mut spans = 0;
        for Ingested { record, cost } in ready.drain(..) {
            spans += record.count;
            tenant.received.add(record.count as u64);
            // What is read is queued even if a hand-over asks for a pause
            // meanwhile: the spans are this process's to export.
            let send = shared.queue.send(record, cost, tenant);
            let sent = match member.as_mut() {
                Some(m) => {
                    let piece = || Resume::piece(&stream, peer, listener, &ingest, input.bytes());
                    report_while(m, send, piece).await
                }
                None => send.await,
            };
            if sent.is_err() {
                // The exporter is gone: the process is going down.
                break 'conn Ok(());
            }
        }
        if let Err(e) = split {
            break Err(e);
        }
        if input.is_quiet() {
            ingest.shrink();
        } else {
            // More is probably ready: let the other connections read first.
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
        if let Some(m) = member.as_mut() {
            if m.pause_due() {
                m.report(Resume::piece(
                    &stream,
                    peer,
                    listener,
                    &ingest,
                    input.bytes(),
                ));
            }
        }
        if let Some(m) = member.as_mut().filter(|m| m.awaiting_outcome()) {
            match m.outcome().await {
                Outcome::HandedOver => {
                    tracing::debug!(%peer, spans = ingest.spans(), "connection handed over");
                    return;
                }
                Outcome::Stop => draining = true,
                Outcome::Resumed => {}
            }
        }

        let buf = input.prepare();
        let read = if draining {
            let idle_at = Instant::now() + shared.drain_idle;
            let until = shutdown.deadline().map_or(idle_at, |d| d.min(idle_at));
            match tokio::time::timeout_at(until, stream.read_buf(buf)).await {
                Ok(r) => r,
                Err(_) => break Ok(()),
            }
        } else {
            tokio::select! {
                r = stream.read_buf(buf) => r,
                _ = shutdown.stopping() => { draining = true; continue; }
                _ = pause_asked(&mut member) => continue,
            }
        };
        match read {
            Ok(0) => break ingest.eof(input.bytes()),
            Ok(n) => input.filled(n),
            Err(e) => break Err(FrameError::Read(e)),
        }
    };

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
