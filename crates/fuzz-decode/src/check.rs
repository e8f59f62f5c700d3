//! Running one input through the forwarder's code, and the properties that
//! must hold besides "no panic".
//!
//! A payload goes through `wire::Decoder` exactly as a connection does it;
//! a span that decodes goes through everything a connection and the
//! exporters do with it: the `ResourceCache`, the direct protobuf encoder
//! the connection uses (held to the struct path, `otlp::span` + prost, byte
//! for byte), the export request (as the gRPC and HTTP exporters send it),
//! record splitting (as the batcher does it) and OTLP JSON (as
//! `--dump-only` prints it). A stream goes through the forwarder's own
//! ingest stage (`ingest::Ingest` with its `ReadBuffer`), fed in random
//! chunks as a socket delivers them, and is checked against a reference
//! reading of the same bytes: the frames it splits, how the stream ends,
//! and the records it produces against the payload path's.

use std::sync::Arc;

use bytes::Bytes;
use kata_trace_forwarder::addr::Peer;
use kata_trace_forwarder::ingest::{Ingest, ReadBuffer, READ_MAX};
use kata_trace_forwarder::otlp::{self, Origin, ResourceCache, SpanRecord};
use kata_trace_forwarder::stats::Label;
use kata_trace_forwarder::stats::Stats;
use kata_trace_forwarder::wire::{self, AgentSpan, Decoder, ResourceSeen, HEADER_LEN};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::TracesData;
use prost::Message;

use crate::corpus::Corpus;
use crate::rng::Rng;

/// What the connection's decoder has seen before this payload: detection
/// tries the last format that worked first, so each state is its own path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prime {
    Fresh,
    Json,
    Bincode,
}

impl Prime {
    pub const ALL: [Prime; 3] = [Prime::Fresh, Prime::Json, Prime::Bincode];

    pub fn decoder(self, corpus: &Corpus) -> Decoder {
        let mut d = Decoder::new();
        let seed = match self {
            Prime::Fresh => return d,
            Prime::Json => &corpus.prime_json,
            Prime::Bincode => &corpus.prime_bincode,
        };
        d.decode(seed).expect("priming payload decodes");
        d
    }
}

/// Counts of what the cases did, for progress and the final report.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub payload_cases: u64,
    pub stream_cases: u64,
    /// Payloads (from payload cases and stream frames) that decoded.
    pub ok: u64,
    /// Payloads that did not, by `DecodeError::kind()`.
    pub errors: Vec<(&'static str, u64)>,
    pub stream_frames: u64,
    pub stream_clean: u64,
    pub stream_oversized: u64,
    pub stream_trailing: u64,
    /// Streams read again from a place lost (a connection taken back after
    /// a crash), and of those, the ones a whole frame was found in.
    pub lost_streams: u64,
    pub lost_found: u64,
    /// Largest read buffer seen, as a percentage of [`buffer_bound`].
    pub max_buffer_pct: u64,
    /// Largest read buffer seen, in bytes, and the frame size limit then.
    pub max_buffer: (usize, usize),
    /// Largest peak allocation of one case, and that case's input length.
    pub max_case_peak: (usize, usize),
    /// Largest single allocation seen in any case.
    pub max_single_alloc: usize,
}

impl Tally {
    fn error(&mut self, kind: &'static str) {
        match self.errors.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.errors.push((kind, 1)),
        }
    }

    pub fn decoded(&self) -> u64 {
        self.ok + self.errors.iter().map(|(_, n)| n).sum::<u64>()
    }
}

/// Everything a run keeps from case to case: like a long-lived
/// connection, the resource cache sees one span after another, so its
/// comparison against the previous resource is exercised with hostile data
/// on both sides.
pub struct Sink {
    pub origin: Origin,
    pub resources: ResourceCache,
}

impl Default for Sink {
    fn default() -> Self {
        use opentelemetry_proto::tonic::common::v1::any_value::Value::{IntValue, StringValue};
        Sink {
            origin: Origin {
                service_name: "kata-agent".into(),
                ..Default::default()
            }
            .with("kata.sandbox.id", StringValue("fuzz".into()))
            .with("kata.vsock.cid", IntValue(3)),
            resources: ResourceCache::default(),
        }
    }
}

