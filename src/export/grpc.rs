//! OTLP/gRPC transport (`TraceService/Export` over HTTP/2, via tonic).
//!
//! tonic's client would copy the [`EncodedRequest`]'s pieces into one
//! buffer, so the request (the message behind a 5-byte header: compression
//! flag, big-endian length) is built here and sent through tonic's
//! `Channel`; tonic's decoder reads the answer.

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::body::{compressed, RequestBody};
use super::retry::{Classify, Retry};
use super::tls::{self, within};
use super::ExportError;
use crate::config::{Compression, OtlpConfig};
use crate::otlp::EncodedRequest;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// A collector's answer is a few bytes; anything larger is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub(crate) struct GrpcTransport {
    channel: Channel,
    pub(super) cfg: OtlpConfig,
}

impl GrpcTransport {
    /// Connects eagerly: a missing collector is a startup error.
    pub(crate) async fn connect(
        cfg: &OtlpConfig,
        connect_timeout: Duration,
    ) -> Result<Self, ExportError> {
        let endpoint_str = cfg.endpoint.to_string();
        let connector = tls::reach(cfg, b"h2", connect_timeout).await?;
        let endpoint = Endpoint::from(cfg.endpoint.clone())
            .connect_timeout(connect_timeout)
            .timeout(cfg.timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let connect = endpoint.connect_with_connector(connector);
        let channel = within(&endpoint_str, connect_timeout, connect).await?;
        // Binary (`-bin`) metadata would need base64: OTLP headers are text.
        let binary = |(k, v): &&(HeaderName, HeaderValue)| {
            k.as_str().ends_with("-bin") || v.to_str().is_err()
        };
        if let Some((k, _)) = cfg.headers.iter().find(binary) {
            return Err(ExportError::Connect {
                endpoint: endpoint_str,
                reason: format!("header '{k}' is not valid gRPC text metadata"),
            });
        }
        let cfg = cfg.clone();
        Ok(Self { channel, cfg })
    }

    /// Within `--otlp-timeout` for the whole call (the channel's own
    /// timeout ends at the response headers).
    pub(crate) async fn export(
        &self,
        body: &EncodedRequest,
    ) -> Result<ExportTraceServiceResponse, GrpcError> {
        let timeout = self.cfg.timeout;
        tokio::time::timeout(timeout, self.call(body))
            .await
            .unwrap_or_else(|_| {
                let no = format!("no complete answer within {timeout:?}");
                Err(GrpcError(Status::deadline_exceeded(no)))
            })
    }

    async fn call(&self, body: &EncodedRequest) -> Result<ExportTraceServiceResponse, GrpcError> {
        let gzip = self.cfg.compression == Compression::Gzip;
        let body = &*compressed(self.cfg.compression, body);
        let n = body.len();
        let len = u32::try_from(n).map_err(|_| {
            let over = format!("request of {n} bytes is over gRPC's 4 GiB message limit");
            GrpcError(Status::resource_exhausted(over))
        })?;
        let prefix = Bytes::from([&[u8::from(gzip)][..], &len.to_be_bytes()].concat());
        let body = RequestBody::new(Some(prefix), body);
        // The channel fills in the scheme and authority.
        let mut req = http::Request::post(EXPORT_PATH)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(tonic::body::Body::new(body))
            .map_err(|e| GrpcError(Status::internal(e.to_string())))?;
        let h = req.headers_mut();
        if gzip {
            h.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        }
        h.extend(self.cfg.headers.iter().cloned());
        // A clone shares the connection (the replayer's and the batcher's).
        let mut channel = self.channel.clone();
        let failed = |e: tonic::transport::Error| GrpcError(Status::from_error(Box::new(e)));
        poll_fn(|cx| channel.poll_ready(cx)).await.map_err(failed)?;
        let resp = channel.call(req).await.map_err(failed)?;
        // An error may come as headers alone ("trailers-only").
        let status = Status::from_header_map(resp.headers());
        if let Some(status) = status.filter(|s| s.code() != Code::Ok) {
            return Err(GrpcError(status));
        }
        let status_code = resp.status();
        let mut answer = Streaming::new_response(
            ResponseDecoder,
            resp.into_body(),
            status_code,
            None,
            Some(MAX_RESPONSE_BYTES),
        );
        // The trailers too: a failure status may follow the message.
        let message = answer.message().await.map_err(GrpcError)?;
        while answer.message().await.map_err(GrpcError)?.is_some() {}
        Ok(message.unwrap_or_default())
    }
}

/// A failed gRPC export, classified by status code per the OTLP spec.
#[derive(Debug, thiserror::Error)]
#[error("gRPC status {}: {}", .0.code(), .0.message())]
pub struct GrpcError(pub Status);

impl Classify for GrpcError {
    fn retry(&self) -> Retry {
        // Whatever the code says, the same certificates fail again.
        if tls::is_tls_rejection(&self.0) {
            return Retry::Never;
        }
        use tonic_types::StatusExt;
        let status = &self.0;
        match status.code() {
            Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss => Retry::Retryable,
            // With a `RetryInfo` delay, throttling; without, over the
            // collector's message limit (grpc-go's `max_recv_msg_size`, 4 MiB
            // by default). A zero delay (or negative, read so) is no hint.
            Code::ResourceExhausted => status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay)
                .filter(|d| !d.is_zero())
                .map_or(Retry::TooLarge, |d| Retry::Throttled(Some(d))),
            // tonic's connection failures: Unknown with a transport source.
            Code::Unknown
                if std::error::Error::source(status).is_some()
                    || status.message().contains("transport error") =>
            {
                Retry::Retryable
            }
            _ => Retry::Never,
        }
    }
}

struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding export response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as a collector sends it: `google.rpc.Status` in the
    /// details, built from the raw messages so that a negative delay (which
    /// no well-behaved server sends) can be built too.
    fn status_with_retry_info(code: Code, delay: Option<(i64, i32)>) -> Status {
        use tonic_types::pb;
        let details = pb::Status {
            code: code as i32,
            message: "slow down".into(),
            details: delay
                .map(|(seconds, nanos)| prost_types::Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: pb::RetryInfo {
                        retry_delay: Some(prost_types::Duration { seconds, nanos }),
                    }
                    .encode_to_vec(),
                })
                .into_iter()
                .collect(),
        };
        Status::with_details(code, "slow down", details.encode_to_vec().into())
    }

    #[test]
    fn classifies_per_otlp_spec() {
        assert_eq!(
            GrpcError(Status::unavailable("x")).retry(),
            Retry::Retryable
        );
        assert_eq!(
            GrpcError(Status::deadline_exceeded("x")).retry(),
            Retry::Retryable
        );
        assert_eq!(
            GrpcError(Status::invalid_argument("x")).retry(),
            Retry::Never
        );
        assert_eq!(
            GrpcError(Status::unauthenticated("x")).retry(),
            Retry::Never
        );
        assert_eq!(
            GrpcError(status_with_retry_info(Code::ResourceExhausted, None)).retry(),
            Retry::TooLarge
        );
        assert_eq!(
            GrpcError(Status::resource_exhausted(
                "grpc: received message larger than max (7340032 vs. 4194304)"
            ))
            .retry(),
            Retry::TooLarge
        );
        assert_eq!(
            GrpcError(status_with_retry_info(
                Code::ResourceExhausted,
                Some((2, 500_000_000))
            ))
            .retry(),
            Retry::Throttled(Some(Duration::from_millis(2500)))
        );
        // A negative hint is nonsense from the server: not a throttle.
        assert_eq!(
            GrpcError(status_with_retry_info(
                Code::ResourceExhausted,
                Some((-1, 0))
            ))
            .retry(),
            Retry::TooLarge
        );
    }
}
