//! systemd's file descriptor store: agent connections that outlive the
//! process, through a crash or a `systemctl restart`.
//!
//! With `FileDescriptorStoreMax=` (systemd 254+ then sets `$FDSTORE`),
//! systemd keeps every listener, janitor pipe and agent connection we give
//! it, by name, and passes them to the next process. It keeps one copy of an
//! open file however often given, so giving what a predecessor gave is
//! harmless. Names come from the descriptor (its socket's inode), so any
//! holder names it alike:
//!
//! ```text
//! ktf-l-<sock-ino>                  a VSOCK listener
//! ktf-l-<sock-ino>-<dev>-<ino>      a Unix listener, and the device and
//!                                   inode of the file it was bound as
//! ktf-j-<sock-ino>                  the janitor's pipe of that listener
//! ktf-c-<sock-ino>                  an agent connection
//! ```
//!
//! A connection that ends is removed (systemd would keep the agent's stream
//! open); one handed over or left at `SIGTERM` ([`crate::shutdown::Mode::Store`])
//! stays; one taken back after a crash is read from its next whole frame.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use nix::sys::socket::{getsockname, SockaddrStorage, VsockAddr};
use sd_notify::NotifyState;

use super::wire::ListenerKind;
use super::TakenListener;

const LISTENER: &str = "ktf-l-";
const JANITOR: &str = "ktf-j-";
const CONNECTION: &str = "ktf-c-";

/// Whether systemd keeps descriptors for this service.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET").is_some()
            && std::env::var("FDSTORE").is_ok_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0))
    })
}

/// The same in every process holding `fd`.
fn sock_ino(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino)
}

pub(crate) fn connection_name(fd: BorrowedFd<'_>) -> Option<String> {
    Some(format!("{CONNECTION}{}", sock_ino(fd)?))
}

pub(crate) fn listener_name(fd: BorrowedFd<'_>, identity: Option<(u64, u64)>) -> Option<String> {
    let file = identity.map_or(String::new(), |(dev, ino)| format!("-{dev}-{ino}"));
    Some(format!("{LISTENER}{}{file}", sock_ino(fd)?))
}

pub(crate) fn janitor_name(listener: BorrowedFd<'_>) -> Option<String> {
    Some(format!("{JANITOR}{}", sock_ino(listener)?))
}

/// Has systemd let go of `name` (of a descriptor not kept), if the store is on.
pub(crate) fn forget(name: Option<String>) {
    if let Some(name) = name.as_deref().filter(|_| enabled()) {
        let msg = [NotifyState::FdStoreRemove, NotifyState::FdName(name)];
        if let Err(e) = sd_notify::notify(&msg) {
            tracing::warn!(name, error = %e, "could not take a descriptor out of systemd's store");
        }
    }
}

/// A descriptor kept in the store while this lives, or after [`keep`](Self::keep).
#[derive(Debug, Default)]
pub(crate) struct Stored(Option<String>);

impl Stored {
    fn new(fd: BorrowedFd<'_>, name: impl FnOnce() -> Option<String>) -> Stored {
        let name = enabled().then(name).flatten();
        if let Some(name) = name.as_deref() {
            let msg = [NotifyState::FdStore, NotifyState::FdName(name)];
            if let Err(e) = sd_notify::notify_with_fds(&msg, &[fd]) {
                tracing::warn!(name, error = %e, "could not give a descriptor to systemd's store");
            }
        }
        Stored(name)
    }

    pub(crate) fn connection(fd: BorrowedFd<'_>) -> Stored {
        Stored::new(fd, || connection_name(fd))
    }

    pub(crate) fn listener(fd: BorrowedFd<'_>, identity: Option<(u64, u64)>) -> Stored {
        Stored::new(fd, || listener_name(fd, identity))
    }

    pub(crate) fn janitor(listener: BorrowedFd<'_>, pipe: BorrowedFd<'_>) -> Stored {
        Stored::new(pipe, || janitor_name(listener))
    }

    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        forget(self.0.take());
    }
}

