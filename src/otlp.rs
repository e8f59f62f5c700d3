//! Conversion of the agent's span model into OTLP protobuf messages.
//!
//! This is where the agent's SDK-internal view of a span becomes the
//! collector's: 128-bit ids become 16 big-endian bytes (the SDK's
//! `TraceId::to_bytes` order, which is also the W3C hex order), times become
//! nanoseconds, the attribute map becomes a list, the `EvictedQueue`s become
//! lists plus their dropped counts, and the trace state becomes its W3C
//! header string. The resource is the agent's own, with `service.name` set to
//! the configured trace name and the forwarder's own attributes added only
//! where the agent did not set them.

pub mod encode;

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};

use prost::Message;

use crate::wire::model::{self, AgentSpan, Array, SpanKind, StatusCode, Value};
use crate::wire::ResourceSeen;

/// OTLP `SpanFlags`: the low 8 bits are the W3C trace flags; these two bits
/// say whether the remote-ness of a (linked) context is known, and if so,
/// that it is remote.
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

pub const SERVICE_NAME: &str = "service.name";

/// What the forwarder knows about where a connection's spans come from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Value of `service.name` on every resource (the `--trace-name`).
    pub service_name: String,
    /// Extra resource attributes the forwarder adds, typed (`kata.sandbox.id`
    /// is a string, `kata.vsock.cid` an int). Never overrides an attribute
    /// the agent set.
    pub extra: Vec<KeyValue>,
}

impl Origin {
    /// This origin with one more forwarder attribute.
    pub fn with(mut self, key: &str, value: any_value::Value) -> Origin {
        self.extra.push(KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            key_strindex: 0,
        });
        self
    }
}

