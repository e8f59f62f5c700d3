//! The exporter's settings, read the way every OpenTelemetry SDK reads
//! them: a flag first, then the signal-specific `OTEL_EXPORTER_OTLP_TRACES_*`
//! variable, then the generic `OTEL_EXPORTER_OTLP_*` one, then the default;
//! endpoints completed as the OTLP exporter spec says, headers in the W3C
//! baggage format.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use super::cli::{parse_duration, Cli, OtlpProtocol};
use super::{ConfigError, Env, OtlpConfig, TlsConfig};

const HTTP_TRACES_PATH: &str = "/v1/traces";

/// The signal-specific variable, else the generic one: its value, its name,
/// and whether it was the signal-specific one.
fn otel_var(env: &Env, suffix: &str) -> Option<(String, String, bool)> {
    let specific = format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}");
    if let Some(v) = env(&specific) {
        return Some((v, specific, true));
    }
    let generic = format!("OTEL_EXPORTER_OTLP_{suffix}");
    env(&generic).map(|v| (v, generic, false))
}

/// A setting from its flag, else from its variable.
fn setting<T>(
    flag: Option<T>,
    env: &Env,
    suffix: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    match (flag, otel_var(env, suffix)) {
        (None, Some((v, name, _))) => parse(&v)
            .map(Some)
            .map_err(|reason| ConfigError::ParseEnv { name, reason }),
        (flag, _) => Ok(flag),
    }
}

impl Cli {
    pub(super) fn otlp_config(&self, env: &Env) -> Result<OtlpConfig, ConfigError> {
        let protocol =
            setting(self.otlp_protocol, env, "PROTOCOL", str::parse)?.unwrap_or(OtlpProtocol::Grpc);
        // (value, where it came from, whether it is a signal-specific URL
        // that the OTLP spec says to use as is)
        let (raw, source_name, as_is) = match (&self.otlp_endpoint, otel_var(env, "ENDPOINT")) {
            (Some(e), _) => (e.clone(), "--otlp-endpoint".to_owned(), false),
            (None, Some(v)) => v,
            (None, None) => {
                let default = match protocol {
                    OtlpProtocol::Grpc => "http://localhost:4317",
                    OtlpProtocol::HttpProtobuf => "http://localhost:4318",
                };
                (default.to_owned(), "the default".to_owned(), false)
            }
        };
        let insecure = setting(self.otlp_insecure, env, "INSECURE", parse_bool)?.unwrap_or(false);
        let endpoint = endpoint_uri(&raw, protocol, as_is, insecure).map_err(|reason| {
            ConfigError::ParseEndpoint {
                endpoint: raw.clone(),
                source_name,
                reason,
            }
        })?;

        let mut headers = Vec::new();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = env(name) {
                for item in v.split(',').filter(|i| !i.trim().is_empty()) {
                    headers.push(parse_header(item, name, true)?);
                }
            }
        }
        for item in &self.otlp_headers {
            headers.push(parse_header(item, "--otlp-header", false)?);
        }

        let timeout = setting(self.otlp_timeout, env, "TIMEOUT", parse_duration)?
            .unwrap_or(Duration::from_secs(10));
        if timeout.is_zero() {
            return Err(ConfigError::ParseEnv {
                name: "OTLP timeout".into(),
                reason: "must be greater than 0".into(),
            });
        }
        let file = |flag: &Option<String>, var: &str| {
            flag.clone()
                .or_else(|| otel_var(env, var).map(|(v, _, _)| v))
                .map(PathBuf::from)
        };
        let tls_files = TlsConfig {
            ca_file: file(&self.otlp_certificate, "CERTIFICATE"),
            client_cert: file(&self.otlp_client_certificate, "CLIENT_CERTIFICATE"),
            client_key: file(&self.otlp_client_key, "CLIENT_KEY"),
        };
        let (cert, key) = ("the client certificate", "the client key");
        let half = match (&tls_files.client_cert, &tls_files.client_key) {
            (Some(_), None) => Some((cert, "its key (--otlp-client-key)")),
            (None, Some(_)) => Some((key, "its certificate (--otlp-client-certificate)")),
            _ => None,
        };
        if let Some((given, missing)) = half {
            return Err(ConfigError::HalfClientIdentity { given, missing });
        }
        // As every SDK: the files only apply to a TLS endpoint.
        let tls = (endpoint.scheme_str() == Some("https")).then_some(tls_files);
        Ok(OtlpConfig {
            protocol,
            endpoint,
            headers,
            timeout,
            tls,
            compression: setting(self.otlp_compression, env, "COMPRESSION", str::parse)?
                .unwrap_or_default(),
        })
    }
}

/// `true`/`false`, as the OpenTelemetry SDKs read boolean variables.
fn parse_bool(s: &str) -> Result<bool, String> {
    let s = s.trim().to_ascii_lowercase();
    s.parse()
        .map_err(|_| format!("'{s}' is not a boolean: use true or false"))
}

/// The URL requests go to. Per the OTLP exporter spec, a generic HTTP endpoint
/// gets `/v1/traces` appended, a signal-specific one and gRPC's are used as is,
/// and a gRPC one without a scheme (`host:port`) is https unless `insecure`.
fn endpoint_uri(
    raw: &str,
    protocol: OtlpProtocol,
    as_is: bool,
    insecure: bool,
) -> Result<Uri, String> {
    let raw = raw.trim();
    let bad = |e: http::uri::InvalidUri| e.to_string();
    let mut uri: Uri = raw.parse().map_err(bad)?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(format!("unsupported scheme '{other}': use http or https")),
        None if protocol == OtlpProtocol::Grpc && uri.authority().is_some() => {
            let scheme = if insecure { "http" } else { "https" };
            uri = format!("{scheme}://{raw}").parse().map_err(bad)?;
        }
        None => return Err("missing scheme: expected e.g. http://localhost:4318".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    if protocol == OtlpProtocol::Grpc || as_is {
        return Ok(uri);
    }
    let path = uri.path().trim_end_matches('/').to_owned();
    if path.ends_with(HTTP_TRACES_PATH) {
        return Ok(uri);
    }
    let mut parts = uri.into_parts();
    let pq = format!("{path}{HTTP_TRACES_PATH}");
    parts.path_and_query = Some(pq.parse().map_err(bad)?);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// Parses `key=value`; values from OTEL variables are percent-encoded (W3C
/// baggage format), flag values are taken literally.
fn parse_header(
    item: &str,
    source_name: &'static str,
    percent_encoded: bool,
) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let err = |reason: String| ConfigError::ParseHeader {
        header: item.to_owned(),
        source_name,
        reason,
    };
    let (k, v) = item
        .split_once('=')
        .ok_or_else(|| err("expected key=value".into()))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(err("empty header name".into()));
    }
    let v = if percent_encoded {
        // As the SDKs read them: a `%` that starts no escape stays as it is.
        percent_encoding::percent_decode_str(v.trim())
            .decode_utf8()
            .map_err(|_| err("bad percent-encoding".into()))?
            .into_owned()
    } else {
        v.trim().to_owned()
    };
    let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| err(e.to_string()))?;
    let value = HeaderValue::from_str(&v).map_err(|e| err(e.to_string()))?;
    Ok((name, value))
}
