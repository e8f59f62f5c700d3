//! What `status` prints: the report as a table a person reads, or as JSON
//! lines.

use super::*;

/// `status`: asks each forwarder `target` names and writes its report to
/// `out` (a table, or with `json` one JSON object a line), and each error
/// as one line to `err`. Whether every forwarder asked answered.
pub fn print(
    target: Target<'_>,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<bool> {
    let mut all = true;
    let mut first = true;
    for r in gather(target, CLIENT_TIMEOUT) {
        match r {
            Ok(report) if json => {
                serde_json::to_writer(&mut *out, &report)?;
                writeln!(out)?;
            }
            Ok(report) => {
                if !first {
                    writeln!(out)?;
                }
                first = false;
                out.write_all(report.table().as_bytes())?;
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

impl Report {
    /// The report as a person reads it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let now = self.now_unix_ms;
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(
            &mut out,
            format!(
                "kata-trace-forwarder {} (pid {}), up {}, asked at {}",
                clean(&self.version),
                self.pid,
                duration(Duration::from_secs(self.uptime_seconds)),
                self.socket.display()
            ),
        );
        line(&mut out, "listening on:".into());
        for l in &self.listeners {
            line(&mut out, format!("  {}", clean(l)));
        }
        out.push('\n');
        if self.sandboxes.is_empty() {
            line(&mut out, "sandboxes: none served yet".into());
        } else {
            let mut rows = vec![[
                "SANDBOX",
                "CONNECTIONS",
                "RECEIVED",
                "EXPORTED",
                "SPOOLED",
                "PENDING",
                "LAST SENT",
                "DROPPED",
                "LIMITED",
            ]
            .map(String::from)
            .to_vec()];
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
            out.push_str(&columns(&rows));
            if self.sandboxes_not_listed > 0 {
                line(
                    &mut out,
                    format!("... and {} more sandboxes", self.sandboxes_not_listed),
                );
            }
        }
        out.push('\n');
        let e = &self.exporter;
        line(&mut out, format!("exporter: {}", clean(&e.collector)));
        line(
            &mut out,
            format!("  last success: {}", since(now, e.last_success_unix_ms)),
        );
        if let Some(f) = &e.last_failure {
            line(
                &mut out,
                format!(
                    "  last failure: {}: {}",
                    since(now, Some(f.at_unix_ms)),
                    clean(&f.error)
                ),
            );
        }
        line(
            &mut out,
            format!(
                "  requests: {} ({} retries, {} batches given up)",
                e.attempts, e.retries, e.failures
            ),
        );
        line(
            &mut out,
            format!(
                "  in memory: {} spans ({} in the queue, the rest being sent or waiting for room)",
                e.pending_spans, e.queue_spans
            ),
        );
        match &e.spool {
            Some(s) => line(
                &mut out,
                format!(
                    "  spool: {} batches, {} spans, {} of {} in {}",
                    s.batches,
                    s.spans,
                    bytes(s.bytes),
                    bytes(s.max_bytes),
                    s.dir.display()
                ),
            ),
            None => line(&mut out, "  spool: none (--spool-dir not given)".into()),
        }
        let c = |k: &str| self.counters.get(k).and_then(serde_json::Value::as_u64);
        let dropped: Vec<String> = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let n = c(&format!("spans_dropped_{}", r.as_str()))?;
                (n > 0).then(|| format!("{} {n}", r.as_str()))
            })
            .collect();
        line(
            &mut out,
            format!(
                "totals: received {}, exported {}, rejected {}, spooled {}, sent from the spool {}, dropped {}{}",
                c("spans_received").unwrap_or(0),
                c("spans_exported").unwrap_or(0),
                c("spans_rejected").unwrap_or(0),
                c("spans_spooled").unwrap_or(0),
                c("spans_unspooled").unwrap_or(0),
                c("spans_dropped").unwrap_or(0),
                match dropped.is_empty() {
                    true => String::new(),
                    false => format!(" ({})", dropped.join(", ")),
                }
            ),
        );
        out
    }
}

/// Rows as columns, each as wide as its widest cell; the last is not
/// padded.
pub(super) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `total (reason n, ...)` for the reasons that are not 0; `none` when
/// the total is.
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
    match at {
        None => "never".into(),
        Some(at) => format!(
            "{} ago",
            duration(Duration::from_millis(now.saturating_sub(at)))
        ),
    }
}

/// A duration in the two largest units that matter: `0.4s`, `12s`,
/// `3m 5s`, `2h 3m`, `4d 2h`.
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
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// What the forwarder sent, safe for a terminal: a sandbox's name comes
/// from a directory anyone with a sandbox may name, and an error's text
/// from the collector.
pub(super) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
