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
//! another, and an error ends only its own connection. Every connection
//! belongs to a sandbox ([`crate::tenant`]): the listener's in hybrid and
//! template modes, its guest CID's on VSOCK. The number of open connections
//! is capped per sandbox and in all; beyond a cap a connection is accepted,
//! logged (through the sandbox's log gate) and closed, so a flood of
//! connections costs a file descriptor for a moment and nothing more, and
//! one sandbox's flood never uses up another's room.

pub(crate) mod connection;
pub mod hybrid;
pub(crate) mod inherited;
pub(crate) mod kata_host;
pub(crate) mod pacing;
pub mod privileges;
pub(crate) mod sandbox;
pub mod template;
pub mod vsock;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::addr::{hybrid_socket, Peer};
use crate::config::{ListenConfig, ListenMode};
use crate::events::{emit, ConnectionAccepted, ConnectionRejected, Refusal};
use crate::handover::fdstore::Stored;
use crate::handover::hub::{Hub, Member, Outcome, Piece, PieceKind};
use crate::handover::wire::ListenerKind;
use crate::handover::{ConnLink, Resume, TakenConn};
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::tenant::{Tenant, TenantKey};
use connection::ConnShared;
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
    #[error("locking {dir} to bind a socket in it: {source}")]
    LockDirectory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
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
    #[error("{0} (fix or remove it; --kata-host --print shows the plan)")]
    ReadKataConfig(String),
    #[error("watching the Kata configurations in {dir}: {source}")]
    WatchKataConfigs {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serving a handed-over socket: {0}")]
    AdoptSocket(String),
}

/// A bound listener of any kind.
pub enum Listener {
    Hybrid(hybrid::HybridListener),
    Vsock(vsock::VsockListener),
    /// One hybrid listener per sandbox, as their directories come and go.
    Template(template::TemplateListener),
    /// What the host's Kata configurations ask for, as they change (boxed:
    /// it holds its plan; there is one per forwarder).
    KataHost(Box<kata_host::KataHostListener>),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Hybrid(l) => format!("hybrid vsock unix:{}", l.path().display()),
            Listener::Vsock(l) => l.describe(),
            Listener::Template(l) => l.describe(),
            Listener::KataHost(l) => l.describe(),
        }
    }
}

impl Listener {
    /// This listener's part of a hand-over, as its accept loop reports it:
    /// what a successor needs to serve it (for a hybrid socket its path and
    /// identity), a duplicate of its socket and of its janitor's pipe.
    fn hand_over(&self) -> Option<Piece> {
        let handed = match self {
            Listener::Hybrid(l) => {
                let kind = ListenerKind::Hybrid {
                    path: l.path().to_owned(),
                    identity: l.identity(),
                };
                let janitor = l.janitor_pipe().map(|p| p.try_clone_to_owned());
                (kind, l.fd(), janitor.transpose())
            }
            Listener::Vsock(l) => {
                let (cid, port) = l.address();
                let cid = match cid {
                    crate::addr::VsockCid::Any => None,
                    crate::addr::VsockCid::Cid(c) => Some(c),
                };
                (ListenerKind::Vsock { cid, port }, l.fd(), Ok(None))
            }
            Listener::Template(_) | Listener::KataHost(_) => return None,
        };
        let (kind, fd, janitor) = handed;
        match janitor.and_then(|janitor| Ok((fd.try_clone_to_owned()?, janitor))) {
            Ok((fd, janitor)) => Some(Piece {
                what: PieceKind::Listener { kind, janitor },
                fd,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "hand-over: duplicating a listener's socket");
                None
            }
        }
    }

    /// Puts this listener in systemd's store, when it keeps one: its socket,
    /// and its janitor's pipe (so that the janitor does not remove the
    /// socket when this process goes, only when systemd lets go of it).
    fn store(&self) -> Vec<Stored> {
        match self {
            Listener::Hybrid(l) => {
                let mut stored = vec![Stored::listener(l.fd(), Some(l.identity()))];
                stored.extend(l.janitor_pipe().map(|p| Stored::janitor(l.fd(), p)));
                stored
            }
            Listener::Vsock(l) => vec![Stored::listener(l.fd(), None)],
            Listener::Template(_) | Listener::KataHost(_) => Vec::new(),
        }
    }

