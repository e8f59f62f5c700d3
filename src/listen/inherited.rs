//! What a predecessor left, handed over (takeover, upgrade) or in systemd's
//! fd store (restart, crash), asked for first wherever we would bind. A Unix
//! socket still the very file bound (or a VSOCK listener on the same CID and
//! port) is served on; else it is closed and bound anew; its connections are
//! served either way. What nobody claims once all has started is closed.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::hybrid::HybridListener;
use super::vsock::VsockListener;
use super::{Adopted, ListenError};
use crate::addr::VsockCid;
use crate::handover::fdstore::{self, Left};
use crate::handover::wire::{ConnState, ListenerKind};
use crate::handover::{TakenConn, TakenListener};

/// A Unix listener's fd, identity and janitor's pipe.
struct UnixSocket(OwnedFd, (u64, u64), Option<OwnedFd>);

/// Handed over at one socket path (no listener if only connections were kept).
#[derive(Default)]
struct Unix {
    /// The sandbox, when a template's.
    id: Option<String>,
    listener: Option<UnixSocket>,
    connections: Vec<Adopted>,
}

#[derive(Default)]
struct Vsock {
    listener: Option<VsockListener>,
    connections: Vec<Adopted>,
}

/// By where a listener would bind: socket path, VSOCK port.
#[derive(Default)]
struct Pool {
    unix: HashMap<PathBuf, Unix>,
    vsock: HashMap<u32, Vsock>,
}

impl Pool {
    fn put(&mut self, l: TakenListener, connections: Vec<Adopted>) {
        let (path, id, identity) = match l.kind {
            ListenerKind::Sandbox { id, path, identity } => (path, Some(id), identity),
            ListenerKind::Hybrid { path, identity } => (path, None, identity),
            ListenerKind::Vsock { cid, port } => {
                let cid = cid.map_or(VsockCid::Any, VsockCid::Cid);
                let v = self.vsock.entry(port).or_default();
                // The hand-over checked it is a listening AF_VSOCK socket.
                v.listener = Some(VsockListener {
                    listener: l.fd.into(),
                    cid,
                    port,
                });
                v.connections.extend(connections);
                return;
            }
            // Takeover keeps the hand-off socket apart.
            ListenerKind::Handoff { .. } => return,
        };
        let socket = UnixSocket(l.fd, identity, l.janitor);
        let u = self.unix.entry(path).or_default();
        u.id = u.id.take().or(id);
        u.listener = Some(socket);
        u.connections.extend(connections);
    }
}

/// The handed-over listeners and connections, until claimed.
#[derive(Default)]
pub(crate) struct Inherited(Mutex<Pool>);

impl Inherited {
    /// Within the main runtime, which the connections are registered with.
    pub(crate) fn new(
        listeners: Vec<TakenListener>,
        connections: Vec<TakenConn>,
    ) -> Result<Inherited, ListenError> {
        let mut by_listener: Vec<Vec<Adopted>> = listeners.iter().map(|_| Vec::new()).collect();
        for c in connections {
            match by_listener.get_mut(c.listener) {
                Some(v) => v.push(Adopted::new(c.fd, c.state)?),
                None => tracing::warn!("a handed-over connection without its listener; closed"),
            }
        }
        let mut pool = Pool::default();
        for (l, connections) in listeners.into_iter().zip(by_listener) {
            pool.put(l, connections);
        }
        Ok(Inherited(Mutex::new(pool)))
    }

