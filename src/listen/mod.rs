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

mod accept;
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

use crate::addr::{hybrid_socket, Peer};
use crate::config::{ListenConfig, ListenMode};
use crate::handover::fdstore::Stored;
use crate::handover::hub::{Hub, Piece, PieceKind};
use crate::handover::wire::ListenerKind;
use crate::handover::{Resume, TakenConn};
use crate::lifeline::Lifeline;
use crate::shutdown::Shutdown;
pub(crate) use accept::{serve, Ended, Serving};

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

/// A bound socket agents connect to: all a listener does is accept.
pub enum Listener {
    Hybrid(hybrid::HybridListener),
    Vsock(vsock::VsockListener),
}

/// What binds and removes listeners as sandboxes (or the host's Kata
/// configurations) come and go, and serves each in a task of its own.
pub(crate) enum Manager {
    /// One hybrid listener per sandbox directory of a template.
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
        }
    }
}

impl Manager {
    fn describe(&self) -> String {
        match self {
            Manager::Template(t) => t.describe(),
            Manager::KataHost(k) => k.describe(),
        }
    }

    async fn serve(self, serving: Serving, life: Lifeline) {
        match self {
            Manager::Template(t) => t.serve(serving, life).await,
            Manager::KataHost(k) => k.serve(serving, life).await,
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

/// The listeners one forwarder serves, bound and ready, and what makes
/// more of them as sandboxes come.
pub struct Listeners {
    listeners: Vec<Listener>,
    managers: Vec<Manager>,
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
            managers: Vec::new(),
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
        self.managers.first().map(|m| match m {
            Manager::Template(t) => t.thread().clone(),
            Manager::KataHost(k) => k.thread().clone(),
        })
    }

    pub fn describe(&self) -> String {
        self.each().join(", ")
    }

    /// Each listener and sandbox manager, described.
    pub(crate) fn each(&self) -> Vec<String> {
        let listeners = self.listeners.iter().map(Listener::describe);
        listeners
            .chain(self.managers.iter().map(Manager::describe))
            .collect()
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
    // The one listener, with its connections a previous process left.
    let (listener, adopted) = match &cfg.mode {
        ListenMode::Hybrid { socket_path, port } => {
            let path = hybrid_socket(socket_path, *port);
            let (mut l, conns) = inherited::hybrid(inherited, &path)?;
            if root && !l.has_janitor() {
                l.hand_removal_to_janitor()?;
            }
            if root {
                if let Some(dir) = writable {
                    privileges::give_to_user(dir, &cfg.user)?;
                }
                privileges::drop_root(&cfg.user, privileges::Keep::Nothing)?;
            }
            (Listener::Hybrid(l), conns)
        }
        ListenMode::Vsock { cid, port } => {
            let (l, conns) = inherited::vsock(inherited, *cid, *port)?;
            (Listener::Vsock(l), conns)
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
            let mut all = Listeners::new(Vec::new(), cfg.max_connections);
            all.managers.push(Manager::KataHost(Box::new(host)));
            return Ok(all);
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
    let mut managers = Vec::new();
    let mut adopted = Vec::new();
    if let Some(cid) = set.vsock {
        let (l, conns) = inherited::vsock(inherited, cid, set.port)?;
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
            managers.push(Manager::Template(l));
        }
    }
    let mut all = Listeners::new(listeners, cfg.max_connections);
    all.managers = managers;
    all.adopted = adopted;
    Ok(all)
}

/// An accepted stream of either transport.
pub(crate) enum Stream {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}
