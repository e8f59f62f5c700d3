//! Mutations of a payload: blind byte edits, edits aimed at the bincode
//! layout (little-endian length prefixes, `u32` enum tags) and edits aimed
//! at JSON structure (numbers, nesting, strings, keys, value types).
//!
//! Structure-aware edits matter because blind ones almost always break a
//! payload in its first few bytes: to reach the attribute, event and
//! resource code paths an input has to stay nearly valid, and differ only
//! in the one place a hostile guest would pick.

use crate::corpus::Corpus;
use crate::rng::Rng;

/// Inputs never grow past this, which keeps every case's memory bounded
/// (the largest seed is 64 KiB).
pub const MAX_INPUT: usize = 256 * 1024;

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'{', b'}', b'[', b']', b'"', b'\\', b':', b',', b'0', b'1', b'9',
    b'-', b'.', b'e', b'n', b't', b' ',
];

const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX - 1,
    u32::MAX,
];

/// Replacements for a JSON number: past every integer width, negative
/// where unsigned is expected, fractions and exponents where integers are,
/// and things that are not JSON numbers at all.
const JSON_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-1",
    "1.5",
    "1e3",
    "1E+2",
    "1e999",
    "-1e999",
    "1e-999",
    "5e-324",
    "255",
    "256",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211455",
    "340282366920938463463374607431768211456",
    "-340282366920938463463374607431768211456",
    "00",
    "01",
    "0x10",
    "+1",
    ".5",
    "1.",
    "NaN",
    "Infinity",
    "1e",
    "-",
];

/// Values of every JSON type and of every shape the model knows, to put
/// where something else is expected.
const JSON_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "[null]",
    "[[]]",
    "{\"\":null}",
    "{\"I64\":1}",
    "{\"F64\":null}",
    "{\"Bool\":true}",
    "{\"String\":\"s\"}",
    "{\"Array\":{\"Bool\":[true]}}",
    "{\"Array\":{\"String\":[\"a\",\"b\"]}}",
    "{\"Array\":{\"I64\":[]}}",
    "{\"Array\":{\"F64\":[1.5,null]}}",
    "{\"Array\":null}",
    "{\"Unknown\":1}",
    "{\"I64\":1,\"Bool\":true}",
    "\"Server\"",
    "\"Bogus\"",
    "{\"secs_since_epoch\":1,\"nanos_since_epoch\":2}",
    "{\"queue\":null,\"max_len\":0,\"dropped_count\":0}",
    "{\"queue\":[],\"max_len\":0,\"dropped_count\":0}",
    "[[\"k\",\"v\"]]",
    "[[\"k\"]]",
    "[[\"k\",\"v\",\"w\"]]",
];

/// Members to insert at the start of an object: duplicates of real field
/// names (serde rejects duplicate fields, but an attribute map keeps both),
/// and unknown fields.
const JSON_MEMBERS: &[&str] = &[
    "\"name\":\"dup\",",
    "\"span_context\":{\"trace_id\":1,\"span_id\":1,\"trace_flags\":1,\"is_remote\":false,\"trace_state\":null},",
    "\"trace_id\":1,",
    "\"span_id\":0,",
    "\"map\":{},",
    "\"queue\":null,",
    "\"resource\":null,",
    "\"attrs\":{\"a\":{\"I64\":1}},",
    "\"service.name\":{\"String\":\"dup\"},",
    "\"unknown\":[1,{\"a\":null}],",
    "\"\":null,",
];

/// Enum variant names and keywords, swapped for one another.
const JSON_TOKENS: &[&str] = &[
    "Client", "Server", "Producer", "Consumer", "Internal", "Unset", "Ok", "Error", "Bool", "I64",
    "F64", "String", "Array", "null", "true", "false", "queue", "map", "attrs",
];

/// Bytes that are not UTF-8: stray continuation, truncated sequences,
/// overlong encodings, an encoded surrogate, out-of-range code points.
const INVALID_UTF8: &[&[u8]] = &[
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc0\x80",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
];

/// Escapes to put inside a JSON string: lone and reversed surrogates,
/// NUL, unknown and truncated escapes, a valid pair.
const JSON_ESCAPES: &[&str] = &[
    "\\ud800",
    "\\udc00",
    "\\udfff\\ud800",
    "\\ud800\\u0041",
    "\\ud800\\",
    "\\ud83d\\ude00",
    "\\u0000",
    "\\uZZZZ",
    "\\u12",
    "\\x41",
    "\\",
    "\\\"",
    "\\/",
    "\\b\\f\\n\\r\\t",
];

