//! `--kata-host`: serving the plan [`crate::config::kata`] makes of the
//! host's Kata configurations (VSOCK, a [`TemplateListener`] per socket
//! template) as kata-deploy changes them: what is new starts, what nothing
//! asks for stops. An unreadable configuration stops the forwarder at start
//! (a plan missing a runtime class is worse than none); once running, it is
//! logged and keeps what it was served for (a half-written file mid-upgrade
//! never stops a class's tracing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchMask, Watches};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::template::{SandboxThread, TemplateListener};
use super::{ListenError, Listener, Served, Serving};
use crate::addr::SocketTemplate;
use crate::config::kata::{self, Plan, Status, Target};
use crate::config::KataHostConfig;
use crate::lifeline::{After, Lifeline, Next};
use crate::shutdown::Shutdown;

/// How long a burst of changes settles before the plan is read again:
/// well inside the second within which new sandboxes must be served.
const SETTLE: Duration = Duration::from_millis(100);

const CONFIG_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

const EVENT_BUFFER: usize = 16 << 10;

/// A target's listener, under a shutdown that stops it alone.
type Bound = (Shutdown, Served);

pub(crate) struct KataHostListener {
    cfg: KataHostConfig,
    thread: SandboxThread,
    shutdown: Shutdown,
    plan: Plan,
    /// What each file is served for (while unusable, what it last had).
    effective: BTreeMap<PathBuf, Vec<Target>>,
    /// Bound at start, served from `serve`.
    bound: Vec<(Target, Bound)>,
    watch: ConfigWatch,
}

impl KataHostListener {
    pub(crate) async fn start(
        cfg: &KataHostConfig,
        thread: SandboxThread,
        shutdown: &Shutdown,
    ) -> Result<KataHostListener, ListenError> {
        // Watching first: a file changed while the plan is read is seen.
        let watch = ConfigWatch::open(&cfg.sources)?;
        let plan = kata::plan(&cfg.sources, cfg.port);
        plan.log();
        if let Some(bad) = plan.errors().next() {
            return Err(ListenError::ReadKataConfig(bad.skipped.join("; ")));
        }
        let effective = plan
            .configs
            .iter()
            .map(|c| (c.file.clone(), c.serves.clone()));
        let mut me = KataHostListener {
            cfg: cfg.clone(),
            thread,
            shutdown: shutdown.clone(),
            effective: effective.collect(),
            plan,
            bound: Vec::new(),
            watch,
        };
        for target in me.plan.listeners.clone() {
            let bound = me.bind(&target).await?;
            me.bound.push((target, bound));
        }
        if me.plan.listeners.is_empty() {
            tracing::warn!(
                root = %cfg.sources.root.display(),
                "kata-host: no Kata configuration asks for anything to serve yet; watching for one"
            );
        }
        Ok(me)
    }

    pub(crate) fn describe(&self) -> String {
        let each: Vec<String> = self.bound.iter().map(|(_, (_, s))| s.describe()).collect();
        format!(
            "kata-host (configurations under {}): [{}]",
            self.cfg.sources.root.display(),
            each.join(", ")
        )
    }

    async fn bind(&self, target: &Target) -> Result<Bound, ListenError> {
        let stop = self.shutdown.child();
        let (cfg, thread) = (&self.cfg, &self.thread);
        let served = match target {
            Target::Vsock => {
                let inherited = thread.inherited.as_ref();
                let (l, adopted) = super::inherited::vsock(inherited, cfg.cid, cfg.port)?;
                Served::Listener(Listener::Vsock(l), adopted)
            }
            Target::Template { template } => {
                let t: SocketTemplate = template.parse().map_err(ListenError::ReadKataConfig)?;
                let l = TemplateListener::start_on(thread, t, cfg.port, cfg.max_sandboxes, &stop);
                Served::Template(l.await?)
            }
        };
        tracing::info!(listener = %target, "kata-host: serving");
        Ok((stop, served))
    }

