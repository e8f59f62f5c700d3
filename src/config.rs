//! Command line, environment and the validated configuration.
//!
//! The flags are a drop-in for the Kata tree's `kata-trace-forwarder`
//! (`--trace-name`, `--otlp-endpoint`, `--socket-path`, `--vsock-cid`,
//! `--vsock-port`, `-l/--log-level`, `--dump-only`, `-v/--version`) plus
//! what a production daemon needs. Exporter settings follow the
//! OpenTelemetry SDK environment conventions (`OTEL_EXPORTER_OTLP_*`,
//! `OTEL_BSP_*`), with flags taking precedence. Everything is checked here,
//! once, so the rest of the program works from a [`Config`] that is known
//! to be valid.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use http::{HeaderName, HeaderValue, Uri};

pub use crate::addr::{SocketTemplate, VsockCid};

pub const DEFAULT_VSOCK_PORT: u32 = 10240;
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const HTTP_TRACES_PATH: &str = "/v1/traces";

const ABOUT: &str = "Forwards Kata Containers agent trace spans from the guest VM (VSOCK or \
hybrid VSOCK) to an OpenTelemetry collector (Jaeger, OpenTelemetry Collector, Tempo, ...).";

const LONG_ABOUT: &str = "Forwards Kata Containers agent trace spans from the guest VM to an \
OpenTelemetry collector.

The Kata agent, with tracing enabled, sends each span it finishes over VSOCK to the host. This \
daemon receives them, from any number of sandboxes at once, in the wire format of any Kata \
release (JSON from Kata 3.29, bincode from 2.2 to 3.28), and exports them over OTLP (gRPC or \
HTTP) so that they join the Kata runtime's own trace. Start the collector first, then the \
forwarder, then the sandbox.";

const AFTER_HELP: &str = "Examples:
  QEMU (standard VSOCK; no privileges needed):
    kata-trace-forwarder

  Cloud Hypervisor (hybrid VSOCK; socket template from `kata-runtime env --json`):
    sudo mkdir -p /run/vc/vm/foo
    sudo kata-trace-forwarder --socket-path /run/vc/vm/foo/clh.sock

  Firecracker (hybrid VSOCK):
    sudo mkdir -p /run/vc/firecracker/foo/root
    sudo kata-trace-forwarder --socket-path /run/vc/firecracker/foo/root/kata.hvsock

  Every Cloud Hypervisor or Firecracker sandbox on the host, as they come and go:
    T=$(sudo kata-runtime env --json | jq -r .Hypervisor.SocketPath)
    sudo kata-trace-forwarder --socket-path-template \"$T\"

  OTLP over HTTP to an OpenTelemetry Collector:
    kata-trace-forwarder --otlp-protocol http/protobuf --otlp-endpoint http://collector:4318

  No collector, print spans as OTLP JSON lines:
    kata-trace-forwarder --dump-only --socket-path /tmp/kata/test.sock

Environment (flags take precedence): OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, \
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL, \
OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_HEADERS, \
OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, \
OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE.";

/// Log levels of the Kata tool, `critical` included (it maps to `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Text,
}

/// OTLP transport, named as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            "http/json" => Err(
                "OTLP protocol 'http/json' is not supported; use 'grpc' or 'http/protobuf'".into(),
            ),
            other => Err(format!(
                "unknown OTLP protocol '{other}'; expected 'grpc' or 'http/protobuf'"
            )),
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Parses a duration: `250ms`, `5s`, `2m`, or a bare number of milliseconds
/// (the unit of the `OTEL_*` timeout variables).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: expected e.g. 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration '{s}' is too large")),
        _ => Err(format!(
            "'{s}' has an unknown unit '{unit}': use ms, s or m"
        )),
    }
}

fn parse_port(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("port must not be 0".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("'{s}' is not a port number")),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive whole number")),
    }
}

