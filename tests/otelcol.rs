//! Secured export proven against a real OpenTelemetry Collector (built by
//! `scripts/setup-otelcol.sh` with the collector's own builder): its `otlp`
//! receiver with TLS, mTLS (`client_ca_file`) and the contrib
//! `bearertokenauth` authenticator, passing what it accepts on to the
//! tests' receiver, where every field is checked. Certificates are made at
//! run time.

mod common;

use std::time::Duration;

use common::certs::{write, Ca};
use common::otelcol::{Otelcol, Security};
use common::{assert_span_eq, find, run_to_exit, send_both_formats, Forwarder, Receiver};

const TOKEN: &str = "s3cr3t-token";

/// Everything one test needs: certificates on disk, the receiver, and a
/// collector in front of it.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    client_ca: Ca,
    rx: Receiver,
    collector: Otelcol,
}

impl Setup {
    async fn new(mtls: bool, token: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("collector CA");
        let client_ca = Ca::new("client CA");
        let (cert, key) = ca.issue(&["localhost"], false);
        let security = Security {
            tls: Some((
                write(dir.path(), "server.pem", &cert),
                write(dir.path(), "server.key", &key),
            )),
            client_ca: mtls.then(|| write(dir.path(), "client-ca.pem", &client_ca.pem())),
            token: token.then(|| TOKEN.to_string()),
        };
        write(dir.path(), "ca.pem", &ca.pem());
        let rx = Receiver::start().await;
        let upstream = rx.grpc_endpoint.trim_start_matches("http://").to_owned();
        let collector = tokio::task::spawn_blocking(move || Otelcol::start(&security, &upstream))
            .await
            .unwrap();
        Setup {
            dir,
            ca,
            client_ca,
            rx,
            collector,
        }
    }

    /// Forwarder flags for `protocol` to the collector, trusting its CA.
    fn args(&self, protocol: &str) -> Vec<String> {
        vec![
            "--otlp-protocol".into(),
            protocol.into(),
            "--otlp-endpoint".into(),
            self.collector.endpoint(protocol, "https"),
            "--otlp-certificate".into(),
            self.dir.path().join("ca.pem").display().to_string(),
        ]
    }

    fn client_identity(&self) -> Vec<String> {
        let (cert, key) = self.client_ca.issue(&["kata-trace-forwarder"], false);
        vec![
            "--otlp-client-certificate".into(),
            write(self.dir.path(), "client.pem", &cert)
                .display()
                .to_string(),
            "--otlp-client-key".into(),
            write(self.dir.path(), "client.key", &key)
                .display()
                .to_string(),
        ]
    }
}

/// Both formats' spans through the forwarder and the collector.
async fn send_both(fwd: &Forwarder) -> Vec<kata_agent_emitter::ExpectedSpan> {
    send_both_formats(&fwd.agent_socket).await
}

