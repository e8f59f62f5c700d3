//! One way to stop: a cancellation token plus the deadline shared by both
//! phases (connections drain, then what was read is flushed). A sandbox's
//! [`child`](Shutdown::child) stops with the forwarder, or alone with no deadline.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stop accepting, read what agents already wrote, flush, exit.
    Drain,
    /// A successor serves everything: read nothing more, flush, leave the sockets, exit.
    HandOver,
    /// systemd's store keeps everything: read each connection to a frame's end, flush, exit.
    Store,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    pub mode: Mode,
    pub deadline: Instant,
}

/// A handle on the forwarder's (or one sandbox's) shutdown. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// How the whole forwarder is stopping, if it is. Shared by a shutdown
    /// and all its children: set once, by the root.
    pub(crate) stopping: Arc<watch::Sender<Option<Stopping>>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A shutdown that stops with this one, or alone ([`Self::stop`]).
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
            stopping: Arc::clone(&self.stopping),
        }
    }

    pub(crate) fn begin(&self, mode: Mode, deadline: Instant) {
        self.stopping
            .send_replace(Some(Stopping { mode, deadline }));
        self.token.cancel();
    }

    /// Stops this shutdown's tasks (a sandbox that went), with no deadline.
    pub fn stop(&self) {
        self.token.cancel();
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn stopping(&self) {
        self.token.cancelled().await;
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.stopping.borrow().map(|s| s.deadline)
    }

    pub(crate) fn past_deadline(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Resolves with the forwarder's deadline once set (cuts waits short).
    pub(crate) async fn deadline_set(&self) -> Instant {
        let mut rx = self.stopping.subscribe();
        // The sender lives in `self`: it cannot be gone while we wait.
        let set = rx.wait_for(Option::is_some).await.map(|s| *s);
        set.ok().flatten().map_or_else(Instant::now, |s| s.deadline)
    }
}

fn stop_and_upgrade_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM};
    [SIGHUP, SIGTERM, SIGINT].into_iter().collect()
}

/// Blocks the stop and upgrade signals on this thread and those it starts; call
/// first in `main`. Blocked, not ignored: one before the runtime handles it (an
/// upgraded binary starting) stays pending for [`SignalGate`], neither lost nor killing us.
pub fn block_stop_signals() {
    let _ = stop_and_upgrade_signals().thread_block();
}

/// Undoes [`block_stop_signals`], for a process that will not serve.
pub fn unblock_stop_signals() {
    let _ = stop_and_upgrade_signals().thread_unblock();
}

/// The one thread the stop and upgrade signals are delivered to, so that
/// [`hold`](Self::hold) keeps them pending for the whole process across an
/// upgrade's `exec`. Start it once the runtime's handlers are in place.
pub struct SignalGate {
    /// Dropped to hold: the thread then blocks them and ends.
    hold: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SignalGate {
    pub fn open() -> std::io::Result<SignalGate> {
        let (hold, asked) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ktf-signals".into())
            .spawn(move || {
                let set = stop_and_upgrade_signals();
                let _ = set.thread_unblock();
                // Signals are handled on this thread, while it waits here.
                let _ = asked.recv();
                let _ = set.thread_block();
            })?;
        Ok(SignalGate { hold, thread })
    }

    /// From its return on, the signals stay pending (across `exec` too).
    pub fn hold(self) {
        drop(self.hold);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_child_stops_alone_or_with_its_parent() {
        let root = Shutdown::new();
        let a = root.child();
        let b = root.child();
        a.stop();
        assert!(a.is_stopping());
        assert!(!b.is_stopping() && !root.is_stopping());
        assert_eq!(a.deadline(), None, "a sandbox stopping sets no deadline");

        let at = Instant::now() + Duration::from_secs(5);
        root.begin(Mode::Drain, at);
        assert!(b.is_stopping());
        b.stopping().await;
        assert_eq!(b.deadline(), Some(at));
        assert_eq!(b.deadline_set().await, at);
        assert!(!b.past_deadline());
        let grandchild = b.child();
        assert!(grandchild.is_stopping(), "born stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_set_wakes_when_stopping_begins() {
        let root = Shutdown::new();
        let waiter = tokio::spawn({
            let s = root.child();
            async move { s.deadline_set().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        let at = Instant::now() + Duration::from_secs(1);
        root.begin(Mode::Drain, at);
        assert_eq!(waiter.await.unwrap(), at);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(root.past_deadline());
    }
}
