//! The command line as clap sees it: flags, help text, defaults, value
//! parsers; [`Cli::into_config`], in the parent module, makes it a `Config`.

use std::str::FromStr;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::{ArgAction, Parser, ValueEnum};

use crate::addr::{SocketTemplate, VsockCid};

/// `--batch-max-bytes` from the environment: OpenTelemetry names no such
/// setting, so it is the forwarder's own.
pub(super) const BATCH_MAX_BYTES_ENV: &str = "KATA_TRACE_FORWARDER_BATCH_MAX_BYTES";

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

  Every hypervisor and runtime on the host (kata-deploy), from the Kata configurations:
    kata-trace-forwarder --kata-host --print
    sudo kata-trace-forwarder --kata-host

  OTLP over HTTP to an OpenTelemetry Collector:
    kata-trace-forwarder --otlp-protocol http/protobuf --otlp-endpoint http://collector:4318

  No collector, print spans as trees (on a terminal) or OTLP JSON lines (in a pipe):
    kata-trace-forwarder --dump-only --socket-path /tmp/kata/test.sock

Environment (flags take precedence): OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, \
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL, \
OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_HEADERS, \
OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT, \
OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE, OTEL_EXPORTER_OTLP_CERTIFICATE, \
OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE, \
OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY, OTEL_EXPORTER_OTLP_CLIENT_KEY, \
OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, OTEL_EXPORTER_OTLP_COMPRESSION, \
OTEL_EXPORTER_OTLP_TRACES_INSECURE, OTEL_EXPORTER_OTLP_INSECURE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, \
OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE, KATA_TRACE_FORWARDER_BATCH_MAX_BYTES, \
KATA_TRACE_FORWARDER_DUMP_FORMAT, NO_COLOR.";

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

/// How `--dump-only` writes spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    /// Each trace as an indented tree, for people.
    Tree,
    /// One OTLP JSON `TracesData` line per span, for machines.
    OtlpJson,
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

/// Parses a duration: `250ms`, `5s`, `2m`, or a bare number of milliseconds
/// (the unit of the `OTEL_*` timeout variables).
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn parse_positive_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_positive(s)?)
        .map_err(|_| format!("'{s}' is not a whole number from 1 to {}", u32::MAX))
}

