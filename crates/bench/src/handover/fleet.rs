//! The forwarders of a hand-over run, followed by pid: the first one
//! started here, each successor found in the shared log by its "forwarder
//! ready" line, each predecessor reaped (the harness is their subreaper)
//! and its exit status kept, and none left running whatever happens.
//!
//! Also what that needs of the system (signals, `waitpid`, the descriptor
//! limit) and of the log (JSON lines, read as they are written).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{Record, STEP_TIMEOUT};
use crate::sink::SinkState;

/// The forwarder and its successors, followed by pid; none is left
/// running when this is dropped.
pub(super) struct Fleet {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    args: Vec<String>,
    pub(super) stderr: PathBuf,
    pub(super) agent_socket: PathBuf,
    pub(super) log: LogTail,
    /// The forwarder serving now.
    pid: i32,
    /// Every pid started or seen ready and not yet reaped.
    seen: Vec<i32>,
    pub(super) bad_exits: Vec<String>,
}

impl Fleet {
    pub(super) fn start(bin: &Path, flags: &[String], endpoint: &str) -> Result<Fleet> {
        let dir = tempfile::tempdir()?;
        // Started as root, the forwarder becomes nobody, and so does the
        // successor it starts: both must reach the binary and the sockets.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let bindir = dir.path().join("bin");
        std::fs::create_dir(&bindir)?;
        std::fs::set_permissions(&bindir, std::fs::Permissions::from_mode(0o755))?;
        let exe = bindir.join("kata-trace-forwarder");
        std::fs::copy(bin, &exe).with_context(|| format!("copying {}", bin.display()))?;
        let socket_path = dir.path().join("kata.hvsock");
        let mut args: Vec<String> = vec![
            "--socket-path".into(),
            socket_path.display().to_string(),
            "--otlp-protocol".into(),
            "grpc".into(),
            "--otlp-endpoint".into(),
            endpoint.into(),
            "--handoff-socket".into(),
            dir.path().join("handoff.sock").display().to_string(),
        ];
        args.extend_from_slice(flags);
        let stderr = dir.path().join("forwarder.stderr");
        File::create(&stderr)?;
        let log = LogTail::open(&stderr)?;
        let mut fleet = Fleet {
            agent_socket: PathBuf::from(format!("{}_10240", socket_path.display())),
            _dir: dir,
            exe,
            args,
            stderr,
            log,
            pid: 0,
            seen: Vec::new(),
            bad_exits: Vec::new(),
        };
        let first = fleet.spawn()?;
        let pid = fleet.wait_ready(0, Instant::now(), Some(first))?;
        if pid != first {
            bail!("forwarder {first} started, but {pid} said it was ready");
        }
        fleet.pid = pid;
        Ok(fleet)
    }

