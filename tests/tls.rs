//! TLS, mTLS and gzip to the collector, end to end through the real
//! binary: a TLS-terminating front (rustls, certificates made here with
//! rcgen) relays to the tests' OTLP receiver, which decodes every field.
//! The front checks what a TLS collector checks (its certificate chain,
//! and the client's when mTLS is on); the receiver says whether requests
//! came gzipped.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::certs::{write, Ca};
use common::{
    assert_span_eq, connect_agent, find, run_to_exit, send_both_formats, Forwarder, Receiver,
};
use kata_agent_emitter::{scenario, ScenarioOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What the front requires of clients.
enum ClientAuth {
    None,
    /// A certificate signed by this CA (PEM).
    Required(String),
}

/// A TLS front on a free loopback port, relaying every connection to
/// `upstream` (plain TCP). Returns its port.
async fn tls_front(cert_pem: &str, key_pem: &str, auth: ClientAuth, upstream: String) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                // A failed handshake is the point of some tests.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

/// The receiver's `host:port` for `protocol`.
fn upstream(rx: &Receiver, protocol: &str) -> String {
    let e = if protocol == "grpc" {
        &rx.grpc_endpoint
    } else {
        &rx.http_endpoint
    };
    e.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Spans of both formats arrive exactly, through TLS (and mTLS, gzip when
/// asked), over `protocol`.
async fn delivers(protocol: &str, mtls: bool, gzip: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (server_cert, server_key) = ca.issue(&["localhost"], false);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let rx = Receiver::start().await;
    let client_ca = Ca::new("client CA");
    let auth = if mtls {
        ClientAuth::Required(client_ca.pem())
    } else {
        ClientAuth::None
    };
    let port = tls_front(&server_cert, &server_key, auth, upstream(&rx, protocol)).await;
    let mut args = vec![
        "--otlp-protocol".to_string(),
        protocol.to_string(),
        "--otlp-endpoint".to_string(),
        format!("https://localhost:{port}"),
        "--otlp-certificate".to_string(),
        ca_file.display().to_string(),
    ];
    if mtls {
        let (cert, key) = client_ca.issue(&["kata-trace-forwarder"], false);
        args.push("--otlp-client-certificate".into());
        args.push(write(dir.path(), "client.pem", &cert).display().to_string());
        args.push("--otlp-client-key".into());
        args.push(write(dir.path(), "client.key", &key).display().to_string());
    }
    if gzip {
        args.extend(["--otlp-compression".to_string(), "gzip".to_string()]);
    }
    let mut fwd = Forwarder::hybrid(&args).await;
    let want = send_both_formats(&fwd.agent_socket).await;
    let got = rx.store.wait_for(want.len(), Duration::from_secs(20)).await;
    assert_eq!(got.len(), want.len());
    for w in &want {
        let (resource, span) = find(&got, w.span_id);
        assert_span_eq(w, resource, span, "kata-agent");
    }
    let gzipped = rx.store.gzipped.load(Ordering::SeqCst);
    if gzip {
        assert!(gzipped > 0, "requests were gzipped");
        assert_eq!(gzipped, rx.store.requests.load(Ordering::SeqCst));
    } else {
        assert_eq!(gzipped, 0);
    }
    let status = fwd.terminate().await;
    assert!(status.success(), "{status:?}: {}", fwd.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls() {
    delivers("grpc", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls() {
    delivers("http/protobuf", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mtls_with_gzip() {
    delivers("grpc", true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_mtls_with_gzip() {
    delivers("http/protobuf", true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_without_tls_both_protocols() {
    for protocol in ["grpc", "http/protobuf"] {
        let rx = Receiver::start().await;
        let mut args = rx.args(protocol);
        args.extend(["--otlp-compression".to_string(), "gzip".to_string()]);
        let mut fwd = Forwarder::hybrid(&args).await;
        let sc = scenario(&ScenarioOptions::default());
        let mut agent = connect_agent(&fwd.agent_socket).await;
        agent.write_all(&sc.stream_bytes()).await.unwrap();
        rx.store
            .wait_for(sc.expected.len(), Duration::from_secs(20))
            .await;
        assert!(rx.store.gzipped.load(Ordering::SeqCst) > 0, "{protocol}");
        assert!(fwd.terminate().await.success());
    }
}

/// Startup problems are errors that name the cause: a CA that does not
/// sign the collector's certificate, an expired certificate, a name that
/// does not match, a missing client certificate, files that do not load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_name_the_tls_cause() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let rx = Receiver::start().await;
    let (good_cert, good_key) = ca.issue(&["localhost"], false);
    let (old_cert, old_key) = ca.issue(&["localhost"], true);
    let (wrong_name_cert, wrong_name_key) = ca.issue(&["collector.example"], false);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let other_ca = write(dir.path(), "other.pem", &other.pem());
    let junk = write(dir.path(), "junk.pem", "not a certificate\n");
    let up = upstream(&rx, "grpc");
    let plain = tls_front(&good_cert, &good_key, ClientAuth::None, up.clone()).await;
    let expired = tls_front(&old_cert, &old_key, ClientAuth::None, up.clone()).await;
    let misnamed = tls_front(
        &wrong_name_cert,
        &wrong_name_key,
        ClientAuth::None,
        up.clone(),
    )
    .await;
    let mtls = tls_front(&good_cert, &good_key, ClientAuth::Required(ca.pem()), up).await;
    let (client_cert, _) = ca.issue(&["forwarder"], false);
    let (_, unrelated_key) = ca.issue(&["forwarder"], false);
    let client_cert = write(dir.path(), "client.pem", &client_cert);
    let unrelated_key = write(dir.path(), "unrelated.key", &unrelated_key);

    let endpoint = |port: u16| format!("https://localhost:{port}");
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(plain),
                "--otlp-certificate".into(),
                other_ca.display().to_string(),
            ],
            &["TLS with the OTLP collector", "UnknownIssuer"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(expired),
                "--otlp-certificate".into(),
                ca_file.display().to_string(),
            ],
            &["TLS with the OTLP collector", "certificate expired"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(misnamed),
                "--otlp-certificate".into(),
                ca_file.display().to_string(),
            ],
            &["TLS with the OTLP collector", "not valid for name"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(mtls),
                "--otlp-certificate".into(),
                ca_file.display().to_string(),
            ],
            &["TLS with the OTLP collector", "CertificateRequired"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(plain),
                "--otlp-certificate".into(),
                junk.display().to_string(),
            ],
            &["junk.pem", "no PEM certificate"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(plain),
                "--otlp-certificate".into(),
                "/nonexistent/ca.pem".into(),
            ],
            &["/nonexistent/ca.pem"],
        ),
        (
            vec![
                "--otlp-endpoint".into(),
                endpoint(mtls),
                "--otlp-certificate".into(),
                ca_file.display().to_string(),
                "--otlp-client-certificate".into(),
                client_cert.display().to_string(),
                "--otlp-client-key".into(),
                unrelated_key.display().to_string(),
            ],
            &["unrelated.key", "does not match"],
        ),
    ];
    for (args, needles) in cases {
        let args2 = args.clone();
        let (code, stderr) = tokio::task::spawn_blocking(move || run_to_exit(&args2))
            .await
            .unwrap();
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: expected '{n}' in:\n{stderr}");
        }
        assert!(stderr.contains("localhost"), "names the endpoint: {stderr}");
    }
}
