//! The hand-over state message (old process to new): what the sockets
//! passed are, checked before anything in it is believed.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "KTFHOVR\0"      (anything else: not a forwarder's state)
//! 8       2     version, big-endian    (1; another is refused, never guessed at)
//! 10      2     reserved, 0
//! 12      4     body length L, big-endian (at most MAX_STATE_BYTES)
//! 16      4     number of descriptors N that follow the message, big-endian
//! 20      L     body: bincode 1.3 (fixed-width integers) of `State`
//! 20+L    4     CRC-32 (IEEE) of bytes 0 .. 20+L, big-endian
//! ```
//!
//! The N descriptors follow ([`super::fds`]) in the body's order: each
//! listener's socket (then its janitor's pipe), then each connection's.
//!
//! The length is checked before the body is read; any failed check refuses
//! the whole message, saying which, and the new process starts clean.

use std::path::PathBuf;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::HandOverError;
use crate::wire::WireFormat;

pub const MAGIC: [u8; 8] = *b"KTFHOVR\0";
pub(crate) const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 4;
pub const TRAILER_LEN: usize = 4;
/// Largest body: 1,024 connections each with a 1 MiB frame half read.
pub(crate) const MAX_STATE_BYTES: usize = 1100 << 20;
/// Most listeners (template mode has one per sandbox), and connections.
pub(crate) const MAX_LISTENERS: usize = 65_536;
pub(crate) const MAX_CONNECTIONS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The sender's process id, for the logs.
    pub pid: u32,
    pub listeners: Vec<ListenerState>,
    pub connections: Vec<ConnState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerState {
    pub kind: ListenerKind,
    /// A janitor's pipe follows this listener's descriptor.
    pub janitor: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    /// The hand-off socket itself: the successor may not have the right to bind it again.
    Handoff { path: PathBuf, identity: (u64, u64) },
    /// `<socket-path>_<port>`, and the device and inode it was bound as.
    Hybrid { path: PathBuf, identity: (u64, u64) },
    /// An AF_VSOCK listener; `cid` `None` is any.
    Vsock { cid: Option<u32>, port: u32 },
    /// One sandbox's hybrid-VSOCK socket (template mode, `--kata-host`). Added
    /// last within version 1: older states still decode; an older reader refuses one.
    Sandbox {
        id: String,
        path: PathBuf,
        identity: (u64, u64),
    },
}

/// Also a handed-over connection's reading state, as the successor serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    /// Index into [`State::listeners`].
    pub listener: u32,
    pub cid: Option<u32>,
    pub format: Option<WireFormat>,
    /// The bytes read and not yet a whole frame (its header included).
    pub partial: Vec<u8>,
    /// Spans and frames skipped so far, for the connection's closing log.
    pub spans: u64,
    pub decode_errors: u64,
    /// Not sent: taken back from systemd's store after a crash, read from the next whole frame.
    #[serde(skip)]
    pub lost: bool,
}

impl State {
    pub fn descriptors(&self) -> usize {
        let janitors = self.listeners.iter().filter(|l| l.janitor).count();
        self.listeners.len() + janitors + self.connections.len()
    }
}

fn codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_big_endian()
        .reject_trailing_bytes()
        .with_limit(limit)
}

