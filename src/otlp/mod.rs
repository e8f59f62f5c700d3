//! Conversion of the agent's span model into OTLP.
//!
//! 128-bit ids become 16 big-endian bytes (the SDK's `TraceId::to_bytes`
//! and W3C hex order), times nanoseconds, the attribute map a list, the
//! `EvictedQueue`s lists plus dropped counts, the trace state its W3C header
//! string. The resource is the agent's, with `service.name` the trace name
//! and what only the host knows (`kata.sandbox.id`, `kata.vsock.cid`) set by
//! the host; a guest's own value for one goes under `kata.guest.claimed.*`.

pub mod cache;
pub mod encode;
#[cfg(any(test, feature = "oracle"))]
pub(crate) mod oracle;
pub mod record;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::wire::model::{self, Array, Value};

pub use cache::ResourceCache;
#[cfg(any(test, feature = "oracle"))]
pub use oracle::{group_by_resource, span};
pub use record::{encode_request, EncodedRequest, EncodedResource, SpanRecord};

/// OTLP `SpanFlags` above the W3C trace flags: a (linked) context's
/// remote-ness is known, and it is remote.
pub(crate) const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
pub(crate) const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

pub(crate) const SERVICE_NAME: &str = "service.name";

pub const SANDBOX_ID: &str = "kata.sandbox.id";
/// An int.
pub(crate) const VSOCK_CID: &str = "kata.vsock.cid";

/// Who a span comes from: only the host knows (socket, CID), so a guest's
/// value never reaches the collector under these keys.
pub(crate) const HOST_OWNED: [&str; 2] = [SANDBOX_ID, VSOCK_CID];

/// `kata.sandbox.id` claimed by a guest is `kata.guest.claimed.sandbox.id`.
pub(crate) const GUEST_CLAIMED_PREFIX: &str = "kata.guest.claimed.";

pub(crate) fn guest_claim_key(key: &str) -> String {
    let key = key.strip_prefix("kata.").unwrap_or(key);
    format!("{GUEST_CLAIMED_PREFIX}{key}")
}

/// Where a connection's spans come from, as the forwarder knows it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// `service.name` (the `--trace-name`).
    pub service_name: String,
    /// Typed resource attributes the host knows; they win over the agent's.
    pub extra: Vec<KeyValue>,
}

impl Origin {
    pub fn with(mut self, key: &str, value: any_value::Value) -> Origin {
        self.extra.push(kv(key, wrap(value)));
        self
    }

    fn knows(&self, key: &str) -> Option<&KeyValue> {
        self.extra.iter().find(|kv| kv.key == key)
    }
}

pub fn resource(agent: Option<&model::Resource<'_>>, origin: &Origin) -> Resource {
    resource_with_claims(agent, origin).0
}

/// [`resource`], and how many host-owned attributes the agent claimed with
/// a value the host does not confirm (kept under [`guest_claim_key`]). A
/// guest that writes such a claimed key itself keeps it, unless the
/// forwarder fills that key with a claim of its own.
pub(crate) fn resource_with_claims(
    agent: Option<&model::Resource<'_>>,
    origin: &Origin,
) -> (Resource, u32) {
    let agent_attrs = agent.map(|r| r.attrs.as_slice()).unwrap_or(&[]);
    let mut attributes = Vec::with_capacity(agent_attrs.len() + origin.extra.len() + 1);
    let service_name = any_value::Value::StringValue(origin.service_name.clone());
    attributes.push(kv(SERVICE_NAME, wrap(service_name)));
    let host_owned = |key: &str| HOST_OWNED.contains(&key) || origin.knows(key).is_some();
    let mut claims = Vec::new();
    for a in agent_attrs {
        let key = a.key.as_str();
        if key == SERVICE_NAME || !host_owned(key) {
            continue;
        }
        let value = any_value(&a.value);
        let confirmed = origin
            .knows(key)
            .is_some_and(|host| host.value.as_ref() == Some(&value));
        if !confirmed {
            claims.push(kv(&guest_claim_key(key), value));
        }
    }
    for kv in agent_attrs {
        let key = kv.key.as_str();
        if key == SERVICE_NAME || host_owned(key) || claims.iter().any(|c| c.key == key) {
            continue;
        }
        attributes.push(key_value(kv));
    }
    let n = u32::try_from(claims.len()).unwrap_or(u32::MAX);
    attributes.append(&mut claims);
    for kv in &origin.extra {
        if !attributes.iter().any(|a| a.key == kv.key) {
            attributes.push(kv.clone());
        }
    }
    let resource = Resource {
        attributes,
        ..Default::default()
    };
    (resource, n)
}

