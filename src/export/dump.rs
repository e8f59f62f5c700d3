//! `--dump-only`: spans as OTLP JSON lines on stdout, no collector needed.
//!
//! Each line is a whole OTLP/JSON `TracesData` of one span with its
//! resource, to be read a line at a time, grepped, or fed to anything that
//! takes OTLP JSON (NaN and the infinities as `"NaN"`, `"Infinity"`,
//! `"-Infinity"`, as the mapping says).

use std::io::{self, Write};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, TracesData};
use prost::Message;

use crate::otlp::EncodedRequest;

pub(crate) fn write_request(out: &mut impl Write, body: &EncodedRequest) -> io::Result<()> {
    // The slow path: decoded back into OTLP structs for the JSON mapping.
    let request = ExportTraceServiceRequest::decode(body.to_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    for rs in request.resource_spans {
        let resource = rs.resource.unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            let line = TracesData {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            write_line(out, &line)?;
        }
    }
    out.flush()
}

/// Writes one line. serde_json writes a non-finite double as `null` (read
/// back as no value), where OTLP JSON wants a string; so a line holding
/// one (rare) goes through a JSON value, patched where the span has them.
fn write_line(out: &mut impl Write, line: &TracesData) -> io::Result<()> {
    let mut any = false;
    each_list(line, |kvs, _| {
        any |= kvs.iter().any(|kv| kv.value.as_ref().is_some_and(special));
    });
    if any {
        let mut json = serde_json::to_value(line)?;
        each_list(line, |kvs, at| {
            let list = json.pointer_mut(&format!("{}/attributes", at()));
            let list = list.and_then(|a| a.as_array_mut()).into_iter().flatten();
            for (kv, j) in kvs.iter().zip(list) {
                if let (Some(v), Some(j)) = (&kv.value, j.get_mut("value")) {
                    patch_value(v, j);
                }
            }
        });
        serde_json::to_writer(&mut *out, &json)?;
    } else {
        serde_json::to_writer(&mut *out, line)?;
    }
    out.write_all(b"\n")
}

/// Calls `f` with each attribute list of `line` (resources', spans',
/// events', links') and how to make the JSON pointer to its object.
fn each_list(line: &TracesData, mut f: impl FnMut(&[KeyValue], &dyn Fn() -> String)) {
    for (i, rs) in line.resource_spans.iter().enumerate() {
        if let Some(r) = &rs.resource {
            f(&r.attributes, &|| format!("/resourceSpans/{i}/resource"));
        }
        for (j, ss) in rs.scope_spans.iter().enumerate() {
            for (k, span) in ss.spans.iter().enumerate() {
                let at =
                    |rest: String| format!("/resourceSpans/{i}/scopeSpans/{j}/spans/{k}{rest}");
                f(&span.attributes, &|| at(String::new()));
                for (n, e) in span.events.iter().enumerate() {
                    f(&e.attributes, &|| at(format!("/events/{n}")));
                }
                for (n, l) in span.links.iter().enumerate() {
                    f(&l.attributes, &|| at(format!("/links/{n}")));
                }
            }
        }
    }
}

/// A double JSON has no number for, or an array holding one (the agent
/// sends no key-value lists).
fn special(v: &AnyValue) -> bool {
    match &v.value {
        Some(any_value::Value::DoubleValue(d)) => !d.is_finite(),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().any(special),
        _ => false,
    }
}

fn patch_value(v: &AnyValue, json: &mut serde_json::Value) {
    match &v.value {
        Some(any_value::Value::DoubleValue(d)) if !d.is_finite() => {
            let text = match (d.is_nan(), *d > 0.0) {
                (true, _) => "NaN",
                (false, true) => "Infinity",
                (false, false) => "-Infinity",
            };
            if let Some(obj) = json.as_object_mut() {
                obj.insert("doubleValue".into(), text.into());
            }
        }
        Some(any_value::Value::ArrayValue(a)) => {
            let list = json
                .pointer_mut("/arrayValue/values")
                .and_then(|l| l.as_array_mut());
            for (v, j) in a.values.iter().zip(list.into_iter().flatten()) {
                patch_value(v, j);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::ArrayValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn line(attributes: Vec<KeyValue>) -> TracesData {
        let span = Span {
            name: "s".into(),
            attributes: attributes.clone(),
            events: vec![Event {
                attributes: attributes.clone(),
                ..Default::default()
            }],
            links: vec![Link {
                attributes: attributes.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        TracesData {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn written(line: &TracesData) -> serde_json::Value {
        let mut out = Vec::new();
        write_line(&mut out, line).unwrap();
        assert_eq!(out.pop(), Some(b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn doubles_json_has_no_number_for_are_written_as_otlp_json_does() {
        use any_value::Value::{ArrayValue as Array, DoubleValue, IntValue};
        let double = |d: f64| AnyValue {
            value: Some(DoubleValue(d)),
        };
        let json = written(&line(vec![
            kv("nan", DoubleValue(f64::NAN)),
            kv("inf", DoubleValue(f64::INFINITY)),
            kv("-inf", DoubleValue(f64::NEG_INFINITY)),
            kv("one", DoubleValue(1.5)),
            kv("n", IntValue(3)),
            kv(
                "list",
                Array(ArrayValue {
                    values: vec![double(2.0), double(f64::NEG_INFINITY)],
                }),
            ),
        ]));
        let rs = &json["resourceSpans"][0];
        let span = &rs["scopeSpans"][0]["spans"][0];
        for attributes in [
            &rs["resource"]["attributes"],
            &span["attributes"],
            &span["events"][0]["attributes"],
            &span["links"][0]["attributes"],
        ] {
            let value = |i: usize| &attributes[i]["value"];
            assert_eq!(value(0)["doubleValue"], "NaN", "{attributes}");
            assert_eq!(value(1)["doubleValue"], "Infinity");
            assert_eq!(value(2)["doubleValue"], "-Infinity");
            assert_eq!(value(3)["doubleValue"], 1.5);
            assert_eq!(value(4)["intValue"], "3");
            let list = &value(5)["arrayValue"]["values"];
            assert_eq!(list[0]["doubleValue"], 2.0);
            assert_eq!(list[1]["doubleValue"], "-Infinity");
        }
    }

    #[test]
    fn a_line_with_finite_doubles_only_is_written_as_it_was() {
        let plain = line(vec![kv("one", any_value::Value::DoubleValue(1.5))]);
        let mut out = Vec::new();
        write_line(&mut out, &plain).unwrap();
        let mut want = serde_json::to_vec(&plain).unwrap();
        want.push(b'\n');
        assert_eq!(out, want);
    }
}
