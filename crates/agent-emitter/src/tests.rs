//! Checks that the frames are what a real agent sends (decodable by the real
//! crates into the very `SpanData` that was exported) and that the scenario
//! covers everything the forwarder has to translate.

use super::*;
use std::collections::BTreeSet;

const TWO_POW_64: u128 = 1 << 64;
const TWO_POW_53: u64 = 1 << 53;

fn opts(format: WireFormat) -> ScenarioOptions {
    ScenarioOptions {
        format,
        seq: 7,
        ..ScenarioOptions::default()
    }
}

fn payload(frame: &[u8]) -> &[u8] {
    let len = u64::from_be_bytes(frame[..8].try_into().unwrap());
    assert_eq!(
        len as usize,
        frame.len() - 8,
        "header is the BE payload length"
    );
    &frame[8..]
}

#[test]
fn frame_header_is_big_endian_length() {
    assert_eq!(
        frame(&[0xaa, 0xbb, 0xcc]),
        vec![0, 0, 0, 0, 0, 0, 0, 3, 0xaa, 0xbb, 0xcc]
    );
    let big = vec![0u8; 0x0102];
    assert_eq!(&frame(&big)[..8], &[0, 0, 0, 0, 0, 0, 0x01, 0x02]);
    assert!(frame(&[]).iter().all(|b| *b == 0));
    for format in WireFormat::ALL {
        let s = scenario(&opts(format));
        for f in &s.frames {
            payload(f);
        }
        assert_eq!(
            s.stream_bytes().len(),
            s.frames.iter().map(Vec::len).sum::<usize>()
        );
    }
}

#[test]
fn json_payload_decodes_to_the_exported_span_data() {
    let o = opts(WireFormat::Json);
    let (captured, raw) = sdk017::run_raw(&scenario_config(&o), true, |sdk| kitchen_sink(sdk, &o));
    assert_eq!(captured.len(), raw.len());
    assert!(captured.len() >= 10);
    for ((f, expected), exported) in captured.iter().zip(&raw) {
        let mut decoded: otel017::sdk::export::trace::SpanData =
            serde_json::from_slice(payload(f)).expect("real 0.17 SpanData decodes");
        // `instrumentation_lib` is `#[serde(skip)]`, so it never travels.
        assert_eq!(decoded.instrumentation_lib, Default::default());
        decoded.instrumentation_lib = exported.instrumentation_lib.clone();
        assert_eq!(&decoded, exported);
        assert_eq!(&sdk017::expected_from(&decoded), expected.as_ref().unwrap());
    }
}

#[test]
fn bincode_payload_decodes_to_the_exported_span_data() {
    let o = opts(WireFormat::Bincode);
    let (captured, raw) = sdk014::run_raw(&scenario_config(&o), true, |sdk| kitchen_sink(sdk, &o));
    assert_eq!(captured.len(), raw.len());
    assert!(captured.len() >= 10);
    for ((f, expected), exported) in captured.iter().zip(&raw) {
        let bytes = payload(f);
        let mut decoded: otel014::sdk::export::trace::SpanData =
            bincode::deserialize(bytes).expect("real 0.14 SpanData decodes");
        assert_eq!(decoded.instrumentation_lib, Default::default());
        decoded.instrumentation_lib = exported.instrumentation_lib;
        assert_eq!(&decoded, exported);
        assert_eq!(&sdk014::expected_from(&decoded), expected.as_ref().unwrap());
        // bincode must consume the payload exactly: no trailing bytes.
        assert_eq!(
            bincode::serialized_size(&decoded).unwrap() as usize,
            bytes.len()
        );
    }
}

#[test]
fn json_ids_are_bare_integers_beyond_u64_and_double_precision() {
    let s = scenario(&opts(WireFormat::Json));
    let mut found = false;
    for (f, e) in s.frames.iter().zip(&s.expected) {
        let text = std::str::from_utf8(payload(f)).expect("JSON is UTF-8");
        assert!(
            text.contains(&format!("\"trace_id\":{},", e.trace_id)),
            "trace_id must be a bare integer"
        );
        assert!(text.contains(&format!("\"span_id\":{},", e.span_id)));
        assert!(text.contains(&format!("\"parent_span_id\":{},", e.parent_span_id)));
        if e.trace_id > TWO_POW_64 && e.span_id > TWO_POW_53 {
            found = true;
        }
    }
    assert!(
        found,
        "some JSON frame has trace_id > 2^64 and span_id > 2^53"
    );
}

