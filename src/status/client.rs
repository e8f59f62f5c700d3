//! The client's end of `status`: find the hand-off sockets and ask each
//! at once, bounded in time and in the answer's size.

use super::*;

type Answer = Result<Report, StatusError>;

/// Asks the forwarder at `path` within `timeout` in all; what it returns waits for the answer.
fn start(path: &Path, timeout: Duration) -> impl FnOnce() -> Answer {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_owned();
    // A connect to a full backlog blocks without a timeout: the exchange
    // runs on a thread given up on in time (it ends with its timeouts).
    std::thread::spawn(move || {
        let _ = tx.send(exchange(&p, timeout));
    });
    let (path, until) = (path.to_owned(), std::time::Instant::now() + timeout);
    move || {
        let left = until.saturating_duration_since(std::time::Instant::now());
        rx.recv_timeout(left)
            .unwrap_or(Err(StatusError::Timeout { path, timeout }))
    }
}

pub(super) fn exchange(path: &Path, timeout: Duration) -> Answer {
    use std::io::ErrorKind;
    let p = || path.to_owned();
    let mut s = UnixStream::connect(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            StatusError::NotListening { path: p() }
        }
        ErrorKind::PermissionDenied => StatusError::Denied { path: p() },
        _ => StatusError::Connect { path: p(), source },
    })?;
    let closed = |source: std::io::Error| match source.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
            StatusError::NoAnswer { path: p() }
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => StatusError::Timeout { path: p(), timeout },
        _ => StatusError::Read { path: p(), source },
    };
    s.set_read_timeout(Some(timeout)).map_err(closed)?;
    s.set_write_timeout(Some(timeout)).map_err(closed)?;
    s.write_all(&REQUEST).map_err(closed)?;
    let mut buf = Vec::new();
    s.take(MAX_REPORT as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(closed)?;
    if buf.is_empty() {
        return Err(StatusError::NoAnswer { path: p() });
    }
    let undecodable = |reason| StatusError::Decode { path: p(), reason };
    if buf.len() > MAX_REPORT {
        return Err(undecodable(format!("larger than {MAX_REPORT} bytes")));
    }
    serde_json::from_slice(&buf).map_err(|e| undecodable(e.to_string()))
}

/// Most sockets one `status` asks: far more forwarders than a host runs.
const MAX_SOCKETS: usize = 256;

/// What `status` asks: one socket, or every one in `dir`.
pub enum Target<'a> {
    Socket(&'a Path),
    Discover(&'a Path),
}

/// Asks each forwarder `target` names (in a directory, its hand-off sockets,
/// `handoff-*.sock`: see [`discovered`]).
pub fn gather(target: Target<'_>, timeout: Duration) -> Vec<Answer> {
    let dir = match target {
        Target::Socket(path) => return vec![start(path, timeout)()],
        Target::Discover(dir) => dir,
    };
    let mut found: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            let dir = dir.to_owned();
            return vec![Err(StatusError::ListDir { dir, source })];
        }
    };
    found.retain(|p| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        name.starts_with("handoff-") && name.ends_with(".sock")
    });
    found.sort();
    // At once: one that does not answer costs the others nothing.
    let asking: Vec<_> = found
        .iter()
        .take(MAX_SOCKETS)
        .map(|p| start(p, timeout))
        .collect();
    discovered(asking.into_iter().map(|wait| wait()).collect(), dir)
}

/// What asking every socket in `dir` came to: dead sockets (of a killed
/// forwarder) passed over, one denial for all, none live: `NotRunning`.
pub(super) fn discovered(asked: Vec<Answer>, dir: &Path) -> Vec<Answer> {
    use StatusError::{Denied, NotListening};
    let denied = asked.iter().any(|r| matches!(r, Err(Denied { .. })));
    let mut out: Vec<_> = asked
        .into_iter()
        .filter(|r| !matches!(r, Err(NotListening { .. } | Denied { .. })))
        .collect();
    let dir = dir.to_owned();
    if denied {
        out.push(Err(StatusError::Denied { path: dir.clone() }));
    }
    if out.is_empty() {
        out.push(Err(StatusError::NotRunning { dir }));
    }
    out
}
