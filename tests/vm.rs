//! The forwarder against real guests (issue 21): a Linux kernel under QEMU
//! (TCG here: this host's KVM boots no stock kernel), its agent, the
//! project's emitter driving the real opentelemetry SDKs, writing over
//! AF_VSOCK to CID 2 port 10240 as Kata's vsock-exporter does, through a
//! vhost-user VSOCK device whose backend (vhost-device-vsock) relays the
//! connection to the forwarder's Unix socket as Cloud Hypervisor and
//! Firecracker do (hybrid VSOCK). Each guest prints a manifest of what it
//! sent; the host checks what arrived against it, span by span.
//!
//! Scenarios: (a) `--socket-path`, a JSON and a bincode guest into a real
//! Jaeger. Each prints its figures (spans sent, arrived, duplicated,
//! seconds) on stderr, as `vm figures:` lines.
//!
//! Needs scripts/setup-vm.sh's pieces (see tests/common/vm.rs); the suite
//! is off only with `KTF_NO_VM=1`. Test names start with `vm_guest` so
//! that scripts/test.sh can leave them out then.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::jaeger::{assert_jaeger_span, Jaeger};
use common::vm::{figures, first_frame_ms, forwarder_bin, spans, Guest, Kit};
use common::Forwarder;
use kata_agent_emitter::{ExpectedSpan, WireFormat};

/// A guest boots, sends and powers off in about 7 s under TCG on an idle
/// core; the bound leaves room for busy machines.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);

/// Each trace of `want`, fetched from Jaeger once all its spans are there,
/// checked span by span; returns how many spans Jaeger holds for them.
async fn assert_in_jaeger(jaeger: &Jaeger, want: &[ExpectedSpan]) -> usize {
    let mut traces: BTreeMap<u128, Vec<&ExpectedSpan>> = BTreeMap::new();
    for s in want {
        traces.entry(s.trace_id).or_default().push(s);
    }
    let mut arrived = 0;
    for (trace_id, spans) in traces {
        // Exactly this many: a duplicate would be one more.
        let trace = jaeger.wait_for_trace(trace_id, spans.len(), WAIT).await;
        for s in &spans {
            assert_jaeger_span(&trace, s, "kata-agent");
        }
        arrived += trace["spans"].as_array().map_or(0, Vec::len);
    }
    arrived
}

/// (a) One forwarder per sandbox (`--socket-path`, as the README starts
/// one), a JSON guest and a bincode guest at once, both exporting to one
/// real Jaeger: every span each guest's SDK exported is in Jaeger, intact,
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_json_and_bincode_spans_into_jaeger() {
    let Some(kit) = Kit::get() else { return };
    let t0 = Instant::now();
    let jaeger = Jaeger::start().await;
    let mut running = Vec::new();
    for (i, format) in WireFormat::ALL.into_iter().enumerate() {
        let fwd = Forwarder::hybrid_exe(&forwarder_bin(), &jaeger.forwarder_args("grpc")).await;
        let name = format.to_string();
        let guest = Guest::boot(
            &kit,
            &name,
            &fwd.socket_path,
            3 + i as u32,
            &["--format", &name, "--traces", "2"],
        );
        running.push((format, fwd, guest));
    }
    for (format, mut fwd, mut guest) in running {
        let reports = guest.wait_done(GUEST_TIMEOUT).await;
        let want = spans(&reports);
        assert_eq!(want.len(), 22, "two kitchen-sink traces of 11 spans");
        let arrived = assert_in_jaeger(&jaeger, &want).await;
        let status = fwd.terminate().await;
        assert!(status.success(), "{status:?}\n{}", fwd.stderr());
        figures(
            "a",
            &format!(
                "{format} guest into Jaeger (first frame at guest uptime {:?} ms)",
                first_frame_ms(&reports)
            ),
            want.len(),
            arrived,
            arrived - want.len(),
            t0,
        );
    }
}