/// Applies one to eight mutations, chosen and placed by `rng`.
pub fn mutate(buf: &mut Vec<u8>, rng: &mut Rng, corpus: &Corpus) {
    let n = rng.geometric(8);
    for _ in 0..n {
        mutate_once(buf, rng, corpus);
        buf.truncate(MAX_INPUT);
    }
}

fn mutate_once(buf: &mut Vec<u8>, rng: &mut Rng, corpus: &Corpus) {
    let json = looks_like_json(buf);
    // JSON-aware edits are tried on JSON-looking input most of the time;
    // on anything else they would mostly not find their anchor.
    if json && rng.chance(60) {
        if json_mutation(buf, rng, corpus) {
            return;
        }
    } else if !json && rng.chance(30) && bincode_mutation(buf, rng) {
        return;
    }
    byte_mutation(buf, rng, corpus);
}

fn looks_like_json(buf: &[u8]) -> bool {
    buf.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// A position in `0..=len`.
fn pos(buf: &[u8], rng: &mut Rng) -> usize {
    rng.below(buf.len() + 1)
}

/// A range of at most `max` bytes inside `buf` (empty if `buf` is).
fn range(buf: &[u8], rng: &mut Rng, max: usize) -> (usize, usize) {
    let start = pos(buf, rng);
    let len = rng.below(max.min(buf.len() - start) + 1);
    (start, start + len)
}

fn byte_mutation(buf: &mut Vec<u8>, rng: &mut Rng, corpus: &Corpus) {
    match rng.below(11) {
        // Flip one bit.
        0 | 1 if !buf.is_empty() => {
            let i = rng.below(buf.len());
            buf[i] ^= 1 << rng.below(8);
        }
        // Set a byte to an interesting value.
        2 | 3 if !buf.is_empty() => {
            let i = rng.below(buf.len());
            buf[i] = *rng.pick(INTERESTING_BYTES);
        }
        // Insert random or interesting bytes.
        4 => {
            let at = pos(buf, rng);
            let n = rng.range(1, 16);
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    if rng.chance(50) {
                        rng.next_u64() as u8
                    } else {
                        *rng.pick(INTERESTING_BYTES)
                    }
                })
                .collect();
            buf.splice(at..at, bytes);
        }
        // Delete a range.
        5 => {
            let (a, b) = range(buf, rng, 64);
            buf.drain(a..b);
        }
        // Duplicate a range somewhere else (a repeated field, a repeated
        // element, a shifted tail).
        6 => {
            let (a, b) = range(buf, rng, 256);
            let copy = buf[a..b].to_vec();
            let at = pos(buf, rng);
            buf.splice(at..at, copy);
        }
        // Truncate.
        7 => {
            let at = pos(buf, rng);
            buf.truncate(at);
        }
        // Splice: this payload's head onto another's tail, possibly of the
        // other format.
        8 => {
            let other = corpus.pick_other(rng);
            let at = pos(buf, rng);
            let from = rng.below(other.len() + 1);
            buf.truncate(at);
            buf.extend_from_slice(&other[from..]);
        }
        // Replace everything with random bytes (short: long random input
        // fails at its first bytes anyway).
        9 if rng.chance(20) => {
            let n = rng.below(512);
            buf.clear();
            buf.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        // Overwrite 8 bytes anywhere with a hostile little-endian u64.
        _ => {
            if buf.len() >= 8 {
                let i = rng.below(buf.len() - 7);
                let v = hostile_len(rng, buf.len(), buf.len() - i - 8, 0);
                buf[i..i + 8].copy_from_slice(&v.to_le_bytes());
            } else if !buf.is_empty() {
                let i = rng.below(buf.len());
                buf[i] = rng.next_u64() as u8;
            }
        }
    }
}

/// A length to claim: huge, at type boundaries, or just off the truth
/// (`current` is what the field held, `remaining` the bytes after it).
pub fn hostile_len(rng: &mut Rng, total: usize, remaining: usize, current: u64) -> u64 {
    let total = total as u64;
    let remaining = remaining as u64;
    match rng.below(15) {
        0 => u64::MAX,
        1 => u64::MAX - 1,
        2 => 1 << 63,
        3 => 1 << 32,
        4 => (1 << 32) - 1,
        5 => 1 << 31,
        6 => remaining + 1,
        7 => remaining.saturating_sub(1),
        8 => remaining,
        9 => current.wrapping_add(1),
        10 => current.wrapping_sub(1),
        11 => 0,
        12 => total,
        13 => rng.next_u64() % (total + 64).max(1),
        _ => rng.next_u64(),
    }
}

