//! Pausing every listener and connection at once for a hand-over. Each
//! serving task is a [`Member`]: paused where its state is whole, it reports
//! a [`Piece`] (its descriptor duplicated, and what the successor must know)
//! and waits for the outcome without touching its socket; a refused
//! hand-over costs only the pause.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::wire::{ConnState, ListenerKind};

pub(crate) struct Piece {
    pub what: PieceKind,
    pub fd: OwnedFd,
}

pub(crate) enum PieceKind {
    Listener {
        kind: ListenerKind,
        janitor: Option<OwnedFd>,
    },
    /// Its accepting loop's member id (`ConnState::listener` is set later).
    Connection(u64, ConnState),
}

/// A pause's round (0: none yet), and once settled whether it committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pausing(u64),
    Settled(u64, bool),
}

/// How a pause ended for one member (`lifeline::After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Resume,
    /// The hand-over went ahead without this task (it joined late): drain.
    Drain,
    /// A successor holds its socket: end without another read, closing or removing nothing.
    Leave,
}

enum Slot {
    Running,
    /// `None`: it could not make its piece (out of descriptors).
    Reported(u64, Option<Piece>),
    /// Paused, with no socket of its own (a template's watcher, the
    /// `--kata-host` planner: the sockets they make are members).
    Quiet(u64),
    Taken(u64),
}

pub(crate) struct Hub {
    members: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    phase: watch::Sender<Phase>,
    /// A member reported or left.
    changed: Notify,
}

impl Hub {
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            members: Mutex::default(),
            next_id: AtomicU64::new(1),
            phase: watch::Sender::new(Phase::Settled(0, false)),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn member(self: &Arc<Self>) -> Member {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Slot::Running);
        Member {
            hub: Arc::clone(self),
            id,
            phase: self.phase.subscribe(),
            reported: None,
            learnt: None,
        }
    }

    /// Asks every member to pause; the pieces by member id once all have
    /// reported, or `None` after `timeout` (then settle uncommitted).
    pub(crate) async fn pause(&self, timeout: Duration) -> Option<Vec<(u64, Piece)>> {
        let (Phase::Pausing(last) | Phase::Settled(last, _)) = *self.phase.borrow();
        let round = last + 1;
        self.phase.send_replace(Phase::Pausing(round));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            {
                let mut members = self.lock();
                let done =
                    |s: &Slot| matches!(s, Slot::Reported(r, _) | Slot::Quiet(r) if *r == round);
                let failed = |s: &Slot| matches!(s, Slot::Reported(_, None));
                if members.values().all(done) {
                    if members.values().any(failed) {
                        tracing::warn!("hand-over: a socket could not be duplicated; resuming");
                        return None;
                    }
                    let mut pieces = Vec::with_capacity(members.len());
                    for (id, slot) in members.iter_mut() {
                        // A quiet member is taken too: it learns the outcome.
                        if let Slot::Reported(_, Some(piece)) =
                            std::mem::replace(slot, Slot::Taken(round))
                        {
                            pieces.push((*id, piece));
                        }
                    }
                    pieces.sort_by_key(|(id, _)| *id);
                    return Some(pieces);
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let waiting = self
                    .lock()
                    .values()
                    .filter(|s| matches!(s, Slot::Running))
                    .count();
                tracing::warn!(
                    waiting,
                    "hand-over: not every connection paused in time; resuming"
                );
                return None;
            }
        }
    }

    /// Ends the pause: every member learns whether it was handed over.
    pub(crate) fn settle(&self, committed: bool) {
        let round = match *self.phase.borrow() {
            Phase::Pausing(round) => round,
            Phase::Settled(..) => return,
        };
        if !committed {
            // Whatever was reported or taken is theirs again.
            for slot in self.lock().values_mut() {
                *slot = Slot::Running;
            }
        }
        self.phase.send_replace(Phase::Settled(round, committed));
    }
}

pub(crate) struct Member {
    hub: Arc<Hub>,
    pub(crate) id: u64,
    phase: watch::Receiver<Phase>,
    /// The last round this member reported in.
    reported: Option<u64>,
    /// The last round whose outcome it has learnt.
    learnt: Option<u64>,
}

impl Member {
    /// The round of a pause asked and not yet reported in.
    pub(crate) fn due(&self) -> Option<u64> {
        match *self.phase.borrow() {
            Phase::Pausing(round) if self.reported != Some(round) => Some(round),
            _ => None,
        }
    }

