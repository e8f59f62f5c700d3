//! Hybrid VSOCK (Cloud Hypervisor, Firecracker): a Unix socket per port.
//!
//! The VMM relays a guest connection to VSOCK port P as a plain connection
//! to the Unix socket `<socket-path>_P`, with no handshake (the `CONNECT`
//! handshake is only for host-initiated connections). So the listener is a
//! Unix socket, and the care is all in the file: the sandbox directory must
//! exist, a stale socket from a previous run is replaced, a live one is
//! left to its owner, anything that is not a socket is never deleted, and
//! the socket we made is removed when we stop, if it is still ours.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::privileges::Janitor;
use super::ListenError;

/// A listener's part of a hand-over: what it is, and duplicates of its
/// descriptors.
pub(crate) struct HandedListener {
    pub kind: crate::handover::wire::ListenerKind,
    pub fd: std::os::fd::OwnedFd,
    pub janitor: Option<std::os::fd::OwnedFd>,
}

pub struct HybridListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket we created: on exit, only that file
    /// is removed, never one another process put there since.
    identity: (u64, u64),
    /// Set once root is about to be dropped: removal is then its job.
    janitor: Option<Janitor>,
}

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
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                tracing::info!(path = %path.display(), "replacing stale socket");
                std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok(_) => {
                return Err(ListenError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ListenError::InspectPath {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let bind_err = |source| ListenError::BindUnix {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            identity: (md.dev(), md.ino()),
            janitor: None,
        })
    }

    /// A listener a previous forwarder bound and handed over, with its
    /// janitor's pipe when removal was the janitor's job.
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        path: PathBuf,
        identity: (u64, u64),
        janitor: Option<std::os::fd::OwnedFd>,
    ) -> io::Result<Self> {
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        Ok(Self {
            listener: UnixListener::from_std(std)?,
            path,
            identity,
            janitor: janitor.map(Janitor::adopt),
        })
    }

    /// What a successor needs to serve this listener: its path and
    /// identity, a duplicate of its socket and of its janitor's pipe.
    pub(crate) fn hand_over(&self) -> io::Result<HandedListener> {
        use std::os::fd::AsFd;
        let fd = self.listener.as_fd().try_clone_to_owned()?;
        let janitor = match self.janitor.as_ref().and_then(Janitor::pipe) {
            Some(p) => Some(p.try_clone_to_owned()?),
            None => None,
        };
        Ok(HandedListener {
            kind: crate::handover::wire::ListenerKind::Hybrid {
                path: self.path.clone(),
                identity: self.identity,
            },
            fd,
            janitor,
        })
    }

    /// Stops serving, leaving the socket file in place: a successor serves
    /// it now.
    pub(crate) fn release(mut self) {
        if let Some(j) = self.janitor.take() {
            j.release();
        }
        // Removal off: the drop sees no file of ours to remove.
        self.identity = (u64::MAX, u64::MAX);
    }

    /// Hands removal of the socket to a privileged janitor, for when this
    /// process is about to lose the right to remove it.
    pub(crate) fn hand_removal_to_janitor(&mut self) -> Result<(), ListenError> {
        let janitor =
            Janitor::spawn(&self.path, self.identity).map_err(|e| ListenError::DropPrivileges {
                user: String::new(),
                reason: format!("starting the socket janitor: {e}"),
            })?;
        self.janitor = Some(janitor);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    /// Device and inode of the socket file bound.
    pub(crate) fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// The janitor's pipe, when removal is the janitor's.
    pub(crate) fn janitor_pipe(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.janitor.as_ref().and_then(Janitor::pipe)
    }

    /// Has a janitor, or needs none.
    pub(crate) fn has_janitor(&self) -> bool {
        self.janitor.is_some()
    }

    pub(crate) async fn accept(&self) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
        self.listener.accept().await
    }
}

impl Drop for HybridListener {
    fn drop(&mut self) {
        if let Some(janitor) = self.janitor.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut done = janitor.remove_now(std::time::Duration::from_secs(2));
            // A janitor taken over is not our child: watch the file go.
            while done
                && std::time::Instant::now() < deadline
                && std::fs::symlink_metadata(&self.path)
                    .is_ok_and(|md| (md.dev(), md.ino()) == self.identity)
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            done &= !std::fs::symlink_metadata(&self.path)
                .is_ok_and(|md| (md.dev(), md.ino()) == self.identity);
            if !done {
                tracing::warn!(path = %self.path.display(), "socket janitor did not confirm removal");
            }
            return;
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|md| (md.dev(), md.ino()) == self.identity);
        if !ours {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed socket"),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove socket")
            }
        }
    }
}
