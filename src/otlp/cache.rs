//! One converted resource per connection: an agent sends the same resource
//! with every span, so consecutive spans share the last one converted (and
//! the batcher groups records by pointer).

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

use super::{key_value, resource_with_claims, EncodedResource, Origin};
use crate::wire::model::{self, Array, Value};
use crate::wire::ResourceSeen;

#[derive(Debug, Default)]
pub struct ResourceCache {
    /// The agent's attributes as last converted (`None`: no resource).
    agent: Option<Vec<KeyValue>>,
    resource: Option<Arc<EncodedResource>>,
    /// Its payload bytes, if known: the same bytes are not decoded again.
    raw: Vec<u8>,
}

impl ResourceCache {
    /// What to pass to [`crate::wire::Decoder::decode_reusing`].
    pub fn known_bytes(&self) -> &[u8] {
        self.resource.as_ref().map_or(&[], |_| &self.raw)
    }

    /// The cached resource if the bytes or attributes are the same, else new.
    pub fn get(
        &mut self,
        agent: Option<&model::Resource<'_>>,
        seen: ResourceSeen<'_>,
        origin: &Origin,
    ) -> Arc<EncodedResource> {
        if let Some(r) = &self.resource {
            if matches!(seen, ResourceSeen::Same) || same_attrs(self.agent.as_deref(), agent) {
                let r = Arc::clone(r);
                seen.remember(&mut self.raw);
                return r;
            }
        }
        // Never `Same`: `known_bytes` are empty until a resource is cached.
        let (converted, guest_claims) = resource_with_claims(agent, origin);
        let mut r = EncodedResource::new(converted);
        r.guest_claims = guest_claims;
        let r = Arc::new(r);
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
