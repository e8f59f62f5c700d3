//! The seeds every case starts from: real agent frames from the real SDKs
//! (both wire formats, several traces, spans of several sizes) plus a few
//! hand-written payloads that sit on the edges of the model.
//!
//! Real frames carry random span ids and the current time, so two builds
//! differ slightly: a run saves the corpus it used ([`Corpus::save`]) for
//! its cases to be rerun exactly, and a failure is also reported with its
//! exact input, which `--replay` takes back.

use std::io;
use std::path::Path;

use kata_agent_emitter::{bulk_frames, scenario, RemoteParent, ScenarioOptions, WireFormat};
use kata_trace_forwarder::wire::{Decoder, HEADER_LEN};

/// Where a seed payload came from, which decides the mutations it gets most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    Bincode,
    /// Hand-written: empty, garbage, near-misses.
    Edge,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub payload: Vec<u8>,
    pub kind: Kind,
    /// The payload is a good span as it stands: unmutated, it must decode.
    pub valid: bool,
}

#[derive(Debug, Clone)]
pub struct Corpus {
    pub entries: Vec<Entry>,
    /// Small real payloads used to put a `Decoder` into the state of a
    /// connection that has already seen JSON or bincode.
    pub prime_json: Vec<u8>,
    pub prime_bincode: Vec<u8>,
}

impl Corpus {
    pub fn pick_other(&self, rng: &mut crate::rng::Rng) -> &[u8] {
        &rng.pick(&self.entries).payload
    }
}

/// Every real SDK frame first, then the hand-written edges.
pub fn build() -> Corpus {
    let mut entries = Vec::new();
    let remote = |trace_id, span_id| Some(RemoteParent { trace_id, span_id });
    // (seq, forced trace id, remote parent): first bytes of the bincode
    // payload vary with the trace id, including a `{` (0x7B) low byte that
    // makes bincode look like JSON.
    let traces: [(u64, Option<u128>, Option<RemoteParent>); 5] = [
        (0, None, None),
        (1, Some((0xabcd << 64) | 0x7B), None),
        (7, None, remote(u128::MAX - 1, 0x0102_0304_0506_0708)),
        (42, Some(1), None),
        (987_654_321, Some(u128::MAX), None),
    ];
    for format in WireFormat::ALL {
        let kind = match format {
            WireFormat::Json => Kind::Json,
            WireFormat::Bincode => Kind::Bincode,
        };
        for (seq, trace_id, parent) in traces {
            let sc = scenario(&ScenarioOptions {
                format,
                trace_id,
                parent,
                seq,
                ..Default::default()
            });
            for f in sc.frames {
                entries.push(real(f, kind));
            }
        }
        // Bulk spans: the bare skeleton (0 pads to the minimum) up to 64 KiB.
        for (i, size) in [0, 1024, 4096, 64 * 1024].into_iter().enumerate() {
            for f in bulk_frames(format, 2, size, i as u64) {
                entries.push(real(f, kind));
            }
        }
    }
    entries.extend(edges());
    Corpus::from_entries(entries)
}

impl Corpus {
    /// Picks the priming payloads and checks that the seeds meant to be
    /// valid do decode: a fuzz run on a corpus the decoder rejects
    /// wholesale would test nothing past the first error.
    fn from_entries(entries: Vec<Entry>) -> Corpus {
        let smallest = |kind: Kind| {
            entries
                .iter()
                .filter(|e| e.kind == kind && e.valid)
                .min_by_key(|e| e.payload.len())
                .map(|e| e.payload.clone())
                .expect("the corpus has valid frames of both formats")
        };
        let prime_json = smallest(Kind::Json);
        let prime_bincode = smallest(Kind::Bincode);
        let mut decoder = Decoder::new();
        for (i, e) in entries.iter().enumerate() {
            if e.valid {
                if let Err(err) = decoder.decode(&e.payload) {
                    panic!("corpus entry {i} ({:?}) does not decode: {err}", e.kind);
                }
            }
        }
        Corpus {
            entries,
            prime_json,
            prime_bincode,
        }
    }

    /// Writes the corpus to a file, so that a failing case can be rerun
    /// from its seed and number on exactly the bytes it started from.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut out = Vec::from(MAGIC);
        for e in &self.entries {
            out.push(match e.kind {
                Kind::Json => 0,
                Kind::Bincode => 1,
                Kind::Edge => 2,
            });
            out.push(u8::from(e.valid));
            out.extend_from_slice(&(e.payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&e.payload);
        }
        std::fs::write(path, out)
    }

