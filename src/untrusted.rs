//! Opening what a less privileged party may have planted: the spool (its
//! files are the unprivileged user's), Kata's configuration files.
//!
//! A symlink is followed only where root alone could have placed it (a
//! root-owned directory no group or other can write): followed by root,
//! any other would hand its target to whoever planted it.
//!
//! A file is opened without blocking (a FIFO would wait forever), must be
//! regular (checked on the open descriptor), and is read no further than
//! the caller's bound. Paths are resolved a component at a time relative to
//! descriptors, never by a path that could change under us.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

/// Symlinks followed in one resolution: the kernel's bound.
const MAX_LINKS: u32 = 40;

#[derive(Debug, thiserror::Error)]
pub(crate) enum UntrustedError {
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path} is a symlink where none is followed (or in a directory others than root can write)"
    )]
    SymlinkRefused { path: PathBuf },
    #[error("{path}: more than {MAX_LINKS} symlinks")]
    TooManyLinks { path: PathBuf },
    #[error("{path} is {kind}, not a regular file; not read")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("{path} is larger than {max} bytes; not read")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

impl UntrustedError {
    /// Refused for what the file is (not a failing call): no use retrying.
    pub(crate) fn is_refusal(&self) -> bool {
        !matches!(self, Self::Open { .. } | Self::Read { .. })
    }
}

/// What a file that is not regular is, for [`UntrustedError::NotRegular`].
fn irregular(st: &FileStat) -> Option<&'static str> {
    Some(
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => return None,
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFLNK => "a symlink",
            SFlag::S_IFIFO => "a FIFO",
            SFlag::S_IFSOCK => "a socket",
            SFlag::S_IFCHR => "a character device",
            SFlag::S_IFBLK => "a block device",
            _ => "of an unknown type",
        },
    )
}

fn is(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

fn root_alone_writes(dir: BorrowedFd<'_>) -> bool {
    fstat(dir).is_ok_and(|st| st.st_uid == 0 && st.st_mode & 0o022 == 0)
}

fn open_err(path: &Path) -> impl Fn(Errno) -> UntrustedError + '_ {
    move |e| UntrustedError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    pub(crate) fn open(path: &Path) -> Result<Dir, UntrustedError> {
        let start = if path.is_absolute() { "/" } else { "." };
        let fd = openat(AT_FDCWD, start, dir_flags(), Mode::empty()).map_err(open_err(path))?;
        let fd = walk(fd, path, path, &mut 0)?;
        let path = path.to_path_buf();
        Ok(Dir { fd, path })
    }

    /// The directory's descriptor (`O_PATH`: for `*at` calls and `fstat`).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn listing(&self) -> Result<nix::dir::Dir, UntrustedError> {
        nix::dir::Dir::openat(
            self.fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(open_err(&self.path))
    }

    pub(crate) fn entry(&self, name: &OsStr) -> Result<Entry, UntrustedError> {
        let whole = self.path.join(name);
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.fd, name, flags, Mode::empty()).map_err(open_err(&whole))?;
        let st = fstat(&fd).map_err(open_err(&whole))?;
        Ok(Entry { fd, st })
    }
}

/// An entry of a [`Dir`], held by `O_PATH | O_NOFOLLOW` (a device is not
/// opened): what is changed through it is what was looked at.
pub(crate) struct Entry {
    fd: OwnedFd,
    st: FileStat,
}

impl Entry {
    /// Regular, with no other name (not a hard link to someone's file).
    pub(crate) fn is_lone_regular_file(&self) -> bool {
        is(&self.st, SFlag::S_IFREG) && self.st.st_nlink == 1
    }

    pub(crate) fn uid(&self) -> u32 {
        self.st.st_uid
    }