async fn secured(protocol: &str, mtls: bool, gzip: bool, token: bool) {
    let s = Setup::new(mtls, token).await;
    let mut args = s.args(protocol);
    if mtls {
        args.extend(s.client_identity());
    }
    if gzip {
        args.extend(["--otlp-compression".into(), "gzip".into()]);
    }
    if token {
        args.extend([
            "--otlp-header".into(),
            format!("authorization=Bearer {TOKEN}"),
        ]);
    }
    let mut fwd = Forwarder::hybrid(&args).await;
    let want = send_both(&fwd).await;
    let got =
        s.rx.store
            .wait_for(want.len(), Duration::from_secs(30))
            .await;
    assert_eq!(
        got.len(),
        want.len(),
        "collector log:\n{}",
        s.collector.logs()
    );
    for w in &want {
        let (resource, span) = find(&got, w.span_id);
        assert_span_eq(w, resource, span, "kata-agent");
    }
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    assert!(
        !fwd.stderr().contains(TOKEN),
        "the token's value is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tls_through_the_collector() {
    secured("grpc", false, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tls_through_the_collector() {
    secured("http/protobuf", false, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_mtls_through_the_collector() {
    secured("grpc", true, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mtls_with_gzip_through_the_collector() {
    secured("http/protobuf", true, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tls_gzip_and_bearer_token_through_the_collector() {
    secured("grpc", false, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tls_gzip_and_bearer_token_through_the_collector() {
    secured("http/protobuf", false, true, true).await;
}

/// A token the collector refuses: every batch fails for good, is counted as
/// rejected, and is not retried; nothing is silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_counted_failure_never_retried() {
    for protocol in ["grpc", "http/protobuf"] {
        let s = Setup::new(false, true).await;
        let mut args = s.args(protocol);
        args.extend(["--otlp-header".into(), "authorization=Bearer wrong".into()]);
        let mut fwd = Forwarder::hybrid(&args).await;
        let want = send_both(&fwd).await;
        // Wait for the forwarder to have given up on every span.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !fwd.stderr().contains("rejected the batch for good") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{protocol}: no rejection logged:\n{}",
                fwd.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(fwd.terminate().await.success());
        let log = fwd.stderr();
        assert!(
            log.contains(&format!("\"spans_dropped_rejected\":{}", want.len())),
            "{protocol}: every span counted as rejected:\n{log}"
        );
        assert!(log.contains("\"export_retries\":0"), "{protocol}: {log}");
        assert_eq!(s.rx.store.count(), 0, "nothing reached the receiver");
        assert!(!log.contains("wrong"), "the token's value is never logged");
    }
}

/// Against the real collector: no client certificate where one is
/// required, a CA that did not sign the collector's certificate, and an
/// expired server certificate are startup errors that say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_clear_startup_errors() {
    let s = Setup::new(true, false).await;
    let other = write(s.dir.path(), "other-ca.pem", &Ca::new("other").pem());
    let mut wrong_ca = s.args("grpc");
    let at = wrong_ca.len() - 1;
    wrong_ca[at] = other.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (s.args("grpc"), "CertificateRequired"),
        (s.args("http/protobuf"), "CertificateRequired"),
        (wrong_ca, "UnknownIssuer"),
    ];
    for (args, needle) in cases {
        let a = args.clone();
        let (code, stderr) = tokio::task::spawn_blocking(move || run_to_exit(&a))
            .await
            .unwrap();
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("TLS with the OTLP collector"), "{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle}:\n{stderr}"
        );
    }

    // An expired certificate on the collector's side.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = s.ca.issue(&["localhost"], true);
    let security = Security {
        tls: Some((
            write(dir.path(), "old.pem", &cert),
            write(dir.path(), "old.key", &key),
        )),
        ..Default::default()
    };
    let upstream = s.rx.grpc_endpoint.trim_start_matches("http://").to_owned();
    let expired = tokio::task::spawn_blocking(move || Otelcol::start(&security, &upstream))
        .await
        .unwrap();
    let args = vec![
        "--otlp-endpoint".to_string(),
        expired.endpoint("grpc", "https"),
        "--otlp-certificate".to_string(),
        s.dir.path().join("ca.pem").display().to_string(),
    ];
    let (code, stderr) = tokio::task::spawn_blocking(move || run_to_exit(&args))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("certificate expired"), "{stderr}");
}

/// The collector's certificate is rotated to one from a new CA, and the
/// CA file on disk with it: the running forwarder trusts the new file for
/// its next connection, with no restart, and every span arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_file_is_used_without_a_restart() {
    let s = Setup::new(false, false).await;
    let mut fwd = Forwarder::hybrid(&s.args("grpc")).await;
    let first = send_both(&fwd).await;
    s.rx.store
        .wait_for(first.len(), Duration::from_secs(30))
        .await;
    // The collector answers the forwarder after passing the spans on: give
    // that answer time to arrive, or the batch is (rightly) sent again.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Rotate: a new CA signs the collector's new certificate, and the CA
    // file the forwarder reads now holds the new CA.
    let ports = (s.collector.grpc_port, s.collector.http_port);
    let Setup {
        dir, rx, collector, ..
    } = s;
    drop(collector);
    let new_ca = Ca::new("rotated CA");
    let (cert, key) = new_ca.issue(&["localhost"], false);
    let security = Security {
        tls: Some((
            write(dir.path(), "new.pem", &cert),
            write(dir.path(), "new.key", &key),
        )),
        ..Default::default()
    };
    write(dir.path(), "ca.pem", &new_ca.pem());
    let upstream = rx.grpc_endpoint.trim_start_matches("http://").to_owned();
    let _collector =
        tokio::task::spawn_blocking(move || Otelcol::start_on(&security, &upstream, ports))
            .await
            .unwrap();

    let second = send_both(&fwd).await;
    let got = rx
        .store
        .wait_for(first.len() + second.len(), Duration::from_secs(30))
        .await;
    for w in first.iter().chain(&second) {
        let (resource, span) = find(&got, w.span_id);
        assert_span_eq(w, resource, span, "kata-agent");
    }
    assert!(fwd.terminate().await.success());
    assert!(
        fwd.stderr().contains("TLS files changed"),
        "{}",
        fwd.stderr()
    );
}
