//! `ktf-bench`: the forwarder's end-to-end benchmark (issue 6).
//!
//! One command (`scripts/bench.sh`) measures, on this machine and in one run:
//!
//! - max rate: N agents write real-SDK frames (JSON and bincode) as fast as
//!   the forwarder takes them; the forwarder is the release binary, a child
//!   process listening on hybrid VSOCK (a Unix socket) and exporting over
//!   OTLP/gRPC to an in-process sink that only counts. Reported: spans per
//!   second, the forwarder's CPU-seconds per million spans (its own
//!   utime+stime from /proc), and its peak RSS (VmHWM).
//! - fixed rates: the same at a set pace, with each span's latency from the
//!   agent's write to the sink's receipt (write instants are kept per span
//!   id; the sink reads the ids it receives).
//! - idle: RSS with 1,000 quiet connections, and startup to listening.
//! - limits: the same frames through a reader that only splits frames, and
//!   through the borrowed decode alone (see [`limits`]).
//! - handover (not run unless asked, but in `--smoke`): 1,000 agents at
//!   10,000 spans/s in all through 100 hand-overs in a row, each one's
//!   pause and every span counted (see [`handover`]).
//!
//! Every scenario runs `--runs` times and the report gives medians. This is
//! a benchmark, not a test: it prints budgets next to figures but exits
//! non-zero only when something broke (lost spans, a forwarder that would
//! not start), never because a figure is slow.
//!
//! Over 500 lines: each scenario's figures are named where they are set and
//! read back by name in the report, so both stay in this one file.

mod agents;
mod handover;
mod hosts;
mod limits;
mod procstat;
mod sink;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use kata_agent_emitter::WireFormat as EmitFormat;
use serde::Serialize;

use agents::Frame;
use sink::{LatencyTrack, SinkState};

/// The forwarder's default `--batch-timeout`, which the latency budget is
/// relative to.
const BATCH_TIMEOUT_MS: f64 = 200.0;
const MIB: f64 = 1024.0 * 1024.0;
const DEFAULT_SCENARIOS: &str = "idle,max,max8,tls,gzip,fixed,quiet,throttled,limits";

#[derive(Parser, Debug, Clone)]
#[command(about = "End-to-end benchmark of kata-trace-forwarder")]
struct Args {
    /// The forwarder binary (a release build).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/kata-trace-forwarder"))]
    forwarder: PathBuf,
    /// Repetitions of every scenario; the report gives medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Concurrent agents (connections) in the max-rate and fixed-rate runs.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Spans per max-rate run, all agents together.
    #[arg(long, default_value_t = 1_000_000)]
    spans: usize,
    /// Distinct frames each agent cycles through in max-rate runs.
    #[arg(long, default_value_t = 2_000)]
    pool: usize,
    /// Approximate payload size of each span, in bytes.
    #[arg(long, default_value_t = 1000)]
    payload_bytes: usize,
    /// Fixed rates to run at, spans per second (all agents together).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    rates: Vec<u64>,
    /// Length of each fixed-rate run.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    fixed_secs: f64,
    /// Idle connections for the idle-memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// CPU-seconds the in-memory decode-only figure decodes for, per run and format.
    #[arg(long, default_value_t = 1.0)]
    parse_secs: f64,
    /// Wire formats to run.
    #[arg(long, value_delimiter = ',', default_value = "json,bincode")]
    formats: Vec<EmitFormat>,
    /// Scenarios to run: idle, max, max8 (max rate over --agents template
    /// sandboxes), tls (max rate into a TLS collector), gzip (max rate with
    /// --otlp-compression=gzip), fixed, quiet (--host-sandboxes template
    /// sandboxes at --host-rate, even and at the Kata agent's pace; or
    /// one of them: quiet-even, quiet-agent),
    /// throttled (--throttled of them over their limit), limits, and
    /// handover (100 hand-overs under load; not by default: minutes long).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_SCENARIOS)]
    scenarios: Vec<String>,
    /// Template sandboxes (one agent connection each) in the quiet and
    /// throttled runs.
    #[arg(long, default_value_t = 100)]
    host_sandboxes: usize,
    /// Spans per second of the quiet sandboxes, all together.
    #[arg(long, default_value_t = 10_000)]
    host_rate: u64,
    /// Length of each quiet and throttled run (the agent-pace run measures
    /// whole 5 s batch periods, this long rounded up, plus a period either side).
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    host_secs: f64,
    /// Sandboxes over their span-rate limit in the throttled run.
    #[arg(long, default_value_t = 4)]
    throttled: usize,
    /// Agent connections, all open through the hand-over run.
    #[arg(long, default_value_t = 1000)]
    handover_connections: usize,
    /// Spans per second in the hand-over run, all agents together.
    #[arg(long, default_value_t = 10_000)]
    handover_rate: u64,
    /// Hand-overs in a row in the hand-over run.
    #[arg(long, default_value_t = 100)]
    handovers: usize,
    /// Every n-th hand-over is a takeover by a new process started with the
    /// same --handoff-socket instead of a SIGHUP; 0: none.
    #[arg(long, default_value_t = 10)]
    takeover_every: usize,
    /// A seconds-long run that only checks the harness works (CI).
    #[arg(long)]
    smoke: bool,
    /// Also write every run's raw figures here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Serve the sink over TLS (a certificate made at start; the forwarder
    /// is given its CA with --otlp-certificate).
    #[arg(long)]
    sink_tls: bool,
    /// Extra flags for the forwarder (repeatable), e.g. --forwarder-arg=--batch-max-spans=1024.
    #[arg(long = "forwarder-arg", allow_hyphen_values = true)]
    forwarder_args: Vec<String>,
}

impl Args {
    fn smoke(mut self) -> Self {
        self.runs = 1;
        self.agents = 2;
        self.spans = 20_000;
        self.pool = 500;
        self.rates = vec![2_000];
        self.fixed_secs = 1.0;
        self.idle_connections = 50;
        self.parse_secs = 0.1;
        self.host_sandboxes = 10;
        self.host_rate = 1_000;
        self.host_secs = 1.0;
        self.throttled = 2;
        // The agents' batch processors on a short schedule (the agents run
        // in this process; the forwarder is spawned without OTEL_BSP_*).
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
        // A hand-over and a takeover, to check the scenario works; timed
        // with so few connections, its figures mean nothing.
        self.handover_connections = 20;
        self.handover_rate = 200;
        self.handovers = 2;
        self.takeover_every = 2;
        if self.scenarios.join(",") == DEFAULT_SCENARIOS {
            self.scenarios.push("handover".into());
        }
        self
    }
}

