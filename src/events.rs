//! What the forwarder tells its operator: each event logs and counts in one
//! call (vector's `internal_events` pattern), so neither comes without the
//! other. Lines that count nothing stay plain `tracing` calls.

use std::fmt;
use std::time::Duration;

use crate::addr::Peer;
use crate::ingest::Ingest;
use crate::stats::{DropReason, Label, Stats};
use crate::tenant::{LimitReason, Noisy, Tenant, Tenants};
use crate::wire::{DecodeError, FrameError, WireFormat};

/// The sandbox's label, if its log gate lets a line of `kind` through.
fn gated(tenant: Option<&Tenant>, kind: Noisy) -> Option<&str> {
    let sandbox = tenant.map_or("", Tenant::label);
    tenant
        .is_none_or(|t| t.log.allow(kind, sandbox))
        .then_some(sandbox)
}

/// Decode errors a connection logs before it only counts them.
pub(crate) const LOGGED_DECODE_ERRORS: u64 = 5;

impl Stats {
    pub(crate) fn frames_read(&self, frames: u64, bytes: u64) {
        self.frames_received.add(frames);
        self.bytes_received.add(bytes);
    }

    /// Counted before queued: never more exported than received.
    pub(crate) fn spans_decoded(&self, format: Option<WireFormat>, spans: u64) {
        self.spans_received.add(spans);
        match format {
            Some(WireFormat::Json) => self.spans_json.add(spans),
            Some(WireFormat::Bincode) => self.spans_bincode.add(spans),
            None => {}
        }
    }

    /// `attempt` counts from 1.
    pub(crate) fn export_attempt(&self, attempt: u32) {
        self.export_attempts.inc();
        if attempt > 1 {
            self.export_retries.inc();
        }
    }

    /// By a connection restored after a crash, to the next whole frame;
    /// logged once, when the frame is found (`total`).
    pub(crate) fn skipped_bytes(&self, peer: Peer, bytes: u64, total: Option<u64>) {
        self.bytes_skipped.add(bytes);
        if let Some(skipped) = total {
            tracing::warn!(%peer, skipped, "restored connection: skipped to the next whole frame");
        }
    }

    pub(crate) fn spool_was_full(&self, spans: u64) {
        self.spool_full.inc();
        tracing::warn!(spans, "spool is full (--spool-max-bytes)");
    }

    /// `damaged`: set aside as `.damaged` (wrong bytes), not unreadable.
    pub(crate) fn spool_file_skipped(&self, error: &dyn fmt::Display, damaged: bool) {
        if damaged {
            self.spool_damaged.inc();
        }
        tracing::error!(error = %error, "skipping spool file");
    }

    /// `nth`: this connection's how-manieth decode error this is.
    pub(crate) fn frame_skipped(
        &self,
        peer: Peer,
        tenant: Option<&Tenant>,
        error: &DecodeError,
        frame_len: usize,
        nth: u64,
    ) {
        let kind = error.kind();
        self.decode_errors.inc(kind);
        let gate = (nth <= LOGGED_DECODE_ERRORS).then(|| gated(tenant, Noisy::Undecodable));
        if let Some(sandbox) = gate.flatten() {
            tracing::warn!(%peer, sandbox, %error, kind = kind.as_str(), frame_len, "skipping frame that does not decode");
        }
    }

    /// A resource claimed host-owned attributes the host does not confirm:
    /// logged when a connection's resource changes (`new_claims` is 0 when
    /// it was seen before), counted per span.
    pub(crate) fn guest_claimed(
        &self,
        peer: Peer,
        tenant: Option<&Tenant>,
        new_claims: u32,
        spans: u64,
    ) {
        self.spans_guest_claims.add(spans);
        let gate = (new_claims > 0).then(|| gated(tenant, Noisy::Claim));
        if let Some(sandbox) = gate.flatten() {
            tracing::warn!(%peer, sandbox, claims = new_claims, "agent resource claims host-owned attributes; the host's values are used, the claims kept under kata.guest.claimed.*");
        }
    }

    /// Gated, so that a guest that connects in a loop cannot flood the log.
    pub(crate) fn connection_rejected(
        &self,
        peer: Peer,
        tenant: Option<&Tenant>,
        tenants: &Tenants,
        refusal: Refusal,
    ) {
        self.connections_rejected.inc();
        if let (Some(t), Refusal::Sandbox { .. }) = (tenant, refusal) {
            t.limited.inc(LimitReason::Connections);
            self.sandbox_limited.inc(LimitReason::Connections);
        }
        let sandbox = tenant.map_or("", Tenant::label);
        let gate = tenant.map_or(&tenants.overflow, |t| &t.log);
        if !gate.allow(Noisy::Refused, sandbox) {
            return;
        }
        match refusal {
            Refusal::Global { max_connections } => {
                tracing::warn!(%peer, sandbox, max_connections, "connection limit reached; closing new connection")
            }
            Refusal::Sandbox { max_connections } => {
                tracing::warn!(%peer, sandbox, max_connections, "sandbox connection limit reached (--sandbox-max-connections); closing new connection")
            }
            Refusal::Sandboxes { max_sandboxes } => {
                tracing::warn!(%peer, max_sandboxes, "too many sandboxes (--max-sandboxes); closing new connection")
            }
        }
    }
}

