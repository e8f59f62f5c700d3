//! OTLP/HTTP transport: `POST <endpoint>`, `application/x-protobuf`, over
//! hyper's pooled HTTP/1.1 client. As the OTLP spec says: 429, 502, 503 and
//! 504 are retried (`Retry-After` honoured, in either form), 413 is too
//! large, other statuses are not retried, connection errors are; an error's
//! body is read as a `google.rpc.Status`.

use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::body::{compressed, read_bounded, RequestBody};
use super::retry::{Classify, Retry};
use super::tls::{self, Connector};
use super::{cut, error_chain, ExportError};
use crate::config::{Compression, OtlpConfig};
use crate::otlp::EncodedRequest;

/// A collector's response body is tiny; anything past this is not read.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// What of a collector's error is kept for the log, in bytes.
const MAX_DETAIL_BYTES: usize = 512;

pub(crate) struct HttpTransport {
    client: Client<Connector, RequestBody>,
    pub(super) cfg: OtlpConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// And whether a certificate, the collector's or ours, failed the handshake.
    #[error("sending request: {0}")]
    Send(String, bool),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("collector answered HTTP {status}: {body}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
}

impl Classify for HttpError {
    fn retry(&self) -> Retry {
        match self {
            HttpError::Send(_, true) => Retry::Never,
            HttpError::Send(..) | HttpError::Timeout(_) => Retry::Retryable,
            HttpError::Status {
                status,
                retry_after,
                ..
            } => match status.as_u16() {
                429 | 503 => Retry::Throttled(*retry_after),
                413 => Retry::TooLarge,
                502 | 504 => Retry::Retryable,
                _ => Retry::Never,
            },
        }
    }
}

impl HttpTransport {
    pub(crate) async fn connect(
        cfg: &OtlpConfig,
        connect_timeout: Duration,
    ) -> Result<Self, ExportError> {
        let connector = tls::reach(cfg, b"http/1.1", connect_timeout).await?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let cfg = cfg.clone();
        Ok(Self { client, cfg })
    }

    pub(crate) async fn export(
        &self,
        body: &EncodedRequest,
    ) -> Result<ExportTraceServiceResponse, HttpError> {
        let cfg = &self.cfg;
        let body = &*compressed(cfg.compression, body);
        let mut req = Request::post(cfg.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(RequestBody::new(None, body))
            .map_err(|e| HttpError::Send(e.to_string(), false))?;
        if cfg.compression == Compression::Gzip {
            req.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        req.headers_mut().extend(cfg.headers.iter().cloned());
        let deadline = tokio::time::Instant::now() + cfg.timeout;
        let resp = tokio::time::timeout_at(deadline, self.client.request(req))
            .await
            .map_err(|_| HttpError::Timeout(cfg.timeout))?
            .map_err(|e| HttpError::Send(error_chain(&e), tls::is_tls_rejection(&e)))?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        // The status decides: a body over the bound or the deadline is left
        // unread (after a 2xx, sending again would duplicate the spans).
        let body = read_bounded(resp.into_body(), MAX_RESPONSE_BYTES, deadline).await;
        if !status.is_success() {
            return Err(HttpError::Status {
                status,
                retry_after,
                body: error_detail(&body.unwrap_or_default()),
            });
        }
        // An empty body, or one that is no response message: full success.
        Ok(body
            .and_then(|b| ExportTraceServiceResponse::decode(b).ok())
            .unwrap_or_default())
    }
}

/// What a collector said with an error status, at most [`MAX_DETAIL_BYTES`]:
/// its `google.rpc.Status` message, or else (a proxy's page) the body.
fn error_detail(body: &[u8]) -> String {
    let text = match tonic_types::pb::Status::decode(body) {
        Ok(status) if !status.message.is_empty() => status.message,
        _ => String::from_utf8_lossy(body.get(..MAX_DETAIL_BYTES).unwrap_or(body)).into_owned(),
    };
    cut(text, MAX_DETAIL_BYTES)
}

/// `Retry-After`, as delay-seconds or an HTTP-date (RFC 9110 10.2.3). A
/// date past (or our clock ahead) is no hint: our backoff applies.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    at.duration_since(std::time::SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::Uri;
    use std::sync::Arc;

    fn status(code: u16, retry_after: Option<u64>) -> HttpError {
        HttpError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            body: String::new(),
        }
    }

    #[test]
    fn classifies_per_otlp_spec() {
        assert_eq!(
            status(429, Some(3)).retry(),
            Retry::Throttled(Some(Duration::from_secs(3)))
        );
        assert_eq!(status(503, None).retry(), Retry::Throttled(None));
        assert_eq!(status(502, None).retry(), Retry::Retryable);
        assert_eq!(status(504, None).retry(), Retry::Retryable);
        assert_eq!(status(400, None).retry(), Retry::Never);
        assert_eq!(status(413, None).retry(), Retry::TooLarge);
        assert_eq!(status(500, None).retry(), Retry::Never);
        let refused = HttpError::Send("refused".into(), false);
        assert_eq!(refused.retry(), Retry::Retryable);
    }

