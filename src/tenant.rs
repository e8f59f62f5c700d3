//! Tenants: what each sandbox (a socket, or a guest CID) may take of the
//! forwarder: a connection cap, a token bucket of spans (over it, its
//! connections are not read until the bucket allows), an equal share of the
//! export queue while others hold room in it, a log gate, its counters. The
//! registry is bounded by `--max-sandboxes`; a tenant leaves it once nothing
//! holds it (on VSOCK, a while after its last connection, so that
//! reconnecting does not refill its bucket).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{QueueConfig, TenantLimits};
pub use crate::stats::LimitReason;
use crate::stats::{Counter, DropReason, Family};

/// How long a VSOCK tenant outlives its last connection.
const IDLE_KEEP: Duration = Duration::from_secs(10);

/// Longest sandbox label on the metrics page and in logs.
const MAX_LABEL: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TenantKey {
    /// A sandbox whose id the host knows.
    Sandbox(String),
    Socket(PathBuf),
    Cid(u32),
}

pub(crate) struct Tenants {
    pub(crate) limits: TenantLimits,
    map: Mutex<HashMap<TenantKey, Arc<Tenant>>>,
    next_id: AtomicU64,
    /// Tenants holding room in the export queue now.
    holding: Arc<AtomicUsize>,
    /// Log gate for what is on no tenant (a full registry, the global cap).
    pub(crate) overflow: LogGate,
}

impl Tenants {
    pub(crate) fn new(limits: TenantLimits) -> Tenants {
        Tenants {
            limits,
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            holding: Arc::new(AtomicUsize::new(0)),
            overflow: LogGate::default(),
        }
    }

    /// Made if new; `None` when `--max-sandboxes` tenants are live already.
    pub(crate) fn get(&self, key: TenantKey) -> Option<Arc<Tenant>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&key) {
            return Some(Arc::clone(t));
        }
        if map.len() >= self.limits.max_sandboxes {
            sweep(&mut map, Instant::now());
            if map.len() >= self.limits.max_sandboxes {
                return None;
            }
        }
        let tenant = Arc::new(Tenant::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            key.clone(),
            &self.limits,
            Arc::clone(&self.holding),
        ));
        map.insert(key, Arc::clone(&tenant));
        Some(tenant)
    }

    /// For the metrics page; those gone are dropped first.
    pub(crate) fn live(&self) -> Vec<Arc<Tenant>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        sweep(&mut map, Instant::now());
        let mut all: Vec<Arc<Tenant>> = map.values().cloned().collect();
        all.sort_by(|a, b| a.label().cmp(b.label()));
        all
    }
}

fn sweep(map: &mut HashMap<TenantKey, Arc<Tenant>>, now: Instant) {
    map.retain(|key, t| {
        let idle = || now.duration_since(*t.idle_since.lock().unwrap_or_else(|p| p.into_inner()));
        Arc::strong_count(t) > 1 || (matches!(key, TenantKey::Cid(_)) && idle() < IDLE_KEEP)
    });
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    spans: usize,
    bytes: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.spans == 0 && self.bytes == 0
    }
}

#[derive(Debug)]
pub(crate) struct Tenant {
    pub(crate) id: u64,
    /// Found later (VSOCK, once its QEMU is found).
    pub(crate) sandbox_id: OnceLock<String>,
    /// Bounded in length.
    key_label: String,
    pub(crate) max_connections: usize,
    connections: AtomicUsize,
    idle_since: Mutex<Instant>,
    bucket: Option<Mutex<Bucket>>,
    held: Mutex<Held>,
    released: Notify,
    holding: Arc<AtomicUsize>,
    pub received: Counter,
    /// A partial success's rejections count here too (the collector names
    /// them per request), and globally as rejected.
    pub exported: Counter,
    /// From the spool, unattributed: a spool file does not say whose spans.
    pub spooled: Counter,
    pub dropped: Family<DropReason>,
    pub limited: Family<LimitReason>,
    pub(crate) log: LogGate,
    born: Instant,
    /// Last read, ms after `born` plus one (0: never): a relaxed store a read.
    last_sent: AtomicU64,
}

