//! An export request's HTTP body: an [`EncodedRequest`]'s pieces, handed to
//! hyper without copying (h2 chains a large `Bytes` behind its frame
//! header, so spans go from their encoding buffer straight to the socket);
//! and the collector's answer, read within bounds.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::config::Compression;
use crate::otlp::EncodedRequest;

/// The request as `compression` says to send it. Gzip (the one path that
/// copies) at level 1: it already sends an eighth of the bytes or less,
/// where level 6 costs three to four times the CPU per span (BENCHMARKS.md).
pub(crate) fn compressed(
    compression: Compression,
    request: &EncodedRequest,
) -> std::borrow::Cow<'_, EncodedRequest> {
    use std::io::Write;
    if compression == Compression::None {
        return std::borrow::Cow::Borrowed(request);
    }
    let out = Vec::with_capacity(request.len() / 4 + 64);
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    for c in request.chunks() {
        // Writing into a Vec cannot fail.
        let _ = enc.write_all(c);
    }
    let gzipped = Bytes::from(enc.finish().unwrap_or_default());
    std::borrow::Cow::Owned(EncodedRequest::from(gzipped))
}

/// The pieces not sent yet.
pub(crate) struct RequestBody(std::vec::IntoIter<Bytes>);

impl RequestBody {
    /// `prefix` goes first: gRPC's message header.
    pub(crate) fn new(prefix: Option<Bytes>, request: &EncodedRequest) -> Self {
        let chunks = prefix.into_iter().chain(request.chunks().iter().cloned());
        let chunks: Vec<Bytes> = chunks.filter(|c| !c.is_empty()).collect();
        Self(chunks.into_iter())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.next().map(|c| Ok(Frame::data(c))))
    }

    /// Lets hyper end the stream with the last piece, not an empty frame.
    fn is_end_stream(&self) -> bool {
        self.0.as_slice().is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_slice().iter().map(|c| c.len() as u64).sum())
    }
}

/// At most `max` bytes of a response body, read by `deadline`; `None` if it
/// is longer, late, or breaks off.
pub(crate) async fn read_bounded<B>(
    body: B,
    max: usize,
    deadline: tokio::time::Instant,
) -> Option<Bytes>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    use http_body_util::{BodyExt, Limited};
    let read = Limited::new(body, max).collect();
    let collected = tokio::time::timeout_at(deadline, read).await.ok()?.ok()?;
    Some(collected.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn yields_prefix_then_pieces_and_their_exact_size() {
        let req = EncodedRequest::from_chunks(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ]);
        let body = RequestBody::new(Some(Bytes::from_static(b"\0")), &req);
        assert_eq!(body.size_hint().exact(), Some(6));
        assert!(!body.is_end_stream());
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"\0abcde");
        let empty = RequestBody::new(None, &EncodedRequest::default());
        assert!(empty.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_answers_only_within_size_and_time() {
        use http_body_util::{Full, StreamBody};
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let small = Full::new(Bytes::from_static(b"ok"));
        assert_eq!(
            read_bounded(small, 4, soon()).await.as_deref(),
            Some(&b"ok"[..])
        );
        let big = Full::new(Bytes::from(vec![0u8; 5]));
        assert_eq!(read_bounded(big, 4, soon()).await, None);
        // A body that never ends.
        let endless = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::io::Error>,
        >());
        assert_eq!(read_bounded(endless, 4, soon()).await, None);
    }
}
