//! `--log-format json`: one JSON object a line, each key in it once.
//! tracing-subscriber's own format puts the span list under `spans`, beside
//! an event's own `spans` field (a JSON reader kept only one), and writes a
//! field holding JSON (the counters) as a string. This one writes the same
//! keys in the same order, but the span list under [`SPAN_LIST`], a key
//! taken already as `field.<name>`, and [`JSON_FIELDS`] as the JSON they hold.

use std::fmt;

use serde::ser::{Serialize, Serializer};
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Outermost first, each as `{"name": ..., <its fields>}`.
pub(crate) const SPAN_LIST: &str = "span_list";

pub(crate) const JSON_FIELDS: &[&str] = &["summary", "stats"];

/// An object in the JSON format (for [`JSON_FIELDS`]), text in the other.
pub struct Json<'a, T: Serialize>(pub &'a T);

impl<T: Serialize> fmt::Display for Json<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self.0).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Its span fields must be recorded by [`JsonFields`].
#[derive(Debug, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut line = Line(Vec::with_capacity(8));
        line.push("timestamp".into(), Value::String(timestamp));
        line.push("level".into(), meta.level().as_str().into());
        event.record(&mut line);
        line.push("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans = scope.from_root().map(|span| {
                let ext = span.extensions();
                let mut obj: serde_json::Map<_, _> = ext
                    .get::<FormattedFields<JsonFields>>()
                    .and_then(|f| serde_json::from_str(&f.fields).ok())
                    .unwrap_or_default();
                obj.insert("name".into(), span.name().into());
                Value::Object(obj)
            });
            line.push(SPAN_LIST.into(), Value::Array(spans.collect()));
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// In order, each key once.
struct Line(Vec<(String, Value)>);

impl Line {
    fn taken(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn push(&mut self, key: String, value: Value) {
        let key = match self.taken(&key) {
            false => key,
            true => format!("field.{key}"),
        };
        // Taken even so: a second field of one name in one event.
        if !self.taken(&key) {
            self.0.push((key, value));
        }
    }
}

impl Serialize for Line {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Each typed value as its own JSON value.
macro_rules! record {
    ($($method:ident: $t:ty),*) => {
        $(fn $method(&mut self, field: &Field, value: $t) {
            self.push(field.name().into(), value.into());
        })*
    };
}

impl Visit for Line {
    record!(record_f64: f64, record_i64: i64, record_u64: u64, record_bool: bool, record_str: &str);
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let value = JSON_FIELDS
            .contains(&field.name())
            .then(|| serde_json::from_str::<Value>(&text).ok())
            .flatten()
            .unwrap_or(Value::String(text));
        self.push(field.name().into(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// The lines `f` logs, in the JSON format.
    fn lines(f: impl FnOnce()) -> Vec<String> {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn an_event_field_and_the_span_list_keep_their_own_keys() {
        let got = lines(|| {
            let span = tracing::info_span!("sandbox", id = "abc");
            let _in = span.enter();
            tracing::info!(spans = 7u64, level = "mine", "agent disconnected");
        });
        let [line] = &got[..] else { panic!("{got:?}") };
        // Each key once, in this order (the line's own keys are never in
        // its values here).
        let keys = [
            "timestamp",
            "level",
            "message",
            "spans",
            "field.level",
            "target",
            SPAN_LIST,
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| {
                let quoted = format!("\"{k}\":");
                assert_eq!(line.matches(&quoted).count(), 1, "{k} in {line}");
                line.find(&quoted).unwrap()
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["spans"], 7);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["field.level"], "mine");
        assert_eq!(
            v[SPAN_LIST],
            serde_json::json!([{"name": "sandbox", "id": "abc"}])
        );
    }

    #[test]
    fn json_fields_are_objects_and_other_fields_stay_text() {
        let counters = serde_json::json!({"connections_open": 0, "spans_received": 3});
        let got = lines(|| {
            tracing::info!(summary = %Json(&counters), "forwarder stopped");
            tracing::info!(stats = %Json(&counters), "counters");
            // Not one of ours: text, even when it looks like JSON.
            tracing::info!(error = "{\"a\":1}", "other");
            // Named so, but not JSON: text, never lost.
            tracing::info!(stats = "not json", "odd");
        });
        let v: Vec<Value> = got
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["summary"], counters);
        assert_eq!(v[1]["stats"], counters);
        assert_eq!(v[2]["error"], "{\"a\":1}");
        assert_eq!(v[3]["stats"], "not json");
        assert!(v.iter().all(|l| l.get(SPAN_LIST).is_none()), "in no span");
    }
}
