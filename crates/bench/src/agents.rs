//! Simulated Kata agents: real-SDK frames written to a Unix socket, as the
//! VMM's hybrid VSOCK relay would deliver them.
//!
//! Frames are made once, before any timing, by the agent emitter (the real
//! opentelemetry SDK of each Kata generation). Each agent is a plain thread
//! with a blocking socket, so what it costs is a `write` per batch of frames
//! and nothing that competes with the forwarder for long.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};
use kata_trace_forwarder::wire::{Decoder, HEADER_LEN};

use crate::sink::LatencyTrack;

/// One frame as the agent writes it, and the id of the span inside.
pub struct Frame {
    pub bytes: Vec<u8>,
    pub span_id: u64,
}

impl Frame {
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// `n` distinct real-SDK frames of about `payload_bytes` each, for agent
/// `seq`.
pub fn make_frames(
    format: EmitFormat,
    n: usize,
    payload_bytes: usize,
    seq: u64,
) -> Result<Vec<Frame>> {
    let mut decoder = Decoder::new();
    bulk_frames(format, n, payload_bytes, seq)
        .into_iter()
        .map(|bytes| {
            let span_id = decoder
                .decode(&bytes[HEADER_LEN..])
                .map_err(|e| anyhow!("emitter frame does not decode: {e}"))?
                .span_context
                .span_id;
            Ok(Frame { bytes, span_id })
        })
        .collect()
}

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))
}

/// Starts an agent that connects, waits at `start`, then writes its frames
/// `reps` times over as fast as the socket takes them. Joins to the number
/// of spans written.
pub fn spawn_max_rate(
    socket: PathBuf,
    frames: Arc<Vec<Frame>>,
    reps: usize,
    start: Arc<Barrier>,
) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let conn = connect(&socket);
        // Reach the barrier whatever happened, or the others wait forever.
        start.wait();
        let mut conn = conn?;
        let stream: Vec<u8> = frames
            .iter()
            .flat_map(|f| f.bytes.iter().copied())
            .collect();
        for _ in 0..reps {
            conn.write_all(&stream).context("agent write")?;
        }
        Ok((frames.len() * reps) as u64)
    })
}

/// Starts an agent that writes each of its frames once, at `rate` spans per
/// second from `start` on, stamping each span's write instant (nanoseconds
/// since `epoch`) into `track` at `first_index + i`.
pub fn spawn_paced(
    socket: PathBuf,
    frames: Arc<Vec<Frame>>,
    rate: f64,
    start: Instant,
    epoch: Instant,
    track: Arc<LatencyTrack>,
    first_index: usize,
) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let mut conn = connect(&socket)?;
        let n = frames.len();
        let mut sent = 0usize;
        let mut buf = Vec::new();
        while sent < n {
            let now = Instant::now();
            if now < start {
                std::thread::sleep(start - now);
                continue;
            }
            let due = (((now - start).as_secs_f64() * rate) as usize + 1).min(n);
            if due > sent {
                let at = (now - epoch).as_nanos() as u64;
                buf.clear();
                for (i, f) in frames[sent..due].iter().enumerate() {
                    track.written[first_index + sent + i].store(at.max(1), Ordering::Release);
                    buf.extend_from_slice(&f.bytes);
                }
                conn.write_all(&buf).context("agent write")?;
                sent = due;
            }
            // Sleep until the next span is due.
            let next = start + Duration::from_secs_f64(sent as f64 / rate);
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        Ok(n as u64)
    })
}

/// Opens `n` connections that each send one frame and then stay open and
/// quiet, like the agents of long-running sandboxes.
pub fn open_idle(socket: &Path, frames: &[Frame], n: usize) -> Result<Vec<UnixStream>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = connect(socket)?;
        let f = frames
            .get(i % frames.len().max(1))
            .context("no frames for idle connections")?;
        c.write_all(&f.bytes).context("idle agent write")?;
        conns.push(c);
    }
    Ok(conns)
}