/// Builds the OTLP resource for a span's agent resource.
pub fn resource(agent: Option<&model::Resource<'_>>, origin: &Origin) -> Resource {
    let agent_attrs = agent.map(|r| r.attrs.as_slice()).unwrap_or(&[]);
    let mut attributes = Vec::with_capacity(agent_attrs.len() + origin.extra.len() + 1);
    attributes.push(string_kv(SERVICE_NAME, &origin.service_name));
    for kv in agent_attrs {
        if kv.key.as_str() != SERVICE_NAME {
            attributes.push(key_value(kv));
        }
    }
    for kv in &origin.extra {
        if !attributes.iter().any(|a| a.key == kv.key) {
            attributes.push(kv.clone());
        }
    }
    Resource {
        attributes,
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

/// Converts one agent span into an OTLP span.
pub fn span(s: &AgentSpan<'_>) -> Span {
    let ctx = &s.span_context;
    Span {
        trace_id: ctx.trace_id.to_be_bytes().to_vec(),
        span_id: ctx.span_id.to_be_bytes().to_vec(),
        trace_state: ctx.trace_state_header(),
        parent_span_id: if s.parent_span_id == 0 {
            Vec::new()
        } else {
            s.parent_span_id.to_be_bytes().to_vec()
        },
        flags: u32::from(ctx.trace_flags),
        name: s.name.as_str().to_owned(),
        kind: span_kind(s.span_kind) as i32,
        start_time_unix_nano: s.start_time.unix_nanos(),
        end_time_unix_nano: s.end_time.unix_nanos(),
        attributes: s.attributes.map.iter().map(key_value).collect(),
        dropped_attributes_count: s.attributes.dropped_count,
        events: s.events.items().iter().map(event).collect(),
        dropped_events_count: s.events.dropped_count,
        links: s.links.items().iter().map(link).collect(),
        dropped_links_count: s.links.dropped_count,
        status: Some(Status {
            message: s.status_message.as_str().to_owned(),
            code: status_code(s.status_code) as i32,
        }),
    }
}

fn span_kind(kind: SpanKind) -> span::SpanKind {
    match kind {
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Producer => span::SpanKind::Producer,
        SpanKind::Consumer => span::SpanKind::Consumer,
        SpanKind::Internal => span::SpanKind::Internal,
    }
}

fn status_code(code: StatusCode) -> status::StatusCode {
    match code {
        StatusCode::Unset => status::StatusCode::Unset,
        StatusCode::Ok => status::StatusCode::Ok,
        StatusCode::Error => status::StatusCode::Error,
    }
}

fn event(e: &model::Event<'_>) -> span::Event {
    span::Event {
        time_unix_nano: e.timestamp.unix_nanos(),
        name: e.name.as_str().to_owned(),
        attributes: e.attributes.iter().map(key_value).collect(),
        dropped_attributes_count: e.dropped_attributes_count,
    }
}

fn link(l: &model::Link<'_>) -> span::Link {
    let ctx = &l.span_context;
    let remote = if ctx.is_remote {
        FLAG_CONTEXT_IS_REMOTE
    } else {
        0
    };
    span::Link {
        trace_id: ctx.trace_id.to_be_bytes().to_vec(),
        span_id: ctx.span_id.to_be_bytes().to_vec(),
        trace_state: ctx.trace_state_header(),
        attributes: l.attributes.iter().map(key_value).collect(),
        dropped_attributes_count: l.dropped_attributes_count,
        flags: u32::from(ctx.trace_flags) | FLAG_CONTEXT_HAS_IS_REMOTE | remote,
    }
}

fn key_value(kv: &model::KeyValue<'_>) -> KeyValue {
    KeyValue {
        key: kv.key.as_str().to_owned(),
        value: Some(any_value(&kv.value)),
        key_strindex: 0,
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        key_strindex: 0,
    }
}

fn any_value(v: &Value<'_>) -> AnyValue {
    use any_value::Value as V;
    let value = match v {
        Value::Bool(b) => V::BoolValue(*b),
        Value::I64(i) => V::IntValue(*i),
        Value::F64(f) => V::DoubleValue(f.0),
        Value::String(s) => V::StringValue(s.as_str().to_owned()),
        Value::Array(a) => V::ArrayValue(ArrayValue {
            values: match a {
                Array::Bool(xs) => xs.iter().map(|&b| wrap(V::BoolValue(b))).collect(),
                Array::I64(xs) => xs.iter().map(|&i| wrap(V::IntValue(i))).collect(),
                Array::F64(xs) => xs.iter().map(|f| wrap(V::DoubleValue(f.0))).collect(),
                Array::String(xs) => xs
                    .iter()
                    .map(|s| wrap(V::StringValue(s.as_str().to_owned())))
                    .collect(),
            },
        }),
    };
    wrap(value)
}

fn wrap(v: any_value::Value) -> AnyValue {
    AnyValue { value: Some(v) }
}

/// An OTLP resource with its protobuf encoding, made once per connection
/// (and per change of the agent's resource), so that batches copy the bytes
/// instead of encoding the resource again for every request.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResource {
    resource: Resource,
    bytes: Bytes,
}

impl EncodedResource {
    pub fn new(resource: Resource) -> Self {
        let bytes = Bytes::from(resource.encode_to_vec());
        Self { resource, bytes }
    }

    /// The encoded `Resource` message.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn resource(&self) -> &Resource {
        &self.resource
    }
}

impl std::ops::Deref for EncodedResource {
    type Target = Resource;

    fn deref(&self) -> &Resource {
        &self.resource
    }
}

/// Spans waiting to be exported: one or more spans of one resource, already
/// encoded. A connection hands over everything one read of its socket
/// produced as one record, so the queue and the batcher work per read, not
/// per span. Records of one connection share their resource's allocation,
/// which is also what lets the batcher group them cheaply.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub resource: Arc<EncodedResource>,
    /// `count` spans, each a whole `ScopeSpans.spans` field (key, length,
    /// `Span` message), as [`encode::put_span`] writes them.
    pub spans: Bytes,
    pub count: usize,
}