    pub(crate) async fn pause_asked(&mut self) {
        let reported = self.reported;
        let due = |p: &Phase| matches!(*p, Phase::Pausing(round) if reported != Some(round));
        if self.phase.wait_for(due).await.is_err() {
            // The hub is gone with the process: never.
            std::future::pending::<()>().await;
        }
    }

    pub(crate) fn report(&mut self, piece: Option<Piece>) {
        self.put(|round| Slot::Reported(round, piece));
    }

    pub(crate) fn report_quiet(&mut self) {
        self.put(Slot::Quiet);
    }

    fn put(&mut self, slot: impl FnOnce(u64) -> Slot) {
        let Some(round) = self.due() else { return };
        self.reported = Some(round);
        self.hub.lock().insert(self.id, slot(round));
        self.hub.changed.notify_waiters();
    }

    /// `None` unless reported and not yet learnt (then its socket is not its own).
    pub(crate) async fn outcome(&mut self) -> Option<Outcome> {
        let round = self.reported.filter(|r| self.learnt != Some(*r))?;
        self.learnt = Some(round);
        loop {
            match *self.phase.borrow_and_update() {
                Phase::Settled(r, committed) if r == round => {
                    let taken = matches!(
                        self.hub.lock().get(&self.id),
                        Some(Slot::Taken(t)) if *t == round
                    );
                    return Some(match (committed, taken) {
                        (true, true) => Outcome::Leave,
                        (true, false) => Outcome::Drain,
                        (false, _) => Outcome::Resume,
                    });
                }
                Phase::Pausing(r) | Phase::Settled(r, _) if r > round => break,
                _ => {}
            }
            if self.phase.changed().await.is_err() {
                break;
            }
        }
        Some(Outcome::Resume)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.id);
        self.hub.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn piece() -> Option<Piece> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Some(Piece {
            what: PieceKind::Listener {
                kind: ListenerKind::Vsock { cid: None, port: 1 },
                janitor: None,
            },
            fd: a.as_fd().try_clone_to_owned().unwrap(),
        })
    }

    fn pausing(hub: &Arc<Hub>) -> tokio::task::JoinHandle<Option<Vec<(u64, Piece)>>> {
        let hub = Arc::clone(hub);
        tokio::spawn(async move { hub.pause(Duration::from_secs(5)).await })
    }

    #[tokio::test]
    async fn members_pause_report_and_learn_the_outcome() {
        let hub = Hub::new();
        let mut a = hub.member();
        let mut b = hub.member();

        // Refused: both carry on.
        let p = pausing(&hub);
        a.pause_asked().await;
        a.report(piece());
        b.pause_asked().await;
        b.report(piece());
        assert_eq!(p.await.unwrap().map(|v| v.len()), Some(2));
        hub.settle(false);
        assert_eq!(a.outcome().await, Some(Outcome::Resume));
        assert_eq!(b.outcome().await, Some(Outcome::Resume));
        assert!(a.due().is_none());

        // Committed: a member that ends meanwhile is not waited for, one
        // that joins after the pieces were taken is not handed over.
        let gone = hub.member();
        let p = pausing(&hub);
        a.pause_asked().await;
        a.report(piece());
        b.pause_asked().await;
        b.report(piece());
        tokio::task::yield_now().await;
        assert!(!p.is_finished(), "waits for every member");
        drop(gone);
        let pieces = p.await.unwrap().expect("every member reported");
        let ids: Vec<u64> = pieces.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![a.id, b.id]);
        let mut late = hub.member();
        late.pause_asked().await;
        late.report(piece());
        hub.settle(true);
        assert_eq!(a.outcome().await, Some(Outcome::Leave));
        assert_eq!(b.outcome().await, Some(Outcome::Leave));
        assert_eq!(late.outcome().await, Some(Outcome::Drain));
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_that_never_reports_times_the_pause_out() {
        let hub = Hub::new();
        let _stuck = hub.member();
        let mut ok = hub.member();
        let pausing = {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move { hub.pause(Duration::from_millis(100)).await })
        };
        ok.pause_asked().await;
        ok.report(piece());
        assert!(pausing.await.unwrap().is_none());
        hub.settle(false);
        assert_eq!(ok.outcome().await, Some(Outcome::Resume));
        assert!(ok.due().is_none());
    }
}
