//! The durable spool: batches that cannot be exported now (the queue
//! filling while the collector is away; shutdown), kept on disk so that no
//! collector or forwarder restart loses them (a container start's spans
//! happen once). The replayer sends them, oldest first, removing each sent.
//!
//! One file per batch, `<seq>.batch` (20 digits: names sort by age),
//! written as a temporary file, synced, then named (a crash leaves a whole
//! file, or a temporary one, deleted later):
//!
//! ```text
//! magic "KTFSPOOL" | version u32 LE | spans u32 LE | body length u64 LE | crc32 u32 LE | body
//! ```
//!
//! The body is the `ExportTraceServiceRequest` as it would have been sent.
//! A file with a bad header, length or checksum is renamed `<seq>.damaged`
//! (for a human; never fatal). A batch over the size bound is not written
//! (the caller keeps the backpressure).
//!
//! During a hand-over two processes share the directory: a temporary file
//! is `<seq>.<token>.tmp` (our token), named by a hard link, which never
//! replaces the other's batch (the next number is tried); a batch is
//! claimed by renaming it `<seq>.<token>.sending` (the loser of two renames
//! leaves it) and given back as `.batch` if the send fails. An idle
//! replayer rescans for the other's batches; there (and at start) a dead
//! process's temporary file or claim, older than a live one would leave
//! it, is deleted or given back (to be sent at least once).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::otlp::EncodedRequest;
use crate::stats::Stats;
use crate::untrusted::{Link, UntrustedError};

const MAGIC: &[u8; 8] = b"KTFSPOOL";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// Past this age (since its last rename or write), a temporary file or a
/// claim is a dead process's: a live one holds either for moments.
const ABANDONED: Duration = Duration::from_secs(600);
/// Sequence numbers tried when the other process takes the one reserved.
const LINK_TRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("spool file {path} is damaged ({reason}); set aside as {aside}")]
    Damaged {
        path: PathBuf,
        aside: PathBuf,
        reason: &'static str,
    },
}

#[derive(Debug, Default)]
struct State {
    /// Files present, by sequence number: their sizes and spans.
    files: BTreeMap<u64, (u64, u32)>,
    bytes: u64,
    spans: u64,
    next_seq: u64,
}

/// Where the spool is and what it holds, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Depth {
    pub dir: PathBuf,
    pub batches: u64,
    pub spans: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// It keeps its gauges (`spool_bytes`, `spool_files`) up to date.
pub(crate) struct Spool {
    pub(crate) dir: PathBuf,
    pub(crate) max_bytes: u64,
    state: Mutex<State>,
    stats: Arc<Stats>,
    /// This process's part of its temporary files' and claims' names.
    token: String,
    /// [`ABANDONED`], but in tests.
    abandoned_after: Duration,
}

/// What a file in the spool directory is, by its name: `<seq>.<what>`.
enum Entry {
    Batch,
    Damaged,
    /// Being written, by the token's process (none: an old `<seq>.tmp`).
    Tmp(Option<String>),
    /// Being sent, by the token's process.
    Sending(String),
}

impl Entry {
    fn of(name: &std::ffi::OsStr) -> Option<(u64, Entry)> {
        let mut parts = name.to_str()?.split('.');
        let seq = parts.next()?.parse().ok()?;
        let entry = match (parts.next()?, parts.next(), parts.next()) {
            ("batch", None, None) => Entry::Batch,
            ("damaged", None, None) => Entry::Damaged,
            ("tmp", None, None) => Entry::Tmp(None),
            (token, Some("tmp"), None) => Entry::Tmp(Some(token.to_owned())),
            (token, Some("sending"), None) => Entry::Sending(token.to_owned()),
            _ => return None,
        };
        Some((seq, entry))
    }
}

pub(crate) fn is_spool_file(name: &std::ffi::OsStr) -> bool {
    Entry::of(name).is_some()
}

fn abandoned(path: &Path, after: Duration) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).is_ok_and(|md| {
        // ctime: a rename (a claim) changes it, where mtime stays the content's.
        let changed = std::time::UNIX_EPOCH + Duration::from_secs(md.ctime().max(0) as u64);
        changed.elapsed().is_ok_and(|age| age >= after)
    })
}