impl SpanRecord {
    /// A record of one span, encoded directly as connections do it.
    pub fn encode(resource: Arc<EncodedResource>, span: &AgentSpan<'_>) -> Self {
        let mut buf = BytesMut::new();
        encode::put_span(&mut buf, span);
        Self {
            resource,
            spans: buf.freeze(),
            count: 1,
        }
    }

    /// A record of one span converted on the struct path ([`span`]); the
    /// bytes are the same as the direct encoder's.
    pub fn from_span(resource: Arc<EncodedResource>, span: &Span) -> Self {
        let mut buf = BytesMut::with_capacity(span.encoded_len() + 8);
        buf.put_u8(encode::SCOPE_SPANS_SPAN_KEY);
        encode::put_varint(&mut buf, span.encoded_len() as u64);
        // Encoding into a buffer that grows cannot fail.
        let _ = span.encode(&mut buf);
        Self {
            resource,
            spans: buf.freeze(),
            count: 1,
        }
    }

    /// Splits off and returns the first `n` spans (all of them if there
    /// are fewer), keeping the rest in `self`.
    pub fn split_to(&mut self, n: usize) -> SpanRecord {
        let at = if n >= self.count {
            self.spans.len()
        } else {
            encode::span_boundary(&self.spans, n).unwrap_or(self.spans.len())
        };
        let taken = n.min(self.count);
        self.count -= taken;
        SpanRecord {
            resource: Arc::clone(&self.resource),
            spans: self.spans.split_to(at),
            count: taken,
        }
    }

    /// The spans as OTLP structs, for the slow paths (`--dump-only`, tests).
    pub fn decode_spans(&self) -> Result<Vec<Span>, prost::DecodeError> {
        ScopeSpans::decode(self.spans.clone()).map(|s| s.spans)
    }
}

/// Groups records by resource: pointer first (the common case: one
/// connection, one resource), by value otherwise; arrival order is kept
/// within each group.
fn groups(records: &[SpanRecord]) -> Vec<(&Arc<EncodedResource>, Vec<&SpanRecord>)> {
    let mut groups: Vec<(&Arc<EncodedResource>, Vec<&SpanRecord>)> = Vec::new();
    for rec in records {
        let pos = groups
            .iter()
            .position(|(r, _)| Arc::ptr_eq(r, &rec.resource) || r.bytes == rec.resource.bytes);
        match pos.and_then(|i| groups.get_mut(i)) {
            Some((_, group)) => group.push(rec),
            None => groups.push((&rec.resource, vec![rec])),
        }
    }
    groups
}

/// An encoded `ExportTraceServiceRequest`, kept as the run of buffers it
/// was framed from: the small framing bytes of each resource, then the
/// records' own span bytes. The spans are never copied into one request
/// buffer; the transports hand the pieces to the socket as they are, and
/// retries and the spool reuse them.
#[derive(Debug, Clone, Default)]
pub struct EncodedRequest {
    chunks: Vec<Bytes>,
    len: usize,
}

impl EncodedRequest {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The request's bytes, in order, none of them empty.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The request as one buffer; copies unless it is one already.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut buf = BytesMut::with_capacity(self.len);
                for c in many {
                    buf.put_slice(c);
                }
                buf.freeze()
            }
        }
    }

    /// A request made of these pieces, in order (empty ones are left out).
    pub fn from_chunks(mut chunks: Vec<Bytes>) -> Self {
        chunks.retain(|c| !c.is_empty());
        let len = chunks.iter().map(Bytes::len).sum();
        Self { chunks, len }
    }
}

impl From<Bytes> for EncodedRequest {
    fn from(b: Bytes) -> Self {
        Self::from_chunks(vec![b])
    }
}

