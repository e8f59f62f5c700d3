//! The bounded queue between the connections and the batcher: in spans, by
//! slots a record (one socket read) holds until received (so they bound the
//! lanes too), and in bytes, by permits held until its batch is exported,
//! spooled or dropped. A connection without room stops reading.
//!
//! Fair between sandboxes: while others hold room, a sandbox's [`Share`]
//! is at most an equal part ([`crate::tenant`]); the receiver takes from
//! one lane per sandbox in turn, so a quiet one never waits behind a flood.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::otlp::SpanRecord;
use crate::stats::Stats;
use crate::tenant::{LimitReason, Tenant};

/// The room a record holds of its sandbox's share: its spans until it
/// leaves the queue, its bytes until it is exported (dropped).
pub(crate) struct Share {
    pub(crate) tenant: Arc<Tenant>,
    spans: usize,
    bytes: usize,
}

impl Share {
    /// Splits off `part` of `whole` (for a split-off piece of the record).
    fn split(&mut self, part: usize, whole: usize) -> Share {
        let of = |v: usize| (v as u128 * part as u128 / whole.max(1) as u128) as usize;
        let (spans, bytes) = (of(self.spans), of(self.bytes));
        self.spans -= spans;
        self.bytes -= bytes;
        Share {
            tenant: Arc::clone(&self.tenant),
            spans,
            bytes,
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.tenant.release(self.spans, self.bytes);
    }
}

/// Spans in the queue, with the byte budget they hold.
pub(crate) struct Queued {
    pub record: SpanRecord,
    pub permit: OwnedSemaphorePermit,
    pub share: Share,
    /// The earliest these spans may have reached our socket: the batch
    /// timeout counts from here (see `crate::listen::pacing`).
    pub since: Instant,
}

impl Queued {
    /// Splits off the first `n` spans with their share of the byte budget,
    /// for a batch to end inside a record. `None`: never, in practice.
    pub(crate) fn split_to(&mut self, n: usize) -> Option<Queued> {
        let count = self.record.count.max(1);
        let n = n.min(count);
        let permits = self.permit.num_permits();
        let part = (permits as u128 * n as u128 / count as u128) as usize;
        let permit = self.permit.split(part)?;
        Some(Queued {
            record: self.record.split_to(n),
            permit,
            share: self.share.split(n, count),
            since: self.since,
        })
    }
}

/// Span slots a record of `count` spans takes (one larger than the queue still fits alone).
fn slot_count(count: usize, max_spans: usize) -> u32 {
    u32::try_from(count.clamp(1, max_spans)).unwrap_or(u32::MAX)
}

/// The batcher is gone: the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("export queue closed")]
pub(crate) struct Closed;

/// What both ends share: the span slots, the byte permits, their bounds.
#[derive(Clone)]
struct Room {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    bounds: crate::config::QueueConfig,
    stats: Arc<Stats>,
}

#[derive(Clone)]
pub(crate) struct QueueSender {
    tx: mpsc::Sender<Queued>,
    room: Room,
}

pub(crate) struct QueueReceiver {
    rx: mpsc::Receiver<Queued>,
    lanes: Lanes,
    room: Room,
}

/// Records arrived, one lane per sandbox, taken by deficit round robin in
/// spans (each turn adds [`QUANTUM`] to a lane's allowance; it gives while
/// its oldest fits): by records, a flood's 256-span ones would outweigh
/// single spans a hundredfold.
#[derive(Default)]
struct Lanes {
    lanes: HashMap<u64, Lane>,
    turns: VecDeque<u64>,
}

#[derive(Default)]
struct Lane {
    records: VecDeque<Queued>,
    /// Spans it may still give this turn.
    allowance: usize,
}

/// Spans a lane may give per turn: the largest record, so every turn gives.
const QUANTUM: usize = crate::ingest::RECORD_MAX_SPANS;

impl Lanes {
    fn push(&mut self, q: Queued) {
        let id = q.share.tenant.id;
        let lane = self.lanes.entry(id).or_default();
        if lane.records.is_empty() {
            self.turns.push_back(id);
        }
        lane.records.push_back(q);
    }