    /// Stops serving after a hand-over, leaving the socket to the successor.
    fn release(self) {
        if let Listener::Hybrid(l) = self {
            l.release();
        }
    }
}

/// A connection a previous forwarder served, to be served on.
pub(crate) struct Adopted {
    /// Index of its listener among those handed over.
    listener: usize,
    stream: Stream,
    peer: Peer,
    resume: Resume,
}

impl Adopted {
    /// Not served here: out of systemd's store too, if it kept it.
    fn forget(&self) {
        let fd = match &self.stream {
            Stream::Unix(s) => std::os::fd::AsFd::as_fd(s),
            Stream::Vsock(s) => std::os::fd::AsFd::as_fd(s),
        };
        crate::handover::fdstore::forget(crate::handover::fdstore::connection_name(fd));
    }

    /// Registers a handed-over connection with the current runtime.
    fn from_taken(c: TakenConn) -> Result<Adopted, ListenError> {
        let adopt = |e: io::Error| ListenError::AdoptSocket(e.to_string());
        let (stream, peer) = match c.cid {
            Some(cid) => (
                Stream::Vsock(tokio_vsock::VsockStream::from(c.fd)),
                Peer::Vsock { cid },
            ),
            None => {
                let std = std::os::unix::net::UnixStream::from(c.fd);
                std.set_nonblocking(true).map_err(adopt)?;
                let s = tokio::net::UnixStream::from_std(std).map_err(adopt)?;
                (Stream::Unix(s), Peer::Unix)
            }
        };
        Ok(Adopted {
            listener: c.listener,
            stream,
            peer,
            resume: c.resume,
        })
    }
}

/// The listeners one forwarder serves, bound and ready.
pub struct Listeners {
    listeners: Vec<Listener>,
    max_connections: usize,
    /// Connections handed over with the listeners.
    adopted: Vec<Adopted>,
    /// Where accept loops and connections pause for the next hand-over.
    hub: Option<Arc<Hub>>,
}

impl Listeners {
    /// Listeners bound elsewhere (tests, embedders), served with at most
    /// `max_connections` connections at once across all of them.
    pub fn new(listeners: Vec<Listener>, max_connections: usize) -> Listeners {
        Listeners {
            listeners,
            max_connections,
            adopted: Vec::new(),
            hub: None,
        }
    }

    /// Takes part in hand-overs through `hub`: every accept loop and
    /// connection, and the watchers that make listeners as they go.
    pub(crate) fn set_hub(&mut self, hub: Arc<Hub>) {
        self.hub = Some(hub);
    }

    /// Where a hand-over starts the upgraded binary and becomes it.
    pub(crate) fn launcher(&self) -> Arc<dyn crate::handover::server::Launcher> {
        Arc::new(template::Launch(self.sandbox_thread()))
    }

    /// The thread that watches sandbox directories, when one does.
    fn sandbox_thread(&self) -> Option<template::SandboxThread> {
        self.listeners.iter().find_map(|l| match l {
            Listener::Template(t) => Some(t.thread().clone()),
            Listener::KataHost(k) => Some(k.thread().clone()),
            Listener::Hybrid(_) | Listener::Vsock(_) => None,
        })
    }

    pub fn describe(&self) -> String {
        self.each().join(", ")
    }

    /// Each listener, described.
    pub(crate) fn each(&self) -> Vec<String> {
        self.listeners.iter().map(Listener::describe).collect()
    }
}

/// Binds what `cfg` says, then, when started as root, drops to
/// `cfg.user`, handing `writable` (the spool) to that user first so that
/// it stays writable. Binding needs root for the hybrid modes' sandbox
/// directories; nothing after it does. Template mode starts its sandbox
/// watcher under `shutdown`, which stops the sandboxes it serves.
pub async fn bind(
    cfg: &ListenConfig,
    writable: Option<&Path>,
    shutdown: &Shutdown,
) -> Result<Listeners, ListenError> {
    bind_inheriting(cfg, writable, shutdown, None).await
}

/// [`bind`], for a successor in template mode or `--kata-host`: what the
/// predecessor handed over is served on where it is still asked for (see
/// [`inherited`]), the rest is bound as at any start.
pub(crate) async fn bind_inheriting(
    cfg: &ListenConfig,
    writable: Option<&Path>,
    shutdown: &Shutdown,
    inherited: Option<Arc<inherited::Inherited>>,
) -> Result<Listeners, ListenError> {
    let bound = bind_mode(cfg, writable, shutdown, inherited.as_ref()).await;
    if let Some(i) = &inherited {
        i.close_unclaimed();
    }
    bound
}