/// Parses a byte size: a number with an optional `KiB`/`MiB`/`GiB` suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("KiB") {
        (n, 1usize << 10)
    } else if let Some(n) = t.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("GiB") {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size: expected e.g. 4MiB, 512KiB or 65536"))?;
    match n.checked_mul(mult) {
        Some(0) => Err("size must not be 0".into()),
        Some(v) => Ok(v),
        None => Err(format!("size '{s}' is too large")),
    }
}

fn parse_socket_template(s: &str) -> Result<SocketTemplate, String> {
    s.parse()
}

/// The command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kata-trace-forwarder",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    disable_version_flag = true
)]
pub struct Cli {
    /// Print version.
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    version: Option<bool>,

    /// Service name given to the agent's spans (resource attribute `service.name`).
    #[arg(long, default_value = "kata-agent", value_parser = NonEmptyStringValueParser::new())]
    pub trace_name: String,

    /// OTLP endpoint of the collector [default: http://localhost:4317 for grpc,
    /// http://localhost:4318 for http/protobuf]. For http/protobuf, `/v1/traces` is
    /// appended unless the path already ends with it.
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport: `grpc` or `http/protobuf` [default: grpc].
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<OtlpProtocol>,

    /// Extra header for every export request, `key=value`; repeatable. Adds to
    /// OTEL_EXPORTER_OTLP_HEADERS.
    #[arg(long = "otlp-header", value_name = "KEY=VALUE")]
    pub otlp_headers: Vec<String>,

    /// Timeout of one export request [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub otlp_timeout: Option<Duration>,

    /// Hybrid VSOCK (Cloud Hypervisor, Firecracker): the sandbox's VSOCK Unix socket
    /// path. The forwarder listens on `<PATH>_<vsock-port>`.
    #[arg(long, value_parser = NonEmptyStringValueParser::new(), value_name = "PATH")]
    pub socket_path: Option<String>,

    /// Hybrid VSOCK, every sandbox on the host: the socket path template that
    /// `kata-runtime env --json | jq .Hypervisor.SocketPath` prints (quotes
    /// tolerated), e.g. `/run/vc/vm/{ID}/clh.sock` or
    /// `/run/vc/firecracker/{ID}/root/kata.hvsock`. The forwarder watches the
    /// directory above `{ID}` and listens on `<socket>_<vsock-port>` in each
    /// sandbox as it appears; spans get `kata.sandbox.id`.
    #[arg(
        long,
        value_parser = parse_socket_template,
        value_name = "TEMPLATE",
        conflicts_with_all = ["socket_path", "vsock_cid"]
    )]
    pub socket_path_template: Option<SocketTemplate>,

    /// With --socket-path-template: most sandboxes served at once; more are
    /// logged and left alone until one goes.
    #[arg(long, default_value = "1024", value_parser = parse_positive)]
    pub max_sandboxes: usize,

    /// Standard VSOCK (QEMU): context id to listen on, a number or `any`.
    #[arg(long, default_value = "any", value_name = "CID")]
    pub vsock_cid: VsockCid,

    /// VSOCK port the agent sends to.
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT, value_parser = parse_port, value_name = "PORT")]
    pub vsock_port: u32,

    /// Log level: trace, debug, info, warn, error, critical.
    #[arg(
        short = 'l',
        long,
        value_enum,
        default_value = "info",
        ignore_case = true
    )]
    pub log_level: LogLevel,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Do not export: write each span to stdout as one OTLP JSON line. Needs no collector.
    #[arg(long)]
    pub dump_only: bool,

    /// Most spans in one export request.
    #[arg(long, env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", default_value = "512", value_parser = parse_positive)]
    pub batch_max_spans: usize,

    /// Longest a span waits for its batch to fill before it is sent.
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", default_value = "200ms", value_parser = parse_duration, value_name = "DURATION")]
    pub batch_timeout: Duration,

    /// Most spans buffered between the sockets and the exporter; when full, the
    /// forwarder stops reading from the agents.
    #[arg(long, env = "OTEL_BSP_MAX_QUEUE_SIZE", default_value = "8192", value_parser = parse_positive)]
    pub queue_size: usize,

    /// Most bytes of spans buffered between the sockets and the exporter (by
    /// payload size); when full, the forwarder stops reading from the agents.
    #[arg(long, default_value = "32MiB", value_parser = parse_size, value_name = "SIZE")]
    pub queue_bytes: usize,

    /// Durable spool: batches that cannot be exported while the queue fills up,
    /// or at shutdown, are written here and sent when the collector is back
    /// (also after a restart).
    #[arg(long, value_name = "DIR", value_parser = NonEmptyStringValueParser::new())]
    pub spool_dir: Option<String>,

    /// Most bytes the spool may hold.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub spool_max_bytes: usize,

    /// Serve the counters in the Prometheus text format at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Largest frame accepted from an agent; a longer one closes that connection.
    #[arg(long, default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_frame_size: usize,

    /// Most agent connections served at once; more are accepted, logged and closed.
    #[arg(long, default_value = "1024", value_parser = parse_positive)]
    pub max_connections: usize,

    /// Threads that serve agents and export. One keeps up with several hundred
    /// thousand spans per second at the least CPU per span; more add throughput
    /// past that, at more CPU per span.
    #[arg(long, default_value = "1", value_parser = parse_positive, value_name = "N")]
    pub worker_threads: usize,

    /// User to switch to when started as root in hybrid mode (after binding) or
    /// template mode (at start; the sandbox watcher keeps CAP_DAC_OVERRIDE).
    #[arg(long, default_value = "nobody", value_parser = NonEmptyStringValueParser::new())]
    pub user: String,

    /// How often the counters are logged, when they have changed.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub stats_interval: Duration,

    /// On SIGTERM/SIGINT, how long to keep draining and flushing before exiting.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,
}

