//! The hand-over budgets (issue 12): with 1,000 agent connections open, the
//! pause of each hand-over, and not one span lost or sent twice over 100
//! hand-overs in a row under 10,000 spans/s.
//!
//! The forwarder is the release binary in hybrid mode with its own
//! hand-off socket, copied into a directory anyone may read, as in
//! `tests/handover.rs`: started as root it becomes `nobody`, and so does
//! the successor it starts on `SIGHUP`, which must reach the binary and the
//! sockets. The agents behave like the Kata exporter: one connection each,
//! never dialled again, and any write error is the end of that agent
//! (counted). Every span they write is a distinct real-SDK frame, made
//! before anything is timed, so that the sink can tell, span id by span id,
//! what was lost and what came twice.
//!
//! Each step is a `SIGHUP` (one in `takeover_every` is a new process
//! started with the same flags instead), and the next waits until the
//! process that serves after it has logged "forwarder ready" and the one
//! that let go has exited. An upgrade by `SIGHUP` is two hand-overs under
//! one pid: to a bridge (the new binary, started by the forwarder), then,
//! the forwarder having become the new binary itself, back. Processes not
//! started here are followed by the pid in their "forwarder ready" line; a
//! takeover's predecessor is reaped here (the harness being the subreaper),
//! so that its exit status is checked too. What is reported of each step:
//! the pause of each hand-over as the old process measured it (from asking
//! every connection to pause to the successor's acknowledgement, its
//! `paused_for`), and the longest gap between two requests reaching the
//! sink around the step.

mod fleet;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use fleet::{become_subreaper, raise_nofile, Fleet};
use kata_agent_emitter::WireFormat as EmitFormat;
use serde::Serialize;

use crate::agents::{self, Frame, KataAgents};
use crate::sink::{LatencyTrack, SinkState};

/// Steady state before the first hand-over: long enough for every agent to
/// be paced (the forwarder measures a rate over 100 ms first).
const WARM_UP: Duration = Duration::from_secs(1);
/// Between hand-overs: the successor's connections are paced again (the
/// state the next hand-over should find), and its first batch has gone out.
const SETTLE: Duration = Duration::from_millis(300);
/// Added to `SETTLE` at random. A paced connection sees a pause at its next
/// tick (every 50 ms, counted from its forwarder's start), so with a fixed
/// settle every hand-over would come at the same phase of the successor's
/// tick and measure one point of the pause's range, always the same; an
/// upgrade comes at any phase. Two ticks' worth spreads it evenly.
const JITTER: Duration = Duration::from_millis(100);
/// What a hand-over is allowed beyond `SETTLE` and `JITTER` when the frames
/// are planned: from the signal to the predecessor's exit (about 70 ms with
/// 1,000 connections on a 2-core machine).
const CYCLE_ALLOWANCE: Duration = Duration::from_millis(200);
/// The window a hand-over's gap is looked for in: from this long before
/// the signal to this long after the predecessor exited (a batch timeout
/// and a little: the successor's first batch).
const GAP_BEFORE: Duration = Duration::from_millis(100);
const GAP_AFTER: Duration = Duration::from_millis(250);
/// Longest any one step may take before the run is called broken.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    /// Spans per second, all agents together.
    pub rate: u64,
    pub handovers: usize,
    /// Every n-th hand-over is a takeover by a new process; 0: none.
    pub takeover_every: usize,
    pub payload_bytes: usize,
    /// The agents take these in turn (agents of several Kata generations).
    pub formats: Vec<EmitFormat>,
}

/// One hand-over as measured.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// `sighup` or `takeover`.
    pub how: &'static str,
    pub from_pid: i32,
    pub to_pid: i32,
    /// The pause as the old process measured it (`paused_for`).
    pub paused_ms: f64,
    /// An upgrade by `SIGHUP`: the second hand-over's pause, the bridge's
    /// back to the upgraded process.
    pub back_paused_ms: Option<f64>,
    /// Connections handed over, as the old process logged them.
    pub connections: u64,
    /// From the signal (or the taker's start) to the "forwarder ready" of
    /// the process that serves after it (after `SIGHUP`: the same pid's).
    pub ready_ms: f64,
    /// From the signal to the exit of the process that let go (the old one,
    /// or after `SIGHUP` the bridge).
    pub gone_ms: f64,
    /// The longest gap between two requests reaching the sink around it.
    pub gap_ms: f64,
    #[serde(skip)]
    signal_ns: u64,
    #[serde(skip)]
    gone_ns: u64,
}

