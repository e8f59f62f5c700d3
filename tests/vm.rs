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
//! Jaeger; (b) template mode, 4 guests at once in sandbox directories made
//! after the forwarder started; (c) a streaming guest's VMM SIGKILLed in the
//! middle of a frame, a guest beside it streaming on; (d) a SIGHUP upgrade
//! to another build while a guest streams; (e) `--kata-host` on a fixture
//! node whose Cloud Hypervisor configurations point at the guests'
//! directories; (f) standard VSOCK inside one guest: agents connect over
//! AF_VSOCK to CID 1 (vsock_loopback) to the release forwarder listening
//! there as on a host; (g) in such a guest, a SIGHUP upgrade while agents
//! stream over AF_VSOCK. Each prints its figures (spans sent, arrived,
//! duplicated, seconds) as `vm figures:` lines (and into `KTF_VM_FIGURES`).
//!
//! Needs scripts/setup-vm.sh's pieces (see tests/common/vm.rs); the suite
//! is off only with `KTF_NO_VM=1`. Test names start with `vm_guest` so
//! that scripts/test.sh can leave them out then. (Over 500 lines: the
//! scenarios and the benchmark stay one test binary, whose guests the test
//! harness runs two at a time.)

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::agents::{alive, signal};
use common::jaeger::{assert_jaeger_span, Jaeger};
use common::vm::{
    bulk_indices, dumped_spans, duplicates, figures, first_frame_ms, forwarder_bin, int_attr,
    make_sandbox, spans, template_forwarder, vsock_local_kit, Guest, Kit,
};
use common::{
    assert_span_eq, assert_tagged, exit_summary, find, fixture_host, free_port,
    kata_host_forwarder, print_plan, templates, wait_metric, Forwarder, Receiver,
};
use kata_agent_emitter::guest::Report;
use kata_agent_emitter::{ExpectedSpan, WireFormat};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::{resource::v1::Resource, trace::v1::Span};

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

/// (a) One forwarder per sandbox (`--socket-path`, as docs/modes.md starts
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
            &format!("{format} guest into Jaeger"),
            want.len(),
            arrived,
            arrived - want.len(),
            t0,
        );
    }
}