/// Where the agent connections come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenMode {
    /// AF_VSOCK on the host kernel (QEMU).
    Vsock { cid: VsockCid, port: u32 },
    /// A Unix socket at `<socket_path>_<port>` (Cloud Hypervisor, Firecracker).
    Hybrid { socket_path: PathBuf, port: u32 },
    /// One Unix socket per sandbox, at the template's `<socket>_<port>`.
    Template {
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
    },
}

/// What the `listen` stage reads: where to listen, how many connections to
/// serve at once, and whom to become once the sockets are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub mode: ListenMode,
    pub max_connections: usize,
    /// Whom to become after binding, when started as root in a hybrid mode.
    pub user: String,
}

/// What the `ingest` stage reads: how large a frame may be, and the
/// resource every span gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    pub max_frame_size: usize,
    /// `service.name` of every span's resource (the `--trace-name`).
    pub service_name: String,
}

/// The queue between the connections and the exporter, bounded twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_spans: usize,
    pub max_bytes: usize,
}

/// When a batch is sent: full, or its oldest span has waited long enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_spans: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// What the `export` stage reads.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub output: Output,
    pub queue: QueueConfig,
    pub batch: BatchConfig,
    pub spool: Option<SpoolConfig>,
}

/// The forwarder's own telemetry: the counters' endpoint and log interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    pub metrics_address: Option<std::net::SocketAddr>,
    pub stats_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The full URL requests go to (for HTTP, including `/v1/traces`).
    pub endpoint: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Output {
    Otlp(OtlpConfig),
    /// OTLP JSON lines on stdout.
    Dump,
}

/// The validated configuration, grouped by the stage that reads it.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub ingest: IngestConfig,
    pub export: ExportConfig,
    pub telemetry: TelemetryConfig,
    /// 1: a single-threaded runtime; more: a multi-threaded one.
    pub worker_threads: usize,
    /// How long shutdown may drain and flush.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid OTLP endpoint '{endpoint}' (from {source_name}): {reason}")]
    ParseEndpoint {
        endpoint: String,
        source_name: &'static str,
        reason: String,
    },
    #[error("invalid {name}: {reason}")]
    ParseEnv { name: &'static str, reason: String },
    #[error("invalid OTLP header '{header}' (from {source_name}): {reason}")]
    ParseHeader {
        header: String,
        source_name: &'static str,
        reason: String,
    },
    #[error("--spool-dir has no use with --dump-only, which never fails to export")]
    SpoolWithDump,
    #[error("--batch-max-spans ({batch}) must not exceed --queue-size ({queue})")]
    BatchLargerThanQueue { batch: usize, queue: usize },
}