/// Decodes one payload and, if it is a span, converts it; returns the
/// record a connection would queue for it.
pub fn payload(
    input: &[u8],
    decoder: &mut Decoder,
    sink: &mut Sink,
    tally: &mut Tally,
) -> Option<SpanRecord> {
    // The connection's way, from the same decoder state: an unchanged
    // resource is not decoded again. It must agree with a full decode.
    let mut reusing = decoder.clone();
    let reused = reusing.decode_reusing(input, sink.resources.known_bytes());
    match decoder.decode(input) {
        Ok(span) => {
            tally.ok += 1;
            let (reused, seen) = reused.expect("decode_reusing fails where decode does not");
            let mut want = span.clone();
            if seen == ResourceSeen::Same {
                want.resource = None;
            }
            // Compared as text: NaN attributes make `==` useless.
            assert_eq!(
                format!("{reused:?}"),
                format!("{want:?}"),
                "skipping a known resource changed the span"
            );
            Some(convert(&span, seen, sink))
        }
        Err(e) => {
            assert!(
                reused.is_err(),
                "decode_reusing accepts what decode rejects"
            );
            tally.error(e.kind().as_str());
            None
        }
    }
}

/// Converts a decoded span on both paths and holds them to each other.
fn convert(span: &AgentSpan<'_>, seen: ResourceSeen<'_>, sink: &mut Sink) -> SpanRecord {
    let s = otlp::span(span);
    assert_eq!(s.trace_id.len(), 16);
    assert_ne!(
        s.trace_id, [0; 16],
        "decoder let an all-zero trace id through"
    );
    assert_eq!(s.span_id.len(), 8);
    assert_ne!(s.span_id, [0; 8], "decoder let an all-zero span id through");
    assert!(s.parent_span_id.is_empty() || s.parent_span_id.len() == 8);
    assert_eq!(s.attributes.len(), span.attributes.map.len());
    assert_eq!(s.events.len(), span.events.items().len());
    assert_eq!(s.links.len(), span.links.items().len());

    // The cache must return what a fresh conversion would (compared as
    // encoded bytes: NaN attributes make `==` useless).
    let fresh = otlp::resource(span.resource.as_ref(), &sink.origin);
    let cached = sink
        .resources
        .get(span.resource.as_ref(), seen, &sink.origin);
    assert_eq!(
        cached.bytes(),
        fresh.encode_to_vec().as_slice(),
        "ResourceCache returned a resource that differs from a fresh conversion"
    );

    let direct = SpanRecord::encode(Arc::clone(&cached), span);
    let structs = SpanRecord::from_span(cached, &s);
    assert_eq!(direct.count, 1);
    if direct.spans != structs.spans {
        panic!(
            "direct encoder and prost differ:\n direct {}\n prost  {}",
            crate::hex(&direct.spans),
            crate::hex(&structs.spans)
        );
    }
    direct
}

/// What the exporters make of records holding `want` spans in all: the
/// request body, which must decode to those spans and equal the struct
/// path's request; the `--dump-only` JSON; and every way the batcher can
/// split a record.
pub fn export(records: &[SpanRecord], want: usize, rng: &mut Rng) {
    let body = otlp::encode_request(records).to_bytes();
    let request = ExportTraceServiceRequest::decode(body.clone())
        .expect("the export request the forwarder sends decodes");
    let got: usize = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    assert_eq!(got, want, "spans in the export request");
    let grouped = otlp::group_by_resource(records.to_vec()).expect("records decode");
    let structs = ExportTraceServiceRequest {
        resource_spans: grouped,
    };
    assert_eq!(
        structs.encode_to_vec(),
        body,
        "encoded request differs from the struct path's"
    );

    let dump = TracesData {
        resource_spans: structs.resource_spans,
    };
    let json = serde_json::to_vec(&dump).expect("OTLP JSON of decoded spans serialises");
    // Syntax check without building a tree: `--dump-only` lines must be JSON.
    serde_json::from_slice::<serde::de::IgnoredAny>(&json).expect("OTLP JSON output parses");

    for rec in records.iter().filter(|r| r.count > 1) {
        let n = rng.range(1, rec.count - 1);
        let mut tail = rec.clone();
        let head = tail.split_to(n);
        assert_eq!((head.count, tail.count), (n, rec.count - n));
        assert_eq!([&head.spans[..], &tail.spans[..]].concat(), &rec.spans[..]);
        assert_eq!(head.decode_spans().expect("head decodes").len(), n);
        assert_eq!(
            tail.decode_spans().expect("tail decodes").len(),
            rec.count - n
        );
    }
}

