//! One converted resource per connection.
//!
//! An agent sends the same resource with every span. The cache keeps the
//! last one converted and encoded, so that consecutive spans share it
//! instead of rebuilding it per span, and so that the batcher can group
//! records by pointer.

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

use super::{key_value, resource_with_claims, EncodedResource, Origin};
use crate::wire::model::{self, Array, Value};
use crate::wire::ResourceSeen;

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
        let (converted, claims) = resource_with_claims(agent, origin);
        let r = Arc::new(EncodedResource::with_claims(converted, claims));
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
    fn all<T>(p: &[AnyValue], xs: &[T], same: impl Fn(&V, &T) -> bool) -> bool {
        p.len() == xs.len()
            && p.iter()
                .zip(xs)
                .all(|(p, x)| p.value.as_ref().is_some_and(|v| same(v, x)))
    }
    match (p, m) {
        (V::BoolValue(a), Value::Bool(b)) => a == b,
        (V::IntValue(a), Value::I64(b)) => a == b,
        (V::DoubleValue(a), Value::F64(b)) => a.to_bits() == b.0.to_bits(),
        (V::StringValue(a), Value::String(b)) => a == b.as_str(),
        (V::ArrayValue(a), Value::Array(arr)) => match arr {
            Array::Bool(xs) => all(&a.values, xs, |v, x| matches!(v, V::BoolValue(b) if b == x)),
            Array::I64(xs) => all(&a.values, xs, |v, x| matches!(v, V::IntValue(i) if i == x)),
            Array::F64(xs) => all(
                &a.values,
                xs,
                |v, x| matches!(v, V::DoubleValue(d) if d.to_bits() == x.0.to_bits()),
            ),
            Array::String(xs) => all(
                &a.values,
                xs,
                |v, x| matches!(v, V::StringValue(s) if s == x.as_str()),
            ),
        },
        _ => false,
    }
}
