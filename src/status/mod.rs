//! `kata-trace-forwarder status`: how a running forwarder is doing (its
//! sandboxes, their agents, spans dropped or stuck in the spool). Here the
//! report and the forwarder's end ([`Board`]). It is asked over the hand-off
//! socket (`SO_PEERCRED`: root or our successor, before anything is read),
//! with its own first message:
//!
//! ```text
//! client -> forwarder   "KTFSTAT1"                  (8 bytes)
//! forwarder -> client   the report as one JSON document, then it closes
//! ```
//!
//! The report reads counters kept anyway; both ends bound time and size.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use crate::export::{spool::Depth, HealthSnapshot};
use crate::export::{unix_ms, Exporter};
use crate::stats::{DropReason, FamilySnapshot, Label, Stats};
use crate::tenant::Tenants;

/// A status client's first message (a successor's: [`crate::handover::REQUEST`]).
pub const REQUEST: [u8; 8] = *b"KTFSTAT1";
/// The report's format; a field is only ever added.
const FORMAT: u32 = 1;
/// Largest report either end handles: far above [`MAX_LISTED`] sandboxes.
const MAX_REPORT: usize = 16 << 20;
/// Sandboxes listed at most; the rest counted.
const MAX_LISTED: usize = 4096;
/// Longest the forwarder takes to write a report to a slow client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reports being written at once; a request past it is closed unanswered.
const MAX_ANSWERING: usize = 4;
/// Longest the client waits for each forwarder, all in (one waits a second
/// at most for a silent peer before answering the next).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no kata-trace-forwarder is running on this host (no live hand-off socket in {dir}; one started with --handoff-socket elsewhere is asked with `status --handoff-socket PATH`)")]
    NotRunning { dir: PathBuf },
    #[error("no kata-trace-forwarder is running at {path}")]
    NotListening { path: PathBuf },
    #[error("connecting to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{path}: permission denied (only root may ask a forwarder for its status)")]
    Denied { path: PathBuf },
    #[error("the forwarder at {path} closed without answering (only root may ask it for its status, and one older than `status` answers no one)")]
    NoAnswer { path: PathBuf },
    #[error("the forwarder at {path} did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("reading the status from {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the answer from {path} is not a status report: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("listing {dir}: {source}")]
    ListDir { dir: PathBuf, source: io::Error },
}

/// A forwarder's status, as it answers and as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    pub version: String,
    pub pid: u32,
    pub socket: PathBuf,
    /// Unix ms, the other times' clock too.
    pub now_unix_ms: u64,
    /// When this process began serving (a `SIGHUP` upgrade starts again).
    pub started_unix_ms: u64,
    pub uptime_seconds: u64,
    pub listeners: Vec<String>,
    pub sandboxes: Vec<SandboxReport>,
    pub sandboxes_not_listed: u64,
    pub exporter: ExporterReport,
    /// Every counter of [`crate::stats`], as the exit summary logs them.
    pub counters: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// Its id, or its socket or guest CID where the id is not known.
    pub sandbox: String,
    pub connections: u64,
    pub max_connections: u64,
    pub received: u64,
    /// Taken by the collector from the queue (from the spool: globally).
    pub exported: u64,
    pub spooled: u64,
    pub queued: u64,
    /// Read and still in memory: queued, being sent, or waiting for room.
    pub pending: u64,
    pub dropped: ByReason,
    /// Reads paused (`rate`, `queue_share`), connections closed.
    pub limited: ByReason,
    /// When spans of its were last read; `None`: never.
    pub last_sent_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ByReason {
    pub total: u64,
    #[serde(flatten)]
    pub reasons: BTreeMap<String, u64>,
}

