//! The machine's limits for the same frames, to hold the forwarder against.
//!
//! - transport: the same agents write the same frames into a Unix socket
//!   read by a task that only splits frames (`LengthDelimitedCodec`, as the
//!   forwarder configures it) and counts them. Nothing a forwarder does can
//!   be faster than this on this machine.
//! - parse: the same, with every frame also decoded by the fastest parse
//!   there is of these bytes, the forwarder's own borrowed decode. This is
//!   the least any forwarder must do (read, split, understand); what the
//!   forwarder does beyond it is conversion, batching and export.
//! - decode only: that decode of the same payloads in memory, in a loop on
//!   one thread with no socket at all.
//!
//! The readers run on one thread and read 64 KiB at a time, as the
//! forwarder does.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use kata_trace_forwarder::wire::{frame_codec, Decoder};
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

use crate::agents::{spawn_max_rate, Frame};
use crate::procstat::thread_cpu_seconds;

#[derive(Debug, Clone, Copy)]
pub struct LimitFigure {
    /// Spans per wall-clock second.
    pub spans_per_sec: f64,
    /// Spans per CPU-second of the reader (or parser) thread.
    pub spans_per_cpu_sec: f64,
}

/// What the limit reader does with each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Split frames only.
    Split,
    /// Split and decode each payload.
    Parse,
}

/// Runs the agents against a reader on one thread.
pub fn reader(
    dir: &Path,
    pools: &[Arc<Vec<Frame>>],
    reps: usize,
    what: Reader,
) -> Result<LimitFigure> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let socket = dir.join(format!(
        "transport{}.sock",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let total: u64 = pools.iter().map(|p| (p.len() * reps) as u64).sum();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(Instant, f64)>();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<f64>>();
    let sock = socket.clone();
    let reader = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
        };
        rt.block_on(async move {
            let listener = match UnixListener::bind(&sock) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(thread_cpu_seconds()));
            let count = Arc::new(AtomicU64::new(0));
            let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let count = Arc::clone(&count);
                let done_tx = Arc::clone(&done_tx);
                tokio::spawn(async move {
                    let mut frames =
                        FramedRead::with_capacity(stream, frame_codec(4 << 20), 64 * 1024);
                    let mut decoder = Decoder::new();
                    let mut known = Vec::new();
                    while let Some(Ok(frame)) = frames.next().await {
                        black_box(&frame);
                        if what == Reader::Parse {
                            // As the forwarder decodes: an unchanged resource
                            // is not decoded again.
                            let Ok((span, seen)) =
                                decoder.decode_reusing(black_box(&frame), &known)
                            else {
                                // Counted as not seen: the run then times out
                                // with an error instead of a figure.
                                continue;
                            };
                            seen.remember(&mut known);
                            black_box(&span);
                        }
                        if count.fetch_add(1, Ordering::Relaxed) + 1 == total {
                            let at = (Instant::now(), thread_cpu_seconds());
                            if let Some(tx) = done_tx.lock().ok().and_then(|mut t| t.take()) {
                                let _ = tx.send(at);
                            }
                        }
                    }
                });
            }
        });
    });
    let cpu0 = ready_rx
        .blocking_recv()
        .context("limit reader did not start")??;
    let start = Arc::new(Barrier::new(pools.len() + 1));
    let agents: Vec<_> = pools
        .iter()
        .map(|p| spawn_max_rate(socket.clone(), Arc::clone(p), reps, Arc::clone(&start)))
        .collect();
    start.wait();
    let t0 = Instant::now();
    for a in agents {
        a.join().map_err(|_| anyhow::anyhow!("agent panicked"))??;
    }
    let (t1, cpu1) = done_rx
        .recv_timeout(Duration::from_secs(120))
        .context("limit reader did not see every frame")?;
    // The reader thread stays parked on its listener; it is a benchmark
    // process, which exits soon.
    drop(reader);
    let wall = (t1 - t0).as_secs_f64();
    Ok(LimitFigure {
        spans_per_sec: total as f64 / wall,
        spans_per_cpu_sec: total as f64 / (cpu1 - cpu0).max(1e-9),
    })
}

/// Decodes every payload over and over on this thread for at least
/// `min_cpu` CPU-seconds.
pub fn decode_only(pools: &[Arc<Vec<Frame>>], min_cpu: f64) -> Result<LimitFigure> {
    let payloads: Vec<&[u8]> = pools
        .iter()
        .flat_map(|p| p.iter().map(Frame::payload))
        .collect();
    if payloads.is_empty() {
        bail!("no frames to parse");
    }
    let mut decoder = Decoder::new();
    let mut known = Vec::new();
    let t0 = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut n = 0u64;
    loop {
        for p in &payloads {
            let (span, seen) = decoder
                .decode_reusing(black_box(p), &known)
                .map_err(|e| anyhow::anyhow!("parse: {e}"))?;
            seen.remember(&mut known);
            black_box(&span);
        }
        n += payloads.len() as u64;
        if thread_cpu_seconds() - cpu0 >= min_cpu {
            break;
        }
    }
    let cpu = thread_cpu_seconds() - cpu0;
    Ok(LimitFigure {
        spans_per_sec: n as f64 / t0.elapsed().as_secs_f64(),
        spans_per_cpu_sec: n as f64 / cpu,
    })
}
