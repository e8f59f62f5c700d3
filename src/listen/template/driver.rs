//! The sandbox watcher's effects for real ([`Host`]: inotify, the disk,
//! binding in the main runtime) and the loop on the watcher thread that
//! feeds it events, drops the listeners that come back (this thread can
//! remove their sockets) and retries an unwatched root.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use super::effects::{
    Change, Effects, Identity, Input, ServeError, WatchError, WatchId, WatchKind,
};
use super::watcher::Watcher;
use super::Serve;
use crate::listen::hybrid::HybridListener;
use crate::listen::inherited::Inherited;
use crate::listen::ListenError;
use crate::shutdown::Shutdown;

/// Bytes of inotify events read at once (an event is 16 bytes plus its name).
const EVENT_BUFFER: usize = 64 << 10;
/// At shutdown, how long the listeners have to come back.
const REAP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the watcher retries a directory it failed to watch.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Where bound listeners go.
pub(super) struct Handoff {
    /// The main runtime, which accepts on them.
    pub(super) main: Handle,
    pub(super) serve_tx: mpsc::Sender<Serve>,
    /// Each served sandbox gets a child of it.
    pub(super) shutdown: Shutdown,
    pub(super) inherited: Option<Arc<Inherited>>,
}

/// What the async side asks of the watcher during a hand-over.
pub(super) enum Control {
    /// Stop acting on events, and say so: all it bound is in the channel.
    Freeze(oneshot::Sender<()>),
    /// Carry on: the hand-over did not happen.
    Thaw,
    /// A successor serves the sandboxes: stop watching, and remove nothing.
    Leave,
}

pub(super) struct Host {
    watches: Watches,
    descriptors: HashMap<WatchId, WatchDescriptor>,
    handoff: Handoff,
    served: HashMap<String, Shutdown>,
}

impl Host {
    pub(super) fn new(watches: Watches, handoff: Handoff) -> Host {
        Host {
            watches,
            descriptors: HashMap::new(),
            handoff,
            served: HashMap::new(),
        }
    }
}

impl Effects for Host {
    fn watch(&mut self, dir: &Path, kind: WatchKind) -> Result<WatchId, WatchError> {
        let gone = WatchMask::DELETE_SELF | WatchMask::MOVE_SELF | WatchMask::ONLYDIR;
        let appeared = WatchMask::CREATE | WatchMask::MOVED_TO;
        let removed = WatchMask::DELETE | WatchMask::MOVED_FROM;
        let mask = match kind {
            WatchKind::Root => gone | appeared | removed,
            WatchKind::Wait => gone | appeared,
            // Not creations: the VMM makes its own files there.
            WatchKind::Serve => gone | removed,
        };
        match self.watches.add(dir, mask) {
            Ok(wd) => {
                let id = WatchId(wd.get_watch_descriptor_id());
                self.descriptors.insert(id, wd);
                Ok(id)
            }
            Err(e) => match e.raw_os_error() {
                Some(nix::libc::ENOENT | nix::libc::ENOTDIR) => Err(WatchError::Missing),
                // From inotify: the watch limit, not the disk.
                Some(nix::libc::ENOSPC) => Err(WatchError::Failed(io::Error::other(format!(
                    "{e}: the inotify watch limit is reached (raise fs.inotify.max_user_watches)"
                )))),
                _ => Err(WatchError::Failed(e)),
            },
        }
    }

    fn unwatch(&mut self, watch: WatchId) {
        if let Some(wd) = self.descriptors.remove(&watch) {
            // Fails, harmlessly, on a watch the kernel already dropped.
            let _ = self.watches.remove(wd);
        }
    }

    fn serve(&mut self, id: &str, path: &Path) -> Result<Identity, ServeError> {
        let bound = {
            let _ctx = self.handoff.main.enter();
            super::super::inherited::hybrid(self.handoff.inherited.as_ref(), path)
        };
        let (listener, adopted) = bound.map_err(ServeError::Bind)?;
        let connections = adopted.len();
        if connections > 0 {
            tracing::info!(
                sandbox = id,
                connections,
                "serving a handed-over sandbox on"
            );
        }
        let identity = listener.identity;
        let shutdown = self.handoff.shutdown.child();
        let serve = Serve {
            id: id.to_owned(),
            listener,
            shutdown: shutdown.clone(),
            adopted,
        };
        // Refused, it is dropped here, on this thread, which can remove its socket.
        let sent = self.handoff.serve_tx.try_send(serve);
        sent.map_err(|_| ServeError::Refused)?;
        self.served.insert(id.to_owned(), shutdown);
        Ok(identity)
    }