    /// Starts the binary with the flags (the first forwarder, or a taker).
    fn spawn(&mut self) -> Result<i32> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.stderr)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args);
        let child = crate::without_settings_from_env(&mut cmd)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        // Reaped by pid (`reap`), as the successors are.
        let pid = i32::try_from(child.id())?;
        self.seen.push(pid);
        Ok(pid)
    }

    /// Waits for the forwarder after the first `known` "forwarder ready"
    /// lines; its pid.
    /// `started`: a process of ours that should become ready (the first
    /// forwarder, a taker); its exit ends the wait.
    fn wait_ready(&mut self, known: usize, since: Instant, started: Option<i32>) -> Result<i32> {
        loop {
            self.log.poll()?;
            if let Some(&pid) = self.log.ready.get(known) {
                if !self.seen.contains(&pid) {
                    self.seen.push(pid);
                }
                return Ok(pid);
            }
            if let Some(e) = self.log.failures.first() {
                bail!("hand-over failed: {e}");
            }
            if let Some((pid, exit)) = started.and_then(|p| reap(p).map(|e| (p, e))) {
                self.seen.retain(|&p| p != pid);
                bail!(
                    "forwarder {pid} ended before it was ready ({exit}); log:\n{}",
                    self.log_text()
                );
            }
            if since.elapsed() > STEP_TIMEOUT {
                bail!(
                    "no forwarder ready within {STEP_TIMEOUT:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// One hand-over, from signal to the predecessor's exit. An upgrade by
    /// `SIGHUP` keeps the pid: the forwarder hands everything to a bridge
    /// (the new binary, its child), becomes the new binary itself and takes
    /// everything back; the step ends when the bridge is gone, and has two
    /// pauses. A takeover is another process; the step ends when the old
    /// one has exited (reaped here, its status kept).
    pub(super) fn hand_over(&mut self, sink: &SinkState, takeover: bool) -> Result<Record> {
        let known = self.log.ready.len();
        let from = self.pid;
        let t0 = Instant::now();
        let signal_ns = sink.now_ns();
        let taker = match takeover {
            true => Some(self.spawn()?),
            false => {
                signal(from, libc::SIGHUP)?;
                None
            }
        };
        let to = self.wait_ready(known, t0, taker)?;
        if to == from {
            bail!("forwarder {from} said it was ready again before any successor");
        }
        let (ready_ms, back_from) = if takeover {
            (t0.elapsed().as_secs_f64() * 1e3, None)
        } else {
            // `to` is the bridge: not ours (its parent reaps it), followed
            // until it is gone.
            self.seen.retain(|&p| p != to);
            let again = self.wait_ready(known + 1, t0, None)?;
            if again != from {
                bail!("after the bridge {to}, {again} was ready, not the upgraded {from}");
            }
            (t0.elapsed().as_secs_f64() * 1e3, Some(to))
        };
        let gone = match back_from {
            Some(bridge) => bridge,
            None => from,
        };
        let status = loop {
            let done = match back_from {
                Some(_) => (!alive(gone)).then_some(None),
                None => reap(gone).map(Some),
            };
            if let Some(s) = done {
                break s;
            }
            if t0.elapsed() > STEP_TIMEOUT {
                bail!("forwarder {gone} still running {STEP_TIMEOUT:?} after handing over");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let gone_ns = sink.now_ns();
        let gone_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.seen.retain(|&p| p != gone);
        if let Some(status) = status.filter(|s| !s.ok()) {
            self.bad_exits.push(format!("{gone}: {status}"));
        }
        self.log.poll()?;
        let Some(h) = self.log.handed.iter().rev().find(|h| h.successor == to) else {
            bail!("forwarder {from} exited without logging its hand-over to {to}");
        };
        let (paused_ms, connections) = (h.paused_ms, h.connections);
        let back_paused_ms = match back_from {
            Some(bridge) => {
                let Some(h) = self.log.handed.iter().rev().find(|h| h.successor == from) else {
                    bail!(
                        "the bridge {bridge} exited without logging its hand-over back to {from}"
                    );
                };
                Some(h.paused_ms)
            }
            None => None,
        };
        self.pid = if takeover { to } else { from };
        Ok(Record {
            how: if takeover { "takeover" } else { "sighup" },
            from_pid: from,
            to_pid: self.pid,
            paused_ms,
            back_paused_ms,
            connections,
            ready_ms,
            gone_ms,
            gap_ms: f64::NAN,
            signal_ns,
            gone_ns,
        })
    }

    /// SIGTERM to the forwarder serving now; how it exited, if not well.
    pub(super) fn stop(&mut self) -> Result<Option<String>> {
        let pid = self.pid;
        signal(pid, libc::SIGTERM)?;
        let t0 = Instant::now();
        loop {
            if let Some(s) = reap(pid) {
                self.seen.retain(|&p| p != pid);
                return Ok((!s.ok()).then(|| format!("{pid} at SIGTERM: {s}")));
            }
            if t0.elapsed() > STEP_TIMEOUT {
                bail!("forwarder {pid} did not stop within {STEP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Whatever failed, leave no forwarder behind (only pids not reaped
        // yet: a reaped one's number may belong to someone else by now).
        for &pid in &self.seen {
            if reap(pid).is_none() {
                let _ = signal(pid, libc::SIGKILL);
                let _ = reap_blocking(pid);
            }
        }
    }
}

/// Whether `pid` runs (a zombie counts as gone: its parent reaps it).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

fn signal(pid: i32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) with a pid we started or followed; no memory passed.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("signalling {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// How a forwarder ended.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(i32),
    /// Not ours to reap (no subreaper): gone, status unknown.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => write!(f, "gone, status unknown"),
        }
    }
}

impl Exit {
    fn ok(self) -> bool {
        matches!(self, Exit::Code(0) | Exit::Unknown)
    }
}

/// Reaps `pid` if it has exited; `None` while it runs.
fn reap(pid: i32) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: waitpid(2) writes only to `status`.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        return Some(if libc::WIFEXITED(status) {
            Exit::Code(libc::WEXITSTATUS(status))
        } else {
            Exit::Signal(libc::WTERMSIG(status))
        });
    }
    if r == 0 {
        return None;
    }
    // Not our child: gone once /proc says so (a zombie counts as gone).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'));
    (!running).then_some(Exit::Unknown)
}

fn reap_blocking(pid: i32) -> Option<Exit> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(e) = reap(pid) {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Orphans come to the harness: each forwarder a `SIGHUP` starts is its
/// predecessor's child, and outlives it.
pub(super) fn become_subreaper() {
    // SAFETY: prctl(2) with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        eprintln!(
            "   handover: not a subreaper ({}); predecessors' exit status unchecked",
            std::io::Error::last_os_error()
        );
    }
}

/// Room for `want` descriptors here and in the forwarders (they inherit
/// it), as far as the hard limit allows.
pub(super) fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes only to `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    if lim.rlim_max < want {
        bail!(
            "{want} descriptors needed, the hard limit is {}: raise it (ulimit -Hn)",
            lim.rlim_max
        );
    }
    lim.rlim_cur = want;
    // SAFETY: setrlimit(2) reads only `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A hand-over as the old process logged it.
#[derive(Debug, Clone)]
struct HandedOver {
    successor: i32,
    paused_ms: f64,
    connections: u64,
}

/// The forwarders' shared stderr, read as it grows.
pub(super) struct LogTail {
    file: File,
    partial: Vec<u8>,
    /// Pids of the "forwarder ready" lines, in order.
    ready: Vec<i32>,
    handed: Vec<HandedOver>,
    /// Lines that mean a hand-over did not go through.
    failures: Vec<String>,
    /// Every warning and error, for the report.
    pub(super) complaints: Vec<String>,
}

impl LogTail {
    fn open(path: &Path) -> Result<LogTail> {
        Ok(LogTail {
            file: File::open(path)?,
            partial: Vec::new(),
            ready: Vec::new(),
            handed: Vec::new(),
            failures: Vec::new(),
            complaints: Vec::new(),
        })
    }

    fn poll(&mut self) -> Result<()> {
        let mut more = Vec::new();
        self.file.read_to_end(&mut more)?;
        self.partial.extend_from_slice(&more);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            self.line(&String::from_utf8_lossy(&line));
        }
        Ok(())
    }

    fn line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let message = v["message"].as_str().unwrap_or_default();
        let level = v["level"].as_str().unwrap_or_default();
        if message == "forwarder ready" {
            if let Some(pid) = v["pid"].as_i64() {
                self.ready.push(pid as i32);
            }
        } else if message.starts_with("handed over: every listener") {
            self.handed.push(HandedOver {
                successor: v["successor"].as_i64().unwrap_or(0) as i32,
                paused_ms: v["paused_for"]
                    .as_str()
                    .and_then(debug_duration_ms)
                    .unwrap_or(f64::NAN),
                connections: v["connections"].as_u64().unwrap_or(0),
            });
        }
        if level == "WARN" || level == "ERROR" {
            self.complaints.push(line.trim().to_owned());
        }
        if message.starts_with("upgrade failed")
            || message.starts_with("hand-over failed")
            || message.starts_with("hand-over refused")
            || message.contains("resuming")
            || message.starts_with("taking over from the running forwarder failed")
        {
            self.failures.push(line.trim().to_owned());
        }
    }
}

/// Milliseconds in a `Duration`'s `Debug` form (`12.5ms`, `830µs`, `1.2s`).
fn debug_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    for (unit, ms) in [("ns", 1e-6), ("µs", 1e-3), ("ms", 1.0), ("s", 1e3)] {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * ms);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn durations_as_the_forwarder_logs_them() {
        let ms = |s: &str| debug_duration_ms(s).map(|v| (v * 1e6).round() / 1e6);
        assert_eq!(ms("12.5ms"), Some(12.5));
        assert_eq!(ms("830µs"), Some(0.83));
        assert_eq!(ms("1.25s"), Some(1250.0));
        assert_eq!(ms("100ns"), Some(1e-4));
        assert_eq!(ms("soon"), None);
    }

    #[test]
    fn the_log_is_followed_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut w = File::create(&path).unwrap();
        let mut tail = LogTail::open(&path).unwrap();
        write!(w, "{{\"level\":\"INFO\",\"message\":\"forwarder ready\",\"pid\":7}}\n{{\"level\":\"INFO\",\"message\":\"handed over: every listener and connection is the successor's\",\"successor\":8,\"connections\":1000,\"paused_for\":\"41.2ms\"}}\n{{\"level\":\"INFO\",\"mess").unwrap();
        tail.poll().unwrap();
        assert_eq!(tail.ready, vec![7]);
        assert_eq!(tail.handed.len(), 1);
        assert_eq!(tail.handed[0].successor, 8);
        assert_eq!(tail.handed[0].connections, 1000);
        assert!((tail.handed[0].paused_ms - 41.2).abs() < 1e-9);
        writeln!(w, "age\":\"forwarder ready\",\"pid\":8}}").unwrap();
        writeln!(w, "{{\"level\":\"ERROR\",\"message\":\"upgrade failed: the new binary exited before taking over; still serving\"}}").unwrap();
        tail.poll().unwrap();
        assert_eq!(tail.ready, vec![7, 8], "a line split between two reads");
        assert_eq!(tail.failures.len(), 1);
        assert_eq!(tail.complaints.len(), 1);
    }
}