/// Reads the environment; injectable so tests need not touch the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment; unset and empty variables count as absent, as
/// the OpenTelemetry SDKs treat them.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Reads the signal-specific variable, falling back to the generic one.
fn otel_var(env: &dyn Env, suffix: &str) -> Option<(String, &'static str, bool)> {
    let (specific, generic): (&'static str, &'static str) = match suffix {
        "ENDPOINT" => (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        "PROTOCOL" => (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        "TIMEOUT" => (
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
        _ => return None,
    };
    if let Some(v) = env.var(specific) {
        return Some((v, specific, true));
    }
    env.var(generic).map(|v| (v, generic, false))
}

impl Cli {
    /// Validates the command line against the environment.
    pub fn into_config(self, env: &dyn Env) -> Result<Config, ConfigError> {
        let mode = match (&self.socket_path, &self.socket_path_template) {
            (_, Some(t)) => ListenMode::Template {
                template: t.clone(),
                port: self.vsock_port,
                max_sandboxes: self.max_sandboxes,
            },
            (Some(p), None) => ListenMode::Hybrid {
                socket_path: PathBuf::from(p),
                port: self.vsock_port,
            },
            (None, None) => ListenMode::Vsock {
                cid: self.vsock_cid,
                port: self.vsock_port,
            },
        };
        if self.spool_dir.is_some() && self.dump_only {
            return Err(ConfigError::SpoolWithDump);
        }
        if self.batch_max_spans > self.queue_size {
            return Err(ConfigError::BatchLargerThanQueue {
                batch: self.batch_max_spans,
                queue: self.queue_size,
            });
        }
        let output = if self.dump_only {
            Output::Dump
        } else {
            Output::Otlp(self.otlp_config(env)?)
        };
        Ok(Config {
            listen: ListenConfig {
                mode,
                max_connections: self.max_connections,
                user: self.user,
            },
            ingest: IngestConfig {
                max_frame_size: self.max_frame_size,
                service_name: self.trace_name,
            },
            export: ExportConfig {
                output,
                queue: QueueConfig {
                    max_spans: self.queue_size,
                    max_bytes: self.queue_bytes,
                },
                batch: BatchConfig {
                    max_spans: self.batch_max_spans,
                    timeout: self.batch_timeout,
                },
                spool: self.spool_dir.map(|dir| SpoolConfig {
                    dir: PathBuf::from(dir),
                    max_bytes: self.spool_max_bytes as u64,
                }),
            },
            telemetry: TelemetryConfig {
                metrics_address: self.metrics_address,
                stats_interval: self.stats_interval,
            },
            worker_threads: self.worker_threads,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    fn otlp_config(&self, env: &dyn Env) -> Result<OtlpConfig, ConfigError> {
        let protocol = match self.otlp_protocol {
            Some(p) => p,
            None => match otel_var(env, "PROTOCOL") {
                Some((v, name, _)) => v
                    .parse()
                    .map_err(|reason| ConfigError::ParseEnv { name, reason })?,
                None => OtlpProtocol::Grpc,
            },
        };
        // (value, where it came from, whether it is a signal-specific URL
        // that the OTLP spec says to use as is)
        let (raw, source_name, as_is) = match &self.otlp_endpoint {
            Some(e) => (e.clone(), "--otlp-endpoint", false),
            None => match otel_var(env, "ENDPOINT") {
                Some(v) => v,
                None => (
                    match protocol {
                        OtlpProtocol::Grpc => DEFAULT_GRPC_ENDPOINT,
                        OtlpProtocol::HttpProtobuf => DEFAULT_HTTP_ENDPOINT,
                    }
                    .to_owned(),
                    "the default",
                    false,
                ),
            },
        };
        let endpoint =
            endpoint_uri(&raw, protocol, as_is).map_err(|reason| ConfigError::ParseEndpoint {
                endpoint: raw.clone(),
                source_name,
                reason,
            })?;

        let mut headers = Vec::new();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = env.var(name) {
                for item in v.split(',').filter(|i| !i.trim().is_empty()) {
                    headers.push(parse_header(item, name, true)?);
                }
            }
        }
        for item in &self.otlp_headers {
            headers.push(parse_header(item, "--otlp-header", false)?);
        }

        let timeout = match self.otlp_timeout {
            Some(t) => t,
            None => match otel_var(env, "TIMEOUT") {
                Some((v, name, _)) => {
                    parse_duration(&v).map_err(|reason| ConfigError::ParseEnv { name, reason })?
                }
                None => Duration::from_secs(10),
            },
        };
        if timeout.is_zero() {
            return Err(ConfigError::ParseEnv {
                name: "OTLP timeout",
                reason: "must be greater than 0".into(),
            });
        }
        Ok(OtlpConfig {
            protocol,
            endpoint,
            headers,
            timeout,
        })
    }
}

/// Turns a configured endpoint into the URL requests go to. Per the OTLP
/// exporter spec, a generic HTTP endpoint gets `/v1/traces` appended and a
/// signal-specific one is used as is; gRPC endpoints are used as is.
fn endpoint_uri(raw: &str, protocol: OtlpProtocol, as_is: bool) -> Result<Uri, String> {
    let raw = raw.trim();
    let uri: Uri = raw
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    match uri.scheme_str() {
        Some("http") => {}
        // Agent spans go to a collector on the host or the node; TLS to a
        // remote backend is that collector's job.
        Some("https") => {
            return Err(
                "https is not supported: export to a local collector over http and let it use TLS"
                    .into(),
            )
        }
        Some(other) => return Err(format!("unsupported scheme '{other}': use http")),
        None => return Err("missing scheme: expected e.g. http://localhost:4317".into()),
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
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?,
    );
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
        percent_decode(v.trim()).ok_or_else(|| err("bad percent-encoding".into()))?
    } else {
        v.trim().to_owned()
    };
    let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| err(e.to_string()))?;
    let value = HeaderValue::from_str(&v).map_err(|e| err(e.to_string()))?;
    Ok((name, value))
}

/// Undoes `%XX` escapes, as the OpenTelemetry SDKs read these variables (a
/// `%` that starts no escape stays as it is); `None` if the result is not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut full = vec!["kata-trace-forwarder"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
    }

    fn config(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        cli(args).expect("valid args").into_config(&lookup)
    }

    fn otlp(c: &Config) -> &OtlpConfig {
        match &c.export.output {
            Output::Otlp(o) => o,
            Output::Dump => panic!("expected OTLP output"),
        }
    }

    #[test]
    fn defaults_are_the_kata_tools() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(
            c.listen.mode,
            ListenMode::Vsock {
                cid: VsockCid::Any,
                port: 10240
            }
        );
        assert_eq!(c.ingest.service_name, "kata-agent");
        let o = otlp(&c);
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(o.endpoint.to_string(), "http://localhost:4317/");
        assert_eq!(o.timeout, Duration::from_secs(10));
    }

    #[test]
    fn http_appends_traces_path_to_generic_endpoints_only() {
        let c = config(&["--otlp-protocol", "http/protobuf"], &[]).unwrap();
        assert_eq!(otlp(&c).endpoint, "http://localhost:4318/v1/traces");
        let c = config(
            &[
                "--otlp-protocol",
                "http/protobuf",
                "--otlp-endpoint",
                "http://c:9/base/",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(otlp(&c).endpoint, "http://c:9/base/v1/traces");
        let c = config(
            &["--otlp-protocol", "http/protobuf"],
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:9/custom")],
        )
        .unwrap();
        assert_eq!(otlp(&c).endpoint, "http://c:9/custom");
        let c = config(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:9"),
            ],
        )
        .unwrap();
        assert_eq!(otlp(&c).endpoint, "http://c:9/v1/traces");
    }

    #[test]
    fn flags_beat_environment() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:1"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ];
        let c = config(
            &[
                "--otlp-endpoint",
                "http://flag:2",
                "--otlp-protocol",
                "grpc",
                "--otlp-timeout",
                "3s",
            ],
            &env,
        )
        .unwrap();
        let o = otlp(&c);
        assert_eq!(o.endpoint, "http://flag:2/");
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(o.timeout, Duration::from_secs(3));
        let c = config(&[], &env).unwrap();
        assert_eq!(otlp(&c).timeout, Duration::from_millis(2500));
        assert_eq!(otlp(&c).endpoint, "http://env:1/v1/traces");
    }

    #[test]
    fn headers_from_env_and_flags() {
        let c = config(
            &["--otlp-header", "x-flag=a b"],
            &[(
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=s%3Dcret, x-tenant = t1",
            )],
        )
        .unwrap();
        let h: Vec<(String, String)> = otlp(&c)
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            h,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("x-tenant".into(), "t1".into()),
                ("x-flag".into(), "a b".into())
            ]
        );
        let e = config(&[], &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_HEADERS"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (args, needle) in [
            (vec!["--vsock-port", "0"], "port must not be 0"),
            (vec!["--vsock-port", "abc"], "not a port number"),
            (vec!["--vsock-port", ""], "not a port number"),
            (vec!["--socket-path", ""], "a value is required"),
            (vec!["--trace-name", ""], "a value is required"),
            (vec!["--otlp-endpoint", ""], "a value is required"),
            (vec!["--vsock-cid", "x"], "not a VSOCK CID"),
            (vec!["--otlp-protocol", "http/json"], "not supported"),
            (vec!["--log-level", "loud"], "invalid value"),
            (vec!["--max-frame-size", "0"], "must not be 0"),
        ] {
            let e = cli(&args).expect_err(needle).to_string();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let e = config(&["--otlp-endpoint", "localhost:4317"], &[]).unwrap_err();
        assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        let e = config(&["--otlp-endpoint", "ftp://x"], &[]).unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
        let e = config(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")]).unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
    }

    #[test]
    fn socket_path_template_selects_template_mode() {
        let c = config(
            &[
                "--socket-path-template",
                "\"/run/vc/firecracker/{ID}/root/kata.hvsock\"",
                "--vsock-port",
                "1024",
                "--max-sandboxes",
                "7",
            ],
            &[],
        )
        .unwrap();
        let ListenMode::Template {
            template,
            port,
            max_sandboxes,
        } = &c.listen.mode
        else {
            panic!("expected template mode: {:?}", c.listen.mode);
        };
        assert_eq!((*port, *max_sandboxes), (1024, 7));
        assert_eq!(
            template.listen_path("sb", *port),
            PathBuf::from("/run/vc/firecracker/sb/root/kata.hvsock_1024")
        );
        for args in [
            vec![
                "--socket-path-template",
                "/a/{ID}/s",
                "--socket-path",
                "/a/b/s",
            ],
            vec!["--socket-path-template", "/a/{ID}/s", "--vsock-cid", "3"],
            vec!["--socket-path-template", "/a/sandbox-{ID}/s"],
        ] {
            assert!(cli(&args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn hybrid_socket_gets_port_suffix() {
        let c = config(
            &["--socket-path", "/run/vc/vm/foo/clh.sock", "--dump-only"],
            &[],
        )
        .unwrap();
        let ListenMode::Hybrid { socket_path, port } = &c.listen.mode else {
            panic!("expected hybrid");
        };
        assert_eq!(
            crate::addr::hybrid_socket(socket_path, *port),
            PathBuf::from("/run/vc/vm/foo/clh.sock_10240")
        );
        assert!(matches!(c.export.output, Output::Dump));
    }

    #[test]
    fn parses_sizes_durations_cids_and_levels() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert_eq!("any".parse(), Ok(VsockCid::Any));
        assert_eq!("3".parse(), Ok(VsockCid::Cid(3)));
        let c = cli(&["-l", "critical"]).unwrap();
        assert_eq!(c.log_level.as_filter(), "error");
    }
}
