//! `kata-trace-forwarder status` against the real binary: a forwarder in
//! template mode serving two sandboxes, one of them throttled by a low
//! per-sandbox rate, with its collector down and its spool filling. The
//! table and the JSON say what is true there; with no forwarder, one line
//! and exit 1; a process of nobody's (the forwarder's own user) gets
//! nothing; a peer that connects and says nothing does not hold the
//! answer up for long; the answer follows the hand-off socket through an
//! upgrade and a takeover.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_when_listening, Forwarder, Receiver, BIN};
use kata_agent_emitter::{bulk_frames, WireFormat};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const NOBODY: u32 = 65534;
/// Spans the throttled sandbox sends, and its rate and burst.
const BUSY_SPANS: usize = 400;
const RATE: &str = "100";
const QUIET_SPANS: usize = 5;

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// `status` with `args`, as `uid` (this process's user by default):
/// its exit code, stdout and stderr, and how long it took.
fn status(args: &[&str], uid: Option<u32>) -> (i32, String, String, Duration) {
    run(&[&["status"], args].concat(), uid)
}

/// The binary with `args`, as `uid`: see [`status`].
fn run(args: &[&str], uid: Option<u32>) -> (i32, String, String, Duration) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// `status --json` of the forwarder at `socket`, which must answer.
fn report(socket: &Path) -> Value {
    let (code, out, err, _) = status(
        &["--json", "--handoff-socket", &socket.display().to_string()],
        None,
    );
    assert_eq!(code, 0, "status --json failed: {err}");
    assert_eq!(out.lines().count(), 1, "one forwarder, one line: {out}");
    serde_json::from_str(&out).unwrap()
}

fn sandbox<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sandbox"] == id)
        .unwrap_or_else(|| panic!("sandbox {id} not in {r:#}"))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The counts a person compares between two reports.
fn counts(r: &Value) -> Vec<u64> {
    ["busy", "quiet"]
        .iter()
        .flat_map(|id| {
            let s = sandbox(r, id);
            ["received", "exported", "spooled", "queued", "pending"].map(|k| n(&s[k]))
        })
        .chain([n(&r["exporter"]["spool"]["spans"])])
        .collect()
}

