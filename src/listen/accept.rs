//! Accepting: one task per listener, one task per connection.
//!
//! An accept loop checks each connection against the caps (its sandbox's
//! and the forwarder's; beyond one it is accepted, logged and closed),
//! finds its sandbox and spawns [`super::connection::serve`] with a
//! lifeline of its own. Between two accepts it pauses for a hand-over and
//! reports its socket.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::connection::{self, ConnShared};
use super::sandbox::{self, CidResolver};
use super::{Adopted, Listener, Listeners, Stream};
use crate::addr::Peer;
use crate::events::{emit, ConnectionAccepted, ConnectionRejected, Refusal};
use crate::handover::fdstore::Stored;
use crate::handover::Resume;
use crate::lifeline::{After, Lifeline};
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::tenant::{Tenant, TenantConn, TenantKey};

/// Serves every listener and sandbox manager until `shutdown` begins;
/// then waits for the connections to drain, until the shutdown deadline
/// at the latest.
pub(crate) async fn serve(
    listeners: Listeners,
    shared: Arc<ConnShared>,
    origin: Arc<Origin>,
    shutdown: Shutdown,
) {
    let tracker = TaskTracker::new();
    let root = Lifeline::root(shutdown.clone(), listeners.hub.clone());
    let adopted = super::by_listener(listeners.listeners.len(), listeners.adopted);
    let serving = Serving {
        shared,
        origin,
        permits: Arc::new(Semaphore::new(listeners.max_connections)),
        max_connections: listeners.max_connections,
        tracker: tracker.clone(),
    };
    // Lifelines are taken before the tasks run, so that a pause asked
    // from now on waits for them.
    let managing = listeners
        .managers
        .into_iter()
        .map(|m| m.serve(serving.clone(), root.spawn()));
    let accepting = listeners
        .listeners
        .into_iter()
        .zip(adopted)
        .map(|(l, adopted)| serving.serve(l, root.spawn(), adopted));
    tokio::join!(join_all(managing), join_all(accepting));
    tracker.close();
    match shutdown.deadline() {
        Some(d) if tokio::time::timeout_at(d, tracker.wait()).await.is_err() => {
            tracing::warn!("connections still open at the shutdown deadline");
        }
        Some(_) => {}
        None => tracker.wait().await,
    }
}

/// What serving any listener (or a template's sandbox) needs. Cheap to
/// clone.
#[derive(Clone)]
pub(crate) struct Serving {
    pub shared: Arc<ConnShared>,
    /// The resource attributes every connection's spans get.
    pub origin: Arc<Origin>,
    /// The cap on connections served at once, across every listener.
    permits: Arc<Semaphore>,
    max_connections: usize,
    tracker: TaskTracker,
}

impl Serving {
    /// Accepting on one listener: `origin` is its connections' resource;
    /// `resolver` finds a VSOCK guest's sandbox; `tenant` is the listener's
    /// sandbox (hybrid, template; on VSOCK each guest CID is one),
    /// `sandbox` its id in template mode and `--kata-host` (handed over as
    /// such, for the successor's watcher).
    pub(crate) fn accept<'a>(
        &'a self,
        origin: &'a Arc<Origin>,
        resolver: Option<Arc<CidResolver>>,
        tenant: Option<Arc<Tenant>>,
        sandbox: Option<&'a str>,
    ) -> Accept<'a> {
        Accept {
            serving: self,
            origin,
            resolver,
            tenant,
            sandbox,
        }
    }

    /// Serves `listener` (VSOCK, or one hybrid socket): first the
    /// connections a predecessor left, then what it accepts. Handed over,
    /// or left in systemd's store, its socket stays; stopped, it goes.
    pub(crate) async fn serve(
        &self,
        listener: Listener,
        mut life: Lifeline,
        adopted: Vec<Adopted>,
    ) {
        let (origin, tenant, resolver) = match &listener {
            // Hybrid: the socket is one sandbox's, named by Kata's path.
            Listener::Hybrid(l) => {
                let id = sandbox::hybrid_sandbox_id(&l.path);
                let origin = match &id {
                    Some(id) => Arc::new(sandbox::sandbox_origin(&self.origin, id)),
                    None => Arc::clone(&self.origin),
                };
                let key = id.map_or_else(|| TenantKey::Socket(l.path.clone()), TenantKey::Sandbox);
                (origin, Some(self.shared.tenant(key)), None)
            }
            // QEMU: a guest's CID says which sandbox it is, through /proc.
            Listener::Vsock(_) => {
                let resolver = Arc::new(CidResolver::new(sandbox::PROC_ROOT));
                (Arc::clone(&self.origin), None, Some(resolver))
            }
        };
        let accept = self.accept(&origin, resolver, tenant, None);
        for a in adopted {
            accept.adopt(a, &life);
        }
        match accept.run(&listener, &mut life).await {
            Ended::HandedOver => {
                tracing::info!(listener = %listener.describe(), "handed over");
                listener.release();
            }
            Ended::Stopped => {
                tracing::info!(listener = %listener.describe(), "stopped accepting connections")
            }
        }
    }
}

/// What accepting on one listener needs; see [`Serving::accept`].
pub(crate) struct Accept<'a> {
    serving: &'a Serving,
    origin: &'a Arc<Origin>,
    resolver: Option<Arc<CidResolver>>,
    tenant: Option<Arc<Tenant>>,
    sandbox: Option<&'a str>,
}