    /// Connections resume at their next whole frame (the one in hand is lost).
    pub(crate) fn from_store(left: Vec<Left>) -> Result<Inherited, ListenError> {
        let lost = |fd, cid| {
            let resume = ConnState {
                cid,
                lost: true,
                ..ConnState::default()
            };
            Adopted::new(fd, resume)
        };
        let mut pool = Pool::default();
        for l in left {
            match l {
                Left::Listener(l) => pool.put(l, Vec::new()),
                Left::UnixConnection { fd, path } => {
                    let a = lost(fd, None)?;
                    pool.unix.entry(path).or_default().connections.push(a);
                }
                Left::VsockConnection { fd, cid, port } => {
                    let a = lost(fd, Some(cid))?;
                    pool.vsock.entry(port).or_default().connections.push(a);
                }
            }
        }
        Ok(Inherited(Mutex::new(pool)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its listener, if still the file bound (else closed), and connections.
    pub(crate) fn take_unix(&self, path: &Path) -> Option<(Option<HybridListener>, Vec<Adopted>)> {
        let u = self.lock().unix.remove(path)?;
        let listener = u.listener.and_then(|s| {
            if !crate::janitor::still_bound(path, s.1) {
                tracing::warn!(
                    sandbox = u.id.as_deref().unwrap_or(""),
                    path = %path.display(),
                    "a handed-over socket was removed or replaced meanwhile; binding anew"
                );
                forget_listener(&s);
                return None;
            }
            let adopted = HybridListener::adopt(s.0, path.to_owned(), s.1, s.2);
            if let Err(e) = &adopted {
                tracing::warn!(path = %path.display(), error = %e, "serving a handed-over socket; binding anew");
            }
            adopted.ok()
        });
        Some((listener, u.connections))
    }

    /// Its listener, if on `cid` (else closed), and connections at `port`.
    pub(crate) fn take_vsock(
        &self,
        cid: VsockCid,
        port: u32,
    ) -> Option<(Option<VsockListener>, Vec<Adopted>)> {
        let mut v = self.lock().vsock.remove(&port)?;
        if let Some(l) = v.listener.take_if(|l| l.cid != cid) {
            fdstore::forget(fdstore::listener_name(l.listener.as_fd(), None));
        }
        Some((v.listener, v.connections))
    }

    /// Closes whatever nobody claimed, in systemd's store too: a connection
    /// nobody reads must not stay open. Socket files stay (the watcher's).
    pub(crate) fn close_unclaimed(&self) {
        let pool = std::mem::take(&mut *self.lock());
        for (path, u) in pool.unix {
            if u.listener.is_none() && u.connections.is_empty() {
                continue;
            }
            tracing::warn!(
                sandbox = u.id.as_deref().unwrap_or(""),
                path = %path.display(),
                connections = u.connections.len(),
                "a handed-over socket is no longer served here (its sandbox went, or nothing asks for it); closing it"
            );
            u.listener.iter().for_each(forget_listener);
            u.connections.iter().for_each(Adopted::forget);
        }
        for (port, v) in pool.vsock {
            tracing::warn!(
                port,
                connections = v.connections.len(),
                "a handed-over VSOCK listener is no longer asked for; closing it"
            );
            if let Some(l) = &v.listener {
                fdstore::forget(fdstore::listener_name(l.listener.as_fd(), None));
            }
            v.connections.iter().for_each(Adopted::forget);
        }
    }
}

/// The one way a hybrid socket is made: inherited if it may be, else bound.
pub(crate) fn hybrid(
    inherited: Option<&Arc<Inherited>>,
    path: &Path,
) -> Result<(HybridListener, Vec<Adopted>), ListenError> {
    let taken = inherited.and_then(|i| i.take_unix(path));
    let (l, adopted) = taken.unwrap_or_default();
    Ok((l.map_or_else(|| HybridListener::bind(path), Ok)?, adopted))
}

/// The one way a VSOCK listener is made: inherited if it may be, else bound.
pub(crate) fn vsock(
    inherited: Option<&Arc<Inherited>>,
    cid: VsockCid,
    port: u32,
) -> Result<(VsockListener, Vec<Adopted>), ListenError> {
    let taken = inherited.and_then(|i| i.take_vsock(cid, port));
    let (l, adopted) = taken.unwrap_or_default();
    let l = l.map_or_else(|| VsockListener::bind(cid, port), Ok)?;
    Ok((l, adopted))
}

/// Takes an unserved Unix listener out of systemd's store.
fn forget_listener(s: &UnixSocket) {
    fdstore::forget(fdstore::listener_name(s.0.as_fd(), Some(s.1)));
    if s.2.is_some() {
        fdstore::forget(fdstore::janitor_name(s.0.as_fd()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sandbox_socket(path: &Path) -> TakenListener {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        let md = std::fs::symlink_metadata(path).unwrap();
        TakenListener {
            fd: OwnedFd::from(l),
            kind: ListenerKind::Sandbox {
                id: "a".into(),
                path: path.to_owned(),
                identity: (md.dev(), md.ino()),
            },
            janitor: None,
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

        let (l, conns) = inherited.take_unix(&kept).unwrap();
        let l = l.expect("still its file");
        assert!(conns.is_empty());
        assert!(
            std::os::unix::net::UnixStream::connect(&kept).is_ok(),
            "still listening"
        );
        assert!(inherited.take_unix(&kept).is_none(), "claimed once");
        let (gone, _) = inherited.take_unix(&replaced).unwrap();
        assert!(gone.is_none(), "another file now: bound anew");
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