async fn bind_mode(
    cfg: &ListenConfig,
    writable: Option<&Path>,
    shutdown: &Shutdown,
    inherited: Option<&Arc<inherited::Inherited>>,
) -> Result<Listeners, ListenError> {
    let root = privileges::is_root();
    // Connections of the one listener, left by a previous process.
    let mut adopted = Vec::new();
    let listener = match &cfg.mode {
        ListenMode::Hybrid { socket_path, port } => {
            let path = hybrid_socket(socket_path, *port);
            let (l, conns) = inherited
                .and_then(|i| i.take_unix(&path))
                .unwrap_or_default();
            adopted = conns;
            let mut l = match l {
                Some(l) => l,
                None => hybrid::HybridListener::bind(&path)?,
            };
            if root && !l.has_janitor() {
                l.hand_removal_to_janitor()?;
            }
            if root {
                if let Some(dir) = writable {
                    privileges::give_to_user(dir, &cfg.user)?;
                }
                privileges::drop_root(&cfg.user, privileges::Keep::Nothing)?;
            }
            Listener::Hybrid(l)
        }
        ListenMode::Vsock { cid, port } => {
            let (l, conns) = inherited
                .and_then(|i| i.take_vsock(*cid, *port))
                .unwrap_or_default();
            adopted = conns;
            match l {
                Some(l) => Listener::Vsock(l),
                None => Listener::Vsock(vsock::VsockListener::bind(*cid, *port)?),
            }
        }
        ListenMode::Template {
            template,
            port,
            max_sandboxes,
        } => {
            let templates = std::slice::from_ref(template);
            let set = Set {
                vsock: None,
                templates,
                port: *port,
                max_sandboxes: *max_sandboxes,
            };
            return bind_set(cfg, set, writable, shutdown, inherited).await;
        }
        ListenMode::Many {
            vsock,
            templates,
            port,
            max_sandboxes,
        } => {
            let set = Set {
                vsock: *vsock,
                templates,
                port: *port,
                max_sandboxes: *max_sandboxes,
            };
            return bind_set(cfg, set, writable, shutdown, inherited).await;
        }
        ListenMode::KataHost(k) => {
            let thread = template::SandboxThread::start(unprivileged_user(cfg, writable)?)
                .await?
                .inheriting(inherited);
            let host = kata_host::KataHostListener::start(k, thread, shutdown).await?;
            Listener::KataHost(Box::new(host))
        }
    };
    let mut all = Listeners::new(vec![listener], cfg.max_connections);
    all.adopted = adopted;
    Ok(all)
}

/// Whom the sandbox thread makes the process (when root), after handing
/// `writable` (the spool) to that user.
fn unprivileged_user(
    cfg: &ListenConfig,
    writable: Option<&Path>,
) -> Result<Option<String>, ListenError> {
    // Root is dropped on the sandbox thread, keeping only what it needs.
    let user = privileges::is_root().then(|| cfg.user.clone());
    if let (Some(user), Some(dir)) = (&user, writable) {
        privileges::give_to_user(dir, user)?;
    }
    Ok(user)
}

/// What template mode serves: VSOCK (when `vsock` is set) and templates.
struct Set<'a> {
    vsock: Option<crate::addr::VsockCid>,
    templates: &'a [crate::addr::SocketTemplate],
    port: u32,
    max_sandboxes: usize,
}

