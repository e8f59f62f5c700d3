//! Simulated Kata agents: real-SDK frames written to a Unix socket, as the
//! VMM's hybrid VSOCK relay would deliver them.
//!
//! Frames are made once, before any timing, by the agent emitter (the real
//! opentelemetry SDK of each Kata generation). Each agent is a plain thread
//! with a blocking socket, so what it costs is a `write` per batch of frames
//! and nothing that competes with the forwarder for long. The hand-over
//! run's thousand agents ([`KataAgents`]) share a few threads instead.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kata_agent_emitter::{bulk_frames, WireFormat as EmitFormat};
use kata_trace_forwarder::wire::{Decoder, HEADER_LEN};

use crate::sink::{LatencyTrack, SinkState};

/// A Kata agent's write that blocks this long is a failed write, as the
/// agent's would be.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads that write for the Kata-like agents.
const WRITERS: usize = 4;

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

/// Agents as the Kata exporter is (the hand-over run): one connection
/// each, never dialled again, each span written as it is due, and a failed
/// write (or one that blocks for `WRITE_TIMEOUT`) the end of that agent.
/// A few threads write for them all, each for a share of the connections,
/// on a 1 ms clock, every connection at its own staggered pace; each span's
/// write instant goes into the track (and is taken back if the write
/// failed).
pub struct KataAgents {
    stop: Arc<AtomicBool>,
    /// Spans written so far, all agents together.
    pub written: Arc<AtomicU64>,
    /// An agent has written its last frame.
    pub ran_out: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Agent>>>,
}

struct Agent {
    stream: Option<UnixStream>,
    range: std::ops::Range<usize>,
    /// When its first span is due.
    start: Instant,
    sent: usize,
    error: Option<String>,
}

/// What is left of the agents once they stop: their connections (kept
/// open until the forwarder has stopped), and the errors they saw.
pub struct Stopped {
    _agents: Vec<Agent>,
    pub errors: Vec<String>,
}

impl KataAgents {
    pub fn start(
        socket: &Path,
        sink: &Arc<SinkState>,
        track: &Arc<LatencyTrack>,
        frames: &Arc<Vec<Frame>>,
        ranges: &[std::ops::Range<usize>],
        rate: u64,
        per_conn_rate: f64,
    ) -> Result<KataAgents> {
        let t0 = Instant::now() + Duration::from_millis(100);
        let mut shares: Vec<Vec<Agent>> = (0..WRITERS).map(|_| Vec::new()).collect();
        for (j, range) in ranges.iter().enumerate() {
            let stream = UnixStream::connect(socket)
                .with_context(|| format!("agent {j}: connecting to {}", socket.display()))?;
            stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
            shares[j % WRITERS].push(Agent {
                stream: Some(stream),
                range: range.clone(),
                // Staggered, so that together they write evenly.
                start: t0 + Duration::from_secs_f64(j as f64 / rate.max(1) as f64),
                sent: 0,
                error: None,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let ran_out = Arc::new(AtomicBool::new(false));
        let threads = shares
            .into_iter()
            .map(|mut agents| {
                let (stop, written, ran_out) = (
                    Arc::clone(&stop),
                    Arc::clone(&written),
                    Arc::clone(&ran_out),
                );
                let (sink, track, frames) =
                    (Arc::clone(sink), Arc::clone(track), Arc::clone(frames));
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        for a in &mut agents {
                            let Some(stream) = a.stream.as_mut() else {
                                continue;
                            };
                            let n = a.range.len();
                            let Some(since) = now.checked_duration_since(a.start) else {
                                continue;
                            };
                            let due = ((since.as_secs_f64() * per_conn_rate) as usize + 1).min(n);
                            if due == n && a.sent < n {
                                ran_out.store(true, Ordering::Relaxed);
                            }
                            if due <= a.sent {
                                continue;
                            }
                            let at = sink.now_ns().max(1);
                            let idx = a.range.start + a.sent..a.range.start + due;
                            buf.clear();
                            for i in idx.clone() {
                                track.written[i].store(at, Ordering::Release);
                                buf.extend_from_slice(&frames[i].bytes);
                            }
                            match stream.write_all(&buf) {
                                Ok(()) => {
                                    written.fetch_add((due - a.sent) as u64, Ordering::Relaxed);
                                    a.sent = due;
                                }
                                Err(e) => {
                                    // The end of this agent, as for the
                                    // Kata exporter; what it failed to
                                    // write was never sent.
                                    for i in idx {
                                        track.written[i].store(0, Ordering::Release);
                                    }
                                    a.error = Some(e.to_string());
                                    a.stream = None;
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    agents
                })
            })
            .collect();
        Ok(KataAgents {
            stop,
            written,
            ran_out,
            threads,
        })
    }

    pub fn stop(mut self) -> Result<Stopped> {
        self.stop.store(true, Ordering::Relaxed);
        let mut agents = Vec::new();
        for t in std::mem::take(&mut self.threads) {
            agents.extend(t.join().map_err(|_| anyhow!("agent writer panicked"))?);
        }
        let errors = agents.iter().filter_map(|a| a.error.clone()).collect();
        Ok(Stopped {
            _agents: agents,
            errors,
        })
    }
}

impl Drop for KataAgents {
    fn drop(&mut self) {
        // A run that broke off stops writing too.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts an agent that cycles through its frames from `start` until
/// `until`: as fast as the socket takes them, or, with `rate`, that many
/// spans per second written every 10 ms. Joins to the number of spans
/// written.
pub fn spawn_flood(
    socket: PathBuf,
    frames: Arc<Vec<Frame>>,
    start: Instant,
    until: Instant,
    rate: Option<f64>,
) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let mut conn = connect(&socket)?;
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
        let mut sent = 0usize;
        let mut buf = Vec::new();
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let due = match rate {
                Some(r) => ((now - start).as_secs_f64() * r) as usize,
                // A write of 64 frames at a time.
                None => sent + 64,
            };
            buf.clear();
            for i in sent..due {
                buf.extend_from_slice(&frames[i % frames.len()].bytes);
            }
            conn.write_all(&buf).context("agent write")?;
            sent = due.max(sent);
            if rate.is_some() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(sent as u64)
    })
}
