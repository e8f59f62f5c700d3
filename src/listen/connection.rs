//! One agent connection: frames in, converted spans out.
//!
//! The same code serves every transport once a stream is accepted. A frame
//! that does not decode is counted and skipped, because its length prefix
//! still tells where the next frame starts. A length prefix over the limit,
//! or a stream that ends mid-frame, ends this connection only. Sending into
//! the bounded export channel waits when the channel is full, which stops
//! this task reading its socket: that is the backpressure path to the guest.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::Decoder as _;

use crate::export::queue::QueueSender;
use crate::otlp::{self, Origin, ResourceCache, SpanRecord};
use crate::stats::Stats;
use crate::wire::{Decoder, FrameDecoder, FrameError, WireFormat};

/// How many decode errors one connection logs at `warn` before it only
/// counts them (the count is logged when the connection ends).
const LOGGED_DECODE_ERRORS: u64 = 5;

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A hybrid-VSOCK connection relayed by the VMM.
    Unix,
    /// A guest on the host kernel's VSOCK.
    Vsock { cid: u32 },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix => f.write_str("unix"),
            Peer::Vsock { cid } => write!(f, "vsock:{cid}"),
        }
    }
}

/// What every connection task shares.
pub struct ConnShared {
    pub queue: QueueSender,
    pub stats: Arc<Stats>,
    pub origin: Origin,
    pub max_frame_size: usize,
    /// After shutdown starts, a connection keeps reading until it has been
    /// quiet this long: what the agent already wrote is not lost.
    pub drain_idle: Duration,
    /// Set when shutdown starts: draining stops at this instant.
    pub deadline: watch::Receiver<Option<Instant>>,
}

/// First read buffer of a connection, and what it shrinks back to when the
/// agent goes quiet: an idle connection holds no more than this.
const READ_MIN: usize = 4 * 1024;
/// Largest read buffer: reached while the agent writes faster than one read
/// takes, so that a burst costs one `read` per many frames.
const READ_MAX: usize = 64 * 1024;
/// Most the encoded-span scratch reserves ahead at once.
const SCRATCH_RESERVE_MAX: usize = 2 * READ_MAX;
/// Most spans in one record handed to the export queue.
const RECORD_MAX_SPANS: usize = 256;

/// The spans of one read, encoded and waiting to be queued as one record.
struct Pending {
    /// Scratch the spans are encoded into, reused from read to read.
    spans: BytesMut,
    count: usize,
    /// Payload bytes of the frames behind these spans: the queue's cost.
    cost: usize,
    resource: Option<Arc<otlp::EncodedResource>>,
}

impl Pending {
    fn take(&mut self) -> Option<(SpanRecord, usize)> {
        let resource = self.resource.clone()?;
        if self.count == 0 {
            return None;
        }
        // Split off, not copied: the record takes the written part of the
        // scratch allocation and the scratch keeps the rest, so records of
        // one connection are consecutive slices of few allocations, each
        // freed once its last record is exported. When the rest runs out,
        // the scratch starts a new allocation of the same size.
        let rec = SpanRecord {
            resource,
            spans: self.spans.split().freeze(),
            count: std::mem::take(&mut self.count),
        };
        Some((rec, std::mem::take(&mut self.cost)))
    }
}

/// Counts spans as received just before they are queued, so that the
/// counters never show more exported than received.
fn count_spans(stats: &Stats, format: Option<WireFormat>, n: usize) {
    let n = n as u64;
    Stats::add(&stats.spans_received, n);
    match format {
        Some(WireFormat::Json) => Stats::add(&stats.spans_json, n),
        Some(WireFormat::Bincode) => Stats::add(&stats.spans_bincode, n),
        None => {}
    }
}