/// VSOCK (when set) and every template of `set`, the templates' watchers
/// sharing one sandbox thread.
async fn bind_set(
    cfg: &ListenConfig,
    set: Set<'_>,
    writable: Option<&Path>,
    shutdown: &Shutdown,
    inherited: Option<&Arc<inherited::Inherited>>,
) -> Result<Listeners, ListenError> {
    let mut listeners = Vec::new();
    let mut adopted = Vec::new();
    if let Some(cid) = set.vsock {
        let (l, conns) = inherited
            .and_then(|i| i.take_vsock(cid, set.port))
            .unwrap_or_default();
        let l = match l {
            Some(l) => l,
            None => vsock::VsockListener::bind(cid, set.port)?,
        };
        adopted.extend(conns.into_iter().map(|mut a| {
            a.listener = listeners.len();
            a
        }));
        listeners.push(Listener::Vsock(l));
    }
    if !set.templates.is_empty() {
        let thread = template::SandboxThread::start(unprivileged_user(cfg, writable)?)
            .await?
            .inheriting(inherited);
        for t in set.templates {
            let l = template::TemplateListener::start_on(
                &thread,
                t.clone(),
                set.port,
                set.max_sandboxes,
                shutdown,
            )
            .await?;
            listeners.push(Listener::Template(l));
        }
    }
    let mut all = Listeners::new(listeners, cfg.max_connections);
    all.adopted = adopted;
    Ok(all)
}

/// Accepts on every listener until `shutdown` begins, serving each
/// connection in its own task; then waits for the connections to drain,
/// until the shutdown deadline at the latest. Dropping the listeners on the
/// way out removes their sockets.
pub(crate) async fn serve(
    listeners: Listeners,
    shared: Arc<ConnShared>,
    origin: Arc<Origin>,
    shutdown: Shutdown,
) {
    let limit = Arc::new(ConnLimit::new(listeners.max_connections));
    let tracker = TaskTracker::new();
    let hub = listeners.hub.clone();
    let mut adopted: Vec<Vec<Adopted>> = listeners.listeners.iter().map(|_| Vec::new()).collect();
    for a in listeners.adopted {
        match adopted.get_mut(a.listener) {
            Some(v) => v.push(a),
            None => tracing::warn!("a handed-over connection without its listener; closed"),
        }
    }
    let serving = Serving {
        shared,
        origin,
        limit,
        tracker: tracker.clone(),
        hub,
    };
    let accepting = listeners
        .listeners
        .into_iter()
        .zip(adopted)
        .map(|(listener, adopted)| {
            let serving = serving.clone();
            let shutdown = shutdown.clone();
            async move {
                let listener = match listener {
                    Listener::Template(t) => return t.serve(serving).await,
                    Listener::KataHost(k) => return k.serve(serving).await,
                    other => other,
                };
                // QEMU: a guest's CID says which sandbox it is, through /proc.
                let resolver = matches!(listener, Listener::Vsock(_))
                    .then(|| Arc::new(CidResolver::new(sandbox::PROC_ROOT)));
                let origin = Arc::clone(&serving.origin);
                // Hybrid: the socket is one sandbox's, named by Kata's path.
                let (origin, tenant) = match &listener {
                    Listener::Hybrid(l) => {
                        let id = sandbox::hybrid_sandbox_id(l.path());
                        let origin = match &id {
                            Some(id) => Arc::new(sandbox::sandbox_origin(&origin, id)),
                            None => origin,
                        };
                        let key = id.map_or_else(
                            || TenantKey::Socket(l.path().to_owned()),
                            TenantKey::Sandbox,
                        );
                        (origin, Some(serving.shared.tenant(key)))
                    }
                    _ => (origin, None),
                };
                let member = serving.hub.as_ref().map(Hub::member);
                serving
                    .accept(&origin, resolver, tenant, None)
                    .serve(listener, member, adopted, &shutdown)
                    .await;
            }
        });
    futures_util::future::join_all(accepting).await;
    tracker.close();
    let drained = match shutdown.deadline() {
        Some(d) => tokio::time::timeout_at(d, tracker.wait()).await.is_ok(),
        None => {
            tracker.wait().await;
            true
        }
    };
    if !drained {
        tracing::warn!("connections still open at the shutdown deadline");
    }
}

/// What serving the connections of any listener needs, shared by every
/// listener (and every sandbox of a template). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Serving {
    pub shared: Arc<ConnShared>,
    /// The resource attributes every connection's spans get.
    pub origin: Arc<Origin>,
    pub limit: Arc<ConnLimit>,
    pub tracker: TaskTracker,
    /// Where listeners and connections pause for a hand-over, if any.
    pub hub: Option<Arc<Hub>>,
}

