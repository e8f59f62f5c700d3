//! What a serving task does next: a [`Lifeline`] joins the forwarder
//! stopping ([`Shutdown`]) and a hand-over's pause (a place in the [`Hub`]);
//! ARCHITECTURE.md's lifecycle tells how tasks use it. A child's lifeline is
//! taken before it runs, so that a pause asked from then on waits for it.

use std::future::Future;
use std::sync::Arc;

use crate::handover::hub::{Hub, Member, Piece};
use crate::shutdown::{Mode, Shutdown};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Stopping has begun: read what is already there, then end.
    Drain,
    /// A hand-over asks for a pause: report, then [`Lifeline::settled`].
    Pause,
}

pub(crate) use crate::handover::hub::Outcome as After;

pub(crate) struct Lifeline {
    /// Its deadline is the forwarder's (none for a sandbox stopped alone).
    pub(crate) shutdown: Shutdown,
    hub: Option<Arc<Hub>>,
    /// `None` for the root, which only starts tasks.
    member: Option<Member>,
    handed_over: bool,
}

impl Lifeline {
    pub(crate) fn root(shutdown: Shutdown, hub: Option<Arc<Hub>>) -> Lifeline {
        Lifeline {
            shutdown,
            hub,
            member: None,
            handed_over: false,
        }
    }

    /// A lifeline for a task this one starts, under `shutdown`.
    pub(crate) fn under(&self, shutdown: Shutdown) -> Lifeline {
        let member = self.hub.as_ref().map(Hub::member);
        Lifeline {
            member,
            ..Lifeline::root(shutdown, self.hub.clone())
        }
    }

    /// A lifeline for a task this one starts, stopping with it.
    pub(crate) fn spawn(&self) -> Lifeline {
        self.under(self.shutdown.clone())
    }

    /// This task's id in a hand-over (0 outside): a connection's piece names its accept loop's.
    pub(crate) fn id(&self) -> u64 {
        self.member.as_ref().map_or(0, |m| m.id)
    }

    /// Resolves with what interrupts this task first.
    pub(crate) async fn next(&mut self) -> Next {
        let member = self.member.as_mut();
        tokio::select! {
            biased;
            _ = self.shutdown.stopping() => Next::Drain,
            Some(()) = async {
                member?.pause_asked().await;
                Some(())
            } => Next::Pause,
        }
    }

    pub(crate) fn pause_due(&self) -> bool {
        self.member.as_ref().is_some_and(|m| m.due().is_some())
    }

    /// Reports this task paused with `piece` (`None`: not made, and the hand-over is refused).
    pub(crate) fn report(&mut self, piece: Option<Piece>) {
        if let Some(m) = self.member.as_mut() {
            m.report(piece);
        }
    }

    /// Reports a task without a socket (a watcher, the planner) paused; waits for the outcome.
    pub(crate) async fn pause_quiet(&mut self) -> After {
        if let Some(m) = self.member.as_mut() {
            m.report_quiet();
        }
        self.settled().await.unwrap_or(After::Resume)
    }

    /// After a report, waits for the hand-over's outcome; `None` when nothing was reported.
    pub(crate) async fn settled(&mut self) -> Option<After> {
        let after = self.member.as_mut()?.outcome().await?;
        self.handed_over |= after == After::Leave;
        Some(after)
    }

    /// Awaits `fut`; a pause asked meanwhile gets `piece()` at once (what it
    /// describes must not change while `fut` runs); then [`Self::settled`].
    pub(crate) async fn paused_while<F: Future>(
        &mut self,
        fut: F,
        piece: impl FnOnce() -> Option<Piece>,
    ) -> F::Output {
        let Some(m) = self.member.as_mut() else {
            return fut.await;
        };
        tokio::pin!(fut);
        if m.due().is_none() {
            tokio::select! {
                out = &mut fut => return out,
                _ = m.pause_asked() => {}
            }
        }
        m.report(piece());
        fut.await
    }

    /// Whether what this task holds stays (handed over, or stopping into systemd's store).
    pub(crate) fn leaves(&self) -> bool {
        let stopping = *self.shutdown.stopping.borrow();
        self.handed_over || stopping.is_some_and(|p| p.mode == Mode::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test]
    async fn a_task_learns_drain_pause_and_leave_from_one_place() {
        let shutdown = Shutdown::new();
        let hub = Hub::new();
        let root = Lifeline::root(shutdown.clone(), Some(Arc::clone(&hub)));
        let mut task = root.spawn();
        let sandbox_stop = shutdown.child();
        let mut sandbox = root.under(sandbox_stop.clone());

        // A pause: the task reports, the hub hands over, the task leaves.
        let pausing = tokio::spawn({
            let hub = Arc::clone(&hub);
            async move { hub.pause(Duration::from_secs(5)).await.map(|p| p.len()) }
        });
        assert_eq!(task.next().await, Next::Pause);
        task.report(None);
        assert_eq!(sandbox.next().await, Next::Pause);
        assert_eq!(
            tokio::join!(sandbox.pause_quiet(), async {
                // A piece that could not be made refuses the round.
                assert_eq!(pausing.await.unwrap(), None);
                hub.settle(false);
            })
            .0,
            After::Resume
        );
        assert_eq!(task.settled().await, Some(After::Resume));
        assert!(!task.leaves());

        // A sandbox stopped alone drains; the others carry on.
        sandbox_stop.stop();
        assert_eq!(sandbox.next().await, Next::Drain);
        assert!(!task.shutdown.is_stopping() && sandbox.shutdown.deadline().is_none());

        // Stopping into systemd's store: everything stays.
        shutdown.begin(Mode::Store, Instant::now() + Duration::from_secs(1));
        assert_eq!(task.next().await, Next::Drain);
        assert!(task.leaves() && sandbox.leaves());
    }

    #[tokio::test]
    async fn nothing_interrupts_a_task_outside_hand_overs_until_stopping() {
        let shutdown = Shutdown::new();
        let mut task = Lifeline::root(shutdown.clone(), None).spawn();
        assert_eq!(task.id(), 0);
        let waited = tokio::time::timeout(Duration::from_millis(50), task.next()).await;
        assert!(waited.is_err());
        assert_eq!(task.paused_while(async { 7 }, || unreachable!()).await, 7);
        shutdown.begin(Mode::Drain, Instant::now());
        assert_eq!(task.next().await, Next::Drain);
        assert!(!task.leaves());
    }
}
