//! The sandbox watcher's inputs and the effects it asks for: the driver
//! provides them for real, the watcher's tests with an in-memory fake.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::listen::ListenError;

/// Device and inode: tells our socket from one put in its place.
pub(super) type Identity = (u64, u64);

/// An inotify watch descriptor's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct WatchId(pub(super) i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchKind {
    /// The root: sandbox directories appearing and going, or the root going.
    Root,
    /// A directory on the way down: the next one appearing, or this going.
    Wait,
    /// A served socket's directory: our socket or the directory going.
    Serve,
}

/// Why a watch could not be made; only `Missing` is part of normal churn.
pub(super) enum WatchError {
    /// The directory (or one above it) is not there (ENOENT, ENOTDIR).
    Missing,
    Failed(io::Error),
}

/// Not tried again, either way, until its directory goes and comes back.
pub(super) enum ServeError {
    Bind(ListenError),
    /// The async side is not taking sandboxes (behind, or stopping).
    Refused,
}

pub(super) trait Effects {
    fn watch(&mut self, dir: &Path, kind: WatchKind) -> Result<WatchId, WatchError>;
    /// Harmless on a watch the kernel already dropped.
    fn unwatch(&mut self, watch: WatchId);
    /// Binds `path` and hands the listener to the async side.
    fn serve(&mut self, id: &str, path: &Path) -> Result<Identity, ServeError>;
    /// Stops a served sandbox: its listener closes, its connections drain.
    fn stop(&mut self, id: &str);

    /// A directory, or a symlink to one.
    fn is_dir(&self, path: &Path) -> bool;
    /// Not a symlink.
    fn is_real_dir(&self, path: &Path) -> bool;
    /// The nearest existing ancestor of `path`, and the name below it.
    fn nearest_existing(&self, path: &Path) -> Option<(PathBuf, OsString)>;
    /// The names of the directories (not symlinks) in `dir`.
    fn subdirs(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    fn identity(&self, path: &Path) -> Option<Identity>;
}

pub(super) enum Input<'a> {
    Event {
        watch: WatchId,
        change: Change<'a>,
    },
    /// The kernel's event queue overflowed: events were lost.
    Overflow,
    /// A retry interval passed with the root unwatched.
    Retry,
}

pub(super) enum Change<'a> {
    /// The kernel dropped the watch: its number may be reused.
    Released,
    /// The watched directory itself went (deleted, moved, unmounted).
    Gone,
    /// A directory appeared in it (created or moved in).
    DirAppeared(&'a OsStr),
    /// An entry went from it (deleted or moved out).
    Removed { name: &'a OsStr, is_dir: bool },
    /// Anything else.
    Other,
}
