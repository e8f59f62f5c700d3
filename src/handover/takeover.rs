//! The successor's side of a hand-over: connect, check who made the socket,
//! receive and check the state and descriptors, ack once they are served.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::Path;

use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use super::wire::{ListenerKind, State};
use super::*;

/// A listener as the state announced it (never the hand-off socket).
#[derive(Debug)]
pub(crate) struct TakenListener {
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    pub janitor: Option<OwnedFd>,
}

pub(crate) struct TakenConn {
    pub fd: OwnedFd,
    /// Index into [`Taken::listeners`].
    pub listener: usize,
    pub state: wire::ConnState,
}

pub(crate) struct Taken {
    pub from_pid: u32,
    pub handoff: Option<HandoffListener>,
    pub listeners: Vec<TakenListener>,
    pub connections: Vec<TakenConn>,
    pub ack: Ack,
}

pub(crate) struct Ack(StdUnixStream);

impl Ack {
    /// Everything is ours now: the old process reads no more (dropped unsent, it resumes).
    pub(crate) fn send(mut self) -> Result<(), HandOverError> {
        self.0.write_all(&[ACK]).map_err(HandOverError::Send)
    }
}

/// Takes everything the forwarder at `path` serves (`None`: nobody). Blocking.
pub(crate) fn take_over(
    path: &Path,
    max_frame_size: usize,
) -> Result<Option<Taken>, HandOverError> {
    use io::ErrorKind::{ConnectionRefused, NotFound};
    let mut stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), NotFound | ConnectionRefused) => return Ok(None),
        Err(source) => {
            let path = path.to_owned();
            return Err(HandOverError::ConnectHandoff { path, source });
        }
    };
    let rx = HandOverError::Receive;
    let ours = nix::unistd::getuid().as_raw();
    let peer = getsockopt(&stream, sockopt::PeerCredentials).map_err(|e| rx(e.into()))?;
    // `peer` made the socket listen (passed along from forwarder to
    // forwarder). A root successor acts on the state's paths as root, so
    // takes only from root's; a non-root one has no more to lose to its user.
    if !(peer.uid() == 0 || (ours != 0 && peer.uid() == ours)) {
        let (uid, pid) = (peer.uid(), peer.pid());
        return Err(HandOverError::CheckPeer { uid, pid, ours });
    }
    let _ = stream.set_read_timeout(Some(STEP_TIMEOUT));
    let _ = stream.set_write_timeout(Some(STEP_TIMEOUT));
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
            let reason = String::from_utf8_lossy(&reason).into_owned();
            return Err(HandOverError::Refused(reason));
        }
        other => return Err(HandOverError::ForeignState { found: vec![other] }),
    }
    let mut head = [0u8; wire::HEADER_LEN];
    stream.read_exact(&mut head).map_err(rx)?;
    let header = wire::decode_header(&head)?;
    // Exactly what was announced: never into the descriptors' bytes.
    let want = header.body_len + wire::TRAILER_LEN;
    let mut rest = Vec::with_capacity(want.min(1 << 20));
    (&mut stream)
        .take(want as u64)
        .read_to_end(&mut rest)
        .map_err(rx)?;
    let state = wire::decode_body(&head, header, &rest, max_frame_size)?;
    let fds = fds::recv(stream.as_fd(), header.descriptors).map_err(rx)?;
    sort(stream, state, fds, path).map(Some)
}

/// Checks each descriptor is the socket the state says, and pairs them up.
/// `handoff_path`: ours, the one path the state may name for it.
fn sort(
    stream: StdUnixStream,
    state: State,
    fds: Vec<OwnedFd>,
    handoff_path: &Path,
) -> Result<Taken, HandOverError> {
    let check = |fd: &OwnedFd, family: AddressFamily, listening: bool, what: &str| {
        let kind = getsockopt(fd, sockopt::SockType);
        let accepting = getsockopt(fd, sockopt::AcceptConn);
        let domain = getsockname::<SockaddrStorage>(fd.as_raw_fd()).map(|a| a.family());
        match (kind, accepting, domain) {
            (Ok(SockType::Stream), Ok(a), Ok(Some(d))) if a == listening && d == family => Ok(()),
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
    for l in state.listeners {
        let fd = next("listener")?;
        let janitor = l.janitor.then(|| next("janitor")).transpose()?;
        let (family, what) = match &l.kind {
            // The only file we would bind, so the only one we may remove.
            ListenerKind::Handoff { path, .. } if path != handoff_path => {
                let (theirs, ours) = (path.display(), handoff_path.display());
                let why = format!("a hand-off socket at {theirs}, ours is {ours}");
                return Err(HandOverError::CheckState(why));
            }
            ListenerKind::Handoff { .. } => (AddressFamily::Unix, "hand-off socket"),
            ListenerKind::Hybrid { .. } => (AddressFamily::Unix, "hybrid listener"),
            ListenerKind::Sandbox { .. } => (AddressFamily::Unix, "sandbox listener"),
            ListenerKind::Vsock { .. } => (AddressFamily::Vsock, "vsock listener"),
        };
        check(&fd, family, true, what)?;
        let ListenerKind::Handoff { path, identity } = l.kind else {
            index.push(Some(listeners.len()));
            let kind = l.kind;
            listeners.push(TakenListener { fd, kind, janitor });
            continue;
        };
        let std = StdUnixListener::from(fd);
        let listener = std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(std))
            .map_err(|e| HandOverError::AdoptSocket(format!("hand-off socket: {e}")))?;
        handoff = Some(HandoffListener {
            listener,
            path,
            identity,
            remove: false,
            janitor: janitor.map(Janitor::adopt),
        });
        index.push(None);
    }
    let mut connections = Vec::with_capacity(state.connections.len());
    for state in state.connections {
        let fd = next("connection")?;
        let Some(Some(listener)) = index.get(state.listener as usize).copied() else {
            let l = state.listener;
            let why = format!("a connection of listener {l} (not an agent listener)");
            return Err(HandOverError::CheckState(why));
        };
        let family = state
            .cid
            .map_or(AddressFamily::Unix, |_| AddressFamily::Vsock);
        check(&fd, family, false, "connection")?;
        connections.push(TakenConn {
            fd,
            listener,
            state,
        });
    }
    Ok(Taken {
        from_pid: state.pid,
        handoff,
        listeners,
        connections,
        ack: Ack(stream),
    })
}