    /// Follows the plan until shutdown, then waits for every listener.
    /// Paused, nothing starts or stops until the outcome.
    pub(crate) async fn serve(mut self, ctx: Serving, mut life: Lifeline) {
        let (mut running, tasks) = (BTreeMap::new(), TaskTracker::new());
        for (target, bound) in std::mem::take(&mut self.bound) {
            running.insert(target, spawn(&tasks, bound, &ctx, &life));
        }
        let mut due: Option<Instant> = None;
        // Without configuration events the lifeline is still answered.
        let mut following = true;
        loop {
            tokio::select! {
                biased;
                next = life.next() => {
                    if next == Next::Drain || life.pause_quiet().await != After::Resume {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    due = None;
                    self.replan(&mut running, &tasks, &ctx, &life).await;
                }
                changed = self.watch.next(), if following => match changed {
                    Some(true) => {
                        due.get_or_insert_with(|| Instant::now() + SETTLE);
                    }
                    Some(false) => {}
                    None => {
                        tracing::error!("kata-host: configuration events ended; changes are no longer followed");
                        following = false;
                    }
                },
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    async fn replan(
        &mut self,
        running: &mut BTreeMap<Target, Shutdown>,
        tasks: &TaskTracker,
        ctx: &Serving,
        life: &Lifeline,
    ) {
        let new = kata::plan(&self.cfg.sources, self.cfg.port);
        if new.configs != self.plan.configs {
            new.log();
        }
        let mut effective = BTreeMap::new();
        for c in &new.configs {
            let serves = if c.status == Status::Error {
                let kept = self.effective.get(&c.file).cloned().unwrap_or_default();
                if !kept.is_empty() {
                    tracing::warn!(
                        config = %c.file.display(),
                        "kata configuration unusable: keeping what it was served for until it is fixed"
                    );
                }
                kept
            } else {
                c.serves.clone()
            };
            effective.insert(c.file.clone(), serves);
        }
        // Bounded as the plan is: the first distinct listeners, up to the cap.
        let mut wanted: BTreeSet<Target> = BTreeSet::new();
        for t in effective.values().flatten() {
            if wanted.len() < kata::MAX_LISTENERS || wanted.contains(t) {
                wanted.insert(t.clone());
            }
        }
        let (kept, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(running)
            .into_iter()
            .partition(|(t, _)| wanted.contains(t));
        *running = kept;
        for (target, stop) in gone {
            tracing::info!(listener = %target, "kata-host: no longer serving (no configuration asks for it)");
            stop.stop();
        }
        wanted.retain(|t| !running.contains_key(t));
        for target in wanted {
            match self.bind(&target).await {
                Ok(bound) => {
                    running.insert(target, spawn(tasks, bound, ctx, life));
                }
                Err(e) => {
                    tracing::error!(listener = %target, error = %e, "kata-host: cannot serve");
                }
            }
        }
        self.plan = new;
        self.effective = effective;
    }
}

fn spawn(tasks: &TaskTracker, bound: Bound, ctx: &Serving, life: &Lifeline) -> Shutdown {
    let (stop, served) = bound;
    // Taken before the task runs: a pause from now on waits for it.
    tasks.spawn(served.serve(ctx.clone(), life.under(stop.clone())));
    stop
}

/// inotify on the configuration directories (or, missing, their ancestors).
struct ConfigWatch {
    events: EventStream<Vec<u8>>,
    watches: Watches,
    /// The directories that matter, under the root.
    wanted: Vec<PathBuf>,
    dirs: HashMap<i32, PathBuf>,
}

impl ConfigWatch {
    fn open(sources: &kata::Sources) -> Result<ConfigWatch, ListenError> {
        let err = |source| ListenError::WatchKataConfigs {
            dir: sources.root.clone(),
            source,
        };
        let events = Inotify::init()
            .and_then(|i| i.into_event_stream(vec![0u8; EVENT_BUFFER]))
            .map_err(err)?;
        let wanted = sources
            .watched_dirs()
            .iter()
            .map(|d| sources.under_root(d))
            .collect();
        let mut me = ConfigWatch {
            watches: events.watches(),
            events,
            wanted,
            dirs: HashMap::new(),
        };
        me.rewatch().map_err(err)?;
        Ok(me)
    }

    fn rewatch(&mut self) -> io::Result<()> {
        self.dirs.clear();
        let mut first_error = None;
        for want in &self.wanted {
            let Some(dir) = want.ancestors().find(|d| d.is_dir()) else {
                continue;
            };
            match self.watches.add(dir, CONFIG_MASK) {
                Ok(wd) => {
                    self.dirs
                        .insert(wd.get_watch_descriptor_id(), dir.to_path_buf());
                }
                // Gone meanwhile: its parent's next event looks again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            if self.dirs.is_empty() {
                return Err(e);
            }
            tracing::warn!(error = %e, "kata-host: cannot watch some configuration directories");
        }
        Ok(())
    }

    /// The next event: whether it can change the plan.
    async fn next(&mut self) -> Option<bool> {
        let ev = match self.events.next().await? {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(error = %e, "kata-host: reading configuration events");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Some(false);
            }
        };
        if ev.mask.contains(EventMask::Q_OVERFLOW) {
            let _ = self.rewatch();
            return Some(true);
        }
        let dir = self.dirs.get(&ev.wd.get_watch_descriptor_id()).cloned();
        let gone = EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF;
        let structural = ev.mask.intersects(gone | EventMask::ISDIR);
        let relevant = match (&dir, ev.name.as_deref()) {
            (Some(dir), Some(name)) => self.matters(dir, name),
            // The watched directory itself changed.
            (Some(_), None) => true,
            // A watch already replaced.
            (None, _) => false,
        };
        if structural && (relevant || dir.is_none()) {
            if let Err(e) = self.rewatch() {
                tracing::warn!(error = %e, "kata-host: cannot watch the configuration directories");
            }
        }
        Some(relevant)
    }

    /// On the way to a wanted directory, or a `.toml` in one.
    fn matters(&self, dir: &Path, name: &OsStr) -> bool {
        let path = dir.join(name);
        self.wanted.iter().any(|w| {
            w.starts_with(&path)
                || (w == dir && name.to_str().is_some_and(|n| n.ends_with(".toml")))
        })
    }
}
