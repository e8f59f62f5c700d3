//! Connections to the collector: TCP, and for `https://` TLS (rustls, 1.2
//! and 1.3) against the system's roots or `--otlp-certificate`'s, with a
//! client certificate if given (mTLS).
//!
//! Certificates are rotated unannounced, so each new connection reloads
//! files whose size or modification time changed; one that does not load is
//! logged and the last good configuration kept (a rotation half done never
//! stops export). At startup every file must load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::Uri;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::coalesce::Coalesce;
use super::{error_chain, lock, ExportError};
use crate::config::{OtlpConfig, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("client key {path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("client key {key} does not match client certificate {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("CA bundle {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("no trusted root certificates found on this system (use --otlp-certificate)")]
    NoSystemRoots,
}

pub(crate) struct Tls {
    settings: TlsConfig,
    alpn: &'static [u8],
    /// The configuration, and its files' stamps then.
    loaded: Mutex<(Arc<ClientConfig>, Vec<Stamp>)>,
}

impl Tls {
    pub(crate) fn new(settings: &TlsConfig, alpn: &'static [u8]) -> Result<Tls, TlsError> {
        let config = Arc::new(build(settings, alpn)?);
        Ok(Tls {
            loaded: Mutex::new((config, stamps(settings))),
            settings: settings.clone(),
            alpn,
        })
    }

    /// For a new connection, reloaded if a file changed.
    pub(crate) fn current(&self) -> Arc<ClientConfig> {
        let mut loaded = lock(&self.loaded);
        let now = stamps(&self.settings);
        if now != loaded.1 {
            match build(&self.settings, self.alpn) {
                Ok(c) => {
                    tracing::info!("TLS files changed; new connections use them");
                    *loaded = (Arc::new(c), now);
                }
                // Retried at the next connection (a rotation half done).
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                }
            }
        }
        Arc::clone(&loaded.0)
    }
}

/// A file's size and modification time, to notice it changed.
type Stamp = Option<(u64, SystemTime)>;

fn stamps(s: &TlsConfig) -> Vec<Stamp> {
    [&s.ca_file, &s.client_cert, &s.client_key]
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(p.as_ref()?).ok()?;
            Some((md.len(), md.modified().ok()?))
        })
        .collect()
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let path = path.to_path_buf();
    std::fs::read(&path).map_err(|source| TlsError::ReadFile { what, path, source })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).flatten().collect();
    let path = path.to_path_buf();
    (!certs.is_empty())
        .then_some(certs)
        .ok_or(TlsError::NoCertificate { what, path })
}

fn build(s: &TlsConfig, alpn: &[u8]) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match &s.ca_file {
        Some(path) => {
            for cert in certificates("CA bundle", path)? {
                roots.add(cert).map_err(|e| TlsError::BadCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "reading a system root certificate");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::BadCa {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match (&s.client_cert, &s.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certificates("client certificate", cert)?;
            let key_pem = read("client key", key)?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|_| TlsError::NoKey { path: key.clone() })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| TlsError::KeyMismatch {
                    cert: cert.clone(),
                    key: key.clone(),
                    reason: e.to_string(),
                })?
        }
        // Validation makes sure both or neither are set.
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Dials `uri` (TCP, no Nagle), then TLS if `tls` is given.
async fn connect(uri: &Uri, tls: Option<&Tls>) -> io::Result<Stream> {
    // IPv6 without its brackets.
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connector = tokio_rustls::TlsConnector::from(tls.current());
    Ok(Box::new(connector.connect(name, tcp).await?))
}

/// Dials the collector for a transport's pool (hyper's, tonic's) within
/// `timeout`; with `coalesce` (h2's frames), a batch leaves in a few writes.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: Option<Arc<Tls>>,
    timeout: Duration,
    coalesce: bool,
}

impl tonic::codegen::Service<Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Stream>;
    type Error = io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, io::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move {
            let stream = tokio::time::timeout(c.timeout, connect(&uri, c.tls.as_deref()))
                .await
                .map_err(|_| {
                    let no = format!("no connection within {:?}", c.timeout);
                    io::Error::new(io::ErrorKind::TimedOut, no)
                })??;
            Ok(hyper_util::rt::TokioIo::new(match c.coalesce {
                true => Box::new(Coalesce::new(stream)),
                false => stream,
            }))
        })
    }
}

/// A startup step of reaching the collector, within `timeout`; a TLS
/// rejection told apart from a missing collector.
pub(crate) async fn within<T, E: std::error::Error + 'static>(
    endpoint: &str,
    timeout: Duration,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ExportError> {
    let endpoint = endpoint.to_owned();
    let reason = match tokio::time::timeout(timeout, step).await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) if is_tls_rejection(&e) => {
            let reason = error_chain(&e);
            return Err(ExportError::TlsHandshake { endpoint, reason });
        }
        Ok(Err(e)) => error_chain(&e),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    Err(ExportError::Connect { endpoint, reason })
}

/// How long the startup check listens after the handshake for a refusal.
const PROBE_LISTEN: Duration = Duration::from_millis(300);

/// Loads the TLS files and dials the collector as an export would (a
/// missing or untrusted one is a startup error); the pool's connector.
pub(crate) async fn reach(
    cfg: &OtlpConfig,
    alpn: &'static [u8],
    timeout: Duration,
) -> Result<Connector, ExportError> {
    let endpoint = cfg.endpoint.to_string();
    let tls = cfg.tls.as_ref().map(|t| Tls::new(t, alpn).map(Arc::new));
    let tls = tls.transpose().map_err(|source| ExportError::LoadTls {
        endpoint: endpoint.clone(),
        source,
    })?;
    // Over TLS 1.3 a collector refuses our certificate only after the
    // handshake ends on our side, so the check listens a moment: an alert
    // fails; data (HTTP/2's first frame) or silence (HTTP/1.1) passes.
    let probe = async {
        use tokio::io::AsyncReadExt;
        let mut stream = connect(&cfg.endpoint, tls.as_deref()).await?;
        if tls.is_some() {
            let mut byte = [0u8; 1];
            if let Ok(Err(e)) = tokio::time::timeout(PROBE_LISTEN, stream.read(&mut byte)).await {
                return Err(e);
            }
        }
        Ok::<_, io::Error>(())
    };
    within(&endpoint, timeout, probe).await?;
    Ok(Connector {
        tls,
        timeout,
        coalesce: alpn == b"h2",
    })
}

/// Whether an error or a cause is a certificate, the collector's or ours,
/// refused (the same files will fail again).
pub(crate) fn is_tls_rejection(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let tls = std::iter::successors(Some(e), |e| e.source()).find_map(|err| {
        err.downcast_ref::<rustls::Error>().or_else(|| {
            let inner = err.downcast_ref::<io::Error>()?.get_ref()?;
            inner.downcast_ref::<rustls::Error>()
        })
    });
    match tls {
        Some(
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InconsistentKeys(_),
        ) => true,
        Some(rustls::Error::AlertReceived(a)) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
        ),
        _ => false,
    }
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection to the collector: TCP, or TLS over it.
pub(crate) type Stream = Box<dyn Io>;

impl hyper_util::client::legacy::connect::Connection for Stream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}