#[test]
fn json_layout_matches_the_serde_derives() {
    let s = scenario(&opts(WireFormat::Json));
    let root = s
        .frames
        .iter()
        .zip(&s.expected)
        .find(|(_, e)| e.name == "create_container");
    let text = std::str::from_utf8(payload(root.unwrap().0)).unwrap();
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let o = v.as_object().unwrap();
    let keys: BTreeSet<&str> = o.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
        "span_context",
        "parent_span_id",
        "span_kind",
        "name",
        "start_time",
        "end_time",
        "attributes",
        "events",
        "links",
        "status_code",
        "status_message",
        "resource",
    ]
    .into();
    assert_eq!(keys, want, "instrumentation_lib is skipped");
    assert_eq!(v["span_kind"], "Server");
    assert_eq!(v["status_code"], "Ok");
    assert!(v["start_time"]["secs_since_epoch"].is_u64());
    assert!(v["start_time"]["nanos_since_epoch"].is_u64());
    assert_eq!(v["span_context"]["trace_flags"], 1);
    // Trap for the forwarder: an untyped serde_json::Value silently turns a
    // trace id above u64::MAX into a lossy f64; decode into u128 instead.
    assert!(v["span_context"]["trace_id"].is_f64());
    assert!(v["span_context"]["trace_state"].is_null());
    assert_eq!(
        v["attributes"]["map"]["i64.min"],
        serde_json::json!({"I64": i64::MIN})
    );
    assert_eq!(
        v["attributes"]["map"]["array.bool"],
        serde_json::json!({"Array": {"Bool": [true, false, true]}})
    );
    assert_eq!(v["attributes"]["max_len"], 16);
    assert!(v["attributes"]["evict_list"].is_array());
    assert_eq!(v["links"]["dropped_count"], 0);
    assert!(v["links"]["queue"].is_array());
    assert_eq!(
        v["resource"]["attrs"]["service.name"],
        serde_json::json!({"String": "kata-agent"})
    );
    // A span with no links still carries the queue, as null.
    let leaf = s
        .frames
        .iter()
        .zip(&s.expected)
        .find(|(_, e)| e.name == "start_process");
    let leaf: serde_json::Value = serde_json::from_slice(payload(leaf.unwrap().0)).unwrap();
    assert!(leaf["links"]["queue"].is_null());
    assert!(leaf["events"]["queue"].is_null());
    // Tree 2 sits under a remote context with a trace_state.
    let rpc2 = s
        .frames
        .iter()
        .zip(&s.expected)
        .find(|(_, e)| e.name == "start_container");
    let rpc2: serde_json::Value = serde_json::from_slice(payload(rpc2.unwrap().0)).unwrap();
    assert_eq!(
        rpc2["span_context"]["trace_state"],
        serde_json::json!([["kata", "shim-v2-7"], ["rojo", "00f067aa0ba902b7"]])
    );
}

#[test]
fn bincode_layout_starts_with_the_span_context() {
    let s = scenario(&opts(WireFormat::Bincode));
    for (f, e) in s.frames.iter().zip(&s.expected) {
        let p = payload(f);
        // SpanContext first: u128 LE trace id, u64 LE span id, u8 flags, bool.
        assert_eq!(
            u128::from_le_bytes(p[0..16].try_into().unwrap()),
            e.trace_id
        );
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), e.span_id);
        assert_eq!(p[24], e.trace_flags);
        assert_eq!(p[25], e.is_remote as u8);
    }
}

