//! Handing live agent connections to the next forwarder process: the Kata
//! agent never dials again after a failed write, so a restart or upgrade
//! hands over the listening sockets, every live connection and what its
//! reader knows (the format, the bytes of a frame not yet whole). A new
//! forwarder with the same `--handoff-socket` connects before binding
//! anything ([`take_over`]); the old one ([`server`]) resumes where it
//! paused ([`hub`]) unless it gets the ack.
//!
//! ```text
//! new -> old   "KTFTAKE1"                      (8 bytes)
//! old -> new   'S', the state message, then its descriptors (wire, fds)
//!          or  'R', length (u32, big-endian, at most 4 KiB), reason (UTF-8)
//! new -> old   'A' once it holds everything and will serve it
//! ```

pub mod fds;
pub(crate) mod fdstore;
pub(crate) mod hub;
pub(crate) mod server;
mod takeover;
pub mod wire;

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::janitor::{still_bound, Janitor};
use hub::{Piece, PieceKind};

pub use server::{Reexec, Upgrade};
pub(crate) use takeover::*;

pub const REQUEST: [u8; 8] = *b"KTFTAKE1";
const STATE: u8 = b'S';
const REFUSED: u8 = b'R';
const ACK: u8 = b'A';
const MAX_REASON: usize = 4096;
/// How long a successor waits for the old process at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    #[error("not a kata-trace-forwarder hand-over state (magic {found:02x?}); refusing it")]
    ForeignState { found: Vec<u8> },
    #[error(
        "hand-over state version {found}, this forwarder reads version {}; refusing it",
        wire::VERSION
    )]
    UnsupportedVersion { found: u16 },
    #[error("hand-over state of {len} bytes is over the limit of {max}; refusing it")]
    StateTooLarge { len: u64, max: usize },
    #[error(
        "hand-over state checksum mismatch (sent {want:08x}, computed {got:08x}); refusing it"
    )]
    ChecksumMismatch { want: u32, got: u32 },
    #[error("decoding the hand-over state: {0}; refusing it")]
    DecodeState(String),
    #[error("checking the hand-over state: {0}; refusing it")]
    CheckState(String),
    #[error("encoding the hand-over state: {0}")]
    EncodeState(String),
    #[error("binding the hand-off socket {path}: {source}")]
    BindHandoff { path: PathBuf, source: io::Error },
    #[error("connecting to the hand-off socket {path}: {source}")]
    ConnectHandoff { path: PathBuf, source: io::Error },
    #[error("the hand-off socket was made by uid {uid} (pid {pid}), and we run as {ours}: not a forwarder we trust; refusing to take from it")]
    CheckPeer { uid: u32, pid: i32, ours: u32 },
    #[error("the running forwarder refused to hand over: {0}")]
    Refused(String),
    #[error("receiving the hand-over: {0}")]
    Receive(#[source] io::Error),
    #[error("sending the hand-over: {0}")]
    Send(#[source] io::Error),
    #[error("using a handed-over socket: {0}")]
    AdoptSocket(String),
}

impl wire::ConnState {
    /// Its piece once paused; `None` (refusing the hand-over) if its socket cannot be duplicated.
    pub(crate) fn piece(self, stream: &impl AsFd, listener: u64) -> Option<Piece> {
        let fd = stream.as_fd().try_clone_to_owned().inspect_err(
            |e| tracing::warn!(error = %e, "hand-over: duplicating a connection's socket"),
        );
        let what = PieceKind::Connection(listener, self);
        Some(Piece { what, fd: fd.ok()? })
    }
}

pub(crate) struct HandoffListener {
    listener: tokio::net::UnixListener,
    pub(crate) path: PathBuf,
    identity: (u64, u64),
    /// Ours to remove on drop: not a successor's, nor a predecessor's until acked.
    pub(crate) remove: bool,
    /// Started as root: removes the socket, which we no longer can.
    janitor: Option<Janitor>,
}

impl HandoffListener {
    /// Binds `path`, replacing a stale socket. Mode 0600, owned by `user`
    /// (when root: the user we become, whose `SIGHUP` successor connects).
    pub(crate) fn bind(path: &Path, user: Option<&str>) -> Result<HandoffListener, HandOverError> {
        let err = |source| HandOverError::BindHandoff {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            std::fs::create_dir_all(dir).map_err(err)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        let live = || std::os::unix::net::UnixStream::connect(path).is_ok();
        let refuse = |kind, why: &str| Err(err(io::Error::new(kind, why)));
        match std::fs::symlink_metadata(path) {
            // Never a running forwarder's: a second start (failing to bind
            // its listeners) would leave it unreachable for its upgrade.
            Ok(md) if md.file_type().is_socket() && live() => {
                let why =
                    "a running forwarder listens there (take over from it with --handoff-socket)";
                return refuse(io::ErrorKind::AddrInUse, why);
            }
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
            Ok(_) => return refuse(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        if let Some(Ok(Some(u))) = user.map(nix::unistd::User::from_name) {
            nix::unistd::chown(path, Some(u.uid), Some(u.gid)).map_err(|e| err(e.into()))?;
        }
        let md = std::fs::symlink_metadata(path).map_err(err)?;
        let identity = (md.dev(), md.ino());
        let root = user.is_some() && nix::unistd::getuid().is_root();
        let janitor = root.then(|| Janitor::spawn(path, identity)).transpose();
        Ok(HandoffListener {
            listener,
            path: path.to_owned(),
            identity,
            remove: true,
            janitor: janitor.map_err(err)?,
        })
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        match self.janitor.take() {
            // The janitor's pipe closes unsaid; it waits on the other holders.
            _ if !self.remove => {}
            Some(j) => j.remove(&self.path, self.identity),
            None if still_bound(&self.path, self.identity) => _ = std::fs::remove_file(&self.path),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdUnixStream;
    use wire::{ListenerKind, State};

    /// A stale hand-off socket (nobody listening) is replaced; a live one,
    /// a running forwarder's, never is, and its file stays.
    #[tokio::test]
    async fn a_live_hand_off_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let first = HandoffListener::bind(&path, None).expect("a stale one is replaced");
        let e = HandoffListener::bind(&path, None).map(drop).unwrap_err();
        assert!(
            e.to_string().contains("a running forwarder listens there"),
            "{e}"
        );
        assert!(path.exists(), "the running one's socket stays");
        drop(first);
        assert!(!path.exists(), "removed by its owner");
    }

    /// A predecessor (trusted: here, the tests' own user) that names a path
    /// for its hand-off socket, then sends something that fails a later
    /// check: the successor refuses, and removes no file. Neither one the
    /// state names that is not our hand-off socket (a root successor would
    /// delete any file), nor ours, which the predecessor still serves on.
    #[tokio::test]
    async fn a_takeover_that_fails_removes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("handoff.sock");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        for (named, refusal) in [
            (victim.clone(), "ours is"),
            (ours.clone(), "not the socket announced"),
        ] {
            let listener = std::os::unix::net::UnixListener::bind(&ours).unwrap();
            let md = std::fs::symlink_metadata(&named).unwrap();
            let state = State {
                pid: 1,
                listeners: vec![
                    wire::ListenerState {
                        kind: ListenerKind::Handoff {
                            path: named.clone(),
                            identity: (md.dev(), md.ino()),
                        },
                        janitor: false,
                    },
                    // Announced as a listener, sent as a connected socket.
                    wire::ListenerState {
                        kind: ListenerKind::Hybrid {
                            path: dir.path().join("agent.sock"),
                            identity: (0, 0),
                        },
                        janitor: false,
                    },
                ],
                connections: vec![],
            };
            let predecessor = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = [0u8; 8];
                s.read_exact(&mut req).unwrap();
                let (a, _b) = StdUnixStream::pair().unwrap();
                s.write_all(&[STATE]).unwrap();
                s.write_all(&wire::encode(&state).unwrap()).unwrap();
                fds::send(s.as_fd(), &[listener.as_fd(), a.as_fd()]).unwrap();
                let mut ack = [0u8; 1];
                // No acknowledgement: the successor closes.
                assert_eq!(s.read(&mut ack).unwrap_or(0), 0);
            });
            let e = take_over(&ours, 1 << 20).map(|_| ()).unwrap_err();
            predecessor.join().unwrap();
            assert!(
                victim.exists(),
                "{e}: the file the state named is still there"
            );
            assert!(
                ours.exists(),
                "{e}: the predecessor's socket is still there"
            );
            assert!(e.to_string().contains(refusal), "{e}");
            std::fs::remove_file(&ours).unwrap();
        }
    }
}
