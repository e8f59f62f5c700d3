//! Hybrid VSOCK (Cloud Hypervisor, Firecracker): the VMM relays a guest
//! connection to port P as a plain connection (no handshake) to the Unix
//! socket `<socket-path>_P`. The care is in the file: the directory must
//! exist, a stale socket is replaced, a live one is left to its owner, a
//! non-socket is never deleted, and ours is removed at the end if still ours.
//!
//! Look and bind happen under an exclusive `flock` on the directory (adding
//! no file to it): else of two starts over one stale socket, the second
//! would remove the first's new socket. Removal goes through the directory,
//! open while served, so one moved away does not keep the socket behind.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::fstatat;
use nix::unistd::{unlinkat, UnlinkatFlags};
use tokio::net::UnixListener;

use super::ListenError;
use crate::janitor::{still_bound, Janitor};

pub struct HybridListener {
    pub(crate) listener: UnixListener,
    pub(crate) path: PathBuf,
    /// Device and inode of the socket we made: only that file is removed.
    pub(crate) identity: (u64, u64),
    /// Set once root is about to be dropped: removal is then its job.
    janitor: Option<Janitor>,
    /// The socket's directory, wherever it moves (`None`: removal by the path).
    dir: Option<OwnedFd>,
}

const LOCK_WAIT: Duration = Duration::from_secs(5);

impl HybridListener {
    /// Binds `path` (already `<socket-path>_<port>`).
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(ListenError::MissingDirectory { dir });
        }
        // Locked for the look and the bind, waited for `LOCK_WAIT` at most:
        // anyone who can open the directory can hold the lock.
        let what = || format!("locking {} to bind a socket in it", dir.display());
        let err = |e: nix::errno::Errno| ListenError::SocketPath(what(), e.into());
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = nix::fcntl::open(&dir, flags, nix::sys::stat::Mode::empty()).map_err(err)?;
        let deadline = Instant::now() + LOCK_WAIT;
        let locked = loop {
            match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    fd = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((_, e)) => return Err(err(e)),
            }
        };
        let (p, shown) = (|| path.to_path_buf(), path.display());
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse { path: p() });
                }
                tracing::info!(path = %path.display(), "replacing stale socket");
                let removed = std::fs::remove_file(path);
                let what = format!("removing stale socket {shown}");
                removed.map_err(|e| ListenError::SocketPath(what, e))?;
            }
            Ok(_) => return Err(ListenError::NotASocket { path: p() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ListenError::SocketPath(format!("inspecting {shown}"), e)),
        }
        let bind_err = |e| ListenError::SocketPath(format!("binding Unix socket {shown}"), e);
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
        // Kept for removal; if unlocking fails the fd closes (unlocked too).
        let dir = locked.unlock().ok();
        Ok(Self {
            listener,
            path: p(),
            identity: (md.dev(), md.ino()),
            janitor: None,
            dir,
        })
    }

    pub(crate) fn adopt(
        fd: OwnedFd,
        path: PathBuf,
        identity: (u64, u64),
        janitor: Option<OwnedFd>,
    ) -> io::Result<Self> {
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let dir = path
            .parent()
            .and_then(|d| nix::fcntl::open(d, flags, nix::sys::stat::Mode::empty()).ok());
        Ok(Self {
            listener: UnixListener::from_std(std)?,
            path,
            identity,
            janitor: janitor.map(Janitor::adopt),
            dir,
        })
    }

    /// Stops serving, leaving the socket file to a successor.
    pub(crate) fn release(mut self) {
        // Our pipe closes unsaid: the successor holds a duplicate.
        self.janitor = None;
        // Removal off: the drop sees no file of ours to remove.
        self.identity = (u64::MAX, u64::MAX);
    }

    /// Before this process loses the right to remove the socket.
    pub(crate) fn hand_removal_to_janitor(&mut self) -> Result<(), ListenError> {
        if self.janitor.is_none() {
            let janitor = Janitor::spawn(&self.path, self.identity);
            self.janitor = Some(janitor.map_err(ListenError::StartJanitor)?);
        }
        Ok(())
    }

    pub(crate) fn janitor_pipe(&self) -> Option<BorrowedFd<'_>> {
        self.janitor.as_ref()?.pipe.as_ref().map(AsFd::as_fd)
    }

    /// Removes the socket if still ours, through its directory when open (it may have moved).
    fn remove_if_ours(&self) -> io::Result<bool> {
        let (Some(dir), Some(name)) = (self.dir.as_ref(), self.path.file_name()) else {
            return match still_bound(&self.path, self.identity) {
                true => std::fs::remove_file(&self.path).map(|()| true),
                false => Ok(false),
            };
        };
        let ours = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| (st.st_dev, st.st_ino) == self.identity);
        if ours {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
        }
        Ok(ours)
    }
}

impl Drop for HybridListener {
    fn drop(&mut self) {
        if let Some(janitor) = self.janitor.take() {
            return janitor.remove(&self.path, self.identity);
        }
        match self.remove_if_ours() {
            Ok(true) => tracing::debug!(path = %self.path.display(), "removed socket"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove socket")
            }
        }
    }
}
