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

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::addr::Peer;
use crate::events::{emit, AgentConnected, AgentDisconnected};
use crate::export::queue::QueueSender;
use crate::ingest::{Ingest, Ingested, ReadBuffer};
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::wire::FrameError;

/// What every connection task shares.
pub(crate) struct ConnShared {
    pub queue: QueueSender,
    pub stats: Arc<Stats>,
    pub max_frame_size: usize,
    /// After shutdown starts, a connection keeps reading until it has been
    /// quiet this long.
    pub drain_idle: Duration,
}

/// Serves one connection until the agent closes it, it fails, or shutdown
/// has drained it. `origin` is this connection's: the service name plus
/// what is known of its sandbox (id, VSOCK CID). `shutdown` is the
/// forwarder's, or its sandbox's.
pub(crate) async fn serve<S>(
    mut stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: Arc<Origin>,
    shutdown: &Shutdown,
) where
    S: AsyncRead + Unpin,
{
    let stats = &*shared.stats;
    let _open = stats.connections_open.hold();
    emit!(stats, AgentConnected { peer });
    let mut ingest = Ingest::new(peer, origin, shared.max_frame_size);
    let mut input = ReadBuffer::default();
    let mut ready: Vec<Ingested> = Vec::new();
    let mut draining = shutdown.is_stopping();

    let end: Result<(), FrameError> = 'conn: loop {
        let split = ingest.frames(input.bytes(), stats, &mut ready);
        for Ingested { record, cost } in ready.drain(..) {
            if shared.queue.send(record, cost).await.is_err() {
                // The exporter is gone: the process is going down.
                break 'conn Ok(());
            }
        }
        if let Err(e) = split {
            break Err(e);
        }
        if input.is_quiet() {
            ingest.shrink();
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
            spans: ingest.spans(),
            decode_errors: ingest.decode_errors(),
            format: ingest.format(),
            end: end.as_ref().map(drop),
        }
    );
}
