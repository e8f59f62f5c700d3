//! The bounded queue between the agent connections and the batcher.
//!
//! It is bounded twice: in spans, by a semaphore of span slots that a
//! record holds from send to receipt (a record carries the spans of one
//! socket read, so the channel's capacity alone would bound reads, not
//! spans), and in bytes,
//! by a semaphore of byte permits that each span holds (sized by its frame's
//! payload) until its batch has been exported, spooled or dropped. A
//! connection that cannot get room waits, and while it waits it does not
//! read its socket: the bound is what turns a slow collector into
//! backpressure on the guest rather than into memory growth here.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::otlp::SpanRecord;
use crate::stats::Stats;

/// A span in the queue, with the byte budget it holds.
pub(crate) struct Queued {
    pub record: SpanRecord,
    pub permit: OwnedSemaphorePermit,
}

impl Queued {
    /// Splits off the first `n` spans with their share of the byte budget,
    /// so that a batch can end inside a record. `None` (never, in practice)
    /// leaves the record whole.
    pub(crate) fn split_to(&mut self, n: usize) -> Option<Queued> {
        let count = self.record.count.max(1);
        let permits = self.permit.num_permits();
        let share = (permits as u128 * n.min(count) as u128 / count as u128) as usize;
        let permit = self.permit.split(share)?;
        Some(Queued {
            record: self.record.split_to(n),
            permit,
        })
    }
}

/// Span slots a record of `count` spans takes: a record larger than the
/// whole queue still fits alone.
fn slot_count(count: usize, max_spans: usize) -> u32 {
    u32::try_from(count.clamp(1, max_spans)).unwrap_or(u32::MAX)
}

/// The batcher is gone: the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("export queue closed")]
pub(crate) struct Closed;

#[derive(Clone)]
pub(crate) struct QueueSender {
    tx: mpsc::Sender<Queued>,
    slots: Arc<Semaphore>,
    max_spans: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    stats: Arc<Stats>,
}

pub(crate) struct QueueReceiver {
    rx: mpsc::Receiver<Queued>,
    slots: Arc<Semaphore>,
    max_spans: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    stats: Arc<Stats>,
}

/// Creates a queue holding at most `max_spans` spans and about `max_bytes`
/// bytes of them.
pub(crate) fn bounded(
    max_spans: usize,
    max_bytes: usize,
    stats: Arc<Stats>,
) -> (QueueSender, QueueReceiver) {
    let max_spans = max_spans.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(max_spans);
    let slots = Arc::new(Semaphore::new(max_spans));
    // The semaphore's limit is what bounds the byte count; it also caps
    // what one acquisition may ask for.
    let max_bytes = max_bytes
        .clamp(1, Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let bytes = Arc::new(Semaphore::new(max_bytes));
    (
        QueueSender {
            tx,
            slots: Arc::clone(&slots),
            max_spans,
            bytes: Arc::clone(&bytes),
            max_bytes,
            stats: Arc::clone(&stats),
        },
        QueueReceiver {
            rx,
            slots,
            max_spans,
            bytes,
            max_bytes,
            stats,
        },
    )
}

impl QueueSender {
    /// Queues a span costing `cost` bytes, waiting for room.
    pub(crate) async fn send(&self, record: SpanRecord, cost: usize) -> Result<(), Closed> {
        let spans = record.count as u64;
        // Slots go back when the batcher receives the record (see
        // `recv_many`), so they are not tied to a permit here.
        Arc::clone(&self.slots)
            .acquire_many_owned(slot_count(record.count, self.max_spans))
            .await
            .map_err(|_| Closed)?
            .forget();
        // A span larger than the whole budget still fits alone.
        let n = u32::try_from(cost.clamp(1, self.max_bytes)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.bytes)
            .acquire_many_owned(n)
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Queued { record, permit })
            .await
            .map_err(|_| Closed)?;
        self.stats.queue_depth.add(spans);
        Ok(())
    }
}

impl QueueReceiver {
    /// Receives up to `limit` spans into `buf`; 0 once every sender is gone
    /// and the queue is empty.
    pub(crate) async fn recv_many(&mut self, buf: &mut Vec<Queued>, limit: usize) -> usize {
        let n = self.rx.recv_many(buf, limit).await;
        // A record holds the spans of one socket read; the depth is in spans.
        let received = buf.get(buf.len().saturating_sub(n)..).unwrap_or_default();
        let spans: usize = received.iter().map(|q| q.record.count).sum();
        let slots: usize = received
            .iter()
            .map(|q| slot_count(q.record.count, self.max_spans) as usize)
            .sum();
        self.slots.add_permits(slots);
        self.stats.queue_depth.sub(spans as u64);
        n
    }

    /// Three quarters full, in spans or in bytes: time to move data to disk
    /// rather than keep it waiting in memory.
    pub(crate) fn is_filling_up(&self) -> bool {
        let spans_full = self.slots.available_permits() * 4 <= self.max_spans;
        let bytes_full = self.bytes.available_permits() * 4 <= self.max_bytes;
        spans_full || bytes_full
    }
}
