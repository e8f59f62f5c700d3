//! A fast path for the JSON the agent actually writes.
//!
//! The agent's JSON is `serde_json::to_vec(&SpanData)`: compact, keys in
//! order, one shape. Read straight into [`AgentSpan`], strings scanned eight
//! bytes at a time, it decodes two to three times faster than `serde_json`
//! (the JSON decode is most of the per-span cost).
//!
//! Not a second definition of the format: on anything unexpected
//! (whitespace, key order, unknown or duplicate keys, a float for an
//! integer, an unknown escape, an integer out of range, trailing bytes) it
//! gives up, and `serde_json`'s result and error stand. It must never accept
//! what `serde_json` rejects or reads differently; the tests compare the two
//! on real frames and every single-byte corruption of them. Nothing recurses
//! or allocates by a claimed count.

// Every index below is bounded by a length check just before it (and the
// module is fuzzed: crates/fuzz-decode), so the indexing lint is lifted.
#![allow(clippy::indexing_slicing)]

use std::borrow::Cow;

use super::model::{
    AgentSpan, Array, Attributes, Event, KeyValue, Link, Queue, Resource, Skip, SpanContext,
    SpanKind, StatusCode, Str, Time, Value, F64,
};
use super::ResourceSeen;

#[derive(Debug)]
pub(crate) struct GiveUp;

type R<T> = Result<T, GiveUp>;

/// Decodes `payload` if in the agent's compact layout; the resource (last)
/// is not decoded when its bytes are `known`, a previous span's.
pub(crate) fn decode_reusing<'a>(
    payload: &'a [u8],
    known: &[u8],
) -> Option<(AgentSpan<'a>, ResourceSeen<'a>)> {
    let mut p = Parser { b: payload, i: 0 };
    let decoded = p.span(known).ok()?;
    (p.i == payload.len()).then_some(decoded)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Bytes of `w` that are zero, as their high bits (exact for the lowest).
#[inline]
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(LO) & !w & HI
}

impl<'a> Parser<'a> {
    #[inline]
    fn peek(&self) -> R<u8> {
        self.b.get(self.i).copied().ok_or(GiveUp)
    }

    #[inline]
    fn lit(&mut self, s: &[u8]) -> R<()> {
        if self.b.get(self.i..self.i + s.len()) == Some(s) {
            self.i += s.len();
            Ok(())
        } else {
            Err(GiveUp)
        }
    }

    #[inline]
    fn eat(&mut self, s: &[u8]) -> bool {
        self.lit(s).is_ok()
    }

