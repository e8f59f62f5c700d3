//! The socket janitor, our binary re-executed as root to wait on a pipe: on
//! `remove`, or when the pipe closes (the forwarder died), it removes the
//! socket if still the very file bound. It reads nothing from guests, and
//! blocks the stop signals sent to the process group: the socket never stays.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The first argument that selects janitor mode.
pub const JANITOR_ARG: &str = "__socket-janitor";

const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// A forwarder that took over holds only the pipe: the janitor is the
/// first one's child, living while some forwarder holds the writing end.
pub(crate) struct Janitor {
    child: Option<Child>,
    pub(crate) pipe: Option<ChildStdin>,
}

impl Janitor {
    pub(crate) fn spawn(path: &Path, identity: (u64, u64)) -> io::Result<Janitor> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(JANITOR_ARG)
            .arg(path)
            .args([identity.0, identity.1].map(|n| n.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Janitor {
            pipe: child.stdin.take(),
            child: Some(child),
        })
    }

    pub(crate) fn adopt(pipe: std::os::fd::OwnedFd) -> Janitor {
        Janitor {
            child: None,
            pipe: Some(ChildStdin::from(pipe)),
        }
    }

    /// Has the socket at `path` removed, waiting at most [`REMOVE_WAIT`] for our
    /// child to end, or for the file to go (one taken over); warns if it stays.
    pub(crate) fn remove(mut self, path: &Path, identity: (u64, u64)) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"remove\n");
        }
        let deadline = Instant::now() + REMOVE_WAIT;
        let done = loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => break status.success(),
                None if !still_bound(path, identity) => break true,
                Some(Ok(None)) | None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => break false,
            }
        };
        if !done || still_bound(path, identity) {
            tracing::warn!(path = %path.display(), "socket janitor did not confirm removal");
        }
    }
}

/// Whether the file at `path` is still the one bound as `identity` (device, inode).
pub(crate) fn still_bound(path: &Path, identity: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|md| (md.dev(), md.ino()) == identity)
}

/// Entry point of janitor mode: `JANITOR_ARG <path> <dev> <ino>`.
pub fn janitor_main(args: &[OsString]) -> ExitCode {
    // Single-threaded: blocked for this thread is blocked for the process.
    crate::shutdown::block_stop_signals();
    let num = |i: usize| args.get(i)?.to_str()?.parse::<u64>().ok();
    let (Some(path), Some(dev), Some(ino)) = (args.first().map(PathBuf::from), num(1), num(2))
    else {
        eprintln!("{JANITOR_ARG}: usage: {JANITOR_ARG} <path> <dev> <ino>");
        return ExitCode::from(2);
    };
    // Any line, or end of input (the forwarder is gone), means: clean up.
    let _ = io::stdin().read_line(&mut String::new());
    if still_bound(&path, (dev, ino)) {
        if let Err(e) = std::fs::remove_file(&path) {
            eprintln!("{JANITOR_ARG}: removing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
