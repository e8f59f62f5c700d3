//! `--dump-format tree`: each trace as an indented tree, for a person.
//!
//! The agent sends each span as it ends, the root last. A trace is held
//! until its root comes, or it has been quiet for the linger time (most
//! agent traces hang under a runtime span never seen here). Later spans are
//! printed on their own, marked late; past `max_spans` held, the oldest
//! trace is printed, marked incomplete; the rest at exit (nothing is
//! dropped). The guest's strings have control characters escaped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::Instant;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;

use crate::config::DumpConfig;
use crate::otlp::EncodedRequest;

/// Attributes shown first: the agent's RPC request and its ids.
const KEY_ATTRIBUTES: [&str; 5] = ["req", "request", "container_id", "exec_id", "sandbox_id"];
/// Attributes a line shows at most, key attributes first.
const MAX_ATTRIBUTES: usize = 4;
/// Characters kept of a value, a name, an error message.
const VALUE_CHARS: usize = 40;
const NAME_CHARS: usize = 80;
const MESSAGE_CHARS: usize = 120;
const SANDBOX_ATTRIBUTE: &str = "kata.sandbox.id";

struct Held {
    span: Span,
    sandbox: Option<String>,
}

struct Trace {
    seq: u64,
    last: Instant,
    rooted: bool,
    spans: Vec<Held>,
}

pub(crate) struct TreeWriter {
    out: Box<dyn Write + Send + Sync>,
    pub(super) opts: DumpConfig,
    traces: HashMap<Vec<u8>, Trace>,
    /// The traces held, oldest first.
    arrival: BTreeMap<u64, Vec<u8>>,
    held: usize,
    /// Traces printed, with their start, for late spans; bounded like spans.
    printed: HashMap<Vec<u8>, u64>,
    printed_order: VecDeque<Vec<u8>>,
}

impl TreeWriter {
    pub(crate) fn new(out: Box<dyn Write + Send + Sync>, opts: DumpConfig) -> Self {
        Self {
            out,
            opts,
            traces: HashMap::new(),
            arrival: BTreeMap::new(),
            held: 0,
            printed: HashMap::new(),
            printed_order: VecDeque::new(),
        }
    }

    pub(crate) fn write_request(&mut self, body: &EncodedRequest) -> io::Result<()> {
        let request = ExportTraceServiceRequest::decode(body.to_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.add(request, Instant::now())
    }

    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.print_where(|_| true)
    }

