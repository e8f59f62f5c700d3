//! The replayer: spooled batches go to the collector, oldest first,
//! whenever it answers again, on the export's retry policy.

use super::*;

/// How often an idle replayer looks for batches it does not know of.
const SPOOL_RESCAN: Duration = Duration::from_secs(10);

/// Runs until shutdown begins (what is left stays for the next run).
pub(crate) async fn run_replayer(exporter: Arc<Exporter>, shutdown: Shutdown) {
    let Some(spool) = exporter.spool.clone() else {
        return;
    };
    let stats = &*exporter.stats;
    // The export's policy from 250 ms up to 10 s, with no total: the
    // batches wait on disk for as long as the collector is away.
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(10),
        ..retry::EXPORT
    };
    let mut backoff = Backoff::new(&policy);
    loop {
        if shutdown.is_stopping() {
            return;
        }
        let Some(seq) = spool.oldest() else {
            tokio::select! {
                _ = exporter.spooled.notified() => continue,
                // Batches another process wrote (a predecessor's).
                _ = tokio::time::sleep(SPOOL_RESCAN) => {
                    let s = Arc::clone(&spool);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.rescan()).await {
                        tracing::warn!(error = %e, "looking through the spool directory");
                    }
                    continue;
                }
                _ = shutdown.stopping() => return,
            }
        };
        let reader = Arc::clone(&spool);
        let (spans, body) = match tokio::task::spawn_blocking(move || reader.read(seq)).await {
            Ok(Ok(Some(b))) => b,
            // Another process claimed it, and sends it.
            Ok(Ok(None)) => continue,
            Ok(Err(ref error)) => {
                stats.spool_file_skipped(error, matches!(error, spool::SpoolError::Damaged { .. }));
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "spool reader task failed");
                return;
            }
        };
        let claim = spool::Claimed(&spool, seq);
        let spans = u64::from(spans);
        let done = |spans, delivery, error: Option<&ExportError>| {
            BatchDone {
                spans,
                delivery,
                attempts: 1,
                error: error.map(|e| e as &dyn std::fmt::Display),
                from_spool: true,
            }
            .emit(stats);
        };
        stats.export_attempt(1);
        let (delivery, error) = match exporter.send(&body).await {
            Ok(resp) => (delivered(&resp), None),
            // Too large for this collector (spooled under a larger bound):
            // its halves are spooled instead (halved again if need be).
            Err(e) if e.retry() == Retry::TooLarge && spans > 1 => match halves_of(&body) {
                Some(halves) => {
                    claim.settle();
                    tracing::debug!(
                        spans,
                        "spooled batch too large for the collector; its halves spooled instead"
                    );
                    for (body, n) in halves {
                        if !exporter.spool_batch(body, n).await {
                            done(n, Delivery::Dropped(DropReason::Export), Some(&e));
                        }
                    }
                    continue;
                }
                None => (Delivery::Dropped(e.drop_reason()), Some(e)),
            },
            Err(e) => match backoff.after(e.retry()) {
                None => (Delivery::Dropped(e.drop_reason()), Some(e)),
                Some(wait) => {
                    tracing::debug!(error = %e, retry_in = ?wait, "collector still unavailable for spooled batches");
                    drop(claim);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.stopping() => return,
                    }
                    continue;
                }
            },
        };
        claim.settle();
        backoff.reset();
        done(spans, delivery, error.as_ref());
    }
}
