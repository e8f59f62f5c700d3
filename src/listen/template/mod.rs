//! Template mode: one forwarder for every hybrid-VSOCK sandbox on a host.
//!
//! Cloud Hypervisor and Firecracker put each sandbox's VSOCK socket at a
//! path that differs only by the sandbox id; `kata-runtime env` prints it as
//! a template such as `/run/vc/vm/{ID}/clh.sock`. A watcher follows the
//! directory above `{ID}` with inotify. When a sandbox directory appears,
//! or already exists at start, it follows the directories down to the
//! socket's own (Firecracker nests it under `{ID}/root/`), binds
//! `<socket>_<port>` there with [`HybridListener::bind`] and hands the
//! listener to the async side, which accepts on it through the same code as
//! every other listener and tags the spans with `kata.sandbox.id`. When that
//! socket, its directory or the sandbox directory goes, the listener stops
//! and its connections drain and close; the listener then comes back to the
//! watcher, which drops it, removing the socket file if it is still ours.
//! A socket that someone else removed is never re-created in a directory
//! that is being deleted: the sandbox is served again only once its
//! directory has gone and come back.
//!
//! Sandbox directories are root's, and sockets are made and removed in them
//! for as long as the forwarder runs. Started as root, the forwarder becomes
//! `--user` on every thread, as in single-socket mode, except that the
//! watcher thread keeps CAP_DAC_OVERRIDE, and only that: it is the only
//! thread that touches the sandbox directories, and it reads nothing from
//! guests. The threads that read agents and export hold no capability.
//!
//! However many templates a forwarder serves (several flags, or
//! `--kata-host` adding and removing them as configurations change), they
//! share that one thread, a [`SandboxThread`]: each template's watcher is a
//! task on its single-threaded runtime. One thread rather than one per
//! template because glibc and musl apply `setuid` to every thread of the
//! process: the capability survives the switch only on the thread that
//! made it, so a watcher thread started later by the async side would have
//! none, and several threads each switching would race. The templates'
//! work is a few system calls per sandbox event; one thread keeps up.
//!
//! The watcher is split so that its decisions can be tested without
//! inotify, sockets or threads: [`watcher`] decides (a state machine that
//! is fed events and asks for every effect, and every look at the disk,
//! through the interface in [`effects`]); [`driver`] acts (inotify, the
//! file system, binding, the hand-over channel) and runs the watcher
//! thread's loop. The file-system helpers sit with the driver rather than
//! in a module of their own: only the real effects call them, and the
//! decisions must not. This file is the async side, and the watcher
//! thread's start-up, where the thread gives up its privileges.

mod driver;
mod effects;
mod watcher;

use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::connection::ConnShared;
use super::hybrid::HybridListener;
use super::{privileges, sandbox, Accept, ConnLimit, ListenError, Listener};
use crate::addr::SocketTemplate;
use crate::otlp::Origin;
use crate::shutdown::Shutdown;
use crate::tenant::{Tenant, TenantKey};
use driver::{Driver, Handoff};
use watcher::Watcher;

/// A sandbox whose socket is bound, on its way to the async side.
struct Serve {
    id: String,
    listener: HybridListener,
    /// Stopped by the watcher when the sandbox goes, or with the forwarder.
    shutdown: Shutdown,
}

/// The running watcher, as the rest of the forwarder sees it.
pub struct TemplateListener {
    template: SocketTemplate,
    port: u32,
    max_sandboxes: usize,
    serve_rx: mpsc::Receiver<Serve>,
    /// Listeners go back to the watcher to be dropped there, where their
    /// sockets can still be removed.
    reap_tx: Option<mpsc::UnboundedSender<HybridListener>>,
    /// The watcher's task on the sandbox thread.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the sandbox thread running while this template is served.
    _thread: SandboxThread,
    shutdown: Shutdown,
}

/// The one thread that watches sandbox directories and makes and removes
/// sockets in them, for every template; see the module's documentation.
/// Cheap to clone; the thread ends once the last clone is gone.
#[derive(Clone)]
pub struct SandboxThread {
    /// Its runtime, which the templates' watchers are spawned on.
    handle: Handle,
    /// Dropped with the last clone: the thread then returns.
    _alive: Arc<mpsc::Sender<()>>,
}

