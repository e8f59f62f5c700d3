//! Decoding one agent span, per wire format: the fast paths the forwarder
//! uses (`wire::Decoder`) against the serde reference they fall back to.
//!
//! Payloads are real SDK frames of about 1,000 bytes
//! (`kata_agent_emitter::bulk_frames`). Throughput is in spans.
//! `cargo bench --bench decode`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};
use kata_trace_forwarder::wire::{self, Decoder, HEADER_LEN};

const SPANS: usize = 256;
const PAYLOAD_BYTES: usize = 1000;

fn payloads(format: EmitFormat) -> Vec<Vec<u8>> {
    bulk_frames(format, SPANS, PAYLOAD_BYTES, 0)
        .into_iter()
        .map(|f| f[HEADER_LEN..].to_vec())
        .collect()
}

fn decode(c: &mut Criterion) {
    for format in EmitFormat::ALL {
        let payloads = payloads(format);
        let mut g = c.benchmark_group(format!("decode/{format}"));
        g.throughput(Throughput::Elements(payloads.len() as u64));
        g.bench_function("forwarder", |b| {
            let mut d = Decoder::new();
            b.iter(|| {
                for p in &payloads {
                    black_box(d.decode(black_box(p)).ok());
                }
            })
        });
        g.bench_function("serde", |b| {
            b.iter(|| {
                for p in &payloads {
                    let span = match format {
                        EmitFormat::Json => wire::decode_json_serde(black_box(p)),
                        EmitFormat::Bincode => wire::decode_bincode_serde(black_box(p)),
                    };
                    black_box(span.ok());
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
