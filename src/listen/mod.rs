//! Listening: accepting agent connections and reading their frames.
//! [`vsock`] and [`hybrid`] differ only in bind and accept: what is tested
//! over Unix sockets is the [`connection`] code that runs for VSOCK.

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

use futures_util::future::BoxFuture;

use crate::addr::{hybrid_socket, Peer, VsockCid};
use crate::config::{ListenConfig, ListenMode};
use crate::handover::fdstore::{self, Stored};
use crate::handover::hub::{Hub, Piece, PieceKind};
use crate::handover::wire::{ConnState, ListenerKind};
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
    /// Inspecting, locking, removing or binding a socket path: `what` says which.
    #[error("{0}: {1}")]
    SocketPath(String, #[source] io::Error),
    #[error("binding VSOCK cid {cid} port {port}: {source}")]
    BindVsock {
        cid: String,
        port: u32,
        source: io::Error,
    },
    #[error("dropping privileges to user '{user}': {reason}")]
    DropPrivileges { user: String, reason: String },
    #[error("starting the socket janitor: {0}")]
    StartJanitor(#[source] io::Error),
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

/// A listener (with what a predecessor left on it), or a manager of them.
pub(crate) enum Served {
    Listener(Listener, Vec<Adopted>),
    Template(template::TemplateListener),
    /// Boxed: it holds its plan; there is one per forwarder.
    KataHost(Box<kata_host::KataHostListener>),
}

impl Served {
    fn describe(&self) -> String {
        match self {
            Served::Listener(l, _) => l.describe(),
            Served::Template(t) => t.describe.clone(),
            Served::KataHost(k) => k.describe(),
        }
    }

    /// Boxed: `--kata-host` serves its targets through this too.
    fn serve(self, serving: Serving, life: Lifeline) -> BoxFuture<'static, ()> {
        match self {
            Served::Listener(l, adopted) => Box::pin(serving.serve(l, life, adopted)),
            Served::Template(t) => Box::pin(t.serve(serving, life)),
            Served::KataHost(k) => Box::pin(k.serve(serving, life)),
        }
    }
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Hybrid(l) => format!("hybrid vsock unix:{}", l.path.display()),
            Listener::Vsock(l) => format!("vsock cid {} port {}", vsock::cid_str(l.cid), l.port),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Hybrid(l) => l.listener.as_fd(),
            Listener::Vsock(l) => l.listener.as_fd(),
        }
    }

    /// Its piece of a hand-over (`sandbox`: for the successor's watcher).
    fn hand_over(&self, sandbox: Option<&str>) -> Option<Piece> {
        let (kind, janitor) = match self {
            Listener::Hybrid(l) => {
                let (path, identity) = (l.path.clone(), l.identity);
                let kind = match sandbox.map(str::to_owned) {
                    Some(id) => ListenerKind::Sandbox { id, path, identity },
                    None => ListenerKind::Hybrid { path, identity },
                };
                (kind, l.janitor_pipe())
            }
            Listener::Vsock(l) => {
                let cid = (l.cid != VsockCid::Any).then(|| l.cid.as_raw());
                (ListenerKind::Vsock { cid, port: l.port }, None)
            }
        };
        let piece = || -> io::Result<Piece> {
            let janitor = janitor.map(|p| p.try_clone_to_owned()).transpose()?;
            let fd = self.fd().try_clone_to_owned()?;
            let what = PieceKind::Listener { kind, janitor };
            Ok(Piece { what, fd })
        };
        let piece = piece().inspect_err(|e| {
            tracing::warn!(error = %e, "hand-over: duplicating a listener's socket");
        });
        piece.ok()
    }

    /// To systemd's store with its janitor's pipe (removal waits for systemd).
    fn store(&self) -> Vec<Stored> {
        let (identity, janitor) = match self {
            Listener::Hybrid(l) => (Some(l.identity), l.janitor_pipe()),
            Listener::Vsock(_) => (None, None),
        };
        let mut stored = vec![Stored::listener(self.fd(), identity)];
        stored.extend(janitor.map(|p| Stored::janitor(self.fd(), p)));
        stored
    }
}

/// A connection a predecessor served, to be served on.
pub(crate) struct Adopted {
    stream: Stream,
    peer: Peer,
    resume: ConnState,
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