fn check_coverage(s: &Scenario) {
    assert_eq!(s.frames.len(), s.expected.len());
    let kinds: BTreeSet<String> = s.expected.iter().map(|e| format!("{:?}", e.kind)).collect();
    assert_eq!(kinds.len(), 5, "all span kinds present: {kinds:?}");
    let by_name = |n: &str| s.expected.iter().find(|e| e.name == n).unwrap();

    let root = by_name("create_container");
    assert_eq!(root.kind, ExpectedKind::Server);
    assert_eq!(root.parent_span_id, 0);
    assert_eq!(root.status, ExpectedStatus::Ok);
    assert_eq!(root.trace_flags, 1);
    assert!(!root.is_remote);
    assert!(root.trace_id > TWO_POW_64);
    let types: BTreeSet<String> = root
        .attributes
        .iter()
        .map(|(_, v)| format!("{v:?}").split('(').next().unwrap().to_string())
        .collect();
    assert_eq!(types.len(), 8, "every attribute type: {types:?}");
    assert_eq!(
        root.attribute("i64.min"),
        Some(&ExpectedValue::I64(i64::MIN))
    );
    assert_eq!(
        root.attribute("i64.max"),
        Some(&ExpectedValue::I64(i64::MAX))
    );
    assert_eq!(
        root.attribute("string.weird"),
        Some(&ExpectedValue::String(WEIRD.into()))
    );
    assert_eq!(
        root.attribute("rpc.result"),
        Some(&ExpectedValue::String("ok".into()))
    );
    let keys: Vec<&String> = root.attributes.iter().map(|(k, _)| k).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "attributes sorted by key"
    );
    assert_eq!(root.links.len(), 1);
    assert_eq!(root.links[0].trace_state, "congo=t61rcWkgMzE");
    assert_eq!(
        root.events[0].name,
        "request received ✓ «CreateContainerRequest»"
    );

    // Three levels below the root, all in one trace.
    let storage = s
        .expected
        .iter()
        .find(|e| e.name.starts_with("mount_storage"))
        .unwrap();
    let mount = by_name("mount");
    let do_create = by_name("do_create_container");
    assert_eq!(storage.parent_span_id, mount.span_id);
    assert_eq!(mount.parent_span_id, do_create.span_id);
    assert_eq!(do_create.parent_span_id, root.span_id);
    assert!(s.expected.iter().all(|e| e.trace_id == root.trace_id));
    assert!(storage.name.contains(WEIRD));
    assert_eq!(storage.status, ExpectedStatus::Error);
    assert!(storage.status_message.contains("\"EBUSY\"") && storage.status_message.contains('\n'));
    assert!(storage.events[0].name.contains("🚀"));
    assert!(storage.start_unix_nanos >= mount.start_unix_nanos);
    assert!(storage.end_unix_nanos <= mount.end_unix_nanos);
    assert_ne!(
        storage.start_unix_nanos % 1_000,
        0,
        "sub-microsecond precision"
    );

    // The SDK's own eviction produced every dropped count.
    let cg = by_name("setup_cgroups");
    assert_eq!((cg.attributes.len(), cg.dropped_attributes_count), (16, 4));
    assert_eq!((cg.events.len(), cg.dropped_events_count), (4, 2));
    assert_eq!((cg.links.len(), cg.dropped_links_count), (2, 1));
    assert!(cg
        .events
        .iter()
        .all(|e| e.attributes.len() == 4 && e.dropped_attributes_count == 2));
    assert!(cg
        .links
        .iter()
        .all(|l| l.attributes.len() == 3 && l.dropped_attributes_count == 2));
    assert_eq!(
        cg.events[0].name, "cgroup step 2",
        "oldest events evicted first"
    );
    assert_eq!(
        cg.attributes[0].0, "cgroup.attr04",
        "oldest attributes evicted first"
    );

    let rpc2 = by_name("start_container");
    assert_eq!(rpc2.trace_state, "kata=shim-v2-7,rojo=00f067aa0ba902b7");
    assert_ne!(rpc2.parent_span_id, 0);
    assert_eq!(by_name("oom_event_listener").trace_state, rpc2.trace_state);

    for e in &s.expected {
        assert!(e.span_id > TWO_POW_53);
        assert_eq!(
            e.resource_attribute("service.name"),
            Some(&ExpectedValue::String("kata-agent".into()))
        );
        assert_eq!(
            e.resource_attribute("process.pid"),
            Some(&ExpectedValue::I64(1))
        );
        assert_eq!(
            e.resource_attribute("kata.debug_console"),
            Some(&ExpectedValue::Bool(false))
        );
        assert!(e.end_unix_nanos >= e.start_unix_nanos);
    }
}

#[test]
fn scenarios_cover_the_agent_feature_set() {
    check_coverage(&scenario(&opts(WireFormat::Json)));
    check_coverage(&scenario(&opts(WireFormat::Bincode)));
}