    /// The next record, in turn.
    fn pop(&mut self) -> Option<Queued> {
        // Each lane is looked at twice at most: to end a turn, then with a
        // fresh allowance, which fits any record.
        for _ in 0..=2 * self.turns.len() {
            let id = *self.turns.front()?;
            let Some(lane) = self.lanes.get_mut(&id) else {
                self.turns.pop_front();
                continue;
            };
            let fits = lane
                .records
                .front()
                .is_some_and(|q| q.record.count <= lane.allowance);
            if !fits {
                // This turn is over; the next one starts with more.
                lane.allowance += QUANTUM;
                self.turns.rotate_left(1);
                continue;
            }
            let q = lane.records.pop_front()?;
            lane.allowance -= q.record.count;
            if lane.records.is_empty() {
                self.lanes.remove(&id);
                self.turns.pop_front();
            }
            return Some(q);
        }
        None
    }
}

/// A queue of at most `max_spans` spans and about `max_bytes` bytes.
pub(crate) fn bounded(
    max_spans: usize,
    max_bytes: usize,
    stats: Arc<Stats>,
) -> (QueueSender, QueueReceiver) {
    let max_spans = max_spans.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(max_spans);
    // The semaphore's limit bounds the bytes, and one acquisition (u32).
    let max_bytes = max_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let room = Room {
        slots: Arc::new(Semaphore::new(max_spans)),
        bytes: Arc::new(Semaphore::new(max_bytes)),
        bounds: crate::config::QueueConfig {
            max_spans,
            max_bytes,
        },
        stats,
    };
    let lanes = Lanes::default();
    (
        QueueSender {
            tx,
            room: room.clone(),
        },
        QueueReceiver { rx, lanes, room },
    )
}

impl QueueSender {
    /// Queues `tenant`'s record of `cost` bytes, read no earlier than
    /// `since`, waiting for room in its share, then here.
    pub(crate) async fn send(
        &self,
        record: SpanRecord,
        cost: usize,
        tenant: &Arc<Tenant>,
        since: Instant,
    ) -> Result<(), Closed> {
        let (spans, room) = (record.count as u64, &self.room);
        // Counted as the wait begins, for `status` to show it now.
        if !tenant.try_hold(record.count, cost, room.bounds) {
            tenant.throttled(
                &room.stats,
                LimitReason::QueueShare,
                std::time::Duration::ZERO,
            );
            tenant.hold(record.count, cost, room.bounds).await;
        }
        // Given back if this send is abandoned.
        let share = Share {
            tenant: Arc::clone(tenant),
            spans: record.count,
            bytes: cost,
        };
        // Slots go back in `recv_many`, not with a permit.
        Arc::clone(&room.slots)
            .acquire_many_owned(slot_count(record.count, room.bounds.max_spans))
            .await
            .map_err(|_| Closed)?
            .forget();
        // A span larger than the whole budget still fits alone.
        let n = u32::try_from(cost.clamp(1, room.bounds.max_bytes)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&room.bytes)
            .acquire_many_owned(n)
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Queued {
                record,
                permit,
                share,
                since,
            })
            .await
            .map_err(|_| Closed)?;
        room.stats.queue_depth.add(spans);
        Ok(())
    }
}

impl QueueReceiver {
    /// Receives records of up to about `limit` spans into `buf`, sandboxes
    /// in turn; 0 once every sender is gone and the queue is empty.
    /// Cancel-safe: what arrived stays in the lanes.
    pub(crate) async fn recv_many(&mut self, buf: &mut Vec<Queued>, limit: usize) -> usize {
        if self.lanes.turns.is_empty() {
            let Some(q) = self.rx.recv().await else {
                return 0;
            };
            self.lanes.push(q);
        }
        // All that arrived goes into the lanes before any turn is taken.
        while let Ok(q) = self.rx.try_recv() {
            self.lanes.push(q);
        }
        let (mut n, mut spans, mut slots) = (0, 0, 0);
        while spans < limit.max(1) {
            let Some(mut q) = self.lanes.pop() else { break };
            spans += q.record.count;
            slots += slot_count(q.record.count, self.room.bounds.max_spans) as usize;
            let share = &mut q.share;
            share.tenant.release(std::mem::take(&mut share.spans), 0);
            buf.push(q);
            n += 1;
        }
        self.room.slots.add_permits(slots);
        self.room.stats.queue_depth.sub(spans as u64);
        n
    }

