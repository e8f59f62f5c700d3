//! Listening: accepting agent connections and reading their frames.
//!
//! QEMU guests reach the host over the kernel's AF_VSOCK ([`vsock`]); Cloud
//! Hypervisor and Firecracker use "hybrid VSOCK", where the VMM turns each
//! guest connection to port P into a Unix-socket connection to
//! `<socket-path>_P` ([`hybrid`]). Only `bind` and `accept` differ: every
//! stream then goes through the same [`connection`] code, so what is tested
//! over Unix sockets here is what runs for VSOCK. In template mode
//! ([`template`]) a watcher binds a listener in each sandbox directory as
//! it appears. What is known of a connection's sandbox (its id, its guest's
//! CID, resolved by [`sandbox`] for QEMU) goes onto its spans' resource.
//!
//! Each connection is its own task, so an idle or slow agent never delays
//! another, and an error ends only its own connection. Every connection
//! belongs to a sandbox ([`crate::tenant`]): the listener's in hybrid and
//! template modes, its guest CID's on VSOCK. Open connections are capped
//! per sandbox and in all; beyond a cap a connection is accepted, logged
//! (through the sandbox's log gate) and closed, so a flood costs a file
//! descriptor for a moment, and one sandbox's flood never uses up
//! another's room.

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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::addr::{hybrid_socket, Peer, VsockCid};
use crate::config::{ListenConfig, ListenMode};
use crate::handover::fdstore::{self, Stored};
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
    InspectPath { path: PathBuf, source: io::Error },
    #[error("locking {dir} to bind a socket in it: {source}")]
    LockDirectory { dir: PathBuf, source: io::Error },
    #[error("removing stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("binding Unix socket {path}: {source}")]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("binding VSOCK cid {cid} port {port}: {source}")]
    BindVsock {
        cid: String,
        port: u32,
        source: io::Error,
    },
    #[error("dropping privileges to user '{user}': {reason}")]
    DropPrivileges { user: String, reason: String },
    #[error("watching {dir} for sandboxes: {source}")]
    WatchSandboxes { dir: PathBuf, source: io::Error },
    #[error("starting the sandbox watcher: {0}")]
    StartWatcher(String),
    #[error("{0} (fix or remove it; --kata-host --print shows the plan)")]
    ReadKataConfig(String),
    #[error("watching the Kata configurations in {dir}: {source}")]
    WatchKataConfigs { dir: PathBuf, source: io::Error },
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
    Template(template::TemplateListener),
    /// Boxed: it holds its plan; there is one per forwarder.
    KataHost(Box<kata_host::KataHostListener>),
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
    pub fn describe(&self) -> String {
        match self {
            Listener::Hybrid(l) => format!("hybrid vsock unix:{}", l.path.display()),
            Listener::Vsock(l) => l.describe(),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Hybrid(l) => l.listener.as_fd(),
            Listener::Vsock(l) => l.listener.as_fd(),
        }
    }

    /// This listener's part of a hand-over, as its accept loop reports it:
    /// what a successor needs to serve it (for a hybrid socket its path and
    /// identity; `sandbox`'s, for its watcher, in template mode and
    /// `--kata-host`), a duplicate of its socket and of its janitor's pipe.
    fn hand_over(&self, sandbox: Option<&str>) -> Option<Piece> {
        let (kind, janitor) = match self {
            Listener::Hybrid(l) => {
                let (path, identity) = (l.path.clone(), l.identity);
                let kind = match sandbox {
                    Some(id) => ListenerKind::Sandbox {
                        id: id.to_owned(),
                        path,
                        identity,
                    },
                    None => ListenerKind::Hybrid { path, identity },
                };
                let janitor = l.janitor_pipe().map(|p| p.try_clone_to_owned());
                (kind, janitor.transpose())
            }
            Listener::Vsock(l) => {
                let (cid, port) = (l.cid, l.port);
                let cid = (cid != VsockCid::Any).then(|| cid.as_raw());
                (ListenerKind::Vsock { cid, port }, Ok(None))
            }
        };
        match janitor.and_then(|janitor| Ok((self.fd().try_clone_to_owned()?, janitor))) {
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
        let (identity, janitor) = match self {
            Listener::Hybrid(l) => (Some(l.identity), l.janitor_pipe()),
            Listener::Vsock(_) => (None, None),
        };
        let mut stored = vec![Stored::listener(self.fd(), identity)];
        stored.extend(janitor.map(|p| Stored::janitor(self.fd(), p)));
        stored
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
    /// Its listener's index among those handed over.
    listener: usize,
    stream: Stream,
    peer: Peer,
    resume: Resume,
}

impl Adopted {
    /// Not served here: out of systemd's store too, if it kept it.
    fn forget(&self) {
        let fd = match &self.stream {
            Stream::Unix(s) => s.as_fd(),
            Stream::Vsock(s) => s.as_fd(),
        };
        fdstore::forget(fdstore::connection_name(fd));
    }

    /// Registers a handed-over connection with the current runtime.
    fn from_taken(c: TakenConn) -> Result<Adopted, ListenError> {
        let (stream, peer) = Stream::adopt(c.fd, c.cid)?;
        Ok(Adopted {
            listener: c.listener,
            stream,
            peer,
            resume: c.resume,
        })
    }
}

/// `adopted`, sorted by the index of their listener among `listeners`.
fn by_listener(listeners: usize, adopted: Vec<Adopted>) -> Vec<Vec<Adopted>> {
    let mut by: Vec<Vec<Adopted>> = (0..listeners).map(|_| Vec::new()).collect();
    for a in adopted {
        match by.get_mut(a.listener) {
            Some(v) => v.push(a),
            None => tracing::warn!("a handed-over connection without its listener; closed"),
        }
    }
    by
}

/// The listeners one forwarder serves, bound and ready, and what makes
/// more of them as sandboxes come.
pub struct Listeners {
    listeners: Vec<Listener>,
    managers: Vec<Manager>,
    max_connections: usize,
    adopted: Vec<Adopted>,
    /// Where accept loops and connections pause for the next hand-over.
    hub: Option<Arc<Hub>>,
    /// The thread the managers watch sandbox directories on, when they do.
    sandbox_thread: Option<template::SandboxThread>,
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
            sandbox_thread: None,
        }
    }

    /// Takes part in hand-overs through `hub`: every accept loop and
    /// connection, and the watchers that make listeners as they go.
    pub(crate) fn set_hub(&mut self, hub: Arc<Hub>) {
        self.hub = Some(hub);
    }

    /// Where a hand-over starts the upgraded binary and becomes it: from
    /// the thread that watches sandbox directories, when one does.
    pub(crate) fn launcher(&self) -> Arc<dyn crate::handover::server::Launcher> {
        Arc::new(template::Launch(self.sandbox_thread.clone()))
    }

    pub fn describe(&self) -> String {
        self.each().join(", ")
    }

    pub(crate) fn each(&self) -> Vec<String> {
        let listeners = self.listeners.iter().map(Listener::describe);
        listeners
            .chain(self.managers.iter().map(Manager::describe))
            .collect()
    }
}