pub(crate) fn key_value(agent: &model::KeyValue<'_>) -> KeyValue {
    kv(agent.key.as_str(), any_value(&agent.value))
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry_proto::tonic::trace::v1::{span, status};

    use super::*;
    use crate::wire::{decode_json, ResourceSeen};

    /// The agent's kinds and codes are valued as OTLP's, and encoded so.
    #[test]
    fn kinds_and_codes_are_otlp_numbers() {
        use crate::wire::model::{SpanKind as K, StatusCode as C};
        use span::SpanKind as P;
        let kinds = [
            (K::Client, P::Client),
            (K::Server, P::Server),
            (K::Producer, P::Producer),
            (K::Consumer, P::Consumer),
            (K::Internal, P::Internal),
        ];
        for (k, p) in kinds {
            assert_eq!(k as i32, p as i32, "{k:?}");
        }
        use status::StatusCode as S;
        for (c, s) in [(C::Unset, S::Unset), (C::Ok, S::Ok), (C::Error, S::Error)] {
            assert_eq!(c as i32, s as i32, "{c:?}");
        }
    }

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
    fn the_host_wins_and_the_guest_claim_is_kept_under_its_own_key() {
        let span = decode_json(SPAN.as_bytes()).unwrap();
        let (r, claims) = resource_with_claims(span.resource.as_ref(), &origin());
        let s = |v: &str| Some(any_value::Value::StringValue(v.into()));
        assert_eq!(attr(&r, SERVICE_NAME).cloned(), s("kata-agent"));
        assert_eq!(attr(&r, SANDBOX_ID).cloned(), s("forwarder-set"));
        assert_eq!(
            attr(&r, "kata.guest.claimed.sandbox.id").cloned(),
            s("agent-set")
        );
        assert_eq!(claims, 1);
        assert_eq!(
            attr(&r, VSOCK_CID).cloned(),
            Some(any_value::Value::IntValue(3))
        );
        assert_eq!(attr(&r, "host").cloned(), s("vm"));
        for key in [SERVICE_NAME, SANDBOX_ID, "kata.guest.claimed.sandbox.id"] {
            let n = r.attributes.iter().filter(|kv| kv.key == key).count();
            assert_eq!(n, 1, "{key}");
        }

        // The same value as the host's is no claim; a host-owned key the
        // host does not know is unconfirmed, so it is moved all the same.
        let agrees = SPAN.replace("agent-set", "forwarder-set");
        let span = decode_json(agrees.as_bytes()).unwrap();
        let (r, claims) = resource_with_claims(span.resource.as_ref(), &origin());
        assert_eq!(claims, 0);
        assert_eq!(attr(&r, SANDBOX_ID).cloned(), s("forwarder-set"));
        assert!(attr(&r, "kata.guest.claimed.sandbox.id").is_none());
        let unknown = Origin {
            service_name: "kata-agent".into(),
            extra: Vec::new(),
        };
        let span = decode_json(SPAN.as_bytes()).unwrap();
        let (r, claims) = resource_with_claims(span.resource.as_ref(), &unknown);
        assert_eq!(claims, 1);
        assert!(attr(&r, SANDBOX_ID).is_none());
        assert_eq!(
            attr(&r, "kata.guest.claimed.sandbox.id").cloned(),
            s("agent-set")
        );
    }

    #[test]
    fn a_claim_key_the_guest_wrote_itself_never_duplicates_ours() {
        let both = SPAN.replace(
            r#""host":{"String":"vm"}"#,
            r#""kata.guest.claimed.sandbox.id":{"String":"self-made"},"kata.guest.claimed.other":{"String":"x"}"#,
        );
        let span = decode_json(both.as_bytes()).unwrap();
        let (r, claims) = resource_with_claims(span.resource.as_ref(), &origin());
        assert_eq!(claims, 1);
        let claimed: Vec<_> = r
            .attributes
            .iter()
            .filter(|kv| kv.key == "kata.guest.claimed.sandbox.id")
            .collect();
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            attr(&r, "kata.guest.claimed.sandbox.id").cloned(),
            Some(any_value::Value::StringValue("agent-set".into()))
        );
        assert!(attr(&r, "kata.guest.claimed.other").is_some());
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
            d.resource().attributes.len(),
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