    /// Three quarters full, in spans or in bytes: time to spool.
    pub(crate) fn is_filling_up(&self) -> bool {
        let r = &self.room;
        r.slots.available_permits() * 4 <= r.bounds.max_spans
            || r.bytes.available_permits() * 4 <= r.bounds.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantLimits;
    use crate::otlp::EncodedResource;
    use crate::tenant::{TenantKey, Tenants};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    /// A record of `count` spans (their bytes do not matter here).
    fn record(count: usize) -> SpanRecord {
        SpanRecord {
            resource: Arc::new(EncodedResource::new(Resource::default())),
            spans: bytes::Bytes::from(vec![0u8; count]),
            count,
        }
    }

    /// A flooding sandbox's backlog of full records is never ahead of a
    /// quiet one's single spans: the quiet one's all come out in the first
    /// batch, and turns are counted in spans, not records.
    #[tokio::test]
    async fn lanes_take_turns_in_spans() {
        let stats = Arc::new(Stats::default());
        let tenants = Tenants::new(TenantLimits::default());
        let flood = tenants.get(TenantKey::Sandbox("flood".into())).unwrap();
        let quiet = tenants.get(TenantKey::Sandbox("quiet".into())).unwrap();
        let (tx, mut rx) = bounded(100_000, 1 << 30, Arc::clone(&stats));
        for _ in 0..20 {
            tx.send(record(256), 1000, &flood, Instant::now())
                .await
                .unwrap();
        }
        for _ in 0..10 {
            tx.send(record(1), 10, &quiet, Instant::now())
                .await
                .unwrap();
        }
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, 512).await;
        let ids = |b: &[Queued]| {
            b.iter()
                .map(|q| (q.share.tenant.label().to_owned(), q.record.count))
                .collect::<Vec<_>>()
        };
        let first = ids(&batch);
        let quiet_spans: usize = first
            .iter()
            .filter(|(t, _)| t == "quiet")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(quiet_spans, 10, "{first:?}");
        let flood_spans: usize = first
            .iter()
            .filter(|(t, _)| t == "flood")
            .map(|(_, n)| n)
            .sum();
        assert!(flood_spans <= 512, "{first:?}");
        // The rest comes out, in order, once each.
        let mut all = batch.len();
        loop {
            let mut more = Vec::new();
            if rx.lanes.turns.is_empty() && rx.rx.is_empty() {
                break;
            }
            all += rx.recv_many(&mut more, 512).await;
        }
        assert_eq!(all, 30);
        assert_eq!(stats.queue_depth.get(), 0);
    }

    /// A sandbox waiting for its share of the queue is counted as limited
    /// while it waits (`status` then says why it is not read), not only
    /// once it is let in.
    #[tokio::test]
    async fn a_sandbox_waiting_for_its_share_is_counted_as_it_waits() {
        let stats = Arc::new(Stats::default());
        let tenants = Tenants::new(TenantLimits::default());
        let a = tenants.get(TenantKey::Sandbox("a".into())).unwrap();
        let b = tenants.get(TenantKey::Sandbox("b".into())).unwrap();
        let (tx, _rx) = bounded(64, 1 << 20, Arc::clone(&stats));
        tx.send(record(1), 10, &b, Instant::now()).await.unwrap();
        tx.send(record(30), 10, &a, Instant::now()).await.unwrap();
        // Over its half while b holds room: it waits.
        let send = tx.send(record(10), 10, &a, Instant::now());
        tokio::pin!(send);
        assert!(futures_util::poll!(&mut send).is_pending());
        assert_eq!(a.limited.snapshot().get(LimitReason::QueueShare), 1);
        assert_eq!(
            stats
                .sandbox_limited
                .snapshot()
                .get(LimitReason::QueueShare),
            1
        );
    }
}