pub(crate) enum Ended {
    /// Shutdown: the listener goes, and its socket with it.
    Stopped,
    /// A successor serves the listener now, or systemd keeps it for the
    /// next process: its socket stays.
    HandedOver,
}

impl Accept<'_> {
    /// Accepts connections on `listener` until stopping begins, then takes
    /// those already queued (a backlog's worth, not a flood), so that what
    /// their agents wrote is drained rather than lost with the socket.
    pub(crate) async fn run(&self, listener: &Listener, life: &mut Lifeline) -> Ended {
        let max_connections = self.serving.max_connections;
        let stats = &self.serving.shared.stats;
        let mut late = 0usize;
        let stored = listener.store();
        let keep = |stored: Vec<Stored>| stored.into_iter().for_each(Stored::keep);
        loop {
            if life.pause_due() {
                life.report(listener.hand_over(self.sandbox));
            }
            match life.settled().await {
                Some(After::Leave) => {
                    keep(stored);
                    return Ended::HandedOver;
                }
                Some(After::Drain) => break,
                Some(After::Resume) | None => {}
            }
            let accepted = if life.is_stopping() {
                late += 1;
                match accept(listener).now_or_never() {
                    Some(a) if late <= max_connections => a,
                    _ => break,
                }
            } else {
                tokio::select! {
                    biased;
                    // Stopping or a pause: seen at the top of the loop.
                    _ = life.next() => continue,
                    a = accept(listener) => a,
                }
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(_) if life.is_stopping() => break,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of
                    // spinning; open connections keep being served.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            emit!(stats, ConnectionAccepted);
            let tenants = &*self.serving.shared.tenants;
            let refuse = |tenant: Option<&Tenant>, refusal| {
                emit!(
                    stats,
                    ConnectionRejected {
                        peer,
                        tenant,
                        tenants,
                        refusal,
                    }
                )
            };
            let Some(tenant) = self.tenant(peer) else {
                let max_sandboxes = tenants.limits().max_sandboxes;
                refuse(None, Refusal::Sandboxes { max_sandboxes });
                continue;
            };
            let Some(slot) = tenant.try_connect() else {
                let max_connections = tenant.max_connections();
                refuse(Some(&tenant), Refusal::Sandbox { max_connections });
                continue;
            };
            let Ok(permit) = Arc::clone(&self.serving.permits).try_acquire_owned() else {
                refuse(Some(&tenant), Refusal::Global { max_connections });
                continue;
            };
            self.spawn(stream, peer, slot, permit, life, None);
        }
        // With systemd's store, a stop leaves the listener to the next
        // process; a sandbox that went alone takes it along.
        if life.leaves() {
            keep(stored);
            return Ended::HandedOver;
        }
        drop(stored);
        Ended::Stopped
    }

    /// The sandbox a connection from `peer` belongs to: the listener's, or
    /// its guest CID's on VSOCK (none when `--max-sandboxes` are tracked).
    fn tenant(&self, peer: Peer) -> Option<Arc<Tenant>> {
        match (&self.tenant, peer) {
            (Some(t), _) => Some(Arc::clone(t)),
            (None, Peer::Vsock { cid }) => self.serving.shared.tenants.get(TenantKey::Cid(cid)),
            (None, Peer::Unix) => None,
        }
    }

    /// Serves a connection a previous forwarder handed over, from where it
    /// left it. Past a cap (one lowered since), it is closed and logged.
    pub(super) fn adopt(&self, a: Adopted, life: &Lifeline) {
        let slot = self.tenant(a.peer).and_then(|t| t.try_connect());
        let permit = Arc::clone(&self.serving.permits).try_acquire_owned().ok();
        let (Some(slot), Some(permit)) = (slot, permit) else {
            tracing::warn!(peer = %a.peer, "a handed-over connection is over a connection cap; closed");
            return;
        };
        self.spawn(a.stream, a.peer, slot, permit, life, Some(a.resume));
    }

    fn spawn(
        &self,
        stream: Stream,
        peer: Peer,
        slot: TenantConn,
        permit: OwnedSemaphorePermit,
        accepting: &Lifeline,
        resume: Option<Resume>,
    ) {
        let shared = Arc::clone(&self.serving.shared);
        // Taken here, before the task runs, so that a pause asked from now
        // on waits for it.
        let life = accepting.spawn();
        let start = connection::Start {
            listener: accepting.id(),
            resume,
        };
        let origin = Arc::clone(self.origin);
        let resolver = self.resolver.clone();
        let conn = async move {
            let origin = match peer {
                Peer::Vsock { cid } => Arc::new(
                    sandbox::vsock_origin(&origin, cid, resolver.as_ref(), slot.tenant()).await,
                ),
                Peer::Unix => origin,
            };
            match stream {
                Stream::Unix(s) => {
                    connection::serve(s, peer, &shared, origin, slot, life, start).await
                }
                Stream::Vsock(s) => {
                    connection::serve(s, peer, &shared, origin, slot, life, start).await
                }
            }
            drop(permit);
        };
        // In the listener's span (a template's sandbox), for the logs.
        self.serving
            .tracker
            .spawn(tracing::Instrument::in_current_span(conn));
    }
}

async fn accept(listener: &Listener) -> io::Result<(Stream, Peer)> {
    match listener {
        Listener::Hybrid(l) => {
            let (s, _) = l.listener.accept().await?;
            Ok((Stream::Unix(s), Peer::Unix))
        }
        Listener::Vsock(l) => {
            let (s, addr) = l.listener.accept().await?;
            Ok((Stream::Vsock(s), Peer::Vsock { cid: addr.cid() }))
        }
    }
}