pub fn encode(state: &State) -> Result<Vec<u8>, HandOverError> {
    let enc = |e: bincode::Error| HandOverError::EncodeState(e.to_string());
    // Within bincode's limit, the body and its descriptor count fit a u32.
    let body = codec(MAX_STATE_BYTES as u64)
        .serialize(state)
        .map_err(enc)?;
    let fds = state.descriptors() as u32;
    let head: RawHeader = (MAGIC, VERSION, 0, body.len() as u32, fds);
    let mut out = codec(HEADER_LEN as u64).serialize(&head).map_err(enc)?;
    out.reserve(body.len() + TRAILER_LEN);
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Magic, version, reserved, body length, descriptor count: the layout above.
type RawHeader = ([u8; 8], u16, u16, u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_len: usize,
    pub descriptors: usize,
}

pub fn decode_header(head: &[u8; HEADER_LEN]) -> Result<Header, HandOverError> {
    let (magic, version, _reserved, len, fds): RawHeader = codec(HEADER_LEN as u64)
        .deserialize(head)
        .map_err(|e| HandOverError::DecodeState(e.to_string()))?;
    if magic != MAGIC {
        let found = magic.to_vec();
        return Err(HandOverError::ForeignState { found });
    }
    if version != VERSION {
        return Err(HandOverError::UnsupportedVersion { found: version });
    }
    let body_len = len as usize;
    if body_len > MAX_STATE_BYTES {
        let (len, max) = (body_len as u64, MAX_STATE_BYTES);
        return Err(HandOverError::StateTooLarge { len, max });
    }
    Ok(Header {
        body_len,
        descriptors: fds as usize,
    })
}

/// Checks and decodes `rest` (the body and CRC after `head`) within our `max_frame_size`.
pub(crate) fn decode_body(
    head: &[u8; HEADER_LEN],
    header: Header,
    rest: &[u8],
    max_frame_size: usize,
) -> Result<State, HandOverError> {
    let (len, announced) = (rest.len(), header.body_len + TRAILER_LEN);
    if len != announced {
        let why = format!("{len} bytes after the header, {announced} announced");
        return Err(HandOverError::CheckState(why));
    }
    let (body, crc) = rest.split_at(header.body_len);
    let want = crc.try_into().map(u32::from_be_bytes).unwrap_or(0);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(head);
    hasher.update(body);
    let got = hasher.finalize();
    if got != want {
        return Err(HandOverError::ChecksumMismatch { want, got });
    }
    let state: State = codec(header.body_len as u64)
        .deserialize(body)
        .map_err(|e| HandOverError::DecodeState(e.to_string()))?;
    check(&state, header, max_frame_size)?;
    Ok(state)
}

/// The checks bincode cannot make: counts, references, frame bounds.
fn check(state: &State, header: Header, max_frame_size: usize) -> Result<(), HandOverError> {
    let bad = |why: String| Err(HandOverError::CheckState(why));
    if state.listeners.len() > MAX_LISTENERS {
        return bad(format!("{} listeners", state.listeners.len()));
    }
    if state.connections.len() > MAX_CONNECTIONS {
        return bad(format!("{} connections", state.connections.len()));
    }
    let (sent, needs) = (header.descriptors, state.descriptors());
    if sent != needs {
        let why = format!("{sent} descriptors announced, the state needs {needs}");
        return bad(why);
    }
    let max_partial = max_frame_size.saturating_add(crate::wire::HEADER_LEN);
    for (i, c) in state.connections.iter().enumerate() {
        let Some(l) = state.listeners.get(c.listener as usize) else {
            let (n, of) = (c.listener, state.listeners.len());
            return bad(format!("connection {i} names listener {n} of {of}"));
        };
        match (&l.kind, c.cid) {
            (ListenerKind::Hybrid { .. } | ListenerKind::Sandbox { .. }, None)
            | (ListenerKind::Vsock { .. }, Some(_)) => {}
            (kind, cid) => {
                return bad(format!(
                    "connection {i} (cid {cid:?}) cannot come from listener {kind:?}"
                ))
            }
        }
        if c.partial.len() >= max_partial {
            return bad(format!(
                "connection {i} has {} bytes of a partial frame, over --max-frame-size {max_frame_size}",
                c.partial.len()
            ));
        }
    }
    let handoffs = state
        .listeners
        .iter()
        .filter(|l| matches!(l.kind, ListenerKind::Handoff { .. }))
        .count();
    if handoffs > 1 {
        return bad(format!("{handoffs} hand-off sockets"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            pid: 42,
            listeners: vec![
                ListenerState {
                    kind: ListenerKind::Handoff {
                        path: "/run/ktf/h.sock".into(),
                        identity: (1, 2),
                    },
                    janitor: false,
                },
                ListenerState {
                    kind: ListenerKind::Hybrid {
                        path: "/run/vc/vm/a/clh.sock_10240".into(),
                        identity: (3, 4),
                    },
                    janitor: true,
                },
                ListenerState {
                    kind: ListenerKind::Vsock {
                        cid: None,
                        port: 10240,
                    },
                    janitor: false,
                },
            ],
            connections: vec![
                ConnState {
                    listener: 1,
                    cid: None,
                    format: Some(WireFormat::Json),
                    partial: vec![0, 0, 0, 0, 0, 0, 0, 9, 1, 2, 3],
                    spans: 7,
                    decode_errors: 1,
                    lost: false,
                },
                ConnState {
                    listener: 2,
                    cid: Some(3),
                    format: None,
                    partial: Vec::new(),
                    spans: 0,
                    decode_errors: 0,
                    lost: false,
                },
            ],
        }
    }

    fn decode(msg: &[u8], max_frame: usize) -> Result<State, HandOverError> {
        let head: [u8; HEADER_LEN] = msg[..HEADER_LEN].try_into().unwrap();
        let header = decode_header(&head)?;
        decode_body(&head, header, &msg[HEADER_LEN..], max_frame)
    }

    /// Re-frames `body` with a valid header and checksum.
    fn frame(body: &[u8], fds: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&fds.to_be_bytes());
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn body_of(state: &State) -> Vec<u8> {
        codec(u64::MAX).serialize(state).unwrap()
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let msg = encode(&s).unwrap();
        assert_eq!(s.descriptors(), 6, "3 listeners, 1 janitor, 2 connections");
        let head: [u8; HEADER_LEN] = msg[..HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_header(&head).unwrap().descriptors, 6);
        assert_eq!(decode(&msg, 1 << 20).unwrap(), s);
        let empty = State {
            pid: 1,
            listeners: vec![],
            connections: vec![],
        };
        assert_eq!(decode(&encode(&empty).unwrap(), 64).unwrap(), empty);
    }

    /// The format goes as its variant index, as the enum it replaced did.
    #[test]
    fn a_wire_format_is_its_variant_index() {
        let b = codec(64).serialize(&Some(WireFormat::Bincode)).unwrap();
        assert_eq!(b, [1, 0, 0, 0, 1]);
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let s = sample();
        assert_eq!(encode(&s).unwrap(), frame(&body_of(&s), 6));
    }

    #[test]
    fn refuses_a_foreign_message() {
        let mut msg = encode(&sample()).unwrap();
        msg[..8].copy_from_slice(b"HTTP/1.1");
        let e = decode(&msg, 1 << 20).unwrap_err();
        assert!(matches!(e, HandOverError::ForeignState { .. }), "{e}");
        assert!(e.to_string().contains("not a kata-trace-forwarder"), "{e}");
    }

    #[test]
    fn refuses_another_version() {
        let mut msg = encode(&sample()).unwrap();
        msg[8..10].copy_from_slice(&2u16.to_be_bytes());
        let e = decode(&msg, 1 << 20).unwrap_err();
        assert!(
            matches!(e, HandOverError::UnsupportedVersion { found: 2 }),
            "{e}"
        );
    }

    #[test]
    fn refuses_an_oversized_length_before_reading_it() {
        let mut msg = encode(&sample()).unwrap();
        msg[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        let head: [u8; HEADER_LEN] = msg[..HEADER_LEN].try_into().unwrap();
        let e = decode_header(&head).unwrap_err();
        assert!(matches!(e, HandOverError::StateTooLarge { .. }), "{e}");
    }

    #[test]
    fn refuses_any_flipped_bit() {
        let msg = encode(&sample()).unwrap();
        for i in HEADER_LEN..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x10;
            let e = decode(&bad, 1 << 20).unwrap_err();
            assert!(
                matches!(e, HandOverError::ChecksumMismatch { .. }),
                "byte {i}: {e}"
            );
        }
        // The descriptor count is covered by the checksum too.
        let mut bad = msg.clone();
        bad[19] ^= 1;
        assert!(matches!(
            decode(&bad, 1 << 20).unwrap_err(),
            HandOverError::ChecksumMismatch { .. }
        ));
    }

    #[test]
    fn refuses_a_short_or_long_message() {
        let msg = encode(&sample()).unwrap();
        for cut in [msg.len() - 1, HEADER_LEN + 3] {
            let e = decode(&msg[..cut], 1 << 20).unwrap_err();
            assert!(matches!(e, HandOverError::CheckState(_)), "{e}");
        }
        let mut long = msg.clone();
        long.push(0);
        assert!(decode(&long, 1 << 20).is_err());
    }

    #[test]
    fn refuses_a_body_that_does_not_decode_or_has_trailing_bytes() {
        let e = decode(&frame(b"\xff\xff", 0), 1 << 20).unwrap_err();
        assert!(matches!(e, HandOverError::DecodeState(_)), "{e}");
        let mut body = body_of(&sample());
        body.push(0);
        let e = decode(&frame(&body, 6), 1 << 20).unwrap_err();
        assert!(matches!(e, HandOverError::DecodeState(_)), "{e}");
        // A vector that claims more elements than the body has is refused
        // without allocating them.
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        let e = decode(&frame(&body, 0), 1 << 20).unwrap_err();
        assert!(matches!(e, HandOverError::DecodeState(_)), "{e}");
    }

    /// What a case does to a good state, and what the refusal must say.
    type Spoil = Box<dyn Fn(&mut State)>;

    #[test]
    fn refuses_an_inconsistent_state() {
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "names listener",
                Box::new(|s: &mut State| s.connections[0].listener = 9),
            ),
            (
                "cannot come from",
                Box::new(|s: &mut State| s.connections[0].cid = Some(3)),
            ),
            (
                "cannot come from",
                Box::new(|s: &mut State| s.connections[0].listener = 0),
            ),
            (
                "over --max-frame-size",
                Box::new(|s: &mut State| s.connections[0].partial = vec![0; 64 + 8]),
            ),
            (
                "hand-off sockets",
                Box::new(|s: &mut State| {
                    let h = s.listeners[0].clone();
                    s.listeners.push(h);
                }),
            ),
        ];
        for (needle, break_it) in cases {
            let mut s = sample();
            break_it(&mut s);
            let e = decode(&encode(&s).unwrap(), 64).unwrap_err();
            assert!(
                matches!(e, HandOverError::CheckState(_)) && e.to_string().contains(needle),
                "{needle}: {e}"
            );
        }
        // A partial frame just under the bound is fine.
        let mut s = sample();
        s.connections[0].partial = vec![0; 64 + 7];
        decode(&encode(&s).unwrap(), 64).unwrap();
        // The descriptor count must match what the state lists.
        let body = body_of(&sample());
        let e = decode(&frame(&body, 4), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("descriptors announced"), "{e}");
    }
}