    fn add(&mut self, request: ExportTraceServiceRequest, now: Instant) -> io::Result<()> {
        let mut rooted = Vec::new();
        for rs in request.resource_spans {
            let sandbox = rs.resource.and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == SANDBOX_ATTRIBUTE)
                    .and_then(|kv| kv.value.as_ref())
                    .map(value_text)
            });
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let id = span.trace_id.clone();
                let arrival = &mut self.arrival;
                let trace = self.traces.entry(id.clone()).or_insert_with(|| {
                    // Above every key held.
                    let seq = arrival.last_key_value().map_or(0, |(k, _)| k + 1);
                    arrival.insert(seq, id.clone());
                    Trace {
                        seq,
                        last: now,
                        rooted: false,
                        spans: Vec::new(),
                    }
                });
                trace.last = now;
                if span.parent_span_id.is_empty() && !trace.rooted {
                    trace.rooted = true;
                    rooted.push(id);
                }
                trace.spans.push(Held {
                    span,
                    sandbox: sandbox.clone(),
                });
                self.held += 1;
                while self.held > self.opts.max_spans {
                    let Some(oldest) = self.arrival.values().next().cloned() else {
                        break;
                    };
                    self.print(&oldest, true)?;
                }
            }
        }
        for id in rooted {
            // Unless the bound printed it.
            if self.traces.contains_key(&id) {
                self.print(&id, false)?;
            }
        }
        self.out.flush()
    }

    /// Prints the traces quiet for the linger time.
    pub(crate) fn tick(&mut self, now: Instant) -> io::Result<()> {
        let linger = self.opts.linger;
        self.print_where(|t| now.saturating_duration_since(t.last) >= linger)
    }

    /// Prints the traces `which` picks, in the order they came.
    fn print_where(&mut self, which: impl Fn(&Trace) -> bool) -> io::Result<()> {
        let ids: Vec<Vec<u8>> = self
            .arrival
            .values()
            .filter(|id| self.traces.get(*id).is_some_and(&which))
            .cloned()
            .collect();
        for id in ids {
            self.print(&id, false)?;
        }
        self.out.flush()
    }

    /// Prints a trace; `full`: because more than `max_spans` are held.
    fn print(&mut self, id: &[u8], full: bool) -> io::Result<()> {
        let Some(trace) = self.traces.remove(id) else {
            return Ok(());
        };
        self.held -= trace.spans.len();
        self.arrival.remove(&trace.seq);
        // From the earliest span, or the start the trace was first printed with.
        let late = self.printed.get(id).copied();
        let starts = trace.spans.iter().map(|h| h.span.start_time_unix_nano);
        let start = starts.chain(late).min().unwrap_or(0);
        let text = Render {
            colour: self.opts.colour,
            start,
            late: late.is_some(),
        }
        .trace(id, &trace.spans, full);
        if self.printed.insert(id.to_vec(), start).is_none() {
            self.printed_order.push_back(id.to_vec());
        }
        while self.printed_order.len() > self.opts.max_spans {
            if let Some(old) = self.printed_order.pop_front() {
                self.printed.remove(&old);
            }
        }
        self.out.write_all(text.as_bytes())
    }
}

const RED: &str = "1;31";
const YELLOW: &str = "33";
const GREEN: &str = "32";
const DIM: &str = "2";
const BOLD: &str = "1";

/// A trace as text: times from `start`, ANSI styles unless in a pipe.
struct Render {
    colour: bool,
    start: u64,
    late: bool,
}

impl Render {
    fn wrap(&self, code: &str, s: &str) -> String {
        match self.colour {
            true => format!("\x1b[{code}m{s}\x1b[0m"),
            false => s.to_owned(),
        }
    }

    /// A trace's held spans: a header line, then each top span and its
    /// descendants, siblings by start time.
    fn trace(&self, id: &[u8], spans: &[Held], full: bool) -> String {
        let late = self.late;
        let mut header = format!("trace {}", hex(id));
        let sandboxes: BTreeSet<&str> = spans.iter().filter_map(|h| h.sandbox.as_deref()).collect();
        for s in sandboxes {
            let _ = write!(header, "  sandbox={}", clean(s, VALUE_CHARS));
        }
        let plural = if spans.len() == 1 { "" } else { "s" };
        let _ = write!(header, "  {} span{plural}", spans.len());
        let mut out = self.wrap(BOLD, &header);
        let mark = match (late, full) {
            (_, true) => Some("incomplete: --dump-max-spans reached, printed as it is"),
            (true, _) => Some("late: after the trace was printed"),
            _ => None,
        };
        if let Some(mark) = mark {
            let _ = write!(out, "  {}", self.wrap(YELLOW, &format!("[{mark}]")));
        }
        out.push('\n');
        let mut order: Vec<(usize, &Held)> = spans.iter().enumerate().collect();
        order.sort_by_key(|&(i, h)| (h.span.start_time_unix_nano, i));
        let by_id: HashSet<&[u8]> = spans.iter().map(|h| h.span.span_id.as_slice()).collect();
        let parent = |h| parent_in(h, &by_id);
        let mut children: HashMap<&[u8], Vec<(usize, &Held)>> = HashMap::new();
        for &(i, h) in &order {
            if let Some(p) = parent(h) {
                children.entry(p).or_default().push((i, h));
            }
        }
        let mut done = vec![false; spans.len()];
        // Top spans (no parent held here), then any a cycle of parents left: none is lost.
        let tops = order
            .iter()
            .copied()
            .filter(|&(_, h)| parent(h).is_none())
            .chain(order.iter().copied());
        for (i, top) in tops {
            // Depth-first with an explicit stack: the guest picks the depth.
            let mut stack = vec![(i, top, 0usize)];
            while let Some((i, h, depth)) = stack.pop() {
                match done.get_mut(i) {
                    Some(d) if !*d => *d = true,
                    _ => continue,
                }
                // A top span with a parent not received, or printed before.
                let orphan = depth == 0 && !h.span.parent_span_id.is_empty();
                let mark = orphan.then_some(if late { "late" } else { "parent not received" });
                self.line(&mut out, h, depth, mark);
                if let Some(kids) = children.get(h.span.span_id.as_slice()) {
                    stack.extend(kids.iter().rev().map(|&(k, kh)| (k, kh, depth + 1)));
                }
            }
        }
        out
    }

