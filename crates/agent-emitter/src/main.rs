//! Sample Kata agent for demos and tests: connects to a Unix socket, as a
//! guest connection arrives through a VMM's hybrid VSOCK (plain connect, then
//! raw frames), and writes agent trace frames produced by the real SDK.
//! With `--vsock` it is the agent inside a real guest (tests/vm.rs): AF_VSOCK
//! to the host as Kata's vsock-exporter connects, and a manifest of what it
//! sent, for the host to check.

use kata_agent_emitter::guest::{uptime_ms, KataConnection, Manifest, Report};
use kata_agent_emitter::{bulk_frames, scenario, ExpectedSpan, ScenarioOptions, WireFormat};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: kata-agent-emitter --socket PATH [--format json|bincode] [--connections N]
                          [--traces K] [--bulk N --span-bytes B]
                          [--rate SPANS_PER_SEC] [--hold-secs S]
       kata-agent-emitter --vsock CID:PORT [--manifest PATH] [--cut-after M]
                          [--format ...] [--traces K] [--bulk N ...] [--rate R]

Each connection sends K kitchen-sink traces (default 1 unless --bulk is given)
followed by N bulk spans of about B payload bytes (default 800), optionally
throttled to SPANS_PER_SEC in total, then keeps the connection open for S
seconds (default 0) before closing it.

--vsock: one connection over AF_VSOCK, made at the first span, as Kata's agent
makes it; every line of the manifest (default: stdout) starts with \"KTF \".
--cut-after M writes M frames whole and half of the next, then waits to be
killed.";

#[derive(Debug)]
enum Target {
    Unix(String),
    Vsock { cid: u32, port: u32 },
}

#[derive(Debug)]
struct Args {
    target: Target,
    manifest: Option<String>,
    cut_after: Option<usize>,
    format: WireFormat,
    connections: usize,
    traces: usize,
    bulk: usize,
    span_bytes: usize,
    rate: Option<f64>,
    hold: Duration,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut socket = None;
    let mut vsock = None;
    let mut manifest = None;
    let mut cut_after = None;
    let mut format = WireFormat::Json;
    let mut connections = 1;
    let mut traces = None;
    let mut bulk = 0;
    let mut span_bytes = 800;
    let mut rate = None;
    let mut hold = 0.0;
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("invalid value {v:?} for {flag}"))
        }
        match flag.as_str() {
            "--socket" => socket = Some(value()?),
            "--vsock" => {
                let v = value()?;
                let (cid, port) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--vsock wants CID:PORT, not {v:?}"))?;
                vsock = Some(Target::Vsock {
                    cid: num(&flag, cid.to_string())?,
                    port: num(&flag, port.to_string())?,
                });
            }
            "--manifest" => manifest = Some(value()?),
            "--cut-after" => cut_after = Some(num(&flag, value()?)?),
            "--format" => format = value()?.parse()?,
            "--connections" => connections = num(&flag, value()?)?,
            "--traces" => traces = Some(num(&flag, value()?)?),
            "--bulk" => bulk = num(&flag, value()?)?,
            "--span-bytes" => span_bytes = num(&flag, value()?)?,
            "--rate" => rate = Some(num::<f64>(&flag, value()?)?),
            "--hold-secs" => hold = num::<f64>(&flag, value()?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let target = match (socket, vsock) {
        (Some(path), None) => Target::Unix(path),
        (None, Some(v)) if connections == 1 => v,
        (None, Some(_)) => return Err("--vsock makes one connection".into()),
        _ => return Err("one of --socket PATH and --vsock CID:PORT is required".into()),
    };
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if (manifest.is_some() || cut_after.is_some()) && matches!(target, Target::Unix(_)) {
        return Err("--manifest and --cut-after go with --vsock".into());
    }
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number".into());
    }
    if !(hold >= 0.0 && hold.is_finite()) {
        return Err("--hold-secs must be a non-negative number".into());
    }
    Ok(Args {
        target,
        manifest,
        cut_after,
        format,
        connections,
        traces: traces.unwrap_or(if bulk == 0 { 1 } else { 0 }),
        bulk,
        span_bytes,
        rate,
        hold: Duration::from_secs_f64(hold),
    })
}