/// One figure from one run.
#[derive(Debug, Default, Serialize)]
struct Figures(BTreeMap<String, f64>);

impl Figures {
    fn set(&mut self, key: impl Into<String>, v: f64) {
        self.0.insert(key.into(), v);
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args = args.smoke();
    }
    if !args.forwarder.exists() {
        bail!(
            "no forwarder binary at {} (build it with `cargo build --release`)",
            args.forwarder.display()
        );
    }
    let epoch = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sink")
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (sink, endpoint, sink_flags) =
        rt.block_on(sink::start(epoch, args.sink_tls.then_some(dir.path())))?;
    args.forwarder_args.extend(sink_flags);
    // Every agent of the harness writes to one socket, which a forwarder
    // with per-sandbox limits takes for one sandbox. The agents stand for
    // many: lift the limits (the rate to one never reached, so that the
    // token bucket is still paid for), where the binary has them.
    let lifted = sandbox_limits_lifted(&args.forwarder)?;
    args.forwarder_args.splice(0..0, lifted.iter().cloned());

    let on = |s: &str| args.scenarios.iter().any(|x| x == s);
    let mut pools: BTreeMap<String, Vec<Arc<Vec<Frame>>>> = BTreeMap::new();
    let pooled = ["max", "max8", "tls", "gzip", "limits"]
        .iter()
        .any(|s| on(s));
    if pooled {
        eprintln!(
            "== making frames (real SDK, ~{} B payloads)",
            args.payload_bytes
        );
    }
    for &format in args.formats.iter().filter(|_| pooled) {
        let per_agent = args.pool.min(args.spans / args.agents.max(1)).max(1);
        let mut p = Vec::new();
        for a in 0..args.agents {
            p.push(Arc::new(agents::make_frames(
                format,
                per_agent,
                args.payload_bytes,
                a as u64,
            )?));
        }
        let sizes: Vec<usize> = p
            .iter()
            .flat_map(|v| v.iter().map(|f| f.payload().len()))
            .collect();
        eprintln!(
            "   {format}: {} agents x {per_agent} frames, payload {}..{} B",
            args.agents,
            sizes.iter().min().unwrap_or(&0),
            sizes.iter().max().unwrap_or(&0)
        );
        pools.insert(format.to_string(), p);
    }

    let tls_sink = if args.scenarios.iter().any(|s| s == "tls") {
        Some(rt.block_on(sink::start(epoch, Some(dir.path())))?)
    } else {
        None
    };
    let ctx = Ctx {
        args: &args,
        sink: &sink,
        endpoint: &endpoint,
        tls_sink: tls_sink.as_ref(),
        dir: dir.path(),
        epoch,
        lifted,
    };
    let mut runs = Vec::new();
    let mut handovers = Vec::new();
    let mut broken = Vec::new();
    for run in 1..=args.runs {
        eprintln!("== run {run}/{}", args.runs);
        let mut f = Figures::default();
        if on("idle") {
            ctx.idle(&mut f)?;
        }
        if on("handover") {
            let out = ctx.handover(&mut f)?;
            if let Some(why) = out.broken() {
                broken.push(format!("run {run}: {why}"));
            }
            handovers.push(out.records);
        }
        for &format in &args.formats {
            let pool = pools
                .get(&format.to_string())
                .map_or(&[][..], Vec::as_slice);
            let plain = || Target {
                sink: ctx.sink,
                endpoint: ctx.endpoint,
                flags: Vec::new(),
                label: "max",
                listen: Listen::Socket,
            };
            if on("max") {
                ctx.max_rate(&mut f, format, pool, plain())?;
            }
            if on("max8") {
                // The span-rate limit would bind; the rest at the defaults.
                let t = Target {
                    flags: vec!["--sandbox-spans-per-second=0".into()],
                    label: "max8",
                    listen: Listen::Template(pool.len()),
                    ..plain()
                };
                ctx.max_rate(&mut f, format, pool, t)?;
            }
            if let (true, Some((s, e, flags))) = (on("tls"), ctx.tls_sink) {
                let t = Target {
                    sink: s,
                    endpoint: e,
                    flags: flags.clone(),
                    label: "tls",
                    listen: Listen::Socket,
                };
                ctx.max_rate(&mut f, format, pool, t)?;
            }
            if on("gzip") {
                let t = Target {
                    flags: vec!["--otlp-compression=gzip".into()],
                    label: "gzip",
                    ..plain()
                };
                ctx.max_rate(&mut f, format, pool, t)?;
            }
            if on("fixed") {
                for &rate in &args.rates {
                    ctx.paced(&mut f, format, rate)?;
                }
            }
            // `quiet` is both paces; `quiet-even` or `quiet-agent` one.
            if on("quiet") || on("quiet-even") {
                ctx.quiet_even(&mut f, format)?;
            }
            if (on("quiet") || on("quiet-agent")) && format == EmitFormat::Json {
                ctx.quiet_agent(&mut f)?;
            }
            if on("throttled") {
                ctx.throttled(&mut f, format)?;
            }
            if !on("limits") {
                continue;
            }
            let reps = ctx.reps(pool);
            let t = limits::reader(ctx.dir, pool, reps, limits::Reader::Split)?;
            f.set(format!("{format}.transport.spans_per_sec"), t.spans_per_sec);
            f.set(
                format!("{format}.transport.spans_per_cpu_sec"),
                t.spans_per_cpu_sec,
            );
            let p = limits::reader(ctx.dir, pool, reps, limits::Reader::Parse)?;
            f.set(format!("{format}.parse.spans_per_sec"), p.spans_per_sec);
            f.set(
                format!("{format}.parse.spans_per_cpu_sec"),
                p.spans_per_cpu_sec,
            );
            let d = limits::decode_only(pool, args.parse_secs)?;
            f.set(
                format!("{format}.decode.spans_per_cpu_sec"),
                d.spans_per_cpu_sec,
            );
            if let (Some(&fwd), Some(&fwd_wall)) = (
                f.0.get(&format!("{format}.max.spans_per_cpu_sec")),
                f.0.get(&format!("{format}.max.spans_per_sec")),
            ) {
                f.set(
                    format!("{format}.ratio.parse_cpu"),
                    fwd / p.spans_per_cpu_sec,
                );
                f.set(
                    format!("{format}.ratio.decode_cpu"),
                    fwd / d.spans_per_cpu_sec,
                );
                f.set(
                    format!("{format}.ratio.transport_wall"),
                    fwd_wall / t.spans_per_sec,
                );
            }
            eprintln!(
                "   {format} limits: transport {:.0} spans/s, parse {:.0} spans/CPU-s, decode only {:.0} spans/CPU-s",
                t.spans_per_sec, p.spans_per_cpu_sec, d.spans_per_cpu_sec
            );
        }
        runs.push(f);
    }
    drop(rt);

