//! The agent's wire protocol: framing and the span model.
//!
//! The Kata agent opens one stream to the host (VSOCK CID 2, port 10240 by
//! default; with hybrid VSOCK the VMM turns it into a Unix-socket connection
//! to `<socket-path>_<port>`) and keeps it for its whole life. On it, it
//! writes one frame per finished span: a big-endian `u64` length, then the
//! payload.
//!
//! The payload is the serde serialisation of the OpenTelemetry Rust SDK's
//! `SpanData`, in one of two encodings depending on the Kata release:
//!
//! | Kata release  | SDK crate              | payload encoding                       |
//! |---------------|------------------------|----------------------------------------|
//! | 2.2 – 3.28    | `opentelemetry` 0.14   | `bincode` 1.3, default options          |
//! | 3.29 and later| `opentelemetry` 0.17   | `serde_json`                            |
//!
//! Both SDK versions share one serde layout ([`model`]). A JSON payload
//! starts with `{`; a bincode one with the trace id's low byte, `{` for one
//! trace in 256. So: JSON if it looks like JSON and parses, else bincode,
//! the connection remembering which worked ([`Decoder`]).

mod bin;
mod json;
pub mod model;

use bincode::Options;
use bytes::BytesMut;
use std::io;
use tokio_util::codec::{LengthDelimitedCodec, LengthDelimitedCodecError};

pub use crate::stats::DecodeErrorKind;
pub use model::AgentSpan;

pub const HEADER_LEN: usize = 8;

pub fn frame_codec(max_frame_size: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(HEADER_LEN)
        .big_endian()
        .max_frame_length(max_frame_size)
        .new_codec()
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {claimed} bytes exceeds --max-frame-size {max}")]
    Oversized { claimed: u64, max: usize },
    #[error("stream ended inside a frame ({buffered} bytes left unread)")]
    Truncated { buffered: usize },
    #[error("reading from agent: {0}")]
    Read(#[from] io::Error),
}

/// The frame codec with errors that say what happened.
pub(crate) struct FrameDecoder {
    pub(crate) inner: LengthDelimitedCodec,
    /// The codec consumed a header and waits for its payload: an end of
    /// stream now is a cut frame even with nothing buffered.
    pub(crate) in_frame: bool,
    /// That header, for [`unread`](Self::unread).
    header: [u8; HEADER_LEN],
}

impl FrameDecoder {
    pub(crate) fn new(max_frame_size: usize) -> Self {
        Self {
            inner: frame_codec(max_frame_size),
            in_frame: false,
            header: [0; HEADER_LEN],
        }
    }

    /// The bytes of the frame being read, as sent: the header the codec
    /// consumed, if any, then `rest` (the buffer it left).
    pub(crate) fn unread(&self, rest: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + rest.len());
        if self.in_frame {
            out.extend_from_slice(&self.header);
        }
        out.extend_from_slice(rest);
        out
    }
}

impl tokio_util::codec::Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let before = src.len();
        let header: Option<[u8; HEADER_LEN]> = if self.in_frame {
            None
        } else {
            src.get(..HEADER_LEN).and_then(|h| h.try_into().ok())
        };
        let res = self.inner.decode(src);
        match &res {
            Ok(Some(_)) => self.in_frame = false,
            Ok(None) if src.len() < before => {
                self.in_frame = true;
                if let Some(h) = header {
                    self.header = h;
                }
            }
            _ => {}
        }
        res.map_err(|e| match e.get_ref() {
            // Rejected at the header (never mid-frame): `header` holds the claim.
            Some(inner) if inner.is::<LengthDelimitedCodecError>() => FrameError::Oversized {
                claimed: header.map_or(0, u64::from_be_bytes),
                max: self.inner.max_frame_length(),
            },
            _ => FrameError::Read(e),
        })
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && !self.in_frame => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

/// The hand-over state carries it by variant index (bincode): the order is part of that format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WireFormat {
    Json,
    Bincode,
}

