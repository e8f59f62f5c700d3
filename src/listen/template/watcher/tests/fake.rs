//! An in-memory stand-in for the watcher's effects, for its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::listen::template::effects::{
    Effects, Identity, ServeError, WatchError, WatchId, WatchKind,
};
use crate::listen::ListenError;

/// A file system of directories and sockets, watches that are only
/// recorded, and a record of what was served and stopped. Events are fed
/// by the tests, as inotify would report them.
#[derive(Default)]
pub(super) struct Fake {
    pub(super) dirs: BTreeSet<PathBuf>,
    pub(super) sockets: BTreeMap<PathBuf, Identity>,
    pub(super) watches: BTreeMap<WatchId, (PathBuf, WatchKind)>,
    pub(super) next_watch: i32,
    pub(super) next_inode: u64,
    /// Watching these fails as at the inotify watch limit.
    pub(super) unwatchable: BTreeSet<PathBuf>,
    /// Binding these fails.
    pub(super) unbindable: BTreeSet<PathBuf>,
    /// The async side takes no more sandboxes.
    pub(super) refusing: bool,
    pub(super) served: Vec<String>,
    pub(super) stopped: Vec<String>,
}

impl Fake {
    pub(super) fn with(dirs: &[&str]) -> Fake {
        let mut fx = Fake::default();
        for d in dirs {
            fx.mkdir(d);
        }
        fx
    }

    /// `mkdir -p`.
    pub(super) fn mkdir(&mut self, dir: &str) {
        for d in Path::new(dir).ancestors() {
            self.dirs.insert(d.to_path_buf());
        }
    }

    /// `rm -rf`; the watches stay until the watcher removes them (the
    /// kernel's own removal is the `Released` event, when a test feeds it).
    pub(super) fn remove(&mut self, dir: &str) {
        self.dirs.retain(|d| !d.starts_with(dir));
        self.sockets.retain(|s, _| !s.starts_with(dir));
    }

    /// The one watch on `dir`.
    pub(super) fn watch_on(&self, dir: &str) -> WatchId {
        let found: Vec<WatchId> = self
            .watches
            .iter()
            .filter(|(_, (d, _))| d == Path::new(dir))
            .map(|(w, _)| *w)
            .collect();
        assert_eq!(found.len(), 1, "watches on {dir}: {:?}", self.watched());
        found[0]
    }

    pub(super) fn watched(&self) -> Vec<(String, WatchKind)> {
        let mut w: Vec<_> = self
            .watches
            .values()
            .map(|(d, k)| (d.display().to_string(), *k))
            .collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    }

    pub(super) fn stopped_sorted(&self) -> Vec<String> {
        let mut s = self.stopped.clone();
        s.sort();
        s
    }
}

impl Effects for Fake {
    fn watch(&mut self, dir: &Path, kind: WatchKind) -> Result<WatchId, WatchError> {
        if self.unwatchable.contains(dir) {
            return Err(WatchError::Failed(io::Error::other("watch limit")));
        }
        if !self.dirs.contains(dir) {
            return Err(WatchError::Missing);
        }
        self.next_watch += 1;
        let id = WatchId(self.next_watch);
        self.watches.insert(id, (dir.to_path_buf(), kind));
        Ok(id)
    }

    fn unwatch(&mut self, watch: WatchId) {
        self.watches.remove(&watch);
    }

    fn serve(&mut self, id: &str, path: &Path) -> Result<Identity, ServeError> {
        let dir = path.parent().unwrap();
        if !self.dirs.contains(dir) || self.unbindable.contains(path) {
            return Err(ServeError::Bind(ListenError::MissingDirectory {
                dir: dir.to_path_buf(),
            }));
        }
        if self.refusing {
            return Err(ServeError::Refused);
        }
        self.next_inode += 1;
        let identity = (1, self.next_inode);
        self.sockets.insert(path.to_path_buf(), identity);
        self.served.push(id.to_owned());
        Ok(identity)
    }

    fn stop(&mut self, id: &str) {
        self.stopped.push(id.to_owned());
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.dirs.contains(path)
    }

    fn is_real_dir(&self, path: &Path) -> bool {
        self.dirs.contains(path)
    }

    fn nearest_existing(&self, path: &Path) -> Option<(PathBuf, OsString)> {
        let mut below = path;
        for dir in path.ancestors().skip(1) {
            if self.dirs.contains(dir) {
                return Some((dir.to_path_buf(), below.file_name()?.to_owned()));
            }
            below = dir;
        }
        None
    }

    fn subdirs(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        if !self.dirs.contains(dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(self
            .dirs
            .iter()
            .filter(|d| d.parent() == Some(dir))
            .filter_map(|d| d.file_name().map(OsStr::to_owned))
            .collect())
    }

    fn identity(&self, path: &Path) -> Option<Identity> {
        self.sockets.get(path).copied()
    }
}