    /// For `*at` calls with `AT_EMPTY_PATH`.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Never through a symlink: a directory swapped for one since it was looked at is refused.
fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Walks `rest` from the directory `at` (`whole`: for messages).
fn walk(
    mut at: OwnedFd,
    rest: &Path,
    whole: &Path,
    links: &mut u32,
) -> Result<OwnedFd, UntrustedError> {
    let mut todo: VecDeque<OsString> = components(rest);
    while let Some(name) = todo.pop_front() {
        // An absolute path's (or symlink target's) "/" starts again at root.
        let from = if name == "/" { AT_FDCWD } else { at.as_fd() };
        if name != ".." && name != "/" {
            let st = fstatat(&at, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(open_err(whole))?;
            if is(&st, SFlag::S_IFLNK) {
                let target = follow(at.as_fd(), &name, whole, links)?;
                todo = components(&target).into_iter().chain(todo).collect();
                continue;
            } else if !is(&st, SFlag::S_IFDIR) {
                return Err(UntrustedError::NotDirectory { path: whole.into() });
            }
        }
        at = openat(from, name.as_os_str(), dir_flags(), Mode::empty()).map_err(open_err(whole))?;
    }
    Ok(at)
}

/// The target of the symlink `name` in `dir`, if the rule lets it be followed.
fn follow(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    whole: &Path,
    links: &mut u32,
) -> Result<PathBuf, UntrustedError> {
    let path = whole.to_path_buf();
    if !root_alone_writes(dir) {
        return Err(UntrustedError::SymlinkRefused { path });
    }
    *links += 1;
    if *links > MAX_LINKS {
        return Err(UntrustedError::TooManyLinks { path });
    }
    readlinkat(dir, name)
        .map(PathBuf::from)
        .map_err(open_err(whole))
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir => Some("/".into()),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Whether the file itself may be a symlink: where root alone could have placed it, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    IfRootPlaced,
    Never,
}

/// The regular file at `path` (a bare name's parent "" is the current directory)
/// opened by the module's rule and `link`, with its size; refused over `max` bytes.
pub(crate) fn open_file(path: &Path, link: Link, max: u64) -> Result<(File, u64), UntrustedError> {
    let (parent, mut name) = split(path, path)?;
    let dir = Dir::open(parent)?;
    let whole = dir.path.join(&name);
    let (mut at, mut links) = (dir.fd, 0);
    loop {
        let st = fstatat(&at, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(open_err(&whole))?;
        if !is(&st, SFlag::S_IFLNK) {
            // Looked at before opening: a device is never even opened.
            if let Some(kind) = irregular(&st) {
                return Err(UntrustedError::NotRegular { path: whole, kind });
            }
            break;
        }
        if link == Link::Never {
            return Err(UntrustedError::SymlinkRefused { path: whole });
        }
        let target = follow(at.as_fd(), &name, &whole, &mut links)?;
        let (parent, file) = split(&target, &whole)?;
        at = walk(at, parent, &whole, &mut links)?;
        name = file;
    }
    let flags = OFlag::O_RDONLY
        | OFlag::O_NONBLOCK
        | OFlag::O_NOFOLLOW
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let fd = openat(&at, name.as_os_str(), flags, Mode::empty()).map_err(open_err(&whole))?;
    // What was opened is what is checked: it may have been swapped since.
    let st = fstat(&fd).map_err(open_err(&whole))?;
    if let Some(kind) = irregular(&st) {
        return Err(UntrustedError::NotRegular { path: whole, kind });
    }
    let len = u64::try_from(st.st_size).unwrap_or(0);
    if len > max {
        return Err(UntrustedError::TooLarge { path: whole, max });
    }
    Ok((File::from(fd), len))
}

fn split<'a>(target: &'a Path, whole: &Path) -> Result<(&'a Path, OsString), UntrustedError> {
    match (target.parent(), target.file_name()) {
        (Some(p), Some(f)) => Ok((p, f.to_owned())),
        _ => Err(UntrustedError::NotRegular {
            path: whole.to_path_buf(),
            kind: "a directory",
        }),
    }
}

/// Reads the regular file at `path`, refused if over `max` bytes (even grown while read).
pub(crate) fn read_file(path: &Path, link: Link, max: u64) -> Result<Vec<u8>, UntrustedError> {
    let (f, len) = open_file(path, link, max)?;
    let path = path.to_path_buf();
    let mut data = Vec::with_capacity(len as usize);
    if let Err(source) = f.take(max.saturating_add(1)).read_to_end(&mut data) {
        return Err(UntrustedError::Read { path, source });
    }
    if data.len() as u64 > max {
        return Err(UntrustedError::TooLarge { path, max });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn reads_a_regular_file_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_file(&f, Link::IfRootPlaced, 5).unwrap(), b"hello");
        assert!(matches!(
            read_file(&f, Link::IfRootPlaced, 4),
            Err(UntrustedError::TooLarge { .. })
        ));
    }

    /// A FIFO is refused at once (never waited on), and so is a device.
    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let t = std::time::Instant::now();
        let e = read_file(&fifo, Link::IfRootPlaced, 1 << 20).unwrap_err();
        assert!(
            matches!(e, UntrustedError::NotRegular { kind: "a FIFO", .. }),
            "{e}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.is_refusal());
        let e = read_file(Path::new("/dev/zero"), Link::IfRootPlaced, 1 << 20).unwrap_err();
        assert!(matches!(e, UntrustedError::NotRegular { .. }), "{e}");
    }

    /// An entry is looked at as it is: a symlink or a second name of a
    /// file is not a lone regular file.
    #[test]
    fn entries_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"f").unwrap();
        std::fs::write(dir.path().join("linked"), b"l").unwrap();
        std::fs::hard_link(dir.path().join("linked"), dir.path().join("again")).unwrap();
        symlink(dir.path().join("file"), dir.path().join("sym")).unwrap();
        mkfifo(&dir.path().join("fifo"));
        let d = Dir::open(dir.path()).unwrap();
        let lone = |n: &str| d.entry(OsStr::new(n)).unwrap().is_lone_regular_file();
        assert!(lone("file"));
        assert!(!lone("again") && !lone("linked") && !lone("sym") && !lone("fifo"));
    }

    /// A symlink is followed only in a directory root alone writes.
    #[test]
    fn follows_only_the_symlinks_root_alone_placed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"t").unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        symlink(&target, open.join("link")).unwrap();
        symlink("/dev/zero", open.join("zero")).unwrap();
        assert!(matches!(
            read_file(&open.join("link"), Link::IfRootPlaced, 10),
            Err(UntrustedError::SymlinkRefused { .. })
        ));
        assert!(matches!(
            read_file(&open.join("zero"), Link::IfRootPlaced, 10),
            Err(UntrustedError::SymlinkRefused { .. })
        ));
        // And not on the way to a file either.
        symlink(dir.path(), open.join("up")).unwrap();
        assert!(matches!(
            read_file(&open.join("up/target"), Link::IfRootPlaced, 10),
            Err(UntrustedError::SymlinkRefused { .. })
        ));
        assert!(matches!(
            Dir::open(&open.join("up")),
            Err(UntrustedError::SymlinkRefused { .. })
        ));
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink("../target", closed.join("link")).unwrap();
        let root = nix::unistd::getuid().is_root();
        match read_file(&closed.join("link"), Link::IfRootPlaced, 10) {
            Ok(d) => assert!(root && d == b"t"),
            Err(e) => assert!(!root, "{e}"),
        }
        assert!(matches!(
            read_file(&closed.join("link"), Link::Never, 10),
            Err(UntrustedError::SymlinkRefused { .. })
        ));
        // Followed, the target is held to the same rules.
        symlink(open.join("zero"), closed.join("chain")).unwrap();
        assert!(read_file(&closed.join("chain"), Link::IfRootPlaced, 10).is_err());
    }
}