/// One stream case: the bytes an agent wrote, the `--max-frame-size` in
/// force, and how the socket chops the bytes into reads.
#[derive(Debug, Clone)]
pub struct StreamCase {
    pub bytes: Vec<u8>,
    pub max_frame: usize,
    pub chunk_seed: u64,
}

/// How a stream ends, as the reference reading predicts and the codec must
/// report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// EOF at a frame boundary.
    Clean,
    /// A header claims more than the maximum: the connection is closed
    /// before anything is allocated for it.
    Oversized { claimed: u64 },
    /// EOF inside a header or a frame's data.
    Trailing,
}

/// The frames and the ending the agent's bytes mean, read the simple way.
fn reference(bytes: &[u8], max_frame: usize) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    loop {
        if rest.is_empty() {
            return (frames, End::Clean);
        }
        if rest.len() < HEADER_LEN {
            return (frames, End::Trailing);
        }
        let claimed = u64::from_be_bytes(rest[..HEADER_LEN].try_into().unwrap());
        if claimed > max_frame as u64 {
            return (frames, End::Oversized { claimed });
        }
        let data = &rest[HEADER_LEN..];
        let n = claimed as usize;
        if data.len() < n {
            // Cut anywhere after a header, even before any of its data.
            return (frames, End::Trailing);
        }
        frames.push(&data[..n]);
        rest = &data[n..];
    }
}

/// Memory the read buffer may hold: the codec reserves at most one frame
/// plus its header and the loop one read, and `BytesMut`'s amortised growth
/// can double that twice over (see the bytes crate's `reserve_inner`). A
/// claimed length that was honoured would blow far past.
pub fn buffer_bound(max_frame: usize) -> usize {
    4 * (max_frame + HEADER_LEN + READ_MAX)
}

/// A socket read's size: often tiny, sometimes whatever fits.
fn read_len(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0 => 1,
        1..=3 => rng.range(1, 16),
        4..=7 => rng.range(1, 4096),
        _ => usize::MAX,
    }
}

/// Feeds a stream through the forwarder's ingest stage as a connection
/// does (split and ingest every whole frame, make room, read, end at EOF),
/// and checks its frames and ending against [`reference`], each frame
/// through [`payload`], its records against the payload path's, and the
/// read buffer against [`buffer_bound`].
pub fn stream(case: &StreamCase, corpus: &Corpus, sink: &mut Sink, tally: &mut Tally) {
    let (want_frames, want_end) = reference(&case.bytes, case.max_frame);
    let mut rng = Rng::new(case.chunk_seed);
    let stats = Stats::default();
    let mut ingest = Ingest::new(Peer::Unix, Arc::new(sink.origin.clone()), case.max_frame);
    let mut input = ReadBuffer::default();
    let mut ingested = Vec::new();
    // The payload path, frame by frame, as the reference for the records.
    let mut decoder = Prime::Fresh.decoder(corpus);
    let mut records: Vec<SpanRecord> = Vec::new();
    let mut spans = 0;
    let mut got = 0usize;
    let mut unread = &case.bytes[..];
    let bound = buffer_bound(case.max_frame);
    let end = loop {
        let split = ingest.frames_inspected(input.bytes(), &stats, &mut ingested, |frame| {
            assert!(frame.len() <= case.max_frame, "frame over the maximum");
            assert!(got < want_frames.len(), "ingest split an extra frame");
            assert_eq!(frame, want_frames[got], "frame {got} differs");
            got += 1;
            tally.stream_frames += 1;
            if let Some(rec) = payload(frame, &mut decoder, sink, tally) {
                spans += 1;
                add_record(&mut records, rec);
            }
        });
        if let Err(e) = split {
            break classify(&e);
        }
        let buf = input.prepare();
        let spare = buf.capacity() - buf.len();
        let n = read_len(&mut rng).min(spare).min(unread.len());
        buf.extend_from_slice(&unread[..n]);
        unread = &unread[n..];
        let cap = buf.capacity();
        assert!(
            cap <= bound,
            "read buffer grew to {cap} bytes for max frame size {}",
            case.max_frame
        );
        tally.max_buffer_pct = tally.max_buffer_pct.max(cap as u64 * 100 / bound as u64);
        if cap > tally.max_buffer.0 {
            tally.max_buffer = (cap, case.max_frame);
        }
        if n == 0 {
            // A frame that only decode_eof found would be lost here, and
            // counted missing against the reference below.
            break match ingest.eof(input.bytes()) {
                Ok(()) => End::Clean,
                Err(e) => classify(&e),
            };
        }
        input.filled(n);
    };
    assert_eq!(got, want_frames.len(), "ingest lost frames");
    assert_eq!(end, want_end, "stream ending");
    match end {
        End::Clean => tally.stream_clean += 1,
        End::Oversized { .. } => tally.stream_oversized += 1,
        End::Trailing => tally.stream_trailing += 1,
    }
    // What ingest queued is what the payload path made of the same frames.
    let queued: Vec<SpanRecord> = ingested.into_iter().map(|i| i.record).collect();
    let count: usize = queued.iter().map(|r| r.count).sum();
    assert_eq!(count, spans, "spans ingested");
    assert_eq!(ingest.spans(), spans as u64);
    assert_eq!(stats.snapshot().spans_received, spans as u64);
    let flat = |rs: &[SpanRecord]| {
        rs.iter()
            .flat_map(|r| r.spans.to_vec())
            .collect::<Vec<u8>>()
    };
    assert_eq!(
        flat(&queued),
        flat(&records),
        "ingest's encoded spans differ"
    );
    for r in &queued {
        assert!(r.count <= kata_trace_forwarder::ingest::RECORD_MAX_SPANS);
    }
    if !queued.is_empty() {
        export(&queued, spans, &mut rng);
    }
}