impl Tenant {
    fn new(id: u64, key: TenantKey, limits: &TenantLimits, holding: Arc<AtomicUsize>) -> Tenant {
        let bucket = (limits.spans_per_second > 0).then(|| {
            Mutex::new(Bucket::new(
                f64::from(limits.spans_per_second),
                f64::from(limits.burst.max(1)),
                Instant::now(),
            ))
        });
        let mut key_label = match key {
            TenantKey::Sandbox(id) => id,
            TenantKey::Socket(p) => format!("unix:{}", p.display()),
            TenantKey::Cid(cid) => format!("vsock:{cid}"),
        };
        let cut = (0..=MAX_LABEL)
            .rev()
            .find(|&i| key_label.is_char_boundary(i));
        key_label.truncate(cut.unwrap_or(0));
        Tenant {
            id,
            sandbox_id: OnceLock::new(),
            key_label,
            max_connections: limits.max_connections,
            connections: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            bucket,
            held: Mutex::new(Held::default()),
            released: Notify::new(),
            holding,
            received: Counter::default(),
            exported: Counter::default(),
            spooled: Counter::default(),
            dropped: Family::default(),
            limited: Family::default(),
            log: LogGate::default(),
            born: Instant::now(),
            last_sent: AtomicU64::new(0),
        }
    }

    /// Outside any registry (tests, embedders).
    pub(crate) fn standalone(key: TenantKey, limits: &TenantLimits) -> Arc<Tenant> {
        Arc::new(Tenant::new(0, key, limits, Arc::new(AtomicUsize::new(0))))
    }

    /// Its id when known (checked and bounded where found), else its key.
    pub(crate) fn label(&self) -> &str {
        self.sandbox_id.get().unwrap_or(&self.key_label)
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn try_connect(self: &Arc<Self>) -> Option<TenantConn> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .ok()?;
        Some(TenantConn(Arc::clone(self)))
    }

    /// How long to wait before reading again, if over the rate.
    pub(crate) fn take_tokens(&self, spans: usize, now: Instant) -> Option<Duration> {
        let bucket = self.bucket.as_ref()?;
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.take(spans as f64, now)
    }

    /// Holds room in the queue if this tenant holds nothing, or no one else
    /// does, or it stays within its share.
    pub(crate) fn try_hold(&self, spans: usize, bytes: usize, bounds: QueueConfig) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let holding = self.holding.load(Ordering::Acquire);
        let others = holding.saturating_sub(usize::from(!held.is_empty()));
        let ways = others + 1;
        let within = held.spans + spans <= bounds.max_spans / ways
            && held.bytes + bytes <= bounds.max_bytes / ways;
        if !(held.is_empty() || others == 0 || within) {
            return false;
        }
        if held.is_empty() {
            self.holding.fetch_add(1, Ordering::AcqRel);
        }
        held.spans += spans;
        held.bytes += bytes;
        true
    }

    /// [`try_hold`](Self::try_hold), waiting for room; whether it waited.
    pub(crate) async fn hold(&self, spans: usize, bytes: usize, bounds: QueueConfig) -> bool {
        // First without registering for a wake-up (a lock): the common case.
        if self.try_hold(spans, bytes, bounds) {
            return false;
        }
        let mut waited = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.try_hold(spans, bytes, bounds) {
                return waited;
            }
            waited = true;
            released.await;
        }
    }

    pub(crate) fn release(&self, spans: usize, bytes: usize) {
        if spans == 0 && bytes == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let was_holding = !held.is_empty();
        held.spans = held.spans.saturating_sub(spans);
        held.bytes = held.bytes.saturating_sub(bytes);
        if was_holding && held.is_empty() {
            self.holding.fetch_sub(1, Ordering::AcqRel);
        }
        drop(held);
        self.released.notify_waiters();
    }

    pub(crate) fn count_received(&self, spans: usize, at: Instant) {
        self.received.add(spans as u64);
        let ms = at.saturating_duration_since(self.born).as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX - 1);
        self.last_sent.store(ms + 1, Ordering::Relaxed);
    }

    pub(crate) fn last_sent_ago(&self, now: Instant) -> Option<Duration> {
        match self.last_sent.load(Ordering::Relaxed) {
            0 => None,
            ms => {
                let at = self.born + Duration::from_millis(ms - 1);
                Some(now.saturating_duration_since(at))
            }
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).spans
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        // What the gate held back is not lost with the sandbox.
        self.log.flush(self.label());
    }
}

/// One of a sandbox's connection slots, given back on drop.
#[derive(Debug)]
pub(crate) struct TenantConn(pub(crate) Arc<Tenant>);

impl Drop for TenantConn {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket in spans (`rate` a second, `burst` saved up at most): spans
/// read are never refused; its debt is how long their connection waits.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// In debt, wait until paid, at least [`MIN_WAIT`] (or half the burst if
    /// less, losing no token to the cap): a throttled connection wakes for a
    /// few buffers at a time, not every 64 spans (3 ms at 20,000 spans/s).
    fn take(&mut self, n: f64, now: Instant) -> Option<Duration> {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst) - n;
        self.at = now;
        let floor = MIN_WAIT.as_secs_f64().min(self.burst / 2.0 / self.rate);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64((-self.tokens / self.rate).max(floor)))
    }
}

