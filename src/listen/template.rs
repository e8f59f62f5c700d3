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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::connection::ConnShared;
use super::hybrid::HybridListener;
use super::{privileges, sandbox, Accept, ConnLimit, ListenError, Listener};
use crate::addr::SocketTemplate;
use crate::otlp::Origin;
use crate::shutdown::Shutdown;

/// Bytes of inotify events read at once (an event is 16 bytes plus its name).
const EVENT_BUFFER: usize = 64 << 10;
/// At shutdown, how long the watcher waits for the listeners to come back.
const REAP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the watcher retries a directory it failed to watch.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Turning sandboxes away at the cap is logged at `warn` at most this often.
const CAP_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The directory above `{ID}`: sandbox directories appearing and going.
const ROOT_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);
/// A directory on the way down: the next one appearing, or this one going.
const WAIT_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);
/// The socket's directory once served: our socket or the directory going.
/// (Not creations: the VMM makes its own files there.)
const SERVE_MASK: WatchMask = WatchMask::DELETE
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// A directory name that can be a sandbox id: UTF-8 (it becomes a string
/// attribute), and not hidden (editors', tools' temporary entries).
fn sandbox_id(name: &OsStr) -> Option<&str> {
    name.to_str()
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
}

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
    thread: Option<std::thread::JoinHandle<()>>,
    shutdown: Shutdown,
}

