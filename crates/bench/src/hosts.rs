//! Scenarios that look like hosts (issue 24): the forwarder in template
//! mode, every sandbox its own socket with the per-sandbox limits at their
//! defaults, one agent connection per sandbox.
//!
//! - quiet, even: `--host-sandboxes` agents write `--host-rate` spans/s in
//!   all, each one frame at a time at an even pace (at the defaults, one
//!   frame every 10 ms per agent).
//! - quiet, the agent's pace: the same rate through the real opentelemetry
//!   0.17 SDK's batch span processor at its default schedule (a batch
//!   every 5 s), as the Kata agent sends: bursts of about 500 frames per
//!   agent, 5 s apart, the agents' schedules spread over the 5 s.
//! - throttled: `--throttled` sandboxes that send as fast as their socket
//!   takes them (so at their `--sandbox-spans-per-second`) beside the
//!   quiet rest. One forwarder process does both, so the groups' CPU is
//!   told apart by subtraction: in the same run, the quiet group alone,
//!   and the same sandboxes sending at 80 % of their limit instead
//!   (unthrottled, the reference). See [`Ctx::throttled`].
//! - max over `--agents` sandboxes, the single-socket max-rate run's frames
//!   and agents, with the span-rate limit off (it would bind) and the rest
//!   at its defaults: in `main.rs`, as `max8`.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kata_agent_emitter::WireFormat as EmitFormat;

use crate::{agents, procstat, Ctx, Figures, Listen};

/// The flooders' reference pace, as a share of their span-rate limit.
const REFERENCE_SHARE: f64 = 0.8;
/// The forwarder's default `--sandbox-spans-per-second`.
const DEFAULT_SANDBOX_RATE: f64 = 20_000.0;

