//! OTLP/gRPC transport (`TraceService/Export` over HTTP/2, via tonic).
//!
//! Requests arrive here already encoded: the batcher encodes a batch once and
//! retries resend the same bytes, so the unary call uses a codec that writes
//! the bytes through instead of re-encoding a message per attempt.

use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::uri::PathAndQuery;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::retry::{Classify, Retry};
use super::{error_chain, ExportError};
use crate::config::OtlpConfig;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

pub struct GrpcTransport {
    client: tonic::client::Grpc<Channel>,
    metadata: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    endpoint: String,
}

impl GrpcTransport {
    /// Connects eagerly, so that a missing collector is reported at startup
    /// rather than at the first span.
    pub async fn connect(cfg: &OtlpConfig, connect_timeout: Duration) -> Result<Self, ExportError> {
        let endpoint_str = cfg.endpoint.to_string();
        let endpoint = Endpoint::from_shared(endpoint_str.clone())
            .map_err(|e| ExportError::Connect {
                endpoint: endpoint_str.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(connect_timeout)
            .timeout(cfg.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout(connect_timeout, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(ExportError::Connect {
                    endpoint: endpoint_str,
                    reason: error_chain(&e),
                })
            }
            Err(_) => {
                return Err(ExportError::Connect {
                    endpoint: endpoint_str,
                    reason: format!("no answer within {connect_timeout:?}"),
                })
            }
        };
        let mut metadata = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let key = MetadataKey::from_bytes(k.as_str().as_bytes()).map_err(|e| {
                ExportError::Connect {
                    endpoint: endpoint_str.clone(),
                    reason: format!("header '{k}' is not valid gRPC metadata: {e}"),
                }
            })?;
            let value = v
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ExportError::Connect {
                    endpoint: endpoint_str.clone(),
                    reason: format!("value of header '{k}' is not valid gRPC metadata"),
                })?;
            metadata.push((key, value));
        }
        Ok(Self {
            client: tonic::client::Grpc::new(channel),
            metadata,
            endpoint: endpoint_str,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one encoded `ExportTraceServiceRequest`.
    pub async fn export(&self, body: Bytes) -> Result<ExportTraceServiceResponse, GrpcError> {
        // Cloning shares the channel; it is how tonic clients are used concurrently.
        let mut client = self.client.clone();
        client
            .ready()
            .await
            .map_err(|e| GrpcError(Status::unavailable(error_chain(&e))))?;
        let len = body.len();
        let mut req = tonic::Request::new(body);
        for (k, v) in &self.metadata {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        let path = PathAndQuery::from_static(EXPORT_PATH);
        client
            .unary(req, path, PreEncoded { len })
            .await
            .map(tonic::Response::into_inner)
            .map_err(GrpcError)
    }
}

/// A failed gRPC export, classified by status code per the OTLP spec.
#[derive(Debug, thiserror::Error)]
#[error("gRPC status {}: {}", .0.code(), .0.message())]
pub struct GrpcError(pub Status);

impl Classify for GrpcError {
    fn retry(&self) -> Retry {
        match self.0.code() {
            Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss => Retry::Retryable,
            // Only retryable when the server says when; otherwise the
            // collector is telling us the data is too much, for good.
            Code::ResourceExhausted => match retry_delay(&self.0) {
                Some(d) => Retry::Throttled(Some(d)),
                None => Retry::Never,
            },
            // tonic reports connection failures as Unknown with a transport
            // error source; those are worth retrying.
            Code::Unknown if is_transport_error(&self.0) => Retry::Retryable,
            _ => Retry::Never,
        }
    }
}

fn is_transport_error(status: &Status) -> bool {
    std::error::Error::source(status).is_some() || status.message().contains("transport error")
}

/// Reads `google.rpc.RetryInfo.retry_delay` from a status's details.
fn retry_delay(status: &Status) -> Option<Duration> {
    let details = RpcStatus::decode(status.details()).ok()?;
    details
        .details
        .iter()
        .filter(|a| a.type_url == RETRY_INFO_TYPE)
        .find_map(|a| RetryInfo::decode(a.value.as_slice()).ok()?.retry_delay)
        .and_then(|d| {
            let secs = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok()?;
            Some(Duration::new(secs, nanos.min(999_999_999)))
        })
}

// The few google.rpc messages needed to read a throttling hint.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// Writes already-encoded request bytes; decodes the response message.
/// `len` is the request's size: tonic's buffer is made that large at once
/// instead of doubling its way up (and copying) from 8 KiB per request.
struct PreEncoded {
    len: usize,
}

struct BytesEncoder {
    len: usize,
}

struct ResponseDecoder;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = BytesEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder { len: self.len }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The gRPC message header (5 bytes) comes first; 32 KiB is tonic's
        // default yield threshold.
        BufferSettings::new(self.len + 5, 32 * 1024)
    }
}

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

    fn status_with_retry_info(code: Code, delay: Option<(i64, i32)>) -> Status {
        let details = RpcStatus {
            code: code as i32,
            message: "slow down".into(),
            details: delay
                .map(|(seconds, nanos)| ProtoAny {
                    type_url: RETRY_INFO_TYPE.into(),
                    value: RetryInfo {
                        retry_delay: Some(ProtoDuration { seconds, nanos }),
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
            Retry::Never
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
            Retry::Never
        );
    }
}
