//! Descriptors over a Unix socket (`SCM_RIGHTS`).
//!
//! At most 253 a message (`SCM_MAX_FD`): chunks of [`CHUNK`], each on one
//! marker byte. The receiver reads the state by exact lengths, then the
//! chunks a byte at a time (the kernel never merges a message carrying
//! descriptors with the next); a truncated chunk (`MSG_CTRUNC`) is an error.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub(crate) const CHUNK: usize = 250;
const MARKER: u8 = b'F';

pub fn send(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for chunk in fds.chunks(CHUNK) {
        let raw: Vec<RawFd> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
        let iov = [IoSlice::new(&[MARKER])];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        loop {
            match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(1) => break,
                Ok(_) => return Err(io::Error::other("short write of a descriptor chunk")),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Receives exactly `n` descriptors (sent by [`send`]), close-on-exec.
pub fn recv(sock: BorrowedFd<'_>, n: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out: Vec<OwnedFd> = Vec::with_capacity(n.min(4096));
    let mut space = nix::cmsg_space!([RawFd; CHUNK]);
    let bad = |why| Err(io::Error::new(io::ErrorKind::InvalidData, why));
    while out.len() < n {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let flags = MsgFlags::MSG_CMSG_CLOEXEC;
        let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            let why = format!("the peer closed after {} of {n} descriptors", out.len());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why));
        }
        let before = out.len();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors in our
                // table for us; nothing else owns them.
                out.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
        }
        if out.len() == before || byte[0] != MARKER {
            return bad("expected a chunk of descriptors".to_owned());
        }
        if out.len() > n {
            return bad(format!("{} descriptors sent, {n} announced", out.len()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn many_descriptors_cross_in_chunks_and_stay_usable() {
        let (a, b) = UnixStream::pair().unwrap();
        // 600 ends of socket pairs: three chunks, the last one partial.
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..600).map(|_| UnixStream::pair().unwrap()).collect();
        let sending: Vec<BorrowedFd<'_>> = pairs.iter().map(|(x, _)| x.as_fd()).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| send(a.as_fd(), &sending));
            let got = recv(b.as_fd(), 600).unwrap();
            h.join().unwrap().unwrap();
            got
        });
        assert_eq!(sender.len(), 600);
        for (i, fd) in sender.into_iter().enumerate() {
            let mut ours = UnixStream::from(fd);
            ours.write_all(&[i as u8]).unwrap();
            let mut byte = [0u8];
            (&pairs[i].1).read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i as u8, "descriptor {i} is the right socket");
        }
        let me =
            nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        assert_eq!(me.uid(), nix::unistd::getuid().as_raw());
        assert_eq!(me.pid(), std::process::id() as i32);
    }

    #[test]
    fn a_peer_that_stops_short_or_sends_bytes_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        send(a.as_fd(), &[x.as_fd()]).unwrap();
        drop(a);
        let e = recv(b.as_fd(), 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"F").unwrap();
        let e = recv(b.as_fd(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
