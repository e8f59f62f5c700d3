//! Processes and agents for the tests that follow a forwarder through its
//! successors (hand-overs, restarts with systemd's store): agents that
//! behave like the Kata exporter, and the process helpers to follow pids
//! that are not our children.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_agent_emitter::{bulk_frames, WireFormat};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

use super::{connect_agent, Receiver};

pub fn alive(pid: i32) -> bool {
    // A zombie (our own child, exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

pub async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap();
}

/// An agent as the Kata exporter is: one connection, frames at a steady
/// rate, and any write error is the end of it (counted).
pub struct Agents {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agents {
    /// `agents` agents on one socket.
    pub async fn start(socket: &Path, agents: usize, per_second: u64) -> Agents {
        Self::start_on(&vec![socket.to_path_buf(); agents], per_second).await
    }

    /// One agent on each of `sockets`.
    pub async fn start_on(sockets: &[PathBuf], per_second: u64) -> Agents {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (i, socket) in sockets.iter().enumerate() {
            let format = if i % 2 == 0 {
                WireFormat::Json
            } else {
                WireFormat::Bincode
            };
            let frames = bulk_frames(format, 3000, 600, 100 + i as u64);
            let mut conn = connect_agent(socket).await;
            let (stop, sent, errors) = (stop.clone(), sent.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
                for f in frames {
                    tick.tick().await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Err(e) = conn.write_all(&f).await {
                        eprintln!("agent {i}: write failed: {e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                // Keep the connection, as the agent does, until the end.
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Agents {
            stop,
            sent,
            errors,
            tasks,
        }
    }

    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
        )
    }
}

/// Every span exactly once: as many arrived as were sent, all distinct.
pub fn assert_exactly_once(rx: &Receiver, sent: usize) {
    let got = rx.store.spans.lock().unwrap();
    let ids: std::collections::HashSet<&[u8]> = got.iter().map(|(_, s)| &s.span_id[..]).collect();
    assert_eq!(got.len(), sent, "spans received vs sent");
    assert_eq!(ids.len(), sent, "no span received twice");
}

pub async fn wait_spans(rx: &Receiver, n: usize) {
    rx.store.wait_for(n, Duration::from_secs(30)).await;
}
