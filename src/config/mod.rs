//! Command line, environment and the validated configuration. The flags are a
//! drop-in for the Kata tree's `kata-trace-forwarder` plus a production daemon's;
//! exporter settings follow the OpenTelemetry SDK environment conventions, flags
//! first. Everything is checked here, once: the rest works from a valid [`Config`].

mod cli;
pub mod kata;
mod otlp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

pub use crate::addr::{SocketTemplate, VsockCid};
pub use cli::{Cli, Command, DumpFormat, LogFormat, LogLevel, OtlpProtocol, StatusArgs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenMode {
    /// A Unix socket at `<socket_path>_<port>` (Cloud Hypervisor, Firecracker).
    Hybrid {
        socket_path: PathBuf,
        port: u32,
    },
    /// AF_VSOCK on the host kernel (QEMU) beside any number of templates,
    /// each one Unix socket per sandbox at the template's `<socket>_<port>`.
    Set {
        vsock: Option<VsockCid>,
        templates: Vec<SocketTemplate>,
        port: u32,
        max_sandboxes: usize,
    },
    KataHost(KataHostConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KataHostConfig {
    pub sources: kata::Sources,
    pub port: u32,
    /// For a configuration that asks for VSOCK.
    pub cid: VsockCid,
    /// Per template.
    pub max_sandboxes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub mode: ListenMode,
    pub max_connections: usize,
    /// Whom to become after binding, when started as root in a hybrid mode.
    pub user: String,
    pub tenants: TenantLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_spans: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_spans: usize,
    /// Per export request (one span larger than this goes alone).
    pub max_bytes: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The full URL (for HTTP, including `/v1/traces`).
    pub endpoint: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
    /// Set for an `https` endpoint.
    pub tls: Option<TlsConfig>,
    pub compression: Compression,
}

/// Absent: the system's roots; no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            other => Err(format!("'{other}' is not a compression: use gzip or none")),
        }
    }
}