impl<L: Label> From<FamilySnapshot<L>> for ByReason {
    fn from(f: FamilySnapshot<L>) -> ByReason {
        ByReason {
            total: f.total(),
            reasons: f.iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExporterReport {
    /// Where batches go, as the startup log says.
    pub collector: String,
    #[serde(flatten)]
    pub health: HealthSnapshot,
    /// Requests (retries included); retries; batches given up.
    pub attempts: u64,
    pub retries: u64,
    pub failures: u64,
    pub queue_spans: u64,
    /// [`SandboxReport::pending`] of the sandboxes served now.
    pub pending_spans: u64,
    pub spool: Option<Depth>,
}

pub(crate) struct Board {
    stats: Arc<Stats>,
    tenants: Arc<Tenants>,
    exporter: Arc<Exporter>,
    listeners: Vec<String>,
    started: Instant,
    answering: Arc<tokio::sync::Semaphore>,
}

impl Board {
    pub(crate) fn new(
        stats: Arc<Stats>,
        tenants: Arc<Tenants>,
        exporter: Arc<Exporter>,
        listeners: Vec<String>,
    ) -> Board {
        Board {
            stats,
            tenants,
            exporter,
            listeners,
            started: Instant::now(),
            answering: Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING)),
        }
    }

    pub(crate) fn report(&self, socket: &Path) -> Report {
        let (now, now_ms) = (Instant::now(), unix_ms(SystemTime::now()));
        let ago = |d: Duration| now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(0));
        let uptime = now.saturating_duration_since(self.started);
        let live = self.tenants.live();
        let mut sandboxes: Vec<SandboxReport> = live
            .iter()
            .map(|t| {
                let (received, dropped) = (t.received.get(), t.dropped.snapshot());
                let (exported, spooled) = (t.exported.get(), t.spooled.get());
                let settled = exported + spooled + dropped.total();
                SandboxReport {
                    sandbox: t.label().to_owned(),
                    connections: t.connections() as u64,
                    max_connections: t.max_connections as u64,
                    received,
                    exported,
                    spooled,
                    queued: t.queued() as u64,
                    pending: received.saturating_sub(settled),
                    dropped: dropped.into(),
                    limited: t.limited.snapshot().into(),
                    last_sent_unix_ms: t.last_sent_ago(now).map(ago),
                }
            })
            .collect();
        // The global counters cannot tell spans from the spool (maybe a
        // predecessor's) from the rest.
        let pending = sandboxes.iter().map(|s| s.pending).sum();
        let not_listed = sandboxes.len().saturating_sub(MAX_LISTED);
        sandboxes.truncate(MAX_LISTED);
        let snap = self.stats.snapshot();
        let counters = serde_json::to_value(snap).and_then(serde_json::from_value);
        Report {
            format: FORMAT,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            socket: socket.to_owned(),
            now_unix_ms: now_ms,
            started_unix_ms: ago(uptime),
            uptime_seconds: uptime.as_secs(),
            listeners: self.listeners.clone(),
            sandboxes,
            sandboxes_not_listed: not_listed as u64,
            exporter: ExporterReport {
                collector: self.exporter.sink.describe(),
                health: self.exporter.health.snapshot(),
                attempts: snap.export_attempts,
                retries: snap.export_retries,
                failures: snap.export_failures,
                queue_spans: snap.queue_depth,
                pending_spans: pending,
                spool: self.exporter.spool.as_ref().map(|s| s.depth()),
            },
            counters: counters.unwrap_or_default(),
        }
    }

    /// Answers on `stream` (its peer checked), off the runtime; past
    /// [`MAX_ANSWERING`] at once, closes it unanswered.
    pub(crate) fn answer(self: &Arc<Self>, mut stream: UnixStream, socket: PathBuf, pid: i32) {
        // Given back however it ends (also by a task that never ran).
        let Ok(slot) = Arc::clone(&self.answering).try_acquire_owned() else {
            tracing::warn!(pid, "status: too many requests at once; closed unanswered");
            return;
        };
        let board = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let sent = serde_json::to_vec(&board.report(&socket))
                .map_err(io::Error::other)
                .and_then(|json| {
                    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    stream.write_all(&json)
                });
            match sent {
                Ok(()) => tracing::debug!(pid, "status: answered"),
                Err(e) => tracing::warn!(pid, error = %e, "status: answering"),
            }
        });
    }
}

mod client;
mod table;

