//! What `status` prints: the report as a table for a person, or JSON lines.

use super::*;

/// `status`: each forwarder's report to `out` (a table, or JSON lines),
/// each error to `err`; whether every forwarder asked answered.
pub fn print(
    target: Target<'_>,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<bool> {
    let (mut all, mut gap) = (true, "");
    for r in gather(target, CLIENT_TIMEOUT) {
        match r {
            Ok(report) if json => {
                serde_json::to_writer(&mut *out, &report)?;
                writeln!(out)?;
            }
            Ok(report) => {
                write!(out, "{gap}{report}")?;
                gap = "\n";
            }
            Err(e) => {
                all = false;
                writeln!(err, "error: {e}")?;
            }
        }
    }
    out.flush()?;
    Ok(all)
}

/// The table a person reads.
impl std::fmt::Display for Report {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.now_unix_ms;
        let up = duration(Duration::from_secs(self.uptime_seconds));
        let (version, pid, socket) = (clean(&self.version), self.pid, self.socket.display());
        writeln!(
            out,
            "kata-trace-forwarder {version} (pid {pid}), up {up}, asked at {socket}"
        )?;
        writeln!(out, "listening on:")?;
        for l in &self.listeners {
            writeln!(out, "  {}", clean(l))?;
        }
        writeln!(out)?;
        if self.sandboxes.is_empty() {
            writeln!(out, "sandboxes: none served yet")?;
        } else {
            let head =
                "SANDBOX,CONNECTIONS,RECEIVED,EXPORTED,SPOOLED,PENDING,LAST SENT,DROPPED,LIMITED";
            let mut rows = vec![head.split(',').map(String::from).collect()];
            for s in &self.sandboxes {
                rows.push(vec![
                    clean(&s.sandbox),
                    format!("{}/{}", s.connections, s.max_connections),
                    s.received.to_string(),
                    s.exported.to_string(),
                    s.spooled.to_string(),
                    s.pending.to_string(),
                    since(now, s.last_sent_unix_ms),
                    by_reason(&s.dropped, "0"),
                    by_reason(&s.limited, "-"),
                ]);
            }
            columns(out, &rows)?;
            if self.sandboxes_not_listed > 0 {
                writeln!(out, "... and {} more sandboxes", self.sandboxes_not_listed)?;
            }
        }
        let e = &self.exporter;
        writeln!(out, "\nexporter: {}", clean(&e.collector))?;
        let success = since(now, e.health.last_success_unix_ms);
        writeln!(out, "  last success: {success}")?;
        if let Some(f) = &e.health.last_failure {
            let at = since(now, Some(f.at_unix_ms));
            writeln!(out, "  last failure: {at}: {}", clean(&f.error))?;
        }
        let (attempts, retries, failures) = (e.attempts, e.retries, e.failures);
        writeln!(
            out,
            "  requests: {attempts} ({retries} retries, {failures} batches given up)"
        )?;
        let (pending, queued) = (e.pending_spans, e.queue_spans);
        writeln!(out, "  in memory: {pending} spans ({queued} in the queue, the rest being sent or waiting for room)")?;
        match &e.spool {
            Some(s) => {
                let (batches, spans, dir) = (s.batches, s.spans, s.dir.display());
                let (used, max) = (bytes(s.bytes), bytes(s.max_bytes));
                writeln!(
                    out,
                    "  spool: {batches} batches, {spans} spans, {used} of {max} in {dir}"
                )?
            }
            None => writeln!(out, "  spool: none (--spool-dir not given)")?,
        }
        let t = |k: &str| self.counters.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let dropped: Vec<String> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), t(&format!("spans_dropped_{}", r.as_str()))))
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let dropped = match dropped.is_empty() {
            true => String::new(),
            false => format!(" ({})", dropped.join(", ")),
        };
        let (received, exported) = (t("spans_received"), t("spans_exported"));
        let (rejected, spooled) = (t("spans_rejected"), t("spans_spooled"));
        let (unspooled, total) = (t("spans_unspooled"), t("spans_dropped"));
        writeln!(
            out,
            "totals: received {received}, exported {exported}, rejected {rejected}, spooled {spooled}, sent from the spool {unspooled}, dropped {total}{dropped}"
        )
    }
}

/// Rows as columns, each as wide as its widest cell.
fn columns(out: &mut std::fmt::Formatter<'_>, rows: &[Vec<String>]) -> std::fmt::Result {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: String = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `total (reason n, ...)` for the reasons not 0; `none` for a 0 total.
pub(super) fn by_reason(b: &ByReason, none: &str) -> String {
    if b.total == 0 {
        return none.to_owned();
    }
    let parts: Vec<String> = b
        .reasons
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{} {n}", clean(r)))
        .collect();
    format!("{} ({})", b.total, parts.join(", "))
}

/// How long before `now` (Unix milliseconds) `at` was.
pub(super) fn since(now: u64, at: Option<u64>) -> String {
    let ago = |at| duration(Duration::from_millis(now.saturating_sub(at)));
    at.map_or("never".into(), |at| format!("{} ago", ago(at)))
}

/// A duration in its two largest units: `0.4s`, `12s`, `3m 5s`, `4d 2h`.
pub(super) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..10 => format!("{:.1}s", d.as_secs_f64()),
        10..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Bytes in binary units, one decimal.
pub(super) fn bytes(n: u64) -> String {
    let i = (n.max(1).ilog2() / 10).min(4);
    let units = ["KiB", "MiB", "GiB", "TiB"];
    match (i as usize).checked_sub(1).and_then(|j| units.get(j)) {
        Some(unit) => format!("{:.1} {unit}", n as f64 / 1024f64.powi(i as i32)),
        None => format!("{n} B"),
    }
}

/// Safe for a terminal: a sandbox's name, a collector's error are others' text.
pub(super) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
