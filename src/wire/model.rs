//! The agent's span model, as borrowed views over a frame's payload.
//!
//! They mirror opentelemetry 0.14 and 0.17 `sdk::export::trace::SpanData`
//! field for field, in order, as bincode has no names: a struct is its
//! fields in order, an enum a `u32` variant index, `Option` a `u8` tag,
//! strings, maps and sequences a `u64` length. In JSON, structs are objects
//! and enums externally tagged (`{"I64": 5}`, `"Server"`).
//!
//! ```text
//! SpanData {
//!   span_context: { trace_id: u128, span_id: u64, trace_flags: u8,
//!                   is_remote: bool, trace_state: null | [[k, v], ...] },
//!   parent_span_id: u64,                   // 0 = root
//!   span_kind: Client | Server | Producer | Consumer | Internal,
//!   name: str,
//!   start_time, end_time: { secs_since_epoch: u64, nanos_since_epoch: u32 },
//!   attributes: { map: {key: Value}, evict_list: [key], max_len: u32, dropped_count: u32 },
//!   events: { queue: null | [Event], max_len: u32, dropped_count: u32 },
//!   links:  { queue: null | [Link],  max_len: u32, dropped_count: u32 },
//!   status_code: Unset | Ok | Error,
//!   status_message: str,
//!   resource: null | { attrs: {key: Value} },
//! }
//! Event { name: str, timestamp: time, attributes: [{key, value}], dropped_attributes_count: u32 }
//! Link  { span_context, attributes: [{key, value}], dropped_attributes_count: u32 }
//! Value = Bool(bool) | I64(i64) | F64(f64) | String(str) | Array(Bool([..]) | I64([..]) | F64([..]) | String([..]))
//! ```
//!
//! Strings borrow from the payload (in JSON unless escaped). Maps are read
//! into vectors in wire order. Nothing recurses (no stack overflow by
//! nesting), and sequences grow element by element (a claimed count is
//! never preallocated beyond serde's cautious cap).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Str<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl<'a> Str<'a> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `f64` that also takes JSON `null` (serde_json's NaN and infinities: a
/// span is not lost for one; bincode has none), and a number beyond `f64`
/// (`1e400`) as its sign's infinity: serde_json refuses those before any
/// visitor, so it is taken raw and read by [`json_f64`], as the fast path does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct F64(pub f64);

impl<'de> Deserialize<'de> for F64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            match Option::<&'de serde_json::value::RawValue>::deserialize(d)? {
                None => Ok(F64(f64::NAN)),
                Some(raw) => json_f64(raw.get().as_bytes()).map(F64).ok_or_else(|| {
                    de::Error::invalid_type(de::Unexpected::Other(raw.get()), &"a number")
                }),
            }
        } else {
            f64::deserialize(d).map(F64)
        }
    }
}

/// A JSON number token (RFC 8259's grammar only: no `inf`, `NaN`, leading
/// `+` or `.`) as the nearest `f64`, out of range as its sign's infinity.
pub(crate) fn json_f64(token: &[u8]) -> Option<f64> {
    fn digits(t: &[u8], i: &mut usize) -> usize {
        let start = *i;
        while t.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    }
    let mut i = usize::from(token.first() == Some(&b'-'));
    match token.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(token, &mut i);
        }
        _ => return None,
    }
    if token.get(i) == Some(&b'.') {
        i += 1;
        if digits(token, &mut i) == 0 {
            return None;
        }
    }
    if matches!(token.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(token.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(token, &mut i) == 0 {
            return None;
        }
    }
    if i != token.len() {
        return None;
    }
    // ASCII, and Rust's parser rounds correctly, overflowing to infinity.
    std::str::from_utf8(token).ok()?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AgentSpan<'a> {
    #[serde(borrow)]
    pub span_context: SpanContext<'a>,
    pub parent_span_id: u64,
    pub span_kind: SpanKind,
    pub name: Str<'a>,
    pub start_time: Time,
    pub end_time: Time,
    pub attributes: Attributes<'a>,
    pub events: Queue<Event<'a>>,
    pub links: Queue<Link<'a>>,
    pub status_code: StatusCode,
    pub status_message: Str<'a>,
    pub resource: Option<Resource<'a>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SpanContext<'a> {
    pub trace_id: u128,
    pub span_id: u64,
    pub trace_flags: u8,
    pub is_remote: bool,
    #[serde(borrow)]
    pub trace_state: Option<Vec<(Str<'a>, Str<'a>)>>,
}

impl SpanContext<'_> {
    /// The W3C `tracestate` header value (for `otlp::oracle`).
    #[cfg(any(test, feature = "oracle"))]
    pub(crate) fn trace_state_header(&self) -> String {
        let entries = self.trace_state.iter().flatten();
        let pairs: Vec<String> = entries.map(|(k, v)| format!("{}={}", k.0, v.0)).collect();
        pairs.join(",")
    }
}