    fn stop(&mut self, id: &str) {
        if let Some(shutdown) = self.served.remove(id) {
            shutdown.stop();
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn is_real_dir(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
    }

    fn nearest_existing(&self, path: &Path) -> Option<(PathBuf, OsString)> {
        nearest_existing(path)
    }

    fn subdirs(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        Ok(std::fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            .collect())
    }

    fn identity(&self, path: &Path) -> Option<Identity> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }
}

pub(super) struct Driver {
    watcher: Watcher,
    host: Host,
    events: EventStream<Vec<u8>>,
}

impl Driver {
    /// Opens inotify on this thread's runtime; serves the sandboxes there.
    pub(super) fn start(mut watcher: Watcher, handoff: Handoff) -> Result<Driver, ListenError> {
        let events = Inotify::init().and_then(|i| i.into_event_stream(vec![0u8; EVENT_BUFFER]));
        let events = events.map_err(|source| ListenError::WatchSandboxes {
            dir: watcher.template.parent.to_path_buf(),
            source,
        })?;
        let mut host = Host::new(events.watches(), handoff);
        watcher.establish_root(&mut host)?;
        Ok(Driver {
            watcher,
            host,
            events,
        })
    }

    pub(super) async fn run(
        mut self,
        mut reap_rx: mpsc::UnboundedReceiver<HybridListener>,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
    ) {
        let (watcher, host) = (&mut self.watcher, &mut self.host);
        let serve_tx = host.handoff.serve_tx.clone();
        loop {
            tokio::select! {
                ev = self.events.next() => match ev {
                    Some(Ok(ev)) => feed(watcher, host, &ev),
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
                Some(control) = control_rx.recv() => {
                    if !follow(control, &mut control_rx).await {
                        tracing::debug!(template = %watcher.template, "the successor watches these sandboxes now");
                        break;
                    }
                }
                _ = serve_tx.closed() => break,
                _ = tokio::time::sleep(RETRY_INTERVAL), if watcher.wants_retry() => {
                    watcher.step(host, Input::Retry);
                }
            }
        }
        // Each listener handed out comes back once its task has stopped.
        let reaped = async { while reap_rx.recv().await.is_some() {} };
        if tokio::time::timeout(REAP_TIMEOUT, reaped).await.is_err() {
            tracing::warn!("some sandbox listeners did not come back in time");
        }
    }
}

/// Acts on a hand-over's `control`; false once the watcher is to leave.
/// Frozen, it reads no event and drops no listener until the next word.
async fn follow(mut control: Control, control_rx: &mut mpsc::UnboundedReceiver<Control>) -> bool {
    while let Control::Freeze(frozen) = control {
        let _ = frozen.send(());
        // The template is gone: so is the hand-over.
        let Some(next) = control_rx.recv().await else {
            return false;
        };
        control = next;
    }
    matches!(control, Control::Thaw)
}

fn feed(watcher: &mut Watcher, host: &mut Host, ev: &inotify::EventOwned) {
    if ev.mask.contains(EventMask::Q_OVERFLOW) {
        watcher.step(host, Input::Overflow);
        return;
    }
    let watch = WatchId(ev.wd.get_watch_descriptor_id());
    let change = change(ev.mask, ev.name.as_deref());
    if matches!(change, Change::Released) {
        host.descriptors.remove(&watch);
    }
    watcher.step(host, Input::Event { watch, change });
}

/// IGNORED, UNMOUNT and the overflow come alone.
fn change(mask: EventMask, name: Option<&OsStr>) -> Change<'_> {
    let is_dir = mask.contains(EventMask::ISDIR);
    let gone = EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT;
    let appeared = EventMask::CREATE | EventMask::MOVED_TO;
    let removed = EventMask::DELETE | EventMask::MOVED_FROM;
    match name {
        _ if mask.contains(EventMask::IGNORED) => Change::Released,
        _ if mask.intersects(gone) => Change::Gone,
        Some(name) if is_dir && mask.intersects(appeared) => Change::DirAppeared(name),
        Some(name) if mask.intersects(removed) => Change::Removed { name, is_dir },
        _ => Change::Other,
    }
}

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

    /// Each inotify event becomes one change, as the decisions read it.
    #[test]
    fn events_become_changes() {
        let n = Some(OsStr::new("x"));
        let dir = EventMask::ISDIR;
        assert!(matches!(change(EventMask::IGNORED, None), Change::Released));
        for m in [
            EventMask::DELETE_SELF,
            EventMask::MOVE_SELF,
            EventMask::UNMOUNT,
        ] {
            assert!(matches!(change(m, None), Change::Gone));
        }
        for m in [EventMask::CREATE, EventMask::MOVED_TO] {
            assert!(matches!(change(m | dir, n), Change::DirAppeared(x) if x == "x"));
            // A file appearing is nothing to the watcher.
            assert!(matches!(change(m, n), Change::Other));
        }
        for m in [EventMask::DELETE, EventMask::MOVED_FROM] {
            assert!(matches!(
                change(m | dir, n),
                Change::Removed { name, is_dir: true } if name == "x"
            ));
            assert!(matches!(
                change(m, n),
                Change::Removed { is_dir: false, .. }
            ));
            assert!(matches!(change(m, None), Change::Other));
        }
    }
}
