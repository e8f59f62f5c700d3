//! What a predecessor handed over, for listeners that are made as they go.
//!
//! In hybrid and VSOCK modes the listeners are fixed, and a successor
//! serves the handed-over ones as they are ([`super::Listeners::from_taken`]).
//! Template mode and `--kata-host` make their listeners as sandboxes and
//! configurations come and go, so a successor starts its watchers as at any
//! start, and each, where it would bind, asks here first: a sandbox socket
//! whose sandbox is still there and whose file is still the very one that
//! was bound is served on, with its live connections and their half-read
//! frames; so is a VSOCK listener on the same CID and port. What nobody
//! claims once everything has started (the sandbox went during the
//! hand-over, no configuration asks for it any more) is closed, its
//! connections with it, and logged: the same as would have happened to it
//! in the predecessor.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::hybrid::HybridListener;
use super::vsock::VsockListener;
use super::{Adopted, ListenError};
use crate::addr::VsockCid;
use crate::handover::{TakenConn, TakenListener};

/// A sandbox's socket, handed over and not yet claimed.
struct Sandbox {
    id: String,
    fd: OwnedFd,
    identity: (u64, u64),
    connections: Vec<Adopted>,
}

/// A VSOCK listener, handed over and not yet claimed.
struct Vsock {
    listener: VsockListener,
    cid: VsockCid,
    port: u32,
    connections: Vec<Adopted>,
}

#[derive(Default)]
struct Pool {
    /// By socket path: where a template's watcher would bind.
    sandboxes: HashMap<PathBuf, Sandbox>,
    vsock: Vec<Vsock>,
    /// Single-socket hybrid listeners (a predecessor started in another
    /// mode): nothing here claims them.
    other: Vec<(HybridListener, Vec<Adopted>)>,
}

/// The handed-over listeners and connections, until claimed.
#[derive(Default)]
pub(crate) struct Inherited {
    pool: Mutex<Pool>,
}

impl Inherited {
    /// Sorts what was taken by listener. Within the main runtime: the
    /// connections are registered with it here.
    pub(crate) fn new(
        listeners: Vec<TakenListener>,
        connections: Vec<TakenConn>,
    ) -> Result<Inherited, ListenError> {
        let mut by_listener: Vec<Vec<Adopted>> = listeners.iter().map(|_| Vec::new()).collect();
        for c in connections {
            let a = Adopted::from_taken(c)?;
            match by_listener.get_mut(a.listener) {
                Some(v) => v.push(a),
                None => tracing::warn!("a handed-over connection without its listener; closed"),
            }
        }
        let mut pool = Pool::default();
        for (l, connections) in listeners.into_iter().zip(by_listener) {
            match l {
                TakenListener::Sandbox {
                    fd,
                    id,
                    path,
                    identity,
                } => {
                    pool.sandboxes.insert(
                        path,
                        Sandbox {
                            id,
                            fd,
                            identity,
                            connections,
                        },
                    );
                }
                TakenListener::Vsock { fd, cid, port } => {
                    let cid = cid.map_or(VsockCid::Any, VsockCid::Cid);
                    pool.vsock.push(Vsock {
                        listener: VsockListener::adopt(fd, cid, port),
                        cid,
                        port,
                        connections,
                    });
                }
                TakenListener::Hybrid {
                    fd,
                    path,
                    identity,
                    janitor,
                } => {
                    let l = HybridListener::adopt(fd, path, identity, janitor)
                        .map_err(|e| ListenError::AdoptSocket(e.to_string()))?;
                    pool.other.push((l, connections));
                }
            }
        }
        Ok(Inherited {
            pool: Mutex::new(pool),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The socket at `path` and its connections, if it was handed over and
    /// the file there is still the one bound. Within the main runtime.
    pub(crate) fn take_sandbox(
        &self,
        path: &Path,
    ) -> Option<Result<(HybridListener, Vec<Adopted>), ListenError>> {
        let s = self.lock().sandboxes.remove(path)?;
        let still = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == s.identity);
        if !still {
            tracing::warn!(
                sandbox = %s.id,
                path = %path.display(),
                connections = s.connections.len(),
                "a handed-over sandbox socket was replaced meanwhile; closing its connections"
            );
            return None;
        }
        Some(
            HybridListener::adopt(s.fd, path.to_owned(), s.identity, None)
                .map(|l| (l, s.connections))
                .map_err(|e| ListenError::AdoptSocket(e.to_string())),
        )
    }

    /// The VSOCK listener on `cid` and `port`, if one was handed over.
    pub(crate) fn take_vsock(
        &self,
        cid: VsockCid,
        port: u32,
    ) -> Option<(VsockListener, Vec<Adopted>)> {
        let mut pool = self.lock();
        let at = pool
            .vsock
            .iter()
            .position(|v| v.cid == cid && v.port == port)?;
        let v = pool.vsock.swap_remove(at);
        Some((v.listener, v.connections))
    }

    /// Closes whatever nobody claimed. A sandbox socket is left in place:
    /// its sandbox is going (or its watcher will bind it again), and
    /// removing it is the watcher's to decide.
    pub(crate) fn close_unclaimed(&self) {
        let pool = std::mem::take(&mut *self.lock());
        for (path, s) in pool.sandboxes {
            tracing::warn!(
                sandbox = %s.id,
                path = %path.display(),
                connections = s.connections.len(),
                "a handed-over sandbox is no longer served (its directory went, or no template names it); closing it"
            );
        }
        for v in pool.vsock {
            tracing::warn!(
                listener = %v.listener.describe(),
                connections = v.connections.len(),
                "a handed-over VSOCK listener is no longer asked for; closing it"
            );
        }
        for (l, connections) in pool.other {
            tracing::warn!(
                path = %l.path().display(),
                connections = connections.len(),
                "a handed-over hybrid socket is not served in this mode; closing it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox_socket(path: &Path) -> TakenListener {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        let md = std::fs::symlink_metadata(path).unwrap();
        TakenListener::Sandbox {
            fd: OwnedFd::from(l),
            id: "a".into(),
            path: path.to_owned(),
            identity: (md.dev(), md.ino()),
        }
    }

    /// A handed-over socket is served on only while its file is the one
    /// bound; claimed once; and what is left is closed, its file left to
    /// the watcher.
    #[tokio::test]
    async fn a_sandbox_socket_is_claimed_only_while_still_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, replaced, left) = (
            dir.path().join("kept"),
            dir.path().join("replaced"),
            dir.path().join("left"),
        );
        let taken = vec![
            sandbox_socket(&kept),
            sandbox_socket(&replaced),
            sandbox_socket(&left),
        ];
        let inherited = Inherited::new(taken, Vec::new()).unwrap();
        std::fs::remove_file(&replaced).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&replaced).unwrap());

        let (l, conns) = inherited.take_sandbox(&kept).unwrap().unwrap();
        assert!(conns.is_empty());
        assert!(
            std::os::unix::net::UnixStream::connect(&kept).is_ok(),
            "still listening"
        );
        assert!(inherited.take_sandbox(&kept).is_none(), "claimed once");
        assert!(
            inherited.take_sandbox(&replaced).is_none(),
            "another file now"
        );
        assert!(inherited.take_vsock(VsockCid::Any, 1).is_none());

        inherited.close_unclaimed();
        assert!(
            std::os::unix::net::UnixStream::connect(&left).is_err(),
            "closed"
        );
        assert!(left.exists(), "its file is the watcher's to remove");
        drop(l);
        assert!(!kept.exists(), "served on, and removed by its new owner");
    }
}