/// A whole run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub records: Vec<Record>,
    /// Spans the agents wrote.
    pub sent: u64,
    /// Distinct spans the sink received.
    pub received: u64,
    /// Written and never received.
    pub lost: u64,
    /// Receipts beyond the first of a span.
    pub duplicated: u64,
    /// Spans received that no agent wrote: should be none.
    pub unexpected: u64,
    /// Agents whose write failed (each is the end of that agent).
    pub agent_errors: u64,
    pub first_agent_error: Option<String>,
    /// Predecessors (and the last forwarder, at SIGTERM) that did not exit 0.
    pub bad_exits: Vec<String>,
    /// Spans written per second from the first signal to the last
    /// predecessor's exit.
    pub rate_during: f64,
    /// An agent ran out of frames before the last hand-over was done.
    pub ran_out: bool,
    /// The longest gap between requests in the second before the first
    /// hand-over: what a collector sees without one.
    pub steady_gap_ms: f64,
    /// Agent write to sink receipt, over every span of the run.
    pub latency_ms: [f64; 3],
    /// Warnings and errors the forwarders logged.
    pub complaints: Vec<String>,
}

impl Outcome {
    /// Whether anything broke (as opposed to being slow).
    pub fn broken(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} spans lost", self.lost));
        }
        if self.duplicated > 0 {
            why.push(format!("{} spans duplicated", self.duplicated));
        }
        if self.unexpected > 0 {
            why.push(format!("{} spans nobody sent", self.unexpected));
        }
        if self.agent_errors > 0 {
            why.push(format!(
                "{} agents saw a write error ({})",
                self.agent_errors,
                self.first_agent_error.as_deref().unwrap_or("?")
            ));
        }
        if !self.bad_exits.is_empty() {
            why.push(format!("forwarders exited badly: {:?}", self.bad_exits));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The p-th quantile (0..=1) of sorted values, as the other scenarios take it.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the scenario against `bin`, exporting to `endpoint` (the `sink`),
/// with `flags` (the harness's, the lifted limits among them).
pub fn run(
    bin: &Path,
    flags: &[String],
    sink: &Arc<SinkState>,
    endpoint: &str,
    plan: &Plan,
) -> Result<Outcome> {
    let conns = plan.connections.max(1);
    raise_nofile(conns as u64 * 3 + 512)?;
    become_subreaper();

    // Frames for the whole run, made before anything is timed. The run's
    // length is not known in advance, so plan generously; running out is
    // reported (and makes the achieved rate visibly short).
    let per_conn_rate = plan.rate as f64 / conns as f64;
    let planned = WARM_UP.as_secs_f64()
        + 2.0
        + plan.handovers as f64 * (SETTLE + JITTER + CYCLE_ALLOWANCE).as_secs_f64();
    let per_conn = (per_conn_rate * planned).ceil().max(1.0) as usize;
    let t_make = Instant::now();
    let (frames, ranges) = make_all(plan, conns, per_conn)?;
    let ids: Vec<u64> = frames.iter().map(|f| f.span_id).collect();
    let track = Arc::new(LatencyTrack::new(&ids));
    if track.index.len() != ids.len() {
        bail!("the emitter's span ids repeat: cannot tell a duplicate from a repeat");
    }
    eprintln!(
        "   handover: {} frames ({} per agent, {:.1} MiB) made in {:.1} s",
        frames.len(),
        per_conn,
        frames.iter().map(|f| f.bytes.len()).sum::<usize>() as f64 / (1024.0 * 1024.0),
        t_make.elapsed().as_secs_f64()
    );
    let frames = Arc::new(frames);

    let mut fleet = Fleet::start(bin, flags, endpoint)?;
    *sink.track.lock().map_err(|_| anyhow!("poisoned"))? = Some(Arc::clone(&track));
    let result = drive(
        &mut fleet,
        sink,
        &track,
        &frames,
        &ranges,
        plan,
        per_conn_rate,
    );
    *sink.track.lock().map_err(|_| anyhow!("poisoned"))? = None;
    if result.as_ref().map_or(true, |o| o.broken().is_some()) {
        // The forwarders' log goes with their directory: keep it.
        let kept = std::env::temp_dir().join(format!("ktf-handover-{}.log", std::process::id()));
        if std::fs::copy(&fleet.stderr, &kept).is_ok() {
            eprintln!(
                "   handover: the forwarders' log is kept in {}",
                kept.display()
            );
        }
    }
    let mut out = result?;
    out.complaints = fleet.log.complaints.clone();
    Ok(out)
}

/// Every agent's frames in one list, and each agent's range in it.
fn make_all(
    plan: &Plan,
    conns: usize,
    per_conn: usize,
) -> Result<(Vec<Frame>, Vec<std::ops::Range<usize>>)> {
    let formats = if plan.formats.is_empty() {
        vec![EmitFormat::Json]
    } else {
        plan.formats.clone()
    };
    // Two threads: the SDKs are slow, and nothing else runs yet.
    let half = conns.div_ceil(2);
    let make = |from: usize, to: usize| -> Result<Vec<Vec<Frame>>> {
        (from..to)
            .map(|j| {
                agents::make_frames(
                    formats[j % formats.len()],
                    per_conn,
                    plan.payload_bytes,
                    50_000 + j as u64,
                )
            })
            .collect()
    };
    let (a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| make(half, conns));
        let mine = make(0, half);
        (mine, other.join())
    });
    let b = b.map_err(|_| anyhow!("frame maker panicked"))?;
    let mut all = Vec::with_capacity(conns * per_conn);
    let mut ranges = Vec::with_capacity(conns);
    for frames in a?.into_iter().chain(b?) {
        let first = all.len();
        all.extend(frames);
        ranges.push(first..all.len());
    }
    Ok((all, ranges))
}