    report(&args, &runs, &endpoint);
    if let Some(path) = &args.json {
        let mut out = serde_json::json!({ "args": format!("{args:?}"), "runs": runs });
        if !handovers.is_empty() {
            // Every hand-over of every run, one list per run.
            out["handovers"] = serde_json::to_value(&handovers)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    if !broken.is_empty() {
        bail!("hand-over run broken: {}", broken.join("; "));
    }
    Ok(())
}

/// The flags that lift a forwarder's per-sandbox limits, if it has any.
/// `cmd` without the environment that would set the forwarder's endpoint
/// or batching: the harness's flags alone decide.
fn without_settings_from_env(cmd: &mut Command) -> &mut Command {
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn sandbox_limits_lifted(bin: &Path) -> Result<Vec<String>> {
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    if !String::from_utf8_lossy(&help.stdout).contains("--sandbox-max-connections") {
        return Ok(Vec::new());
    }
    Ok([
        "--sandbox-max-connections=1024",
        "--sandbox-spans-per-second=4000000000",
    ]
    .map(String::from)
    .to_vec())
}

/// Where a max-rate run sends: a sink, its endpoint, the forwarder flags
/// it needs, and the name its figures go under.
struct Target<'a> {
    sink: &'a Arc<SinkState>,
    endpoint: &'a str,
    flags: Vec<String>,
    label: &'a str,
    listen: Listen,
}

struct Ctx<'a> {
    args: &'a Args,
    sink: &'a Arc<SinkState>,
    endpoint: &'a str,
    /// The TLS sink of the `tls` scenario, its endpoint and flags.
    tls_sink: Option<&'a (Arc<SinkState>, String, Vec<String>)>,
    dir: &'a Path,
    epoch: Instant,
    /// The flags that lift the per-sandbox limits, in every single-socket
    /// run's flags (see `sandbox_limits_lifted`).
    lifted: Vec<String>,
}

impl Ctx<'_> {
    fn reps(&self, pool: &[Arc<Vec<Frame>>]) -> usize {
        let per_round: usize = pool.iter().map(|p| p.len()).sum();
        self.args.spans.div_ceil(per_round.max(1)).max(1)
    }

    fn spawn(&self) -> Result<Forwarder> {
        self.spawn_to(self.endpoint, &[], Listen::Socket)
    }

    /// In template mode, each sandbox its own socket: the per-sandbox
    /// limits stay at their defaults, unless `flags` set them.
    fn spawn_to(&self, endpoint: &str, flags: &[String], listen: Listen) -> Result<Forwarder> {
        let mut all = self.args.forwarder_args.clone();
        if let Listen::Template(_) = listen {
            all.retain(|a| !self.lifted.contains(a));
        }
        all.extend_from_slice(flags);
        Forwarder::spawn(&self.args.forwarder, self.dir, endpoint, &all, listen)
    }

