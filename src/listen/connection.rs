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
//! Each connection belongs to a sandbox ([`crate::tenant`]): what it read
//! is always queued, and then, if the sandbox is over its span rate, the
//! connection waits before reading again. A read that filled the buffer
//! yields to the other connections before the next one, so an agent that
//! always has data ready cannot starve one that has a little.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::addr::Peer;
use crate::events::{emit, AgentConnected, AgentDisconnected, Throttled};
use crate::export::queue::QueueSender;
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
/// sandbox's.
pub(crate) async fn serve<S>(
    mut stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: Arc<Origin>,
    conn: TenantConn,
    shutdown: &Shutdown,
) where
    S: AsyncRead + Unpin,
{
    let stats = &*shared.stats;
    let tenant = conn.tenant();
    let _open = stats.connections_open.hold();
    emit!(stats, AgentConnected { peer, tenant });
    let mut ingest = Ingest::new(peer, origin, shared.max_frame_size);
    ingest.set_tenant(Arc::clone(tenant));
    let mut input = ReadBuffer::default();
    let mut ready: Vec<Ingested> = Vec::new();
    let mut draining = shutdown.is_stopping();

    let end: Result<(), FrameError> = 'conn: loop {
        let split = ingest.frames(input.bytes(), stats, &mut ready);
        let mut spans = 0;
        for Ingested { record, cost } in ready.drain(..) {
            spans += record.count;
            tenant.received.add(record.count as u64);
            if shared.queue.send(record, cost, tenant).await.is_err() {
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
