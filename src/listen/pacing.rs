//! Paced reading. The agent writes each span as it ends: read on arrival,
//! 10,000 spans/s across 100 agents cost about a tenth of a core, nearly all
//! wake-ups. So a slow agent's connection is *parked*: off the reactor, read
//! without blocking at the tick of a clock shared by all, one wake-up for
//! every parked connection. A read filling the buffer, a run of empty ticks,
//! or shutdown puts it back. The tick is a quarter of the batch timeout (50
//! ms at most), and what a tick reads is dated from the tick before: a span
//! never waits longer than `--batch-timeout` for its batch.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::sync::Notify;
use tokio::time::Instant;

const MAX_TICK: Duration = Duration::from_millis(50);
/// Shorter ticks than this are not worth a timer: no pacing.
const MIN_TICK: Duration = Duration::from_millis(5);
/// Below this many bytes a second an agent is paced: far under what a
/// socket buffer holds per tick, so it never blocks on a full one.
const PACE_BELOW: u64 = 1 << 20;
/// How long the rate is measured over before a connection may be parked.
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Empty ticks in a row after which a parked connection goes back to epoll.
pub(super) const EMPTY_TICKS: u32 = 4;

/// One task sleeps to each tick while any connection waits, and wakes them all.
#[derive(Debug, Clone)]
pub(crate) struct Pacing {
    epoch: Instant,
    tick: Duration,
    clock: Arc<Clock>,
}

/// Shared by waiters and ticker. (A timer per connection cost a timer-wheel
/// entry per tick, often an eventfd wake-up: ~1,000/s with 100 paced agents.)
#[derive(Debug, Default)]
struct Clock {
    ticked: Notify,
    waiting: AtomicUsize,
    /// Told when the first one waits: without any, the clock sleeps.
    wanted: Notify,
}

/// Counts a connection among those waiting for as long as it waits.
struct Waiting<'a>(&'a Clock);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pacing {
    /// Spawns its task; `None` when ticks would be too short, or no runtime.
    pub(crate) fn for_batch_timeout(batch_timeout: Duration) -> Option<Pacing> {
        let tick = (batch_timeout / 4).min(MAX_TICK);
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        (tick >= MIN_TICK).then(|| {
            let pacing = Pacing {
                epoch: Instant::now(),
                tick,
                clock: Arc::default(),
            };
            runtime.spawn(pacing.clone().run());
            pacing
        })
    }

    pub(crate) async fn tick(&self) {
        let ticked = self.clock.ticked.notified();
        tokio::pin!(ticked);
        // Counted from here: a tick from now on is this one's.
        ticked.as_mut().enable();
        if self.clock.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.clock.wanted.notify_one();
        }
        let _waiting = Waiting(&self.clock);
        ticked.await;
    }

    async fn run(self) {
        loop {
            if self.clock.waiting.load(Ordering::Acquire) == 0 {
                self.clock.wanted.notified().await;
            }
            tokio::time::sleep_until(self.next_tick(Instant::now())).await;
            self.clock.ticked.notify_waiters();
        }
    }

    /// The first tick after `now`, the same instant for every connection.
    pub(crate) fn next_tick(&self, now: Instant) -> Instant {
        let tick = self.tick.as_nanos().max(1);
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        let n = since / tick + 1;
        let at = u64::try_from(n.saturating_mul(tick)).unwrap_or(u64::MAX);
        self.epoch + Duration::from_nanos(at)
    }
}

#[derive(Debug)]
pub(crate) struct Rate {
    start: Instant,
    bytes: u64,
    /// Bytes a second over the last whole window; `None` before one.
    last: Option<u64>,
}

impl Rate {
    pub(crate) fn new(now: Instant) -> Rate {
        Rate {
            start: now,
            bytes: 0,
            last: None,
        }
    }