/// Edits at the places bincode gives meaning to: the `u64` length in front
/// of every string, map and sequence, and the `u32` enum tags. Returns
/// false when no such place was found.
fn bincode_mutation(buf: &mut [u8], rng: &mut Rng) -> bool {
    if buf.len() < 8 {
        return false;
    }
    if rng.chance(70) {
        // A plausible length field: a little-endian u64 no larger than the
        // payload, searched from a random place onwards (and wrapping).
        let n = buf.len() - 7;
        let start = rng.below(n);
        for k in 0..n {
            let i = (start + k) % n;
            let v = u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
            if v > 0 && v <= buf.len() as u64 {
                let new = hostile_len(rng, buf.len(), buf.len() - i - 8, v);
                buf[i..i + 8].copy_from_slice(&new.to_le_bytes());
                return true;
            }
        }
        false
    } else {
        // A small u32 (an enum tag, a count, a nanosecond field).
        let n = buf.len() - 3;
        let start = rng.below(n);
        for k in 0..n {
            let i = (start + k) % n;
            let v = u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
            if v < 8 {
                let new = *rng.pick(INTERESTING_U32);
                buf[i..i + 4].copy_from_slice(&new.to_le_bytes());
                return true;
            }
        }
        false
    }
}

/// Structure-aware JSON edits. Returns false when the edit found no anchor
/// (no number, no member, no string...).
fn json_mutation(buf: &mut Vec<u8>, rng: &mut Rng, corpus: &Corpus) -> bool {
    match rng.below(10) {
        0 | 1 => replace_number(buf, rng),
        2 => replace_value(buf, rng, |_, _| Some(b"null".to_vec())),
        3 => replace_value(buf, rng, |rng, _| {
            Some(rng.pick(JSON_VALUES).as_bytes().to_vec())
        }),
        // A value moved from elsewhere in this or another JSON payload.
        4 => {
            let other = if rng.chance(50) {
                None
            } else {
                Some(corpus.pick_other(rng).to_vec())
            };
            replace_value(buf, rng, move |rng, this| {
                let src = other.as_deref().unwrap_or(this);
                let (a, b) = find_value(src, rng)?;
                Some(src[a..b].to_vec())
            })
        }
        5 => deep_nesting(buf, rng),
        6 => insert_in_string(buf, rng),
        7 => duplicate_member(buf, rng),
        8 => swap_token(buf, rng),
        _ => {
            // Whitespace, JSON's own and some it does not allow.
            let ws: &[&[u8]] = &[
                b" ",
                b"\n",
                b"\t",
                b"\r",
                b"\x0c",
                b"\xc2\xa0",
                b"\xe2\x80\xa8",
            ];
            let at = pos(buf, rng);
            let w = *rng.pick(ws);
            buf.splice(at..at, w.iter().copied());
            true
        }
    }
}

/// The first index `>= from` (wrapping) where `pred` holds.
fn find_from(buf: &[u8], from: usize, pred: impl Fn(u8) -> bool) -> Option<usize> {
    let n = buf.len();
    (0..n).map(|k| (from + k) % n).find(|&i| pred(buf[i]))
}

fn replace_number(buf: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if buf.is_empty() {
        return false;
    }
    let from = rng.below(buf.len());
    let Some(mut start) = find_from(buf, from, |b| b.is_ascii_digit()) else {
        return false;
    };
    while start > 0 && matches!(buf[start - 1], b'0'..=b'9' | b'-' | b'.') {
        start -= 1;
    }
    let mut end = start;
    while end < buf.len() && matches!(buf[end], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
        end += 1;
    }
    let new: Vec<u8> = if rng.chance(5) {
        // Thousands of digits: arbitrary-precision paths and their limits.
        std::iter::once(b'1')
            .chain(std::iter::repeat_n(b'0', rng.range(100, 5000)))
            .collect()
    } else {
        rng.pick(JSON_NUMBERS).as_bytes().to_vec()
    };
    buf.splice(start..end, new);
    true
}

/// The span of the value that follows a `:` found from a random place:
/// strings, objects and arrays are matched to their end (string-aware),
/// scalars run to the next delimiter.
fn find_value(buf: &[u8], rng: &mut Rng) -> Option<(usize, usize)> {
    if buf.is_empty() {
        return None;
    }
    let from = rng.below(buf.len());
    let colon = find_from(buf, from, |b| b == b':')?;
    let mut start = colon + 1;
    while start < buf.len() && buf[start].is_ascii_whitespace() {
        start += 1;
    }
    let end = value_end(buf, start)?;
    Some((start, end))
}