/// Opens the agents, waits for steady state, does the hand-overs, and
/// counts.
fn drive(
    fleet: &mut Fleet,
    sink: &Arc<SinkState>,
    track: &Arc<LatencyTrack>,
    frames: &Arc<Vec<Frame>>,
    ranges: &[std::ops::Range<usize>],
    plan: &Plan,
    per_conn_rate: f64,
) -> Result<Outcome> {
    let base = sink.spans();
    let writers = KataAgents::start(
        &fleet.agent_socket,
        sink,
        track,
        frames,
        ranges,
        plan.rate,
        per_conn_rate,
    )?;

    // Steady state: every agent's first span has come through (so every
    // connection is the forwarder's), and the agents are paced.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let waiting = ranges
            .iter()
            .filter(|r| track.received[r.start].load(Ordering::Relaxed) == 0)
            .count();
        if waiting == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{waiting} of {} agents had no span through within {STEP_TIMEOUT:?}",
                ranges.len()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(WARM_UP);
    let steady = (sink.now_ns().saturating_sub(1_000_000_000), sink.now_ns());

    let mut out = Outcome::default();
    let first_signal = Instant::now();
    let written_before = writers.written.load(Ordering::Relaxed);
    let mut jitter = Jitter::seeded();
    for i in 0..plan.handovers {
        let takeover = plan.takeover_every > 0 && (i + 1) % plan.takeover_every == 0;
        let rec = fleet.hand_over(sink, takeover)?;
        if plan.handovers <= 10 || (i + 1) % 10 == 0 {
            eprintln!(
                "   handover {}/{} ({}): paused {:.1} ms (and back {:.1} ms) with {} connections, ready after {:.0} ms, old one gone after {:.0} ms",
                i + 1,
                plan.handovers,
                rec.how,
                rec.paused_ms,
                rec.back_paused_ms.unwrap_or(0.0),
                rec.connections,
                rec.ready_ms,
                rec.gone_ms
            );
        }
        out.records.push(rec);
        std::thread::sleep(SETTLE + jitter.up_to(JITTER));
    }
    let during = first_signal.elapsed();
    let written_during = writers.written.load(Ordering::Relaxed) - written_before;
    out.rate_during = written_during as f64 / during.as_secs_f64().max(1e-9);
    out.ran_out = writers.ran_out.load(Ordering::Relaxed);

    let conns = writers.stop()?;
    out.agent_errors = conns.errors.len() as u64;
    out.first_agent_error = conns.errors.first().cloned();
    let sent: u64 = track
        .written
        .iter()
        .filter(|w| w.load(Ordering::Relaxed) != 0)
        .count() as u64;
    out.sent = sent;
    // Everything written should come; then a moment more for anything that
    // would come twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.spans() < base + sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (w, r) in track.written.iter().zip(&track.received) {
        let (w, r) = (w.load(Ordering::Relaxed), r.load(Ordering::Relaxed));
        if r > 0 {
            out.received += 1;
            out.duplicated += u64::from(r - 1);
        } else if w != 0 {
            out.lost += 1;
        }
    }
    out.unexpected = track.unmatched.load(Ordering::Relaxed);

    let mut arrivals =
        std::mem::take(&mut *track.arrivals.lock().map_err(|_| anyhow!("poisoned"))?);
    arrivals.sort_unstable();
    out.steady_gap_ms = longest_gap(&arrivals, steady.0, steady.1);
    for r in &mut out.records {
        let lo = r.signal_ns.saturating_sub(GAP_BEFORE.as_nanos() as u64);
        let hi = r.gone_ns + GAP_AFTER.as_nanos() as u64;
        r.gap_ms = longest_gap(&arrivals, lo, hi);
    }
    let mut lat = std::mem::take(&mut *track.latencies.lock().map_err(|_| anyhow!("poisoned"))?);
    lat.sort_unstable();
    let lat: Vec<f64> = lat.iter().map(|&n| n as f64 * 1e-6).collect();
    out.latency_ms = [pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0)];

    // The last forwarder stops as at any shutdown; the agents' connections
    // stay open until it has (the agent's never close).
    if let Some(bad) = fleet.stop()? {
        out.bad_exits.push(bad);
    }
    out.bad_exits.append(&mut fleet.bad_exits);
    drop(conns);
    Ok(out)
}