/// In the SDK's order (the variant indexes); valued as OTLP's
/// `Span.SpanKind`, so a kind is encoded as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SpanKind {
    Client = 3,
    Server = 2,
    Producer = 4,
    Consumer = 5,
    Internal = 1,
}

/// In the SDK's order, valued as OTLP numbers `Status.StatusCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum StatusCode {
    Unset = 0,
    Ok = 1,
    Error = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Time {
    pub secs_since_epoch: u64,
    pub nanos_since_epoch: u32,
}

impl Time {
    /// Saturating: a clamped guest timestamp beats a lost span.
    pub fn unix_nanos(self) -> u64 {
        self.secs_since_epoch
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(self.nanos_since_epoch))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KeyValue<'a> {
    #[serde(borrow)]
    pub key: Str<'a>,
    pub value: Value<'a>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum Value<'a> {
    Bool(bool),
    I64(i64),
    F64(F64),
    String(#[serde(borrow)] Str<'a>),
    Array(#[serde(borrow)] Array<'a>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum Array<'a> {
    Bool(Vec<bool>),
    I64(Vec<i64>),
    F64(Vec<F64>),
    String(#[serde(borrow)] Vec<Str<'a>>),
}

/// The SDK's `EvictedHashMap`. The eviction list is not used but must be
/// read: bincode cannot skip a field it does not parse.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Attributes<'a> {
    #[serde(borrow, deserialize_with = "map_as_vec")]
    pub map: Vec<KeyValue<'a>>,
    pub evict_list: Skip<Str<'a>>,
    pub max_len: u32,
    pub dropped_count: u32,
}

/// The SDK's `EvictedQueue<T>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Queue<T> {
    pub queue: Option<Vec<T>>,
    pub max_len: u32,
    pub dropped_count: u32,
}

impl<T> Queue<T> {
    pub fn items(&self) -> &[T] {
        self.queue.as_deref().unwrap_or(&[])
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event<'a> {
    #[serde(borrow)]
    pub name: Str<'a>,
    pub timestamp: Time,
    pub attributes: Vec<KeyValue<'a>>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Link<'a> {
    #[serde(borrow)]
    pub span_context: SpanContext<'a>,
    pub attributes: Vec<KeyValue<'a>>,
    pub dropped_attributes_count: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Resource<'a> {
    #[serde(borrow, deserialize_with = "map_as_vec")]
    pub attrs: Vec<KeyValue<'a>>,
}

impl AgentSpan<'_> {
    /// Leaves the last attribute per key in every list of the span, as the
    /// SDK's map keeps the last value: OTLP requires unique keys, and a
    /// guest's map may repeat one.
    pub(crate) fn dedupe_keys(&mut self) {
        dedupe_keys(&mut self.attributes.map);
        for e in self.events.queue.iter_mut().flatten() {
            dedupe_keys(&mut e.attributes);
        }
        for l in self.links.queue.iter_mut().flatten() {
            dedupe_keys(&mut l.attributes);
        }
        if let Some(r) = &mut self.resource {
            dedupe_keys(&mut r.attrs);
        }
    }
}

/// A short list (every real one) is checked pair by pair without
/// allocating; a long one (a guest's making) through a set: linear cost.
fn dedupe_keys(kvs: &mut Vec<KeyValue<'_>>) {
    const PAIRWISE: usize = 16;
    let has_duplicate = if kvs.len() <= PAIRWISE {
        kvs.iter()
            .enumerate()
            .any(|(i, kv)| kvs.iter().skip(i + 1).any(|later| later.key == kv.key))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(kvs.len());
        !kvs.iter().all(|kv| seen.insert(kv.key.as_str()))
    };
    if !has_duplicate {
        return;
    }
    // The last of each key kept: the list reversed, the first kept.
    kvs.reverse();
    let mut seen = std::collections::HashSet::with_capacity(kvs.len());
    kvs.retain(|kv| seen.insert(kv.key.0.clone()));
    kvs.reverse();
}

fn map_as_vec<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Vec<KeyValue<'a>>, D::Error> {
    struct V<'a>(PhantomData<&'a ()>);
    impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
        type Value = Vec<KeyValue<'a>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of attributes")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            // A claimed size is a hint from the guest: cap what it reserves.
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some((key, value)) = map.next_entry::<Str<'a>, Value<'a>>()? {
                out.push(KeyValue { key, value });
            }
            Ok(out)
        }
    }
    d.deserialize_map(V(PhantomData))
}

/// A sequence parsed for validity and position, not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Skip<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Skip<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Skip<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                while seq.next_element::<T>()?.is_some() {}
                Ok(Skip(PhantomData))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}
