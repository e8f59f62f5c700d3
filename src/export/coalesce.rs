//! Fewer, larger writes to the collector's connection. h2 writes and
//! flushes each DATA frame (16 KiB at most) on its own: with `TCP_NODELAY`
//! a batch was tens of system calls and segments, a quarter of our CPU in
//! the benchmark. This gathers h2's writes and sends them when full or when
//! h2 has nothing more (`TCP_CORK` keeps a call per frame: the copy
//! measured cheaper, BENCHMARKS.md): a flush after new writes is deferred
//! (waking our own task, so h2 frames the rest); a flush with nothing new
//! sends the buffer. Bytes wait one turn of the task at most.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much is gathered before it must go: 16 HTTP/2 frames.
pub(crate) const CAPACITY: usize = 256 * 1024;

pub(crate) struct Coalesce<S> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` written to `inner`.
    sent: usize,
    /// Written to since the last flush request.
    fresh: bool,
}

impl<S> Coalesce<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            fresh: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.buf.get(self.sent..).filter(|r| !r.is_empty()) {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, rest))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
        if self.buf.len().saturating_add(total) > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        if total >= CAPACITY {
            // Too big to be worth copying; what was gathered went first.
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(CAPACITY);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        self.fresh |= total > 0;
        Poll::Ready(Ok(total))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fresh {
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.fresh = false;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The first flush after writes is deferred; the next one, with
    /// nothing new written, sends everything in one write.
    #[tokio::test]
    async fn gathers_until_a_flush_with_nothing_new() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesce::new(a);
        w.write_all(b"frame one;").await.unwrap();
        w.flush().await.unwrap();
        w.write_all(b"frame two").await.unwrap();
        w.flush().await.unwrap();
        let mut got = [0u8; 64];
        let nothing = tokio::time::timeout(Duration::from_millis(20), b.read(&mut got)).await;
        assert!(
            nothing.is_err(),
            "nothing is written before the final flush"
        );
        w.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"frame one;frame two");
    }

    /// A deferred flush wakes its task, so an executor polls again and
    /// the bytes go out without anyone else writing.
    #[tokio::test]
    async fn a_deferred_flush_wakes_its_task() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesce::new(a);
        w.write_all(b"ping").await.unwrap();
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            match Pin::new(&mut w).poll_flush(cx) {
                // Deferred: return Pending and count on the wake-up.
                Poll::Ready(Ok(())) if polls == 1 => Poll::Pending,
                other => other,
            }
        })
        .await
        .unwrap();
        assert_eq!(polls, 2);
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn sends_when_full_and_passes_large_writes_through_in_order() {
        let (a, mut b) = tokio::io::duplex(4 << 20);
        let mut w = Coalesce::new(a);
        let small = vec![1u8; CAPACITY / 2 + 1];
        w.write_all(&small).await.unwrap();
        // Does not fit with the first: the first goes out.
        w.write_all(&small).await.unwrap();
        let mut got = vec![0u8; small.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, small);
        let big = vec![2u8; CAPACITY];
        w.write_all(&big).await.unwrap();
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), small.len() + big.len());
        assert!(rest[..small.len()].iter().all(|&x| x == 1));
        assert!(rest[small.len()..].iter().all(|&x| x == 2));
    }
}