fn failed(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { what, path, source }
}

/// A token no other process has: our pid (unique in a PID namespace) and
/// the time (apart across namespaces).
fn process_token() -> String {
    let nanos = std::time::UNIX_EPOCH
        .elapsed()
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

impl Spool {
    pub(crate) fn create_dir(dir: &Path) -> Result<(), SpoolError> {
        fs::create_dir_all(dir).map_err(failed("creating spool directory", dir))
    }

    /// Opens (creating) the spool in `dir`, taking stock of what is there.
    pub(crate) fn open(dir: &Path, max_bytes: u64, stats: Arc<Stats>) -> Result<Spool, SpoolError> {
        Self::create_dir(dir)?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State::default()),
            stats,
            token: process_token(),
            abandoned_after: ABANDONED,
        };
        spool
            .rescan()
            .map_err(failed("reading spool directory", dir))?;
        let Depth { batches, bytes, .. } = spool.depth();
        if batches > 0 {
            tracing::info!(
                dir = %dir.display(),
                batches,
                bytes,
                "spool holds batches from an earlier run; they will be sent"
            );
        }
        Ok(spool)
    }

    /// Takes stock of batches not known yet (another process's, an earlier
    /// run's) and of what a dead process left; how many batches it found.
    pub(crate) fn rescan(&self) -> io::Result<usize> {
        let mut found = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some((seq, what)) = Entry::of(&entry.file_name()) else {
                continue;
            };
            let path = entry.path();
            let known = self.with(|st| {
                st.next_seq = st.next_seq.max(seq + 1);
                st.files.contains_key(&seq)
            });
            match what {
                Entry::Batch if !known => found += usize::from(self.found(seq, &path)),
                // Ours are being written; another's, until abandoned, may be.
                Entry::Tmp(token)
                    if token.as_deref() != Some(&*self.token)
                        && (token.is_none() || abandoned(&path, self.abandoned_after)) =>
                {
                    let _ = fs::remove_file(&path);
                }
                Entry::Sending(token)
                    if token != self.token && abandoned(&path, self.abandoned_after) =>
                {
                    tracing::warn!(path = %path.display(), "a spooled batch was being sent by a process that is gone; it will be sent again");
                    let batch = self.batch_path(seq);
                    if fs::rename(&path, &batch).is_ok() && self.found(seq, &batch) {
                        found += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// Counts a batch found on disk; whether it was new.
    fn found(&self, seq: u64, path: &Path) -> bool {
        let size = fs::symlink_metadata(path).map_or(0, |m| m.len());
        let spans = self.spans_in(path).unwrap_or(0);
        self.with(|st| {
            let new = st.files.insert(seq, (size, spans)).is_none();
            if new {
                st.bytes += size;
                st.spans += u64::from(spans);
            }
            new
        })
    }

    /// The spans a batch's header says it holds; opened as [`Spool::read`]
    /// does (it may be planted), only its header read.
    fn spans_in(&self, path: &Path) -> Option<u32> {
        let (mut f, _) = crate::untrusted::open_file(path, Link::Never, self.max_bytes).ok()?;
        let mut h = [0u8; HEADER_LEN];
        io::Read::read_exact(&mut f, &mut h).ok()?;
        h.starts_with(MAGIC)
            .then(|| field(&h, 12).map(u32::from_le_bytes))?
    }

    pub(crate) fn depth(&self) -> Depth {
        self.with(|st| Depth {
            dir: self.dir.clone(),
            batches: st.files.len() as u64,
            spans: st.spans,
            bytes: st.bytes,
            max_bytes: self.max_bytes,
        })
    }

    fn batch_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.batch"))
    }

    fn claim_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{}.sending", self.token))
    }

    /// Runs `f` on the locked state, publishing the gauges under the lock.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = super::lock(&self.state);
        let r = f(&mut st);
        self.stats.spool_bytes.set(st.bytes);
        self.stats.spool_files.set(st.files.len() as u64);
        r
    }

    /// Writes one encoded batch; `Ok(false)` when it does not fit the bound.
    pub(crate) fn write(&self, body: &EncodedRequest, spans: u32) -> Result<bool, SpoolError> {
        let size = (HEADER_LEN + body.len()) as u64;
        // Reserve the space now so concurrent writers cannot overshoot.
        let Some(seq) = self.with(|st| {
            (st.bytes + size <= self.max_bytes).then(|| {
                st.bytes += size;
                st.next_seq += 1;
                st.next_seq - 1
            })
        }) else {
            return Ok(false);
        };
        let tmp = self.dir.join(format!("{seq:020}.{}.tmp", self.token));
        let mut crc = crc32fast::Hasher::new();
        body.chunks().iter().for_each(|c| crc.update(c));
        let header = [
            &MAGIC[..],
            &VERSION.to_le_bytes(),
            &spans.to_le_bytes(),
            &(body.len() as u64).to_le_bytes(),
            &crc.finalize().to_le_bytes(),
        ]
        .concat();
        let res = (|| {
            let f = fs::File::create(&tmp)?;
            let mut f = std::io::BufWriter::with_capacity(256 * 1024, f);
            f.write_all(&header)?;
            body.chunks().iter().try_for_each(|c| f.write_all(c))?;
            f.flush()?;
            f.get_ref().sync_all()
        })();
        // Under the lock, so that a rescan sees it not yet or already counted.
        let published = self.with(|st| {
            let published = res.and_then(|()| {
                let mut seq = seq;
                for _ in 0..LINK_TRIES {
                    match publish(&tmp, &self.batch_path(seq)) {
                        Ok(()) => return Ok(seq),
                        // Another process's batch: take the next number.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            seq = st.next_seq.max(seq + 1);
                            st.next_seq = seq + 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(io::Error::other("no free sequence number"))
            });
            match published {
                Ok(seq) => {
                    st.files.insert(seq, (size, spans));
                    st.spans += u64::from(spans);
                }
                Err(_) => st.bytes -= size,
            }
            published
        });
        let _ = fs::remove_file(&tmp);
        published.map_err(failed("writing spool file", &self.batch_path(seq)))?;
        if let Err(e) = fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "syncing the spool directory");
        }
        Ok(true)
    }

    pub(crate) fn oldest(&self) -> Option<u64> {
        self.with(|st| st.files.keys().next().copied())
    }

    /// Claims a batch and reads back its spans and body, setting it aside if
    /// damaged. `Ok(None)`: another process claimed it first (and sends it).
    pub(crate) fn read(&self, seq: u64) -> Result<Option<(u32, EncodedRequest)>, SpoolError> {
        let (path, claim) = (self.batch_path(seq), self.claim_path(seq));
        // Gone (claimed), or unusable: forgotten, not retried forever.
        if let Err(e) = fs::rename(&path, &claim) {
            self.forget(seq);
            return match e.kind() {
                io::ErrorKind::NotFound => Ok(None),
                _ => Err(failed("reading spool file", &path)(e)),
            };
        }
        // A FIFO, a symlink (to `/dev/zero`) or a huge file the forwarder's
        // user planted is not waited on, followed or read past the bound.
        let read = match crate::untrusted::read_file(&claim, Link::Never, self.max_bytes) {
            Ok(d) => parse(&d).map(|(spans, body)| (spans, Bytes::copy_from_slice(body).into())),
            Err(UntrustedError::TooLarge { .. }) => Err("larger than the spool's size bound"),
            Err(UntrustedError::SymlinkRefused { .. }) => Err("a symlink"),
            Err(e) if e.is_refusal() => Err("not a regular file"),
            Err(e) => {
                self.forget(seq);
                return Err(failed("reading spool file", &path)(io::Error::other(e)));
            }
        };
        match read {
            Ok(batch) => Ok(Some(batch)),
            Err(reason) => {
                let aside = self.dir.join(format!("{seq:020}.damaged"));
                let _ = fs::rename(&claim, &aside);
                self.forget(seq);
                Err(SpoolError::Damaged {
                    path,
                    aside,
                    reason,
                })
            }
        }
    }

    /// Removes a batch that has been delivered (claimed by [`read`](Self::read),
    /// or else as written).
    pub(crate) fn remove(&self, seq: u64) {
        let removed = fs::remove_file(self.claim_path(seq)).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => fs::remove_file(self.batch_path(seq)),
            _ => Err(e),
        });
        if let Some(e) = removed
            .err()
            .filter(|e| e.kind() != io::ErrorKind::NotFound)
        {
            tracing::warn!(seq, error = %e, "could not remove delivered spool file");
        }
        self.forget(seq);
    }

    fn forget(&self, seq: u64) {
        self.with(|st| {
            if let Some((size, spans)) = st.files.remove(&seq) {
                st.bytes -= size;
                st.spans -= u64::from(spans);
            }
        })
    }
}

