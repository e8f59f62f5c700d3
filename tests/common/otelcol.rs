//! A real OpenTelemetry Collector for the tests, built by
//! `scripts/setup-otelcol.sh` with the collector's own builder: an `otlp`
//! receiver (TLS, mTLS and bearer-token auth as a test asks) that passes
//! everything on, over `otlp_grpc`, to the tests' own field-by-field
//! receiver.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OTELCOL_VERSION: &str = "v0.165.0";

/// `OTELCOL_BIN`, or the binary `scripts/setup-otelcol.sh` caches.
pub fn otelcol_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OTELCOL_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let cache = std::env::var_os("OTELCOL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("kata-trace-forwarder/otelcol"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/kata-trace-forwarder/otelcol"))
        })
        .unwrap_or_default();
    let bin = cache.join(OTELCOL_VERSION).join("otelcol");
    assert!(
        bin.is_file(),
        "no OpenTelemetry Collector for the tests: OTELCOL_BIN is unset and {} does not exist. \
         Run scripts/setup-otelcol.sh (builds it with Go, once); scripts/test.sh does this for you.",
        bin.display()
    );
    bin
}

/// How the collector's receiver is secured.
#[derive(Default)]
pub struct Security {
    /// Server certificate and key (PEM files): TLS on both protocols.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA whose clients are required (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Bearer token every request must carry.
    pub token: Option<String>,
}

pub struct Otelcol {
    child: Child,
    pub grpc_port: u16,
    pub http_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Otelcol {
    /// Starts a collector that forwards to the gRPC receiver at
    /// `upstream` (`host:port`), and waits until it listens.
    pub fn start(security: &Security, upstream: &str) -> Otelcol {
        Self::start_on(security, upstream, (free_port(), free_port()))
    }

    /// As [`start`](Self::start), on these (gRPC, HTTP) ports: a collector
    /// restarted where the forwarder already sends.
    pub fn start_on(security: &Security, upstream: &str, ports: (u16, u16)) -> Otelcol {
        let dir = tempfile::tempdir().unwrap();
        let (grpc_port, http_port) = ports;
        let tls = match (&security.tls, &security.client_ca) {
            (Some((cert, key)), ca) => {
                let mut s = format!(
                    "\n        tls:\n          cert_file: {}\n          key_file: {}",
                    cert.display(),
                    key.display()
                );
                if let Some(ca) = ca {
                    s.push_str(&format!("\n          client_ca_file: {}", ca.display()));
                }
                s
            }
            (None, _) => String::new(),
        };
        let auth = if security.token.is_some() {
            "\n        auth:\n          authenticator: bearertokenauth"
        } else {
            ""
        };
        let (ext_def, ext_use) = match &security.token {
            Some(t) => (
                format!("extensions:\n  bearertokenauth:\n    token: \"{t}\"\n"),
                "  extensions: [bearertokenauth]\n",
            ),
            None => (String::new(), ""),
        };
        let config = format!(
            "{ext_def}receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}{tls}{auth}
      http:
        endpoint: 127.0.0.1:{http_port}{tls}{auth}
exporters:
  otlp_grpc:
    endpoint: {upstream}
    tls:
      insecure: true
    sending_queue:
      enabled: false
service:
{ext_use}  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [otlp_grpc]
"
        );
        let config_path = dir.path().join("otelcol.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("otelcol.log");
        let child = Command::new(otelcol_bin())
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(dir.path().join("otelcol.err")).unwrap())
            .spawn()
            .expect("start the collector");
        let mut c = Otelcol {
            child,
            grpc_port,
            http_port,
            log: dir.path().join("otelcol.err"),
            _dir: dir,
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the collector exited ({status}):\n{}", self.logs());
            }
            if self.logs().contains("Everything is ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not get ready:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self, protocol: &str, scheme: &str) -> String {
        let port = if protocol == "grpc" {
            self.grpc_port
        } else {
            self.http_port
        };
        format!("{scheme}://localhost:{port}")
    }

    pub fn config_dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for Otelcol {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