#[derive(Debug)]
pub(crate) enum Left {
    /// As a hand-over passes it (a Unix one with its stored janitor pipe).
    Listener(TakenListener),
    UnixConnection {
        fd: OwnedFd,
        path: PathBuf,
    },
    VsockConnection {
        fd: OwnedFd,
        cid: u32,
        port: u32,
    },
}

/// Takes back what the last process left under our names (call once, at
/// start); others, and ours no longer what their name says, are closed.
pub(crate) fn take_back() -> Vec<Left> {
    let passed = sd_notify::listen_fds_with_names()
        .inspect_err(|e| tracing::warn!(error = %e, "reading the descriptors systemd passed"))
        .into_iter()
        .flatten();
    let mut listeners = Vec::new();
    let mut janitors = Vec::new();
    let mut left = Vec::new();
    for (raw, name) in passed {
        // SAFETY: systemd passed it to this process, for this pid
        // (`listen_fds` checked `LISTEN_PID`), and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let kind = if name.starts_with(LISTENER) {
            take_listener(fd, &name).map(|l| listeners.push(l))
        } else if let Some(ino) = name.strip_prefix(JANITOR) {
            janitors.push((ino.to_owned(), fd));
            Some(())
        } else if name.starts_with(CONNECTION) {
            take_connection(fd).map(|c| left.push(c))
        } else {
            None
        };
        if kind.is_none() {
            tracing::warn!(
                name,
                "closing a descriptor systemd passed that is not one of ours"
            );
        }
    }
    for (ino, pipe) in janitors {
        let unix = |l: &TakenListener| matches!(l.kind, ListenerKind::Hybrid { .. });
        match listeners.iter_mut().find(|(i, l)| *i == ino && unix(l)) {
            Some((_, l)) => l.janitor = Some(pipe),
            // Closed: the janitor removes the socket, whose listener is gone.
            None => tracing::warn!("a socket janitor's pipe without its listener; closed"),
        }
    }
    left.extend(listeners.into_iter().map(|(_, l)| Left::Listener(l)));
    if !left.is_empty() {
        tracing::info!(
            descriptors = left.len(),
            "took back the listeners and agent connections systemd kept"
        );
    }
    left
}

fn take_listener(fd: OwnedFd, name: &str) -> Option<(String, TakenListener)> {
    let mut parts = name.strip_prefix(LISTENER)?.split('-');
    let ino = parts.next()?.to_owned();
    let identity = match (parts.next(), parts.next()) {
        (Some(dev), Some(file)) => Some((dev.parse().ok()?, file.parse().ok()?)),
        _ => None,
    };
    if sock_ino(std::os::fd::AsFd::as_fd(&fd))?.to_string() != ino {
        return None;
    }
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    let kind = if let Some(unix) = addr.as_unix_addr() {
        let (path, identity) = (unix.path()?.to_path_buf(), identity?);
        ListenerKind::Hybrid { path, identity }
    } else {
        let vsock: &VsockAddr = addr.as_vsock_addr()?;
        ListenerKind::Vsock {
            cid: Some(vsock.cid()).filter(|&c| c != crate::addr::VsockCid::ANY),
            port: vsock.port(),
        }
    };
    let janitor = None;
    Some((ino, TakenListener { fd, kind, janitor }))
}

fn take_connection(fd: OwnedFd) -> Option<Left> {
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    if let Some(unix) = local.as_unix_addr() {
        let path = unix.path()?.to_path_buf();
        return Some(Left::UnixConnection { fd, path });
    }
    let port = local.as_vsock_addr()?.port();
    let peer: SockaddrStorage = nix::sys::socket::getpeername(fd.as_raw_fd()).ok()?;
    let cid = peer.as_vsock_addr()?.cid();
    Some(Left::VsockConnection { fd, cid, port })
}
