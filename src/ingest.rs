//! Ingest: one agent's byte stream in, encoded span records out, no socket.
//!
//! Per frame: split, detect and decode (a resource with the previous span's
//! bytes is not decoded again), convert the resource once per connection
//! ([`ResourceCache`]), encode the span into protobuf. A frame that does not
//! decode is counted and skipped: the framing still holds. Work is per
//! read: a read's frames are encoded into one scratch buffer, split off (not
//! copied) into a record per resource, at most [`RECORD_MAX_SPANS`] spans
//! each; the counters move once.

use std::sync::Arc;

use bytes::BytesMut;
use tokio_util::codec::Decoder as _;

use crate::addr::Peer;
use crate::otlp::{self, EncodedResource, Origin, ResourceCache, SpanRecord};
use crate::stats::Stats;
use crate::tenant::Tenant;
use crate::wire::{Decoder, FrameDecoder, FrameError, WireFormat};

/// First read size, and what a quiet agent's buffer shrinks back to.
pub(crate) const READ_MIN: usize = 4 * 1024;
/// Largest read: a burst costs one `read` per many frames.
pub const READ_MAX: usize = 64 * 1024;
/// Most the encoded-span scratch reserves ahead at once.
const SCRATCH_RESERVE_MAX: usize = 2 * READ_MAX;
/// Most spans in one record handed to the export queue.
pub const RECORD_MAX_SPANS: usize = 256;

pub struct Ingested {
    pub record: SpanRecord,
    /// Payload bytes of the frames behind these spans: the queue's cost.
    pub cost: usize,
}

/// A connection's read buffer: it grows while reads fill it and is given
/// back when the agent goes quiet.
#[derive(Debug)]
pub struct ReadBuffer {
    buf: BytesMut,
    read_size: usize,
    /// Room the last [`prepare`](Self::prepare) made.
    spare: usize,
    /// The last read filled its room: the next one only finishes it.
    after_full: bool,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: BytesMut::new(),
            read_size: READ_MIN,
            spare: 0,
            after_full: false,
        }
    }
}

impl ReadBuffer {
    /// Makes room for the next read. A drained buffer means the burst is
    /// over: a large allocation goes back before waiting.
    pub fn prepare(&mut self) -> &mut BytesMut {
        if self.buf.is_empty() && self.buf.capacity() > self.read_size {
            self.buf = BytesMut::new();
        }
        self.buf.reserve(self.read_size);
        self.spare = self.buf.capacity() - self.buf.len();
        &mut self.buf
    }

    /// After a read of `n` bytes: a full read doubles the next, a small one
    /// resets it, unless it only finished what a full one began (a paced
    /// tick of 5 KB then reads it all at once, not twice every tick).
    pub fn filled(&mut self, n: usize) {
        let after_full = std::mem::replace(&mut self.after_full, n >= self.spare);
        if n >= self.spare {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        } else if n < self.read_size / 2 && !after_full {
            self.read_size = READ_MIN;
        }
    }

    /// Reads once from a non-blocking `src` (a parked connection) into the
    /// room [`prepare`](Self::prepare) made; whether it filled the room too.
    pub(crate) fn read_from(
        &mut self,
        src: &mut impl std::io::Read,
    ) -> std::io::Result<(usize, bool)> {
        let len = self.buf.len();
        // Only the room one read may take is zeroed (safe code cannot read
        // into uninitialised memory): a paced agent's reads are small.
        let room = self.read_size.min(self.spare).max(1);
        self.buf.resize(len + room, 0);
        let read = src.read(self.buf.get_mut(len..).unwrap_or_default());
        let n = *read.as_ref().unwrap_or(&0);
        self.buf.truncate(len + n);
        let full = n >= room;
        if read.is_ok() {
            self.filled(if full { self.spare } else { n });
        }
        read.map(|n| (n, full))
    }

