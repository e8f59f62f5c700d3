//! Handing live agent connections to the next forwarder process.
//!
//! (Over 500 lines with its tests: the hand-off socket, what a successor
//! receives, and every check it makes before believing any of it, stay
//! together.)
//!
//! The Kata agent connects once and never dials again after a failed write,
//! so a forwarder that closes a connection ends that sandbox's tracing for
//! the life of its VM. A restart or upgrade therefore hands everything over
//! instead: the listening sockets, every live agent connection, and for
//! each connection what the reader knows (the format found, the bytes of a
//! frame not yet whole). The successor serves them through the same code
//! as connections it accepted itself, and the agents never notice.
//!
//! The forwarder listens on a hand-off socket (`--handoff-socket`). A new
//! forwarder started with the same path connects to it before binding
//! anything ([`take_over`]). The old one checks who it is (`SO_PEERCRED`:
//! root, or the successor it started itself, by pid; see
//! [`server`]), pauses every listener and connection between
//! two reads ([`hub`]), and sends the state ([`wire`]) and the descriptors
//! ([`fds`]). Only when the successor acknowledges does the old one let go:
//! its connections stop without another read, its sockets stay in place
//! (nor does its janitor remove them: the janitor's pipe goes along), and
//! it exits 0 once what it had read is exported or spooled, as at any
//! shutdown. Spans read before the pause are the old process's to export,
//! bytes read after it the new one's: none is lost or sent twice. Without
//! an acknowledgement (a successor that refuses the state, dies or times
//! out) the old process resumes where it paused. `SIGHUP` starts the binary
//! now at the forwarder's path as such a successor, a bridge: the old
//! process then becomes that binary itself and takes everything back, so
//! that the service keeps its PID ([`server`]).
//!
//! The exchange on the hand-off socket:
//!
//! ```text
//! new -> old   "KTFTAKE1"                      (8 bytes)
//! old -> new   'S', the state message, then its descriptors (wire, fds)
//!          or  'R', length (u32, big-endian, at most 4 KiB), reason (UTF-8)
//! new -> old   'A' once it holds everything and will serve it
//! ```
//!
//! `kata-trace-forwarder status` asks on the same socket, under the same
//! peer check, with "KTFSTAT1" instead, and nothing pauses ([`crate::status`]).

pub mod fds;
pub(crate) mod fdstore;
pub(crate) mod hub;
pub(crate) mod server;
pub mod wire;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::addr::Peer;
use crate::janitor::Janitor;
use crate::wire::WireFormat;
use hub::{Member, Piece, PieceKind};
use wire::{Format, ListenerKind, State};

pub use server::{Reexec, Upgrade};

/// What a successor sends first.
pub const REQUEST: [u8; 8] = *b"KTFTAKE1";
const STATE: u8 = b'S';
const REFUSED: u8 = b'R';
const ACK: u8 = b'A';
/// Longest refusal reason.
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
    BindHandoff {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("connecting to the hand-off socket {path}: {source}")]
    ConnectHandoff {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

/// How a connection task is tied to hand-overs.
pub(crate) struct ConnLink {
    /// Its place in the next hand-over's pause.
    pub member: Option<Member>,
    /// The member id of the accept loop it came from.
    pub listener: u64,
    /// What the previous process had read, for a connection handed over.
    pub resume: Option<Resume>,
}

/// A handed-over connection's reading state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resume {
    pub partial: Vec<u8>,
    pub format: Option<WireFormat>,
    pub spans: u64,
    pub decode_errors: u64,
    /// Nothing is known of where the stream is (taken back from systemd's
    /// store after a crash): read from the next whole frame.
    pub lost: bool,
}

impl Resume {
    /// A paused connection's piece: its socket duplicated, and what its
    /// reader knows (`self`). Duplicating can fail (out of descriptors); the
    /// piece then carries nothing and the hand-over is refused as a whole.
    pub(crate) fn piece(self, stream: &impl AsFd, peer: Peer, listener: u64) -> Option<Piece> {
        let fd = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over: duplicating a connection's socket");
                return None;
            }
        };
        Some(Piece {
            what: PieceKind::Connection {
                listener,
                cid: match peer {
                    Peer::Vsock { cid } => Some(cid),
                    Peer::Unix => None,
                },
                format: self.format.map(Format::from),
                partial: self.partial,
                spans: self.spans,
                decode_errors: self.decode_errors,
            },
            fd,
        })
    }
}

impl From<WireFormat> for Format {
    fn from(f: WireFormat) -> Format {
        match f {
            WireFormat::Json => Format::Json,
            WireFormat::Bincode => Format::Bincode,
        }
    }
}

