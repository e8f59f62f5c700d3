//! Cutting batches to what one request may hold, and requests a
//! collector refused as too large into halves.

use super::*;

/// Cuts `buf` to what one request may hold (at least one span, however
/// large), splitting the record that crosses the line; returns the rest.
pub(super) fn split_batch(buf: &mut Vec<Queued>, cfg: &BatchConfig) -> Vec<Queued> {
    let mut weight = Weight::default();
    // Where to cut: before record `i`, after taking `n` of its spans.
    let mut cut = None;
    for (i, q) in buf.iter().enumerate() {
        let span_room = cfg.max_spans.saturating_sub(weight.spans);
        let byte_room = cfg
            .max_bytes
            .saturating_sub(weight.bytes + weight.resource_cost(q));
        if q.record.count <= span_room && q.record.spans.len() <= byte_room {
            weight.add(q);
            continue;
        }
        let mut n = span_room.min(encode::spans_within(&q.record.spans, byte_room));
        if n == 0 && weight.spans == 0 {
            // A span larger than a request goes alone; the collector decides.
            n = 1;
        }
        cut = Some(if n >= q.record.count {
            (i + 1, 0)
        } else {
            (i, n)
        });
        break;
    }
    let Some((at, n)) = cut else {
        return Vec::new();
    };
    let mut carry = buf.split_off(at.min(buf.len()));
    if n > 0 {
        buf.extend(carry.first_mut().and_then(|q| q.split_to(n)));
    }
    if buf.is_empty() && !carry.is_empty() {
        // Splitting failed (it cannot): an oversized batch rather than none.
        buf.push(carry.remove(0));
    }
    carry
}

/// Splits off the second half of `records`, by spans, and whether the
/// record at the cut was split (ending `records`, beginning the half).
pub(super) fn split_half(records: &mut Vec<SpanRecord>) -> (Vec<SpanRecord>, bool) {
    let mut keep = records.iter().map(|r| r.count).sum::<usize>() / 2;
    let at = records
        .iter()
        .position(|r| {
            let crosses = r.count > keep;
            if !crosses {
                keep -= r.count;
            }
            crosses
        })
        .unwrap_or(records.len());
    let mut second = records.split_off(at);
    let shared = keep > 0 && !second.is_empty();
    if shared {
        records.extend(second.first_mut().map(|r| r.split_to(keep)));
    }
    (second, shared)
}

/// A spooled request in two, each with its spans; `None` if it is not one
/// the batcher made, or holds a single span.
pub(super) fn halves_of(body: &EncodedRequest) -> Option<[(EncodedRequest, u64); 2]> {
    let mut first = decode_request(&body.to_bytes())?;
    let (second, _) = split_half(&mut first);
    let spans = |r: &[SpanRecord]| r.iter().map(|r| r.count as u64).sum::<u64>();
    let (a, b) = (spans(&first), spans(&second));
    (a > 0 && b > 0).then(|| [(encode_request(&first), a), (encode_request(&second), b)])
}
