//! Accepting: one task per listener, one per connection. Connections are
//! capped per sandbox and in all; beyond a cap one is accepted, logged
//! (through its sandbox's log gate) and closed, so a flood costs an fd for
//! a moment and never uses up another sandbox's room.

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
use crate::events::Refusal;
use crate::handover::fdstore::Stored;
use crate::handover::wire::ConnState;
use crate::lifeline::{After, Lifeline};
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::tenant::{Tenant, TenantConn, TenantKey};

/// Serves all until `shutdown`, then lets connections drain (to the deadline).
pub(crate) async fn serve(
    listeners: Listeners,
    shared: Arc<ConnShared>,
    origin: Arc<Origin>,
    shutdown: Shutdown,
) {
    let tracker = TaskTracker::new();
    let root = Lifeline::root(shutdown.clone(), listeners.hub.clone());
    let serving = Serving {
        shared,
        origin,
        permits: Arc::new(Semaphore::new(listeners.max_connections)),
        max_connections: listeners.max_connections,
        tracker: tracker.clone(),
    };
    // Lifelines taken before the tasks run: a pause from now waits for them.
    let served = listeners.served.into_iter();
    join_all(served.map(|s| s.serve(serving.clone(), root.spawn()))).await;
    tracker.close();
    match shutdown.deadline() {
        Some(d) if tokio::time::timeout_at(d, tracker.wait()).await.is_err() => {
            tracing::warn!("connections still open at the shutdown deadline");
        }
        Some(_) => {}
        None => tracker.wait().await,
    }
}

/// What serving any listener (or a template's sandbox) needs.
#[derive(Clone)]
pub(crate) struct Serving {
    pub shared: Arc<ConnShared>,
    /// The resource attributes every connection's spans get.
    pub origin: Arc<Origin>,
    /// The cap on connections across every listener.
    permits: Arc<Semaphore>,
    max_connections: usize,
    tracker: TaskTracker,
}

impl Serving {
    pub(crate) async fn serve(self, listener: Listener, mut life: Lifeline, adopted: Vec<Adopted>) {
        match self.accept(&listener, &mut life, adopted, None).await {
            Ended::HandedOver => {
                tracing::info!(listener = %listener.describe(), "handed over");
                if let Listener::Hybrid(l) = listener {
                    l.release();
                }
            }
            Ended::Stopped => {
                tracing::info!(listener = %listener.describe(), "stopped accepting connections")
            }
        }
    }

    /// Accepts on `listener` (`sandbox`'s, under a template).
    pub(crate) async fn accept(
        &self,
        listener: &Listener,
        life: &mut Lifeline,
        adopted: Vec<Adopted>,
        sandbox: Option<&str>,
    ) -> Ended {
        let (origin, tenant, resolver) = match listener {
            // One sandbox's socket, named by its template or Kata's path.
            Listener::Hybrid(l) => {
                let id = sandbox.map(str::to_owned);
                let id = id.or_else(|| sandbox::hybrid_sandbox_id(&l.path));
                let origin = match &id {
                    Some(id) => Arc::new(sandbox::sandbox_origin(&self.origin, id)),
                    None => Arc::clone(&self.origin),
                };
                let key = id.map_or_else(|| TenantKey::Socket(l.path.clone()), TenantKey::Sandbox);
                // Past `--max-sandboxes`, one outside the registry: limits, no series.
                let tenants = &self.shared.tenants;
                let tenant = tenants.get(key.clone());
                let tenant = tenant.unwrap_or_else(|| Tenant::standalone(key, &tenants.limits));
                (origin, Some(tenant), None)
            }
            // QEMU: a guest's CID says which sandbox it is, through /proc.
            Listener::Vsock(_) => {
                let resolver = Arc::new(CidResolver::new(sandbox::PROC_ROOT));
                (Arc::clone(&self.origin), None, Some(resolver))
            }
        };
        let accept = Accept {
            serving: self,
            origin: &origin,
            resolver,
            tenant,
            sandbox,
        };
        accept.run(listener, life, adopted).await
    }
}

struct Accept<'a> {
    serving: &'a Serving,
    origin: &'a Arc<Origin>,
    resolver: Option<Arc<CidResolver>>,
    /// The listener's sandbox (none on VSOCK: each guest CID is one).
    tenant: Option<Arc<Tenant>>,
    /// Its id under a template, for the successor's watcher.
    sandbox: Option<&'a str>,
}

pub(crate) enum Ended {
    /// Shutdown: the socket goes.
    Stopped,
    /// A successor, or systemd's store, has it: its socket stays.
    HandedOver,
}

impl Accept<'_> {
    /// Serves on `adopted`, accepts until stopping begins, then the already
    /// queued (a backlog's worth), so that what they wrote drains.
    async fn run(&self, listener: &Listener, life: &mut Lifeline, adopted: Vec<Adopted>) -> Ended {
        for a in adopted {
            self.adopt(a, life);
        }
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
            let accepted = if life.shutdown.is_stopping() {
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
                Err(_) if life.shutdown.is_stopping() => break,
                Err(e) => {
                    // Out of descriptors or memory: back off, not spin.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            stats.connections_accepted.inc();
            let tenants = &*self.serving.shared.tenants;
            let refuse = |tenant: Option<&Tenant>, refusal| {
                stats.connection_rejected(peer, tenant, tenants, refusal)
            };
            let Some(tenant) = self.tenant(peer) else {
                let max_sandboxes = tenants.limits.max_sandboxes;
                refuse(None, Refusal::Sandboxes { max_sandboxes });
                continue;
            };
            let Some(slot) = tenant.try_connect() else {
                let max_connections = tenant.max_connections;
                refuse(Some(&tenant), Refusal::Sandbox { max_connections });
                continue;
            };
            let Ok(permit) = Arc::clone(&self.serving.permits).try_acquire_owned() else {
                refuse(Some(&tenant), Refusal::Global { max_connections });
                continue;
            };
            self.spawn(stream, peer, slot, permit, life, None);
        }
        // Into systemd's store (not for a sandbox that went alone).
        if life.leaves() {
            keep(stored);
            return Ended::HandedOver;
        }
        drop(stored);
        Ended::Stopped
    }

    /// The listener's sandbox, or `peer`'s CID's (none past the cap).
    fn tenant(&self, peer: Peer) -> Option<Arc<Tenant>> {
        match (&self.tenant, peer) {
            (Some(t), _) => Some(Arc::clone(t)),
            (None, Peer::Vsock { cid }) => self.serving.shared.tenants.get(TenantKey::Cid(cid)),
            (None, Peer::Unix) => None,
        }
    }

    /// Serves a handed-over connection; past a cap (lowered since), closes it.
    fn adopt(&self, a: Adopted, life: &Lifeline) {
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
        resume: Option<ConnState>,
    ) {
        let shared = Arc::clone(&self.serving.shared);
        // Taken before the task runs: a pause from now on waits for it.
        let life = accepting.spawn();
        let start = connection::Start {
            listener: accepting.id(),
            resume,
        };
        let origin = Arc::clone(self.origin);
        let resolver = self.resolver.clone();
        let conn = async move {
            let origin = match peer {
                Peer::Vsock { cid } => {
                    Arc::new(sandbox::vsock_origin(&origin, cid, resolver.as_ref(), &slot.0).await)
                }
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