    /// As [`read_from`](Self::read_from), on the reactor. The only two ways
    /// bytes come in: each sizes the next read itself.
    pub(crate) async fn read_async(
        &mut self,
        src: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> std::io::Result<(usize, bool)> {
        let n = tokio::io::AsyncReadExt::read_buf(src, self.prepare()).await?;
        let full = n >= self.spare;
        self.filled(n);
        Ok((n, full))
    }

    /// Whether the agent has gone quiet (reads are back to the minimum).
    pub(crate) fn is_quiet(&self) -> bool {
        self.read_size == READ_MIN
    }

    pub fn bytes(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
}

/// The spans of one read, encoded and waiting to become a record.
#[derive(Default)]
struct Pending {
    /// Reused from read to read.
    spans: BytesMut,
    count: usize,
    cost: usize,
    resource: Option<Arc<EncodedResource>>,
}

impl Pending {
    fn take(&mut self) -> Option<Ingested> {
        let resource = self.resource.clone().filter(|_| self.count > 0)?;
        // Split off, not copied: a connection's records are consecutive
        // slices of few allocations, each freed with its last record.
        Some(Ingested {
            record: SpanRecord {
                resource,
                spans: self.spans.split().freeze(),
                count: std::mem::take(&mut self.count),
            },
            cost: std::mem::take(&mut self.cost),
        })
    }
}

pub struct Ingest {
    peer: Peer,
    origin: Arc<Origin>,
    /// Whose log gate its lines go through.
    tenant: Option<Arc<Tenant>>,
    codec: FrameDecoder,
    decoder: Decoder,
    resources: ResourceCache,
    pending: Pending,
    spans: u64,
    decode_errors: u64,
    /// Kept in systemd's store through a crash: look for a whole frame
    /// first ([`resynchronise`](Self::resynchronise)).
    lost_place: bool,
    /// Bytes skipped so far looking for that frame.
    skipped: u64,
}

impl Ingest {
    pub fn new(peer: Peer, origin: Arc<Origin>, max_frame_size: usize) -> Ingest {
        Ingest {
            peer,
            origin,
            tenant: None,
            codec: FrameDecoder::new(max_frame_size),
            decoder: Decoder::new(),
            resources: ResourceCache::default(),
            pending: Pending::default(),
            spans: 0,
            decode_errors: 0,
            lost_place: false,
            skipped: 0,
        }
    }

    /// A connection whose place in its stream is unknown: bytes up to the
    /// next whole frame are skipped and counted.
    pub fn resume_lost(peer: Peer, origin: Arc<Origin>, max_frame_size: usize) -> Ingest {
        let mut ingest = Ingest::new(peer, origin, max_frame_size);
        ingest.lost_place = true;
        ingest
    }

    /// Drops what comes before the first whole frame in `buf` (a length
    /// within `--max-frame-size`, then that many bytes that decode); true
    /// once found. Until then it keeps from the first place a frame could
    /// start that has not all arrived, or else the last bytes that could
    /// begin a header.
    fn resynchronise(&mut self, buf: &mut BytesMut, stats: &Stats) -> bool {
        const H: usize = crate::wire::HEADER_LEN;
        let max = self.codec.inner.max_frame_length() as u64;
        let mut waiting = None;
        let mut found = None;
        for at in 0..buf.len().saturating_sub(H - 1) {
            let len = buf
                .get(at..at + H)
                .and_then(|h| h.try_into().ok())
                .map_or(u64::MAX, u64::from_be_bytes);
            if len == 0 || len > max {
                continue;
            }
            match buf.get(at + H..at + H + len as usize) {
                Some(payload) if Decoder::new().decode(payload).is_ok() => {
                    found = Some(at);
                    break;
                }
                Some(_) => {}
                None => waiting = waiting.or(Some(at)),
            }
        }
        let skip = found
            .or(waiting)
            .unwrap_or_else(|| buf.len().saturating_sub(H - 1));
        let _ = buf.split_to(skip);
        self.skipped += skip as u64;
        stats.skipped_bytes(self.peer, skip as u64, found.map(|_| self.skipped));
        self.lost_place = found.is_none();
        found.is_some()
    }

    /// A connection another process read until now (its partial frame
    /// goes first in the read buffer: [`unread`](Self::unread)).
    pub(crate) fn resume(
        peer: Peer,
        origin: Arc<Origin>,
        max_frame_size: usize,
        format: Option<WireFormat>,
        spans: u64,
        decode_errors: u64,
    ) -> Ingest {
        let mut ingest = Ingest::new(peer, origin, max_frame_size);
        ingest.decoder.last = format;
        ingest.spans = spans;
        ingest.decode_errors = decode_errors;
        ingest
    }

    /// Nothing of a frame in hand, with `buf` (the read buffer's rest) read.
    pub(crate) fn between_frames(&self, buf: &[u8]) -> bool {
        buf.is_empty() && !self.codec.in_frame && !self.lost_place
    }

    /// The frame being read, header included: what a successor reads first.
    pub fn unread(&self, buf: &[u8]) -> Vec<u8> {
        self.codec.unread(buf)
    }

    pub(crate) fn set_tenant(&mut self, tenant: Arc<Tenant>) {
        self.tenant = Some(tenant);
    }

    /// Turns every whole frame in `buf` into records in `out`. An error (a
    /// frame over the size limit) ends the stream; earlier records stay.
    pub fn frames(
        &mut self,
        buf: &mut BytesMut,
        stats: &Stats,
        out: &mut Vec<Ingested>,
    ) -> Result<(), FrameError> {
        self.frames_inspected(buf, stats, out, |_| {})
    }

    /// [`frames`](Self::frames), showing each payload to `inspect` first
    /// (the fuzz driver's reference reading).
    pub fn frames_inspected(
        &mut self,
        buf: &mut BytesMut,
        stats: &Stats,
        out: &mut Vec<Ingested>,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<(), FrameError> {
        let (mut frames, mut bytes) = (0u64, 0u64);
        let (mut claimed, mut new_claims) = (0u64, 0u32);
        let spans_before = self.spans;
        if self.lost_place && !self.resynchronise(buf, stats) {
            return Ok(());
        }
        let split = loop {
            let frame = match self.codec.decode(buf) {
                Ok(Some(f)) => f,
                end => break end.map(drop),
            };
            inspect(&frame);
            frames += 1;
            bytes += frame.len() as u64;
            let (span, seen) = match self
                .decoder
                .decode_reusing(&frame, self.resources.known_bytes())
            {
                Ok(decoded) => decoded,
                Err(error) => {
                    self.decode_errors += 1;
                    let tenant = self.tenant.as_deref();
                    let nth = self.decode_errors;
                    stats.frame_skipped(self.peer, tenant, &error, frame.len(), nth);
                    continue;
                }
            };
            let resource = self
                .resources
                .get(span.resource.as_ref(), seen, &self.origin);
            let pending = &mut self.pending;
            let same = pending
                .resource
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &resource));
            if resource.guest_claims > 0 {
                claimed += 1;
                if !same {
                    new_claims = new_claims.max(resource.guest_claims);
                }
            }
            if !same || pending.count >= RECORD_MAX_SPANS {
                out.extend(pending.take());
                if !same {
                    pending.resource = Some(resource);
                }
            }
            // A record starts: room for the rest of this read (about its
            // payload's size) at once, not span by span; capped, as a large
            // partial frame behind must not make it large.
            if pending.spans.is_empty() {
                pending
                    .spans
                    .reserve((frame.len() + buf.len()).min(SCRATCH_RESERVE_MAX));
            }
            otlp::encode::put_span(&mut pending.spans, &span);
            pending.count += 1;
            pending.cost += frame.len();
            self.spans += 1;
        };
        out.extend(self.pending.take());
        stats.frames_read(frames, bytes);
        // Every span decoded is in a record in `out` by now.
        let spans = self.spans - spans_before;
        if claimed > 0 {
            stats.guest_claimed(self.peer, self.tenant.as_deref(), new_claims, claimed);
        }
        if spans > 0 {
            stats.spans_decoded(self.decoder.last, spans);
        }
        split
    }

    /// The stream ended: anything left in `buf` is a frame cut short.
    pub fn eof(&mut self, buf: &mut BytesMut) -> Result<(), FrameError> {
        self.codec.decode_eof(buf).map(drop)
    }

    pub(crate) fn shrink(&mut self) {
        if self.pending.spans.capacity() > READ_MIN {
            self.pending.spans = BytesMut::new();
        }
    }

    pub fn format(&self) -> Option<WireFormat> {
        self.decoder.last
    }

    pub fn spans(&self) -> u64 {
        self.spans
    }

    /// Frames skipped as undecodable.
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::HEADER_LEN;
    use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            service_name: "kata-agent".into(),
            extra: Vec::new(),
        })
    }

    /// A stream fed in odd-sized reads comes out as the same spans, in
    /// order, as one read of everything, with garbage frames skipped and
    /// counted.
    #[test]
    fn any_chunking_gives_the_same_records() {
        for format in EmitFormat::ALL {
            let mut stream = Vec::new();
            for (i, f) in bulk_frames(format, 40, 300, 0).iter().enumerate() {
                stream.extend_from_slice(f);
                if i % 10 == 3 {
                    stream.extend_from_slice(&5u64.to_be_bytes());
                    stream.extend_from_slice(b"junk!");
                }
            }
            let run = |chunk: usize| {
                let stats = Stats::default();
                let mut ingest = Ingest::new(Peer::Unix, origin(), 1 << 20);
                let mut rb = ReadBuffer::default();
                let mut out = Vec::new();
                for piece in stream.chunks(chunk) {
                    rb.prepare().extend_from_slice(piece);
                    rb.filled(piece.len());
                    ingest.frames(rb.bytes(), &stats, &mut out).unwrap();
                }
                ingest.eof(rb.bytes()).unwrap();
                let spans: Vec<u8> = out.iter().flat_map(|i| i.record.spans.to_vec()).collect();
                let count: usize = out.iter().map(|i| i.record.count).sum();
                assert!(out.iter().all(|i| i.record.count <= RECORD_MAX_SPANS));
                let snap = stats.snapshot();
                assert_eq!(snap.spans_received, count as u64);
                assert_eq!(snap.decode_errors.total(), ingest.decode_errors());
                (spans, count, ingest.decode_errors())
            };
            let whole = run(stream.len());
            assert_eq!(whole.1, 40);
            assert_eq!(whole.2, 4);
            for chunk in [1, 7, HEADER_LEN, 333, 4096] {
                assert_eq!(run(chunk), whole, "{format} in reads of {chunk}");
            }
        }
    }

    /// A stream picked up anywhere with its place lost (what a restored
    /// connection is after a crash) skips, and counts, exactly the bytes up
    /// to the next whole frame, then reads every frame from there, in both
    /// formats, in any chunking.
    #[test]
    fn a_stream_picked_up_anywhere_finds_the_next_whole_frame() {
        for format in EmitFormat::ALL {
            let frames = bulk_frames(format, 8, 300, 7);
            let stream: Vec<u8> = frames.concat();
            let starts: Vec<usize> = frames
                .iter()
                .scan(0, |at, f| {
                    let s = *at;
                    *at += f.len();
                    Some(s)
                })
                .collect();
            for cut in [
                0,
                1,
                HEADER_LEN,
                HEADER_LEN + 3,
                starts[1],
                starts[1] + 1,
                starts[4] - 1,
            ] {
                let next = starts.iter().position(|&s| s >= cut).unwrap();
                for chunk in [1, 5, 64, stream.len()] {
                    let stats = Stats::default();
                    let mut ingest = Ingest::resume_lost(Peer::Unix, origin(), 1 << 20);
                    let mut rb = ReadBuffer::default();
                    let mut out = Vec::new();
                    for piece in stream[cut..].chunks(chunk) {
                        rb.prepare().extend_from_slice(piece);
                        rb.filled(piece.len());
                        ingest.frames(rb.bytes(), &stats, &mut out).unwrap();
                    }
                    ingest.eof(rb.bytes()).unwrap();
                    let count: usize = out.iter().map(|i| i.record.count).sum();
                    let what = format!("{format}, cut at {cut}, reads of {chunk}");
                    assert_eq!(count, frames.len() - next, "{what}");
                    let snap = stats.snapshot();
                    assert_eq!(snap.bytes_skipped, (starts[next] - cut) as u64, "{what}");
                    assert_eq!(ingest.decode_errors(), 0, "{what}");
                }
            }
        }
    }

    /// Cut anywhere, a stream's unread bytes fed to a resumed ingest give
    /// the same spans as the stream read by one: what a hand-over relies on.
    #[test]
    fn a_stream_handed_over_anywhere_reads_the_same() {
        let frames = bulk_frames(EmitFormat::Json, 6, 200, 0);
        let stream: Vec<u8> = frames.concat();
        let whole = {
            let stats = Stats::default();
            let mut ingest = Ingest::new(Peer::Unix, origin(), 1 << 20);
            let mut out = Vec::new();
            let mut buf = BytesMut::from(&stream[..]);
            ingest.frames(&mut buf, &stats, &mut out).unwrap();
            out.iter()
                .flat_map(|i| i.record.spans.to_vec())
                .collect::<Vec<u8>>()
        };
        for cut in [
            1,
            HEADER_LEN - 1,
            HEADER_LEN,
            HEADER_LEN + 5,
            frames[0].len(),
            stream.len() / 2,
        ] {
            let stats = Stats::default();
            let mut out = Vec::new();
            let mut a = Ingest::new(Peer::Unix, origin(), 1 << 20);
            let mut buf = BytesMut::from(&stream[..cut]);
            a.frames(&mut buf, &stats, &mut out).unwrap();
            let handed = a.unread(&buf);
            let mut b = Ingest::resume(Peer::Unix, origin(), 1 << 20, a.format(), a.spans(), 0);
            let mut buf = BytesMut::from(&handed[..]);
            buf.extend_from_slice(&stream[cut..]);
            b.frames(&mut buf, &stats, &mut out).unwrap();
            b.eof(&mut buf).unwrap();
            let got: Vec<u8> = out.iter().flat_map(|i| i.record.spans.to_vec()).collect();
            assert_eq!(got, whole, "cut at {cut}");
            assert_eq!(b.spans(), 6);
        }
    }

    #[test]
    fn a_stream_cut_mid_frame_is_truncated_and_oversize_ends_it() {
        let stats = Stats::default();
        let mut out = Vec::new();
        let mut ingest = Ingest::new(Peer::Unix, origin(), 64);
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 9, 1, 2][..]);
        ingest.frames(&mut buf, &stats, &mut out).unwrap();
        assert!(matches!(
            ingest.eof(&mut buf),
            Err(FrameError::Truncated { .. })
        ));
        let mut ingest = Ingest::new(Peer::Unix, origin(), 64);
        let mut buf = BytesMut::from(&(1u64 << 40).to_be_bytes()[..]);
        assert!(matches!(
            ingest.frames(&mut buf, &stats, &mut out),
            Err(FrameError::Oversized { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn a_read_buffer_grows_under_load_and_shrinks_when_quiet() {
        let mut rb = ReadBuffer::default();
        let room = rb.prepare().capacity();
        rb.filled(room);
        assert!(!rb.is_quiet());
        let room = rb.prepare().capacity();
        assert!(room >= 2 * READ_MIN);
        rb.bytes().clear();
        rb.filled(10);
        assert!(
            !rb.is_quiet(),
            "a read that finishes a full one says nothing"
        );
        rb.prepare();
        rb.filled(10);
        assert!(rb.is_quiet());
        assert!(rb.prepare().capacity() < room, "given back once drained");
    }

    #[test]
    fn a_paced_tick_of_a_little_over_the_minimum_is_read_at_once() {
        // 5 spans of about 1 KB a tick: 4 KiB, then the rest; from then on
        // one read a tick.
        let tick = [7u8; 5 * 1010];
        let mut rb = ReadBuffer::default();
        let mut reads_per_tick = Vec::new();
        for _ in 0..4 {
            let mut src = &tick[..];
            let mut reads = 0;
            loop {
                rb.prepare();
                let (n, full) = rb.read_from(&mut src).unwrap();
                reads += 1;
                rb.bytes().clear();
                if !full || n == 0 {
                    break;
                }
            }
            reads_per_tick.push(reads);
        }
        assert_eq!(reads_per_tick, [2, 1, 1, 1]);
    }
}