    /// A non-negative integer as JSON writes it (no leading zeros), up to `max`.
    #[inline]
    fn uint(&mut self, max: u128) -> R<u128> {
        let start = self.i;
        let mut v: u128 = 0;
        while let Some(&c @ b'0'..=b'9') = self.b.get(self.i) {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(c - b'0')))
                .ok_or(GiveUp)?;
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && self.b[start] == b'0') || v > max {
            return Err(GiveUp);
        }
        // A fraction or exponent makes it a float: not ours to read.
        if matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return Err(GiveUp);
        }
        Ok(v)
    }

    #[inline]
    fn u64(&mut self) -> R<u64> {
        self.uint(u128::from(u64::MAX)).map(|v| v as u64)
    }

    #[inline]
    fn u32(&mut self) -> R<u32> {
        self.uint(u128::from(u32::MAX)).map(|v| v as u32)
    }

    fn i64(&mut self) -> R<i64> {
        if self.eat(b"-") {
            let m = self.uint(1u128 << 63)?;
            // serde_json reads `-0` as a float, which no i64 field takes.
            if m == 0 {
                return Err(GiveUp);
            }
            Ok((m as i64).wrapping_neg())
        } else {
            self.uint(i64::MAX as u128).map(|v| v as i64)
        }
    }

    fn bool(&mut self) -> R<bool> {
        if self.eat(b"true") {
            Ok(true)
        } else if self.eat(b"false") {
            Ok(false)
        } else {
            Err(GiveUp)
        }
    }

    /// `null` (serde_json's NaN and infinities) or a number, as `json_f64` reads it.
    fn f64(&mut self) -> R<F64> {
        if self.eat(b"null") {
            return Ok(F64(f64::NAN));
        }
        let start = self.i;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
        }
        // An empty token is no number to json_f64 either.
        super::model::json_f64(&self.b[start..self.i])
            .map(F64)
            .ok_or(GiveUp)
    }

    /// A string, borrowed unless it has escapes.
    fn str(&mut self) -> R<Str<'a>> {
        self.lit(b"\"")?;
        let start = self.i;
        let end = self.scan()?;
        if self.b[end] == b'"' {
            self.i = end + 1;
            let s = std::str::from_utf8(&self.b[start..end]).map_err(|_| GiveUp)?;
            return Ok(Str(Cow::Borrowed(s)));
        }
        // Escapes: unescape into an owned string, as serde_json does.
        let mut out: Vec<u8> = Vec::with_capacity(end - start + 16);
        let (mut seg, mut at) = (start, end);
        loop {
            out.extend_from_slice(&self.b[seg..at]);
            self.i = at + 1;
            match self.b[at] {
                b'"' => break,
                b'\\' => {
                    self.escape(&mut out)?;
                    seg = self.i;
                    at = self.scan()?;
                }
                // A control character: invalid JSON.
                _ => return Err(GiveUp),
            }
        }
        let s = String::from_utf8(out).map_err(|_| GiveUp)?;
        Ok(Str(Cow::Owned(s)))
    }

    /// From `self.i`, the index of the next `"`, `\` or control character.
    #[inline]
    fn scan(&self) -> R<usize> {
        let b = self.b;
        let mut i = self.i;
        while i + 8 <= b.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            let w = u64::from_le_bytes(w);
            let quote = zero_bytes(w ^ (LO * u64::from(b'"')));
            let slash = zero_bytes(w ^ (LO * u64::from(b'\\')));
            // Bytes below 0x20 (exact for the lowest, like zero_bytes).
            let ctrl = w.wrapping_sub(LO * 0x20) & !w & HI;
            let hit = quote | slash | ctrl;
            if hit != 0 {
                return Ok(i + (hit.trailing_zeros() / 8) as usize);
            }
            i += 8;
        }
        while i < b.len() {
            if matches!(b[i], b'"' | b'\\' | 0..=0x1f) {
                return Ok(i);
            }
            i += 1;
        }
        Err(GiveUp)
    }

    /// One escape, after its backslash.
    fn escape(&mut self, out: &mut Vec<u8>) -> R<()> {
        let c = self.peek()?;
        self.i += 1;
        let simple = match c {
            b'"' | b'\\' | b'/' => c,
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hi = self.hex4()?;
                let ch = match hi {
                    0xD800..=0xDBFF => {
                        // A surrogate pair, or serde_json's error.
                        self.lit(b"\\u")?;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(GiveUp);
                        }
                        0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(GiveUp),
                    _ => u32::from(hi),
                };
                let ch = char::from_u32(ch).ok_or(GiveUp)?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            _ => return Err(GiveUp),
        };
        out.push(simple);
        Ok(())
    }

    fn hex4(&mut self) -> R<u16> {
        let digits = self.b.get(self.i..self.i + 4).ok_or(GiveUp)?;
        // Hex digits only: `from_str_radix` would take a sign too.
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(GiveUp);
        }
        self.i += 4;
        let digits = std::str::from_utf8(digits).map_err(|_| GiveUp)?;
        u16::from_str_radix(digits, 16).map_err(|_| GiveUp)
    }

    fn seq<T>(&mut self, mut item: impl FnMut(&mut Self) -> R<T>) -> R<Vec<T>> {
        self.lit(b"[")?;
        let mut out = Vec::new();
        if self.eat(b"]") {
            return Ok(out);
        }
        loop {
            out.push(item(self)?);
            if !self.eat(b",") {
                self.lit(b"]")?;
                return Ok(out);
            }
        }
    }

    fn map(&mut self) -> R<Vec<KeyValue<'a>>> {
        self.lit(b"{")?;
        let mut out = Vec::new();
        if self.eat(b"}") {
            return Ok(out);
        }
        loop {
            out.push(KeyValue {
                key: self.str()?,
                value: self.after(b":", Self::value)?,
            });
            if !self.eat(b",") {
                return self.close(out);
            }
        }
    }

    fn value(&mut self) -> R<Value<'a>> {
        self.lit(b"{\"")?;
        let v = match self.peek()? {
            b'S' => Value::String(self.after(b"String\":", Self::str)?),
            b'I' => Value::I64(self.after(b"I64\":", Self::i64)?),
            b'B' => Value::Bool(self.after(b"Bool\":", Self::bool)?),
            b'F' => Value::F64(self.after(b"F64\":", Self::f64)?),
            b'A' => {
                self.lit(b"Array\":{\"")?;
                let a = match self.peek()? {
                    b'S' => Array::String(self.after(b"String\":", |p| p.seq(Self::str))?),
                    b'I' => Array::I64(self.after(b"I64\":", |p| p.seq(Self::i64))?),
                    b'B' => Array::Bool(self.after(b"Bool\":", |p| p.seq(Self::bool))?),
                    b'F' => Array::F64(self.after(b"F64\":", |p| p.seq(Self::f64))?),
                    _ => return Err(GiveUp),
                };
                self.lit(b"}")?;
                Value::Array(a)
            }
            _ => return Err(GiveUp),
        };
        self.lit(b"}")?;
        Ok(v)
    }

    /// `s` (a key, with what precedes it), then `f`'s value.
    #[inline]
    fn after<T>(&mut self, s: &[u8], f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        self.lit(s)?;
        f(self)
    }

    #[inline]
    fn nullable<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<Option<T>> {
        match self.eat(b"null") {
            true => Ok(None),
            false => f(self).map(Some),
        }
    }

    #[inline]
    fn close<T>(&mut self, v: T) -> R<T> {
        self.lit(b"}")?;
        Ok(v)
    }

    fn time(&mut self) -> R<Time> {
        let t = Time {
            secs_since_epoch: self.after(b"{\"secs_since_epoch\":", Self::u64)?,
            nanos_since_epoch: self.after(b",\"nanos_since_epoch\":", Self::u32)?,
        };
        self.close(t)
    }

    fn span_context(&mut self) -> R<SpanContext<'a>> {
        let ctx = SpanContext {
            trace_id: self.after(b"{\"trace_id\":", |p| p.uint(u128::MAX))?,
            span_id: self.after(b",\"span_id\":", Self::u64)?,
            trace_flags: self.after(b",\"trace_flags\":", |p| p.uint(u128::from(u8::MAX)))? as u8,
            is_remote: self.after(b",\"is_remote\":", Self::bool)?,
            trace_state: self.after(b",\"trace_state\":", |p| {
                p.nullable(|p| {
                    p.seq(|p| {
                        let k = p.after(b"[", Self::str)?;
                        let v = p.after(b",", Self::str)?;
                        p.lit(b"]")?;
                        Ok((k, v))
                    })
                })
            })?,
        };
        self.close(ctx)
    }

    /// `{"queue":null|[...],"max_len":N,"dropped_count":N}`
    fn queue<T>(&mut self, item: impl FnMut(&mut Self) -> R<T>) -> R<Queue<T>> {
        let q = Queue {
            queue: self.after(b"{\"queue\":", |p| p.nullable(|p| p.seq(item)))?,
            max_len: self.after(b",\"max_len\":", Self::u32)?,
            dropped_count: self.after(b",\"dropped_count\":", Self::u32)?,
        };
        self.close(q)
    }

    /// `[{"key":..,"value":..},...]`
    fn key_values(&mut self) -> R<Vec<KeyValue<'a>>> {
        self.seq(|p| {
            let kv = KeyValue {
                key: p.after(b"{\"key\":", Self::str)?,
                value: p.after(b",\"value\":", Self::value)?,
            };
            p.close(kv)
        })
    }

    fn event(&mut self) -> R<Event<'a>> {
        let e = Event {
            name: self.after(b"{\"name\":", Self::str)?,
            timestamp: self.after(b",\"timestamp\":", Self::time)?,
            attributes: self.after(b",\"attributes\":", Self::key_values)?,
            dropped_attributes_count: self.after(b",\"dropped_attributes_count\":", Self::u32)?,
        };
        self.close(e)
    }

    fn link(&mut self) -> R<Link<'a>> {
        let l = Link {
            span_context: self.after(b"{\"span_context\":", Self::span_context)?,
            attributes: self.after(b",\"attributes\":", Self::key_values)?,
            dropped_attributes_count: self.after(b",\"dropped_attributes_count\":", Self::u32)?,
        };
        self.close(l)
    }

    fn span(&mut self, known: &[u8]) -> R<(AgentSpan<'a>, ResourceSeen<'a>)> {
        let mut span = AgentSpan {
            span_context: self.after(b"{\"span_context\":", Self::span_context)?,
            parent_span_id: self.after(b",\"parent_span_id\":", Self::u64)?,
            span_kind: self.after(b",\"span_kind\":\"", |p| {
                Ok(if p.eat(b"Server\"") {
                    SpanKind::Server
                } else if p.eat(b"Internal\"") {
                    SpanKind::Internal
                } else if p.eat(b"Client\"") {
                    SpanKind::Client
                } else if p.eat(b"Producer\"") {
                    SpanKind::Producer
                } else if p.eat(b"Consumer\"") {
                    SpanKind::Consumer
                } else {
                    return Err(GiveUp);
                })
            })?,
            name: self.after(b",\"name\":", Self::str)?,
            start_time: self.after(b",\"start_time\":", Self::time)?,
            end_time: self.after(b",\"end_time\":", Self::time)?,
            attributes: Attributes {
                map: self.after(b",\"attributes\":{\"map\":", Self::map)?,
                // Read for validity only, as the serde path does.
                evict_list: self
                    .after(b",\"evict_list\":", |p| p.seq(|p| p.str().map(drop)))
                    .map(|_| Skip::default())?,
                max_len: self.after(b",\"max_len\":", Self::u32)?,
                dropped_count: self.after(b",\"dropped_count\":", Self::u32)?,
            },
            events: self.after(b"},\"events\":", |p| p.queue(Self::event))?,
            links: self.after(b",\"links\":", |p| p.queue(Self::link))?,
            status_code: self.after(b",\"status_code\":\"", |p| {
                Ok(if p.eat(b"Unset\"") {
                    StatusCode::Unset
                } else if p.eat(b"Ok\"") {
                    StatusCode::Ok
                } else if p.eat(b"Error\"") {
                    StatusCode::Error
                } else {
                    return Err(GiveUp);
                })
            })?,
            status_message: self.after(b",\"status_message\":", Self::str)?,
            resource: None,
        };
        self.lit(b",\"resource\":")?;
        let raw = self.b.get(self.i..).ok_or(GiveUp)?;
        if !known.is_empty() && raw == known {
            self.i = self.b.len();
            return Ok((span, ResourceSeen::Same));
        }
        span.resource = self.nullable(|p| {
            let attrs = p.after(b"{\"attrs\":", Self::map)?;
            p.close(Resource { attrs })
        })?;
        self.lit(b"}")?;
        // Up to the end: the caller rejects anything after the span.
        Ok((span, ResourceSeen::New(raw)))
    }
}

