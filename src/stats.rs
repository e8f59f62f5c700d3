//! The forwarder's own counters, to tell "the agent sent nothing" from "the
//! forwarder lost it". One [`metrics!`] table (kind, help, label enum) makes
//! [`Stats`], [`Snapshot`], the JSON summary and the Prometheus page. Relaxed
//! atomics: read for reporting, never for decisions. Stages count via `events`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::ser::{Serialize, SerializeMap, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one while the guard lives, so an early return cannot leave
    /// the gauge high.
    pub fn hold(&self) -> GaugeGuard<'_> {
        self.add(1);
        GaugeGuard(self)
    }
}

pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.sub(1);
    }
}

/// An enum whose variants label a metric family (`NAME`: `reason`, `kind`).
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    const NAME: &'static str;
    fn as_str(self) -> &'static str;
    fn index(self) -> usize;
}

const FAMILY_MAX: usize = 8;

#[derive(Debug)]
pub struct Family<L> {
    values: [AtomicU64; FAMILY_MAX],
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Default for Family<L> {
    fn default() -> Self {
        const { assert!(L::ALL.len() <= FAMILY_MAX) };
        Family {
            values: Default::default(),
            _label: std::marker::PhantomData,
        }
    }
}

impl<L: Label> Family<L> {
    pub fn add(&self, label: L, n: u64) {
        if let Some(v) = self.values.get(label.index()) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn inc(&self, label: L) {
        self.add(label, 1);
    }

    pub fn snapshot(&self) -> FamilySnapshot<L> {
        FamilySnapshot {
            values: self.values.each_ref().map(|v| v.load(Ordering::Relaxed)),
            _label: std::marker::PhantomData,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilySnapshot<L> {
    values: [u64; FAMILY_MAX],
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Default for FamilySnapshot<L> {
    fn default() -> Self {
        Family::default().snapshot()
    }
}

impl<L: Label> FamilySnapshot<L> {
    pub fn get(&self, label: L) -> u64 {
        self.values.get(label.index()).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        L::ALL.iter().map(|l| self.get(*l)).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        L::ALL.iter().map(|l| (l.as_str(), self.get(*l)))
    }
}

macro_rules! label {
    ($(#[$meta:meta])* pub enum $name:ident as $label:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),* }

        impl $crate::stats::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),*];
            const NAME: &'static str = $label;
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label! {
    /// Why a frame did not decode.
    pub enum DecodeErrorKind as "kind" {
        Json = "json",
        Bincode = "bincode",
        UnknownFormat = "unknown_format",
        InvalidIds = "invalid_ids",
        Empty = "empty",
    }
}

label! {
    /// Why spans were dropped.
    pub enum DropReason as "reason" {
        /// Export failed for good (retries used up, no spool took them).
        Export = "export",
        /// Shutdown ran out of time, and no spool took them.
        Shutdown = "shutdown",
        /// The collector refused them for good.
        Rejected = "rejected",
        /// A span larger, alone, than the collector takes in one request.
        TooLarge = "too_large",
    }
}

label! {
    /// Which of its limits a sandbox ran into.
    pub enum LimitReason as "reason" {
        /// `--sandbox-max-connections` were open: a connection was closed.
        Connections = "connections",
        /// Over `--sandbox-spans-per-second`: reading paused.
        Rate = "rate",
        /// Over its share of the queue while others held room: reading paused.
        QueueShare = "queue_share",
    }
}

pub struct Field {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub value: Value,
}

pub enum Value {
    Scalar(u64),
    /// The label's name, and each of its values with its count.
    Family(&'static str, Vec<(&'static str, u64)>),
}

macro_rules! metric_type {
    ($kind:ident) => { $kind };
    (Counter $label:ty) => { Family<$label> };
}
macro_rules! snapshot_type {
    ($kind:ident) => { u64 };
    ($kind:ident $label:ty) => { FamilySnapshot<$label> };
}
macro_rules! snapshot_of {
    ($m:expr) => {
        $m.get()
    };
    ($m:expr, $label:ty) => {
        $m.snapshot()
    };
}
macro_rules! field_value {
    ($v:expr) => {
        Value::Scalar($v)
    };
    ($v:expr, $label:ty) => {
        Value::Family(<$label as Label>::NAME, $v.iter().collect())
    };
}

macro_rules! metrics {
    ($(#[doc = $help:literal] $kind:ident $name:ident $(by $label:ty)?;)*) => {
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $help] pub $name: metric_type!($kind $($label)?),)*
        }

        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Snapshot {
            $(#[doc = $help] pub $name: snapshot_type!($kind $($label)?),)*
        }

        impl Stats {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: snapshot_of!(self.$name $(, $label)?),)* }
            }
        }

        impl Snapshot {
            pub fn fields(&self) -> Vec<Field> {
                vec![$(Field {
                    name: stringify!($name),
                    help: $help.trim(),
                    kind: Kind::$kind,
                    value: field_value!(self.$name $(, $label)?),
                },)*]
            }
        }
    };
}

metrics! {
    /// Agent connections currently open.
    Gauge connections_open;
    /// Open agent connections whose slow agent is read at the shared tick rather than on every write.
    Gauge connections_paced;
    /// Agent connections accepted since start.
    Counter connections_accepted;
    /// Connections closed at once because `--max-connections` were open.
    Counter connections_rejected;
    /// Frames read off agent connections.
    Counter frames_received;
    /// Payload bytes read off agent connections.
    Counter bytes_received;
    /// Frames whose length prefix exceeded `--max-frame-size` (connection closed).
    Counter frames_oversized;
    /// Connections that ended in the middle of a frame.
    Counter frames_truncated;
    /// Bytes skipped to reach the next whole frame on a connection restored from systemd's file descriptor store after a crash.
    Counter bytes_skipped;
    /// Spans decoded from agent frames.
    Counter spans_received;
    /// JSON-format spans decoded.
    Counter spans_json;
    /// Bincode-format spans decoded.
    Counter spans_bincode;
    /// Frames that did not decode as a span (skipped), by kind.
    Counter decode_errors by DecodeErrorKind;
    /// Spans accepted by the collector (or written in dump mode).
    Counter spans_exported;
    /// Spans the collector reported as rejected in a partial success.
    Counter spans_rejected;
    /// Spans dropped, by reason.
    Counter spans_dropped by DropReason;
    /// Spans written to the spool.
    Counter spans_spooled;
    /// Spooled spans later delivered.
    Counter spans_unspooled;
    /// Batches the spool had no room for.
    Counter spool_full;
    /// Spool files found damaged and set aside.
    Counter spool_damaged;
    /// Bytes in the spool now.
    Gauge spool_bytes;
    /// Batches in the spool now.
    Gauge spool_files;
    /// Spans waiting in the export queue now.
    Gauge queue_depth;
    /// Export requests sent, retries included.
    Counter export_attempts;
    /// Export attempts that were retries.
    Counter export_retries;
    /// Export batches given up on.
    Counter export_failures;
    /// Connection I/O errors.
    Counter io_errors;
    /// Times a sandbox ran into one of its own limits, by limit.
    Counter sandbox_limited by LimitReason;
    /// Spans whose agent claimed a host-owned resource attribute (kata.sandbox.id, kata.vsock.cid) with a value the host does not confirm; kept under kata.guest.claimed.*.
    Counter spans_guest_claims;
}

/// The JSON summary: flat, one key a value, a family as its total under its
/// own name and each value under `<name>_<label value>`.
impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for f in self.fields() {
            match f.value {
                Value::Scalar(v) => map.serialize_entry(f.name, &v)?,
                Value::Family(_, values) => {
                    let total: u64 = values.iter().map(|(_, v)| v).sum();
                    map.serialize_entry(f.name, &total)?;
                    for (label, v) in values {
                        map.serialize_entry(&format!("{}_{label}", f.name), &v)?;
                    }
                }
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_count_by_label_and_sum_to_their_total() {
        let stats = Stats::default();
        stats.spans_dropped.add(DropReason::Shutdown, 2);
        stats.spans_dropped.inc(DropReason::Export);
        stats.decode_errors.inc(DecodeErrorKind::Bincode);
        let snap = stats.snapshot();
        assert_eq!(snap.spans_dropped.get(DropReason::Shutdown), 2);
        assert_eq!(snap.spans_dropped.get(DropReason::Rejected), 0);
        assert_eq!(snap.spans_dropped.total(), 3);
        let json = serde_json::to_value(snap).unwrap();
        assert_eq!(json["spans_dropped"], 3);
        assert_eq!(json["spans_dropped_shutdown"], 2);
        assert_eq!(json["decode_errors"], 1);
        assert_eq!(json["decode_errors_bincode"], 1);
        assert_eq!(json["decode_errors_unknown_format"], 0);
    }

    #[test]
    fn a_held_gauge_goes_back_down() {
        let stats = Stats::default();
        {
            let _a = stats.connections_open.hold();
            let _b = stats.connections_open.hold();
            assert_eq!(stats.connections_open.get(), 2);
        }
        assert_eq!(stats.connections_open.get(), 0);
    }
}
