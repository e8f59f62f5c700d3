//! Sample Kata agent for demos and tests: connects to a Unix socket, as a
//! guest connection arrives through a VMM's hybrid VSOCK (plain connect, then
//! raw frames), and writes agent trace frames produced by the real SDK.

use kata_agent_emitter::{bulk_frames, scenario, ScenarioOptions, WireFormat};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: kata-agent-emitter --socket PATH [--format json|bincode] [--connections N]
                          [--traces K] [--bulk N --span-bytes B]
                          [--rate SPANS_PER_SEC] [--hold-secs S]

Each connection sends K kitchen-sink traces (default 1 unless --bulk is given)
followed by N bulk spans of about B payload bytes (default 800), optionally
throttled to SPANS_PER_SEC in total, then keeps the connection open for S
seconds (default 0) before closing it.";

#[derive(Debug)]
struct Args {
    socket: String,
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
    let socket = socket.ok_or("--socket PATH is required")?;
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number".into());
    }
    if !(hold >= 0.0 && hold.is_finite()) {
        return Err("--hold-secs must be a non-negative number".into());
    }
    Ok(Args {
        socket,
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
    let mut frames = Vec::new();
    for t in 0..args.traces {
        let opts = ScenarioOptions {
            format: args.format,
            seq: (conn * args.traces.max(1) + t) as u64,
            ..ScenarioOptions::default()
        };
        frames.extend(scenario(&opts).frames);
    }
    frames.extend(bulk_frames(
        args.format,
        args.bulk,
        args.span_bytes,
        conn as u64,
    ));
    frames
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
        if let Some(rate) = per_conn_rate {
            // Pace against the start time so rounding never accumulates.
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
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

    // Connect everything up front so a missing forwarder fails fast and clearly.
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        match UnixStream::connect(&args.socket) {
            Ok(s) => streams.push(s),
            Err(e) => {
                eprintln!(
                    "kata-agent-emitter: cannot connect to {}: {e} (is the trace forwarder listening?)",
                    args.socket
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
                eprintln!("kata-agent-emitter: write to {} failed: {e}", args.socket);
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