impl TemplateListener {
    /// Starts the watcher thread and returns once it watches (and serves the
    /// sandboxes that already exist). With `become_user`, the process
    /// becomes that user first, the watcher keeping CAP_DAC_OVERRIDE.
    pub async fn start(
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
        become_user: Option<String>,
        shutdown: &Shutdown,
    ) -> Result<TemplateListener, ListenError> {
        // Bounded: a slow async side makes the watcher drop a sandbox (with
        // a warning) rather than queue without end.
        let (serve_tx, serve_rx) = mpsc::channel(max_sandboxes.clamp(16, 4096));
        let (reap_tx, reap_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let watcher = Watcher::new(
            template.clone(),
            port,
            max_sandboxes,
            serve_tx,
            shutdown.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("ktf-sandboxes".into())
            .spawn(move || watcher_thread(watcher, become_user, reap_rx, ready_tx))
            .map_err(|e| ListenError::StartWatcher(e.to_string()))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(TemplateListener {
                template,
                port,
                max_sandboxes,
                serve_rx,
                reap_tx: Some(reap_tx),
                thread: Some(thread),
                shutdown: shutdown.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ListenError::StartWatcher(
                "the sandbox watcher thread stopped".into(),
            )),
        }
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
            sandboxes.spawn(serve_sandbox(
                serve,
                Arc::clone(&shared),
                sandbox_origin,
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
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
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
    };
    tracing::Instrument::instrument(accept.run(&listener, &shutdown), span).await;
    if let Listener::Hybrid(l) = listener {
        // If the watcher is gone, so is the process: nothing to return to.
        let _ = reap.send(l);
    }
}

/// Who a watch descriptor belongs to.
#[derive(Debug, Clone)]
enum Owner {
    /// The directory sandbox directories appear in.
    Root,
    /// The nearest existing ancestor of a missing root.
    Ancestor,
    Sandbox(String),
}

enum Root {
    Watching(WatchDescriptor),
    /// The root does not exist; `wd` watches an ancestor for `next`, the
    /// component below it on the way to the root.
    Waiting {
        wd: WatchDescriptor,
        next: OsString,
    },
    /// Not watched after an error: retried every [`RETRY_INTERVAL`].
    Missing,
}

struct Sandbox {
    /// The one watch a sandbox has: the deepest directory that exists on
    /// the way to its socket's.
    wd: Option<WatchDescriptor>,
    state: State,
}

enum State {
    /// Waiting in `inner[..depth]` for `inner[depth]` to appear.
    Waiting { depth: usize },
    Serving {
        shutdown: Shutdown,
        /// Device and inode of our socket.
        identity: (u64, u64),
    },
    /// Its socket (or socket directory) went while the sandbox directory
    /// stayed, or it could not be served: left alone until it goes.
    Retired,
}

/// The watcher's state; lives on the watcher thread.
struct Watcher {
    /// Each served sandbox gets a child of it.
    shutdown: Shutdown,
    template: SocketTemplate,
    port: u32,
    max_sandboxes: usize,
    /// The main runtime, where listeners are registered.
    main: Handle,
    serve_tx: mpsc::Sender<Serve>,
    watches: Option<Watches>,
    root: Root,
    owners: HashMap<i32, Owner>,
    sandboxes: HashMap<String, Sandbox>,
    /// A sandbox was turned away at the cap: look again when a slot frees.
    turned_away: bool,
    cap_warned: Option<Instant>,
}

fn watcher_thread(
    mut watcher: Watcher,
    become_user: Option<String>,
    reap_rx: mpsc::UnboundedReceiver<HybridListener>,
    ready: oneshot::Sender<Result<(), ListenError>>,
) {
    if let Some(user) = become_user {
        if let Err(e) = privileges::drop_root(&user, privileges::Keep::DacOverrideOnThisThread) {
            let _ = ready.send(Err(e));
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
            let _ = ready.send(Err(ListenError::StartWatcher(e.to_string())));
            return;
        }
    };
    rt.block_on(async move {
        let watch_err = |source| ListenError::WatchSandboxes {
            dir: watcher.template.parent().to_path_buf(),
            source,
        };
        let events = Inotify::init().and_then(|i| i.into_event_stream(vec![0u8; EVENT_BUFFER]));
        let mut events = match events {
            Ok(e) => e,
            Err(e) => {
                let _ = ready.send(Err(watch_err(e)));
                return;
            }
        };
        watcher.watches = Some(events.watches());
        if let Err(e) = watcher.establish_root() {
            let _ = ready.send(Err(e));
            return;
        }
        let _ = ready.send(Ok(()));
        watcher.run(&mut events, reap_rx).await;
    });
}

impl Watcher {
    fn new(
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
        serve_tx: mpsc::Sender<Serve>,
        shutdown: Shutdown,
    ) -> Watcher {
        Watcher {
            shutdown,
            template,
            port,
            max_sandboxes,
            main: Handle::current(),
            serve_tx,
            watches: None,
            root: Root::Missing,
            owners: HashMap::new(),
            sandboxes: HashMap::new(),
            turned_away: false,
            cap_warned: None,
        }
    }

    async fn run(
        &mut self,
        events: &mut inotify::EventStream<Vec<u8>>,
        mut reap_rx: mpsc::UnboundedReceiver<HybridListener>,
    ) {
        let serve_tx = self.serve_tx.clone();
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => self.handle(ev),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "reading sandbox directory events");
                        tokio::time::sleep(RETRY_INTERVAL).await;
                    }
                    None => {
                        tracing::error!("sandbox directory events ended");
                        break;
                    }
                },
                Some(listener) = reap_rx.recv() => drop(listener),
                _ = serve_tx.closed() => break,
                _ = tokio::time::sleep(RETRY_INTERVAL), if matches!(self.root, Root::Missing) => {
                    if let Err(e) = self.establish_root() {
                        tracing::warn!(error = %e, "still cannot watch for sandboxes");
                    }
                }
            }
        }
        // Shutting down: each listener handed out comes back once its
        // sandbox task has stopped; drop them here, with the right to
        // remove their sockets.
        let deadline = tokio::time::Instant::now() + REAP_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, reap_rx.recv()).await {
                Ok(Some(listener)) => drop(listener),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("some sandbox listeners did not come back in time");
                    break;
                }
            }
        }
    }

    fn watch(&mut self, dir: &Path, mask: WatchMask, owner: Owner) -> io::Result<WatchDescriptor> {
        let watches = self
            .watches
            .as_mut()
            .ok_or_else(|| io::Error::other("no inotify instance"))?;
        let wd = watches.add(dir, mask)?;
        self.owners.insert(wd.get_watch_descriptor_id(), owner);
        Ok(wd)
    }

    fn unwatch(&mut self, wd: WatchDescriptor) {
        self.owners.remove(&wd.get_watch_descriptor_id());
        if let Some(w) = self.watches.as_mut() {
            // Fails, harmlessly, when the kernel already dropped the watch
            // because its directory is gone.
            let _ = w.remove(wd);
        }
    }

    /// Watches the root, or waits for it in its nearest existing ancestor.
    fn establish_root(&mut self) -> Result<(), ListenError> {
        match std::mem::replace(&mut self.root, Root::Missing) {
            Root::Watching(wd) | Root::Waiting { wd, .. } => self.unwatch(wd),
            Root::Missing => {}
        }
        let parent = self.template.parent().to_path_buf();
        let err = |dir: &Path, source| ListenError::WatchSandboxes {
            dir: dir.to_path_buf(),
            source,
        };
        // Each round either succeeds or finds a directory gone that was
        // just there; a path being created and removed in a loop still ends.
        for _ in 0..32 {
            match self.watch(&parent, ROOT_MASK, Owner::Root) {
                Ok(wd) => {
                    self.root = Root::Watching(wd);
                    tracing::info!(dir = %parent.display(), "watching for sandboxes");
                    self.scan();
                    return Ok(());
                }
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(err(&parent, with_hint(e))),
            }
            let Some((ancestor, next)) = nearest_existing(&parent) else {
                continue;
            };
            match self.watch(&ancestor, WAIT_MASK, Owner::Ancestor) {
                Ok(wd) => {
                    if ancestor.join(&next).is_dir() {
                        // Appeared meanwhile: go down.
                        self.unwatch(wd);
                        continue;
                    }
                    tracing::info!(
                        dir = %parent.display(),
                        waiting_in = %ancestor.display(),
                        "the sandboxes' directory does not exist yet; waiting for it"
                    );
                    self.root = Root::Waiting { wd, next };
                    return Ok(());
                }
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(err(&ancestor, with_hint(e))),
            }
        }
        Err(err(
            &parent,
            io::Error::other("it kept appearing and disappearing"),
        ))
    }

    /// Serves the sandbox directories already in the root.
    fn scan(&mut self) {
        let parent = self.template.parent().to_path_buf();
        let entries = match std::fs::read_dir(&parent) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %parent.display(), error = %e, "listing sandboxes");
                return;
            }
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.appeared(&entry.file_name());
            }
        }
    }

    fn handle(&mut self, ev: inotify::EventOwned) {
        if ev.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(
                "too many sandbox directory events at once; looking at every sandbox again"
            );
            self.reconcile();
            return;
        }
        let key = ev.wd.get_watch_descriptor_id();
        let owner = if ev.mask.contains(EventMask::IGNORED) {
            self.owners.remove(&key)
        } else {
            self.owners.get(&key).cloned()
        };
        let Some(owner) = owner else {
            // A watch already removed: its last events are still queued.
            return;
        };
        let gone = ev.mask.intersects(
            EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED | EventMask::UNMOUNT,
        );
        let is_dir = ev.mask.contains(EventMask::ISDIR);
        let appeared = is_dir && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
        let removed = ev
            .mask
            .intersects(EventMask::DELETE | EventMask::MOVED_FROM);
        let name = ev.name.as_deref();
        match owner {
            Owner::Root if gone => self.lose_root(),
            Owner::Root => match name {
                Some(n) if appeared => self.appeared(n),
                Some(n) if removed && is_dir => {
                    if let Some(id) = n.to_str() {
                        self.forget(id);
                    }
                }
                _ => {}
            },
            Owner::Ancestor => {
                let next_appeared = appeared
                    && matches!(&self.root, Root::Waiting { next, .. } if Some(next.as_os_str()) == name);
                if gone || next_appeared {
                    if let Err(e) = self.establish_root() {
                        tracing::error!(error = %e, "cannot watch for sandboxes");
                    }
                }
            }
            Owner::Sandbox(id) => {
                let Some(sb) = self.sandboxes.get(&id) else {
                    return;
                };
                if sb.wd.as_ref().map(WatchDescriptor::get_watch_descriptor_id) != Some(key) {
                    return;
                }
                match &sb.state {
                    State::Waiting { depth } => {
                        let next = self.template.inner.get(*depth).map(OsStr::new);
                        if gone || (appeared && name.is_some() && name == next) {
                            self.descend(&id);
                        }
                    }
                    State::Serving { .. } => {
                        let ours = self.template.listen_name(self.port);
                        if gone {
                            self.retire(&id, "its socket directory was removed");
                        } else if removed && name == Some(OsStr::new(&ours)) {
                            self.retire(&id, "its socket was removed");
                        }
                    }
                    State::Retired => {}
                }
            }
        }
    }

    fn appeared(&mut self, name: &OsStr) {
        let Some(id) = sandbox_id(name) else {
            tracing::debug!(name = ?name, "not a sandbox directory name; ignored");
            return;
        };
        if self.sandboxes.contains_key(id) {
            return;
        }
        if self.sandboxes.len() >= self.max_sandboxes {
            self.turned_away = true;
            if self
                .cap_warned
                .is_none_or(|t| t.elapsed() >= CAP_WARN_INTERVAL)
            {
                self.cap_warned = Some(Instant::now());
                tracing::warn!(
                    sandbox = id,
                    max_sandboxes = self.max_sandboxes,
                    "sandbox limit reached (--max-sandboxes); new sandboxes are not served until one goes"
                );
            } else {
                tracing::debug!(sandbox = id, "sandbox limit reached; not serving it");
            }
            return;
        }
        self.sandboxes.insert(
            id.to_owned(),
            Sandbox {
                wd: None,
                state: State::Waiting { depth: 0 },
            },
        );
        self.descend(id);
    }

    /// Follows a sandbox's directories down to its socket's, watching the
    /// deepest that exists; binds once the socket's directory is there.
    fn descend(&mut self, id: &str) {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return;
        };
        if let Some(wd) = sb.wd.take() {
            self.unwatch(wd);
        }
        let last = self.template.inner.len();
        let top = self.template.parent().join(id);
        let (mut dir, mut depth) = (top.clone(), 0);
        let mut restarts = 0;
        loop {
            let mask = if depth == last { SERVE_MASK } else { WAIT_MASK };
            let wd = match self.watch(&dir, mask, Owner::Sandbox(id.to_owned())) {
                Ok(wd) => wd,
                Err(e) if is_missing(&e) => {
                    // A directory on the way went as we looked. If the
                    // sandbox directory is still there, start again from it.
                    if depth > 0 && restarts < 3 && is_real_dir(&top) {
                        restarts += 1;
                        (dir, depth) = (top.clone(), 0);
                        continue;
                    }
                    self.forget(id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(sandbox = id, dir = %dir.display(), error = %with_hint(e), "cannot watch the sandbox directory; not serving it");
                    self.set_state(id, None, State::Retired);
                    return;
                }
            };
            if depth == last {
                self.bind(id, wd);
                return;
            }
            let Some(component) = self.template.inner.get(depth) else {
                return;
            };
            let next = dir.join(component);
            if is_real_dir(&next) {
                self.unwatch(wd);
                (dir, depth) = (next, depth + 1);
                continue;
            }
            self.set_state(id, Some(wd), State::Waiting { depth });
            return;
        }
    }

    fn bind(&mut self, id: &str, wd: WatchDescriptor) {
        let path = self.template.listen_path(id, self.port);
        let bound = {
            // Registered with the main runtime, which accepts on it.
            let _ctx = self.main.enter();
            HybridListener::bind(&path)
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "cannot listen for this sandbox's agent");
                self.unwatch(wd);
                self.set_state(id, None, State::Retired);
                return;
            }
        };
        let identity = std::fs::symlink_metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or_default();
        let shutdown = self.shutdown.child();
        let serve = Serve {
            id: id.to_owned(),
            listener,
            shutdown: shutdown.clone(),
        };
        if let Err(e) = self.serve_tx.try_send(serve) {
            let unserved = match e {
                mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
            };
            tracing::warn!(
                sandbox = id,
                "the forwarder is not taking new sandboxes; not serving this one"
            );
            drop(unserved.listener);
            self.unwatch(wd);
            self.set_state(id, None, State::Retired);
            return;
        }
        tracing::info!(sandbox = id, socket = %path.display(), "serving sandbox");
        self.set_state(id, Some(wd), State::Serving { shutdown, identity });
    }

    fn set_state(&mut self, id: &str, wd: Option<WatchDescriptor>, state: State) {
        if let Some(sb) = self.sandboxes.get_mut(id) {
            sb.wd = wd;
            sb.state = state;
        }
    }

    /// Stops serving a sandbox whose directory is still there.
    fn retire(&mut self, id: &str, reason: &str) {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return;
        };
        let wd = sb.wd.take();
        let old = std::mem::replace(&mut sb.state, State::Retired);
        if let Some(wd) = wd {
            self.unwatch(wd);
        }
        if let State::Serving { shutdown, .. } = old {
            shutdown.stop();
            tracing::info!(sandbox = id, reason, "stopped serving sandbox");
        }
    }

    /// The sandbox directory is gone: stop serving and free its slot.
    fn forget(&mut self, id: &str) {
        let Some(sb) = self.sandboxes.remove(id) else {
            return;
        };
        if let Some(wd) = sb.wd {
            self.unwatch(wd);
        }
        match sb.state {
            State::Serving { shutdown, .. } => {
                shutdown.stop();
                tracing::info!(sandbox = id, "sandbox removed; stopped serving it");
            }
            _ => tracing::debug!(sandbox = id, "sandbox removed"),
        }
        if self.turned_away && matches!(self.root, Root::Watching(_)) {
            self.turned_away = false;
            self.scan();
        }
    }

    fn lose_root(&mut self) {
        tracing::warn!(
            dir = %self.template.parent().display(),
            "the sandboxes' directory was removed; stopping every sandbox"
        );
        if let Root::Watching(wd) = std::mem::replace(&mut self.root, Root::Missing) {
            self.unwatch(wd);
        }
        self.turned_away = false;
        let ids: Vec<String> = self.sandboxes.keys().cloned().collect();
        for id in ids {
            self.forget(&id);
        }
        if let Err(e) = self.establish_root() {
            tracing::error!(error = %e, "cannot watch for sandboxes");
        }
    }

    /// After lost events: check every sandbox against the disk.
    fn reconcile(&mut self) {
        let ids: Vec<String> = self.sandboxes.keys().cloned().collect();
        for id in ids {
            if !is_real_dir(&self.template.parent().join(&id)) {
                self.forget(&id);
                continue;
            }
            let path = self.template.listen_path(&id, self.port);
            match self.sandboxes.get(&id).map(|s| &s.state) {
                Some(State::Waiting { .. }) => self.descend(&id),
                Some(State::Serving { identity, .. }) => {
                    let ours = std::fs::symlink_metadata(&path)
                        .is_ok_and(|m| (m.dev(), m.ino()) == *identity);
                    if !ours {
                        self.retire(&id, "its socket was removed");
                    }
                }
                _ => {}
            }
        }
        match self.root {
            Root::Watching(_) => self.scan(),
            _ => {
                if let Err(e) = self.establish_root() {
                    tracing::error!(error = %e, "cannot watch for sandboxes");
                }
            }
        }
    }
}

fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::libc::ENOENT || c == nix::libc::ENOTDIR)
}

/// ENOSPC from inotify means the watch limit, not the disk.
fn with_hint(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(nix::libc::ENOSPC) {
        io::Error::other(format!(
            "{e}: the inotify watch limit is reached (raise fs.inotify.max_user_watches)"
        ))
    } else {
        e
    }
}

/// A directory, not a symlink to one.
fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// The nearest existing ancestor of `path`, and the name below it on the
/// way to `path`.
fn nearest_existing(path: &Path) -> Option<(PathBuf, OsString)> {
    let mut below = path;
    for dir in path.ancestors().skip(1) {
        if dir.is_dir() {
            return Some((dir.to_path_buf(), below.file_name()?.to_owned()));
        }
        below = dir;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_visible_utf8_names() {
        assert_eq!(sandbox_id(OsStr::new("abc-123")), Some("abc-123"));
        assert_eq!(sandbox_id(OsStr::new(".tmp")), None);
        assert_eq!(sandbox_id(OsStr::new("")), None);
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(sandbox_id(OsStr::from_bytes(b"\xff")), None);
    }

    /// With events lost (queue overflow), looking again finds what
    /// changed: a sandbox gone, a socket directory that appeared, a new
    /// sandbox.
    #[tokio::test]
    async fn reconcile_catches_up_after_lost_events() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir_all(vm.join("a/root")).unwrap();
        std::fs::create_dir_all(vm.join("b")).unwrap();
        let template: SocketTemplate = format!("{}/{{ID}}/root/s.sock", vm.display())
            .parse()
            .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        // Events are never read here: every change below is "lost".
        let inotify = Inotify::init().unwrap();
        let mut w = Watcher::new(template, 7, 8, tx, Shutdown::new());
        w.watches = Some(inotify.watches());
        w.establish_root().unwrap();
        let a = rx.try_recv().expect("a is served at start");
        assert_eq!(a.id, "a");
        assert!(matches!(
            w.sandboxes["b"].state,
            State::Waiting { depth: 0 }
        ));

        std::fs::remove_dir_all(vm.join("a")).unwrap();
        std::fs::create_dir(vm.join("b/root")).unwrap();
        std::fs::create_dir_all(vm.join("c/root")).unwrap();
        w.reconcile();

        assert!(a.shutdown.is_stopping(), "a's listener is stopped");
        assert!(!w.sandboxes.contains_key("a"));
        let served: Vec<Serve> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let mut ids: Vec<&str> = served.iter().map(|s| s.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["b", "c"]);
        assert!(vm.join("b/root/s.sock_7").exists());
        drop(served);
        assert!(
            !vm.join("b/root/s.sock_7").exists(),
            "removed with its listener"
        );
        assert!(w
            .sandboxes
            .values()
            .all(|s| matches!(s.state, State::Serving { .. })));
    }

    #[test]
    fn finds_the_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let want = dir.path().join("a/b/c");
        let (at, next) = nearest_existing(&want).unwrap();
        assert_eq!(
            (at.as_path(), next.as_os_str()),
            (dir.path(), OsStr::new("a"))
        );
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let (at, next) = nearest_existing(&want).unwrap();
        assert_eq!((at, next), (dir.path().join("a/b"), OsString::from("c")));
    }
}