/// The agent flags of a guest sending `traces` kitchen-sink traces.
fn traces_args(format: WireFormat, traces: usize) -> Vec<String> {
    [
        "--format",
        &format.to_string(),
        "--traces",
        &traces.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Boots one guest per `(sandbox id, template)` with a kitchen-sink trace
/// (formats alternating), waits for each to finish, and checks that every
/// span it reported arrived once at `rx`, tagged with its own sandbox.
/// Returns how many spans were sent.
async fn guests_tagged_per_sandbox(
    kit: &Kit,
    rx: &Receiver,
    sandboxes: &[(String, std::path::PathBuf)],
) -> usize {
    let mut guests = Vec::new();
    for (i, (id, vmm)) in sandboxes.iter().enumerate() {
        let args = traces_args(WireFormat::ALL[i % 2], 1);
        guests.push(Guest::boot(kit, id, vmm, 3 + i as u32, &as_strs(&args)));
    }
    let mut sent = Vec::new();
    for ((id, _), mut g) in sandboxes.iter().zip(guests) {
        sent.push((id.clone(), spans(&g.wait_done(GUEST_TIMEOUT).await)));
    }
    let total: usize = sent.iter().map(|(_, s)| s.len()).sum();
    let got = rx.store.wait_for(total, WAIT).await;
    // Anything late would be a duplicate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_now = rx.store.spans.lock().unwrap().clone();
    assert_eq!(got_now.len(), got.len(), "no span twice");
    assert_tagged(&got, &sent);
    total
}

/// (b) Template mode: 4 guests at once, each in a sandbox directory made
/// after the forwarder started; each span arrives once, tagged with its
/// own guest's `kata.sandbox.id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_four_sandboxes_in_template_mode() {
    let Some(kit) = Kit::get() else { return };
    let t0 = Instant::now();
    let rx = Receiver::start().await;
    let (mut fwd, template) = template_forwarder(&rx.args("grpc")).await;
    let mut sandboxes = Vec::new();
    for i in 0..4 {
        let id = format!("sandbox-{i}");
        let vmm = make_sandbox(&template, &id).await;
        sandboxes.push((id, vmm));
    }
    let sent = guests_tagged_per_sandbox(&kit, &rx, &sandboxes).await;
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    figures(
        "b",
        "4 guests, template mode",
        sent,
        rx.store.count(),
        0,
        t0,
    );
}

/// (c) A guest streaming spans has its VMM (QEMU and its VSOCK backend)
/// SIGKILLed in the middle of a frame: the forwarder stays up, counts the
/// cut frame, exports exactly the whole frames before it (a prefix of the
/// stream), and a guest beside it, streaming all along, loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_killed_mid_frame_leaves_a_whole_prefix() {
    let Some(kit) = Kit::get() else { return };
    let t0 = Instant::now();
    let rx = Receiver::start().await;
    let port = free_port();
    let mut extra = rx.args("grpc");
    extra.extend(["--metrics-address".to_string(), format!("127.0.0.1:{port}")]);
    let (mut fwd, template) = template_forwarder(&extra).await;
    let victim_vmm = make_sandbox(&template, "victim").await;
    let beside_vmm = make_sandbox(&template, "beside").await;
    const CUT: usize = 120;
    const BESIDE: usize = 300;
    let cut = CUT.to_string();
    let mut victim = Guest::boot(
        &kit,
        "victim",
        &victim_vmm,
        3,
        &[
            "--format",
            "json",
            "--bulk",
            "400",
            "--rate",
            "100",
            "--cut-after",
            &cut,
        ],
    );
    let mut beside = Guest::boot(
        &kit,
        "beside",
        &beside_vmm,
        4,
        &["--format", "bincode", "--bulk", "300", "--rate", "50"],
    );
    let report = victim
        .wait_report("cut", GUEST_TIMEOUT, |r| matches!(r, Report::Cut { .. }))
        .await;
    assert!(
        matches!(report, Report::Cut { whole: CUT, .. }),
        "{report:?}"
    );
    // Every whole frame before the cut reaches the forwarder, and the
    // half frame after them, before the VMM dies.
    let deadline = Instant::now() + WAIT;
    while bulk_indices(&rx.store.spans.lock().unwrap(), Some("victim")).len() < CUT {
        assert!(
            Instant::now() < deadline,
            "victim's whole frames did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.kill();
    wait_metric(port, "kata_trace_forwarder_frames_truncated_total", 1).await;
    assert!(alive(fwd.pid()), "the forwarder stays up");

    let reports = beside.wait_done(GUEST_TIMEOUT).await;
    assert!(matches!(
        reports.last(),
        Some(Report::Done {
            written: BESIDE,
            ..
        })
    ));
    let deadline = Instant::now() + WAIT;
    while bulk_indices(&rx.store.spans.lock().unwrap(), Some("beside")).len() < BESIDE {
        assert!(Instant::now() < deadline, "the guest beside lost spans");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = rx.store.spans.lock().unwrap().clone();
    let victim_idx = bulk_indices(&got, Some("victim"));
    let beside_idx = bulk_indices(&got, Some("beside"));
    assert_eq!(
        victim_idx,
        (0..CUT as i64).collect::<Vec<_>>(),
        "a whole prefix"
    );
    assert_eq!(
        beside_idx,
        (0..BESIDE as i64).collect::<Vec<_>>(),
        "all, once"
    );

    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    let counters = exit_summary(&fwd.stderr());
    assert_eq!(counters["frames_truncated"], 1, "{counters}");
    figures(
        "c",
        "guest killed mid-frame (sent: its whole frames)",
        CUT,
        victim_idx.len(),
        duplicates(&victim_idx),
        t0,
    );
    figures(
        "c",
        "guest beside it",
        BESIDE,
        beside_idx.len(),
        duplicates(&beside_idx),
        t0,
    );
}

/// (d) The forwarder is upgraded by SIGHUP (its binary replaced by another
/// build first) while a guest streams: the guest sees no write error, and
/// every span arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_streams_through_a_sighup_upgrade() {
    use std::os::unix::fs::PermissionsExt;
    let Some(kit) = Kit::get() else { return };
    let t0 = Instant::now();
    let rx = Receiver::start().await;
    // Started as root it becomes nobody, whose upgrade must reach the binary.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("kata-trace-forwarder");
    let first = forwarder_bin();
    std::fs::copy(&first, &exe).unwrap();
    let socket_path = dir.path().join("kata.hvsock");
    let mut args = vec![
        "--socket-path".to_string(),
        socket_path.display().to_string(),
        "--batch-timeout".to_string(),
        "50ms".to_string(),
    ];
    args.extend(rx.args("grpc"));
    let mut fwd = Forwarder::spawn_exe(&exe, dir, socket_path.clone(), &args);
    fwd.wait_listening().await;
    const SPANS: usize = 400;
    let mut guest = Guest::boot(
        &kit,
        "streaming",
        &socket_path,
        3,
        &["--format", "json", "--bulk", "400", "--rate", "80"],
    );
    guest
        .wait_report("first frame", GUEST_TIMEOUT, |r| {
            matches!(r, Report::FirstFrame { .. })
        })
        .await;
    rx.store.wait_for(40, WAIT).await;
    // A package upgrade: another build at the path, then SIGHUP.
    let other = if first.as_path() == std::path::Path::new(common::BIN) {
        first.clone()
    } else {
        common::BIN.into()
    };
    let new = exe.with_extension("new");
    std::fs::copy(other, &new).unwrap();
    std::fs::rename(&new, &exe).unwrap();
    let before = rx.store.count();
    signal(fwd.pid(), Signal::SIGHUP);
    // The old process, the bridge, the upgraded one (same pid).
    let deadline = Instant::now() + WAIT;
    while fwd.stderr().matches("forwarder ready").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no upgrade:
{}",
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reports = guest.wait_done(GUEST_TIMEOUT).await;
    assert!(
        matches!(
            reports.last(),
            Some(Report::Done {
                written: SPANS,
                errors: 0,
                ..
            })
        ),
        "{reports:?}"
    );
    rx.store.wait_for(SPANS, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idx = bulk_indices(&rx.store.spans.lock().unwrap(), None);
    assert_eq!(
        idx,
        (0..SPANS as i64).collect::<Vec<_>>(),
        "every span once"
    );
    assert!(before < SPANS, "the upgrade came while the guest streamed");
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    figures(
        "d",
        &format!("SIGHUP upgrade after {before} spans, 0 write errors"),
        SPANS,
        idx.len(),
        duplicates(&idx),
        t0,
    );
}

/// (e) `--kata-host` on a fixture node (`--kata-root`): the Go runtime's and
/// runtime-rs' Cloud Hypervisor configurations put their sandboxes under
/// the root, where the guests' VMM sockets are; each guest's spans arrive
/// tagged with its sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_kata_host_serves_cloud_hypervisor_guests() {
    let Some(kit) = Kit::get() else { return };
    let t0 = Instant::now();
    let rx = Receiver::start().await;
    let (dir, root) = fixture_host();
    let (code, plan, stderr) = print_plan(&root, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let templates: Vec<String> = templates(&plan)
        .into_iter()
        .filter(|t| t.ends_with("/clh.sock") || t.ends_with("/ch-vm.sock"))
        .collect();
    assert_eq!(
        templates.len(),
        2,
        "both Cloud Hypervisor templates: {plan:#}"
    );
    let mut fwd = kata_host_forwarder(&forwarder_bin(), dir, &root, &rx.args("grpc"));
    fwd.wait_listening().await;
    let mut sandboxes = Vec::new();
    for (i, t) in templates.iter().enumerate() {
        let id = format!("clh-{i}");
        sandboxes.push((id.clone(), make_sandbox(t, &id).await));
    }
    let sent = guests_tagged_per_sandbox(&kit, &rx, &sandboxes).await;
    let got = rx.store.count();
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    figures(
        "e",
        "--kata-host, Go and runtime-rs Cloud Hypervisor guests",
        sent,
        got,
        0,
        t0,
    );
}

/// Boots the `vsock-local` guest (crates/guest-image's init says what
/// `args` ask for) and waits until it powers off; returns it, its agents'
/// manifest, and all its second serial port carried. `None`: the VM suite
/// is off.
async fn run_vsock_local(name: &str, args: &[&str]) -> Option<(Guest, Vec<Report>, String)> {
    let kit = Kit::get()?;
    let dir = tempfile::tempdir().unwrap();
    let kit = vsock_local_kit(&kit, dir.path());
    let mut all = vec!["vsock-local"];
    all.extend_from_slice(args);
    // Its virtio VSOCK device, relayed to a socket nobody listens on, is
    // not used: every connection stays inside the guest.
    let nowhere = dir.path().join("unused.sock");
    let mut guest = Guest::boot(&kit, name, &nowhere, 3, &all);
    let reports = guest.wait_done(GUEST_TIMEOUT).await;
    let output = guest.second_port();
    Some((guest, reports, output))
}

/// Each span of `want` is in `got` once, intact, from the peer CID the
/// kernel reports for a connection over `vsock_loopback` (1, as it is).
fn assert_each_from_cid_1(want: &[ExpectedSpan], got: &[(Resource, Span)]) {
    for w in want {
        let (resource, span) = find(got, w.span_id);
        assert_eq!(
            int_attr(&resource.attributes, "kata.vsock.cid"),
            Some(1),
            "the peer's CID as it is"
        );
        let mut rest = resource.clone();
        rest.attributes.retain(|kv| kv.key != "kata.vsock.cid");
        assert_span_eq(w, &rest, span, "kata-agent");
    }
}

/// (f) Standard VSOCK through a real kernel: in one guest the release
/// forwarder listens on AF_VSOCK as on a host (the default flags, CID any,
/// port 10240) and 4 agents (formats alternating) connect to it at once at
/// CID 1 through `vsock_loopback`, beside a fifth killed in the middle of a
/// frame. Every span of the 4 arrives once, intact, with the peer's CID (1)
/// as `kata.vsock.cid`; of the fifth, exactly its whole frames, and the cut
/// one is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_vsock_loopback_agents_to_a_forwarder_inside() {
    let t0 = Instant::now();
    let formats: Vec<String> = (0..4).map(|i| WireFormat::ALL[i % 2].to_string()).collect();
    let mut args = vec!["cut"];
    args.extend(formats.iter().map(String::as_str));
    let Some((guest, reports, output)) = run_vsock_local("vsock-local", &args).await else {
        return;
    };
    let done: Vec<_> = reports
        .iter()
        .filter(|r| matches!(r, Report::Done { errors: 0, .. }))
        .collect();
    assert_eq!(
        done.len(),
        formats.len(),
        "every agent done, no write error:\n{output}"
    );
    const CUT: usize = 120;
    assert!(
        reports
            .iter()
            .any(|r| matches!(r, Report::Cut { whole: CUT, .. })),
        "the victim cut its frame:\n{output}"
    );
    let want = spans(&reports);
    assert_eq!(
        want.len(),
        22 * formats.len(),
        "two kitchen-sink traces each"
    );
    let mut got = dumped_spans(&output);
    // The victim's bulk spans: exactly its whole frames, a prefix.
    let victim_idx = bulk_indices(&got, None);
    assert_eq!(
        victim_idx,
        (0..CUT as i64).collect::<Vec<_>>(),
        "a whole prefix"
    );
    got.retain(|(_, s)| int_attr(&s.attributes, "kata.span_index").is_none());
    assert_eq!(
        got.len(),
        want.len(),
        "every span once\n{output}\n{}",
        guest.logs()
    );
    assert_each_from_cid_1(&want, &got);
    let counters = exit_summary(&output);
    assert_eq!(counters["frames_truncated"], 1, "{counters}");
    assert_eq!(counters["connections_accepted"], 5, "{counters}");
    figures(
        "f",
        "4 agents over AF_VSOCK (vsock_loopback) to a forwarder in the guest",
        want.len(),
        got.len(),
        got.len() - want.len(),
        t0,
    );
    figures(
        "f",
        "an agent killed mid-frame beside them (sent: its whole frames)",
        CUT,
        victim_idx.len(),
        duplicates(&victim_idx),
        t0,
    );
}

/// (g) A `SIGHUP` upgrade inside the guest while two agents (JSON and
/// bincode) stream over AF_VSOCK to CID 1: the forwarder, started as root
/// with its default hand-off socket (under /run/kata-trace-forwarder),
/// hands its VSOCK listener and both live connections to a bridge and takes
/// them back as the binary at its path, under its pid. No agent sees a write
/// error, and every span arrives once, intact, with the peer's CID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_guest_vsock_loopback_sighup_upgrade_while_agents_stream() {
    let t0 = Instant::now();
    let formats = WireFormat::ALL.map(|f| f.to_string());
    let mut args = vec!["upgrade"];
    args.extend(formats.iter().map(String::as_str));
    let Some((_, reports, output)) = run_vsock_local("vsock-upgrade", &args).await else {
        return;
    };
    const TRACES: usize = 12;
    let done = reports
        .iter()
        .filter(|r| matches!(r, Report::Done { written, errors: 0, .. } if *written == 11 * TRACES))
        .count();
    assert_eq!(
        done,
        formats.len(),
        "every agent done, no write error:\n{output}"
    );
    let want = spans(&reports);
    assert_eq!(want.len(), 11 * TRACES * formats.len());
    // The forwarder's log, all three processes' lines.
    let log: Vec<serde_json::Value> = output
        .lines()
        .filter(|l| l.starts_with("{\"timestamp\""))
        .filter_map(|l| serde_json::from_str(l.trim_end_matches('\r')).ok())
        .collect();
    let ready: Vec<&serde_json::Value> = log
        .iter()
        .filter(|v| v["message"] == "forwarder ready")
        .collect();
    // No --handoff-socket: root's default, one per set of listeners.
    assert!(
        ready.iter().all(|v| v["handoff"]
            .as_str()
            .is_some_and(|h| h.contains("/run/kata-trace-forwarder/handoff-"))),
        "the default hand-off socket: {ready:?}"
    );
    let ready: Vec<i64> = ready.iter().filter_map(|v| v["pid"].as_i64()).collect();
    let [old, bridge, new] = ready[..] else {
        panic!("not the old process, its bridge, the new binary: {ready:?}\n{output}")
    };
    assert!(
        old == new && bridge != old,
        "the new binary under the old pid: {ready:?}"
    );
    // The old process hands every listener and both agents' connections,
    // still open, to the bridge; the bridge hands them back.
    let handed: Vec<(i64, i64)> = log
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("handed over: every listener"))
        })
        .filter_map(|v| Some((v["successor"].as_i64()?, v["connections"].as_i64()?)))
        .collect();
    assert_eq!(handed.len(), 2, "two hand-overs: {handed:?}\n{output}");
    assert!(
        handed.contains(&(bridge, 2)),
        "both agents' connections handed to the bridge while they streamed: {handed:?}"
    );
    let (before, after) = output
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("ktf-init: upgrade: spans sent before ")?;
            let (b, a) = rest.trim_end().split_once(", when done ")?;
            Some((b.parse::<usize>().ok()?, a.parse::<usize>().ok()?))
        })
        .unwrap_or_else(|| panic!("no upgrade line:\n{output}"));
    assert!(
        0 < before && before < want.len(),
        "SIGHUP while the agents streamed: {before}"
    );
    let got = dumped_spans(&output);
    assert_eq!(got.len(), want.len(), "every span once\n{output}");
    assert_each_from_cid_1(&want, &got);
    // The old process, the bridge and the new binary each read a part of
    // the stream, together every frame once, none cut, dropped or bad.
    let mut frames = 0;
    for summary in log.iter().filter(|v| v["message"] == "forwarder stopped") {
        let c = &summary["summary"];
        for counter in ["frames_truncated", "decode_errors", "spans_dropped"] {
            assert_eq!(c[counter], 0, "{counter}: {c}");
        }
        frames += c["frames_received"].as_u64().unwrap_or_default();
    }
    assert_eq!(frames, want.len() as u64, "each frame read once\n{output}");
    figures(
        "g",
        &format!(
            "SIGHUP upgrade in the guest after {before} spans (done by {after}), \
             2 agents over AF_VSOCK, 0 write errors"
        ),
        want.len(),
        got.len(),
        got.len() - want.len(),
        t0,
    );
}

