//! The forwarder's own counters.
//!
//! Every stage counts what passes through it and, above all, what it drops
//! and why, so that an operator can tell "the agent sent nothing" from "the
//! forwarder lost it". Counters are plain relaxed atomics: they are read for
//! reporting, never used to make decisions.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($(#[doc = $help:literal] $name:ident),* $(,)?) => {
        /// Live counters, shared by every task.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct Snapshot {
            $(#[doc = $help] pub $name: u64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Snapshot {
            /// Every counter as (name, help, value), in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help.trim(), self.$name),)*]
            }
        }
    };
}

/// Counters that go up and down rather than only up.
pub const GAUGES: &[&str] = &[
    "connections_open",
    "spool_bytes",
    "spool_files",
    "queue_depth",
];

counters! {
    /// Agent connections currently open.
    connections_open,
    /// Agent connections accepted since start.
    connections_total,
    /// Connections closed at once because `--max-connections` were open.
    connections_rejected,
    /// Frames read off agent connections.
    frames_received,
    /// Payload bytes read off agent connections.
    bytes_received,
    /// Frames whose length prefix exceeded `--max-frame-size` (connection closed).
    frames_oversized,
    /// Connections that ended in the middle of a frame.
    frames_truncated,
    /// Spans decoded from agent frames.
    spans_received,
    /// JSON-format spans decoded.
    spans_json,
    /// Bincode-format spans decoded.
    spans_bincode,
    /// Frames that did not decode as a span (skipped), all kinds.
    decode_errors,
    /// ... of which: not valid JSON / not a JSON SpanData.
    decode_errors_json,
    /// ... of which: not a bincode SpanData.
    decode_errors_bincode,
    /// ... of which: neither format.
    decode_errors_unknown_format,
    /// ... of which: all-zero trace or span id.
    decode_errors_invalid_ids,
    /// ... of which: empty payload.
    decode_errors_empty,
    /// Spans accepted by the collector (or written in dump mode).
    spans_exported,
    /// Spans the collector reported as rejected in a partial success.
    spans_rejected,
    /// Spans dropped because export failed for good.
    spans_dropped_export,
    /// Spans dropped because shutdown ran out of time (and no spool took them).
    spans_dropped_shutdown,
    /// Spans dropped because the collector refused them for good.
    spans_dropped_rejected,
    /// Spans written to the spool.
    spans_spooled,
    /// Spooled spans later delivered.
    spans_unspooled,
    /// Batches the spool had no room for.
    spool_full,
    /// Spool files found damaged and set aside.
    spool_damaged,
    /// Bytes in the spool now.
    spool_bytes,
    /// Batches in the spool now.
    spool_files,
    /// Spans waiting in the export queue now.
    queue_depth,
    /// Export requests sent, retries included.
    export_attempts,
    /// Export attempts that were retries.
    export_retries,
    /// Export batches given up on.
    export_failures,
    /// Connection I/O errors.
    io_errors,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn set_spool(&self, bytes: u64, files: usize) {
        self.spool_bytes.store(bytes, Ordering::Relaxed);
        self.spool_files.store(files as u64, Ordering::Relaxed);
    }

    /// Counts a decode error under its kind.
    pub fn decode_error(&self, kind: &str) {
        Self::inc(&self.decode_errors);
        let by_kind = match kind {
            "json" => &self.decode_errors_json,
            "bincode" => &self.decode_errors_bincode,
            "invalid_ids" => &self.decode_errors_invalid_ids,
            "empty" => &self.decode_errors_empty,
            _ => &self.decode_errors_unknown_format,
        };
        Self::inc(by_kind);
    }
}

impl Snapshot {
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_export + self.spans_dropped_shutdown + self.spans_dropped_rejected
    }
}