/// Both formats run the same script, so apart from ids, times and the agent
/// version they must describe identical spans.
#[test]
fn formats_describe_the_same_trace() {
    fn shape(s: &Scenario) -> Vec<ExpectedSpan> {
        s.expected
            .iter()
            .map(|e| {
                let mut e = e.clone();
                (e.trace_id, e.span_id, e.parent_span_id) = (0, 0, 0);
                (e.start_unix_nanos, e.end_unix_nanos) = (0, 0);
                e.events.iter_mut().for_each(|ev| ev.time_unix_nanos = 0);
                e.links
                    .iter_mut()
                    .for_each(|l| (l.trace_id, l.span_id) = (0, 0));
                e.resource.retain(|(k, _)| k != "kata.version");
                e
            })
            .collect()
    }
    let json = scenario(&opts(WireFormat::Json));
    let bincode = scenario(&opts(WireFormat::Bincode));
    assert_eq!(shape(&json), shape(&bincode));
}

#[test]
fn options_control_ids_service_and_seq() {
    for format in WireFormat::ALL {
        let forced = (TWO_POW_64 << 8) | 0x1234;
        let s = scenario(&ScenarioOptions {
            format,
            trace_id: Some(forced),
            service_name: "agent-9".into(),
            seq: 9,
            ..ScenarioOptions::default()
        });
        assert!(s.expected.iter().all(|e| e.trace_id == forced));
        assert!(s
            .expected
            .iter()
            .all(|e| e.resource_attribute("service.name")
                == Some(&ExpectedValue::String("agent-9".into()))));
        assert!(s.expected.iter().any(|e| e.name.ends_with("seq=9")));

        let parent = RemoteParent {
            trace_id: u128::MAX - 5,
            span_id: u64::MAX - 7,
        };
        let s = scenario(&ScenarioOptions {
            format,
            parent: Some(parent),
            ..ScenarioOptions::default()
        });
        let root = s
            .expected
            .iter()
            .find(|e| e.name == "create_container")
            .unwrap();
        assert_eq!(root.parent_span_id, parent.span_id);
        assert_eq!(root.trace_state, "kata=shim-v2-0,rojo=00f067aa0ba902b7");
        assert!(s.expected.iter().all(|e| e.trace_id == parent.trace_id));

        let a = scenario(&ScenarioOptions {
            format,
            seq: 1,
            ..Default::default()
        });
        let b = scenario(&ScenarioOptions {
            format,
            seq: 2,
            ..Default::default()
        });
        assert_ne!(a.expected[0].attributes, b.expected[0].attributes);
        assert_ne!(a.expected[0].trace_id, b.expected[0].trace_id);
    }
}

#[test]
fn bulk_frames_hit_the_requested_size() {
    for format in WireFormat::ALL {
        let floor = bulk_min_payload(format);
        assert!(
            (300..900).contains(&floor),
            "{format} skeleton is {floor} bytes"
        );
        for approx in [500, floor + 20, 1000, 1500, 4000] {
            let frames = bulk_frames(format, 40, approx, 3);
            assert_eq!(frames.len(), 40);
            // Below the skeleton size the bare span is the best we can do.
            let want = approx.max(floor);
            for f in &frames {
                let len = payload(f).len();
                assert!(
                    len * 20 >= want * 19 && len * 20 <= want * 21,
                    "{format} payload {len} not within 5% of {want}"
                );
            }
        }
        assert!(bulk_frames(format, 0, 800, 0).is_empty());
    }
}

#[test]
fn bulk_frames_decode_with_the_real_crates() {
    for f in bulk_frames(WireFormat::Json, 20, 700, 5) {
        let d: otel017::sdk::export::trace::SpanData = serde_json::from_slice(payload(&f)).unwrap();
        assert_eq!(d.span_kind, otel017::trace::SpanKind::Server);
    }
    let names: BTreeSet<String> = bulk_frames(WireFormat::Bincode, 20, 700, 5)
        .iter()
        .map(|f| {
            let d: otel014::sdk::export::trace::SpanData =
                bincode::deserialize(payload(f)).unwrap();
            d.name.to_string()
        })
        .collect();
    assert_eq!(names.len(), BULK_RPCS.len());
}

#[test]
fn wire_format_parses_and_displays() {
    for format in WireFormat::ALL {
        assert_eq!(format.to_string().parse::<WireFormat>(), Ok(format));
    }
    assert_eq!("JSON".parse::<WireFormat>(), Ok(WireFormat::Json));
    assert!("protobuf".parse::<WireFormat>().is_err());
}