impl WireFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WireFormat::Json => "json",
            WireFormat::Bincode => "bincode",
        }
    }
}

/// The frame is skipped; the connection carries on (the framing holds).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is empty")]
    Empty,
    #[error("decoding JSON span payload: {0}")]
    Json(#[source] serde_json::Error),
    #[error("decoding bincode span payload: {0}")]
    Bincode(#[source] bincode::Error),
    #[error("span has an invalid (all-zero) trace or span id")]
    InvalidIds,
    #[error("decoding span payload failed as JSON ({json}) and as bincode ({bincode})")]
    Neither {
        json: serde_json::Error,
        bincode: bincode::Error,
    },
}

impl DecodeError {
    pub fn kind(&self) -> DecodeErrorKind {
        match self {
            DecodeError::Empty => DecodeErrorKind::Empty,
            DecodeError::Json(_) => DecodeErrorKind::Json,
            DecodeError::Bincode(_) => DecodeErrorKind::Bincode,
            DecodeError::InvalidIds => DecodeErrorKind::InvalidIds,
            DecodeError::Neither { .. } => DecodeErrorKind::UnknownFormat,
        }
    }
}

/// With `serde_json` only: the reference the fast path is held to.
pub fn decode_json_serde(payload: &[u8]) -> Result<AgentSpan<'_>, DecodeError> {
    serde_json::from_slice(payload).map_err(DecodeError::Json)
}

/// With serde only: the reference [`bin`] is held to, and its errors. The
/// byte limit bounds every length prefix inside by the payload itself.
pub fn decode_bincode_serde(payload: &[u8]) -> Result<AgentSpan<'_>, DecodeError> {
    bincode::options()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(payload.len() as u64)
        .deserialize(payload)
        .map_err(DecodeError::Bincode)
}

/// What a decode saw of the span's resource: the payload's tail in both
/// formats, the same for every span of an agent, so a connection keeping
/// the last one's bytes ([`Decoder::decode_reusing`]) skips decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceSeen<'a> {
    /// The known bytes: `span.resource` is `None`, the previous one applies.
    Same,
    /// Decoded into `span.resource`, from these bytes (empty when the serde
    /// path decoded it).
    New(&'a [u8]),
}

impl ResourceSeen<'_> {
    pub fn remember(self, known: &mut Vec<u8>) {
        if let ResourceSeen::New(raw) = self {
            if raw != known.as_slice() {
                known.clear();
                known.extend_from_slice(raw);
            }
        }
    }
}

/// Per-connection format detection: an agent never changes format, but
/// detection stays per frame, so a wrong guess costs a parse, not a span.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    /// The format of the last frame decoded (or handed over).
    pub(crate) last: Option<WireFormat>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a usable span: collectors reject all-zero ids (what zero
    /// bytes decode to in bincode), so those are an error here, not a lost
    /// batch later.
    pub fn decode<'a>(&mut self, payload: &'a [u8]) -> Result<AgentSpan<'a>, DecodeError> {
        self.decode_reusing(payload, &[]).map(|(span, _)| span)
    }

    /// As [`decode`](Self::decode), but a resource whose bytes are `known`
    /// (the previous span's [`ResourceSeen::New`]) is not decoded.
    pub fn decode_reusing<'a>(
        &mut self,
        payload: &'a [u8],
        known: &[u8],
    ) -> Result<(AgentSpan<'a>, ResourceSeen<'a>), DecodeError> {
        let (mut span, seen) = self.decode_any(payload, known)?;
        if span.span_context.trace_id == 0 || span.span_context.span_id == 0 {
            return Err(DecodeError::InvalidIds);
        }
        span.dedupe_keys();
        Ok((span, seen))
    }

    fn decode_any<'a>(
        &mut self,
        payload: &'a [u8],
        known: &[u8],
    ) -> Result<(AgentSpan<'a>, ResourceSeen<'a>), DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        // `known` is in the last format: in the other it means something else.
        let last = self.last;
        let mut decode = |f: WireFormat| {
            let known = if last == Some(f) { known } else { &[][..] };
            decode_as(f, payload, known).inspect(|_| self.last = Some(f))
        };
        let json_like = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if !json_like {
            return decode(WireFormat::Bincode);
        }
        // Ambiguous first byte: try the format this connection used last.
        let order = match last {
            Some(WireFormat::Bincode) => [WireFormat::Bincode, WireFormat::Json],
            _ => [WireFormat::Json, WireFormat::Bincode],
        };
        let first = match decode(order[0]) {
            Err(e) => e,
            decoded => return decoded,
        };
        let second = match decode(order[1]) {
            Err(e) => e,
            decoded => return decoded,
        };
        Err(match (first, second) {
            (DecodeError::Json(json), DecodeError::Bincode(bincode))
            | (DecodeError::Bincode(bincode), DecodeError::Json(json)) => {
                // Report the error of the format the payload most likely is.
                if last == Some(WireFormat::Bincode) {
                    DecodeError::Bincode(bincode)
                } else if json.is_syntax() || json.is_eof() {
                    DecodeError::Neither { json, bincode }
                } else {
                    DecodeError::Json(json)
                }
            }
            (e, _) => e,
        })
    }
}