    fn hint(value: &str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        retry_after(&h)
    }

    #[test]
    fn reads_retry_after_seconds() {
        assert_eq!(hint(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(hint("0"), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn reads_retry_after_http_date() {
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        let got = hint(&httpdate::fmt_http_date(in_a_minute)).unwrap();
        // The date has whole seconds: up to one less than asked.
        assert!(
            (Duration::from_secs(58)..=Duration::from_secs(60)).contains(&got),
            "{got:?}"
        );
        // Past: no hint, our own backoff.
        assert_eq!(hint("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        // The obsolete forms a recipient must also accept (RFC 9110 5.6.7).
        let far = hint("Sunday, 06-Nov-94 08:49:37 GMT");
        assert_eq!(far, None, "1994 is past");
    }

    #[test]
    fn ignores_a_garbage_retry_after() {
        for garbage in [
            "soon",
            "-5",
            "1.5",
            "7s",
            "Wed, 99 Foo 2015 07:28:00 GMT",
            "",
        ] {
            assert_eq!(hint(garbage), None, "{garbage:?}");
        }
        // Not even text: ignored, not an error.
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_bytes(b"\xff7").unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    fn rpc_status(code: i32, message: &str) -> Vec<u8> {
        tonic_types::pb::Status {
            code,
            message: message.into(),
            details: Vec::new(),
        }
        .encode_to_vec()
    }

    #[test]
    fn an_error_body_is_read_as_a_google_rpc_status() {
        let body = rpc_status(3, "resource spans: missing service.name");
        assert_eq!(error_detail(&body), "resource spans: missing service.name");
        // Not a Status: the text, as it is, bounded.
        assert_eq!(error_detail(b"Bad Gateway"), "Bad Gateway");
        assert_eq!(error_detail(b""), "");
        let page = "<html>".repeat(1000);
        assert_eq!(error_detail(page.as_bytes()).len(), MAX_DETAIL_BYTES);
        // A Status with a long message (of multi-byte characters): cut
        // within the bound, on a character's boundary.
        let long = "\u{e9}".repeat(MAX_DETAIL_BYTES);
        let cut = error_detail(&rpc_status(8, &long));
        assert!(cut.len() <= MAX_DETAIL_BYTES && cut.len() >= MAX_DETAIL_BYTES - 1);
        assert!(cut.chars().all(|c| c == '\u{e9}'));
    }

    /// An OTLP/HTTP receiver on loopback whose answer to its `n`th request
    /// (from 0) is `answer(n)`; its endpoint.
    pub(in crate::export) async fn receiver<F>(answer: F) -> Uri
    where
        F: Fn(usize) -> http::Response<http_body_util::Full<bytes::Bytes>> + Send + Sync + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, seen) = (Arc::clone(&answer), Arc::clone(&seen));
                let svc = hyper::service::service_fn(move |_| {
                    let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let resp = answer(n);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        format!("http://{addr}/v1/traces").parse().unwrap()
    }

    /// An answer with `status`, `headers` and `body`.
    pub(in crate::export) fn response(
        status: u16,
        headers: &[(&'static str, &str)],
        body: Vec<u8>,
    ) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let mut r = http::Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/x-protobuf");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(http_body_util::Full::new(body.into())).unwrap()
    }

    /// A transport to `endpoint`, over plain HTTP.
    pub(in crate::export) async fn transport(endpoint: Uri) -> HttpTransport {
        let cfg = OtlpConfig {
            protocol: crate::config::OtlpProtocol::HttpProtobuf,
            endpoint,
            headers: Vec::new(),
            timeout: Duration::from_secs(5),
            tls: None,
            compression: Compression::default(),
        };
        HttpTransport::connect(&cfg, Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// A collector refusing a request with 400 and the `google.rpc.Status`
    /// the spec has it send: the error carries the Status's message.
    #[tokio::test]
    async fn a_400_from_the_collector_is_logged_by_its_status_message() {
        let message = "ResourceSpans[0]: invalid trace id";
        let body = rpc_status(3, message);
        let endpoint = receiver(move |_| response(400, &[], body.clone())).await;
        let t = transport(endpoint).await;
        let err = t
            .export(&EncodedRequest::from(bytes::Bytes::from_static(b"")))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HttpError::Status { status, body, .. }
                if status.as_u16() == 400 && body == message),
            "{err:?}"
        );
        assert_eq!(err.retry(), Retry::Never);
        assert_eq!(
            err.to_string(),
            format!("collector answered HTTP 400 Bad Request: {message}")
        );
    }
}
