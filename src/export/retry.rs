//! Retry policy: transports classify their failures ([`Retry`]); this
//! decides when to try again (jittered exponential backoff, a throttling
//! hint honoured but capped) until a total deadline shutdown can pull in.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::shutdown::Shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    Retryable,
    /// The server asked to slow down, maybe saying for how long.
    Throttled(Option<Duration>),
    /// Trying again cannot help (bad request, auth, ...).
    Never,
    /// Larger than the collector takes: its halves may pass.
    TooLarge,
}

pub(crate) trait Classify {
    fn retry(&self) -> Retry;
}

pub(crate) struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest a throttling hint is obeyed for in one wait.
    pub max_throttle: Duration,
    /// Total time one batch may spend being retried.
    pub max_elapsed: Duration,
}

pub(crate) const EXPORT: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
    max_throttle: Duration::from_secs(30),
    max_elapsed: Duration::from_secs(120),
};

pub(crate) struct Outcome<T, E> {
    pub result: Result<T, E>,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// The caller's `give_up` asked to stop before time was up.
    pub gave_up: bool,
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails for good, or time (or the
    /// shutdown deadline, also mid-wait) is up. `give_up`, asked after each
    /// retryable failure: the caller has a better use for the data (spool).
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        shutdown: &Shutdown,
        give_up: impl Fn() -> bool,
        mut op: F,
    ) -> Outcome<T, E>
    where
        E: Classify,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let own_deadline = Instant::now() + self.max_elapsed;
        let mut backoff = Backoff::new(self);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let done = |result, gave_up| Outcome {
                result,
                attempts,
                gave_up,
            };
            let err = match op(attempts).await {
                Ok(v) => return done(Ok(v), false),
                Err(e) => e,
            };
            let Some(wait) = backoff.after(err.retry()) else {
                return done(Err(err), false);
            };
            if give_up() {
                return done(Err(err), true);
            }
            let wake = Instant::now() + wait;
            let deadline = shutdown.deadline().unwrap_or(own_deadline);
            if wake >= deadline.min(own_deadline) {
                return done(Err(err), false);
            }
            // Shutdown may set a deadline inside the wait.
            if shutdown.deadline().is_none() {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => continue,
                    d = shutdown.deadline_set() => if d <= wake {
                        return done(Err(err), false);
                    }
                }
            }
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// The waits between attempts: doubling from `initial_backoff` up to
/// `max_backoff`, jittered, or a throttling hint, capped.
pub(crate) struct Backoff<'a> {
    policy: &'a RetryPolicy,
    next: Duration,
}

impl<'a> Backoff<'a> {
    pub(crate) fn new(policy: &'a RetryPolicy) -> Backoff<'a> {
        Backoff {
            policy,
            next: policy.initial_backoff,
        }
    }

    /// How long to wait after a failure of class `retry`; `None`: do not.
    pub(crate) fn after(&mut self, retry: Retry) -> Option<Duration> {
        let p = self.policy;
        let wait = match retry {
            Retry::Never | Retry::TooLarge => return None,
            Retry::Throttled(Some(hint)) => hint.min(p.max_throttle),
            // "Equal jitter": half to all of the backoff, spread but never 0.
            Retry::Retryable | Retry::Throttled(None) => {
                let half = self.next / 2;
                half + half.mul_f64(rand::rng().random::<f64>())
            }
        };
        self.next = p.max_backoff.min(self.next.saturating_mul(2));
        Some(wait)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.policy.initial_backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(Retry);
    impl Classify for E {
        fn retry(&self) -> Retry {
            self.0
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            max_throttle: Duration::from_millis(50),
            max_elapsed: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_until_success() {
        let rx = Shutdown::new();
        let calls = AtomicU32::new(0);
        let out = policy()
            .run(
                &rx,
                || false,
                |_| async {
                    if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                        Err(E(Retry::Retryable))
                    } else {
                        Ok(7)
                    }
                },
            )
            .await;
        assert_eq!(out.result.unwrap(), 7);
        assert_eq!(out.attempts, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn never_retries_permanent_errors() {
        let rx = Shutdown::new();
        for class in [Retry::Never, Retry::TooLarge] {
            let out: Outcome<(), E> = policy()
                .run(&rx, || false, |_| async { Err(E(class)) })
                .await;
            assert!(out.result.is_err());
            assert_eq!(out.attempts, 1, "{class:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn honours_throttle_hint_and_gives_up_at_deadline() {
        let rx = Shutdown::new();
        let start = Instant::now();
        let out: Outcome<(), E> = policy()
            .run(
                &rx,
                || false,
                |_| async { Err(E(Retry::Throttled(Some(Duration::from_millis(45))))) },
            )
            .await;
        assert!(out.result.is_err());
        // 5 s of budget at 45 ms a wait: about 111 attempts, never more.
        let elapsed = start.elapsed();
        assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(out.attempts, 5000 / 45 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_the_caller_gives_up() {
        let rx = Shutdown::new();
        let calls = AtomicU32::new(0);
        let out: Outcome<(), E> = policy()
            .run(
                &rx,
                || calls.load(Ordering::SeqCst) >= 3,
                |_| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(E(Retry::Retryable))
                },
            )
            .await;
        assert!(out.gave_up);
        assert_eq!(out.attempts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn pulled_in_deadline_stops_waiting() {
        let shutdown = Shutdown::new();
        let rx = shutdown.clone();
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(3600),
            ..policy()
        };
        let task = tokio::spawn(async move {
            p.run(
                &rx,
                || false,
                |_| async { Err::<(), _>(E(Retry::Retryable)) },
            )
            .await
            .attempts
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.begin(crate::shutdown::Mode::Drain, Instant::now());
        let attempts = task.await.unwrap();
        assert!((20..=60).contains(&attempts), "{attempts}");
    }

    /// Each wait is between half and all of the backoff, which doubles up
    /// to its bound; a hint is obeyed, up to its own bound; a reset starts
    /// over; what cannot be helped is not waited for.
    #[test]
    fn backoff_grows_jittered_to_its_bound_and_obeys_hints() {
        let p = policy();
        let mut b = Backoff::new(&p);
        for want in [10, 20, 40, 40, 40] {
            let want = Duration::from_millis(want);
            let got = b.after(Retry::Retryable).unwrap();
            assert!((want / 2..=want).contains(&got), "{got:?} for {want:?}");
        }
        let hint = |ms| Retry::Throttled(Some(Duration::from_millis(ms)));
        assert_eq!(b.after(hint(45)), Some(Duration::from_millis(45)));
        assert_eq!(b.after(hint(5000)), Some(p.max_throttle));
        b.reset();
        let first = b.after(Retry::Throttled(None)).unwrap();
        assert!(first <= p.initial_backoff, "{first:?}");
        assert_eq!(b.after(Retry::Never), None);
        assert_eq!(b.after(Retry::TooLarge), None);
    }
}
