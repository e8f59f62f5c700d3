//! A frame the forwarder itself leaves unfinished when it stops: an agent
//! that wrote half a frame and went quiet (a guest paused, or an agent
//! killed whose end has not crossed the VSOCK transport yet) when SIGTERM
//! came. The drain reads it until it has been quiet for a moment, then
//! closes it; the half frame is lost there, and must be counted as a cut
//! frame (`frames_truncated`) like one whose stream ended, not dropped
//! silently.

mod common;

use std::time::Duration;

use common::{connect_agent, exit_summary, free_port, wait_metric, Forwarder, Receiver};
use kata_agent_emitter::WireFormat;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_frame_in_hand_when_the_drain_ends_is_counted_as_cut() {
    let rx = Receiver::start().await;
    let port = free_port();
    let mut args = rx.args("grpc");
    args.extend(["--metrics-address".to_string(), format!("127.0.0.1:{port}")]);
    let mut fwd = Forwarder::hybrid(&args).await;
    let frames = kata_agent_emitter::bulk_frames(WireFormat::Json, 2, 400, 1);
    let half = frames[1].len() / 2;
    let mut agent = connect_agent(&fwd.agent_socket).await;
    agent.write_all(&frames[0]).await.unwrap();
    agent.write_all(&frames[1][..half]).await.unwrap();
    // The whole frame decoded; the half one, written with it, read too
    // (a connection reads what arrives at once).
    wait_metric(port, "kata_trace_forwarder_frames_received_total", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The agent stays connected and quiet through the drain.
    let status = fwd.terminate().await;
    assert!(status.success(), "{}", fwd.stderr());
    let counters = exit_summary(&fwd.stderr());
    assert_eq!(counters["frames_received"], 1, "{counters}");
    assert_eq!(
        counters["frames_truncated"], 1,
        "the half frame the drain left: {counters}"
    );
    assert!(
        fwd.stderr().contains("closing agent connection"),
        "and said: {}",
        fwd.stderr()
    );
    drop(agent);
}
