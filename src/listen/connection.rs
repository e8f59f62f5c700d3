//! One agent connection: frames in, converted spans out.
//!
//! The same code serves every transport once a stream is accepted. A frame
//! that does not decode is counted and skipped, because its length prefix
//! still tells where the next frame starts. A length prefix over the limit,
//! or a stream that ends mid-frame, ends this connection only. Sending into
//! the bounded export channel waits when the channel is full, which stops
//! this task reading its socket: that is the backpressure path to the guest.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::otlp::{self, Origin, ResourceCache, SpanRecord};
use crate::stats::Stats;
use crate::wire::{self, Decoder, WireFormat, HEADER_LEN};

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
    pub tx: mpsc::Sender<SpanRecord>,
    pub stats: Arc<Stats>,
    pub origin: Origin,
    pub max_frame_size: usize,
    /// After shutdown starts, a connection keeps reading until it has been
    /// quiet this long: what the agent already wrote is not lost.
    pub drain_idle: Duration,
    /// Set when shutdown starts: draining stops at this instant.
    pub deadline: watch::Receiver<Option<Instant>>,
}

/// Why a stream of frames ended badly.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {claimed} bytes exceeds --max-frame-size {max}")]
    Oversized { claimed: u64, max: usize },
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
    #[error("reading from agent: {0}")]
    Read(#[from] io::Error),
}

/// `LengthDelimitedCodec` with errors that say what happened.
struct FrameDecoder {
    inner: LengthDelimitedCodec,
    max: usize,
}

impl tokio_util::codec::Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        self.inner.decode(src).map_err(|e| {
            if e.get_ref()
                .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
            {
                // The codec rejects a length while the header is still
                // unconsumed, so the claimed size can be read for the log.
                let claimed = src
                    .get(..HEADER_LEN)
                    .and_then(|h| h.try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                FrameError::Oversized {
                    claimed,
                    max: self.max,
                }
            } else {
                FrameError::Read(e)
            }
        })
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

/// Serves one connection until the agent closes it, it fails, or shutdown
/// has drained it.
pub async fn serve<S>(stream: S, peer: Peer, shared: &ConnShared, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + Unpin,
{
    let stats = &*shared.stats;
    Stats::inc(&stats.connections_open);
    tracing::info!(%peer, "agent connected");
    let codec = FrameDecoder {
        inner: wire::frame_codec(shared.max_frame_size),
        max: shared.max_frame_size,
    };
    let mut frames = FramedRead::new(stream, codec);
    let mut decoder = Decoder::new();
    let mut resources = ResourceCache::default();
    let mut spans = 0u64;
    let mut decode_errors = 0u64;
    let mut draining = *stop.borrow();

    let end: Result<(), FrameError> = loop {
        let next = if draining {
            let idle_at = Instant::now() + shared.drain_idle;
            let until = match *shared.deadline.borrow() {
                Some(d) => d.min(idle_at),
                None => idle_at,
            };
            match tokio::time::timeout_at(until, frames.next()).await {
                Ok(n) => n,
                Err(_) => break Ok(()),
            }
        } else {
            tokio::select! {
                n = frames.next() => n,
                _ = stop.wait_for(|s| *s) => { draining = true; continue; }
            }
        };
        let frame = match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(f)) => f,
        };
        Stats::inc(&stats.frames_received);
        Stats::add(&stats.bytes_received, frame.len() as u64);
        let record = match decoder.decode(&frame) {
            Ok(span) => {
                let resource = resources.get(span.resource.as_ref(), &shared.origin);
                SpanRecord {
                    resource,
                    span: otlp::span(&span),
                }
            }
            Err(e) => {
                decode_errors += 1;
                Stats::inc(&stats.decode_errors);
                if decode_errors <= LOGGED_DECODE_ERRORS {
                    tracing::warn!(%peer, error = %e, kind = e.kind(), frame_len = frame.len(), "skipping frame that does not decode");
                }
                continue;
            }
        };
        spans += 1;
        Stats::inc(&stats.spans_received);
        match decoder.format() {
            Some(WireFormat::Json) => Stats::inc(&stats.spans_json),
            Some(WireFormat::Bincode) => Stats::inc(&stats.spans_bincode),
            None => {}
        }
        if shared.tx.send(record).await.is_err() {
            // The exporter is gone: the process is going down.
            break Ok(());
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