    /// Startup time, idle RSS, and RSS with many quiet connections.
    fn idle(&self, f: &mut Figures) -> Result<()> {
        let fwd = self.spawn()?;
        f.set("startup_ms", fwd.startup.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
        f.set("idle.rss_mib", fwd.status("VmRSS")? / MIB);
        let frames = agents::make_frames(EmitFormat::Json, 16, self.args.payload_bytes, 999)?;
        let base = self.sink.spans();
        let cpu0 = procstat::cpu_seconds(fwd.pid)?;
        let conns = agents::open_idle(&fwd.socket, &frames, self.args.idle_connections)?;
        self.wait_sink(base + conns.len() as u64, Duration::from_secs(30))?;
        // Let the batch go out and the connections settle into idleness.
        std::thread::sleep(Duration::from_millis(1000));
        let cpu1 = procstat::cpu_seconds(fwd.pid)?;
        std::thread::sleep(Duration::from_millis(2000));
        let cpu2 = procstat::cpu_seconds(fwd.pid)?;
        f.set("idle.conns_rss_mib", fwd.status("VmRSS")? / MIB);
        f.set("idle.conns_cpu_ms_per_sec", (cpu2 - cpu1) * 1e3 / 2.0);
        f.set("idle.conns_open_cpu_ms", (cpu1 - cpu0) * 1e3);
        drop(conns);
        fwd.stop()?;
        eprintln!(
            "   idle: startup {:.1} ms, RSS {:.1} MiB, with {} connections {:.1} MiB",
            f.0["startup_ms"],
            f.0["idle.rss_mib"],
            self.args.idle_connections,
            f.0["idle.conns_rss_mib"]
        );
        Ok(())
    }

    fn wait_sink(&self, n: u64, timeout: Duration) -> Result<()> {
        wait_sink(self.sink, n, timeout)
    }

    /// The hand-over budgets (issue 12): every hand-over's pause, the gaps
    /// the collector sees, and every span counted.
    fn handover(&self, f: &mut Figures) -> Result<handover::Outcome> {
        let a = self.args;
        let plan = handover::Plan {
            connections: a.handover_connections,
            rate: a.handover_rate,
            handovers: a.handovers,
            takeover_every: a.takeover_every,
            payload_bytes: a.payload_bytes,
            formats: a.formats.clone(),
        };
        // Every agent in one sandbox (one hybrid socket): room for all of
        // them, with the harness's other lifted limits as they are.
        let room = (a.handover_connections * 2).max(1024).to_string();
        let flags = with_flag(&a.forwarder_args, "--max-connections", &room);
        let flags = with_flag(&flags, "--sandbox-max-connections", &room);
        eprintln!(
            "   handover: {} agents, {} spans/s, {} hand-overs, {}",
            plan.connections,
            plan.rate,
            plan.handovers,
            match plan.takeover_every {
                0 => "no takeover".to_string(),
                n => format!("every {n} a takeover"),
            }
        );
        let out = handover::run(&a.forwarder, &flags, self.sink, self.endpoint, &plan)?;
        // Every hand-over's pause: an upgrade by SIGHUP is two (to the
        // bridge and back).
        let pauses = sorted(
            out.records
                .iter()
                .flat_map(|r| std::iter::once(r.paused_ms).chain(r.back_paused_ms)),
        );
        let gaps = sorted(out.records.iter().map(|r| r.gap_ms));
        let k = "handover";
        f.set(format!("{k}.connections"), plan.connections as f64);
        f.set(format!("{k}.count"), out.records.len() as f64);
        f.set(format!("{k}.pauses"), pauses.len() as f64);
        f.set(
            format!("{k}.takeovers"),
            out.records.iter().filter(|r| r.how == "takeover").count() as f64,
        );
        f.set(
            format!("{k}.connections_handed_min"),
            out.records.iter().map(|r| r.connections).min().unwrap_or(0) as f64,
        );
        for (name, v) in [("pause", &pauses), ("gap", &gaps)] {
            f.set(format!("{k}.{name}_p50_ms"), handover::pct(v, 0.5));
            f.set(format!("{k}.{name}_p99_ms"), handover::pct(v, 0.99));
            f.set(format!("{k}.{name}_max_ms"), handover::pct(v, 1.0));
        }
        f.set(format!("{k}.steady_gap_ms"), out.steady_gap_ms);
        let ready = sorted(out.records.iter().map(|r| r.ready_ms));
        let gone = sorted(out.records.iter().map(|r| r.gone_ms));
        f.set(format!("{k}.ready_p50_ms"), handover::pct(&ready, 0.5));
        f.set(format!("{k}.gone_p50_ms"), handover::pct(&gone, 0.5));
        f.set(format!("{k}.spans_sent"), out.sent as f64);
        f.set(format!("{k}.spans_received"), out.received as f64);
        f.set(format!("{k}.spans_lost"), out.lost as f64);
        f.set(format!("{k}.spans_duplicated"), out.duplicated as f64);
        f.set(format!("{k}.spans_unexpected"), out.unexpected as f64);
        f.set(format!("{k}.agent_write_errors"), out.agent_errors as f64);
        f.set(format!("{k}.bad_exits"), out.bad_exits.len() as f64);
        f.set(format!("{k}.spans_per_sec_during"), out.rate_during);
        f.set(format!("{k}.ran_out"), f64::from(u8::from(out.ran_out)));
        f.set(format!("{k}.latency_p50_ms"), out.latency_ms[0]);
        f.set(format!("{k}.latency_p99_ms"), out.latency_ms[1]);
        f.set(format!("{k}.latency_max_ms"), out.latency_ms[2]);
        eprintln!(
            "   handover: pause p50 {:.1} / p99 {:.1} / max {:.1} ms; gap p50 {:.1} / p99 {:.1} / max {:.1} ms (steady {:.1} ms)",
            handover::pct(&pauses, 0.5),
            handover::pct(&pauses, 0.99),
            handover::pct(&pauses, 1.0),
            handover::pct(&gaps, 0.5),
            handover::pct(&gaps, 0.99),
            handover::pct(&gaps, 1.0),
            out.steady_gap_ms
        );
        eprintln!(
            "   handover: {} spans sent at {:.0}/s, {} received, {} lost, {} duplicated, {} unexpected; {} agent write errors; {} bad exits{}",
            out.sent,
            out.rate_during,
            out.received,
            out.lost,
            out.duplicated,
            out.unexpected,
            out.agent_errors,
            out.bad_exits.len(),
            if out.ran_out { "; an agent ran out of frames" } else { "" }
        );
        // Context for anything odd; a few lines, the whole log is kept
        // when a run breaks.
        if !out.complaints.is_empty() {
            eprintln!(
                "   handover: the forwarders logged {} warnings or errors, the first:",
                out.complaints.len()
            );
        }
        for c in out.complaints.iter().take(3) {
            eprintln!("     {c}");
        }
        Ok(out)
    }

    fn max_rate(
        &self,
        f: &mut Figures,
        format: EmitFormat,
        pool: &[Arc<Vec<Frame>>],
        target: Target<'_>,
    ) -> Result<()> {
        let sink = target.sink;
        let fwd = self.spawn_to(target.endpoint, &target.flags, target.listen)?;
        let reps = self.reps(pool);
        let total: u64 = pool.iter().map(|p| (p.len() * reps) as u64).sum();
        let base = sink.spans();
        let wire0 = sink.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let start = Arc::new(Barrier::new(pool.len() + 1));
        let handles: Vec<_> = pool
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let socket = fwd.sockets[i % fwd.sockets.len()].clone();
                agents::spawn_max_rate(socket, Arc::clone(p), reps, Arc::clone(&start))
            })
            .collect();
        let cpu0 = procstat::cpu_seconds(fwd.pid)?;
        let self0 = procstat::self_cpu_seconds();
        start.wait();
        let t0 = sink.now_ns();
        for h in handles {
            h.join().map_err(|_| anyhow!("agent panicked"))??;
        }
        wait_sink(sink, base + total, Duration::from_secs(300))?;
        let t1 = sink
            .last_receipt_ns
            .load(std::sync::atomic::Ordering::Acquire);
        let cpu = procstat::cpu_seconds(fwd.pid)? - cpu0;
        let harness_cpu = procstat::self_cpu_seconds() - self0;
        let hwm = fwd.status("VmHWM")?;
        // More spans than sent would mean duplicates: a broken run.
        std::thread::sleep(Duration::from_millis(300));
        if sink.spans() != base + total {
            bail!("sink counted {} spans, sent {total}", sink.spans() - base);
        }
        fwd.stop()?;
        let wire = sink.wire_bytes.load(std::sync::atomic::Ordering::Relaxed) - wire0;
        let wall = (t1.saturating_sub(t0)) as f64 * 1e-9;
        let k = format!("{format}.{}", target.label);
        f.set(
            format!("{k}.wire_bytes_per_span"),
            wire as f64 / total as f64,
        );
        f.set(format!("{k}.spans_per_sec"), total as f64 / wall);
        f.set(format!("{k}.spans_per_cpu_sec"), total as f64 / cpu);
        f.set(format!("{k}.cpu_sec_per_million"), cpu / total as f64 * 1e6);
        f.set(
            format!("{k}.harness_cpu_sec_per_million"),
            harness_cpu / total as f64 * 1e6,
        );
        f.set(format!("{k}.peak_rss_mib"), hwm / MIB);
        eprintln!(
            "   {format} {}: {:.0} spans/s, {:.0} spans/CPU-s, {:.2} CPU-s/M, peak RSS {:.1} MiB",
            target.label,
            total as f64 / wall,
            total as f64 / cpu,
            cpu / total as f64 * 1e6,
            hwm / MIB
        );
        eprintln!(
            "   {format} {} wire: {:.1} bytes/span reached the collector",
            target.label,
            wire as f64 / total as f64
        );
        Ok(())
    }

    fn paced(&self, f: &mut Figures, format: EmitFormat, rate: u64) -> Result<()> {
        let fwd = self.spawn()?;
        let p = self.run_paced(
            &fwd,
            format,
            rate,
            self.args.agents,
            self.args.fixed_secs,
            |_| Ok(Vec::new()),
        )?;
        fwd.stop()?;
        p.set(f, &format!("{format}.rate{rate}"));
        eprintln!(
            "   {format} @{rate}/s: achieved {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {:.2} CPU-s/M",
            p.achieved,
            p.pct(0.5),
            p.pct(0.99),
            p.pct(1.0),
            p.cpu / p.spans as f64 * 1e6
        );
        Ok(())
    }

    /// `n_agents` agents (agent i on the forwarder's socket i, round the
    /// sandboxes) write `rate` spans/s in all, evenly, for `secs`, every
    /// span distinct and its latency kept. `others` starts more agents
    /// beside them, given the instant they all start at; what they write
    /// is waited for at the sink too, but has no latency.
    fn run_paced(
        &self,
        fwd: &Forwarder,
        format: EmitFormat,
        rate: u64,
        n_agents: usize,
        secs: f64,
        others: impl FnOnce(Instant) -> Result<Vec<std::thread::JoinHandle<Result<u64>>>>,
    ) -> Result<Paced> {
        let n_agents = n_agents.max(1);
        let total = ((rate as f64 * secs) as usize).max(n_agents);
        let per_agent = total / n_agents;
        let mut pools = Vec::with_capacity(n_agents);
        for a in 0..n_agents {
            pools.push(Arc::new(agents::make_frames(
                format,
                per_agent,
                self.args.payload_bytes,
                1000 + a as u64,
            )?));
        }
        let ids: Vec<u64> = pools
            .iter()
            .flat_map(|p| p.iter().map(|f| f.span_id))
            .collect();
        let total = ids.len() as u64;
        let track = Arc::new(LatencyTrack::new(&ids));
        let base = self.sink.spans();
        *self.sink.track.lock().map_err(|_| anyhow!("poisoned"))? = Some(Arc::clone(&track));
        let per_agent_rate = rate as f64 / n_agents as f64;
        let start = Instant::now() + Duration::from_millis(100);
        let cpu0 = procstat::cpu_seconds(fwd.pid)?;
        let mut first = 0;
        let others = others(start)?;
        let handles: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // Stagger the agents so that together they write evenly.
                let offset = Duration::from_secs_f64(i as f64 / rate as f64);
                let h = agents::spawn_paced(
                    fwd.sockets[i % fwd.sockets.len()].clone(),
                    Arc::clone(p),
                    per_agent_rate,
                    start + offset,
                    self.epoch,
                    Arc::clone(&track),
                    first,
                );
                first += p.len();
                h
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("agent panicked"))??;
        }
        let sent_at = Instant::now();
        let mut other_spans = 0;
        for h in others {
            other_spans += h.join().map_err(|_| anyhow!("agent panicked"))??;
        }
        self.wait_sink(base + total + other_spans, Duration::from_secs(120))?;
        let cpu = procstat::cpu_seconds(fwd.pid)? - cpu0;
        *self.sink.track.lock().map_err(|_| anyhow!("poisoned"))? = None;
        let achieved = total as f64 / (sent_at - start).as_secs_f64();
        let mut lat =
            std::mem::take(&mut *track.latencies.lock().map_err(|_| anyhow!("poisoned"))?);
        let unmatched = track.unmatched.load(std::sync::atomic::Ordering::Relaxed);
        if unmatched != other_spans || lat.len() as u64 != total {
            bail!(
                "latency run: {} spans matched, {unmatched} unmatched, {total} sent (and {other_spans} untracked)",
                lat.len()
            );
        }
        lat.sort_unstable();
        Ok(Paced {
            cpu,
            spans: total,
            other_spans,
            secs: (sent_at - start).as_secs_f64(),
            achieved,
            lat,
        })
    }
}