    fn line(&self, out: &mut String, held: &Held, depth: usize, mark: Option<&str>) {
        let span = &held.span;
        let indent = "  ".repeat(depth + 1);
        let (begin, end) = (span.start_time_unix_nano, span.end_time_unix_nano);
        let at = |t: u64| self.wrap(DIM, &format!("+{}", human(t.saturating_sub(self.start))));
        let name = self.wrap(BOLD, &clean(&span.name, NAME_CHARS));
        let took = human(end.saturating_sub(begin));
        let _ = write!(out, "{indent}{name}  {took}  {}", at(begin));
        let status = match span.status.as_ref().map(|s| (s.code(), s.message.as_str())) {
            Some((StatusCode::Error, "")) => Some((RED, "ERROR".to_owned())),
            Some((StatusCode::Error, m)) => {
                Some((RED, format!("ERROR: {}", clean(m, MESSAGE_CHARS))))
            }
            Some((StatusCode::Ok, _)) => Some((GREEN, "ok".to_owned())),
            _ => None,
        };
        if let Some((style, text)) = status {
            let _ = write!(out, "  {}", self.wrap(style, &text));
        }
        let _ = write!(out, "{}", attributes(&span.attributes));
        if let Some(mark) = mark {
            let _ = write!(out, "  {}", self.wrap(YELLOW, &format!("[{mark}]")));
        }
        out.push('\n');
        for e in &span.events {
            let (name, attrs) = (clean(&e.name, NAME_CHARS), attributes(&e.attributes));
            let _ = writeln!(out, "{indent}  · {name}  {}{attrs}", at(e.time_unix_nano));
        }
    }
}

/// The parent `h` is printed under, if held here.
fn parent_in<'a>(h: &'a Held, held: &HashSet<&[u8]>) -> Option<&'a [u8]> {
    let p = h.span.parent_span_id.as_slice();
    (!p.is_empty() && held.contains(p) && p != h.span.span_id.as_slice()).then_some(p)
}

/// The attributes shown, key ones first, shortened; the rest counted.
fn attributes(kvs: &[KeyValue]) -> String {
    let key = |kv: &&KeyValue| KEY_ATTRIBUTES.contains(&kv.key.as_str());
    // The rest by name (the SDK's order is a hash map's).
    let mut rest: Vec<&KeyValue> = kvs.iter().filter(|kv| !key(kv)).collect();
    rest.sort_by(|a, b| a.key.cmp(&b.key));
    let shown: Vec<&KeyValue> = kvs
        .iter()
        .filter(key)
        .chain(rest)
        .take(MAX_ATTRIBUTES)
        .collect();
    let mut out = String::new();
    for kv in &shown {
        let value = kv.value.as_ref().map(value_text).unwrap_or_default();
        let (key, value) = (clean(&kv.key, VALUE_CHARS), clean(&value, VALUE_CHARS));
        let _ = write!(out, "  {key}={value}");
    }
    if kvs.len() > shown.len() {
        let _ = write!(out, "  (+{} more)", kvs.len() - shown.len());
    }
    out
}