#[cfg(test)]
use client::discovered;
pub use client::{gather, Target};
pub use table::print;
#[cfg(test)]
use table::{bytes, duration};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Failure;
    use crate::tenant::LimitReason;

    fn report() -> Report {
        let now = 1_700_000_000_000;
        let mut dropped = ByReason::from(FamilySnapshot::<DropReason>::default());
        dropped.total = 3;
        dropped.reasons.insert("export".into(), 1);
        dropped.reasons.insert("too_large".into(), 2);
        let mut limited = ByReason::from(FamilySnapshot::<LimitReason>::default());
        limited.total = 7;
        limited.reasons.insert("rate".into(), 7);
        let sandbox = |name: &str| SandboxReport {
            sandbox: name.into(),
            connections: 1,
            max_connections: 8,
            received: 120,
            exported: 100,
            spooled: 0,
            queued: 20,
            pending: 20,
            dropped: ByReason::from(FamilySnapshot::<DropReason>::default()),
            limited: ByReason::from(FamilySnapshot::<LimitReason>::default()),
            last_sent_unix_ms: Some(now - 1_500),
        };
        let mut counters = serde_json::Map::new();
        counters.insert("spans_received".into(), 160.into());
        counters.insert("spans_dropped".into(), 3.into());
        counters.insert("spans_dropped_too_large".into(), 2.into());
        counters.insert("spans_dropped_export".into(), 1.into());
        Report {
            format: FORMAT,
            version: "0.1.0".into(),
            pid: 42,
            socket: "/run/kata-trace-forwarder/handoff-00000000.sock".into(),
            now_unix_ms: now,
            started_unix_ms: now - 65_000,
            uptime_seconds: 65,
            listeners: vec!["hybrid vsock template unix:/run/vc/vm/{ID}/clh.sock_10240".into()],
            sandboxes: vec![
                sandbox("a-long-sandbox-id"),
                SandboxReport {
                    sandbox: "b\u{1b}[31m".into(),
                    connections: 0,
                    received: 40,
                    exported: 0,
                    queued: 0,
                    pending: 0,
                    spooled: 37,
                    dropped,
                    limited,
                    last_sent_unix_ms: None,
                    ..sandbox("b")
                },
            ],
            sandboxes_not_listed: 0,
            exporter: ExporterReport {
                collector: "otlp grpc http://127.0.0.1:4317".into(),
                health: HealthSnapshot {
                    last_success_unix_ms: None,
                    last_failure: Some(Failure {
                        at_unix_ms: now - 300,
                        error: "connection refused".into(),
                    }),
                },
                attempts: 14,
                retries: 12,
                failures: 0,
                queue_spans: 20,
                pending_spans: 20,
                spool: Some(Depth {
                    dir: "/var/spool/ktf".into(),
                    batches: 3,
                    spans: 140,
                    bytes: 46_182,
                    max_bytes: 256 << 20,
                }),
            },
            counters,
        }
    }

    #[test]
    fn the_table_lines_up_and_says_what_is_true() {
        let table = report().to_string();
        let want = "\
kata-trace-forwarder 0.1.0 (pid 42), up 1m 5s, asked at /run/kata-trace-forwarder/handoff-00000000.sock
listening on:
  hybrid vsock template unix:/run/vc/vm/{ID}/clh.sock_10240

SANDBOX            CONNECTIONS  RECEIVED  EXPORTED  SPOOLED  PENDING  LAST SENT  DROPPED                    LIMITED
a-long-sandbox-id  1/8          120       100       0        20       1.5s ago   0                          -
b?[31m             0/8          40        0         37       0        never      3 (export 1, too_large 2)  7 (rate 7)

exporter: otlp grpc http://127.0.0.1:4317
  last success: never
  last failure: 0.3s ago: connection refused
  requests: 14 (12 retries, 0 batches given up)
  in memory: 20 spans (20 in the queue, the rest being sent or waiting for room)
  spool: 3 batches, 140 spans, 45.1 KiB of 256.0 MiB in /var/spool/ktf
totals: received 160, exported 0, rejected 0, spooled 0, sent from the spool 0, dropped 3 (export 1, too_large 2)
";
        assert_eq!(table, want, "got:\n{table}");
    }

    #[test]
    fn no_sandbox_and_no_spool_are_said_so() {
        let mut r = report();
        r.sandboxes.clear();
        r.exporter.spool = None;
        let table = r.to_string();
        assert!(table.contains("sandboxes: none served yet"), "{table}");
        assert!(
            table.contains("spool: none (--spool-dir not given)"),
            "{table}"
        );
    }

    #[test]
    fn the_json_round_trips_with_reasons_flat() {
        let r = report();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["sandboxes"][1]["dropped"]["total"], 3);
        assert_eq!(json["sandboxes"][1]["dropped"]["too_large"], 2);
        assert_eq!(
            json["sandboxes"][1]["last_sent_unix_ms"],
            serde_json::Value::Null
        );
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_board_reports_each_sandbox_and_what_is_still_in_memory() {
        use crate::config::TenantLimits;
        use crate::tenant::TenantKey;
        let stats = Arc::new(Stats::default());
        let tenants = Arc::new(Tenants::new(TenantLimits::default()));
        let sink = crate::export::Sink::dump(Box::new(std::io::sink()));
        let exporter = Arc::new(Exporter::new(sink, None, Arc::clone(&stats)));
        let board = Board::new(
            Arc::clone(&stats),
            Arc::clone(&tenants),
            exporter,
            vec!["vsock cid any port 10240".into()],
        );
        let a = tenants.get(TenantKey::Sandbox("a".into())).unwrap();
        let _b = tenants.get(TenantKey::Cid(7)).unwrap();
        let _conn = a.try_connect().unwrap();
        a.count_received(10, Instant::now());
        a.exported.add(4);
        a.spooled.add(3);
        a.dropped.inc(DropReason::Export);
        a.limited.add(LimitReason::Rate, 2);
        let r = board.report(Path::new("/run/x.sock"));
        assert_eq!(r.listeners, ["vsock cid any port 10240"]);
        let names: Vec<&str> = r.sandboxes.iter().map(|s| s.sandbox.as_str()).collect();
        assert_eq!(names, ["a", "vsock:7"]);
        let s = &r.sandboxes[0];
        assert_eq!(
            (s.connections, s.received, s.exported, s.spooled, s.pending),
            (1, 10, 4, 3, 2)
        );
        assert_eq!((s.dropped.total, s.dropped.reasons["export"]), (1, 1));
        assert_eq!(s.limited.reasons["rate"], 2);
        assert!(s.last_sent_unix_ms.is_some_and(|t| t <= r.now_unix_ms));
        assert_eq!(r.sandboxes[1].last_sent_unix_ms, None, "never sent");
        assert_eq!(r.exporter.pending_spans, 2);
        assert_eq!(r.exporter.collector, "stdout (OTLP JSON lines)");
        assert_eq!(r.exporter.health.last_success_unix_ms, None);
        assert_eq!(r.exporter.spool, None);
        assert_eq!(r.pid, std::process::id());
    }

    #[test]
    fn durations_and_sizes_read_as_people_say_them() {
        let d = |s| duration(Duration::from_millis(s));
        assert_eq!(
            [d(400), d(12_000), d(185_000), d(7_380_000), d(360_000_000)],
            ["0.4s", "12s", "3m 5s", "2h 3m", "4d 4h"]
        );
        assert_eq!(
            [bytes(0), bytes(1023), bytes(1536), bytes(3 << 20)],
            ["0 B", "1023 B", "1.5 KiB", "3.0 MiB"]
        );
    }

    #[test]
    fn discovery_passes_stale_sockets_over_and_says_denied_once() {
        let dir = Path::new("/run/kata-trace-forwarder");
        let stale = || {
            Err(StatusError::NotListening {
                path: dir.join("handoff-1.sock"),
            })
        };
        let denied = || {
            Err(StatusError::Denied {
                path: dir.join("handoff-2.sock"),
            })
        };
        let got = discovered(vec![stale(), denied(), denied(), Ok(report())], dir);
        assert!(
            matches!(got.as_slice(), [Ok(_), Err(StatusError::Denied { path })] if path == dir),
            "{got:?}"
        );
        let got = discovered(vec![stale(), stale()], dir);
        assert!(
            matches!(got.as_slice(), [Err(StatusError::NotRunning { .. })]),
            "{got:?}"
        );
    }

    #[test]
    fn no_forwarder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // A socket left by a forwarder that was killed: nobody listens.
        let stale = dir.path().join("handoff-0000abcd.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let got = gather(Target::Discover(dir.path()), Duration::from_secs(1));
        assert!(
            matches!(got.as_slice(), [Err(StatusError::NotRunning { .. })]),
            "{got:?}"
        );
        let got = gather(Target::Socket(&stale), Duration::from_secs(1));
        assert!(
            matches!(got.as_slice(), [Err(StatusError::NotListening { .. })]),
            "{got:?}"
        );
    }
}