impl Serving {
    /// Accepting on one listener: `origin` is its connections' resource;
    /// `resolver` finds a VSOCK guest's sandbox; `tenant` is the listener's
    /// sandbox (hybrid, template), `sandbox` its id in template mode.
    pub(crate) fn accept<'a>(
        &'a self,
        origin: &'a Arc<Origin>,
        resolver: Option<Arc<CidResolver>>,
        tenant: Option<Arc<Tenant>>,
        sandbox: Option<&'a str>,
    ) -> Accept<'a> {
        Accept {
            shared: &self.shared,
            limit: &self.limit,
            origin,
            resolver,
            tracker: &self.tracker,
            tenant,
            hub: self.hub.as_ref(),
            sandbox,
        }
    }
}

/// The cap on connections served at once, shared by every listener.
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

/// What accepting on one listener needs.
pub(crate) struct Accept<'a> {
    pub shared: &'a Arc<ConnShared>,
    pub limit: &'a ConnLimit,
    /// The resource attributes of every connection of this listener.
    pub origin: &'a Arc<Origin>,
    /// On VSOCK: finds the sandbox of a guest's CID.
    pub resolver: Option<Arc<CidResolver>>,
    pub tracker: &'a TaskTracker,
    /// The listener's sandbox (hybrid, template); on VSOCK, each guest CID
    /// is one.
    pub tenant: Option<Arc<Tenant>>,
    /// Where this listener and its connections pause for a hand-over.
    pub hub: Option<&'a Arc<Hub>>,
    /// The sandbox whose socket this is, in template mode and
    /// `--kata-host`: handed over as such, for the successor's watcher.
    pub sandbox: Option<&'a str>,
}

/// How an accept loop ended.
pub(crate) enum Ended {
    /// Shutdown: the listener goes, and its socket with it.
    Stopped,
    /// A successor serves the listener now, or systemd keeps it for the
    /// next process: its socket stays.
    HandedOver,
}

/// Resolves when a hand-over asks `member` to pause; never without one.
pub(crate) async fn pause_asked(member: &mut Option<Member>) {
    match member {
        Some(m) => m.pause_asked().await,
        None => std::future::pending().await,
    }
}

