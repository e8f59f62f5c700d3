//! The forwarder's own counters.
//!
//! Every stage counts what passes through it and, above all, what it drops
//! and why, so that an operator can tell "the agent sent nothing" from "the
//! forwarder lost it". Counters are plain relaxed atomics: they are read for
//! reporting, never used to make decisions.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($(#[$doc:meta] $name:ident),* $(,)?) => {
        /// Live counters, shared by every task.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[$doc] pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct Snapshot {
            $(#[$doc] pub $name: u64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

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
    /// Frames that did not decode as a span in either format (skipped).
    decode_errors,
    /// Spans accepted by the collector (or written in dump mode).
    spans_exported,
    /// Spans the collector reported as rejected in a partial success.
    spans_rejected,
    /// Spans dropped because export failed for good.
    spans_dropped_export,
    /// Spans dropped because shutdown ran out of time.
    spans_dropped_shutdown,
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

impl Snapshot {
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_export + self.spans_dropped_shutdown
    }
}