#[cfg(test)]
mod tests {
    use kata_agent_emitter::WireFormat;

    use super::*;
    use crate::wire::decode_json_serde;
    use crate::wire::same_span as same;

    /// Decodes `payload` if it is in the agent's own compact layout.
    fn decode(payload: &[u8]) -> Option<AgentSpan<'_>> {
        decode_reusing(payload, &[]).map(|(span, _)| span)
    }

    fn real_payloads() -> Vec<Vec<u8>> {
        crate::wire::real_test_payloads(WireFormat::Json)
    }

    /// The fast path may give up on anything, but what it accepts must be
    /// what serde_json makes of the same bytes.
    fn check(payload: &[u8]) {
        if let Some(fast) = decode(payload) {
            match decode_json_serde(payload) {
                Ok(reference) => assert!(
                    same(&fast, &reference),
                    "fast path differs on {:?}",
                    String::from_utf8_lossy(payload)
                ),
                Err(e) => panic!(
                    "fast path accepted what serde_json rejects ({e}): {:?}",
                    String::from_utf8_lossy(payload)
                ),
            }
        }
    }

    #[test]
    fn takes_every_real_frame_as_serde_json_does() {
        for p in real_payloads() {
            let fast = decode(&p).expect("the fast path takes the agent's own JSON");
            assert!(same(&fast, &decode_json_serde(&p).unwrap()));
        }
    }

    #[test]
    fn never_accepts_a_corruption_serde_json_would_read_otherwise() {
        let replacements = [
            b'"', b'\\', b'0', b'1', b'9', b'-', b'+', b'.', b'e', b' ', b'{', b'}', b'[', b']',
            b',', b':', b'n', b'u', b'x', 0x00, 0x1f, 0x7f, 0x80, 0xc3, 0xff,
        ];
        for p in real_payloads().iter().take(6) {
            for i in 0..p.len() {
                for &r in &replacements {
                    let mut q = p.clone();
                    q[i] = r;
                    check(&q);
                }
                let mut q = p.clone();
                q.remove(i);
                check(&q);
                check(&p[..i]);
            }
        }
    }

    #[test]
    fn edge_cases_agree_with_serde_json() {
        let base = String::from_utf8(real_payloads().remove(0)).unwrap();
        let name_at = base.find("\"name\":\"").unwrap() + 8;
        let name_end = name_at + base[name_at..].find('"').unwrap();
        let with_name = |n: &str| format!("{}{}{}", &base[..name_at], n, &base[name_end..]);
        for name in [
            r"a\nb",
            r"\u00e9",
            r"\ud83d\ude00",
            r"\ud83d",
            r"\ud83dx",
            r"\ude00",
            r"\ud83d\u0041",
            r"\uZZZZ",
            r"\q",
            r"\/\b\f\r\t\\\u0000",
            "\u{7f}",
            "tab\there",
        ] {
            check(with_name(name).as_bytes());
        }
        let i64_at = base.find("{\"I64\":").expect("an i64 attribute") + 7;
        let i64_end = i64_at + base[i64_at..].find('}').unwrap();
        for n in [
            "-0",
            "0",
            "-1",
            "01",
            "1.0",
            "1e3",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
        ] {
            check(format!("{}{}{}", &base[..i64_at], n, &base[i64_end..]).as_bytes());
        }
        // Whitespace, reordering and trailing bytes: the fast path leaves
        // them to serde_json.
        let pretty =
            serde_json::to_vec_pretty(&serde_json::from_str::<serde_json::Value>(&base).unwrap())
                .unwrap();
        assert!(decode(&pretty).is_none());
        assert!(decode(format!("{base} ").as_bytes()).is_none());
        assert!(decode_json_serde(format!("{base} ").as_bytes()).is_ok());
    }
}