/// opentelemetry 0.17's batch span processor's schedule, as the agents of
/// this process get it (`OTEL_BSP_SCHEDULE_DELAY`, else its 5 s default).
fn schedule_delay() -> Duration {
    let ms = std::env::var("OTEL_BSP_SCHEDULE_DELAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    Duration::from_millis(ms)
}

impl Ctx<'_> {
    fn host(&self, sandboxes: usize) -> Result<crate::Forwarder> {
        self.spawn_to(self.endpoint, &[], Listen::Template(sandboxes))
    }

    /// Quiet, even pace: CPU and latency.
    pub(crate) fn quiet_even(&self, f: &mut Figures, format: EmitFormat) -> Result<()> {
        let a = self.args;
        let fwd = self.host(a.host_sandboxes)?;
        let p = self.run_paced(
            &fwd,
            format,
            a.host_rate,
            a.host_sandboxes,
            a.host_secs,
            |_| Ok(Vec::new()),
        )?;
        fwd.stop()?;
        p.set(f, &format!("{format}.quiet_even"));
        eprintln!(
            "   {format} quiet, even: {} sandboxes, {:.0} spans/s, CPU {:.2} %, p99 {:.1} ms",
            a.host_sandboxes,
            p.achieved,
            p.cpu / p.secs * 100.0,
            p.pct(0.99)
        );
        Ok(())
    }

    /// Quiet, at the Kata agent's own pace (JSON: opentelemetry 0.17). The
    /// CPU is measured over whole schedule periods in which every agent
    /// is under way, so the rate in it is the full `--host-rate`.
    pub(crate) fn quiet_agent(&self, f: &mut Figures) -> Result<()> {
        let a = self.args;
        let n = a.host_sandboxes.max(1);
        let period = schedule_delay();
        let periods = (a.host_secs / period.as_secs_f64()).ceil().max(1.0);
        let window = period.mul_f64(periods);
        // Each agent runs a period before the window and one after it, so
        // the window sees every one of them batch `periods` times.
        let life = window + period * 2;
        let per_agent = a.host_rate as f64 / n as f64;
        let fwd = self.host(n)?;
        let base = self.sink.spans();
        let t0 = Instant::now();
        let handles: Vec<_> = fwd
            .sockets
            .iter()
            .enumerate()
            .map(|(i, socket)| {
                let socket = socket.clone();
                let (payload, seq) = (a.payload_bytes, 2000 + i as u64);
                // Agents that started at different times: their schedules
                // spread over a period.
                let at = t0 + period.mul_f64(i as f64 / n as f64);
                std::thread::spawn(move || -> Result<u64> {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    let conn = UnixStream::connect(&socket)
                        .with_context(|| format!("connecting to {}", socket.display()))?;
                    Ok(kata_agent_emitter::live_agent(
                        conn, per_agent, life, payload, seq,
                    )?)
                })
            })
            .collect();
        let from = t0 + period;
        std::thread::sleep(from.saturating_duration_since(Instant::now()));
        let (cpu0, sink0) = (procstat::cpu_seconds(fwd.pid)?, self.sink.spans());
        std::thread::sleep((from + window).saturating_duration_since(Instant::now()));
        let (cpu1, sink1) = (procstat::cpu_seconds(fwd.pid)?, self.sink.spans());
        let secs = (Instant::now() - from).as_secs_f64();
        let mut sent = 0;
        for h in handles {
            sent += h.join().map_err(|_| anyhow!("agent panicked"))??;
        }
        self.wait_sink(base + sent, Duration::from_secs(60))?;
        fwd.stop()?;
        let (cpu, spans) = (cpu1 - cpu0, (sink1 - sink0) as f64);
        let k = "json.quiet_agent";
        f.set(format!("{k}.cpu_percent"), cpu / secs * 100.0);
        f.set(format!("{k}.spans_per_sec"), spans / secs);
        f.set(format!("{k}.cpu_sec_per_million"), cpu / spans * 1e6);
        eprintln!(
            "   json quiet, agent pace: {n} sandboxes, {:.0} spans/s at the sink, CPU {:.2} % over {secs:.1} s ({sent} spans in all)",
            spans / secs,
            cpu / secs * 100.0
        );
        Ok(())
    }

    /// Throttled sandboxes beside quiet ones, CPU per span for each group.
    ///
    /// Three forwarders, one after the other, each with the same quiet
    /// sandboxes at the even pace: (a) the quiet ones alone; (b) and
    /// `--throttled` more, each flooding its socket for as long, held at
    /// its span-rate limit by the forwarder; (c) instead, those sending at
    /// 80 % of their limit, unthrottled. The quiet group's CPU per span
    /// is (a)'s; a group's is its run's CPU less the quiet group's spans
    /// at (a)'s cost, over its own spans.
    pub(crate) fn throttled(&self, f: &mut Figures, format: EmitFormat) -> Result<()> {
        let a = self.args;
        let (n_thr, n_quiet) = (a.throttled, a.host_sandboxes.saturating_sub(a.throttled));
        // The quiet ones send what they would in the quiet scenario.
        let quiet_rate = (a.host_rate * n_quiet as u64 / a.host_sandboxes.max(1) as u64).max(1);
        let pool = (0..n_thr)
            .map(|i| {
                agents::make_frames(format, a.pool, a.payload_bytes, 3000 + i as u64).map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let run = |rate: Option<Option<f64>>| -> Result<crate::Paced> {
            let fwd = self.host(a.host_sandboxes)?;
            // The flooders take the last sockets, the quiet agents the
            // first (agent i on socket i).
            let flood = fwd.sockets[n_quiet..].to_vec();
            let secs = a.host_secs;
            let p = self.run_paced(&fwd, format, quiet_rate, n_quiet, secs, |start| {
                let Some(rate) = rate else {
                    return Ok(Vec::new());
                };
                let until = start + Duration::from_secs_f64(secs);
                Ok(flood
                    .iter()
                    .zip(&pool)
                    .map(|(s, p)| agents::spawn_flood(s.clone(), Arc::clone(p), start, until, rate))
                    .collect())
            })?;
            fwd.stop()?;
            Ok(p)
        };
        let quiet = run(None)?;
        let throttled = run(Some(None))?;
        let reference = run(Some(Some(DEFAULT_SANDBOX_RATE * REFERENCE_SHARE)))?;
        let per_quiet = quiet.cpu / quiet.spans as f64;
        let group = |p: &crate::Paced| {
            let cpu = (p.cpu - per_quiet * p.spans as f64).max(f64::MIN_POSITIVE);
            p.other_spans as f64 / cpu
        };
        let k = format!("{format}.throttled");
        let (thr, refr) = (group(&throttled), group(&reference));
        f.set(format!("{k}.quiet_spans_per_cpu_sec"), 1.0 / per_quiet);
        f.set(format!("{k}.throttled_spans_per_cpu_sec"), thr);
        f.set(format!("{k}.reference_spans_per_cpu_sec"), refr);
        f.set(format!("{k}.cpu_per_span_ratio"), refr / thr);
        f.set(
            format!("{k}.throttled_spans_per_sec"),
            throttled.other_spans as f64 / throttled.secs / n_thr.max(1) as f64,
        );
        f.set(format!("{k}.quiet_p99_ms"), throttled.pct(0.99));
        eprintln!(
            "   {format} throttled: {n_thr} at {:.0} spans/s each: {thr:.0} spans/CPU-s; at 80 % of the limit: {refr:.0}; quiet group {:.0} (x{:.2} throttled vs reference per span)",
            throttled.other_spans as f64 / throttled.secs / n_thr.max(1) as f64,
            1.0 / per_quiet,
            refr / thr
        );
        Ok(())
    }
}