impl From<Format> for WireFormat {
    fn from(f: Format) -> WireFormat {
        match f {
            Format::Json => WireFormat::Json,
            Format::Bincode => WireFormat::Bincode,
        }
    }
}

/// The hand-off socket, bound here or handed over.
pub(crate) struct HandoffListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    identity: (u64, u64),
    /// Whether the socket file is ours to remove when dropped: cleared once
    /// it belongs to a successor, and set on one handed over only once the
    /// hand-over is ours ([`HandoffListener::own`]).
    remove: bool,
    /// Started as root: the janitor that removes the socket once the last
    /// forwarder is gone, as the forwarder, no longer root, cannot in a
    /// directory of root's.
    janitor: Option<Janitor>,
}

impl HandoffListener {
    /// Binds `path` (its directory made if missing), replacing a stale
    /// socket. Only the owner may connect (mode 0600); started as root, the
    /// owner is `user`, whom the forwarder becomes and whose successor,
    /// started by `SIGHUP`, must be able to connect.
    pub(crate) fn bind(path: &Path, user: Option<&str>) -> Result<HandoffListener, HandOverError> {
        let err = |source| HandOverError::BindHandoff {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(err)?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        match std::fs::symlink_metadata(path) {
            // A running forwarder's is never replaced: a second start with
            // the same listeners (which then fails to bind them) would
            // otherwise leave the running one unreachable for its upgrade.
            Ok(md)
                if md.file_type().is_socket()
                    && std::os::unix::net::UnixStream::connect(path).is_ok() =>
            {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a running forwarder listens there (take over from it with --handoff-socket)",
                )))
            }
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
            Ok(_) => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let std = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        if let Some(user) = user {
            if let Ok(Some(u)) = nix::unistd::User::from_name(user) {
                nix::unistd::chown(path, Some(u.uid), Some(u.gid)).map_err(|e| err(e.into()))?;
            }
        }
        let md = std::fs::symlink_metadata(path).map_err(err)?;
        std.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::UnixListener::from_std(std).map_err(err)?;
        // Root now, `user` later: without root the socket cannot be removed
        // from a directory of root's, so a janitor started now does it.
        let janitor = match user.is_some() && nix::unistd::getuid().is_root() {
            true => Some(Janitor::spawn(path, (md.dev(), md.ino())).map_err(err)?),
            false => None,
        };
        Ok(HandoffListener {
            listener,
            path: path.to_owned(),
            identity: (md.dev(), md.ino()),
            remove: true,
            janitor,
        })
    }

    /// A hand-off socket a predecessor handed over. Not ours to remove
    /// until the hand-over is ([`own`](Self::own)): a takeover that fails
    /// after this leaves the predecessor's socket in place.
    fn adopt(
        fd: OwnedFd,
        path: PathBuf,
        identity: (u64, u64),
        janitor: Option<OwnedFd>,
    ) -> Result<Self, HandOverError> {
        let std = std::os::unix::net::UnixListener::from(fd);
        let listener = std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(std))
            .map_err(|e| HandOverError::AdoptSocket(format!("hand-off socket: {e}")))?;
        Ok(HandoffListener {
            listener,
            path,
            identity,
            remove: false,
            janitor: janitor.map(Janitor::adopt),
        })
    }

    /// The hand-over is acknowledged: the socket is ours to remove at exit.
    pub(crate) fn own(&mut self) {
        self.remove = true;
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The janitor's pipe, for handing over.
    pub(crate) fn janitor_pipe(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.janitor.as_ref().and_then(Janitor::pipe)
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        if !self.remove {
            // The successor's now (or still the predecessor's): the janitor's
            // pipe is closed without a word, and it waits on the others.
            if let Some(j) = self.janitor.take() {
                j.release();
            }
            return;
        }
        if let Some(j) = self.janitor.take() {
            // It removes the socket if it is still the very file bound.
            j.remove_now(Duration::from_secs(2));
            return;
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|md| md.file_type().is_socket() && (md.dev(), md.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a successor received, before it is turned into listeners.
pub(crate) struct Received {
    stream: StdUnixStream,
    pub state: State,
    fds: Vec<OwnedFd>,
}

/// One handed-over listener, as the listen stage takes it.
#[derive(Debug)]
pub(crate) enum TakenListener {
    Hybrid {
        fd: OwnedFd,
        path: PathBuf,
        identity: (u64, u64),
        janitor: Option<OwnedFd>,
    },
    Vsock {
        fd: OwnedFd,
        cid: Option<u32>,
        port: u32,
    },
    /// A sandbox's socket in template mode or `--kata-host`.
    Sandbox {
        fd: OwnedFd,
        id: String,
        path: PathBuf,
        identity: (u64, u64),
    },
}

/// One handed-over connection: its socket, the index of its listener among
/// [`Taken::listeners`], and its reading state.
pub(crate) struct TakenConn {
    pub fd: OwnedFd,
    pub listener: usize,
    pub cid: Option<u32>,
    pub(crate) resume: Resume,
}

/// Everything handed over, checked and ready to serve.
pub(crate) struct Taken {
    pub from_pid: u32,
    pub handoff: Option<HandoffListener>,
    pub listeners: Vec<TakenListener>,
    pub connections: Vec<TakenConn>,
    stream: StdUnixStream,
}

impl Taken {
    /// The parts, and the acknowledgement to send once they are served.
    pub(crate) fn split(self) -> (TakenParts, Ack) {
        (
            TakenParts {
                from_pid: self.from_pid,
                handoff: self.handoff,
                listeners: self.listeners,
                connections: self.connections,
            },
            Ack {
                stream: self.stream,
            },
        )
    }
}

/// The acknowledgement a successor owes the old process.
pub(crate) struct Ack {
    stream: StdUnixStream,
}

impl Ack {
    /// Tells the old process that everything is ours now: from here on it
    /// will not read again. Without this (dropped), it resumes.
    pub(crate) fn send(mut self) -> Result<(), HandOverError> {
        self.stream.write_all(&[ACK]).map_err(HandOverError::Send)
    }
}

/// What [`Taken`] holds.
pub(crate) struct TakenParts {
    pub from_pid: u32,
    pub handoff: Option<HandoffListener>,
    pub listeners: Vec<TakenListener>,
    pub connections: Vec<TakenConn>,
}

/// Connects to the hand-off socket at `path` and takes everything the
/// forwarder there serves. `Ok(None)`: nobody is there (start normally).
/// Blocking: call it before serving, or off the runtime.
pub(crate) fn take_over(
    path: &Path,
    max_frame_size: usize,
) -> Result<Option<Taken>, HandOverError> {
    let stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(HandOverError::ConnectHandoff {
                path: path.to_owned(),
                source,
            })
        }
    };
    let ours = nix::unistd::getuid().as_raw();
    let peer = fds::peer(&stream).map_err(HandOverError::Receive)?;
    if !trusts_predecessor(peer, ours) {
        return Err(HandOverError::CheckPeer {
            uid: peer.uid,
            pid: peer.pid,
            ours,
        });
    }
    let _ = stream.set_read_timeout(Some(STEP_TIMEOUT));
    let _ = stream.set_write_timeout(Some(STEP_TIMEOUT));
    let received = receive(stream, max_frame_size)?;
    sort(received, path).map(Some)
}

/// Whether to take anything from the hand-off socket whose listening end
/// `peer` made. For a socket we connect to, `SO_PEERCRED` names whoever
/// made it listen, not whoever holds it now: a forwarder started as root
/// binds it as root, and it goes from forwarder to forwarder (bridges and
/// upgrades included) with those credentials. So a successor running as
/// root, which would act on the paths in the state with root's rights,
/// takes only from a socket root made, never from one a user could have
/// put at the path; a successor not running as root (a bridge, an
/// upgrade, a forwarder never started as root) has nothing more to lose
/// to its own user, and takes from root's or its own.
fn trusts_predecessor(peer: fds::Peer, ours: u32) -> bool {
    peer.uid == 0 || (ours != 0 && peer.uid == ours)
}

fn receive(mut stream: StdUnixStream, max_frame_size: usize) -> Result<Received, HandOverError> {
    let rx = HandOverError::Receive;
    stream.write_all(&REQUEST).map_err(HandOverError::Send)?;
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).map_err(rx)?;
    match tag[0] {
        STATE => {}
        REFUSED => {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).map_err(rx)?;
            let len = (u32::from_be_bytes(len) as usize).min(MAX_REASON);
            let mut reason = vec![0u8; len];
            stream.read_exact(&mut reason).map_err(rx)?;
            return Err(HandOverError::Refused(
                String::from_utf8_lossy(&reason).into_owned(),
            ));
        }
        other => return Err(HandOverError::ForeignState { found: vec![other] }),
    }
    let mut head = [0u8; wire::HEADER_LEN];
    stream.read_exact(&mut head).map_err(rx)?;
    let header = wire::decode_header(&head)?;
    // Read exactly what was announced: never into the descriptors' bytes.
    let want = header.body_len + wire::TRAILER_LEN;
    let mut rest = Vec::with_capacity(want.min(1 << 20));
    (&mut stream)
        .take(want as u64)
        .read_to_end(&mut rest)
        .map_err(rx)?;
    let state = wire::decode_body(&head, header, &rest, max_frame_size)?;
    let fds = fds::recv(stream.as_fd(), header.descriptors).map_err(rx)?;
    Ok(Received { stream, state, fds })
}

