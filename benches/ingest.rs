//! The ingest stage on its own, per wire format: an agent's byte stream,
//! fed in 64 KiB reads as a connection reads its socket, through the
//! forwarder's own `ingest::Ingest` (split, detect, decode, convert the
//! resource once, encode, cut records), with no socket and no queue.
//!
//! Frames are real SDK frames of about 1,000 bytes. Throughput is in
//! spans. `cargo bench --bench ingest`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};
use kata_trace_forwarder::addr::Peer;
use kata_trace_forwarder::ingest::{Ingest, ReadBuffer, READ_MAX};
use kata_trace_forwarder::otlp::Origin;
use kata_trace_forwarder::stats::Stats;

const SPANS: usize = 512;
const PAYLOAD_BYTES: usize = 1000;

fn ingest(c: &mut Criterion) {
    let origin = Arc::new(Origin {
        service_name: "kata-agent".into(),
        extra: Vec::new(),
    });
    for format in EmitFormat::ALL {
        let stream: Vec<u8> = bulk_frames(format, SPANS, PAYLOAD_BYTES, 0).concat();
        let mut g = c.benchmark_group(format!("ingest/{format}"));
        g.throughput(Throughput::Elements(SPANS as u64));
        g.bench_function("64KiB-reads", |b| {
            let stats = Stats::default();
            let mut out = Vec::new();
            b.iter(|| {
                // A connection's state: a new one per stream, as per agent.
                let mut ingest = Ingest::new(Peer::Unix, Arc::clone(&origin), 1 << 20);
                let mut input = ReadBuffer::default();
                let mut spans = 0;
                for read in stream.chunks(READ_MAX) {
                    input.prepare().extend_from_slice(black_box(read));
                    input.filled(read.len());
                    ingest
                        .frames(input.bytes(), &stats, &mut out)
                        .expect("real frames split");
                    spans += out.iter().map(|i| i.record.count).sum::<usize>();
                    out.clear();
                }
                assert_eq!(spans, SPANS);
                black_box(spans)
            })
        });
        g.finish();
    }
}

criterion_group!(benches, ingest);
criterion_main!(benches);