    /// Reads a corpus written by [`Corpus::save`].
    pub fn load(path: &Path) -> io::Result<Corpus> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let data = std::fs::read(path)?;
        let mut rest = data
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a corpus file"))?;
        let mut entries = Vec::new();
        while !rest.is_empty() {
            if rest.len() < 10 {
                return Err(bad("truncated entry header"));
            }
            let kind = match rest[0] {
                0 => Kind::Json,
                1 => Kind::Bincode,
                2 => Kind::Edge,
                _ => return Err(bad("unknown entry kind")),
            };
            let valid = rest[1] != 0;
            let len = u64::from_le_bytes(rest[2..10].try_into().unwrap());
            rest = &rest[10..];
            let len = usize::try_from(len)
                .ok()
                .filter(|&n| n <= rest.len())
                .ok_or_else(|| bad("truncated entry"))?;
            entries.push(Entry {
                payload: rest[..len].to_vec(),
                kind,
                valid,
            });
            rest = &rest[len..];
        }
        Ok(Corpus::from_entries(entries))
    }
}

const MAGIC: &[u8] = b"kata-fuzz-decode corpus 1\n";

fn real(frame: Vec<u8>, kind: Kind) -> Entry {
    Entry {
        payload: frame[HEADER_LEN..].to_vec(),
        kind,
        valid: true,
    }
}

/// A JSON span using every part of the model at its limits: maximal ids and
/// times, every value and array type, NaN as `null`, `-0.0`, subnormals,
/// escapes that decode to non-ASCII, events, links, a resource.
const EDGE_JSON: &str = concat!(
    r#"{"span_context":{"trace_id":340282366920938463463374607431768211455,"span_id":18446744073709551615,"#,
    r#""trace_flags":255,"is_remote":true,"trace_state":[["k","v"],["e\u0301","\u00e9"]]},"#,
    r#""parent_span_id":18446744073709551615,"span_kind":"Consumer","name":"\u00e9\ud83d\ude00\n\"\\","#,
    r#""start_time":{"secs_since_epoch":18446744073709551615,"nanos_since_epoch":4294967295},"#,
    r#""end_time":{"secs_since_epoch":0,"nanos_since_epoch":0},"#,
    r#""attributes":{"map":{"b":{"Bool":true},"i":{"I64":-9223372036854775808},"f":{"F64":-1.5e308},"#,
    r#""n":{"F64":null},"s":{"String":""},"ab":{"Array":{"Bool":[true,false]}},"#,
    r#""ai":{"Array":{"I64":[9223372036854775807]}},"af":{"Array":{"F64":[null,0.0,-0.0,5e-324]}},"#,
    r#""as":{"Array":{"String":["","\u0000"]}}},"evict_list":["b","i"],"max_len":4294967295,"dropped_count":4294967295},"#,
    r#""events":{"queue":[{"name":"e","timestamp":{"secs_since_epoch":1,"nanos_since_epoch":999999999},"#,
    r#""attributes":[{"key":"k","value":{"I64":1}}],"dropped_attributes_count":1}],"max_len":1,"dropped_count":0},"#,
    r#""links":{"queue":[{"span_context":{"trace_id":1,"span_id":1,"trace_flags":0,"is_remote":false,"trace_state":null},"#,
    r#""attributes":[],"dropped_attributes_count":0}],"max_len":1,"dropped_count":0},"#,
    r#""status_code":"Ok","status_message":"","#,
    r#""resource":{"attrs":{"service.name":{"String":"s"},"x":{"F64":null}}}}"#,
);

fn edges() -> Vec<Entry> {
    let edge = |payload: Vec<u8>, valid| Entry {
        payload,
        kind: Kind::Edge,
        valid,
    };
    // 126 zero bytes are exactly one bincode SpanData (every length zero,
    // every `Option` None); with non-zero ids it is a valid, minimal span.
    let mut min_bincode = vec![0u8; 126];
    min_bincode[0] = 1; // trace id, low byte
    min_bincode[16] = 1; // span id, low byte
    let mut out = vec![
        edge(EDGE_JSON.as_bytes().to_vec(), true),
        edge(format!(" \n\t{EDGE_JSON}\n").into_bytes(), true),
        edge(min_bincode, true),
        edge(vec![0u8; 126], false),
        edge(Vec::new(), false),
        edge(b"{".to_vec(), false),
        edge(b"{}".to_vec(), false),
        edge(b"null".to_vec(), false),
        edge(b"[]".to_vec(), false),
        edge(b"\xef\xbb\xbf{}".to_vec(), false),
        edge(br#"{"span_context":5}"#.to_vec(), false),
        edge(vec![0xff; 64], false),
    ];
    // The edge span minus its tail: every prefix is a different EOF error.
    out.push(edge(
        EDGE_JSON.as_bytes()[..EDGE_JSON.len() / 2].to_vec(),
        false,
    ));
    out
}
