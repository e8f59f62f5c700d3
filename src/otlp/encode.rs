//! Direct protobuf encoding of agent spans, without building OTLP structs.
//!
//! The struct path ([`super::span`] then prost) allocates for every id,
//! name, key and value only to copy and free them: that was most of the
//! cost after decoding. The bytes are prost's, byte for byte (fields in tag
//! order, proto3 defaults left out except in `oneof`s and present
//! messages); the tests compare both paths on real frames of both formats.
//!
//! A span is written as a whole `ScopeSpans.spans` field (key, length,
//! `Span`), so a run of them is a `ScopeSpans` body a batch only frames
//! ([`request_chunks`]).

use bytes::{BufMut, BytesMut};

use crate::wire::model::{self, AgentSpan, Array, Value};

use super::record::Group;
use super::{EncodedRequest, FLAG_CONTEXT_HAS_IS_REMOTE, FLAG_CONTEXT_IS_REMOTE};

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

/// A field key that fits one byte (field numbers below 16).
const fn key(field: u32, wire_type: u32) -> u8 {
    ((field << 3) | wire_type) as u8
}

pub(crate) const SCOPE_SPANS_SPAN_KEY: u8 = key(2, LEN);

/// The framing [`request_chunks`] writes around one resource's spans: three
/// length-delimited headers of at most 1 + 10 bytes each.
pub(crate) const RESOURCE_FRAMING: usize = 33;

/// prost's formula.
#[inline]
fn varint_len(v: u64) -> usize {
    ((((v | 1).leading_zeros() ^ 63) * 9 + 73) / 64) as usize
}

/// Ours, not prost's `encode_varint`, whose bounded loop with an early exit
/// makes the encoder 30-45 % slower (`cargo bench --bench convert`: 134.6
/// against 92.5 µs per 512 JSON spans, 134.8 against 104.2 bincode).
/// Reading, off the hot path, is prost's ([`span_end`]).
#[inline]
fn encode_varint(mut v: u64, buf: &mut BytesMut) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// With a one-byte key.
#[inline]
fn len_field(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

#[inline]
fn put_len_field(buf: &mut BytesMut, key: u8, body: usize) {
    buf.put_u8(key);
    encode_varint(body as u64, buf);
}

#[inline]
fn put_bytes_field(buf: &mut BytesMut, key: u8, bytes: &[u8]) {
    put_len_field(buf, key, bytes.len());
    buf.put_slice(bytes);
}

/// A string field proto3 leaves out when empty.
#[inline]
fn opt_str_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_field(s.len())
    }
}

#[inline]
fn put_opt_str(buf: &mut BytesMut, key: u8, s: &str) {
    if !s.is_empty() {
        put_bytes_field(buf, key, s.as_bytes());
    }
}

#[inline]
fn opt_u32_len(v: u32) -> usize {
    if v == 0 {
        0
    } else {
        1 + varint_len(u64::from(v))
    }
}

#[inline]
fn put_opt_u32(buf: &mut BytesMut, key: u8, v: u32) {
    if v != 0 {
        buf.put_u8(key);
        encode_varint(u64::from(v), buf);
    }
}

#[inline]
fn put_opt_fixed64(buf: &mut BytesMut, key: u8, v: u64) {
    if v != 0 {
        buf.put_u8(key);
        buf.put_u64_le(v);
    }
}

#[inline]
fn opt_fixed64_len(v: u64) -> usize {
    usize::from(v != 0) * 9
}

fn trace_state_len(ctx: &model::SpanContext<'_>) -> usize {
    let entries = ctx.trace_state.as_deref().unwrap_or_default();
    // "k=v" per entry, entries joined by ",".
    let pairs: usize = entries.iter().map(|(k, v)| k.0.len() + 1 + v.0.len()).sum();
    (pairs + entries.len()).saturating_sub(1)
}

