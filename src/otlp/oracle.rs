//! The struct path (prost's OTLP structs), never the forwarder's: the
//! reference [`super::encode`] is held to byte for byte (unit tests, fuzz
//! driver, benchmarks), and the tests' way back from records to structs.

use std::sync::Arc;

use bytes::BytesMut;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use super::record::{groups, EncodedResource, SpanRecord};
use super::{encode, key_value};
use crate::wire::model::{self, AgentSpan};

pub fn span(s: &AgentSpan<'_>) -> Span {
    let ctx = &s.span_context;
    Span {
        trace_id: ctx.trace_id.to_be_bytes().to_vec(),
        span_id: ctx.span_id.to_be_bytes().to_vec(),
        trace_state: ctx.trace_state_header(),
        parent_span_id: match s.parent_span_id {
            0 => Vec::new(),
            p => p.to_be_bytes().to_vec(),
        },
        flags: u32::from(ctx.trace_flags),
        name: s.name.as_str().to_owned(),
        kind: s.span_kind as i32,
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
            code: s.status_code as i32,
        }),
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
    span::Link {
        trace_id: ctx.trace_id.to_be_bytes().to_vec(),
        span_id: ctx.span_id.to_be_bytes().to_vec(),
        trace_state: ctx.trace_state_header(),
        attributes: l.attributes.iter().map(key_value).collect(),
        dropped_attributes_count: l.dropped_attributes_count,
        flags: encode::link_flags(ctx),
    }
}

impl SpanRecord {
    /// A record of one span converted by [`span`].
    pub fn from_span(resource: Arc<EncodedResource>, span: &Span) -> Self {
        let mut buf = BytesMut::with_capacity(span.encoded_len() + 8);
        // As `ScopeSpans.spans` (2).
        prost::encoding::message::encode(2, span, &mut buf);
        Self {
            resource,
            spans: buf.freeze(),
            count: 1,
        }
    }

    /// For the slow paths (`--dump-only`, tests).
    pub fn decode_spans(&self) -> Result<Vec<Span>, prost::DecodeError> {
        ScopeSpans::decode(self.spans.clone()).map(|s| s.spans)
    }
}

/// [`encode_request`]'s request as OTLP structs. Fails only if a record's
/// bytes are not spans.
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
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
        .collect()
}