impl SandboxThread {
    /// Starts the thread. With `become_user`, the process becomes that user
    /// first, this thread keeping CAP_DAC_OVERRIDE.
    pub async fn start(become_user: Option<String>) -> Result<SandboxThread, ListenError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        std::thread::Builder::new()
            .name("ktf-sandboxes".into())
            .spawn(move || {
                if let Some(user) = become_user {
                    if let Err(e) =
                        privileges::drop_root(&user, privileges::Keep::DacOverrideOnThisThread)
                    {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ListenError::StartWatcher(e.to_string())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                // The watchers run as tasks of this runtime, on this thread,
                // until the last handle on the thread is dropped.
                rt.block_on(async move { while alive_rx.recv().await.is_some() {} });
            })
            .map_err(|e| ListenError::StartWatcher(e.to_string()))?;
        match ready_rx.await {
            Ok(Ok(handle)) => Ok(SandboxThread {
                handle,
                _alive: Arc::new(alive_tx),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ListenError::StartWatcher(
                "the sandbox watcher thread stopped".into(),
            )),
        }
    }
}

impl TemplateListener {
    /// Starts a watcher thread of its own and the template's watcher on it;
    /// returns once it watches (and serves the sandboxes that already
    /// exist). With `become_user`, the process becomes that user first, the
    /// watcher keeping CAP_DAC_OVERRIDE.
    pub async fn start(
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
        become_user: Option<String>,
        shutdown: &Shutdown,
    ) -> Result<TemplateListener, ListenError> {
        let thread = SandboxThread::start(become_user).await?;
        Self::start_on(&thread, template, port, max_sandboxes, shutdown).await
    }

    /// Starts the template's watcher on `thread`; returns once it watches
    /// (and serves the sandboxes that already exist). Stopping `shutdown`
    /// stops this template alone.
    pub async fn start_on(
        thread: &SandboxThread,
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
        shutdown: &Shutdown,
    ) -> Result<TemplateListener, ListenError> {
        // Bounded: a slow async side makes the watcher drop a sandbox (with
        // a warning) rather than queue without end.
        let (serve_tx, serve_rx) = mpsc::channel(max_sandboxes.clamp(16, 4096));
        let (reap_tx, reap_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let watcher = Watcher::new(template.clone(), port, max_sandboxes);
        let handoff = Handoff {
            main: Handle::current(),
            serve_tx,
            shutdown: shutdown.clone(),
        };
        let task = thread
            .handle
            .spawn(watch(watcher, handoff, reap_rx, ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => Ok(TemplateListener {
                template,
                port,
                max_sandboxes,
                serve_rx,
                reap_tx: Some(reap_tx),
                task: Some(task),
                _thread: thread.clone(),
                shutdown: shutdown.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ListenError::StartWatcher(
                "the sandbox watcher stopped".into(),
            )),
        }
    }

    /// The template served.
    pub fn template(&self) -> &SocketTemplate {
        &self.template
    }

    pub fn describe(&self) -> String {
        format!(
            "hybrid vsock template unix:{}_{} (sandboxes in {}, at most {})",
            self.template,
            self.port,
            self.template.parent().display(),
            self.max_sandboxes
        )
    }

    /// Serves each sandbox the watcher hands over until shutdown begins,
    /// then stops them all and gives every listener back for removal.
    /// `origin` is what every sandbox's spans get besides its id; `limit`
    /// caps connections across all sandboxes (and other listeners).
    pub(crate) async fn serve(
        mut self,
        shared: Arc<ConnShared>,
        origin: Arc<Origin>,
        limit: Arc<ConnLimit>,
        tracker: TaskTracker,
    ) {
        let sandboxes = TaskTracker::new();
        let stop = self.shutdown.clone();
        let Some(reap) = self.reap_tx.clone() else {
            return;
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.stopping() => break,
                n = self.serve_rx.recv() => n,
            };
            let Some(serve) = next else {
                tracing::error!("the sandbox watcher stopped; no new sandbox will be served");
                stop.stopping().await;
                break;
            };
            let sandbox_origin = Arc::new(sandbox::sandbox_origin(&origin, &serve.id));
            // Held while the sandbox is served: its limits and its series.
            let tenant = shared.tenant(TenantKey::Sandbox(serve.id.clone()));
            sandboxes.spawn(serve_sandbox(
                serve,
                Arc::clone(&shared),
                sandbox_origin,
                tenant,
                Arc::clone(&limit),
                tracker.clone(),
                reap.clone(),
            ));
        }
        drop(reap);
        self.return_unserved();
        sandboxes.close();
        sandboxes.wait().await;
        // With every listener back, the watcher removes them and exits.
        self.reap_tx = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        tracing::info!(template = %self.template, "stopped serving sandboxes");
    }

    /// Sends back the listeners the async side has not taken yet.
    fn return_unserved(&mut self) {
        self.serve_rx.close();
        while let Ok(s) = self.serve_rx.try_recv() {
            if let Some(reap) = &self.reap_tx {
                let _ = reap.send(s.listener);
            }
        }
    }
}

impl Drop for TemplateListener {
    fn drop(&mut self) {
        // Never served (startup failed after the watcher started): the
        // watcher still removes what it bound once the channels close.
        self.return_unserved();
    }
}

/// Accepts on one sandbox's listener until the sandbox goes or the
/// forwarder stops; its connections then drain and close.
async fn serve_sandbox(
    serve: Serve,
    shared: Arc<ConnShared>,
    origin: Arc<Origin>,
    tenant: Arc<Tenant>,
    limit: Arc<ConnLimit>,
    tracker: TaskTracker,
    reap: mpsc::UnboundedSender<HybridListener>,
) {
    let Serve {
        id,
        listener,
        shutdown,
    } = serve;
    let listener = Listener::Hybrid(listener);
    let span = tracing::info_span!("sandbox", id = %id);
    let accept = Accept {
        shared: &shared,
        limit: &limit,
        origin: &origin,
        resolver: None,
        tracker: &tracker,
        tenant: Some(tenant),
        hub: None,
    };
    tracing::Instrument::instrument(accept.run(&listener, &shutdown, None), span).await;
    if let Listener::Hybrid(l) = listener {
        // If the watcher is gone, so is the process: nothing to return to.
        let _ = reap.send(l);
    }
}

/// One template's watcher, a task on the sandbox thread: starts watching,
/// says whether that worked, then runs until the template stops.
async fn watch(
    watcher: Watcher,
    handoff: Handoff,
    reap_rx: mpsc::UnboundedReceiver<HybridListener>,
    ready: oneshot::Sender<Result<(), ListenError>>,
) {
    let mut driver = match Driver::open(watcher, handoff) {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = driver.start() {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    driver.run(reap_rx).await;
}
