//! Converting decoded spans into OTLP protobuf, per wire format: the direct
//! encoder the forwarder uses (`otlp::encode::put_span`) against the
//! struct path (`otlp::span` then prost), and framing a 512-span batch into
//! an `ExportTraceServiceRequest` both ways.
//!
//! Spans are real SDK frames of about 1,000 bytes, decoded once up front.
//! Throughput is in spans. `cargo bench --bench convert`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};
use kata_trace_forwarder::otlp::{self, EncodedResource, Origin, SpanRecord};
use kata_trace_forwarder::wire::{Decoder, HEADER_LEN};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

const SPANS: usize = 512;
const PAYLOAD_BYTES: usize = 1000;

fn convert(c: &mut Criterion) {
    let origin = Origin {
        service_name: "kata-agent".into(),
        extra: Vec::new(),
    };
    for format in EmitFormat::ALL {
        let frames = bulk_frames(format, SPANS, PAYLOAD_BYTES, 0);
        let mut d = Decoder::new();
        let spans: Vec<_> = frames
            .iter()
            .map(|f| d.decode(&f[HEADER_LEN..]).expect("real frames decode"))
            .collect();
        let resource = Arc::new(EncodedResource::new(otlp::resource(
            spans[0].resource.as_ref(),
            &origin,
        )));

        let mut g = c.benchmark_group(format!("convert/{format}"));
        g.throughput(Throughput::Elements(spans.len() as u64));
        g.bench_function("direct", |b| {
            let mut buf = BytesMut::with_capacity(1 << 20);
            b.iter(|| {
                buf.clear();
                for s in &spans {
                    otlp::encode::put_span(&mut buf, black_box(s));
                }
                black_box(buf.len())
            })
        });
        g.bench_function("struct+prost", |b| {
            let mut buf = Vec::with_capacity(1 << 20);
            b.iter(|| {
                buf.clear();
                for s in &spans {
                    let span = otlp::span(black_box(s));
                    span.encode_length_delimited(&mut buf).ok();
                }
                black_box(buf.len())
            })
        });
        g.finish();

        // One batch as the batcher has it: a record per span.
        let records: Vec<SpanRecord> = spans
            .iter()
            .map(|s| SpanRecord::encode(Arc::clone(&resource), s))
            .collect();
        let mut g = c.benchmark_group(format!("request/{format}"));
        g.throughput(Throughput::Elements(records.len() as u64));
        g.bench_function("direct", |b| {
            b.iter(|| black_box(otlp::encode_request(black_box(&records)).len()))
        });
        g.bench_function("struct+prost", |b| {
            let structs: Vec<_> = spans.iter().map(otlp::span).collect();
            b.iter(|| {
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
                        resource: Some(resource.resource().clone()),
                        scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                            scope: None,
                            spans: structs.clone(),
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                black_box(request.encode_to_vec().len())
            })
        });
        g.finish();
    }
}

criterion_group!(benches, convert);
criterion_main!(benches);
