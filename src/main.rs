//! The `kata-trace-forwarder` binary: parse flags, set up logging, run.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the forwarder cannot start
//! or stops on an error (collector unreachable, socket unusable), 2 for an
//! invalid command line or environment. `status` exits 0 when every
//! forwarder asked answered, 1 otherwise.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kata_trace_forwarder::config::{
    kata, process_env, Cli, Command, LogFormat, StatusArgs, HANDOFF_DIR,
};
use kata_trace_forwarder::handover::Upgrade;
use kata_trace_forwarder::listen::privileges;
use kata_trace_forwarder::logging::{Json, JsonLines};
use kata_trace_forwarder::shutdown::SignalGate;
use kata_trace_forwarder::{janitor, Config};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A SIGHUP or SIGTERM that comes while this process starts (re-executed
    // by an upgrade) must neither end it nor be lost.
    kata_trace_forwarder::shutdown::block_stop_signals();
    privileges::keep_from_same_user();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == janitor::JANITOR_ARG) {
        return janitor::janitor_main(&args[2..]);
    }
    // On SIGHUP, the file at that path (an upgraded one) takes over, not
    // the inode we run.
    let upgrade = std::env::current_exe().ok().map(|exe| Upgrade {
        exe,
        args: args.iter().skip(1).cloned().collect(),
    });
    let cli = Cli::parse();
    if let Some(Command::Status(args)) = &cli.command {
        kata_trace_forwarder::shutdown::unblock_stop_signals();
        return status(args);
    }
    init_logging(&cli);
    // While this is the only thread: a successor handed a capability keeps
    // it on the sandbox thread alone.
    if let Err(e) = kata_trace_forwarder::listen::template::SandboxThread::start_early() {
        return fail(1, "confining the capability handed over", e);
    }
    if cli.print {
        kata_trace_forwarder::shutdown::unblock_stop_signals();
        return print_plan(&cli);
    }
    let config = match cli.into_config(&process_env) {
        Ok(c) => c,
        Err(e) => return fail(2, "invalid configuration", e),
    };
    match run(config, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, "forwarder failed", format!("{e:#}")),
    }
}

/// Logs `e` under `what`, prints it, and exits with `code`.
fn fail(code: u8, what: &str, e: impl std::fmt::Display) -> ExitCode {
    tracing::error!(error = %e, "{what}");
    eprintln!("error: {e}");
    ExitCode::from(code)
}

fn status(args: &StatusArgs) -> ExitCode {
    use kata_trace_forwarder::status::{print, Target};
    let target = match &args.handoff_socket {
        Some(p) => Target::Socket(p),
        None => Target::Discover(std::path::Path::new(HANDOFF_DIR)),
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    match print(target, args.json, &mut out, &mut err) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: writing the status: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exits 1, after printing, when a configuration cannot be used, as
/// starting would.
fn print_plan(cli: &Cli) -> ExitCode {
    let sources = kata::Sources::from_env(cli.kata_root.clone(), &process_env);
    let plan = kata::plan(&sources, cli.vsock_port);
    plan.log();
    match serde_json::to_string_pretty(&plan) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("error: printing the plan: {e}");
            return ExitCode::FAILURE;
        }
    }
    let errors: Vec<String> = plan.errors().flat_map(|c| c.skipped.clone()).collect();
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {}", errors.join("; "));
        ExitCode::FAILURE
    }
}

fn run(config: Config, upgrade: Option<Upgrade>) -> anyhow::Result<()> {
    // One thread by default: no cross-thread wake-ups from connections to the
    // batcher and the collector (a quarter less CPU per span, BENCHMARKS.md).
    let mut builder = if config.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.worker_threads);
        b
    };
    let runtime = builder
        .enable_all()
        .thread_name("ktf-worker")
        .build()
        .context("starting the async runtime")?;
    let reexec = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        // Handled from here on: whatever came meanwhile is delivered now.
        let gate = SignalGate::open().context("starting the signal thread")?;
        let stop = async {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "received signal"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "received signal"),
            }
        };
        let finished = kata_trace_forwarder::run(config, stop, upgrade, Some(hup))
            .await
            .context("kata-trace-forwarder")?;
        tracing::info!(summary = %Json(&finished.summary), "forwarder stopped");
        let mut reexec = finished.reexec;
        if let Some(r) = reexec.as_mut() {
            // From here a stop or upgrade signal waits for the upgraded binary;
            // one from the flush stops it once it has taken everything back.
            gate.hold();
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let came = |s: &mut tokio::signal::unix::Signal| {
                futures_util::FutureExt::now_or_never(s.recv()).is_some()
            };
            if came(&mut term) || came(&mut int) {
                tracing::info!("stop asked during the upgrade: the upgraded binary stops once it has taken everything back");
                r.stop = true;
            }
        }
        anyhow::Ok(reexec)
    })?;
    if let Some(reexec) = reexec {
        // An upgrade by SIGHUP: the bridge serves; this process becomes the
        // new binary (same PID), which takes everything back from it.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        let e = reexec.exec();
        tracing::error!(error = %e, "upgrade: executing the new binary");
        reexec.give_way();
    }
    Ok(())
}

fn init_logging(cli: &Cli) {
    // The libraries are only heard from when something is wrong.
    let directives = format!(
        "{lvl},h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn",
        lvl = cli.log_level.as_filter()
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(directives))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
