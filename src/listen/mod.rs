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
//! One forwarder can also serve every hybrid-VSOCK sandbox on a host: in
//! template mode ([`template`]) a watcher binds a listener in each sandbox
//! directory as it appears and closes it as the directory goes. Whatever
//! is known of a connection's sandbox (its id, its guest's CID, resolved by
//! [`sandbox`] for QEMU) goes onto its spans' resource.
//!
//! Each connection is its own task, so an idle or slow agent never delays
//! another, and an error ends only its own connection. The number of open
//! connections is capped; beyond the cap a connection is accepted, logged
//! and closed, so a flood of connections costs a file descriptor for a
//! moment and nothing more.

pub mod connection;
pub mod hybrid;
pub mod privileges;
pub mod sandbox;
pub mod template;
pub mod vsock;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::otlp::Origin;
use crate::stats::Stats;
use connection::{ConnShared, Peer};
use sandbox::CidResolver;

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
    #[error("watching {dir} for sandboxes: {source}")]
    WatchSandboxes {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the sandbox watcher: {0}")]
    StartWatcher(String),
}

/// A bound listener of any kind.
pub enum Listener {
    Hybrid(hybrid::HybridListener),
    Vsock(vsock::VsockListener),
    /// One hybrid listener per sandbox, as their directories come and go.
    Template(template::TemplateListener),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Hybrid(l) => format!("hybrid vsock unix:{}", l.path().display()),
            Listener::Vsock(l) => l.describe(),
            Listener::Template(l) => l.describe(),
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
    stop: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    if let Listener::Template(t) = listener {
        return t.serve(shared, max_connections, stop, tracker).await;
    }
    let limit = ConnLimit::new(max_connections);
    let origin = Arc::new(shared.origin.clone());
    // QEMU: a guest's CID says which sandbox it is, through /proc.
    let resolver = matches!(listener, Listener::Vsock(_))
        .then(|| Arc::new(CidResolver::new(sandbox::PROC_ROOT)));
    accept_connections(
        &listener, &shared, &limit, &origin, resolver, stop, &tracker,
    )
    .await;
    tracing::info!(listener = %listener.describe(), "stopped accepting connections");
}

/// The cap on connections served at once, shared by all the listeners of
/// a template.
pub(crate) struct ConnLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnLimit {
    pub(crate) fn new(max: usize) -> ConnLimit {
        ConnLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

/// Accepts connections on one listener until `stop` turns true. Each takes
/// a permit from `limit` and gets the resource attributes of `origin`,
/// plus, on VSOCK, its CID and the sandbox that `resolver` finds for it.
pub(crate) async fn accept_connections(
    listener: &Listener,
    shared: &Arc<ConnShared>,
    limit: &ConnLimit,
    origin: &Arc<Origin>,
    resolver: Option<Arc<CidResolver>>,
    mut stop: watch::Receiver<bool>,
    tracker: &TaskTracker,
) {
    let max_connections = limit.max;
    let stats = Arc::clone(&shared.stats);
    let mut stopping = false;
    let mut late = 0usize;
    loop {
        let accepted = if stopping {
            // Still take the connections already queued (a backlog's worth,
            // not a flood), so that what their agents wrote is drained
            // rather than lost with the socket.
            late += 1;
            match accept(listener).now_or_never() {
                Some(a) if late <= max_connections => a,
                _ => break,
            }
        } else {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    stopping = true;
                    continue;
                }
                a = accept(listener) => a,
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(_) if stopping => break,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning;
                // the connections already open keep being served.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        Stats::inc(&stats.connections_total);
        let Ok(permit) = Arc::clone(&limit.permits).try_acquire_owned() else {
            Stats::inc(&stats.connections_rejected);
            tracing::warn!(%peer, max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let shared = Arc::clone(shared);
        let stop = stop.clone();
        let mut origin = Arc::clone(origin);
        let resolver = resolver.clone();
        let conn = async move {
            if let Peer::Vsock { cid } = peer {
                origin = Arc::new(sandbox::vsock_origin(&origin, cid, resolver.as_ref()).await);
            }
            match stream {
                Stream::Unix(s) => connection::serve(s, peer, &shared, &origin, stop).await,
                Stream::Vsock(s) => connection::serve(s, peer, &shared, &origin, stop).await,
            }
            drop(permit);
        };
        // In the listener's span (a template's sandbox), for the logs.
        tracker.spawn(tracing::Instrument::in_current_span(conn));
    }
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
        // Served by its own per-sandbox hybrid listeners, never accepted on.
        Listener::Template(_) => std::future::pending().await,
    }
}
