//! Listening: accepting agent connections and reading their frames.
//!
//! There are two ways a guest reaches the host. QEMU uses the host kernel's
//! AF_VSOCK ([`vsock`]); Cloud Hypervisor and Firecracker use "hybrid
//! VSOCK", where the VMM turns each guest-initiated connection to port P
//! into a Unix-socket connection to `<socket-path>_P` ([`hybrid`]). Only
//! `bind` and `accept` differ: after `accept`, every stream goes through the
//! same [`connection`] code, so what is tested over Unix sockets here is
//! what runs for VSOCK.
//!
//! Each connection is its own task, so an idle or slow agent never delays
//! another, and an error ends only its own connection. The number of open
//! connections is capped; beyond the cap a connection is accepted, logged
//! and closed, so a flood of connections costs a file descriptor for a
//! moment and nothing more.

pub mod connection;
pub mod hybrid;
pub mod privileges;
pub mod vsock;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::stats::Stats;
use connection::{ConnShared, Peer};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("directory {dir} does not exist: create the sandbox directory first (e.g. `sudo mkdir -p {dir}`)")]
    MissingDirectory { dir: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path} is in use by another live listener")]
    InUse { path: PathBuf },
    #[error("inspecting {path}: {source}")]
    InspectPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding Unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding VSOCK cid {cid} port {port}: {source}")]
    BindVsock {
        cid: String,
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("dropping privileges to user '{user}': {reason}")]
    DropPrivileges { user: String, reason: String },
}

/// A bound listener of either kind.
pub enum Listener {
    Hybrid(hybrid::HybridListener),
    Vsock(vsock::VsockListener),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Hybrid(l) => format!("hybrid vsock unix:{}", l.path().display()),
            Listener::Vsock(l) => l.describe(),
        }
    }
}

/// Accepts connections until `stop` turns true, spawning one task per
/// connection on `tracker`. Dropping the listener on return removes a
/// hybrid socket.
pub async fn accept_loop(
    listener: Listener,
    shared: Arc<ConnShared>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let stats = Arc::clone(&shared.stats);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning;
                // the connections already open keep being served.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        Stats::inc(&stats.connections_total);
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            Stats::inc(&stats.connections_rejected);
            tracing::warn!(%peer, max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tracker.spawn(async move {
            match stream {
                Stream::Unix(s) => connection::serve(s, peer, &shared, stop).await,
                Stream::Vsock(s) => connection::serve(s, peer, &shared, stop).await,
            }
            drop(permit);
        });
    }
    tracing::info!(listener = %listener.describe(), "stopped accepting connections");
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, Peer)> {
    match listener {
        Listener::Hybrid(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), Peer::Unix))
        }
        Listener::Vsock(l) => {
            let (s, cid) = l.accept().await?;
            Ok((Stream::Vsock(s), Peer::Vsock { cid }))
        }
    }
}