const MIN_WAIT: Duration = Duration::from_millis(20);

/// Kinds of log line a guest can cause over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noisy {
    Refused,
    Connected,
    Disconnected,
    Throttled,
    Undecodable,
    Claim,
    TooLarge,
}

/// What each [`Noisy`] kind counts, in declaration order (a gate's index).
const WHAT: [&str; 7] = [
    "connections refused",
    "connections opened",
    "connections closed",
    "reads paused by a limit",
    "frames that do not decode",
    "resources claiming another identity",
    "spans too large for the collector",
];

/// Lines of one kind logged per window before the rest are only counted.
const GATE_LINES: u32 = 5;
pub(crate) const GATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
struct GateState {
    since: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Lets the first few lines of each kind through per window and counts the
/// rest, logged in one line when the window is over (at the next line of
/// that kind, or when the sandbox goes).
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    kinds: Mutex<[GateState; WHAT.len()]>,
}

impl LogGate {
    /// A window that is over is summarised first.
    pub(crate) fn allow(&self, kind: Noisy, sandbox: &str) -> bool {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = kinds.get_mut(kind as usize) else {
            return true;
        };
        let over = s
            .since
            .is_none_or(|t| now.saturating_duration_since(t) >= GATE_WINDOW);
        if over {
            let what = WHAT.get(kind as usize).copied().unwrap_or_default();
            summarise(what, sandbox, s.suppressed);
            *s = GateState {
                since: Some(now),
                ..GateState::default()
            };
        }
        if s.logged < GATE_LINES {
            s.logged += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }

    pub(crate) fn flush(&self, sandbox: &str) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        for (what, s) in WHAT.iter().zip(kinds.iter_mut()) {
            summarise(what, sandbox, s.suppressed);
            s.suppressed = 0;
        }
    }
}