/// Binds what `cfg` says, then, when started as root, drops to
/// `cfg.user`, handing `writable` (the spool) to that user first so that
/// it stays writable: binding needs root for the hybrid modes' sandbox
/// directories, nothing after it does. `shutdown` stops template mode's
/// sandboxes. In a successor, what the predecessor handed over is served
/// on where it is still asked for (see [`inherited`]).
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
    let mut all = Listeners::new(Vec::new(), cfg.max_connections);
    let (vsock, templates, port, max_sandboxes) = match &cfg.mode {
        ListenMode::Hybrid { socket_path, port } => {
            let path = hybrid_socket(socket_path, *port);
            let (mut l, conns) = inherited::hybrid(inherited, &path)?;
            if privileges::is_root() {
                l.hand_removal_to_janitor()?;
                if let Some(dir) = writable {
                    privileges::give_to_user(dir, &cfg.user)?;
                }
                privileges::drop_root(&cfg.user, privileges::Keep::Nothing)?;
            }
            all.listeners.push(Listener::Hybrid(l));
            all.adopted = conns;
            return Ok(all);
        }
        ListenMode::Vsock { cid, port } => (Some(*cid), &[][..], *port, 0),
        ListenMode::Template {
            template,
            port,
            max_sandboxes,
        } => (None, std::slice::from_ref(template), *port, *max_sandboxes),
        ListenMode::Many {
            vsock,
            templates,
            port,
            max_sandboxes,
        } => (*vsock, &templates[..], *port, *max_sandboxes),
        ListenMode::KataHost(k) => {
            let thread = sandbox_thread(cfg, writable, inherited).await?;
            all.sandbox_thread = Some(thread.clone());
            let host = kata_host::KataHostListener::start(k, thread, shutdown).await?;
            all.managers.push(Manager::KataHost(Box::new(host)));
            return Ok(all);
        }
    };
    // VSOCK (when asked for) and every template, the templates' watchers
    // sharing one sandbox thread.
    if let Some(cid) = vsock {
        let (l, conns) = inherited::vsock(inherited, cid, port)?;
        // The first listener here, whatever it was in the predecessor.
        all.adopted = conns
            .into_iter()
            .map(|a| Adopted { listener: 0, ..a })
            .collect();
        all.listeners.push(Listener::Vsock(l));
    }
    if !templates.is_empty() {
        let thread = sandbox_thread(cfg, writable, inherited).await?;
        all.sandbox_thread = Some(thread.clone());
        for t in templates {
            let l = template::TemplateListener::start_on(
                &thread,
                t.clone(),
                port,
                max_sandboxes,
                shutdown,
            )
            .await?;
            all.managers.push(Manager::Template(l));
        }
    }
    Ok(all)
}

/// Starts the sandbox thread; when root, the process becomes `cfg.user`
/// (given `writable` first), the thread alone keeping what it needs.
async fn sandbox_thread(
    cfg: &ListenConfig,
    writable: Option<&Path>,
    inherited: Option<&Arc<inherited::Inherited>>,
) -> Result<template::SandboxThread, ListenError> {
    let user = privileges::is_root().then(|| cfg.user.clone());
    if let (Some(user), Some(dir)) = (&user, writable) {
        privileges::give_to_user(dir, user)?;
    }
    template::SandboxThread::start(user, inherited).await
}

pub(crate) enum Stream {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl Stream {
    /// A handed-over connection (a VSOCK guest's when it has a `cid`), on
    /// the current runtime.
    fn adopt(fd: OwnedFd, cid: Option<u32>) -> Result<(Stream, Peer), ListenError> {
        if let Some(cid) = cid {
            let stream = tokio_vsock::VsockStream::from(fd);
            return Ok((Stream::Vsock(stream), Peer::Vsock { cid }));
        }
        let adopt = |e: io::Error| ListenError::AdoptSocket(e.to_string());
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).map_err(adopt)?;
        let stream = tokio::net::UnixStream::from_std(std).map_err(adopt)?;
        Ok((Stream::Unix(stream), Peer::Unix))
    }
}