/// Parses a byte size: a number with an optional `KiB`/`MiB`/`GiB` suffix.
pub(super) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = [("KiB", 1usize << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]
        .into_iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, m)))
        .unwrap_or((t, 1));
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

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kata-trace-forwarder",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    disable_version_flag = true,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
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

    /// PEM bundle of the CAs to trust for an https endpoint, instead of the
    /// system's roots. Reread when it changes, for new connections.
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    pub otlp_certificate: Option<String>,

    /// PEM client certificate for mTLS to an https endpoint (with
    /// --otlp-client-key). Reread when it changes, for new connections.
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    pub otlp_client_certificate: Option<String>,

    /// PEM private key of --otlp-client-certificate.
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    pub otlp_client_key: Option<String>,

    /// Compression of export requests: `gzip` or `none` [default: none].
    #[arg(long, value_name = "gzip|none")]
    pub otlp_compression: Option<super::Compression>,

    /// gRPC only, for an endpoint without a scheme (`host:port`): plaintext
    /// instead of TLS [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub otlp_insecure: Option<bool>,

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
    /// Repeatable: one forwarder serves every template given (Cloud Hypervisor
    /// and Firecracker side by side), and VSOCK too with --vsock.
    #[arg(
        long,
        value_name = "TEMPLATE",
        conflicts_with_all = ["socket_path", "vsock_cid"]
    )]
    pub socket_path_template: Vec<SocketTemplate>,

    /// Standard VSOCK (QEMU) beside --socket-path-template, on CID `any` or
    /// the one given (`--vsock=3`). Without any listener flag VSOCK is the
    /// default anyway.
    #[arg(
        long,
        value_name = "CID",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "any",
        conflicts_with_all = ["socket_path", "kata_host"]
    )]
    pub vsock: Option<VsockCid>,

    /// Zero configuration: read the Kata configuration files the runtimes
    /// read (/etc/kata-containers, /usr/share/defaults/kata-containers,
    /// kata-deploy's /opt/kata/share/defaults/kata-containers, runtime-rs'
    /// and KATA_CONF_FILE), and serve what each one's hypervisor needs:
    /// VSOCK for QEMU, a socket template for Cloud Hypervisor, Firecracker
    /// and Dragonball. Configurations added, changed or removed later are
    /// followed.
    #[arg(long, conflicts_with_all = ["socket_path", "socket_path_template"])]
    pub kata_host: bool,

    /// With --kata-host: the directory the host's files are under (read
    /// configurations from, and serve sockets in): `/` on the host, the
    /// host's root mounted elsewhere, or a test tree.
    #[arg(long, value_name = "DIR", default_value = "/", requires = "kata_host")]
    pub kata_root: std::path::PathBuf,

    /// With --kata-host: print the plan (each configuration found, what it
    /// serves or why it was skipped, and the listeners) as JSON and exit.
    #[arg(long, requires = "kata_host")]
    pub print: bool,

    /// Most sandboxes served and tracked at once (template mode: more are
    /// logged and left alone until one goes; VSOCK: connections from more
    /// guests are closed). Bounds the per-sandbox metrics too.
    #[arg(long, default_value = "1024", value_parser = parse_positive)]
    pub max_sandboxes: usize,

    /// Most connections one sandbox (a VSOCK guest, a hybrid socket) may have
    /// open at once, within --max-connections; more are closed. The Kata agent
    /// uses one.
    #[arg(long, default_value = "8", value_parser = parse_positive, value_name = "N")]
    pub sandbox_max_connections: usize,

    /// Spans per second one sandbox may send on average; over it, its
    /// connections are read more slowly (nothing already read is dropped).
    /// 0: no limit.
    #[arg(long, default_value = "20000", value_name = "N")]
    pub sandbox_spans_per_second: u32,

    /// Spans one sandbox may send at once above --sandbox-spans-per-second
    /// [default: twice the rate].
    #[arg(long, value_parser = parse_positive_u32, value_name = "N")]
    pub sandbox_span_burst: Option<u32>,

    /// Standard VSOCK (QEMU): context id to listen on, a number or `any`.
    #[arg(long, default_value = "any", value_name = "CID")]
    pub vsock_cid: VsockCid,

    /// VSOCK port the agent sends to.
    #[arg(long, default_value = "10240", value_parser = parse_port, value_name = "PORT")]
    pub vsock_port: u32,

    /// Log level: trace, debug, info, warn, error, critical.
    #[arg(short = 'l', long, default_value = "info", ignore_case = true)]
    pub log_level: LogLevel,

    /// Log format on stderr.
    #[arg(long, default_value = "json")]
    pub log_format: LogFormat,

    /// Do not export: write the spans to stdout (see --dump-format). Needs no collector.
    #[arg(long)]
    pub dump_only: bool,

    /// With --dump-only: `tree` prints each trace as an indented tree, `otlp-json`
    /// each span as one OTLP JSON line [default: tree when stdout is a terminal,
    /// otlp-json otherwise].
    #[arg(long, env = "KATA_TRACE_FORWARDER_DUMP_FORMAT", value_name = "FORMAT")]
    pub dump_format: Option<DumpFormat>,

    /// With --dump-format tree: a trace whose root span has not come is printed
    /// once no span of it has come for this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub dump_linger: Duration,

    /// With --dump-format tree: most spans held waiting for their trace; past
    /// it, the oldest traces are printed as they are, marked incomplete.
    #[arg(long, default_value = "10000", value_parser = parse_positive, value_name = "N")]
    pub dump_max_spans: usize,

    /// Most spans in one export request.
    #[arg(long, env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", default_value = "512", value_parser = parse_positive)]
    pub batch_max_spans: usize,

    /// Most bytes in one export request (encoded, before compression): a batch
    /// is sent before the next span would take it past this. Keep it under the
    /// collector's request limit (4 MiB for gRPC by default); a request the
    /// collector still finds too large is sent again in halves.
    #[arg(long, env = BATCH_MAX_BYTES_ENV, default_value = "3MiB", value_parser = parse_size, value_name = "SIZE")]
    pub batch_max_bytes: usize,

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

    /// Unix socket where a new forwarder (an upgrade on SIGHUP, a takeover by a
    /// new process started with the same path) asks this one for its
    /// listeners and live agent connections. Given, a forwarder started while
    /// another listens there takes over from it; by default it only listens
    /// there (a second forwarder on the same sockets fails). `none`: never
    /// hand over.
    /// [default: /run/kata-trace-forwarder/handoff-<hash of the listeners>.sock]
    #[arg(long, value_name = "PATH", value_parser = NonEmptyStringValueParser::new())]
    pub handoff_socket: Option<String>,

    /// On SIGTERM/SIGINT, how long to keep draining and flushing before exiting.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Ask the forwarder running on this host how it is doing: its
    /// listeners, each sandbox it serves (agent connections, spans
    /// received, exported, spooled, still in memory and dropped by reason,
    /// limits hit, when it last sent), the exporter (collector, last success and
    /// failure, retries, spool depth), version and uptime. Read-only, over
    /// the hand-off socket, which answers root alone. Exits 1 when no
    /// forwarder answers.
    Status(StatusArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON object per forwarder, one a line, instead of a table.
    #[arg(long)]
    pub json: bool,

    /// The hand-off socket of the forwarder to ask, as given to it
    /// [default: every forwarder's in /run/kata-trace-forwarder].
    #[arg(long, value_name = "PATH")]
    pub handoff_socket: Option<std::path::PathBuf>,
}
