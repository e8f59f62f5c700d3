//! The sandbox watcher's decisions: a state machine fed [`Input`]s that
//! decides what to watch and which sandbox to serve or stop, through
//! [`Effects`]: a trait, not a returned list of actions, as decisions depend
//! on answers mid-way (a watch failing as its directory goes starts the
//! descent again).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::effects::{
    Change, Effects, Identity, Input, ServeError, WatchError, WatchId, WatchKind,
};
use crate::addr::SocketTemplate;
use crate::listen::ListenError;

/// Turning sandboxes away is logged at `warn` at most this often.
const CAP_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A sandbox id: UTF-8 (a string attribute), not hidden (tools' entries).
fn sandbox_id(name: &OsStr) -> Option<&str> {
    name.to_str()
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
}

enum Root {
    /// The directory sandbox directories appear in.
    Watching(WatchId),
    /// `wd` watches the missing root's nearest ancestor for `next`, below it.
    Waiting { wd: WatchId, next: OsString },
    /// Not watched after an error: retried on [`Input::Retry`].
    Missing,
}

#[derive(Default)]
struct Sandbox {
    /// Its one watch: the deepest existing directory on its socket's way.
    wd: Option<WatchId>,
    state: State,
}

#[derive(Default)]
enum State {
    /// Waiting in `inner[..depth]` for `inner[depth]` to appear.
    Waiting { depth: usize },
    /// Our socket's identity, to tell it from one put in its place.
    Serving { identity: Identity },
    /// Socket (directory) gone, or could not be served: left until it goes.
    #[default]
    Retired,
}

pub(super) struct Watcher {
    pub(super) template: SocketTemplate,
    port: u32,
    max_sandboxes: usize,
    root: Root,
    /// The sandbox each sandbox watch is for.
    owners: HashMap<WatchId, String>,
    sandboxes: HashMap<String, Sandbox>,
    /// A sandbox was turned away at the cap: look again when a slot frees.
    turned_away: bool,
    cap_warned: Option<Instant>,
}

impl Watcher {
    pub(super) fn new(template: SocketTemplate, port: u32, max_sandboxes: usize) -> Watcher {
        Watcher {
            template,
            port,
            max_sandboxes,
            root: Root::Missing,
            owners: HashMap::new(),
            sandboxes: HashMap::new(),
            turned_away: false,
            cap_warned: None,
        }
    }

    pub(super) fn wants_retry(&self) -> bool {
        matches!(self.root, Root::Missing)
    }

    pub(super) fn step(&mut self, fx: &mut impl Effects, input: Input<'_>) {
        match input {
            Input::Event { watch, change } => self.handle(fx, watch, change),
            Input::Overflow => {
                tracing::warn!(
                    "too many sandbox directory events at once; looking at every sandbox again"
                );
                self.reconcile(fx);
            }
            Input::Retry => {
                if self.wants_retry() {
                    if let Err(e) = self.establish_root(fx) {
                        tracing::warn!(error = %e, "still cannot watch for sandboxes");
                    }
                }
            }
        }
    }

    fn unwatch(&mut self, fx: &mut impl Effects, wd: WatchId) {
        self.owners.remove(&wd);
        fx.unwatch(wd);
    }

    /// Watches (and serves) the root, or waits for it in its nearest ancestor.
    pub(super) fn establish_root(&mut self, fx: &mut impl Effects) -> Result<(), ListenError> {
        match std::mem::replace(&mut self.root, Root::Missing) {
            Root::Watching(wd) | Root::Waiting { wd, .. } => self.unwatch(fx, wd),
            Root::Missing => {}
        }
        let parent = self.template.parent.to_path_buf();
        let err = |dir: &Path, source| ListenError::WatchSandboxes {
            dir: dir.to_path_buf(),
            source,
        };
        // Bounded: a path created and removed in a loop still ends.
        for _ in 0..32 {
            match fx.watch(&parent, WatchKind::Root) {
                Ok(wd) => {
                    self.root = Root::Watching(wd);
                    tracing::info!(dir = %parent.display(), "watching for sandboxes");
                    self.scan(fx);
                    return Ok(());
                }
                Err(WatchError::Missing) => {}
                Err(WatchError::Failed(e)) => return Err(err(&parent, e)),
            }
            let Some((ancestor, next)) = fx.nearest_existing(&parent) else {
                continue;
            };
            match fx.watch(&ancestor, WatchKind::Wait) {
                Ok(wd) => {
                    if fx.is_dir(&ancestor.join(&next)) {
                        // Appeared meanwhile: go down.
                        self.unwatch(fx, wd);
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
                Err(WatchError::Missing) => {}
                Err(WatchError::Failed(e)) => return Err(err(&ancestor, e)),
            }
        }
        Err(err(
            &parent,
            io::Error::other("it kept appearing and disappearing"),
        ))
    }

    /// While running, an error is logged (and retried on [`Input::Retry`]).
    fn reestablish_root(&mut self, fx: &mut impl Effects) {
        if let Err(e) = self.establish_root(fx) {
            tracing::error!(error = %e, "cannot watch for sandboxes");
        }
    }

    /// Serves the sandbox directories already in the root.
    fn scan(&mut self, fx: &mut impl Effects) {
        let parent = &self.template.parent;
        let names = fx.subdirs(parent).inspect_err(|e| {
            tracing::warn!(dir = %parent.display(), error = %e, "listing sandboxes");
        });
        for name in names.into_iter().flatten() {
            self.appeared(fx, &name);
        }
    }

    fn handle(&mut self, fx: &mut impl Effects, key: WatchId, change: Change<'_>) {
        let gone = matches!(change, Change::Released | Change::Gone);
        match &self.root {
            Root::Watching(wd) if *wd == key => match change {
                _ if gone => self.lose_root(fx),
                Change::DirAppeared(name) => self.appeared(fx, name),
                Change::Removed { name, is_dir: true } => {
                    if let Some(id) = name.to_str() {
                        self.forget(fx, id);
                    }
                }
                _ => {}
            },
            Root::Waiting { wd, next } if *wd == key => {
                let next_appeared =
                    matches!(change, Change::DirAppeared(name) if next.as_os_str() == name);
                if gone || next_appeared {
                    self.reestablish_root(fx);
                }
            }
            _ => {
                let id = if matches!(change, Change::Released) {
                    self.owners.remove(&key)
                } else {
                    self.owners.get(&key).cloned()
                };
                // None: a watch already removed, its last events still queued.
                let Some(id) = id else {
                    return;
                };
                let Some(sb) = self.sandboxes.get(&id).filter(|sb| sb.wd == Some(key)) else {
                    return;
                };
                match &sb.state {
                    State::Waiting { depth } => {
                        let next = self.template.inner.get(*depth).map(OsStr::new);
                        let next_appeared =
                            matches!(change, Change::DirAppeared(name) if Some(name) == next);
                        if gone || next_appeared {
                            self.descend(fx, &id);
                        }
                    }
                    State::Serving { .. } => {
                        let ours = self.template.listen_name(self.port);
                        if gone {
                            self.retire(fx, &id, "its socket directory was removed");
                        } else if matches!(change, Change::Removed { name, .. } if name == OsStr::new(&ours))
                        {
                            self.retire(fx, &id, "its socket was removed");
                        }
                    }
                    State::Retired => {}
                }
            }
        }
    }

    fn appeared(&mut self, fx: &mut impl Effects, name: &OsStr) {
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
        // Its state is descend's to set.
        self.sandboxes.insert(id.to_owned(), Sandbox::default());
        self.descend(fx, id);
    }

    /// Watches a sandbox's deepest existing directory; serves it once the socket's is there.
    fn descend(&mut self, fx: &mut impl Effects, id: &str) {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return;
        };
        if let Some(wd) = sb.wd.take() {
            self.unwatch(fx, wd);
        }
        let last = self.template.inner.len();
        let top = self.template.parent.join(id);
        let (mut dir, mut depth) = (top.clone(), 0);
        let mut restarts = 0;
        loop {
            let kind = if depth == last {
                WatchKind::Serve
            } else {
                WatchKind::Wait
            };
            let wd = match fx.watch(&dir, kind) {
                Ok(wd) => {
                    self.owners.insert(wd, id.to_owned());
                    wd
                }
                Err(WatchError::Missing) => {
                    // Went as we looked: start again if the sandbox is there.
                    if depth > 0 && restarts < 3 && fx.is_real_dir(&top) {
                        restarts += 1;
                        (dir, depth) = (top.clone(), 0);
                        continue;
                    }
                    self.forget(fx, id);
                    return;
                }
                Err(WatchError::Failed(e)) => {
                    tracing::warn!(sandbox = id, dir = %dir.display(), error = %e, "cannot watch the sandbox directory; not serving it");
                    self.set_state(id, None, State::Retired);
                    return;
                }
            };
            if depth == last {
                self.serve(fx, id, wd);
                return;
            }
            let Some(component) = self.template.inner.get(depth) else {
                return;
            };
            let next = dir.join(component);
            if fx.is_real_dir(&next) {
                self.unwatch(fx, wd);
                (dir, depth) = (next, depth + 1);
                continue;
            }
            self.set_state(id, Some(wd), State::Waiting { depth });
            return;
        }
    }

    fn serve(&mut self, fx: &mut impl Effects, id: &str, wd: WatchId) {
        let path = self.template.listen_path(id, self.port);
        match fx.serve(id, &path) {
            Ok(identity) => {
                tracing::info!(sandbox = id, socket = %path.display(), "serving sandbox");
                return self.set_state(id, Some(wd), State::Serving { identity });
            }
            Err(ServeError::Bind(e)) => {
                tracing::warn!(sandbox = id, error = %e, "cannot listen for this sandbox's agent");
            }
            Err(ServeError::Refused) => tracing::warn!(
                sandbox = id,
                "the forwarder is not taking new sandboxes; not serving this one"
            ),
        }
        self.unwatch(fx, wd);
        self.set_state(id, None, State::Retired);
    }

    fn set_state(&mut self, id: &str, wd: Option<WatchId>, state: State) {
        if let Some(sb) = self.sandboxes.get_mut(id) {
            sb.wd = wd;
            sb.state = state;
        }
    }

    /// Unwatches `sb` and stops it if served; whether it was.
    fn end(&mut self, fx: &mut impl Effects, id: &str, sb: Sandbox) -> bool {
        if let Some(wd) = sb.wd {
            self.unwatch(fx, wd);
        }
        let served = matches!(sb.state, State::Serving { .. });
        if served {
            fx.stop(id);
        }
        served
    }

    /// Stops serving a sandbox whose directory is still there.
    fn retire(&mut self, fx: &mut impl Effects, id: &str, reason: &str) {
        let Some(old) = self.sandboxes.get_mut(id).map(std::mem::take) else {
            return;
        };
        if self.end(fx, id, old) {
            tracing::info!(sandbox = id, reason, "stopped serving sandbox");
        }
    }

    /// The sandbox directory is gone: stop serving and free its slot.
    fn forget(&mut self, fx: &mut impl Effects, id: &str) {
        let Some(sb) = self.sandboxes.remove(id) else {
            return;
        };
        if self.end(fx, id, sb) {
            tracing::info!(sandbox = id, "sandbox removed; stopped serving it");
        } else {
            tracing::debug!(sandbox = id, "sandbox removed");
        }
        if self.turned_away && matches!(self.root, Root::Watching(_)) {
            self.turned_away = false;
            self.scan(fx);
        }
    }

    fn lose_root(&mut self, fx: &mut impl Effects) {
        tracing::warn!(
            dir = %self.template.parent.display(),
            "the sandboxes' directory was removed; stopping every sandbox"
        );
        if let Root::Watching(wd) = std::mem::replace(&mut self.root, Root::Missing) {
            self.unwatch(fx, wd);
        }
        self.turned_away = false;
        let ids: Vec<String> = self.sandboxes.keys().cloned().collect();
        for id in ids {
            self.forget(fx, &id);
        }
        self.reestablish_root(fx);
    }

    /// After lost events: check every sandbox against the disk.
    fn reconcile(&mut self, fx: &mut impl Effects) {
        let ids: Vec<String> = self.sandboxes.keys().cloned().collect();
        for id in ids {
            if !fx.is_real_dir(&self.template.parent.join(&id)) {
                self.forget(fx, &id);
                continue;
            }
            let path = self.template.listen_path(&id, self.port);
            match self.sandboxes.get(&id).map(|s| &s.state) {
                Some(State::Waiting { .. }) => self.descend(fx, &id),
                Some(State::Serving { identity }) if fx.identity(&path) != Some(*identity) => {
                    self.retire(fx, &id, "its socket was removed");
                }
                _ => {}
            }
        }
        match self.root {
            Root::Watching(_) => self.scan(fx),
            _ => self.reestablish_root(fx),
        }
    }
}

#[cfg(test)]
mod tests;