    /// A handed-over connection (a VSOCK guest's when `resume` names a CID).
    fn new(fd: OwnedFd, resume: ConnState) -> Result<Adopted, ListenError> {
        let (stream, peer) = match resume.cid {
            Some(cid) => (Stream::Vsock(fd.into()), Peer::Vsock { cid }),
            None => {
                let adopt = |e: io::Error| ListenError::AdoptSocket(e.to_string());
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true).map_err(adopt)?;
                let stream = tokio::net::UnixStream::from_std(std).map_err(adopt)?;
                (Stream::Unix(stream), Peer::Unix)
            }
        };
        Ok(Adopted {
            stream,
            peer,
            resume,
        })
    }
}

/// The listeners and managers one forwarder serves.
pub struct Listeners {
    served: Vec<Served>,
    max_connections: usize,
    pub(crate) hub: Option<Arc<Hub>>,
    sandbox_thread: Option<template::SandboxThread>,
}

impl Listeners {
    /// Listeners bound elsewhere (tests, embedders).
    pub fn new(listeners: Vec<Listener>, max_connections: usize) -> Listeners {
        Listeners {
            served: listeners
                .into_iter()
                .map(|l| Served::Listener(l, Vec::new()))
                .collect(),
            max_connections,
            hub: None,
            sandbox_thread: None,
        }
    }

    /// Where a hand-over starts the upgraded binary and becomes it.
    pub(crate) fn launcher(&self) -> Arc<dyn crate::handover::server::Launcher> {
        Arc::new(self.sandbox_thread.clone())
    }

    pub fn describe(&self) -> String {
        self.each().join(", ")
    }

    pub(crate) fn each(&self) -> Vec<String> {
        self.served.iter().map(Served::describe).collect()
    }
}

/// Binds what `cfg` says (inheriting where it may); then, as root, gives
/// `writable` (the spool) to `cfg.user`, becoming it: only binding needs root.
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
    match &cfg.mode {
        ListenMode::Hybrid { socket_path, port } => {
            let path = hybrid_socket(socket_path, *port);
            let (mut l, conns) = inherited::hybrid(inherited, &path)?;
            if privileges::is_root() {
                l.hand_removal_to_janitor()?;
                if let Some(dir) = writable {
                    privileges::give_to_user(dir, &cfg.user)?;
                }
                privileges::drop_root(&cfg.user, None)?;
            }
            all.served
                .push(Served::Listener(Listener::Hybrid(l), conns));
        }
        ListenMode::KataHost(k) => {
            let thread = sandbox_thread(&mut all, cfg, writable, inherited).await?;
            let host = kata_host::KataHostListener::start(k, thread, shutdown).await?;
            all.served.push(Served::KataHost(Box::new(host)));
        }
        ListenMode::Set {
            vsock,
            templates,
            port,
            max_sandboxes,
        } => {
            if let Some(cid) = vsock {
                let (l, conns) = inherited::vsock(inherited, *cid, *port)?;
                all.served.push(Served::Listener(Listener::Vsock(l), conns));
            }
            if !templates.is_empty() {
                let thread = sandbox_thread(&mut all, cfg, writable, inherited).await?;
                for t in templates {
                    let (t, max) = (t.clone(), *max_sandboxes);
                    let l = template::TemplateListener::start_on(&thread, t, *port, max, shutdown);
                    all.served.push(Served::Template(l.await?));
                }
            }
        }
    }
    Ok(all)
}

/// Starts `all`'s sandbox thread; as root, as in `bind_inheriting`.
async fn sandbox_thread(
    all: &mut Listeners,
    cfg: &ListenConfig,
    writable: Option<&Path>,
    inherited: Option<&Arc<inherited::Inherited>>,
) -> Result<template::SandboxThread, ListenError> {
    let user = privileges::is_root().then(|| cfg.user.clone());
    if let (Some(user), Some(dir)) = (&user, writable) {
        privileges::give_to_user(dir, user)?;
    }
    let thread = template::SandboxThread::start(user, inherited).await?;
    all.sandbox_thread = Some(thread.clone());
    Ok(thread)
}

pub(crate) enum Stream {
    Unix(tokio::net::UnixStream),
    Vsock(tokio_vsock::VsockStream),
}