/// Reads the stream again from `cut` on as a connection whose place was
/// lost (taken back from systemd's store after a crash): what is skipped is
/// counted, and from where it stopped skipping, the frames are exactly the
/// simple reading's of the bytes from there, in any chunking; the read
/// buffer stays within [`buffer_bound`].
pub fn lost_stream(case: &StreamCase, cut: usize, sink: &mut Sink, tally: &mut Tally) {
    let bytes = case.bytes.get(cut..).unwrap_or_default();
    let mut rng = Rng::new(case.chunk_seed ^ 0x5eed);
    let stats = Stats::default();
    let mut ingest = Ingest::resume_lost(Peer::Unix, Arc::new(sink.origin.clone()), case.max_frame);
    let mut input = ReadBuffer::default();
    let mut ingested = Vec::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut unread = bytes;
    let bound = buffer_bound(case.max_frame);
    tally.lost_streams += 1;
    loop {
        let split = ingest.frames_inspected(input.bytes(), &stats, &mut ingested, |f| {
            frames.push(f.to_vec());
        });
        if split.is_err() {
            break;
        }
        let buf = input.prepare();
        let spare = buf.capacity() - buf.len();
        let n = read_len(&mut rng).min(spare).min(unread.len());
        buf.extend_from_slice(&unread[..n]);
        unread = &unread[n..];
        assert!(
            buf.capacity() <= bound,
            "read buffer over its bound when lost"
        );
        if n == 0 {
            let _ = ingest.eof(input.bytes());
            break;
        }
        input.filled(n);
    }
    let skipped = stats.snapshot().bytes_skipped as usize;
    assert!(skipped <= bytes.len(), "skipped more than there was");
    if frames.is_empty() {
        return;
    }
    tally.lost_found += 1;
    let (want, _) = reference(&bytes[skipped..], case.max_frame);
    let got: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    assert_eq!(
        got,
        want[..got.len().min(want.len())],
        "frames after resynchronising"
    );
    assert!(
        kata_trace_forwarder::wire::Decoder::new()
            .decode(got[0])
            .is_ok(),
        "the first frame found decodes"
    );
}

/// Appends a one-span record the way a connection batches a read's spans:
/// onto the last record while the resource is the same one.
fn add_record(records: &mut Vec<SpanRecord>, rec: SpanRecord) {
    match records.last_mut() {
        Some(last) if Arc::ptr_eq(&last.resource, &rec.resource) => {
            last.spans = Bytes::from([&last.spans[..], &rec.spans[..]].concat());
            last.count += 1;
        }
        _ => records.push(rec),
    }
}

/// The ending an error means. The forwarder's decoder reports an oversized
/// frame's claimed length, read from the header it left in the buffer.
fn classify(e: &wire::FrameError) -> End {
    match e {
        wire::FrameError::Oversized { claimed, .. } => End::Oversized { claimed: *claimed },
        wire::FrameError::Truncated { .. } => End::Trailing,
        wire::FrameError::Read(err) => panic!("in-memory stream cannot fail to read: {err}"),
    }
}