fn summarise(what: &str, sandbox: &str, n: u64) {
    if n > 0 {
        tracing::warn!(
            sandbox,
            suppressed = n,
            "{n} more {what} for sandbox {sandbox} in the last {}s (log lines held back)",
            GATE_WINDOW.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TenantLimits {
        TenantLimits {
            max_connections: 2,
            spans_per_second: 100,
            burst: 50,
            max_sandboxes: 3,
        }
    }

    #[test]
    fn connections_are_capped_per_sandbox_and_come_back() {
        let tenants = Tenants::new(limits());
        let a = tenants.get(TenantKey::Sandbox("a".into())).unwrap();
        let c1 = a.try_connect().unwrap();
        let _c2 = a.try_connect().unwrap();
        assert!(a.try_connect().is_none(), "a third is over the cap");
        let b = tenants.get(TenantKey::Sandbox("b".into())).unwrap();
        assert!(b.try_connect().is_some(), "another sandbox is unaffected");
        drop(c1);
        assert!(a.try_connect().is_some());
    }

    #[test]
    fn the_registry_is_bounded_and_forgets_what_is_gone() {
        let tenants = Tenants::new(limits());
        let held: Vec<_> = (0..3)
            .map(|i| tenants.get(TenantKey::Sandbox(i.to_string())).unwrap())
            .collect();
        assert!(tenants.get(TenantKey::Sandbox("x".into())).is_none());
        assert_eq!(tenants.live().len(), 3);
        drop(held);
        assert!(tenants.live().is_empty(), "series go with their sandbox");
        assert!(tenants.get(TenantKey::Sandbox("x".into())).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vsock_tenant_outlives_its_connections_a_while() {
        let tenants = Tenants::new(limits());
        let t = tenants.get(TenantKey::Cid(3)).unwrap();
        let conn = t.try_connect().unwrap();
        assert!(t.take_tokens(50, Instant::now()).is_none());
        drop((conn, t));
        // Reconnecting at once finds the same, empty bucket.
        let again = tenants.get(TenantKey::Cid(3)).unwrap();
        assert!(again.take_tokens(1, Instant::now()).is_some());
        drop(again);
        tokio::time::advance(IDLE_KEEP).await;
        assert!(tenants.live().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_knows_when_it_last_sent() {
        let t = Tenant::standalone(TenantKey::Sandbox("a".into()), &limits());
        assert_eq!(t.last_sent_ago(Instant::now()), None, "never yet");
        tokio::time::advance(Duration::from_secs(5)).await;
        let read = Instant::now();
        t.count_received(3, read);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            t.last_sent_ago(Instant::now()),
            Some(Duration::from_secs(2))
        );
        assert_eq!(t.received.get(), 3);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate_and_never_refuses() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, 50.0, t0);
        assert_eq!(b.take(50.0, t0), None);
        // 10 more at once: in debt by 10, i.e. 100 ms at 100/s.
        let wait = b.take(10.0, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After that wait the debt is paid; a second later, 100 saved up
        // but capped at the burst.
        assert_eq!(b.take(0.0, t0 + wait), None);
        assert_eq!(b.take(50.0, t0 + wait + Duration::from_secs(1)), None);
        assert!(b.take(1.0, t0 + wait + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn a_sandbox_held_at_its_rate_waits_seldom_and_keeps_its_rate() {
        // The defaults: 20,000 spans/s, a burst of 40,000; reads of 64.
        let t0 = Instant::now();
        let mut b = Bucket::new(20_000.0, 40_000.0, t0);
        assert_eq!(b.take(40_000.0, t0), None);
        let (mut now, mut spans, mut waits) = (t0, 0.0, 0);
        while now < t0 + Duration::from_secs(1) {
            spans += 64.0;
            if let Some(wait) = b.take(64.0, now) {
                assert!(wait >= MIN_WAIT, "{wait:?}");
                now += wait;
                waits += 1;
            }
        }
        // 3 ms apart, that would be over 300 waits.
        assert!(waits <= 50, "{waits} waits in a second");
        let rate = spans / (now - t0).as_secs_f64();
        assert!((19_000.0..=21_000.0).contains(&rate), "{rate} spans/s");
        // A small burst is not wasted: the floor is half of it.
        let mut small = Bucket::new(20_000.0, 100.0, t0);
        assert_eq!(small.take(100.0, t0), None);
        let wait = small.take(1.0, t0).unwrap();
        assert!(
            wait < MIN_WAIT && wait >= Duration::from_micros(2_500),
            "{wait:?}"
        );
    }

    #[test]
    fn a_tenant_alone_may_use_the_whole_queue_but_only_its_share_beside_others() {
        let tenants = Tenants::new(limits());
        let bounds = QueueConfig {
            max_spans: 100,
            max_bytes: 10_000,
        };
        let a = tenants.get(TenantKey::Sandbox("a".into())).unwrap();
        let b = tenants.get(TenantKey::Sandbox("b".into())).unwrap();
        assert!(a.try_hold(90, 900, bounds), "alone: all of it");
        assert!(b.try_hold(1, 10, bounds), "holding nothing: always one");
        assert!(!a.try_hold(1, 10, bounds), "over half while b holds some");
        assert!(b.try_hold(40, 10, bounds), "b is within its half");
        b.release(41, 20);
        assert!(a.try_hold(1, 10, bounds), "alone again");
        a.release(91, 910);
        assert_eq!(tenants.holding.load(Ordering::Relaxed), 0);
        // Bytes count as well as spans.
        assert!(a.try_hold(1, 9_000, bounds));
        assert!(b.try_hold(1, 1, bounds));
        assert!(!a.try_hold(1, 1, bounds));
    }

    #[tokio::test]
    async fn a_tenant_over_its_share_waits_for_its_own_room_to_come_back() {
        let tenants = Arc::new(Tenants::new(limits()));
        let bounds = QueueConfig {
            max_spans: 10,
            max_bytes: 1 << 20,
        };
        let a = tenants.get(TenantKey::Sandbox("a".into())).unwrap();
        let b = tenants.get(TenantKey::Sandbox("b".into())).unwrap();
        assert!(!a.hold(8, 0, bounds).await);
        assert!(!b.hold(1, 0, bounds).await);
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.hold(1, 0, bounds).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.release(8, 0);
        assert!(waiter.await.unwrap(), "it waited, then got in");
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_gate_lets_a_few_through_then_summarises() {
        let gate = LogGate::default();
        let allowed = (0..100).filter(|_| gate.allow(Noisy::Refused, "a")).count();
        assert_eq!(allowed, GATE_LINES as usize);
        assert!(gate.allow(Noisy::Connected, "a"), "kinds are apart");
        tokio::time::advance(GATE_WINDOW).await;
        assert!(gate.allow(Noisy::Refused, "a"), "a new window");
        let kinds = gate.kinds.lock().unwrap();
        assert_eq!(kinds[Noisy::Refused as usize].suppressed, 0, "summarised");
    }
}