/// What a paced run measured.
struct Paced {
    /// The forwarder's CPU-seconds, from the start until the sink had it all.
    cpu: f64,
    /// Spans of the paced agents.
    spans: u64,
    /// Spans of the other agents beside them.
    other_spans: u64,
    /// From the start to the paced agents' last write.
    secs: f64,
    achieved: f64,
    /// Every paced span's latency, nanoseconds, sorted.
    lat: Vec<u64>,
}

impl Paced {
    fn pct(&self, p: f64) -> f64 {
        self.lat[((self.lat.len() - 1) as f64 * p).round() as usize] as f64 * 1e-6
    }

    fn set(&self, f: &mut Figures, k: &str) {
        f.set(format!("{k}.achieved_spans_per_sec"), self.achieved);
        f.set(format!("{k}.p50_ms"), self.pct(0.50));
        f.set(format!("{k}.p99_ms"), self.pct(0.99));
        f.set(format!("{k}.max_ms"), self.pct(1.0));
        f.set(
            format!("{k}.cpu_sec_per_million"),
            self.cpu / self.spans as f64 * 1e6,
        );
        f.set(format!("{k}.cpu_percent"), self.cpu / self.secs * 100.0);
    }
}

/// Where a forwarder under test listens.
#[derive(Clone, Copy)]
enum Listen {
    /// One hybrid socket (`--socket-path`), all agents one sandbox.
    Socket,
    /// Template mode (`--socket-path-template`), this many sandboxes.
    Template(usize),
}