/// A batch this process claimed ([`Spool::read`]): given back when dropped
/// unsettled (also by a replayer aborted mid-send), outliving no process.
pub(crate) struct Claimed<'a>(pub(crate) &'a Spool, pub(crate) u64);

impl Claimed<'_> {
    /// Delivered (or refused for good): removed, and not given back.
    pub(crate) fn settle(self) {
        self.0.remove(self.1);
        std::mem::forget(self);
    }
}

/// Gives the batch back, to be sent later (by whoever claims it).
impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let Claimed(spool, seq) = *self;
        if let Err(e) = fs::rename(spool.claim_path(seq), spool.batch_path(seq)) {
            tracing::warn!(seq, error = %e, "could not give a spooled batch back");
            spool.forget(seq);
        }
    }
}

/// Gives `tmp` the name `path`, never replacing a file there (another
/// process's batch): a hard link, where the file system has them.
fn publish(tmp: &Path, path: &Path) -> io::Result<()> {
    match fs::hard_link(tmp, path) {
        // No hard links (FAT, some FUSE): a rename, checked first (a race
        // needs the other process to take this very number in between).
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            if fs::symlink_metadata(path).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(tmp, path)
        }
        r => r,
    }
}

fn parse(data: &[u8]) -> Result<(u32, &[u8]), &'static str> {
    let (h, body) = data
        .split_at_checked(HEADER_LEN)
        .ok_or("shorter than its header")?;
    let u32_at = |at| field(h, at).map_or(u32::MAX, u32::from_le_bytes);
    if !h.starts_with(MAGIC) {
        return Err("bad magic");
    }
    if u32_at(8) != VERSION {
        return Err("unknown version");
    }
    if field(h, 16).map(u64::from_le_bytes) != Some(body.len() as u64) {
        return Err("length does not match");
    }
    if crc32fast::hash(body) != u32_at(24) {
        return Err("checksum does not match");
    }
    Ok((u32_at(12), body))
}

