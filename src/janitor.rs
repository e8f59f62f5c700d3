//! The socket janitor: a helper process that removes a socket on behalf of
//! a forwarder no longer root.
//!
//! Hybrid VSOCK sockets and the hand-off socket live in directories of
//! root's, and the forwarder drops root once they are bound (see
//! `listen::privileges`). So before dropping, it starts a janitor: itself,
//! re-executed in a mode that only waits on a pipe. When the forwarder says
//! `remove`, or dies and the pipe closes, the janitor removes the socket if
//! it is still the very file we bound (same device and inode) and exits. It
//! reads nothing from guests and ignores SIGTERM and SIGINT, so a signal to
//! the whole process group cannot make it leave the socket behind. Its pipe
//! travels with the socket in a hand-over. A module of its own because both
//! `listen` and `handover` keep one, and neither should know the other.

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// First argument that selects janitor mode in the binary.
pub const JANITOR_ARG: &str = "__socket-janitor";

/// The privileged helper that removes a socket on our behalf. A forwarder
/// that took over from another holds only its pipe: the janitor is the
/// first forwarder's child, and outlives each hand-over as long as some
/// forwarder holds the pipe's writing end.
pub(crate) struct Janitor {
    child: Option<Child>,
    stdin: Option<std::fs::File>,
}

impl Janitor {
    pub(crate) fn spawn(path: &Path, identity: (u64, u64)) -> io::Result<Janitor> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(JANITOR_ARG)
            .arg(path)
            .arg(identity.0.to_string())
            .arg(identity.1.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .map(|s: ChildStdin| std::fs::File::from(std::os::fd::OwnedFd::from(s)));
        Ok(Janitor {
            child: Some(child),
            stdin,
        })
    }

    /// The janitor a predecessor handed over: its pipe.
    pub(crate) fn adopt(pipe: std::os::fd::OwnedFd) -> Janitor {
        Janitor {
            child: None,
            stdin: Some(std::fs::File::from(pipe)),
        }
    }

    pub(crate) fn pipe(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.stdin.as_ref().map(AsFd::as_fd)
    }

    /// Asks for the socket to be removed now and waits, briefly, until it is.
    pub(crate) fn remove_now(mut self, timeout: Duration) -> bool {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"remove\n");
        }
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            // Not our child: the caller checks the socket is gone.
            return true;
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return false,
            }
        }
    }
}

/// Entry point of janitor mode: `JANITOR_ARG <path> <dev> <ino>`.
pub fn janitor_main(args: &[OsString]) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal::*};
    // Single-threaded at this point, so blocking the signals for this thread
    // blocks them for the process.
    let _ = SigSet::from_iter([SIGTERM, SIGINT, SIGHUP]).thread_block();

    let num = |i: usize| args.get(i)?.to_str()?.parse::<u64>().ok();
    let (Some(path), Some(dev), Some(ino)) = (args.first().map(PathBuf::from), num(1), num(2))
    else {
        eprintln!("{JANITOR_ARG}: usage: {JANITOR_ARG} <path> <dev> <ino>");
        return ExitCode::from(2);
    };
    // Any line, or end of input (the forwarder is gone), means: clean up.
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
    let ours = std::fs::symlink_metadata(&path).is_ok_and(|md| (md.dev(), md.ino()) == (dev, ino));
    if ours {
        if let Err(e) = std::fs::remove_file(&path) {
            eprintln!("{JANITOR_ARG}: removing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