/// The forwarder under test, as a child process.
struct Forwarder {
    child: Child,
    pid: u32,
    /// The agent-side socket, `<socket-path>_10240` (the first sandbox's
    /// in template mode).
    socket: PathBuf,
    /// Every sandbox's agent-side socket (one unless in template mode).
    sockets: Vec<PathBuf>,
    /// From spawn to the first successful connection to `socket`.
    startup: Duration,
    stderr: PathBuf,
}

impl Forwarder {
    fn spawn(
        bin: &Path,
        dir: &Path,
        endpoint: &str,
        extra: &[String],
        listen: Listen,
    ) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (listen_flags, sockets) = match listen {
            Listen::Socket => {
                let socket_path = dir.join(format!("fwd{n}.hvsock"));
                let socket = PathBuf::from(format!("{}_10240", socket_path.display()));
                (
                    vec![
                        "--socket-path".to_string(),
                        socket_path.display().to_string(),
                    ],
                    vec![socket],
                )
            }
            // Cloud Hypervisor's layout; the sandboxes exist before the
            // forwarder starts, as on a host it is restarted on.
            Listen::Template(sandboxes) => {
                let root = dir.join(format!("vm{n}"));
                let mut sockets = Vec::with_capacity(sandboxes);
                for i in 0..sandboxes {
                    let sandbox = root.join(format!("sb{i:04}"));
                    std::fs::create_dir_all(&sandbox)?;
                    sockets.push(sandbox.join("clh.sock_10240"));
                }
                let template = format!("{}/{{ID}}/clh.sock", root.display());
                (
                    vec!["--socket-path-template".to_string(), template],
                    sockets,
                )
            }
        };
        let stderr = dir.join(format!("fwd{n}.stderr"));
        let t0 = Instant::now();
        let mut cmd = Command::new(bin);
        cmd.args(&listen_flags)
            .args(["--otlp-protocol", "grpc", "--otlp-endpoint", endpoint])
            .args(extra);
        let mut child = without_settings_from_env(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        // Listening once every socket takes a connection.
        let mut waiting = sockets.iter().peekable();
        let startup = loop {
            while waiting
                .peek()
                .is_some_and(|s| UnixStream::connect(s).is_ok())
            {
                waiting.next();
            }
            if waiting.peek().is_none() {
                break t0.elapsed();
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&stderr).unwrap_or_default();
                bail!("forwarder exited at startup ({status}):\n{log}");
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                bail!("forwarder not listening after 10 s");
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        Ok(Self {
            child,
            pid,
            socket: sockets[0].clone(),
            sockets,
            startup,
            stderr,
        })
    }

    fn status(&self, field: &str) -> Result<f64> {
        Ok(procstat::status_bytes(self.pid, field)? as f64)
    }

    /// SIGTERM, and wait for the clean exit.
    fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid)?;
        // SAFETY: signalling our own child, whose pid we hold un-reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                    bail!("forwarder exited with {status}:\n{log}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("forwarder did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `flags` with `name` set to `value`, whatever it was (the forwarder
/// refuses a flag given twice).
fn with_flag(flags: &[String], name: &str, value: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(flags.len() + 1);
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if f == name {
            it.next();
        } else if !f.starts_with(&format!("{name}=")) {
            out.push(f.clone());
        }
    }
    out.push(format!("{name}={value}"));
    out
}