impl Tenant {
    /// Counted against its own sandbox only.
    pub(crate) fn span_too_large(&self, bytes: usize, error: &dyn fmt::Display) {
        self.dropped.inc(DropReason::TooLarge);
        if let Some(sandbox) = gated(Some(self), Noisy::TooLarge) {
            tracing::warn!(sandbox, bytes, %error, "span larger than the collector takes in one request; dropped");
        }
    }

    pub(crate) fn agent_connected(&self, peer: Peer) {
        if let Some(sandbox) = gated(Some(self), Noisy::Connected) {
            tracing::info!(%peer, sandbox, "agent connected");
        }
    }

    pub(crate) fn throttled(&self, stats: &Stats, reason: LimitReason, wait: Duration) {
        self.limited.inc(reason);
        stats.sandbox_limited.inc(reason);
        if let Some(sandbox) = gated(Some(self), Noisy::Throttled) {
            tracing::info!(
                sandbox,
                reason = reason.as_str(),
                wait = ?wait,
                "sandbox over its limit; pausing its reads"
            );
        }
    }

    /// `end`: an error if the agent cut a frame short, or reading failed.
    pub(crate) fn agent_disconnected(
        &self,
        stats: &Stats,
        peer: Peer,
        ingest: &Ingest,
        end: Result<(), &FrameError>,
    ) {
        let (spans, decode_errors) = (ingest.spans(), ingest.decode_errors());
        let format = ingest.format().map_or("none", WireFormat::as_str);
        if let Err(e) = end {
            match e {
                FrameError::Oversized { .. } => stats.frames_oversized.inc(),
                FrameError::Truncated { .. } => stats.frames_truncated.inc(),
                FrameError::Read(_) => stats.io_errors.inc(),
            }
        }
        let Some(sandbox) = gated(Some(self), Noisy::Disconnected) else {
            return;
        };
        match end {
            Ok(()) => {
                tracing::info!(%peer, sandbox, spans, decode_errors, format, "agent disconnected")
            }
            Err(e) => {
                tracing::warn!(%peer, sandbox, spans, decode_errors, format, error = %e, "closing agent connection")
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    Global { max_connections: usize },
    Sandbox { max_connections: usize },
    Sandboxes { max_sandboxes: usize },
}

/// Where a batch of spans ended up: the one place delivery is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// `rejected` of them refused in a partial success.
    Delivered {
        rejected: u64,
    },
    Spooled,
    Dropped(DropReason),
}

pub(crate) struct BatchDone<'a> {
    pub spans: u64,
    pub delivery: Delivery,
    pub attempts: u32,
    /// The last error, when not delivered.
    pub error: Option<&'a dyn fmt::Display>,
    pub from_spool: bool,
}

impl BatchDone<'_> {
    pub(crate) fn emit(self, stats: &Stats) {
        let (spans, attempts, from_spool) = (self.spans, self.attempts, self.from_spool);
        let error = self.error.map(|e| e.to_string()).unwrap_or_default();
        match self.delivery {
            Delivery::Delivered { rejected } => {
                let rejected = rejected.min(spans);
                stats.spans_rejected.add(rejected);
                stats.spans_exported.add(spans - rejected);
                if from_spool {
                    stats.spans_unspooled.add(spans);
                    tracing::info!(spans, "sent spooled batch");
                } else {
                    tracing::debug!(spans, attempts, "batch exported");
                }
            }
            Delivery::Spooled => {
                stats.spans_spooled.add(spans);
                tracing::warn!(%error, spans, attempts, "collector unavailable; batch spooled");
            }
            Delivery::Dropped(reason) => {
                stats.export_failures.inc();
                stats.spans_dropped.add(reason, spans);
                match reason {
                    DropReason::Rejected => {
                        tracing::error!(%error, spans, from_spool, "collector rejected the batch for good; spans dropped")
                    }
                    DropReason::Export => {
                        tracing::error!(%error, spans, attempts, "giving up on batch; spans dropped")
                    }
                    DropReason::Shutdown => {
                        tracing::error!(%error, spans, attempts, "shutdown deadline reached; spans dropped")
                    }
                    // Logged per sandbox, gated: `Tenant::span_too_large`.
                    DropReason::TooLarge => {
                        tracing::debug!(%error, spans, "span too large for the collector dropped")
                    }
                }
            }
        }
    }
}