    pub(crate) fn add(&mut self, n: usize, now: Instant) {
        self.bytes += n as u64;
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= RATE_WINDOW {
            let per_sec = self.bytes as u128 * 1_000_000 / elapsed.as_micros().max(1);
            self.last = Some(u64::try_from(per_sec).unwrap_or(u64::MAX));
            self.start = now;
            self.bytes = 0;
        }
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.last.is_some_and(|r| r < PACE_BELOW)
    }
}

/// A stream that can leave the reactor (still non-blocking) and come back.
pub(crate) trait Park: AsyncRead + AsFd + Unpin + Sized {
    fn park(self) -> io::Result<File>;
    fn unpark(file: File) -> io::Result<Self>;
}

impl Park for tokio::net::UnixStream {
    fn park(self) -> io::Result<File> {
        Ok(File::from(OwnedFd::from(self.into_std()?)))
    }

    fn unpark(file: File) -> io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
        tokio::net::UnixStream::from_std(std)
    }
}

impl Park for tokio_vsock::VsockStream {
    fn park(self) -> io::Result<File> {
        // Deregisters from the reactor; the socket stays non-blocking.
        Ok(File::from(OwnedFd::from(self)))
    }

    fn unpark(file: File) -> io::Result<Self> {
        tokio_vsock::VsockStream::new(vsock::VsockStream::from(OwnedFd::from(file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_are_shared_and_a_quarter_of_the_batch_timeout() {
        let p = Pacing::for_batch_timeout(Duration::from_millis(200)).unwrap();
        assert_eq!(p.tick, Duration::from_millis(50));
        let a = p.next_tick(p.epoch + Duration::from_millis(1));
        let b = p.next_tick(p.epoch + Duration::from_millis(49));
        assert_eq!(a, b, "one instant for all");
        assert_eq!(a, p.epoch + Duration::from_millis(50));
        assert_eq!(
            p.next_tick(a),
            p.epoch + Duration::from_millis(100),
            "strictly after"
        );
        let short = Pacing::for_batch_timeout(Duration::from_millis(40)).unwrap();
        assert_eq!(short.tick, Duration::from_millis(10));
        assert!(Pacing::for_batch_timeout(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn no_pacing_outside_a_runtime() {
        assert!(Pacing::for_batch_timeout(Duration::from_millis(200)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn every_waiter_wakes_at_the_same_tick_and_an_idle_clock_sleeps() {
        let p = Pacing::for_batch_timeout(Duration::from_millis(200)).unwrap();
        let start = Instant::now();
        let waits: Vec<_> = (0..3)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    p.tick().await;
                    Instant::now()
                })
            })
            .collect();
        for w in waits {
            assert_eq!(w.await.unwrap(), p.epoch + Duration::from_millis(50));
        }
        assert!(start < p.epoch + Duration::from_millis(50));
        // Nobody waits: the clock stops, and the next waiter gets the next
        // tick of the same clock.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(p.clock.waiting.load(Ordering::Acquire), 0);
        p.tick().await;
        let since = Instant::now() - p.epoch;
        assert_eq!(since.as_millis() % 50, 0, "on the clock: {since:?}");
        assert!(since > Duration::from_millis(1_050));
    }

    #[test]
    fn only_a_slow_agent_is_paced() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        r.add(100, t0);
        assert!(!r.is_slow(), "not before a whole window");
        // 30 KB/s: an agent at 100 spans/s.
        r.add(3_000, t0 + Duration::from_millis(100));
        assert!(r.is_slow());
        // 10 MB/s.
        r.add(1_000_000, t0 + Duration::from_millis(200));
        assert!(!r.is_slow());
    }

    #[tokio::test]
    async fn a_parked_unix_stream_reads_without_the_reactor_and_comes_back() {
        use std::io::Read;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut file = a.park().unwrap();
        let mut buf = [0u8; 8];
        let e = file.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "still non-blocking");
        b.write_all(b"span").await.unwrap();
        assert_eq!(file.read(&mut buf).unwrap(), 4);
        let mut a = tokio::net::UnixStream::unpark(file).unwrap();
        b.write_all(b"more").await.unwrap();
        assert_eq!(a.read(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..4], b"more");
    }
}
