//! The boundary of the sandbox watcher's decisions: the inputs it is fed
//! and the effects it asks for. The driver provides both for real (inotify,
//! the disk, the channel to the async side); the watcher's tests provide
//! them by hand and with an in-memory fake.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::listen::ListenError;

/// Device and inode: tells our socket from one put in its place.
pub(super) type Identity = (u64, u64);

/// A watch, as the kernel numbers it (its inotify watch descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct WatchId(pub(super) i32);

/// What a watch is for, which decides what it reports.
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

/// Why a sandbox could not be served; either way it is not tried again
/// until its directory goes and comes back.
pub(super) enum ServeError {
    Bind(ListenError),
    /// The async side is not taking sandboxes (behind, or stopping).
    Refused,
}

/// What the watcher does to the world, and how it looks at it.
pub(super) trait Effects {
    fn watch(&mut self, dir: &Path, kind: WatchKind) -> Result<WatchId, WatchError>;
    /// Harmless on a watch the kernel already dropped.
    fn unwatch(&mut self, watch: WatchId);
    /// Binds `path` for sandbox `id` and hands the listener to the async
    /// side; returns the identity of the socket made.
    fn serve(&mut self, id: &str, path: &Path) -> Result<Identity, ServeError>;
    /// Stops a served sandbox: its listener closes, its connections drain.
    fn stop(&mut self, id: &str);

    /// A directory, or a symlink to one.
    fn is_dir(&self, path: &Path) -> bool;
    /// Not a symlink.
    fn is_real_dir(&self, path: &Path) -> bool;
    /// The nearest existing ancestor of `path`, and the name below it on the
    /// way to `path`.
    fn nearest_existing(&self, path: &Path) -> Option<(PathBuf, OsString)>;
    /// The names of the directories (not symlinks) in `dir`.
    fn subdirs(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    fn identity(&self, path: &Path) -> Option<Identity>;
}

pub(super) enum Input<'a> {
    /// Something happened on one of the watches.
    Event { watch: WatchId, change: Change<'a> },
    /// The kernel's event queue overflowed: events were lost.
    Overflow,
    /// A retry interval passed with the root unwatched.
    Retry,
}

/// An inotify event, reduced to what the decisions read.
pub(super) enum Change<'a> {
    /// The kernel dropped the watch (its directory went, or we removed it):
    /// its number may be reused.
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