impl Accept<'_> {
    /// Accepts connections on `listener` until `shutdown` begins, then
    /// takes those already queued (a backlog's worth, not a flood), so that
    /// what their agents wrote is drained rather than lost with the socket.
    /// `member` is its place in hand-overs: between two accepts, it pauses
    /// and reports the listener; handed over, it ends with
    /// [`Ended::HandedOver`].
    pub(crate) async fn run(
        &self,
        listener: &Listener,
        shutdown: &Shutdown,
        mut member: Option<Member>,
    ) -> Ended {
        let max_connections = self.limit.max;
        let stats = &self.shared.stats;
        let listener_id = member.as_ref().map_or(0, Member::id);
        let mut late = 0usize;
        let stored = listener.store();
        let keep = |stored: Vec<Stored>| stored.into_iter().for_each(Stored::keep);
        loop {
            if let Some(m) = member.as_mut() {
                if m.pause_due() {
                    m.report(self.piece(listener));
                }
                if m.awaiting_outcome() {
                    match m.outcome().await {
                        Outcome::HandedOver => {
                            keep(stored);
                            return Ended::HandedOver;
                        }
                        Outcome::Stop => break,
                        Outcome::Resumed => {}
                    }
                }
            }
            let accepted = if shutdown.is_stopping() {
                late += 1;
                match accept(listener).now_or_never() {
                    Some(a) if late <= max_connections => a,
                    _ => break,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.stopping() => continue,
                    _ = pause_asked(&mut member) => continue,
                    a = accept(listener) => a,
                }
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(_) if shutdown.is_stopping() => break,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of
                    // spinning; the connections already open keep being
                    // served.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            emit!(stats, ConnectionAccepted);
            let tenants = &*self.shared.tenants;
            let tenant = match (&self.tenant, peer) {
                (Some(t), _) => Some(Arc::clone(t)),
                (None, Peer::Vsock { cid }) => tenants.get(TenantKey::Cid(cid)),
                (None, Peer::Unix) => None,
            };
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
            let Some(tenant) = tenant else {
                let max_sandboxes = tenants.limits().max_sandboxes;
                refuse(None, Refusal::Sandboxes { max_sandboxes });
                continue;
            };
            let Some(slot) = tenant.try_connect() else {
                let max_connections = tenant.max_connections();
                refuse(Some(&tenant), Refusal::Sandbox { max_connections });
                continue;
            };
            let Ok(permit) = Arc::clone(&self.limit.permits).try_acquire_owned() else {
                refuse(Some(&tenant), Refusal::Global { max_connections });
                continue;
            };
            let link = ConnLink {
                member: self.hub.map(Hub::member),
                listener: listener_id,
                resume: None,
            };
            self.spawn(stream, peer, slot, permit, shutdown, link);
        }
        // With systemd's store, a stop leaves the listener to the next
        // process; a sandbox that went alone (no phase) takes it along.
        if shutdown
            .phase()
            .is_some_and(|p| p.mode == crate::shutdown::Mode::Store)
        {
            keep(stored);
            return Ended::HandedOver;
        }
        drop(stored);
        Ended::Stopped
    }

    /// This accept loop's part of a hand-over.
    fn piece(&self, listener: &Listener) -> Option<Piece> {
        let Piece { what, fd } = listener.hand_over()?;
        let what = match (self.sandbox, what) {
            (
                Some(id),
                PieceKind::Listener {
                    kind: ListenerKind::Hybrid { path, identity },
                    janitor,
                },
            ) => PieceKind::Listener {
                kind: ListenerKind::Sandbox {
                    id: id.to_owned(),
                    path,
                    identity,
                },
                janitor,
            },
            (_, what) => what,
        };
        Some(Piece { what, fd })
    }

    /// Serves `listener` (VSOCK, or one hybrid socket) until `shutdown`:
    /// first the connections a predecessor left (`adopted`), then what it
    /// accepts. `member` is its place in hand-overs, taken by the caller
    /// before this task ran. Handed over, or left in systemd's store, its
    /// socket stays; stopped, it goes.
    pub(crate) async fn serve(
        &self,
        listener: Listener,
        member: Option<Member>,
        adopted: Vec<Adopted>,
        shutdown: &Shutdown,
    ) {
        let listener_id = member.as_ref().map_or(0, Member::id);
        for a in adopted {
            self.adopt(a, listener_id, shutdown);
        }
        match self.run(&listener, shutdown, member).await {
            Ended::HandedOver => {
                tracing::info!(listener = %listener.describe(), "handed over");
                listener.release();
            }
            Ended::Stopped => {
                tracing::info!(listener = %listener.describe(), "stopped accepting connections")
            }
        }
    }

    /// Serves a connection a previous forwarder handed over, from where it
    /// left it. Past a cap (one lowered since), it is closed and logged.
    fn adopt(&self, a: Adopted, listener_id: u64, shutdown: &Shutdown) {
        let tenants = &*self.shared.tenants;
        let tenant = match (&self.tenant, a.peer) {
            (Some(t), _) => Some(Arc::clone(t)),
            (None, Peer::Vsock { cid }) => tenants.get(TenantKey::Cid(cid)),
            (None, Peer::Unix) => None,
        };
        let slot = tenant.and_then(|t| t.try_connect());
        let permit = Arc::clone(&self.limit.permits).try_acquire_owned().ok();
        let (Some(slot), Some(permit)) = (slot, permit) else {
            tracing::warn!(peer = %a.peer, "a handed-over connection is over a connection cap; closed");
            return;
        };
        let link = ConnLink {
            member: self.hub.map(Hub::member),
            listener: listener_id,
            resume: Some(a.resume),
        };
        self.spawn(a.stream, a.peer, slot, permit, shutdown, link);
    }

    fn spawn(
        &self,
        stream: Stream,
        peer: Peer,
        slot: crate::tenant::TenantConn,
        permit: tokio::sync::OwnedSemaphorePermit,
        shutdown: &Shutdown,
        link: ConnLink,
    ) {
        let shared = Arc::clone(self.shared);
        let shutdown = shutdown.clone();
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
                    connection::serve(s, peer, &shared, origin, slot, &shutdown, link).await
                }
                Stream::Vsock(s) => {
                    connection::serve(s, peer, &shared, origin, slot, &shutdown, link).await
                }
            }
            drop(permit);
        };
        // In the listener's span (a template's sandbox), for the logs.
        self.tracker
            .spawn(tracing::Instrument::in_current_span(conn));
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
        // Served by their own listeners, never accepted on.
        Listener::Template(_) | Listener::KataHost(_) => std::future::pending().await,
    }
}
