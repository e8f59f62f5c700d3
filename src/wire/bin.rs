//! A fast path for the agent's bincode.
//!
//! The layout is [`super::model`]'s; read without serde's visitors, a span
//! decodes in a fraction of the time. Like the JSON one, it accepts only
//! what serde accepts, reads it alike, and otherwise gives up (serde's
//! error stands). Every length is checked against the bytes left, and
//! sequences grow element by element: a hostile count costs nothing.

use std::borrow::Cow;

use super::model::{
    AgentSpan, Array, Attributes, Event, KeyValue, Link, Queue, Resource, Skip, SpanContext,
    SpanKind, StatusCode, Str, Time, Value, F64,
};
use super::ResourceSeen;

/// Decodes `payload` if exactly one `SpanData`; the resource (last) is not
/// decoded when its bytes are `known`, a previous span's.
pub(crate) fn decode_reusing<'a>(
    payload: &'a [u8],
    known: &[u8],
) -> Option<(AgentSpan<'a>, ResourceSeen<'a>)> {
    let mut r = Reader { b: payload };
    let decoded = r.span(known)?;
    r.b.is_empty().then_some(decoded)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline]
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.b.split_first_chunk::<N>()?;
        self.b = rest;
        Some(*head)
    }

    #[inline]
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }

    #[inline]
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    #[inline]
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    #[inline]
    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    #[inline]
    fn opt<T>(&mut self, item: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.bool()? {
            item(self).map(Some)
        } else {
            Some(None)
        }
    }

    /// A length, never over the bytes left.
    #[inline]
    fn len(&mut self) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.b.len()).then_some(n)
    }

    #[inline]
    fn str(&mut self) -> Option<Str<'a>> {
        let n = self.len()?;
        let (s, rest) = self.b.split_at(n);
        self.b = rest;
        Some(Str(Cow::Borrowed(std::str::from_utf8(s).ok()?)))
    }

    fn seq<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.len()?;
        // Each element takes at least a byte: `n` is bounded by the payload.
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Some(out)
    }

    fn time(&mut self) -> Option<Time> {
        Some(Time {
            secs_since_epoch: self.u64()?,
            nanos_since_epoch: self.u32()?,
        })
    }

    fn value(&mut self) -> Option<Value<'a>> {
        Some(match self.u32()? {
            0 => Value::Bool(self.bool()?),
            1 => Value::I64(self.u64()? as i64),
            2 => Value::F64(F64(f64::from_bits(self.u64()?))),
            3 => Value::String(self.str()?),
            4 => Value::Array(match self.u32()? {
                0 => Array::Bool(self.seq(Self::bool)?),
                1 => Array::I64(self.seq(|r| r.u64().map(|v| v as i64))?),
                2 => Array::F64(self.seq(|r| r.u64().map(|v| F64(f64::from_bits(v))))?),
                3 => Array::String(self.seq(Self::str)?),
                _ => return None,
            }),
            _ => return None,
        })
    }

    fn key_value(&mut self) -> Option<KeyValue<'a>> {
        Some(KeyValue {
            key: self.str()?,
            value: self.value()?,
        })
    }

    fn span_context(&mut self) -> Option<SpanContext<'a>> {
        Some(SpanContext {
            trace_id: u128::from_le_bytes(self.take()?),
            span_id: self.u64()?,
            trace_flags: self.u8()?,
            is_remote: self.bool()?,
            trace_state: self.opt(|r| r.seq(|r| Some((r.str()?, r.str()?))))?,
        })
    }

    fn queue<T>(&mut self, item: impl FnMut(&mut Self) -> Option<T>) -> Option<Queue<T>> {
        Some(Queue {
            queue: self.opt(|r| r.seq(item))?,
            max_len: self.u32()?,
            dropped_count: self.u32()?,
        })
    }

    fn event(&mut self) -> Option<Event<'a>> {
        Some(Event {
            name: self.str()?,
            timestamp: self.time()?,
            attributes: self.seq(Self::key_value)?,
            dropped_attributes_count: self.u32()?,
        })
    }

    fn link(&mut self) -> Option<Link<'a>> {
        Some(Link {
            span_context: self.span_context()?,
            attributes: self.seq(Self::key_value)?,
            dropped_attributes_count: self.u32()?,
        })
    }

    fn span(&mut self, known: &[u8]) -> Option<(AgentSpan<'a>, ResourceSeen<'a>)> {
        let span_context = self.span_context()?;
        let parent_span_id = self.u64()?;
        // Variant indexes in the SDK's declaration order.
        let span_kind = match self.u32()? {
            0 => SpanKind::Client,
            1 => SpanKind::Server,
            2 => SpanKind::Producer,
            3 => SpanKind::Consumer,
            4 => SpanKind::Internal,
            _ => return None,
        };
        let name = self.str()?;
        let start_time = self.time()?;
        let end_time = self.time()?;
        let map = self.seq(Self::key_value)?;
        // The eviction list: read for validity only, as the serde path does.
        self.seq(|r| r.str().map(drop))?;
        let attributes = Attributes {
            map,
            evict_list: Skip::default(),
            max_len: self.u32()?,
            dropped_count: self.u32()?,
        };
        let events = self.queue(Self::event)?;
        let links = self.queue(Self::link)?;
        let status_code = match self.u32()? {
            0 => StatusCode::Unset,
            1 => StatusCode::Ok,
            2 => StatusCode::Error,
            _ => return None,
        };
        let status_message = self.str()?;
        let raw = self.b;
        let (resource, seen) = if !known.is_empty() && raw == known {
            self.b = &[];
            (None, ResourceSeen::Same)
        } else {
            let resource = self.opt(|r| {
                Some(Resource {
                    attrs: r.seq(Self::key_value)?,
                })
            })?;
            let used = raw.len() - self.b.len();
            (resource, ResourceSeen::New(raw.get(..used)?))
        };
        let span = AgentSpan {
            span_context,
            parent_span_id,
            span_kind,
            name,
            start_time,
            end_time,
            attributes,
            events,
            links,
            status_code,
            status_message,
            resource,
        };
        Some((span, seen))
    }
}