/// Random waits (xorshift64, seeded from the clock): nothing here needs
/// more than a spread.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Jitter {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Jitter(t | 1)
    }

    fn up_to(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_nanos(self.0 % max.as_nanos().max(1) as u64)
    }
}

/// The longest interval between two consecutive arrivals that overlaps
/// [`lo`, `hi`] (nanoseconds, `arrivals` sorted): a gap that began before
/// the window counts whole. The whole window if nothing arrived in it.
fn longest_gap(arrivals: &[u64], lo: u64, hi: u64) -> f64 {
    let from = arrivals.partition_point(|&t| t < lo).saturating_sub(1);
    let to = (arrivals.partition_point(|&t| t <= hi) + 1).min(arrivals.len());
    let near = arrivals.get(from..to).unwrap_or_default();
    near.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .map_or((hi - lo) as f64, |g| g as f64)
        * 1e-6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_overlapping_the_window_counts_whole() {
        let ms = |v: &[u64]| v.iter().map(|m| m * 1_000_000).collect::<Vec<_>>();
        let a = ms(&[0, 50, 100, 300, 350, 400, 1000]);
        // The 100..300 gap overlaps 250..260 though neither end is in it.
        assert_eq!(longest_gap(&a, 250_000_000, 260_000_000), 200.0);
        // Within 320..420: 300..350, 350..400 and 400..1000 overlap it.
        assert_eq!(longest_gap(&a, 320_000_000, 420_000_000), 600.0);
        assert_eq!(longest_gap(&a, 0, 90_000_000), 50.0);
        assert_eq!(longest_gap(&[], 0, 5_000_000), 5.0);
    }

    #[test]
    fn jitter_spreads_under_its_bound() {
        let mut j = Jitter::seeded();
        let max = Duration::from_millis(100);
        let v: Vec<Duration> = (0..1000).map(|_| j.up_to(max)).collect();
        assert!(v.iter().all(|d| *d < max));
        assert!(v.iter().any(|d| *d < max / 4) && v.iter().any(|d| *d > max * 3 / 4));
    }

    #[test]
    fn quantiles_as_the_other_scenarios_take_them() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