fn sorted(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Waits until `sink` has counted `n` spans.
fn wait_sink(sink: &SinkState, n: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while sink.spans() < n {
        if Instant::now() > deadline {
            bail!("sink got {} of {n} spans within {timeout:?}", sink.spans());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints the results table: medians over runs, range, and budgets.
fn report(args: &Args, runs: &[Figures], endpoint: &str) {
    let col = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r.0.get(k).copied()).collect() };
    let med = |k: &str| median(col(k));
    let range = |k: &str| {
        let v = col(k);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    println!();
    println!("Machine: {}", machine());
    println!(
        "Results: medians of {} run(s); {} agents; ~{} B payloads; {} spans per max-rate run; sink {endpoint}",
        runs.len(),
        args.agents,
        args.payload_bytes,
        args.spans
    );
    println!();
    let ratios = std::cell::RefCell::new(Vec::<(String, f64)>::new());
    println!("| figure | median | range | budget | verdict |");
    println!("|---|---:|---:|---:|---|");
    let row = |name: &str, key: &str, unit: Unit, budget: Option<Budget>| {
        let m = med(key);
        if m.is_nan() {
            return;
        }
        let (lo, hi) = range(key);
        let (b, verdict) = match budget {
            Some(Budget::AtLeast(x)) => (
                format!(">= {}", unit.fmt(x)),
                if m >= x { "ok" } else { "MISSED" },
            ),
            Some(Budget::AtMost(x)) => (
                format!("<= {}", unit.fmt(x)),
                if m <= x { "ok" } else { "MISSED" },
            ),
            None => (String::new(), ""),
        };
        println!(
            "| {name} | {} | {}–{} | {b} | {verdict} |",
            unit.fmt(m),
            unit.fmt(lo),
            unit.fmt(hi)
        );
    };
    for &format in &args.formats {
        let f = format.to_string();
        let cpu_budget = match format {
            EmitFormat::Json => 400_000.0,
            EmitFormat::Bincode => 1_000_000.0,
        };
        row(
            &format!("{f}: end-to-end, max rate"),
            &format!("{f}.max.spans_per_sec"),
            Unit::PerSec,
            None,
        );
        row(
            &format!("{f}: end-to-end, spans per forwarder CPU-second"),
            &format!("{f}.max.spans_per_cpu_sec"),
            Unit::PerCpuSec,
            Some(Budget::AtLeast(cpu_budget)),
        );
        row(
            &format!("{f}: forwarder CPU-seconds per million spans"),
            &format!("{f}.max.cpu_sec_per_million"),
            Unit::Secs,
            None,
        );
        row(
            &format!("{f}: harness (agents+sink) CPU-seconds per million spans"),
            &format!("{f}.max.harness_cpu_sec_per_million"),
            Unit::Secs,
            None,
        );
        row(
            &format!("{f}: peak RSS (VmHWM) at max rate"),
            &format!("{f}.max.peak_rss_mib"),
            Unit::Mib,
            Some(Budget::AtMost(64.0)),
        );
        // Hosts (issue 24): template sandboxes, the limits at their defaults.
        row(
            &format!("{f}: max rate over {} template sandboxes", args.agents),
            &format!("{f}.max8.spans_per_sec"),
            Unit::PerSec,
            None,
        );
        row(
            &format!(
                "{f}: spans per forwarder CPU-second over {} template sandboxes",
                args.agents
            ),
            &format!("{f}.max8.spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        let host = format!(
            "{} template sandboxes, {} spans/s",
            args.host_sandboxes, args.host_rate
        );
        let timed = !args.smoke && args.host_sandboxes >= 100 && args.host_rate == 10_000;
        row(
            &format!("{f}: quiet ({host}), even pace: forwarder CPU"),
            &format!("{f}.quiet_even.cpu_percent"),
            Unit::Percent,
            timed.then_some(Budget::AtMost(4.0)),
        );
        row(
            &format!("{f}: quiet ({host}), even pace: latency p99"),
            &format!("{f}.quiet_even.p99_ms"),
            Unit::Ms,
            timed.then_some(Budget::AtMost(BATCH_TIMEOUT_MS + 10.0)),
        );
        row(
            &format!("{f}: quiet ({host}), the Kata agent's pace: forwarder CPU"),
            &format!("{f}.quiet_agent.cpu_percent"),
            Unit::Percent,
            timed.then_some(Budget::AtMost(2.0)),
        );
        row(
            &format!("{f}: quiet ({host}), the Kata agent's pace: spans/s at the sink"),
            &format!("{f}.quiet_agent.spans_per_sec"),
            Unit::PerSec,
            None,
        );
        let t = format!(
            "{f}: throttled ({} of {})",
            args.throttled, args.host_sandboxes
        );
        row(
            &format!("{t}: a throttled sandbox's rate"),
            &format!("{f}.throttled.throttled_spans_per_sec"),
            Unit::PerSec,
            None,
        );
        row(
            &format!("{t}: throttled group, spans per CPU-second"),
            &format!("{f}.throttled.throttled_spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        row(
            &format!("{t}: the same at 80 % of the limit, spans per CPU-second"),
            &format!("{f}.throttled.reference_spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        row(
            &format!("{t}: quiet group, spans per CPU-second"),
            &format!("{f}.throttled.quiet_spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        row(
            &format!("{t}: CPU per span, throttled against unthrottled"),
            &format!("{f}.throttled.cpu_per_span_ratio"),
            Unit::Ratio,
            (!args.smoke).then_some(Budget::AtMost(1.3)),
        );
        // The secured-export budgets: TLS against plaintext, gzip against
        // none, each in the same run.
        for (k, num, den) in [
            (
                "ratio.tls_cpu",
                "tls.spans_per_cpu_sec",
                "max.spans_per_cpu_sec",
            ),
            (
                "ratio.gzip_cpu_per_span",
                "max.spans_per_cpu_sec",
                "gzip.spans_per_cpu_sec",
            ),
            (
                "ratio.gzip_wire",
                "max.wire_bytes_per_span",
                "gzip.wire_bytes_per_span",
            ),
            (
                "ratio.throttled_vs_max8",
                "max8.spans_per_cpu_sec",
                "throttled.throttled_spans_per_cpu_sec",
            ),
        ] {
            let (n, d) = (med(&format!("{f}.{num}")), med(&format!("{f}.{den}")));
            if n.is_finite() && d.is_finite() && d > 0.0 {
                ratios.borrow_mut().push((format!("{f}.{k}"), n / d));
            }
        }
        let ratio = |k: &str| {
            ratios
                .borrow()
                .iter()
                .find(|(key, _)| key == &format!("{f}.{k}"))
                .map(|(_, v)| *v)
        };
        let fixed = |name: &str, v: Option<f64>, unit: &str, budget: (&str, bool)| {
            if let Some(v) = v {
                println!(
                    "| {f}: {name} | {v:.2}{unit} | | {} | {} |",
                    budget.0,
                    if budget.1 { "ok" } else { "MISSED" }
                );
            }
        };
        let tls = ratio("ratio.tls_cpu");
        fixed(
            "TLS / plaintext, spans per CPU-second",
            tls,
            "",
            (">= 0.85", tls.is_some_and(|v| v >= 0.85)),
        );
        let gz = ratio("ratio.gzip_cpu_per_span");
        fixed(
            "gzip / none, CPU per span",
            gz,
            "x",
            ("<= 2.50x", gz.is_some_and(|v| v <= 2.5)),
        );
        let wire = ratio("ratio.gzip_wire");
        fixed(
            "none / gzip, bytes on the wire per span",
            wire,
            "x",
            (">= 4.00x", wire.is_some_and(|v| v >= 4.0)),
        );
        if let Some(v) = ratio("ratio.throttled_vs_max8") {
            println!(
                "| {f}: CPU per span, a throttled sandbox against unthrottled ones at full speed (max8) | {v:.2}x | | | |"
            );
        }
        row(
            &format!("{f}: limit, transport (split frames only)"),
            &format!("{f}.transport.spans_per_sec"),
            Unit::PerSec,
            None,
        );
        row(
            &format!("{f}: limit, parse (read, split and decode, 1 thread)"),
            &format!("{f}.parse.spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        row(
            &format!("{f}: forwarder / parse limit (per CPU-second)"),
            &format!("{f}.ratio.parse_cpu"),
            Unit::Ratio,
            (format == EmitFormat::Json).then_some(Budget::AtLeast(0.60)),
        );
        row(
            &format!("{f}: decode only, in memory (1 thread)"),
            &format!("{f}.decode.spans_per_cpu_sec"),
            Unit::PerCpuSec,
            None,
        );
        row(
            &format!("{f}: forwarder / decode only (per CPU-second)"),
            &format!("{f}.ratio.decode_cpu"),
            Unit::Ratio,
            None,
        );
        row(
            &format!("{f}: forwarder / transport limit (per second)"),
            &format!("{f}.ratio.transport_wall"),
            Unit::Ratio,
            None,
        );
        for &rate in &args.rates {
            let k = format!("{f}.rate{rate}");
            let lat_budget = (rate == 10_000).then_some(Budget::AtMost(BATCH_TIMEOUT_MS + 10.0));
            row(
                &format!("{f} @ {rate}/s: achieved rate"),
                &format!("{k}.achieved_spans_per_sec"),
                Unit::PerSec,
                None,
            );
            row(
                &format!("{f} @ {rate}/s: latency p50"),
                &format!("{k}.p50_ms"),
                Unit::Ms,
                None,
            );
            row(
                &format!("{f} @ {rate}/s: latency p99"),
                &format!("{k}.p99_ms"),
                Unit::Ms,
                lat_budget,
            );
            row(
                &format!("{f} @ {rate}/s: latency max"),
                &format!("{k}.max_ms"),
                Unit::Ms,
                None,
            );
            // A quiet host costs little: at 10,000 spans/s (across 100
            // agents, `--agents 100`), at most 4 % of one core.
            row(
                &format!("{f} @ {rate}/s: forwarder CPU"),
                &format!("{k}.cpu_percent"),
                Unit::Percent,
                (rate == 10_000).then_some(Budget::AtMost(4.0)),
            );
            row(
                &format!("{f} @ {rate}/s: forwarder CPU-seconds per million spans"),
                &format!("{k}.cpu_sec_per_million"),
                Unit::Secs,
                None,
            );
        }
    }
    row(
        "startup to listening",
        "startup_ms",
        Unit::Ms,
        Some(Budget::AtMost(50.0)),
    );
    row("RSS idle, no connections", "idle.rss_mib", Unit::Mib, None);
    row(
        &format!("RSS idle, {} quiet connections", args.idle_connections),
        "idle.conns_rss_mib",
        Unit::Mib,
        (args.idle_connections >= 1000).then_some(Budget::AtMost(20.0)),
    );
    row(
        &format!("CPU while idle with {} connections", args.idle_connections),
        "idle.conns_cpu_ms_per_sec",
        Unit::MsPerSec,
        None,
    );

    // The hand-over budgets (issue 12), for 1,000 connections: medians of
    // each run's quantiles, and counts that must be zero in every run.
    let h = |name: &str| {
        format!(
            "hand-over ({} agents, {} spans/s, {} in a row): {name}",
            args.handover_connections, args.handover_rate, args.handovers
        )
    };
    let timed = args.handover_connections >= 1000 && !args.smoke;
    row(
        &h("pause (old process), p50"),
        "handover.pause_p50_ms",
        Unit::Ms,
        None,
    );
    row(
        &h("pause (old process), p99"),
        "handover.pause_p99_ms",
        Unit::Ms,
        timed.then_some(Budget::AtMost(100.0)),
    );
    row(
        &h("pause (old process), max"),
        "handover.pause_max_ms",
        Unit::Ms,
        None,
    );
    for (q, key) in [("p50", "p50"), ("p99", "p99"), ("max", "max")] {
        row(
            &h(&format!("longest gap between arrivals at the sink, {q}")),
            &format!("handover.gap_{key}_ms"),
            Unit::Ms,
            None,
        );
    }
    row(
        &h("longest gap between arrivals, a second without hand-over"),
        "handover.steady_gap_ms",
        Unit::Ms,
        None,
    );
    row(
        &h("span latency (agent write to sink) p99 over the run"),
        "handover.latency_p99_ms",
        Unit::Ms,
        None,
    );
    row(
        &h("span latency (agent write to sink) max over the run"),
        "handover.latency_max_ms",
        Unit::Ms,
        None,
    );
    row(
        &h("agents' rate during the hand-overs"),
        "handover.spans_per_sec_during",
        Unit::PerSec,
        timed.then_some(Budget::AtLeast(args.handover_rate as f64 * 0.95)),
    );
    for (name, key, must_be_zero) in [
        ("spans sent", "handover.spans_sent", false),
        ("spans received", "handover.spans_received", false),
        ("spans lost", "handover.spans_lost", true),
        ("spans duplicated", "handover.spans_duplicated", true),
        ("spans nobody sent", "handover.spans_unexpected", true),
        ("agent write errors", "handover.agent_write_errors", true),
        ("forwarders that did not exit 0", "handover.bad_exits", true),
        (
            "runs whose agents ran out of frames",
            "handover.ran_out",
            true,
        ),
    ] {
        let v = col(key);
        if v.is_empty() {
            continue;
        }
        let total: f64 = v.iter().sum();
        let each: Vec<String> = v.iter().map(|x| thousands(*x)).collect();
        let (b, verdict) = match must_be_zero {
            true => (
                "= 0 in every run",
                if total == 0.0 { "ok" } else { "MISSED" },
            ),
            false => ("", ""),
        };
        println!(
            "| {} | {} in all | {} | {b} | {verdict} |",
            h(name),
            thousands(total),
            each.join(", ")
        );
    }
}

/// CPU model, core count, memory and kernel, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

#[derive(Clone, Copy)]
enum Budget {
    AtLeast(f64),
    AtMost(f64),
}

#[derive(Clone, Copy)]
enum Unit {
    PerSec,
    PerCpuSec,
    Secs,
    Mib,
    Ms,
    MsPerSec,
    Percent,
    Ratio,
}

impl Unit {
    fn fmt(self, v: f64) -> String {
        match self {
            Unit::PerSec => format!("{} /s", thousands(v)),
            Unit::PerCpuSec => format!("{} /CPU-s", thousands(v)),
            Unit::Secs => format!("{v:.2} s"),
            Unit::Mib => format!("{v:.1} MiB"),
            Unit::Ms => format!("{v:.1} ms"),
            Unit::MsPerSec => format!("{v:.2} ms/s"),
            Unit::Percent => format!("{v:.1} %"),
            Unit::Ratio => format!("{:.0} %", v * 100.0),
        }
    }
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}
