//! How the collector has answered lately, for `status` (noted per request).

use super::{cut, error_chain, lock, ExportError};

/// Longest error text kept for `status`.
const MAX_ERROR_TEXT: usize = 512;

#[derive(Default)]
pub(crate) struct Health(std::sync::Mutex<HealthSnapshot>);

/// When a request last went through, and when the last one failed and why
/// (milliseconds since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthSnapshot {
    pub last_success_unix_ms: Option<u64>,
    pub last_failure: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub at_unix_ms: u64,
    pub error: String,
}

pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Health {
    pub(super) fn note<T>(&self, res: &Result<T, ExportError>) {
        let now = unix_ms(std::time::SystemTime::now());
        match res {
            Ok(_) => lock(&self.0).last_success_unix_ms = Some(now),
            Err(e) => {
                let error = cut(error_chain(e), MAX_ERROR_TEXT);
                lock(&self.0).last_failure = Some(Failure {
                    at_unix_ms: now,
                    error,
                });
            }
        }
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        lock(&self.0).clone()
    }
}