/// Frames for connection `conn`; `seq` differs per trace and connection so
/// every span the run produces is distinguishable.
fn frames_for(args: &Args, conn: usize) -> Vec<Vec<u8>> {
    frames_with_expectations(args, conn)
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

/// [`frames_for`], with what the SDK exported for each kitchen-sink span
/// (bulk spans keep none: their `kata.span_index` tells them apart).
fn frames_with_expectations(args: &Args, conn: usize) -> Vec<(Vec<u8>, Option<ExpectedSpan>)> {
    let mut frames = Vec::new();
    for t in 0..args.traces {
        let opts = ScenarioOptions {
            format: args.format,
            seq: (conn * args.traces.max(1) + t) as u64,
            ..ScenarioOptions::default()
        };
        let sc = scenario(&opts);
        frames.extend(sc.frames.into_iter().zip(sc.expected.into_iter().map(Some)));
    }
    frames.extend(
        bulk_frames(args.format, args.bulk, args.span_bytes, conn as u64)
            .into_iter()
            .map(|f| (f, None)),
    );
    frames
}

/// Waits until frame `i` is due at `rate` frames per second from `started`.
fn pace(started: Instant, i: usize, rate: Option<f64>) {
    if let Some(rate) = rate {
        // Pace against the start time so rounding never accumulates.
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// The agent in a guest: sends as Kata's vsock-exporter does, reporting
/// each span and each failure on the manifest. Fails if any write failed.
fn run_guest(args: &Args, cid: u32, port: u32) -> ExitCode {
    let out: Box<dyn Write> = match &args.manifest {
        Some(path) => match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("kata-agent-emitter: cannot open the manifest {path}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let mut manifest = Manifest(out);
    manifest.report(&Report::Started {
        format: args.format,
        uptime_ms: uptime_ms(),
    });
    let frames = frames_with_expectations(args, 0);
    let addr = vsock::VsockAddr::new(cid, port);
    let mut conn = KataConnection::new(|| vsock::VsockStream::connect(&addr));
    let started = Instant::now();
    let (mut written, mut errors) = (0, 0);
    for (i, (frame, expected)) in frames.iter().enumerate() {
        pace(started, i, args.rate);
        if args.cut_after == Some(i) {
            let bytes = 8 + (frame.len() - 8) / 2;
            if let Err(e) = conn.send_part(frame, bytes) {
                eprintln!("kata-agent-emitter: cutting frame {i}: {e}");
            }
            manifest.report(&Report::Cut { whole: i, bytes });
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        match conn.send(frame) {
            Ok(()) => {
                written += 1;
                if written == 1 {
                    manifest.report(&Report::FirstFrame {
                        uptime_ms: uptime_ms(),
                    });
                }
                if let Some(e) = expected {
                    manifest.report(&Report::Span(Box::new(e.clone())));
                }
            }
            Err(e) => {
                errors += 1;
                manifest.report(&Report::WriteError {
                    frame: i,
                    kind: format!("{:?}", e.kind()),
                    message: e.to_string(),
                });
            }
        }
    }
    manifest.report(&Report::Done {
        frames: frames.len(),
        written,
        errors,
        secs: started.elapsed().as_secs_f64(),
    });
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn send(
    mut stream: UnixStream,
    frames: &[Vec<u8>],
    per_conn_rate: Option<f64>,
    hold: Duration,
) -> std::io::Result<u64> {
    let started = Instant::now();
    let mut bytes = 0u64;
    for (i, f) in frames.iter().enumerate() {
        pace(started, i, per_conn_rate);
        stream.write_all(f)?;
        bytes += f.len() as u64;
    }
    stream.flush()?;
    std::thread::sleep(hold);
    Ok(bytes)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kata-agent-emitter: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let socket = match args.target {
        Target::Unix(ref path) => path,
        Target::Vsock { cid, port } => return run_guest(&args, cid, port),
    };
    // Connect everything up front so a missing forwarder fails fast and clearly.
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        match UnixStream::connect(socket) {
            Ok(s) => streams.push(s),
            Err(e) => {
                eprintln!(
                    "kata-agent-emitter: cannot connect to {}: {e} (is the trace forwarder listening?)",
                    socket
                );
                return ExitCode::FAILURE;
            }
        }
    }

    let started = Instant::now();
    let per_conn_rate = args.rate.map(|r| r / args.connections as f64);
    let results: Vec<std::io::Result<(usize, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(conn, stream)| {
                let args = &args;
                scope.spawn(move || {
                    let frames = frames_for(args, conn);
                    let bytes = send(stream, &frames, per_conn_rate, args.hold)?;
                    Ok((frames.len(), bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread panicked"))
            .collect()
    });

    let (mut frames, mut bytes, mut failed) = (0usize, 0u64, 0usize);
    for r in results {
        match r {
            Ok((f, b)) => {
                frames += f;
                bytes += b;
            }
            Err(e) => {
                failed += 1;
                eprintln!("kata-agent-emitter: write to {socket} failed: {e}");
            }
        }
    }
    eprintln!(
        "kata-agent-emitter: sent {frames} frames ({bytes} bytes, format {}) over {} connection(s) in {:.3}s{}",
        args.format,
        args.connections,
        started.elapsed().as_secs_f64(),
        if failed > 0 { format!(", {failed} connection(s) failed") } else { String::new() }
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags_and_defaults() {
        let a = args(&["--socket", "/s"]).unwrap();
        assert_eq!(
            (a.format, a.connections, a.traces, a.bulk),
            (WireFormat::Json, 1, 1, 0)
        );
        let a = args(&["--socket", "/s", "--bulk", "5", "--format", "bincode"]).unwrap();
        assert_eq!((a.format, a.traces, a.bulk), (WireFormat::Bincode, 0, 5));
        assert!(args(&[]).is_err());
        assert!(args(&["--socket", "/s", "--rate", "0"]).is_err());
        assert!(args(&["--socket", "/s", "--connections", "x"]).is_err());
        assert!(args(&["--socket"]).is_err());
        let a = args(&["--vsock", "2:10240", "--cut-after", "3"]).unwrap();
        assert!(matches!(
            a.target,
            Target::Vsock {
                cid: 2,
                port: 10240
            }
        ));
        assert_eq!(a.cut_after, Some(3));
        assert!(args(&["--vsock", "2"]).is_err());
        assert!(args(&["--socket", "/s", "--manifest", "/m"]).is_err());
        assert!(args(&["--vsock", "2:1", "--connections", "2"]).is_err());
    }

    #[test]
    fn sends_every_frame_over_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("kata-emitter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let a = args(&["--socket", "unused", "--traces", "2", "--bulk", "3"]).unwrap();
        let frames = frames_for(&a, 0);
        assert_eq!(frames.len(), 2 * 11 + 3);
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            listener.accept().unwrap().0.read_to_end(&mut buf).unwrap();
            buf
        });
        let sent = send(
            UnixStream::connect(&path).unwrap(),
            &frames,
            Some(1e6),
            Duration::ZERO,
        )
        .unwrap();
        let received = reader.join().unwrap();
        assert_eq!(received, frames.concat());
        assert_eq!(sent as usize, received.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