fn value_text(v: &AnyValue) -> String {
    use any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().take(8).map(value_text).collect();
            format!("[{}]", items.join(","))
        }
        Some(Value::KvlistValue(l)) => format!("{{{} keys}}", l.values.len()),
        Some(Value::BytesValue(b)) => hex(b),
        // A profiles-only dictionary reference: nothing to show.
        _ => String::new(),
    }
}

/// The guest's text, safe for a terminal, cut to `max` characters (`…`).
fn clean(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        // These would move the cursor or colour the terminal.
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Nanoseconds in the unit a person reads best.
fn human(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);

    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Out {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    const MS: u64 = 1_000_000;

    fn span(trace: u8, id: u8, parent: u8, name: &str, start_ms: u64, end_ms: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: name.into(),
            start_time_unix_nano: 1_000 * MS + start_ms * MS,
            end_time_unix_nano: 1_000 * MS + end_ms * MS,
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: SANDBOX_ATTRIBUTE.into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue("sb1".into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn writer(max_spans: usize, colour: bool) -> (TreeWriter, Out) {
        let out = Out::default();
        let w = TreeWriter::new(
            Box::new(out.clone()),
            DumpConfig {
                format: crate::config::DumpFormat::Tree,
                linger: Duration::from_secs(2),
                max_spans,
                colour,
            },
        );
        (w, out)
    }

    /// Lines with their indentation, the attributes and timings cut off.
    fn shape(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split("  ").collect::<Vec<_>>())
            .map(|parts| {
                let indent = parts.iter().take_while(|p| p.is_empty()).count();
                let name = parts.get(indent).copied().unwrap_or_default();
                format!("{}{}", "  ".repeat(indent), name)
            })
            .collect()
    }

    #[test]
    fn children_are_printed_under_parents_and_siblings_by_start_time() {
        let (mut w, out) = writer(100, false);
        let now = Instant::now();
        // As the agent sends them: each as it ends, the root last.
        let spans = vec![
            span(1, 4, 2, "grandchild", 3, 4),
            span(1, 3, 1, "second", 6, 8),
            span(1, 2, 1, "first", 2, 5),
        ];
        w.add(request(spans), now).unwrap();
        assert_eq!(out.take(), "", "nothing before the root");
        w.add(request(vec![span(1, 1, 0, "root", 0, 10)]), now)
            .unwrap();
        let text = out.take();
        assert_eq!(
            shape(&text),
            [
                "trace 01010101010101010101010101010101",
                "  root",
                "    first",
                "      grandchild",
                "    second"
            ],
            "{text}"
        );
        assert!(text.contains("sandbox=sb1"), "{text}");
        assert!(text.contains("root  10.0ms  +0ns"), "{text}");
        assert!(text.contains("grandchild  1.0ms  +3.0ms"), "{text}");
        assert_eq!(w.held, 0);
    }

    #[test]
    fn a_trace_without_its_root_is_printed_after_the_linger_marked() {
        let (mut w, out) = writer(100, false);
        let now = Instant::now();
        w.add(
            request(vec![
                span(2, 5, 9, "child", 1, 2),
                span(2, 6, 5, "leaf", 1, 2),
            ]),
            now,
        )
        .unwrap();
        w.tick(now + Duration::from_millis(1999)).unwrap();
        assert_eq!(out.take(), "", "still lingering");
        w.tick(now + Duration::from_secs(2)).unwrap();
        let text = out.take();
        assert_eq!(shape(&text)[1..], ["  child", "    leaf"], "{text}");
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .ends_with("[parent not received]"),
            "{text}"
        );
        // A late span of a printed trace comes alone, marked, not the
        // whole tree again.
        w.add(request(vec![span(2, 9, 0, "root", 0, 3)]), now)
            .unwrap();
        let text = out.take();
        assert!(text.lines().next().unwrap().contains("[late"), "{text}");
        assert_eq!(shape(&text)[1..], ["  root"], "{text}");
        assert!(
            text.contains("+0ns"),
            "offsets from the trace's start: {text}"
        );
    }

    #[test]
    fn past_the_bound_the_oldest_traces_are_printed_incomplete() {
        let (mut w, out) = writer(3, false);
        let now = Instant::now();
        w.add(
            request(vec![span(1, 1, 9, "a1", 0, 1), span(1, 2, 9, "a2", 0, 1)]),
            now,
        )
        .unwrap();
        w.add(
            request(vec![span(2, 1, 9, "b1", 0, 1)]),
            now + Duration::from_millis(1),
        )
        .unwrap();
        assert_eq!(out.take(), "");
        assert_eq!(w.held, 3);
        w.add(
            request(vec![span(3, 1, 9, "c1", 0, 1)]),
            now + Duration::from_millis(2),
        )
        .unwrap();
        let text = out.take();
        assert!(w.held <= 3);
        assert_eq!(shape(&text)[1..], ["  a1", "  a2"], "{text}");
        assert!(
            text.lines().next().unwrap().contains("[incomplete"),
            "{text}"
        );
        // At exit, everything held is printed, oldest first.
        w.finish().unwrap();
        let text = out.take();
        let names: Vec<String> = shape(&text)
            .into_iter()
            .filter(|l| l.starts_with("  "))
            .collect();
        assert_eq!(names, ["  b1", "  c1"], "{text}");
        assert_eq!(w.held, 0);
    }

    #[test]
    fn the_bound_holds_however_the_spans_come() {
        let (mut w, out) = writer(10, false);
        let now = Instant::now();
        let mut lines = 0;
        for i in 0..100u8 {
            let spans = (1..=(i % 7 + 1))
                .map(|s| span(i, s, 200, "s", 0, 1))
                .collect();
            w.add(request(spans), now + Duration::from_millis(i.into()))
                .unwrap();
            assert!(w.held <= 10, "held {}", w.held);
            assert!(w.arrival.len() <= 3 * 10 + 64, "{}", w.arrival.len());
            lines += out.take().lines().filter(|l| l.starts_with("  s")).count();
        }
        w.finish().unwrap();
        lines += out.take().lines().filter(|l| l.starts_with("  s")).count();
        let sent: usize = (0..100usize).map(|i| i % 7 + 1).sum();
        assert_eq!(lines, sent, "every span printed once");
    }

    #[test]
    fn errors_stand_out_in_colour_on_a_terminal_only() {
        let mut failed = span(4, 1, 0, "mount", 0, 1);
        failed.status = Some(Status {
            code: StatusCode::Error as i32,
            message: "EBUSY\n\x1b[2Jgone".into(),
        });
        failed.events.push(Event {
            name: "retry".into(),
            time_unix_nano: failed.start_time_unix_nano + 500_000,
            ..Default::default()
        });
        for colour in [false, true] {
            let (mut w, out) = writer(10, colour);
            w.add(request(vec![failed.clone()]), Instant::now())
                .unwrap();
            let text = out.take();
            assert!(text.contains("ERROR: EBUSY\\n\\u{1b}[2Jgone"), "{text}");
            assert!(text.contains("    · retry  "), "{text}");
            if !colour {
                assert!(text.contains("    · retry  +500.0µs"), "{text}");
            }
            assert_eq!(text.contains('\x1b'), colour, "{text:?}");
        }
    }

    #[test]
    fn key_attributes_come_first_and_are_shortened() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        };
        let long = "c".repeat(64);
        let text = attributes(&[
            kv("mod", "rpc.rs"),
            kv("a", "1"),
            kv("b", "2"),
            kv("c", "3"),
            kv("container_id", &long),
        ]);
        assert_eq!(
            text,
            format!(
                "  container_id={}…  a=1  b=2  c=3  (+1 more)",
                "c".repeat(40)
            )
        );
    }

    #[test]
    fn durations_read_in_human_units() {
        assert_eq!(human(999), "999ns");
        assert_eq!(human(12_300), "12.3µs");
        assert_eq!(human(12_300_000), "12.3ms");
        assert_eq!(human(2_500_000_000), "2.50s");
    }
}
