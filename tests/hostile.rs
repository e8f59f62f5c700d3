//! A guest is untrusted. While hostile connections throw everything at the
//! forwarder, a good agent streams beside them: all its spans must arrive
//! exact, the forwarder must stay up, and its memory must stay bounded.

mod common;

use std::time::Duration;

use common::{assert_span_eq, connect_agent, find, Forwarder, Receiver};
use kata_agent_emitter::{frame, scenario, ScenarioOptions, WireFormat};
use tokio::io::AsyncWriteExt;

fn status_field(pid: i32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_do_not_hurt_a_good_agent() {
    let rx = Receiver::start().await;
    let mut args = rx.args("grpc");
    args.extend(["--max-frame-size".to_string(), "1MiB".to_string()]);
    // Every hostile connection here is one sandbox's (one socket): let it
    // have the global cap, so that each is served and counted for what it
    // sends. Sandboxes against each other: tests/isolation.rs.
    args.extend(["--sandbox-max-connections".to_string(), "1024".to_string()]);
    let mut fwd = Forwarder::hybrid(&args).await;
    let sock = fwd.agent_socket.clone();

    let good = scenario(&ScenarioOptions {
        format: WireFormat::Bincode,
        ..Default::default()
    });
    let mut good_agent = connect_agent(&sock).await;
    // First half of the good agent's spans before the attack...
    let half = good.frames.len() / 2;
    good_agent
        .write_all(&good.frames[..half].concat())
        .await
        .unwrap();

    // A length prefix of 2^63: never allocated, that connection is closed.
    let mut huge = connect_agent(&sock).await;
    huge.write_all(&(1u64 << 63).to_be_bytes()).await.unwrap();
    // The forwarder may have closed it already: that is the point.
    let _ = huge.write_all(b"and then some").await;

    // Garbage in well-formed frames, invalid UTF-8, a frame cut short.
    let real_json = scenario(&ScenarioOptions::default()).frames.remove(0);
    let mut invalid_utf8 = real_json.clone();
    let at = invalid_utf8.len() / 2;
    invalid_utf8[at] = 0xff;
    let mut garbage = connect_agent(&sock).await;
    garbage
        .write_all(&frame(b"not a span at all"))
        .await
        .unwrap();
    garbage.write_all(&frame(&[0u8; 4096])).await.unwrap();
    garbage.write_all(&invalid_utf8).await.unwrap();
    garbage
        .write_all(&frame(b"{\"span_context\": 5}"))
        .await
        .unwrap();
    garbage.write_all(&frame(&[])).await.unwrap();
    garbage
        .write_all(&real_json[..real_json.len() - 10])
        .await
        .unwrap();
    drop(garbage);

    // A byte-by-byte slow drip of a valid frame on its own connection.
    let drip_frames = scenario(&ScenarioOptions {
        seq: 7,
        ..Default::default()
    });
    let drip_bytes = drip_frames.frames[0].clone();
    // Connected before the churn below, which may fill the connection cap.
    let mut s = connect_agent(&sock).await;
    let drip = tokio::spawn(async move {
        for b in drip_bytes {
            s.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        s
    });

    // 10,000 connections opened and closed, some after a partial header.
    let churn_sock = sock.clone();
    let churn = tokio::spawn(async move {
        for i in 0..10_000u32 {
            // A full accept backlog answers EAGAIN: wait and try again, as
            // a VMM would.
            let mut s = loop {
                match tokio::net::UnixStream::connect(&churn_sock).await {
                    Ok(s) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(e) => panic!("connect: {e}"),
                }
            };
            if i % 3 == 0 {
                let _ = s.write_all(&[0, 0, 0]).await;
            }
        }
    });

    churn.await.unwrap();
    let dripped = drip.await.unwrap();
    // ...and the rest after it.
    good_agent
        .write_all(&good.frames[half..].concat())
        .await
        .unwrap();

    let expected = good.expected.len() + 1;
    let got = rx.store.wait_for(expected, Duration::from_secs(30)).await;
    for want in &good.expected {
        let (resource, span) = find(&got, want.span_id);
        assert_span_eq(want, resource, span, "kata-agent");
    }
    find(&got, drip_frames.expected[0].span_id);

    let peak_kib = status_field(fwd.pid(), "VmHWM:");
    let threads = status_field(fwd.pid(), "Threads:");
    eprintln!("forwarder peak RSS under attack: {peak_kib} KiB, threads: {threads}");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    drop(dripped);
    drop(huge);

    let status = fwd.terminate().await;
    assert!(status.success(), "{}", fwd.stderr());
    let log = fwd.stderr();
    let counters = common::exit_summary(&log);
    assert_eq!(counters["frames_oversized"], 1, "{counters}");
    assert!(
        counters["decode_errors"].as_u64().unwrap() >= 5,
        "{counters}"
    );
    assert!(
        // the cut frame, plus every third churn connection (3 header bytes)
        counters["frames_truncated"].as_u64().unwrap() >= 3335,
        "{counters}"
    );
    assert!(
        counters["connections_accepted"].as_u64().unwrap() >= 10_004,
        "{counters}"
    );
    assert_eq!(counters["spans_dropped_export"], 0, "{counters}");
}