fn value_end(buf: &[u8], start: usize) -> Option<usize> {
    match *buf.get(start)? {
        b'"' => string_end(buf, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < buf.len() {
                match buf[i] {
                    b'"' => {
                        i = string_end(buf, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = start;
            while i < buf.len() && !matches!(buf[i], b',' | b'}' | b']' | b' ' | b'\n') {
                i += 1;
            }
            Some(i)
        }
    }
}

/// One past the closing quote of the string opening at `start`.
fn string_end(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < buf.len() {
        match buf[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn replace_value(
    buf: &mut Vec<u8>,
    rng: &mut Rng,
    with: impl FnOnce(&mut Rng, &[u8]) -> Option<Vec<u8>>,
) -> bool {
    let Some((a, b)) = find_value(buf, rng) else {
        return false;
    };
    let Some(new) = with(rng, buf) else {
        return false;
    };
    buf.splice(a..b, new);
    true
}

/// Wraps a value in deep `[` or `{"k":` nesting, closed or not: past
/// serde_json's recursion limit, and far past any stack a recursive
/// decoder would have.
fn deep_nesting(buf: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let depth = *rng.pick(&[2, 64, 126, 127, 128, 129, 1000, 20_000]);
    let (open, close): (&[u8], &[u8]) = if rng.chance(70) {
        (b"[", b"]")
    } else {
        (b"{\"k\":", b"}")
    };
    if rng.chance(50) && !buf.is_empty() {
        // As an unknown member, which serde skips by parsing it whole: the
        // one place where the model accepts any value, and so any depth.
        let from = rng.below(buf.len());
        let Some(brace) = find_from(buf, from, |b| b == b'{') else {
            return false;
        };
        let mut member = b"\"unknown\":".to_vec();
        member.extend(open.repeat(depth));
        member.push(b'1');
        member.extend(close.repeat(depth));
        member.push(b',');
        buf.splice(brace + 1..brace + 1, member);
        return true;
    }
    let Some((a, b)) = find_value(buf, rng) else {
        return false;
    };
    if rng.chance(50) {
        let closing: Vec<u8> = close.repeat(depth);
        buf.splice(b..b, closing);
    }
    buf.splice(a..a, open.repeat(depth));
    true
}

/// Invalid UTF-8 or a hostile escape just inside a string.
fn insert_in_string(buf: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if buf.is_empty() {
        return false;
    }
    let from = rng.below(buf.len());
    let Some(q) = find_from(buf, from, |b| b == b'"') else {
        return false;
    };
    let bytes: &[u8] = if rng.chance(50) {
        INVALID_UTF8[rng.below(INVALID_UTF8.len())]
    } else {
        rng.pick(JSON_ESCAPES).as_bytes()
    };
    buf.splice(q + 1..q + 1, bytes.iter().copied());
    true
}

/// Repeats a `"key":value` member of some object right after itself, or
/// inserts a known member at the start of an object.
fn duplicate_member(buf: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if buf.is_empty() {
        return false;
    }
    if rng.chance(50) {
        let from = rng.below(buf.len());
        let Some(brace) = find_from(buf, from, |b| b == b'{') else {
            return false;
        };
        let m = rng.pick(JSON_MEMBERS).as_bytes();
        buf.splice(brace + 1..brace + 1, m.iter().copied());
        return true;
    }
    let Some((_, end)) = find_value(buf, rng) else {
        return false;
    };
    // Walk back from the value over `:` to the key's opening quote.
    let Some(colon) = buf[..end].iter().rposition(|&b| b == b':') else {
        return false;
    };
    let Some(close) = buf[..colon].iter().rposition(|&b| b == b'"') else {
        return false;
    };
    let Some(open) = buf[..close].iter().rposition(|&b| b == b'"') else {
        return false;
    };
    let mut member = vec![b','];
    member.extend_from_slice(&buf[open..end]);
    buf.splice(end..end, member);
    true
}

fn swap_token(buf: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let from = *rng.pick(JSON_TOKENS);
    let to = *rng.pick(JSON_TOKENS);
    let hay = &buf[..];
    let starts: Vec<usize> = hay
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from.as_bytes())
        .map(|(i, _)| i)
        .take(64)
        .collect();
    if starts.is_empty() {
        return false;
    }
    let at = *rng.pick(&starts);
    buf.splice(at..at + from.len(), to.bytes());
    true
}