#[derive(Debug, Clone)]
// Built once at startup and read in place: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Output {
    Otlp(OtlpConfig),
    /// `--dump-only`
    Dump(DumpConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpConfig {
    pub format: DumpFormat,
    pub linger: Duration,
    pub max_spans: usize,
    /// stdout is a terminal and `NO_COLOR` is not set.
    pub colour: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub max_frame_size: usize,
    /// `--trace-name`: every resource's `service.name`.
    pub service_name: String,
    pub output: Output,
    pub queue: QueueConfig,
    pub batch: BatchConfig,
    pub spool: Option<SpoolConfig>,
    pub metrics_address: Option<std::net::SocketAddr>,
    pub stats_interval: Duration,
    /// 1: a single-threaded runtime; more: a multi-threaded one.
    pub worker_threads: usize,
    pub shutdown_timeout: Duration,
    /// `--handoff-socket`; `None`: never hand over.
    pub handoff: Option<PathBuf>,
    /// `--handoff-socket` given: take over from the forwarder there, not bind (a
    /// default path fails beside another forwarder). `SIGHUP`'s binary always does.
    pub take_over: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    pub max_connections: usize,
    /// Spans per second, on average; 0: no limit.
    pub spans_per_second: u32,
    pub burst: u32,
    pub max_sandboxes: usize,
}

/// Where the hand-off sockets live by default (and `status` looks).
pub const HANDOFF_DIR: &str = "/run/kata-trace-forwarder";

/// The hand-off socket path when `--handoff-socket` is not given: one per
/// set of listeners, so that forwarders serving different sockets on one
/// host (a QEMU unit beside a hybrid one) never take each other's.
fn default_handoff_path(mode: &ListenMode) -> PathBuf {
    let key = match mode {
        ListenMode::Hybrid { socket_path, port } => {
            format!("hybrid:{}:{port}", socket_path.display())
        }
        // The keys of the modes a set was before they were one: the paths stay.
        ListenMode::Set {
            vsock,
            templates,
            port,
            ..
        } => match (vsock, &templates[..]) {
            (Some(cid), []) => format!("vsock:{cid:?}:{port}"),
            (None, [t]) => format!("template:{t}:{port}"),
            _ => {
                let t: Vec<String> = templates.iter().map(ToString::to_string).collect();
                format!("many:{vsock:?}:{}:{port}", t.join(","))
            }
        },
        ListenMode::KataHost(k) => format!("kata-host:{}:{}", k.sources.root.display(), k.port),
    };
    let hash = crc32fast::hash(key.as_bytes());
    Path::new(HANDOFF_DIR).join(format!("handoff-{hash:08x}.sock"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid OTLP endpoint '{endpoint}' (from {source_name}): {reason}")]
    ParseEndpoint {
        endpoint: String,
        source_name: String,
        reason: String,
    },
    #[error("invalid {name}: {reason}")]
    ParseEnv { name: String, reason: String },
    #[error("a client certificate needs its key and a key its certificate: {given} is set, {missing} is not")]
    HalfClientIdentity {
        given: &'static str,
        missing: &'static str,
    },
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

/// Injectable, so that tests need not touch the process environment.
pub type Env = dyn Fn(&str) -> Option<String>;

/// Empty variables count as absent, as the OpenTelemetry SDKs treat them.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Cli {
    pub fn into_config(self, env: &Env) -> Result<Config, ConfigError> {
        let port = self.vsock_port;
        // The drop-in command line keeps its meaning: no flag is VSOCK,
        // `--socket-path` hybrid.
        let mode = if self.kata_host {
            ListenMode::KataHost(KataHostConfig {
                sources: kata::Sources::from_env(self.kata_root.clone(), env),
                port,
                cid: self.vsock_cid,
                max_sandboxes: self.max_sandboxes,
            })
        } else if let Some(p) = &self.socket_path {
            let socket_path = PathBuf::from(p);
            ListenMode::Hybrid { socket_path, port }
        } else {
            // Each once, in the order given.
            let mut seen = std::collections::HashSet::new();
            let mut templates = self.socket_path_template.clone();
            templates.retain(|t| seen.insert(t.clone()));
            ListenMode::Set {
                vsock: (self.vsock).or(templates.is_empty().then_some(self.vsock_cid)),
                templates,
                port,
                max_sandboxes: self.max_sandboxes,
            }
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
        let (handoff, take_over) = match self.handoff_socket.as_deref() {
            Some("none") => (None, false),
            Some(p) => (Some(PathBuf::from(p)), true),
            None => (Some(default_handoff_path(&mode)), false),
        };
        let output = if self.dump_only {
            // Scripts and tests that pipe stdout keep getting JSON lines.
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
            Output::Dump(DumpConfig {
                format: self.dump_format.unwrap_or(match terminal {
                    true => DumpFormat::Tree,
                    false => DumpFormat::OtlpJson,
                }),
                linger: self.dump_linger,
                max_spans: self.dump_max_spans,
                colour: terminal && env("NO_COLOR").is_none(),
            })
        } else {
            Output::Otlp(self.otlp_config(env)?)
        };
        Ok(Config {
            listen: ListenConfig {
                mode,
                max_connections: self.max_connections,
                user: self.user,
                tenants: TenantLimits {
                    max_connections: self.sandbox_max_connections.min(self.max_connections),
                    spans_per_second: self.sandbox_spans_per_second,
                    burst: self
                        .sandbox_span_burst
                        .unwrap_or(self.sandbox_spans_per_second.saturating_mul(2)),
                    max_sandboxes: self.max_sandboxes,
                },
            },
            max_frame_size: self.max_frame_size,
            service_name: self.trace_name,
            output,
            queue: QueueConfig {
                max_spans: self.queue_size,
                max_bytes: self.queue_bytes,
            },
            batch: BatchConfig {
                max_spans: self.batch_max_spans,
                max_bytes: self.batch_max_bytes,
                timeout: self.batch_timeout,
            },
            spool: self.spool_dir.map(|dir| SpoolConfig {
                dir: PathBuf::from(dir),
                max_bytes: self.spool_max_bytes as u64,
            }),
            metrics_address: self.metrics_address,
            stats_interval: self.stats_interval,
            worker_threads: self.worker_threads,
            shutdown_timeout: self.shutdown_timeout,
            handoff,
            take_over,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::cli::{parse_duration, parse_size};
    use super::*;
    use clap::Parser;
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
        match &c.output {
            Output::Otlp(o) => o,
            Output::Dump(_) => panic!("expected OTLP output"),
        }
    }

    #[test]
    fn a_request_is_bounded_in_bytes_under_the_common_4_mib_limit() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(c.batch.max_bytes, 3 << 20);
        let c = config(&["--batch-max-bytes", "512KiB"], &[]).unwrap();
        assert_eq!(c.batch.max_bytes, 512 << 10);
        assert!(cli(&["--batch-max-bytes", "0"]).is_err());
    }

    #[test]
    fn defaults_are_the_kata_tools() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(
            c.listen.mode,
            ListenMode::Set {
                vsock: Some(VsockCid::Any),
                templates: vec![],
                port: 10240,
                max_sandboxes: 1024,
            }
        );
        assert_eq!(c.service_name, "kata-agent");
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

    /// TLS and compression as the OTLP exporter spec has them: https means
    /// TLS, with the files from flags or the signal-specific or generic
    /// variables; a scheme-less gRPC endpoint is TLS unless insecure.
    #[test]
    fn tls_and_compression_follow_the_otlp_exporter_spec() {
        let c = config(&["--otlp-endpoint", "https://gw.example:4317"], &[]).unwrap();
        assert_eq!(otlp(&c).tls, Some(TlsConfig::default()));
        assert_eq!(otlp(&c).compression, Compression::None);

        let c = config(
            &[
                "--otlp-endpoint",
                "https://gw:4317",
                "--otlp-certificate",
                "/flag-ca.pem",
            ],
            &[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env-ca.pem"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                    "/traces-cert.pem",
                ),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/generic-cert.pem"),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/key.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ],
        )
        .unwrap();
        let o = otlp(&c);
        assert_eq!(
            o.tls,
            Some(TlsConfig {
                ca_file: Some("/flag-ca.pem".into()),
                client_cert: Some("/traces-cert.pem".into()),
                client_key: Some("/key.pem".into()),
            })
        );
        assert_eq!(o.compression, Compression::Gzip);

        // The files only apply to a TLS endpoint, as in every SDK.
        let c = config(&["--otlp-certificate", "/ca.pem"], &[]).unwrap();
        assert_eq!(otlp(&c).tls, None);

        let c = config(&["--otlp-endpoint", "collector:4317"], &[]).unwrap();
        assert_eq!(otlp(&c).endpoint.to_string(), "https://collector:4317/");
        assert!(otlp(&c).tls.is_some());
        for (args, env) in [
            (
                vec!["--otlp-endpoint", "collector:4317", "--otlp-insecure"],
                vec![],
            ),
            (
                vec!["--otlp-endpoint", "collector:4317"],
                vec![("OTEL_EXPORTER_OTLP_INSECURE", "true")],
            ),
        ] {
            let c = config(&args, &env).unwrap();
            assert_eq!(otlp(&c).endpoint.to_string(), "http://collector:4317/");
            assert_eq!(otlp(&c).tls, None);
        }
        let c = config(
            &["--otlp-compression", "none"],
            &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")],
        )
        .unwrap();
        assert_eq!(otlp(&c).compression, Compression::None, "the flag wins");
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
        let e = config(
            &[
                "--otlp-endpoint",
                "localhost:4318",
                "--otlp-protocol",
                "http/protobuf",
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        let e = config(&["--otlp-client-certificate", "/c.pem"], &[]).unwrap_err();
        assert!(e.to_string().contains("--otlp-client-key"), "{e}");
        let e = config(&[], &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")]).unwrap_err();
        assert!(e.to_string().contains("--otlp-client-certificate"), "{e}");
        let e = cli(&["--otlp-compression", "zstd"]).unwrap_err();
        assert!(e.to_string().contains("gzip or none"), "{e}");
        let e = config(&[], &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]).unwrap_err();
        assert!(
            e.to_string().contains("OTEL_EXPORTER_OTLP_COMPRESSION"),
            "{e}"
        );
        let e = config(&[], &[("OTEL_EXPORTER_OTLP_INSECURE", "yes")]).unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_INSECURE"), "{e}");
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
        let ListenMode::Set {
            vsock: None,
            templates,
            port,
            max_sandboxes,
        } = &c.listen.mode
        else {
            panic!("expected template mode: {:?}", c.listen.mode);
        };
        let [template] = &templates[..] else {
            panic!("expected one template: {templates:?}");
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

    /// Several templates, with VSOCK or not, make a set; duplicates count
    /// once; `--kata-host` reads its root and KATA_CONF_FILE.
    #[test]
    fn several_listeners_and_kata_host() {
        let c = config(
            &[
                "--socket-path-template",
                "/run/vc/vm/{ID}/clh.sock",
                "--socket-path-template",
                "/run/kata/{ID}/root/kata.hvsock",
                "--socket-path-template",
                "/run/vc/vm/{ID}/clh.sock",
                "--vsock",
            ],
            &[],
        )
        .unwrap();
        let ListenMode::Set {
            vsock, templates, ..
        } = &c.listen.mode
        else {
            panic!("expected a set: {:?}", c.listen.mode);
        };
        assert_eq!(*vsock, Some(VsockCid::Any));
        assert_eq!(templates.len(), 2);
        let c = config(&["--socket-path-template", "/a/{ID}/s", "--vsock=3"], &[]).unwrap();
        assert!(matches!(
            c.listen.mode,
            ListenMode::Set {
                vsock: Some(VsockCid::Cid(3)),
                ..
            }
        ));
        // `--vsock` alone is the default VSOCK mode.
        let c = config(&["--vsock"], &[]).unwrap();
        assert!(
            matches!(&c.listen.mode, ListenMode::Set { vsock: Some(_), templates, .. } if templates.is_empty())
        );

        let c = config(
            &["--kata-host", "--kata-root", "/t"],
            &[("KATA_CONF_FILE", "/etc/k.toml")],
        )
        .unwrap();
        let ListenMode::KataHost(k) = &c.listen.mode else {
            panic!("expected kata-host: {:?}", c.listen.mode);
        };
        assert_eq!(k.sources.root, PathBuf::from("/t"));
        assert_eq!(k.sources.env_file, Some(PathBuf::from("/etc/k.toml")));
        for args in [
            vec!["--kata-host", "--socket-path", "/a/s"],
            vec!["--kata-host", "--socket-path-template", "/a/{ID}/s"],
            vec!["--kata-host", "--vsock"],
            vec!["--print"],
            vec!["--kata-root", "/t"],
            vec!["--socket-path", "/a/s", "--vsock"],
        ] {
            assert!(cli(&args).is_err(), "{args:?}");
        }
    }

    /// The default hand-off socket is named after the listeners, and must
    /// stay the same across versions: an upgrade finds its predecessor there.
    #[test]
    fn the_default_handoff_socket_is_named_after_the_listeners() {
        let path = |args: &[&str]| {
            let c = config(args, &[("KATA_CONF_FILE", "/etc/k.toml")]).unwrap();
            c.handoff.unwrap().display().to_string()
        };
        for (args, want) in [
            (vec![], "/run/kata-trace-forwarder/handoff-19ffa6f5.sock"),
            (
                vec!["--vsock-cid", "3", "--vsock-port", "1024"],
                "/run/kata-trace-forwarder/handoff-b62a70a0.sock",
            ),
            (
                vec!["--socket-path", "/run/vc/vm/foo/clh.sock"],
                "/run/kata-trace-forwarder/handoff-51056ac9.sock",
            ),
            (
                vec!["--socket-path-template", "/a/{ID}/s"],
                "/run/kata-trace-forwarder/handoff-d0bc3213.sock",
            ),
            (
                vec![
                    "--socket-path-template",
                    "/a/{ID}/s",
                    "--socket-path-template",
                    "/b/{ID}/s",
                    "--vsock",
                ],
                "/run/kata-trace-forwarder/handoff-d4ea7f82.sock",
            ),
            (
                vec!["--kata-host", "--kata-root", "/t"],
                "/run/kata-trace-forwarder/handoff-65e51b05.sock",
            ),
        ] {
            assert_eq!(path(&args), want, "{args:?}");
        }
        let none = config(&["--handoff-socket", "none"], &[]).unwrap();
        assert_eq!(none.handoff, None);
        let given = config(&["--handoff-socket", "/x/h.sock"], &[]).unwrap();
        assert_eq!(given.handoff, Some(PathBuf::from("/x/h.sock")));
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
        assert!(matches!(c.output, Output::Dump(_)));
    }

    #[test]
    fn dump_format_flags_are_read_and_no_colour_follows_no_color() {
        let dump = |args: &[&str], env: &[(&str, &str)]| {
            let mut all = vec!["--dump-only"];
            all.extend(args);
            match config(&all, env).unwrap().output {
                Output::Dump(d) => d,
                Output::Otlp(_) => panic!("expected dump output"),
            }
        };
        let d = dump(
            &[
                "--dump-format",
                "tree",
                "--dump-linger",
                "500ms",
                "--dump-max-spans",
                "7",
            ],
            &[],
        );
        assert_eq!(d.format, DumpFormat::Tree);
        assert_eq!(d.linger, Duration::from_millis(500));
        assert_eq!(d.max_spans, 7);
        let d = dump(&["--dump-format=otlp-json"], &[]);
        assert_eq!(d.format, DumpFormat::OtlpJson);
        assert_eq!((d.linger, d.max_spans), (Duration::from_secs(2), 10_000));
        assert!(!dump(&[], &[("NO_COLOR", "1")]).colour);
        assert!(cli(&["--dump-only", "--dump-max-spans", "0"]).is_err());
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

    /// Test support (other modules' tests too): the command line's defaults.
    impl Default for TenantLimits {
        fn default() -> Self {
            TenantLimits {
                max_connections: 8,
                spans_per_second: 20_000,
                burst: 40_000,
                max_sandboxes: 1024,
            }
        }
    }
}
