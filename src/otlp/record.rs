//! Encoded spans on their way out: as the queue and the batcher hold them,
//! and framed into the export request.
//!
//! A [`SpanRecord`] is one or more spans of one resource, each already a
//! whole `ScopeSpans.spans` field. An [`EncodedRequest`] is the
//! `ExportTraceServiceRequest` made of records without copying them: per
//! resource a few framing bytes, then the records' own buffers.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::encode;
use crate::wire::AgentSpan;

/// An OTLP resource with its protobuf encoding, made once per connection
/// (and per change of the agent's resource), so that batches copy the bytes
/// instead of encoding the resource again for every request.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResource {
    resource: Resource,
    bytes: Bytes,
    /// Host-owned attributes the agent claimed with a value the host does
    /// not confirm (kept under `kata.guest.claimed.*`).
    guest_claims: u32,
}

impl EncodedResource {
    pub fn new(resource: Resource) -> Self {
        Self::with_claims(resource, 0)
    }

    pub fn with_claims(resource: Resource, guest_claims: u32) -> Self {
        let bytes = Bytes::from(resource.encode_to_vec());
        Self {
            resource,
            bytes,
            guest_claims,
        }
    }

    /// How many host-owned attributes the agent claimed otherwise.
    pub fn guest_claims(&self) -> u32 {
        self.guest_claims
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
}

/// Groups records by resource: pointer first (the common case: one
/// connection, one resource), by value otherwise; arrival order is kept
/// within each group.
pub(crate) fn groups(records: &[SpanRecord]) -> Vec<(&Arc<EncodedResource>, Vec<&SpanRecord>)> {
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