fn decode_as<'a>(
    format: WireFormat,
    payload: &'a [u8],
    known: &[u8],
) -> Result<(AgentSpan<'a>, ResourceSeen<'a>), DecodeError> {
    // The fast path, or serde when it gives up, whose verdict stands.
    let (fast, serde): (_, fn(&'a [u8]) -> _) = match format {
        WireFormat::Json => (json::decode_reusing(payload, known), decode_json_serde),
        WireFormat::Bincode => (bin::decode_reusing(payload, known), decode_bincode_serde),
    };
    match fast {
        Some(decoded) => Ok(decoded),
        None => serde(payload).map(|span| (span, ResourceSeen::New(&[]))),
    }
}

/// Tests' shorthand: the fast path ([`json`]), else `serde_json`.
#[cfg(test)]
pub(crate) fn decode_json(payload: &[u8]) -> Result<AgentSpan<'_>, DecodeError> {
    decode_as(WireFormat::Json, payload, &[]).map(|(span, _)| span)
}

/// Whether two decoded spans are the same; Debug output compares NaN equal
/// to itself, unlike `==`.
#[cfg(test)]
pub(crate) fn same_span(a: &AgentSpan<'_>, b: &AgentSpan<'_>) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Real agent payloads (frame headers stripped) for the tests of every
/// decoder and encoder: the scenario trace with and without a remote
/// parent, plus bulk spans, all from the real SDK of `format`.
#[cfg(test)]
pub(crate) fn real_test_payloads(format: kata_agent_emitter::WireFormat) -> Vec<Vec<u8>> {
    use kata_agent_emitter::{bulk_frames, scenario, RemoteParent, ScenarioOptions};
    let mut out = Vec::new();
    for parent in [
        None,
        Some(RemoteParent {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
        }),
    ] {
        let sc = scenario(&ScenarioOptions {
            format,
            parent,
            ..Default::default()
        });
        out.extend(
            sc.frames
                .iter()
                .filter_map(|f| f.get(HEADER_LEN..))
                .map(<[u8]>::to_vec),
        );
    }
    out.extend(
        bulk_frames(format, 8, 1000, 3)
            .iter()
            .filter_map(|f| f.get(HEADER_LEN..))
            .map(<[u8]>::to_vec),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_agent_emitter::{scenario, ScenarioOptions, WireFormat as EmitFormat};

    /// Skipping a known resource changes nothing else about a span, and
    /// happens only when the payload really ends in those bytes.
    #[test]
    fn reusing_a_known_resource_changes_nothing_else() {
        for format in [EmitFormat::Json, EmitFormat::Bincode] {
            let mut d = Decoder::new();
            let mut known: Vec<u8> = Vec::new();
            let mut same = 0;
            for p in real_test_payloads(format) {
                let full = Decoder::new().decode(&p).unwrap();
                let (span, seen) = d.decode_reusing(&p, &known).unwrap();
                match seen {
                    ResourceSeen::Same => {
                        same += 1;
                        assert!(p.ends_with(&known));
                        let mut want = full.clone();
                        want.resource = None;
                        assert_eq!(span, want);
                    }
                    ResourceSeen::New(raw) => {
                        assert!(!raw.is_empty() && p.ends_with(raw));
                        assert_eq!(span, full);
                        known = raw.to_vec();
                    }
                }
            }
            assert!(same > 0, "{format:?}: an agent repeats its resource");
        }
        // Bytes known from one format are never taken for the other's.
        let json = &payloads(EmitFormat::Json)[0];
        let mut d = Decoder::new();
        let (_, seen) = d.decode_reusing(json, &[]).unwrap();
        let ResourceSeen::New(raw) = seen else {
            panic!("first span's resource is new");
        };
        let known = raw.to_vec();
        let bincode = &payloads(EmitFormat::Bincode)[0];
        let (span, seen) = d.decode_reusing(bincode, &known).unwrap();
        assert!(matches!(seen, ResourceSeen::New(_)));
        assert_eq!(span, Decoder::new().decode(bincode).unwrap());
    }

    fn payloads(format: EmitFormat) -> Vec<Vec<u8>> {
        scenario(&ScenarioOptions {
            format,
            ..Default::default()
        })
        .frames
        .into_iter()
        .map(|f| f[HEADER_LEN..].to_vec())
        .collect()
    }

    #[test]
    fn decodes_every_real_frame_in_both_formats() {
        for (format, want) in [
            (EmitFormat::Json, WireFormat::Json),
            (EmitFormat::Bincode, WireFormat::Bincode),
        ] {
            let mut d = Decoder::new();
            for p in payloads(format) {
                if let Err(e) = d.decode(&p) {
                    panic!("{format:?}: {e}");
                }
                assert_eq!(d.last, Some(want));
            }
        }
    }

    #[test]
    fn bincode_whose_first_byte_is_a_brace_still_decodes() {
        // The trace id is written little-endian first, so a low byte of
        // 0x7B makes a bincode payload start with `{`.
        let sc = scenario(&ScenarioOptions {
            format: EmitFormat::Bincode,
            trace_id: Some((0xabcd_u128 << 64) | 0x7B),
            ..Default::default()
        });
        let mut d = Decoder::new();
        for f in &sc.frames {
            let p = &f[HEADER_LEN..];
            assert_eq!(p[0], b'{');
            let span = d.decode(p).expect("decodes as bincode");
            assert_eq!(span.span_context.trace_id, (0xabcd_u128 << 64) | 0x7B);
            assert_eq!(d.last, Some(WireFormat::Bincode));
        }
    }

    #[test]
    fn json_ids_beyond_f64_precision_are_exact() {
        let trace_id: u128 = (1 << 127) + 12345678901234567891;
        let span_id: u64 = (1 << 63) + 987654321;
        let json = format!(
            r#"{{"span_context":{{"trace_id":{trace_id},"span_id":{span_id},"trace_flags":1,"is_remote":false,"trace_state":null}},
            "parent_span_id":0,"span_kind":"Server","name":"n","start_time":{{"secs_since_epoch":1,"nanos_since_epoch":2}},
            "end_time":{{"secs_since_epoch":3,"nanos_since_epoch":4}},
            "attributes":{{"map":{{"nan":{{"F64":null}}}},"evict_list":["nan"],"max_len":128,"dropped_count":0}},
            "events":{{"queue":null,"max_len":128,"dropped_count":0}},"links":{{"queue":null,"max_len":128,"dropped_count":0}},
            "status_code":"Unset","status_message":"","resource":null}}"#
        );
        let span = decode_json(json.as_bytes()).unwrap();
        assert_eq!(span.span_context.trace_id, trace_id);
        assert_eq!(span.span_context.span_id, span_id);
        assert_eq!(span.end_time.unix_nanos(), 3_000_000_004);
        // serde_json writes NaN as null; the span is kept, the value is NaN.
        match &span.attributes.map[0].value {
            model::Value::F64(f) => assert!(f.0.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    /// A hand-made JSON span in the agent's compact layout (so the fast
    /// path reads it) with `map` as its attributes and `event` as its one
    /// event's attribute list.
    fn json_span_with(map: &str, event: &str) -> String {
        format!(
            concat!(
                r#"{{"span_context":{{"trace_id":7,"span_id":8,"trace_flags":1,"is_remote":false,"trace_state":null}},"#,
                r#""parent_span_id":0,"span_kind":"Server","name":"n","start_time":{{"secs_since_epoch":1,"nanos_since_epoch":2}},"#,
                r#""end_time":{{"secs_since_epoch":3,"nanos_since_epoch":4}},"#,
                r#""attributes":{{"map":{{{map}}},"evict_list":[],"max_len":128,"dropped_count":0}},"#,
                r#""events":{{"queue":[{{"name":"e","timestamp":{{"secs_since_epoch":1,"nanos_since_epoch":2}},"attributes":[{event}],"dropped_attributes_count":0}}],"max_len":128,"dropped_count":0}},"#,
                r#""links":{{"queue":null,"max_len":128,"dropped_count":0}},"#,
                r#""status_code":"Unset","status_message":"","resource":null}}"#
            ),
            map = map,
            event = event
        )
    }

    /// Both JSON readers: the decoder (whose fast path reads the compact
    /// layout) and serde_json alone.
    fn both_json_paths(json: &str) -> [Result<AgentSpan<'_>, DecodeError>; 2] {
        [
            Decoder::new().decode(json.as_bytes()),
            decode_json_serde(json.as_bytes()).map(|mut s| {
                s.dedupe_keys();
                s
            }),
        ]
    }

    fn f64_attr(span: &AgentSpan<'_>, i: usize) -> f64 {
        match &span.attributes.map[i].value {
            model::Value::F64(f) => f.0,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_numbers_beyond_f64_are_infinities_not_lost_spans() {
        let json = json_span_with(
            r#""big":{"F64":1e400},"small":{"F64":-1.5E+400},"tiny":{"F64":1e-400},"x":{"Array":{"F64":[2.5,-1e999]}}"#,
            "",
        );
        assert!(
            json::decode_reusing(json.as_bytes(), &[]).is_some(),
            "the fast path reads it"
        );
        for span in both_json_paths(&json) {
            let span = span.unwrap();
            assert_eq!(f64_attr(&span, 0), f64::INFINITY);
            assert_eq!(f64_attr(&span, 1), f64::NEG_INFINITY);
            assert_eq!(f64_attr(&span, 2), 0.0);
            match &span.attributes.map[3].value {
                model::Value::Array(model::Array::F64(v)) => {
                    assert_eq!(
                        v.iter().map(|f| f.0).collect::<Vec<_>>(),
                        [2.5, f64::NEG_INFINITY]
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        // Only JSON's number grammar is a number: not a string, not Rust's
        // own spellings of the infinities.
        for bad in [
            r#""inf""#, "inf", "NaN", "+1", ".5", "1.", "01", "1e", "--1", "\"1\"",
        ] {
            let json = json_span_with(&format!(r#""f":{{"F64":{bad}}}"#), "");
            for span in both_json_paths(&json) {
                assert!(span.is_err(), "{bad} was read as a number");
            }
        }
        assert_eq!(model::json_f64(b"-0.25e1"), Some(-2.5));
        assert_eq!(model::json_f64(b"0"), Some(0.0));
        assert_eq!(model::json_f64(b""), None);
    }

    #[test]
    fn repeated_attribute_keys_keep_the_last_value() {
        let many: String = (0..40)
            .map(|i| format!(r#""k{i}":{{"I64":{i}}},"#))
            .collect();
        for (map, want_map) in [
            (
                r#""a":{"I64":1},"b":{"I64":2},"a":{"I64":3}"#.to_owned(),
                vec![("b", 2), ("a", 3)],
            ),
            (
                format!(r#"{many}"k3":{{"I64":-1}}"#),
                (0..40)
                    .filter(|&i| i != 3)
                    .map(|i| (["k", &i.to_string()].concat(), i))
                    .chain([("k3".to_owned(), -1)])
                    .map(|(k, v)| (&*Box::leak(k.into_boxed_str()), v))
                    .collect(),
            ),
        ] {
            let event = r#"{"key":"e","value":{"I64":1}},{"key":"e","value":{"I64":2}}"#;
            let json = json_span_with(&map, event);
            assert!(
                json::decode_reusing(json.as_bytes(), &[]).is_some(),
                "the fast path reads it"
            );
            for span in both_json_paths(&json) {
                let span = span.unwrap();
                let got: Vec<(&str, i64)> = span
                    .attributes
                    .map
                    .iter()
                    .map(|kv| match kv.value {
                        model::Value::I64(v) => (kv.key.as_str(), v),
                        ref other => panic!("{other:?}"),
                    })
                    .collect();
                assert_eq!(got, want_map);
                let event = &span.events.items()[0].attributes;
                assert_eq!(event.len(), 1);
                assert_eq!(event[0].value, model::Value::I64(2));
            }
        }
    }

    /// Hand-made hostile payloads: each is an error, none allocates what it
    /// claims or panics.
    #[test]
    fn hostile_payloads_are_errors() {
        let real = payloads(EmitFormat::Bincode).remove(0);
        let mut d = Decoder::new();
        assert!(matches!(d.decode(b""), Err(DecodeError::Empty)));
        // Truncated anywhere.
        for cut in [1, 16, 40, real.len() / 2, real.len() - 1] {
            assert!(d.decode(&real[..cut]).is_err(), "cut at {cut}");
        }
        // A string length of 2^62 right after the fixed-size span context
        // prefix: must fail on the byte limit, not try to allocate.
        let mut absurd = real[..16 + 8 + 1 + 1].to_vec();
        absurd.push(1); // trace_state: Some
        absurd.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(d.decode(&absurd).is_err());
        // Invalid UTF-8 in a JSON string and in a bincode string.
        let json = payloads(EmitFormat::Json).remove(0);
        let text = String::from_utf8(json).unwrap();
        let name_at = text.find("\"name\":\"").unwrap() + 8;
        let mut bad = text.into_bytes();
        bad[name_at] = 0xff;
        assert!(d.decode(&bad).is_err());
        assert!(d.decode(b"{\"span_context\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}").is_err());
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(d.decode(deep.as_bytes()).is_err());
        assert!(d.decode(&[0xff; 64]).is_err());
        // 126 zero bytes are exactly one well-formed bincode SpanData, with
        // zero ids; more zeros are trailing bytes.
        assert!(matches!(
            d.decode(&[0u8; 126]),
            Err(DecodeError::InvalidIds)
        ));
        assert!(matches!(
            d.decode(&[0u8; 4096]),
            Err(DecodeError::Bincode(_))
        ));
        let mut trailing = real.clone();
        trailing.push(0);
        assert!(d.decode(&trailing).is_err(), "trailing bytes");
    }

    #[test]
    fn a_stream_cut_right_after_a_header_is_truncated() {
        use tokio_util::codec::Decoder as _;
        let mut d = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&100u64.to_be_bytes()[..]);
        assert!(d.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty(), "the codec consumed the header");
        assert!(matches!(
            d.decode_eof(&mut buf),
            Err(FrameError::Truncated { .. })
        ));
        // A clean boundary is a clean end.
        let mut d = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 1, b'x'][..]);
        assert_eq!(&d.decode(&mut buf).unwrap().unwrap()[..], b"x");
        assert!(d.decode_eof(&mut buf).unwrap().is_none());
    }
}
