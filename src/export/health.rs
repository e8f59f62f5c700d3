//! How the collector has answered lately, for `status`: one store per
//! request, never per span.

use super::{cut, error_chain, lock, ExportError};

/// Longest error text kept for `status`.
const MAX_ERROR_TEXT: usize = 512;

#[derive(Default)]
pub(crate) struct Health {
    /// When a request last went through, in milliseconds since the Unix
    /// epoch (0: never).
    last_success: std::sync::atomic::AtomicU64,
    /// The last failed request: when (as above), and why.
    last_failure: std::sync::Mutex<Option<(u64, String)>>,
}

/// What [`Health`] says now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HealthSnapshot {
    pub last_success_unix_ms: Option<u64>,
    pub last_failure: Option<(u64, String)>,
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Health {
    pub(super) fn note<T>(&self, res: &Result<T, ExportError>) {
        let now = unix_ms(std::time::SystemTime::now());
        match res {
            Ok(_) => self
                .last_success
                .store(now, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                *lock(&self.last_failure) = Some((now, cut(error_chain(e), MAX_ERROR_TEXT)));
            }
        }
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        let ok = self.last_success.load(std::sync::atomic::Ordering::Relaxed);
        HealthSnapshot {
            last_success_unix_ms: (ok > 0).then_some(ok),
            last_failure: lock(&self.last_failure).clone(),
        }
    }
}