fn put_trace_state(buf: &mut BytesMut, key: u8, ctx: &model::SpanContext<'_>) {
    let len = trace_state_len(ctx);
    if len == 0 {
        return;
    }
    put_len_field(buf, key, len);
    for (i, (k, v)) in ctx.trace_state.iter().flatten().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        buf.put_slice(k.as_str().as_bytes());
        buf.put_u8(b'=');
        buf.put_slice(v.as_str().as_bytes());
    }
}

/// Its one `oneof` field, always written.
fn any_value_len(v: &Value<'_>) -> usize {
    match v {
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + varint_len(*i as u64),
        Value::F64(_) => 9,
        Value::String(s) => len_field(s.as_str().len()),
        Value::Array(a) => len_field(array_len(a)),
    }
}

/// One `AnyValue` message per element.
fn array_len(a: &Array<'_>) -> usize {
    match a {
        Array::Bool(xs) => xs.len() * len_field(2),
        Array::I64(xs) => xs
            .iter()
            .map(|&i| len_field(1 + varint_len(i as u64)))
            .sum(),
        Array::F64(xs) => xs.len() * len_field(9),
        Array::String(xs) => xs
            .iter()
            .map(|s| len_field(len_field(s.as_str().len())))
            .sum(),
    }
}

fn put_any_value(buf: &mut BytesMut, v: &Value<'_>) {
    match v {
        Value::Bool(b) => {
            buf.put_u8(key(2, VARINT));
            buf.put_u8(u8::from(*b));
        }
        Value::I64(i) => {
            buf.put_u8(key(3, VARINT));
            encode_varint(*i as u64, buf);
        }
        Value::F64(f) => {
            buf.put_u8(key(4, I64));
            buf.put_f64_le(f.0);
        }
        Value::String(s) => put_bytes_field(buf, key(1, LEN), s.as_str().as_bytes()),
        Value::Array(a) => {
            put_len_field(buf, key(5, LEN), array_len(a));
            // Each element is an AnyValue message in ArrayValue.values (1).
            let elem = key(1, LEN);
            match a {
                Array::Bool(xs) => {
                    for &b in xs {
                        put_len_field(buf, elem, 2);
                        buf.put_u8(key(2, VARINT));
                        buf.put_u8(u8::from(b));
                    }
                }
                Array::I64(xs) => {
                    for &i in xs {
                        put_len_field(buf, elem, 1 + varint_len(i as u64));
                        buf.put_u8(key(3, VARINT));
                        encode_varint(i as u64, buf);
                    }
                }
                Array::F64(xs) => {
                    for f in xs {
                        put_len_field(buf, elem, 9);
                        buf.put_u8(key(4, I64));
                        buf.put_f64_le(f.0);
                    }
                }
                Array::String(xs) => {
                    for s in xs {
                        put_len_field(buf, elem, len_field(s.as_str().len()));
                        put_bytes_field(buf, key(1, LEN), s.as_str().as_bytes());
                    }
                }
            }
        }
    }
}

