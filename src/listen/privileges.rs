//! Dropping root after binding: supplementary groups cleared, gid and uid
//! set (which clears every capability), cwd `/` so no directory stays open.
//! Removing the socket at exit needs root again, which a process that could
//! regain has not really dropped: a [`crate::janitor`] does it.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};
use nix::fcntl::AtFlags;
use nix::unistd::{chdir, fchownat, getuid, setgid, setgroups, setuid, Uid, User};

use super::ListenError;

/// Closes this process to others of its user (no ptrace, `/proc/<pid>/mem` or core dump).
/// The kernel does so on a user change, not for an upgrade's binaries, started by a
/// process already `--user`: any other process of that user (`nobody` is shared) could
/// take the spans, the janitor's pipe or the capability. Call first in `main`.
pub fn keep_from_same_user() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("warning: cannot make the process non-dumpable: {e}");
    }
}

pub(crate) fn is_root() -> bool {
    getuid().is_root()
}

fn denied(user: &str) -> impl Fn(String) -> ListenError + '_ {
    move |reason| ListenError::DropPrivileges {
        user: user.to_owned(),
        reason,
    }
}

/// Another root account is no drop at all and is refused.
fn lookup_user(user: &str) -> Result<User, ListenError> {
    let err = denied(user);
    let u = User::from_name(user)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no such user".into()))?;
    if u.uid == Uid::from_raw(0) {
        return Err(err("refusing to 'drop' to another root account".into()));
    }
    Ok(u)
}

/// Makes `dir` (the spool) `user`'s, so that it stays writable. As root.
/// That user (`nobody` is shared) may have planted anything there: so it is
/// reached by [`crate::untrusted`]'s rule and only the spool's own files
/// (regular, one link) are given over, through one non-following descriptor
/// (no symlink, hard link or swap gives away another file).
pub(crate) fn give_to_user(dir: &Path, user: &str) -> Result<(), ListenError> {
    let err = denied(user);
    let u = lookup_user(user)?;
    let give = |fd: std::os::fd::BorrowedFd<'_>| {
        fchownat(fd, "", Some(u.uid), Some(u.gid), AtFlags::AT_EMPTY_PATH)
    };
    let d = crate::untrusted::Dir::open(dir).map_err(|e| err(format!("spool directory: {e}")))?;
    give(d.fd()).map_err(|e| err(format!("chown {}: {e}", dir.display())))?;
    let mut listing = d.listing().map_err(|e| err(e.to_string()))?;
    for entry in listing.iter().flatten() {
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        if !crate::export::spool::is_spool_file(name) {
            continue;
        }
        let Ok(file) = d.entry(name) else {
            continue;
        };
        if !file.is_lone_regular_file() {
            tracing::warn!(dir = %dir.display(), file = ?name, "not a file the spool wrote (not a regular file, or linked elsewhere); left as it is");
        } else if file.uid() != u.uid.as_raw() {
            if let Err(e) = give(file.fd()) {
                tracing::warn!(dir = %dir.display(), file = ?name, error = %e, "could not hand a spool file to the forwarder's user");
            }
        }
    }
    Ok(())
}

pub(crate) const ON_THE_WATCHER: &str = "CAP_DAC_OVERRIDE, on the sandbox watcher thread only";

/// Switches the whole process to `user` (glibc and musl apply set*id to every
/// thread). As root. Every capability goes but `keep`, on this thread alone;
/// the bounding set holds nothing else.
pub(crate) fn drop_root(user: &str, keep: Option<caps::Capability>) -> Result<(), ListenError> {
    let err = denied(user);
    let u = lookup_user(user)?;
    if let Some(kept) = keep {
        // The bounding set first, while CAP_SETPCAP is still held.
        let bounding = caps::read(None, CapSet::Bounding).map_err(|e| err(e.to_string()))?;
        for cap in bounding.difference(&[kept].into()) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| err(e.to_string()))?;
        }
        // Keep the permitted set across the uid change, on this thread only.
        caps::securebits::set_keepcaps(true).map_err(|e| err(e.to_string()))?;
    }
    setgroups(&[]).map_err(|e| err(format!("setgroups: {e}")))?;
    setgid(u.gid).map_err(|e| err(format!("setgid: {e}")))?;
    setuid(u.uid).map_err(|e| err(format!("setuid: {e}")))?;
    if keep.is_some() {
        keep_on_this_thread(user, keep)?;
        caps::securebits::set_keepcaps(false).map_err(|e| err(e.to_string()))?;
    }
    chdir("/").map_err(|e| err(format!("chdir /: {e}")))?;
    let kept = keep.map_or("nothing", |_| ON_THE_WATCHER);
    let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
    tracing::info!(user, uid, gid, kept, "dropped root privileges");
    Ok(())
}

/// On the calling thread: keeps `cap` (effective, permitted) and nothing
/// else, passing nothing on. `user` is whom the process became.
pub(crate) fn keep_on_this_thread(
    user: &str,
    cap: Option<caps::Capability>,
) -> Result<(), ListenError> {
    let err = |e: caps::errors::CapsError| denied(user)(e.to_string());
    let kept: CapsHashSet = cap.into_iter().collect();
    // Kernels without ambient capabilities have none to clear.
    let _ = caps::clear(None, CapSet::Ambient);
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)
}

/// Runs `start` (a spawn, or an `exec`); not root, passes this thread's
/// CAP_DAC_OVERRIDE on through the ambient set, raised for the start alone. If
/// refused (logged), the successor serves what it is handed, binds nothing new.
pub(crate) fn passing_dac_override<T>(start: impl FnOnce() -> T) -> T {
    const DAC: Capability = Capability::CAP_DAC_OVERRIDE;
    let held = !is_root() && caps::has_cap(None, CapSet::Effective, DAC).unwrap_or(false);
    if !held {
        return start();
    }
    let raised = caps::raise(None, CapSet::Inheritable, DAC)
        .and_then(|()| caps::raise(None, CapSet::Ambient, DAC));
    if let Err(e) = &raised {
        tracing::error!(error = %e, "upgrade: cannot pass CAP_DAC_OVERRIDE on; the new binary will not serve new sandboxes");
    }
    let started = start();
    let _ = caps::clear(None, CapSet::Ambient);
    let _ = caps::drop(None, CapSet::Inheritable, DAC);
    started
}