/// Checks each descriptor is the kind of socket the state says, and pairs
/// them up. `handoff_path`: our own hand-off socket, the one path the
/// state may name for it.
fn sort(received: Received, handoff_path: &Path) -> Result<Taken, HandOverError> {
    use nix::sys::socket::{getsockopt, sockopt, AddressFamily, SockType};
    let Received { stream, state, fds } = received;
    let check = |fd: &OwnedFd, family: AddressFamily, listening: bool, what: &str| {
        let kind = getsockopt(fd, sockopt::SockType);
        let accepting = getsockopt(fd, sockopt::AcceptConn);
        let domain =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
                .ok()
                .and_then(|a| nix::sys::socket::SockaddrLike::family(&a));
        match (kind, accepting, domain) {
            (Ok(SockType::Stream), Ok(a), Some(d)) if a == listening && d == family => Ok(()),
            other => Err(HandOverError::AdoptSocket(format!(
                "{what}: not the socket announced ({other:?})"
            ))),
        }
    };
    let mut fds = fds.into_iter();
    let mut next = |what: &str| {
        fds.next()
            .ok_or_else(|| HandOverError::AdoptSocket(format!("{what}: descriptor missing")))
    };
    let mut handoff = None;
    let mut listeners = Vec::new();
    // State index -> index among `listeners` (the hand-off socket is apart).
    let mut index = Vec::with_capacity(state.listeners.len());
    for l in &state.listeners {
        let fd = next("listener")?;
        let janitor = if l.janitor {
            Some(next("janitor")?)
        } else {
            None
        };
        match &l.kind {
            ListenerKind::Handoff { path, identity } => {
                // Ours is the only one we would bind, and so the only file
                // we may ever remove.
                if path != handoff_path {
                    return Err(HandOverError::CheckState(format!(
                        "a hand-off socket at {}, ours is {}",
                        path.display(),
                        handoff_path.display()
                    )));
                }
                check(&fd, AddressFamily::Unix, true, "hand-off socket")?;
                handoff = Some(HandoffListener::adopt(
                    fd,
                    path.clone(),
                    *identity,
                    janitor,
                )?);
                index.push(None);
            }
            ListenerKind::Hybrid { path, identity } => {
                check(&fd, AddressFamily::Unix, true, "hybrid listener")?;
                index.push(Some(listeners.len()));
                listeners.push(TakenListener::Hybrid {
                    fd,
                    path: path.clone(),
                    identity: *identity,
                    janitor,
                });
            }
            ListenerKind::Sandbox { id, path, identity } => {
                check(&fd, AddressFamily::Unix, true, "sandbox listener")?;
                index.push(Some(listeners.len()));
                listeners.push(TakenListener::Sandbox {
                    fd,
                    id: id.clone(),
                    path: path.clone(),
                    identity: *identity,
                });
            }
            ListenerKind::Vsock { cid, port } => {
                check(&fd, AddressFamily::Vsock, true, "vsock listener")?;
                index.push(Some(listeners.len()));
                listeners.push(TakenListener::Vsock {
                    fd,
                    cid: *cid,
                    port: *port,
                });
            }
        }
    }
    let mut connections = Vec::with_capacity(state.connections.len());
    for c in state.connections {
        let fd = next("connection")?;
        let Some(Some(listener)) = index.get(c.listener as usize).copied() else {
            return Err(HandOverError::CheckState(format!(
                "a connection of listener {} (not an agent listener)",
                c.listener
            )));
        };
        let family = match c.cid {
            Some(_) => AddressFamily::Vsock,
            None => AddressFamily::Unix,
        };
        check(&fd, family, false, "connection")?;
        connections.push(TakenConn {
            fd,
            listener,
            cid: c.cid,
            resume: Resume {
                partial: c.partial,
                format: c.format.map(WireFormat::from),
                spans: c.spans,
                decode_errors: c.decode_errors,
                lost: false,
            },
        });
    }
    Ok(Taken {
        from_pid: state.pid,
        handoff,
        listeners,
        connections,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