fn key_values_len(kvs: &[model::KeyValue<'_>]) -> usize {
    kvs.iter()
        .map(|kv| len_field(opt_str_len(kv.key.as_str()) + len_field(any_value_len(&kv.value))))
        .sum()
}

fn put_key_values(buf: &mut BytesMut, field_key: u8, kvs: &[model::KeyValue<'_>]) {
    for kv in kvs {
        let key_str = kv.key.as_str();
        let value_len = any_value_len(&kv.value);
        put_len_field(buf, field_key, opt_str_len(key_str) + len_field(value_len));
        put_opt_str(buf, key(1, LEN), key_str);
        put_len_field(buf, key(2, LEN), value_len);
        put_any_value(buf, &kv.value);
    }
}

fn event_len(e: &model::Event<'_>) -> usize {
    opt_fixed64_len(e.timestamp.unix_nanos())
        + opt_str_len(e.name.as_str())
        + key_values_len(&e.attributes)
        + opt_u32_len(e.dropped_attributes_count)
}

fn put_event(buf: &mut BytesMut, e: &model::Event<'_>) {
    put_len_field(buf, key(11, LEN), event_len(e));
    put_opt_fixed64(buf, key(1, I64), e.timestamp.unix_nanos());
    put_opt_str(buf, key(2, LEN), e.name.as_str());
    put_key_values(buf, key(3, LEN), &e.attributes);
    put_opt_u32(buf, key(4, VARINT), e.dropped_attributes_count);
}

pub(super) fn link_flags(ctx: &model::SpanContext<'_>) -> u32 {
    let remote = FLAG_CONTEXT_IS_REMOTE * u32::from(ctx.is_remote);
    u32::from(ctx.trace_flags) | FLAG_CONTEXT_HAS_IS_REMOTE | remote
}

fn link_len(l: &model::Link<'_>) -> usize {
    let ts = trace_state_len(&l.span_context);
    len_field(16)
        + len_field(8)
        + if ts == 0 { 0 } else { len_field(ts) }
        + key_values_len(&l.attributes)
        + opt_u32_len(l.dropped_attributes_count)
        // flags: never zero, the has-is-remote bit is always set.
        + 5
}

fn put_link(buf: &mut BytesMut, l: &model::Link<'_>) {
    let ctx = &l.span_context;
    put_len_field(buf, key(13, LEN), link_len(l));
    put_bytes_field(buf, key(1, LEN), &ctx.trace_id.to_be_bytes());
    put_bytes_field(buf, key(2, LEN), &ctx.span_id.to_be_bytes());
    put_trace_state(buf, key(3, LEN), ctx);
    put_key_values(buf, key(4, LEN), &l.attributes);
    put_opt_u32(buf, key(5, VARINT), l.dropped_attributes_count);
    buf.put_u8(key(6, I32));
    buf.put_u32_le(link_flags(ctx));
}

fn status_len(s: &AgentSpan<'_>) -> usize {
    opt_str_len(s.status_message.as_str()) + opt_u32_len(s.status_code as u32)
}

fn span_len(s: &AgentSpan<'_>) -> usize {
    let ctx = &s.span_context;
    let ts = trace_state_len(ctx);
    len_field(16)
        + len_field(8)
        + if ts == 0 { 0 } else { len_field(ts) }
        + if s.parent_span_id == 0 { 0 } else { len_field(8) }
        + opt_str_len(s.name.as_str())
        + 2 // kind: never Unspecified
        + opt_fixed64_len(s.start_time.unix_nanos())
        + opt_fixed64_len(s.end_time.unix_nanos())
        + key_values_len(&s.attributes.map)
        + opt_u32_len(s.attributes.dropped_count)
        + s.events.items().iter().map(|e| len_field(event_len(e))).sum::<usize>()
        + opt_u32_len(s.events.dropped_count)
        + s.links.items().iter().map(|l| len_field(link_len(l))).sum::<usize>()
        + opt_u32_len(s.links.dropped_count)
        + len_field(status_len(s))
        // flags (field 16: a two-byte key) when not zero.
        + if ctx.trace_flags == 0 { 0 } else { 6 }
}

/// Appends `s` as one `ScopeSpans.spans` field; the bytes written.
pub fn put_span(buf: &mut BytesMut, s: &AgentSpan<'_>) -> usize {
    let len = span_len(s);
    let total = len_field(len);
    buf.reserve(total);
    let start = buf.len();
    put_len_field(buf, SCOPE_SPANS_SPAN_KEY, len);
    let ctx = &s.span_context;
    put_bytes_field(buf, key(1, LEN), &ctx.trace_id.to_be_bytes());
    put_bytes_field(buf, key(2, LEN), &ctx.span_id.to_be_bytes());
    put_trace_state(buf, key(3, LEN), ctx);
    if s.parent_span_id != 0 {
        put_bytes_field(buf, key(4, LEN), &s.parent_span_id.to_be_bytes());
    }
    put_opt_str(buf, key(5, LEN), s.name.as_str());
    buf.put_u8(key(6, VARINT));
    buf.put_u8(s.span_kind as u8);
    put_opt_fixed64(buf, key(7, I64), s.start_time.unix_nanos());
    put_opt_fixed64(buf, key(8, I64), s.end_time.unix_nanos());
    put_key_values(buf, key(9, LEN), &s.attributes.map);
    put_opt_u32(buf, key(10, VARINT), s.attributes.dropped_count);
    for e in s.events.items() {
        put_event(buf, e);
    }
    put_opt_u32(buf, key(12, VARINT), s.events.dropped_count);
    for l in s.links.items() {
        put_link(buf, l);
    }
    put_opt_u32(buf, key(14, VARINT), s.links.dropped_count);
    put_len_field(buf, key(15, LEN), status_len(s));
    put_opt_str(buf, key(2, LEN), s.status_message.as_str());
    put_opt_u32(buf, key(3, VARINT), s.status_code as u32);
    if ctx.trace_flags != 0 {
        // Field 16, fixed32: key 133 as a varint.
        buf.put_slice(&[0x85, 0x01]);
        buf.put_u32_le(u32::from(ctx.trace_flags));
    }
    debug_assert_eq!(buf.len() - start, total, "span length mismatch");
    total
}

/// An `ExportTraceServiceRequest`: only the framing is written around the
/// groups' shared spans.
pub(crate) fn request_chunks(groups: &[Group<'_>]) -> EncodedRequest {
    let framing = |(r, _): &Group<'_>| RESOURCE_FRAMING + r.bytes().len();
    let mut heads = BytesMut::with_capacity(groups.iter().map(framing).sum());
    let mut chunks = Vec::with_capacity(groups.iter().map(|(_, recs)| 1 + recs.len()).sum());
    for (resource, recs) in groups {
        let scope = recs.iter().map(|r| r.spans.len()).sum::<usize>();
        let rs = len_field(resource.bytes().len()) + len_field(scope);
        // ExportTraceServiceRequest.resource_spans (1)
        put_len_field(&mut heads, key(1, LEN), rs);
        // ResourceSpans.resource (1), then ResourceSpans.scope_spans (2)
        put_bytes_field(&mut heads, key(1, LEN), resource.bytes());
        put_len_field(&mut heads, key(2, LEN), scope);
        chunks.push(heads.split().freeze());
        let spans = recs.iter().filter(|r| !r.spans.is_empty());
        chunks.extend(spans.map(|r| r.spans.clone()));
    }
    EncodedRequest::from_chunks(chunks)
}

/// Where the span starting at `at` ends, if a whole one starts there.
fn span_end(spans: &[u8], at: usize) -> Option<usize> {
    let mut rest = spans.get(at..)?.strip_prefix(&[SCOPE_SPANS_SPAN_KEY])?;
    let len = prost::encoding::decode_varint(&mut rest).ok()?;
    let len = usize::try_from(len).ok().filter(|&n| n <= rest.len())?;
    Some(spans.len() - rest.len() + len)
}

/// The offset after `n` spans of a run; `None` if fewer (or malformed).
pub(crate) fn span_boundary(spans: &[u8], n: usize) -> Option<usize> {
    (0..n).try_fold(0, |at, _| span_end(spans, at))
}

/// How many leading spans of a run fit in `max_bytes` (malformed: none).
pub(crate) fn spans_within(spans: &[u8], max_bytes: usize) -> usize {
    let (mut at, mut n) = (0, 0);
    while let Some(end) = span_end(spans, at).filter(|&end| end <= max_bytes) {
        (at, n) = (end, n + 1);
    }
    n
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kata_agent_emitter::{scenario, ScenarioOptions, WireFormat as EmitFormat};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    use super::*;
    use crate::otlp::{
        encode_request, group_by_resource, resource, span, EncodedResource, Origin, SpanRecord,
    };
    use crate::wire::{decode_json, Decoder, HEADER_LEN};

    /// What prost writes for the struct path, as one `ScopeSpans.spans` field.
    fn struct_path(s: &AgentSpan<'_>) -> Vec<u8> {
        let body = span(s).encode_to_vec();
        let mut out = vec![SCOPE_SPANS_SPAN_KEY];
        let mut len = BytesMut::new();
        encode_varint(body.len() as u64, &mut len);
        out.extend_from_slice(&len);
        out.extend_from_slice(&body);
        out
    }

    fn direct(s: &AgentSpan<'_>) -> Vec<u8> {
        let mut buf = BytesMut::new();
        let n = put_span(&mut buf, s);
        assert_eq!(n, buf.len());
        buf.to_vec()
    }

    #[test]
    fn real_sdk_spans_encode_as_prost_does() {
        for format in EmitFormat::ALL {
            let mut d = Decoder::new();
            for p in crate::wire::real_test_payloads(format) {
                let s = d.decode(&p).unwrap();
                assert_eq!(
                    direct(&s),
                    struct_path(&s),
                    "{format:?} {}",
                    s.name.as_str()
                );
            }
        }
    }

    #[test]
    fn edge_values_encode_as_prost_does() {
        let spans = [
            // Zero times and flags, empty name and message, Unset status,
            // no resource, empty trace state.
            r#"{"span_context":{"trace_id":1,"span_id":1,"trace_flags":0,"is_remote":false,"trace_state":[]},
              "parent_span_id":0,"span_kind":"Internal","name":"","start_time":{"secs_since_epoch":0,"nanos_since_epoch":0},
              "end_time":{"secs_since_epoch":0,"nanos_since_epoch":0},
              "attributes":{"map":{},"evict_list":[],"max_len":128,"dropped_count":0},
              "events":{"queue":[],"max_len":128,"dropped_count":0},"links":{"queue":[],"max_len":128,"dropped_count":0},
              "status_code":"Unset","status_message":"","resource":null}"#,
            // Every value kind at its edges, events and links with and
            // without everything, huge counts, escapes and non-ASCII.
            r#"{"span_context":{"trace_id":340282366920938463463374607431768211455,"span_id":18446744073709551615,"trace_flags":255,"is_remote":true,"trace_state":[["a","b"],["","x"]]},
              "parent_span_id":18446744073709551615,"span_kind":"Consumer","name":"n\u00e9\n\"q\"","start_time":{"secs_since_epoch":18446744073709551615,"nanos_since_epoch":999999999},
              "end_time":{"secs_since_epoch":1,"nanos_since_epoch":0},
              "attributes":{"map":{"":{"String":""},"neg":{"I64":-1},"min":{"I64":-9223372036854775808},"zero":{"I64":0},
                "f":{"F64":-0.0},"nan":{"F64":null},"t":{"Bool":true},"fa":{"Bool":false},
                "ab":{"Array":{"Bool":[true,false]}},"ai":{"Array":{"I64":[0,-5,300]}},"af":{"Array":{"F64":[1.5,null]}},
                "as":{"Array":{"String":["","x\u0000y"]}},"e0":{"Array":{"Bool":[]}},"e1":{"Array":{"I64":[]}},
                "e2":{"Array":{"F64":[]}},"e3":{"Array":{"String":[]}}},"evict_list":[],"max_len":128,"dropped_count":4294967295},
              "events":{"queue":[{"name":"","timestamp":{"secs_since_epoch":0,"nanos_since_epoch":0},"attributes":[],"dropped_attributes_count":0},
                {"name":"ev","timestamp":{"secs_since_epoch":5,"nanos_since_epoch":6},"attributes":[{"key":"k","value":{"I64":7}}],"dropped_attributes_count":300}],
                "max_len":128,"dropped_count":1},
              "links":{"queue":[{"span_context":{"trace_id":7,"span_id":8,"trace_flags":0,"is_remote":false,"trace_state":null},"attributes":[],"dropped_attributes_count":0},
                {"span_context":{"trace_id":9,"span_id":10,"trace_flags":1,"is_remote":true,"trace_state":[["k","v"]]},"attributes":[{"key":"a","value":{"String":"b"}}],"dropped_attributes_count":2}],
                "max_len":128,"dropped_count":128},
              "status_code":"Error","status_message":"boom","resource":{"attrs":{}}}"#,
            r#"{"span_context":{"trace_id":2,"span_id":3,"trace_flags":1,"is_remote":false,"trace_state":null},
              "parent_span_id":4,"span_kind":"Producer","name":"p","start_time":{"secs_since_epoch":1,"nanos_since_epoch":2},
              "end_time":{"secs_since_epoch":3,"nanos_since_epoch":4},
              "attributes":{"map":{"big":{"String":"BIG"}},"evict_list":[],"max_len":128,"dropped_count":0},
              "events":{"queue":null,"max_len":128,"dropped_count":0},"links":{"queue":null,"max_len":128,"dropped_count":0},
              "status_code":"Ok","status_message":"","resource":null}"#,
        ];
        for json in spans {
            // A string long enough for multi-byte length varints.
            let json = json.replace("BIG", &"x".repeat(70_000));
            let s = decode_json(json.as_bytes()).unwrap();
            assert_eq!(direct(&s), struct_path(&s), "{json:.200}");
        }
    }

    #[test]
    fn requests_encode_as_prost_does_and_split_at_span_boundaries() {
        let sc = scenario(&ScenarioOptions::default());
        let mut d = Decoder::new();
        let spans: Vec<_> = sc
            .frames
            .iter()
            .map(|f| d.decode(&f[HEADER_LEN..]).unwrap())
            .collect();
        let origin = Origin {
            service_name: "svc".into(),
            extra: Vec::new(),
        };
        let a = Arc::new(EncodedResource::new(resource(
            spans[0].resource.as_ref(),
            &origin,
        )));
        let b = Arc::new(EncodedResource::new(resource(None, &origin)));
        // Equal by value, not by pointer: grouped with `a`.
        let a2 = Arc::new((*a).clone());
        let mut buf = BytesMut::new();
        for s in &spans[..5] {
            put_span(&mut buf, s);
        }
        let mut first = SpanRecord {
            resource: Arc::clone(&a),
            spans: buf.split().freeze(),
            count: 5,
        };
        let mut records = vec![first.split_to(2), first.clone()];
        assert_eq!((records[0].count, records[1].count), (2, 3));
        for (i, s) in spans[5..].iter().enumerate() {
            let r = [&b, &a2][i % 2];
            put_span(&mut buf, s);
            records.push(SpanRecord {
                resource: Arc::clone(r),
                spans: buf.split().freeze(),
                count: 1,
            });
        }
        let direct = encode_request(&records);
        let request = ExportTraceServiceRequest {
            resource_spans: group_by_resource(records.clone()).unwrap(),
        };
        assert_eq!(request.resource_spans.len(), 2);
        assert_eq!(
            request
                .resource_spans
                .iter()
                .map(|r| r.scope_spans[0].spans.len())
                .sum::<usize>(),
            spans.len()
        );
        assert_eq!(&direct.to_bytes()[..], &request.encode_to_vec()[..]);
        // Splitting past the end takes everything; the rest is empty.
        let mut r = records[1].clone();
        let all = r.split_to(10);
        assert_eq!((all.count, r.count, r.spans.len()), (3, 0, 0));
        // A byte budget takes whole spans only, up to the boundary it holds.
        let run = &records[0].spans;
        let one = span_boundary(run, 1).unwrap();
        assert_eq!(spans_within(run, run.len()), 2);
        assert_eq!(spans_within(run, run.len() - 1), 1);
        assert_eq!(spans_within(run, one), 1);
        assert_eq!(spans_within(run, one - 1), 0);
        assert_eq!(spans_within(run, 0), 0);
    }
}
