//! Encoded spans on their way out: [`SpanRecord`]s as the queue and batcher
//! hold them, framed into an [`EncodedRequest`] without being copied.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::encode;
use crate::wire::AgentSpan;

/// An OTLP resource with its protobuf encoding, made once per connection
/// (and change of resource), not per request.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResource {
    resource: Resource,
    bytes: Bytes,
    /// Host-owned attributes the agent claimed unconfirmed.
    pub(crate) guest_claims: u32,
}

impl EncodedResource {
    pub fn new(resource: Resource) -> Self {
        let bytes = Bytes::from(resource.encode_to_vec());
        Self {
            resource,
            bytes,
            guest_claims: 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn resource(&self) -> &Resource {
        &self.resource
    }
}

/// Encoded spans of one resource, one read's worth: the queue and batcher
/// work per read, not per span. A connection's records share their
/// resource's allocation, so the batcher groups them cheaply.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub resource: Arc<EncodedResource>,
    /// `count` spans, each a whole `ScopeSpans.spans` field (key, length,
    /// `Span` message), as [`encode::put_span`] writes them.
    pub spans: Bytes,
    pub count: usize,
}

impl SpanRecord {
    pub fn encode(resource: Arc<EncodedResource>, span: &AgentSpan<'_>) -> Self {
        let mut buf = BytesMut::new();
        encode::put_span(&mut buf, span);
        Self {
            resource,
            spans: buf.freeze(),
            count: 1,
        }
    }

    /// Splits off the first `n` spans (or all).
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
}

pub(crate) type Group<'a> = (&'a Arc<EncodedResource>, Vec<&'a SpanRecord>);

/// Groups records by resource (by pointer, else value), keeping their order.
pub(crate) fn groups(records: &[SpanRecord]) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
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

/// An encoded `ExportTraceServiceRequest` as the buffers it was framed
/// from (each resource's framing, then the records' spans): never copied
/// into one; transports, retries and the spool use the pieces.
#[derive(Debug, Clone, Default)]
pub struct EncodedRequest {
    chunks: Vec<Bytes>,
    len: usize,
}

impl EncodedRequest {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// None empty.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The request as one buffer; copies unless it is one already.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        }
    }

    pub(crate) fn from_chunks(mut chunks: Vec<Bytes>) -> Self {
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

/// One `ResourceSpans` per resource, each with one `ScopeSpans` without
/// scope (`SpanData` carries none), sharing the records' buffers.
pub fn encode_request(records: &[SpanRecord]) -> EncodedRequest {
    encode::request_chunks(&groups(records))
}

/// The records of a request [`encode_request`] made (the spool's), sharing
/// its buffer; `None` if it holds anything `encode_request` does not write.
pub(crate) fn decode_request(body: &Bytes) -> Option<Vec<SpanRecord>> {
    let mut records = Vec::new();
    for (field, rs) in len_fields(body)? {
        if field != 1 {
            return None;
        }
        let rs = body.slice(rs);
        let mut resource = Resource::default();
        let mut runs = Vec::new();
        for (field, range) in len_fields(&rs)? {
            match field {
                1 => resource = Resource::decode(rs.get(range)?).ok()?,
                2 => runs.push(rs.slice(range)),
                _ => return None,
            }
        }
        let resource = Arc::new(EncodedResource::new(resource));
        for spans in runs {
            let fields = len_fields(&spans)?;
            // A scope or a schema URL: not ours.
            if fields.iter().any(|(f, _)| *f != 2) {
                return None;
            }
            if !fields.is_empty() {
                records.push(SpanRecord {
                    resource: Arc::clone(&resource),
                    spans,
                    count: fields.len(),
                });
            }
        }
    }
    Some(records)
}

/// A message's fields and their value ranges, if all length-delimited and whole.
fn len_fields(b: &[u8]) -> Option<Vec<(u32, std::ops::Range<usize>)>> {
    const LEN: u64 = 2;
    let mut out = Vec::new();
    let mut rest = b;
    while !rest.is_empty() {
        let key = prost::encoding::decode_varint(&mut rest).ok()?;
        let len = prost::encoding::decode_varint(&mut rest).ok()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| key & 7 == LEN && n <= rest.len())?;
        let start = b.len() - rest.len();
        out.push((u32::try_from(key >> 3).ok()?, start..start + len));
        rest = rest.get(len..)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

    fn resource(id: &str) -> Arc<EncodedResource> {
        Arc::new(EncodedResource::new(Resource {
            attributes: vec![KeyValue {
                key: "kata.sandbox.id".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(id.into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    /// `count` span fields of `payload` (under 128) bytes each.
    fn spans(count: usize, payload: u8) -> Bytes {
        let one = [
            &[encode::SCOPE_SPANS_SPAN_KEY, payload][..],
            &vec![1; payload.into()],
        ]
        .concat();
        Bytes::from(one.repeat(count))
    }

    #[test]
    fn a_request_decodes_back_into_its_records() {
        let (a, b) = (resource("a"), resource("b"));
        let records = vec![
            SpanRecord {
                resource: Arc::clone(&a),
                spans: spans(3, 10),
                count: 3,
            },
            SpanRecord {
                resource: b,
                spans: spans(2, 100),
                count: 2,
            },
            SpanRecord {
                resource: a,
                spans: spans(1, 5),
                count: 1,
            },
        ];
        let body = encode_request(&records).to_bytes();
        let back = decode_request(&body).unwrap();
        // Grouped by resource, as the request holds them.
        let shape: Vec<_> = back
            .iter()
            .map(|r| (r.count, r.spans.len(), r.resource.bytes().to_vec()))
            .collect();
        assert_eq!(shape.len(), 2);
        assert_eq!((shape[0].0, shape[0].1), (4, 36 + 7));
        assert_eq!((shape[1].0, shape[1].1), (2, 2 * 102));
        assert_eq!(&encode_request(&back).to_bytes()[..], &body[..]);
        // Not what the batcher writes: refused, not guessed at.
        assert!(decode_request(&Bytes::from_static(b"\x08\x01")).is_none());
        assert!(decode_request(&body.slice(..body.len() - 1)).is_none());
    }
}