/// Encodes records as one `ExportTraceServiceRequest`: one `ResourceSpans`
/// per resource, each with one `ScopeSpans` (the agent's `SpanData` does
/// not carry its instrumentation library, so there is no scope to report).
/// The spans are not copied: the request shares the records' buffers.
pub fn encode_request(records: &[SpanRecord]) -> EncodedRequest {
    let groups: Vec<encode::Group<'_>> = groups(records)
        .into_iter()
        .map(|(resource, recs)| encode::Group {
            resource: resource.bytes(),
            spans: recs.iter().map(|r| &r.spans).collect(),
        })
        .collect();
    encode::request_chunks(&groups)
}

/// The same request as [`encode_request`], as OTLP structs, for the slow
/// paths and tests. Fails only if a record's bytes are not spans, which
/// records built by this module never are.
pub fn group_by_resource(
    records: Vec<SpanRecord>,
) -> Result<Vec<ResourceSpans>, prost::DecodeError> {
    groups(&records)
        .into_iter()
        .map(|(resource, recs)| {
            let mut spans = Vec::new();
            for r in recs {
                spans.extend(r.decode_spans()?);
            }
            Ok(ResourceSpans {
                resource: Some(resource.resource().clone()),
                scope_spans: vec![ScopeSpans {
                    scope: None,
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
        })
        .collect()
}

/// Remembers a connection's last resource so that consecutive spans with
/// the same agent resource (all of them, in practice) share one converted
/// `Resource` instead of rebuilding it per span.
#[derive(Debug, Default)]
pub struct ResourceCache {
    /// The agent's attributes as last converted (`None`: the agent sent no
    /// resource), to compare the next span's against.
    agent: Option<Vec<KeyValue>>,
    resource: Option<Arc<EncodedResource>>,
    /// The payload bytes that resource came from, when known: a span with
    /// the same bytes is not even decoded (see [`ResourceSeen`]).
    raw: Vec<u8>,
}

impl ResourceCache {
    /// What to pass to [`crate::wire::Decoder::decode_reusing`].
    pub fn known_bytes(&self) -> &[u8] {
        if self.resource.is_some() {
            &self.raw
        } else {
            &[]
        }
    }

    /// The encoded resource for a span: the cached one when the decoder saw
    /// the same bytes or the attributes are equal, a new one otherwise.
    pub fn get(
        &mut self,
        agent: Option<&model::Resource<'_>>,
        seen: ResourceSeen<'_>,
        origin: &Origin,
    ) -> Arc<EncodedResource> {
        if let Some(r) = &self.resource {
            let hit = match seen {
                ResourceSeen::Same => true,
                ResourceSeen::New(_) => same_attrs(self.agent.as_deref(), agent),
            };
            if hit {
                let r = Arc::clone(r);
                seen.remember(&mut self.raw);
                return r;
            }
        }
        // `Same` never gets here: the decoder only reports it for bytes from
        // `known_bytes`, which are empty until a resource is cached.
        let r = Arc::new(EncodedResource::new(resource(agent, origin)));
        self.agent = agent.map(|a| a.attrs.iter().map(key_value).collect());
        self.resource = Some(Arc::clone(&r));
        seen.remember(&mut self.raw);
        r
    }
}

fn same_attrs(cached: Option<&[KeyValue]>, agent: Option<&model::Resource<'_>>) -> bool {
    match (cached, agent) {
        (None, None) => true,
        (Some(c), Some(a)) => {
            c.len() == a.attrs.len()
                && c.iter().zip(&a.attrs).all(|(p, m)| {
                    p.key == m.key.as_str()
                        && p.value
                            .as_ref()
                            .and_then(|v| v.value.as_ref())
                            .is_some_and(|v| same_value(v, &m.value))
                })
        }
        _ => false,
    }
}

/// Compares without allocating; floats by bits, so NaN equals itself.
fn same_value(p: &any_value::Value, m: &Value<'_>) -> bool {
    use any_value::Value as V;
    fn one(p: &AnyValue, m: &any_value::Value) -> bool {
        p.value.as_ref() == Some(m)
    }
    match (p, m) {
        (V::BoolValue(a), Value::Bool(b)) => a == b,
        (V::IntValue(a), Value::I64(b)) => a == b,
        (V::DoubleValue(a), Value::F64(b)) => a.to_bits() == b.0.to_bits(),
        (V::StringValue(a), Value::String(b)) => a == b.as_str(),
        (V::ArrayValue(a), Value::Array(arr)) => match arr {
            Array::Bool(xs) => {
                a.values.len() == xs.len()
                    && a.values.iter().zip(xs).all(|(p, &x)| one(p, &V::BoolValue(x)))
            }
            Array::I64(xs) => {
                a.values.len() == xs.len()
                    && a.values.iter().zip(xs).all(|(p, &x)| one(p, &V::IntValue(x)))
            }
            Array::F64(xs) => {
                a.values.len() == xs.len()
                    && a.values.iter().zip(xs).all(|(p, x)| {
                        matches!(&p.value, Some(V::DoubleValue(d)) if d.to_bits() == x.0.to_bits())
                    })
            }
            Array::String(xs) => {
                a.values.len() == xs.len()
                    && a.values.iter().zip(xs).all(|(p, x)| {
                        matches!(&p.value, Some(V::StringValue(s)) if s == x.as_str())
                    })
            }
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_json;

    const SPAN: &str = r#"{"span_context":{"trace_id":340282366920938463463374607431768211455,"span_id":1,"trace_flags":1,"is_remote":false,"trace_state":[["vendor","a=1"],["k","v"]]},
        "parent_span_id":2,"span_kind":"Client","name":"n","start_time":{"secs_since_epoch":1,"nanos_since_epoch":2},"end_time":{"secs_since_epoch":1,"nanos_since_epoch":3},
        "attributes":{"map":{"arr":{"Array":{"I64":[1,-2]}}},"evict_list":[],"max_len":128,"dropped_count":4},
        "events":{"queue":null,"max_len":128,"dropped_count":5},
        "links":{"queue":[{"span_context":{"trace_id":7,"span_id":8,"trace_flags":1,"is_remote":true,"trace_state":null},"attributes":[],"dropped_attributes_count":6}],"max_len":128,"dropped_count":0},
        "status_code":"Error","status_message":"boom",
        "resource":{"attrs":{"service.name":{"String":"agent-own"},"kata.sandbox.id":{"String":"agent-set"},"host":{"String":"vm"}}}}"#;

    fn origin() -> Origin {
        Origin {
            service_name: "kata-agent".into(),
            extra: Vec::new(),
        }
        .with(
            "kata.sandbox.id",
            any_value::Value::StringValue("forwarder-set".into()),
        )
        .with("kata.vsock.cid", any_value::Value::IntValue(3))
    }

    fn attr<'a>(r: &'a Resource, key: &str) -> Option<&'a any_value::Value> {
        r.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn resource_sets_service_name_and_never_clobbers_the_agent() {
        let span = decode_json(SPAN.as_bytes()).unwrap();
        let r = resource(span.resource.as_ref(), &origin());
        let s = |v: &str| Some(any_value::Value::StringValue(v.into()));
        assert_eq!(attr(&r, SERVICE_NAME).cloned(), s("kata-agent"));
        assert_eq!(attr(&r, "kata.sandbox.id").cloned(), s("agent-set"));
        assert_eq!(
            attr(&r, "kata.vsock.cid").cloned(),
            Some(any_value::Value::IntValue(3))
        );
        assert_eq!(attr(&r, "host").cloned(), s("vm"));
        assert_eq!(
            r.attributes
                .iter()
                .filter(|kv| kv.key == SERVICE_NAME)
                .count(),
            1
        );
    }

    #[test]
    fn converts_ids_state_flags_and_counts() {
        let span = decode_json(SPAN.as_bytes()).unwrap();
        let s = super::span(&span);
        assert_eq!(s.trace_id, vec![0xff; 16]);
        assert_eq!(s.span_id, 1u64.to_be_bytes());
        assert_eq!(s.parent_span_id, 2u64.to_be_bytes());
        assert_eq!(s.trace_state, "vendor=a=1,k=v");
        assert_eq!(s.kind, span::SpanKind::Client as i32);
        assert_eq!(
            (s.start_time_unix_nano, s.end_time_unix_nano),
            (1_000_000_002, 1_000_000_003)
        );
        assert_eq!(
            (
                s.dropped_attributes_count,
                s.dropped_events_count,
                s.dropped_links_count
            ),
            (4, 5, 0)
        );
        let l = &s.links[0];
        assert_eq!(
            l.flags,
            0x1 | FLAG_CONTEXT_HAS_IS_REMOTE | FLAG_CONTEXT_IS_REMOTE
        );
        assert_eq!(l.dropped_attributes_count, 6);
        let st = s.status.unwrap();
        assert_eq!(
            (st.code, st.message.as_str()),
            (status::StatusCode::Error as i32, "boom")
        );
        let Some(any_value::Value::ArrayValue(a)) = s.attributes[0].value.clone().unwrap().value
        else {
            panic!("array attribute");
        };
        assert_eq!(a.values.len(), 2);
    }

    /// A connection decodes its agent's resource once: later spans with
    /// the same bytes skip it and get the cached resource, and a change is
    /// noticed both ways.
    #[test]
    fn an_unchanged_resource_is_decoded_once_per_connection() {
        // Compact, as agents write it: the fast path that spots a known
        // resource only takes the agent's own layout.
        let span = SPAN.replace("\n        ", "");
        let other = span.replace(r#""host":{"String":"vm"}"#, r#""host":{"String":"vm2"}"#);
        let payloads = [&span, &span, &other, &other, &span];
        let mut decoder = crate::wire::Decoder::new();
        let mut cache = ResourceCache::default();
        let mut reused = Vec::new();
        for p in payloads {
            let (span, seen) = decoder
                .decode_reusing(p.as_bytes(), cache.known_bytes())
                .unwrap();
            let same = seen == ResourceSeen::Same;
            assert_eq!(span.resource.is_none(), same);
            reused.push(same);
            let got = cache.get(span.resource.as_ref(), seen, &origin());
            let want = resource(
                decode_json(p.as_bytes()).unwrap().resource.as_ref(),
                &origin(),
            );
            assert_eq!(got.resource(), &want);
        }
        assert_eq!(reused, [false, true, false, true, false]);
    }

    #[test]
    fn resource_cache_shares_equal_resources_and_notices_changes() {
        let span = decode_json(SPAN.as_bytes()).unwrap();
        let mut cache = ResourceCache::default();
        let new = ResourceSeen::New(&[]);
        let a = cache.get(span.resource.as_ref(), new, &origin());
        let b = cache.get(span.resource.as_ref(), new, &origin());
        assert!(Arc::ptr_eq(&a, &b));
        let other = SPAN.replace(r#""host":{"String":"vm"}"#, r#""host":{"String":"vm2"}"#);
        let span2 = decode_json(other.as_bytes()).unwrap();
        let c = cache.get(span2.resource.as_ref(), new, &origin());
        assert!(!Arc::ptr_eq(&a, &c));
        let d = cache.get(None, new, &origin());
        assert_eq!(
            d.attributes.len(),
            3,
            "service.name plus the forwarder's own"
        );

        let recs = vec![
            SpanRecord::from_span(Arc::clone(&a), &super::span(&span)),
            SpanRecord::from_span(Arc::clone(&c), &super::span(&span2)),
            SpanRecord::from_span(Arc::new((*a).clone()), &super::span(&span)),
        ];
        let grouped = group_by_resource(recs).unwrap();
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].scope_spans[0].spans.len(), 2);
    }
}