/// User plus system CPU seconds `pid` has used (all its threads).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    (f[0] + f[1]) as f64 / tick as f64
}

/// For BENCHMARKS.md, by hand (`cargo test --test vm -- --ignored
/// --nocapture`, with `KTF_OTHER_BUILD` naming the release build): how long
/// from QEMU's start to the first span at the collector, and spans per
/// forwarder CPU-second through a real vhost-user VSOCK against the
/// Unix-socket path, in one run on one forwarder: the same bulk spans (JSON,
/// about 800 bytes), written the same way, at the same rate, first from a
/// guest, then from a host process straight on the forwarder's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn vm_guest_benchmark_vsock_against_unix_socket() {
    use tokio::io::AsyncWriteExt;
    let Some(kit) = Kit::get() else { return };
    const SPANS: usize = 10_000;
    const RATE: u64 = 2_000;
    let rx = Receiver::start().await;
    let mut fwd = Forwarder::hybrid_exe(&forwarder_bin(), &rx.args("grpc")).await;
    // Boot to first span: a guest whose agent sends one trace at once.
    let mut first = Guest::boot(&kit, "first", &fwd.socket_path, 3, &["--traces", "1"]);
    rx.store.wait_for(1, GUEST_TIMEOUT).await;
    let boot_to_first = rx.store.arrived.lock().unwrap()[0] - first.started;
    let first_reports = first.wait_done(GUEST_TIMEOUT).await;
    let base = rx.store.wait_for(11, WAIT).await.len();
    // Throughput: a guest that makes its spans first (slow under TCG),
    // then sends them at RATE.
    let rate = RATE.to_string();
    let spans_arg = SPANS.to_string();
    let mut guest = Guest::boot(
        &kit,
        "bench",
        &fwd.socket_path,
        4,
        &["--format", "json", "--bulk", &spans_arg, "--rate", &rate],
    );
    rx.store.wait_for(base + 1, GUEST_TIMEOUT).await;
    let cpu0 = cpu_seconds(fwd.pid());
    let t0 = Instant::now();
    rx.store.wait_for(base + SPANS, GUEST_TIMEOUT).await;
    let (vsock_cpu, vsock_secs) = (cpu_seconds(fwd.pid()) - cpu0, t0.elapsed());
    guest.wait_done(GUEST_TIMEOUT).await;

    let frames = kata_agent_emitter::bulk_frames(WireFormat::Json, SPANS, 800, 1);
    let mut agent = common::connect_agent(&fwd.agent_socket).await;
    let cpu0 = cpu_seconds(fwd.pid());
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for f in &frames {
        tick.tick().await;
        // As the guest's agent writes a frame (Kata's exporter): the header,
        // then the payload, so that only the transport differs.
        agent.write_all(&f[..8]).await.unwrap();
        agent.write_all(&f[8..]).await.unwrap();
    }
    rx.store.wait_for(base + 2 * SPANS, GUEST_TIMEOUT).await;
    let (unix_cpu, unix_secs) = (cpu_seconds(fwd.pid()) - cpu0, t0.elapsed());
    drop(agent);
    assert!(fwd.terminate().await.success(), "{}", fwd.stderr());
    eprintln!(
        "vm bench: boot to first span {:.2} s (guest uptime at its first frame {:?} ms, {})",
        boot_to_first.as_secs_f64(),
        first_frame_ms(&first_reports),
        kit.accel
    );
    for (path, cpu, secs) in [
        ("vhost-user vsock", vsock_cpu, vsock_secs),
        ("unix socket", unix_cpu, unix_secs),
    ] {
        eprintln!(
            "vm bench: {path}: {SPANS} spans in {:.2} s, forwarder CPU {cpu:.2} s: {:.0} spans per CPU-second",
            secs.as_secs_f64(),
            SPANS as f64 / cpu
        );
    }
}