/// Serves one connection until the agent closes it, it fails, or shutdown
/// has drained it. `origin` is this connection's: `shared.origin` plus what
/// is known of its sandbox (id, VSOCK CID).
///
/// Work is done per read, not per frame: every whole frame a read brought
/// is decoded and encoded into one buffer, which goes to the export queue as
/// one record, and the counters are updated once. The read buffer grows
/// while reads fill it and is given back when the agent goes quiet.
pub async fn serve<S>(
    mut stream: S,
    peer: Peer,
    shared: &ConnShared,
    origin: &Origin,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + Unpin,
{
    let stats = &*shared.stats;
    Stats::inc(&stats.connections_open);
    tracing::info!(%peer, "agent connected");
    let mut codec = FrameDecoder::new(shared.max_frame_size);
    let mut buf = BytesMut::new();
    let mut read_size = READ_MIN;
    let mut pending = Pending {
        spans: BytesMut::new(),
        count: 0,
        cost: 0,
        resource: None,
    };
    let mut decoder = Decoder::new();
    let mut resources = ResourceCache::default();
    let mut spans = 0u64;
    let mut decode_errors = 0u64;
    let mut draining = *stop.borrow();

    let end: Result<(), FrameError> = 'conn: loop {
        // Every whole frame read so far becomes a span in `pending`.
        let (mut frames, mut frame_bytes) = (0u64, 0u64);
        let split = loop {
            let frame = match codec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            frames += 1;
            frame_bytes += frame.len() as u64;
            let (span, seen) = match decoder.decode_reusing(&frame, resources.known_bytes()) {
                Ok(decoded) => decoded,
                Err(e) => {
                    decode_errors += 1;
                    stats.decode_error(e.kind());
                    if decode_errors <= LOGGED_DECODE_ERRORS {
                        tracing::warn!(%peer, error = %e, kind = e.kind(), frame_len = frame.len(), "skipping frame that does not decode");
                    }
                    continue;
                }
            };
            let resource = resources.get(span.resource.as_ref(), seen, origin);
            let same = pending
                .resource
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &resource));
            if !same || pending.count >= RECORD_MAX_SPANS {
                if let Some((rec, cost)) = pending.take() {
                    count_spans(stats, decoder.format(), rec.count);
                    if shared.queue.send(rec, cost).await.is_err() {
                        // The exporter is gone: the process is going down.
                        break 'conn Ok(());
                    }
                }
                if !same {
                    pending.resource = Some(resource);
                }
            }
            // A record starts: room for what the rest of this read encodes
            // to (about its payload's size) in one piece, rather than
            // growing, and copying, span by span. Capped: a large partial
            // frame behind this one must not make it large.
            if pending.spans.is_empty() {
                pending
                    .spans
                    .reserve((frame.len() + buf.len()).min(SCRATCH_RESERVE_MAX));
            }
            otlp::encode::put_span(&mut pending.spans, &span);
            pending.count += 1;
            pending.cost += frame.len();
            spans += 1;
        };
        Stats::add(&stats.frames_received, frames);
        Stats::add(&stats.bytes_received, frame_bytes);
        if let Some((rec, cost)) = pending.take() {
            count_spans(stats, decoder.format(), rec.count);
            if shared.queue.send(rec, cost).await.is_err() {
                break Ok(());
            }
        }
        if let Err(e) = split {
            break Err(e);
        }

        // Read more. A drained socket means the burst is over: give the
        // large buffers back before waiting, so quiet agents cost little.
        if buf.is_empty() && buf.capacity() > read_size {
            buf = BytesMut::new();
        }
        if read_size == READ_MIN && pending.spans.capacity() > READ_MIN {
            pending.spans = BytesMut::new();
        }
        buf.reserve(read_size);
        let spare = buf.capacity() - buf.len();
        let read = if draining {
            let idle_at = Instant::now() + shared.drain_idle;
            let until = match *shared.deadline.borrow() {
                Some(d) => d.min(idle_at),
                None => idle_at,
            };
            match tokio::time::timeout_at(until, stream.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break Ok(()),
            }
        } else {
            tokio::select! {
                r = stream.read_buf(&mut buf) => r,
                _ = stop.wait_for(|s| *s) => { draining = true; continue; }
            }
        };
        match read {
            Ok(0) => {
                break match codec.decode_eof(&mut buf) {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Ok(n) if n >= spare => read_size = (read_size * 2).min(READ_MAX),
            Ok(n) if n < read_size / 2 => read_size = READ_MIN,
            Ok(_) => {}
            Err(e) => break Err(FrameError::Read(e)),
        }
    };

    match &end {
        Ok(()) => {}
        Err(FrameError::Oversized { .. }) => Stats::inc(&stats.frames_oversized),
        Err(FrameError::Truncated { .. }) => Stats::inc(&stats.frames_truncated),
        Err(FrameError::Read(_)) => Stats::inc(&stats.io_errors),
    }
    Stats::dec(&stats.connections_open);
    let format = decoder.format().map(WireFormat::as_str).unwrap_or("none");
    match end {
        Ok(()) => tracing::info!(%peer, spans, decode_errors, format, "agent disconnected"),
        Err(e) => {
            tracing::warn!(%peer, spans, decode_errors, format, error = %e, "closing agent connection")
        }
    }
}