#[cfg(test)]
mod tests {
    use kata_agent_emitter::WireFormat;

    use super::*;
    use crate::wire::decode_bincode_serde;
    use crate::wire::same_span as same;

    /// Decodes `payload` if it is exactly one well-formed bincode `SpanData`.
    fn decode(payload: &[u8]) -> Option<AgentSpan<'_>> {
        decode_reusing(payload, &[]).map(|(span, _)| span)
    }

    fn real_payloads() -> Vec<Vec<u8>> {
        crate::wire::real_test_payloads(WireFormat::Bincode)
    }

    fn check(payload: &[u8]) {
        let fast = decode(payload);
        let reference = decode_bincode_serde(payload);
        match (fast, reference) {
            (Some(f), Ok(r)) => assert!(same(&f, &r), "fast path differs on {payload:?}"),
            (Some(_), Err(e)) => panic!("fast path accepted what serde rejects ({e}): {payload:?}"),
            // Bincode has one reading: the fast path must not give up on
            // what serde takes either.
            (None, Ok(_)) => panic!("fast path gave up on a valid payload: {payload:?}"),
            (None, Err(_)) => {}
        }
    }

    #[test]
    fn reads_every_real_frame_and_every_corruption_as_serde_does() {
        let payloads = real_payloads();
        for p in &payloads {
            assert!(decode(p).is_some());
            check(p);
        }
        for p in payloads.iter().take(6) {
            for i in 0..p.len() {
                for r in [0u8, 1, 2, 3, 4, 5, 0x7b, 0x80, 0xff] {
                    let mut q = p.clone();
                    q[i] = r;
                    check(&q);
                }
                check(&p[..i]);
                let mut q = p.clone();
                q.push(0);
                check(&q);
            }
        }
    }
}