/// The `N` bytes of a header at `at`.
fn field<const N: usize>(h: &[u8], at: usize) -> Option<[u8; N]> {
    h.get(at..at + N)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Spool {
        fn open_for_test(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
            Spool::open(dir, max_bytes, Arc::default())
        }

        fn bytes(&self) -> u64 {
            self.with(|st| st.bytes)
        }

        fn len(&self) -> usize {
            self.with(|st| st.files.len())
        }
    }

    #[test]
    fn keeps_its_gauges() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(dir.path(), 1 << 20, Arc::clone(&stats)).unwrap();
        assert!(spool.write(&req(b"0123456789"), 1).unwrap());
        assert_eq!(stats.spool_files.get(), 1);
        assert_eq!(stats.spool_bytes.get(), (HEADER_LEN + 10) as u64);
        spool.remove(spool.oldest().unwrap());
        assert_eq!((stats.spool_files.get(), stats.spool_bytes.get()), (0, 0));
    }

    #[test]
    fn knows_its_depth_in_spans_also_for_files_it_finds() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert!(spool.write(&req(b"first"), 3).unwrap());
        assert!(spool.write(&req(b"second"), 4).unwrap());
        let want = Depth {
            dir: dir.path().into(),
            batches: 2,
            spans: 7,
            bytes: (2 * HEADER_LEN + 11) as u64,
            max_bytes: 1 << 20,
        };
        assert_eq!(spool.depth(), want);
        // Found by another process (a restart): read from the headers, and
        // a planted file that is no batch counts no spans.
        std::fs::write(dir.path().join(format!("{:020}.batch", 99)), b"junk").unwrap();
        let again = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            again.depth(),
            Depth {
                batches: 3,
                bytes: want.bytes + 4,
                ..want
            }
        );
        again.remove(again.oldest().unwrap());
        assert_eq!((again.depth().batches, again.depth().spans), (2, 4));
    }

    fn req(b: &[u8]) -> EncodedRequest {
        EncodedRequest::from(Bytes::copy_from_slice(b))
    }

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        // A request in pieces is stored as one body.
        let pieces = EncodedRequest::from_chunks(vec![
            Bytes::from_static(b"fi"),
            Bytes::from_static(b"rst"),
        ]);
        assert!(spool.write(&pieces, 3).unwrap());
        assert!(spool.write(&req(b"second"), 4).unwrap());
        drop(spool);
        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 2);
        let seq = spool.oldest().unwrap();
        let b = spool.read(seq).unwrap().unwrap();
        assert_eq!((b.0, &b.1.to_bytes()[..]), (3, &b"first"[..]));
        spool.remove(seq);
        let b = spool.read(spool.oldest().unwrap()).unwrap().unwrap();
        assert_eq!((b.0, &b.1.to_bytes()[..]), (4, &b"second"[..]));
        // New writes continue the sequence after a reopen.
        assert!(spool.write(&req(b"third"), 1).unwrap());
        assert!(spool.oldest().unwrap() < spool.with(|st| st.next_seq));
    }

    #[test]
    fn is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_for_test(dir.path(), (HEADER_LEN * 2 + 20) as u64).unwrap();
        assert!(spool.write(&req(&[1; 10]), 1).unwrap());
        assert!(spool.write(&req(&[2; 10]), 1).unwrap());
        assert!(!spool.write(&req(&[3; 1]), 1).unwrap(), "over the bound");
        spool.remove(spool.oldest().unwrap());
        assert!(spool.write(&req(&[3; 1]), 1).unwrap(), "room again");
    }

    #[test]
    fn damaged_files_are_set_aside_and_the_rest_still_flows() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        spool.write(&req(b"good one"), 1).unwrap();
        spool.write(&req(b"good two"), 2).unwrap();
        let first = spool.oldest().unwrap();
        let path = dir.path().join(format!("{first:020}.batch"));
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&path, data).unwrap();
        // Garbage and a half-written file from a crash.
        fs::write(dir.path().join("00000000000000000099.batch"), b"junk").unwrap();
        fs::write(dir.path().join("00000000000000000100.tmp"), b"half").unwrap();

        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert!(!dir.path().join("00000000000000000100.tmp").exists());
        let mut good = Vec::new();
        let mut damaged = 0;
        while let Some(seq) = spool.oldest() {
            match spool.read(seq) {
                Ok(Some(b)) => {
                    good.push(b.1.to_bytes());
                    spool.remove(seq);
                }
                Ok(None) => panic!("nobody else claims here"),
                Err(SpoolError::Damaged { aside, .. }) => {
                    assert!(aside.exists());
                    damaged += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(good, vec![Bytes::from_static(b"good two")]);
        assert_eq!(damaged, 2);
        assert_eq!(spool.bytes(), 0);
    }

    /// What anything running as the forwarder's user can plant in the
    /// spool under a batch's name: a FIFO, a symlink, a file larger than
    /// the spool's bound. Each is set aside as damaged at once (never waited
    /// on, followed, or read whole), and the batch behind them still flows.
    #[test]
    fn planted_files_are_set_aside_without_blocking_or_following() {
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 16;
        let spool = Spool::open_for_test(dir.path(), max).unwrap();
        spool.write(&req(b"real"), 1).unwrap();
        let real = spool.batch_path(spool.oldest().unwrap());
        let name = |seq: u64| dir.path().join(format!("{seq:020}.batch"));
        let keep = dir.path().join("elsewhere");
        fs::rename(&real, &keep).unwrap();
        nix::unistd::mkfifo(&name(1), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // A valid batch, but through a symlink: not followed.
        std::os::unix::fs::symlink(&keep, name(2)).unwrap();
        let big = fs::File::create(name(3)).unwrap();
        big.set_len(max * 4).unwrap();
        fs::copy(&keep, name(4)).unwrap();

        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let spool = Spool::open_for_test(&d, max).unwrap();
            let mut got = Vec::new();
            let mut damaged = 0;
            while let Some(seq) = spool.oldest() {
                match spool.read(seq) {
                    Ok(Some(b)) => {
                        got.push(b.1.to_bytes());
                        spool.remove(seq);
                    }
                    Err(SpoolError::Damaged { .. }) => damaged += 1,
                    other => panic!("{other:?}"),
                }
            }
            let _ = tx.send((got, damaged, spool.bytes()));
        });
        let (got, damaged, bytes) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader is stuck (a FIFO waited on?)");
        assert_eq!(got, vec![Bytes::from_static(b"real")]);
        assert_eq!((damaged, bytes), (3, 0));
        for seq in 1..=3 {
            assert!(dir.path().join(format!("{seq:020}.damaged")).exists());
        }
        assert!(keep.exists(), "the symlink's target is untouched");
    }

    /// Everything `spool` holds, each batch claimed, read and removed.
    fn drain(spool: &Spool) -> Vec<Bytes> {
        let mut got = Vec::new();
        while let Some(seq) = spool.oldest() {
            if let Some(b) = spool.read(seq).unwrap() {
                Claimed(spool, seq).settle();
                got.push(b.1.to_bytes());
            }
        }
        got
    }

    /// Two processes on one spool (a hand-over's overlap): what both write
    /// is kept whole (their sequence numbers collide from the start), and
    /// what both replay is sent once, by one of them.
    #[test]
    fn two_processes_share_a_spool_without_loss_or_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let a = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        let b = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert_ne!(a.token, b.token);
        let written: Vec<Bytes> = (0..200)
            .map(|i| Bytes::from(format!("batch {i}")))
            .collect();
        std::thread::scope(|s| {
            for (spool, half) in [(&a, &written[..100]), (&b, &written[100..])] {
                s.spawn(move || {
                    for w in half {
                        assert!(spool.write(&req(w), 1).unwrap());
                    }
                });
            }
        });
        let batches = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(batches, 200, "no batch replaced another");
        // Each learns of the other's batches by looking again.
        assert_eq!(a.rescan().unwrap(), 100);
        assert_eq!(b.rescan().unwrap(), 100);
        let (got_a, got_b) = std::thread::scope(|s| {
            let ha = s.spawn(|| drain(&a));
            let hb = s.spawn(|| drain(&b));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        let mut got: Vec<Bytes> = got_a.into_iter().chain(got_b).collect();
        got.sort();
        let mut want = written.clone();
        want.sort();
        assert_eq!(got, want, "every batch sent once");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!((a.bytes(), b.bytes()), (0, 0));
    }

    /// A claim not settled (the send failed, or the replayer was stopped)
    /// is given back; one left by a process that died is given back once
    /// abandoned, and a half-written file of one is deleted.
    #[test]
    fn claims_are_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        spool.write(&req(b"one"), 1).unwrap();
        let seq = spool.oldest().unwrap();
        assert!(spool.read(seq).unwrap().is_some());
        assert!(!spool.batch_path(seq).exists(), "claimed");
        drop(Claimed(&spool, seq));
        assert!(spool.batch_path(seq).exists(), "given back");

        // A dead process's claim and temporary file.
        fs::rename(
            spool.batch_path(seq),
            dir.path().join(format!("{seq:020}.dead.sending")),
        )
        .unwrap();
        fs::write(dir.path().join("00000000000000000007.dead.tmp"), b"half").unwrap();
        let mut later = Spool::open_for_test(dir.path(), 1 << 20).unwrap();
        assert_eq!(later.len(), 0, "not yet abandoned: maybe still being sent");
        later.abandoned_after = Duration::ZERO;
        assert_eq!(later.rescan().unwrap(), 1);
        assert!(!dir.path().join("00000000000000000007.dead.tmp").exists());
        assert_eq!(drain(&later), vec![Bytes::from_static(b"one")]);
    }
}