/// The outage: a template forwarder serving `busy` (over its rate) and
/// `quiet`, collector killed once it started, spool and queue small, both
/// agents done sending and every count settled. Returns the forwarder,
/// its hand-off socket, the spool directory (and the temporary one it is
/// in) and the settled report.
async fn outage(rx: &mut Receiver) -> (Forwarder, PathBuf, (tempfile::TempDir, PathBuf), Value) {
    let spool_dir = tempfile::tempdir().unwrap();
    let spool = spool_dir.path().join("spool");
    let (fwd, handoff, vm) = template_forwarder(
        rx,
        &[
            "--spool-dir",
            &spool.display().to_string(),
            "--queue-size",
            "64",
            "--batch-max-spans",
            "16",
            "--batch-timeout",
            "50ms",
            "--sandbox-spans-per-second",
            RATE,
            "--sandbox-span-burst",
            RATE,
        ],
    )
    .await;
    rx.kill();
    for id in ["busy", "quiet"] {
        std::fs::create_dir(vm.join(id)).unwrap();
    }

    let mut busy = connect_when_listening(&vm.join("busy/clh.sock_10240")).await;
    let mut quiet = connect_when_listening(&vm.join("quiet/clh.sock_10240")).await;
    let busy_bytes = bulk_frames(WireFormat::Bincode, BUSY_SPANS, 300, 1).concat();
    let quiet_bytes = bulk_frames(WireFormat::Json, QUIET_SPANS, 300, 2).concat();
    busy.write_all(&busy_bytes).await.unwrap();
    // Read at the sandbox's rate, after its burst: some 3 s. The quiet one
    // sends once the busy one is done: in a queue this small (64 spans), a
    // sandbox's share beside another that holds room (its spans in the
    // batch being retried) is 32 spans, less than one of the busy one's
    // reads, which would then wait for room (limited by `queue_share`)
    // rather than fill the queue and spill to the spool.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_sent = false;
    let mut last: Option<Vec<u64>> = None;
    loop {
        let r = report(&handoff);
        let busy_read = n(&sandbox(&r, "busy")["received"]) as usize == BUSY_SPANS;
        if busy_read && !quiet_sent {
            quiet.write_all(&quiet_bytes).await.unwrap();
            quiet_sent = true;
        }
        let read = busy_read && n(&sandbox(&r, "quiet")["received"]) as usize == QUIET_SPANS;
        let now = counts(&r);
        if read && last.as_ref() == Some(&now) {
            // The agents stay connected, as the Kata agent does.
            std::mem::forget((busy, quiet));
            return (fwd, handoff, (spool_dir, spool), r);
        }
        last = read.then_some(now);
        assert!(
            Instant::now() < deadline,
            "never settled: {r:#}\n{}",
            fwd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The whole situation, as `status --json` and the table say it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_a_throttled_sandbox_and_a_down_collector() {
    let mut rx = Receiver::start().await;
    let (mut fwd, handoff, (_spool_dir, spool), r) = outage(&mut rx).await;
    eprintln!(
        "status --json:\n{}",
        serde_json::to_string_pretty(&r).unwrap()
    );

    assert_eq!(r["format"], 1);
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(n(&r["pid"]), u64::from(fwd.pid() as u32));
    assert_eq!(r["socket"], handoff.display().to_string());
    assert!(n(&r["uptime_seconds"]) < 120);
    let listeners = r["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert!(
        listeners[0].as_str().unwrap().contains("template"),
        "{listeners:?}"
    );
    let ids: Vec<&str> = r["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["busy", "quiet"]);

    // Each sandbox: its agent connected, everything read, nothing taken
    // by a collector that is down, nothing dropped (it is spooled or
    // waits); only the busy one ran into its rate.
    let now = n(&r["now_unix_ms"]);
    for (id, sent) in [("busy", BUSY_SPANS), ("quiet", QUIET_SPANS)] {
        let s = sandbox(&r, id);
        assert_eq!(
            (n(&s["connections"]), n(&s["max_connections"])),
            (1, 8),
            "{id}"
        );
        assert_eq!(n(&s["received"]) as usize, sent, "{id}");
        assert_eq!(n(&s["exported"]), 0, "{id}: the collector is down");
        assert_eq!(n(&s["dropped"]["total"]), 0, "{id}");
        // What is not on disk is in memory, some of it in the queue.
        assert_eq!(
            n(&s["spooled"]) + n(&s["pending"]),
            sent as u64,
            "{id}: {s}"
        );
        assert!(n(&s["queued"]) <= n(&s["pending"]), "{id}: {s}");
        let last = n(&s["last_sent_unix_ms"]);
        assert!(last <= now && now - last < 60_000, "{id}: {s}");
    }
    let busy = sandbox(&r, "busy");
    assert!(
        n(&busy["limited"]["rate"]) > 0,
        "busy was throttled: {busy}"
    );
    assert!(n(&busy["spooled"]) > 0, "the queue filled: spooled {busy}");
    // The batch being retried, at least: the collector is down.
    assert!(n(&busy["pending"]) > 0, "{busy}");
    assert_eq!(n(&sandbox(&r, "quiet")["limited"]["total"]), 0);

    // The exporter: never a success, its last failure, retries; the spool
    // holds what the sandboxes spooled, as its directory says.
    let e = &r["exporter"];
    assert!(
        e["collector"].as_str().unwrap().contains(&rx.grpc_endpoint),
        "{e}"
    );
    assert_eq!(e["last_success_unix_ms"], Value::Null, "{e}");
    assert!(
        !e["last_failure"]["error"].as_str().unwrap().is_empty(),
        "{e}"
    );
    assert!(n(&e["retries"]) > 0, "{e}");
    let sp = &e["spool"];
    let spooled: u64 = ["busy", "quiet"]
        .iter()
        .map(|id| n(&sandbox(&r, id)["spooled"]))
        .sum();
    assert_eq!(n(&sp["spans"]), spooled, "{sp}");
    assert_eq!(n(&r["counters"]["spans_spooled"]), spooled);
    let on_disk: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(n(&sp["batches"]), on_disk.len() as u64, "{sp}");
    assert_eq!(n(&sp["bytes"]), on_disk.iter().sum::<u64>(), "{sp}");
    let total = |k: &str| -> u64 {
        ["busy", "quiet"]
            .iter()
            .map(|id| n(&sandbox(&r, id)[k]))
            .sum()
    };
    assert_eq!(n(&e["queue_spans"]), total("queued"), "{e}");
    assert_eq!(n(&e["pending_spans"]), total("pending"), "{e}");

    // The table says the same.
    let (code, table, err, _) = status(&["--handoff-socket", &handoff.display().to_string()], None);
    assert_eq!(code, 0, "{err}");
    eprintln!("status:\n{table}");
    let (_, json, _, took) = status(
        &["--json", "--handoff-socket", &handoff.display().to_string()],
        None,
    );
    eprintln!("status --json ({took:?}):\n{json}");
    let row = |id: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    for id in ["busy", "quiet"] {
        let s = sandbox(&r, id);
        let cells = row(id);
        let want: Vec<String> = [
            "1/8".to_string(),
            s["received"].to_string(),
            "0".to_string(),
            s["spooled"].to_string(),
            s["pending"].to_string(),
        ]
        .to_vec();
        assert_eq!(cells[1..6], want[..], "{id}:\n{table}");
        assert!(cells.join(" ").contains(" ago "), "{id}:\n{table}");
    }
    assert!(
        row("busy").join(" ").ends_with(&format!(
            "0 {} (rate {})",
            busy["limited"]["total"], busy["limited"]["rate"]
        )),
        "busy: nothing dropped, throttled:\n{table}"
    );
    assert!(row("quiet").join(" ").ends_with("0 -"), "{table}");
    for needle in [
        format!("(pid {})", fwd.pid()),
        "SANDBOX".to_string(),
        "last success: never".to_string(),
        "last failure: ".to_string(),
        format!("spool: {} batches, {} spans,", sp["batches"], sp["spans"]),
        format!(
            "in memory: {} spans ({} in the queue,",
            e["pending_spans"], e["queue_spans"]
        ),
    ] {
        assert!(table.contains(&needle), "no '{needle}' in:\n{table}");
    }
    // Read-only: nothing paused for it.
    assert!(
        !fwd.stderr().contains("pausing every connection"),
        "{}",
        fwd.stderr()
    );

    // Once the forwarder is gone, one line and exit 1.
    assert!(fwd.terminate().await.success());
    let (code, out, err, _) = status(&["--handoff-socket", &handoff.display().to_string()], None);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: no kata-trace-forwarder is running at"),
        "{err}"
    );
}

/// `status` is a subcommand beside the forwarder's flags, which keep their
/// meaning: given together, they are a usage error rather than ignored.
#[test]
fn status_is_a_subcommand_beside_the_flags() {
    let run = |args: &[&str]| {
        let (code, out, err, _) = run(args, None);
        (code, out, err)
    };
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("status"), "{out}");
    assert!(out.contains("--socket-path-template"), "{out}");
    let (code, out, _) = run(&["status", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--json", "--handoff-socket"] {
        assert!(out.contains(flag), "{out}");
    }
    let (code, _, err) = run(&["--dump-only", "status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = run(&["status", "--dump-only"]);
    assert_eq!(code, 2, "{err}");
}

/// No forwarder at the socket asked: one line on stderr, nothing on
/// stdout, exit 1, at once; a directory or file there is not one either.
#[test]
fn no_forwarder_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("handoff.sock");
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "").unwrap();
    for path in [&missing, &file] {
        for json in [false, true] {
            let mut args = vec!["--handoff-socket", path.to_str().unwrap()];
            if json {
                args.push("--json");
            }
            let (code, out, err, took) = status(&args, None);
            assert_eq!(code, 1, "{args:?}: {err}");
            assert_eq!(out, "", "{args:?}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("error: "), "{err}");
            assert!(took < Duration::from_secs(2), "{took:?}");
        }
    }
}

/// A process of nobody's, the user the forwarder runs as (shared with
/// other services), can reach the hand-off socket but is refused by its
/// peer check before anything is read: no report, exit 1, and the
/// refusal is logged with its uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_the_forwarders_user_gets_nothing() {
    if !is_root() {
        eprintln!("skipped: acting as nobody needs root");
        return;
    }
    let rx = Receiver::start().await;
    let (fwd, handoff, _) = template_forwarder(&rx, &[]).await;
    let socket = handoff.display().to_string();
    let owner = std::fs::metadata(&handoff).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&owner),
        NOBODY,
        "nobody can connect: the peer check is what refuses it"
    );
    for args in [
        vec!["--handoff-socket", &socket],
        vec!["--json", "--handoff-socket", &socket],
    ] {
        let (code, out, err, _) = status(&args, Some(NOBODY));
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert_eq!(out, "", "nobody got a report: {out}");
        assert!(err.contains("closed without answering"), "{err}");
    }
    let log = fwd.stderr();
    assert_eq!(log.matches("hand-off socket: refused").count(), 2, "{log}");
    assert!(log.contains(&format!("\"uid\":{NOBODY}")), "{log}");
    // Root still gets its answer.
    let r = report(&handoff);
    assert_eq!(n(&r["pid"]), u64::from(fwd.pid() as u32));
}

/// A peer that connects and sends nothing is given a second at most: a
/// status asked meanwhile is answered within the client's bound, and the
/// silent peer is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_does_not_hold_the_answer_up() {
    let rx = Receiver::start().await;
    let (fwd, handoff, _) = template_forwarder(&rx, &[]).await;
    let mut silent = std::os::unix::net::UnixStream::connect(&handoff).unwrap();
    let connected = Instant::now();
    let (code, out, err, took) = status(
        &["--json", "--handoff-socket", &handoff.display().to_string()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(took < Duration::from_secs(3), "status took {took:?}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(n(&r["pid"]), u64::from(fwd.pid() as u32));
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    let got = silent.read(&mut buf);
    assert!(
        matches!(got, Ok(0)),
        "the silent peer is closed, not answered: {got:?}"
    );
    assert!(
        connected.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        connected.elapsed()
    );
}

/// The hand-off socket goes along with an upgrade by SIGHUP and a
/// takeover: status is answered by whoever serves, the upgraded binary
/// under the same pid (uptime from its start), then the process that took
/// over; an agent connected throughout is still the sandbox's, and the
/// spans it sent before count for the process that read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_upgrades_and_takeovers() {
    use common::handover::Setup;
    let rx = Receiver::start().await;
    let mut setup = Setup::start(&rx, &[]);
    let pid = setup.wait_ready(1).await;
    let handoff = setup.dir.path().join("handoff.sock");
    let mut agent = connect_when_listening(&setup.agent_socket).await;
    agent
        .write_all(&bulk_frames(WireFormat::Json, 3, 300, 3).concat())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let r = report(&handoff);
        if r["sandboxes"][0]["exported"] == 3 {
            break r;
        }
        assert!(Instant::now() < deadline, "{r:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(n(&before["pid"]), pid as u64);
    assert!(
        before["exporter"]["last_success_unix_ms"].is_u64(),
        "{before}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let upgraded = setup.hand_over(pid, 0).await;
    let r = report(&handoff);
    assert_eq!(n(&r["pid"]), upgraded as u64, "the same pid: {r}");
    assert!(
        n(&r["started_unix_ms"]) > n(&before["started_unix_ms"]),
        "started again: {r}"
    );
    let s = &r["sandboxes"][0];
    assert_eq!((n(&s["connections"]), n(&s["received"])), (1, 0), "{s}");

    let taker = setup.hand_over(upgraded, 3).await;
    let r = report(&handoff);
    assert_eq!(n(&r["pid"]), taker as u64, "{r}");
    assert_eq!(n(&r["sandboxes"][0]["connections"]), 1, "{r}");
    drop(agent);
}

/// A template forwarder with no sandbox yet and `extra` flags, its
/// hand-off socket in a directory anyone may enter: started as root, the
/// forwarder becomes nobody and makes that socket nobody's, so nobody can
/// reach it, and the peer check (not the directory) is what refuses
/// nobody. The forwarder, that socket, and the sandboxes' directory.
async fn template_forwarder(rx: &Receiver, extra: &[&str]) -> (Forwarder, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vm = dir.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    let handoff = dir.path().join("handoff.sock");
    let mut args: Vec<String> = [
        "--socket-path-template",
        &format!("{}/{{ID}}/clh.sock", vm.display()),
        "--handoff-socket",
        &handoff.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(rx.args("grpc"));
    let fwd = Forwarder::spawn_in(dir, PathBuf::new(), &args);
    fwd.wait_listening().await;
    (fwd, handoff, vm)
}
