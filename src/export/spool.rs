//! The durable spool: batches that cannot be exported now, kept on disk.
//!
//! The spans of a container start happen once; a collector restart must not
//! lose them, and neither may a forwarder restart in the middle of a
//! collector outage. So when the export queue fills while the collector is
//! away, and at shutdown, encoded export requests are written here, and a
//! replayer sends them, oldest first, once the collector answers again
//! (also after a restart of the forwarder), removing each file once sent.
//!
//! # File format
//!
//! One file per batch, `<seq>.batch` (20-digit sequence number, so names
//! sort by age), written as `<seq>.tmp`, synced, then renamed, so a crash
//! leaves either a whole file or a temporary one that the next start
//! deletes:
//!
//! ```text
//! magic "KTFSPOOL" | version u32 LE | spans u32 LE | body length u64 LE | crc32 u32 LE | body
//! ```
//!
//! The body is the protobuf `ExportTraceServiceRequest`, exactly as it would
//! have been sent. A file whose header, length or checksum is wrong is
//! renamed to `<seq>.damaged` and skipped: set aside for a human, never
//! fatal, never blocking the files behind it. The spool's total size is
//! bounded; a batch that does not fit is not written (and the caller keeps
//! the backpressure instead).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::otlp::EncodedRequest;
use crate::stats::Stats;

const MAGIC: &[u8; 8] = b"KTFSPOOL";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("creating spool directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading spool directory {dir}: {source}")]
    ScanDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing spool file {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading spool file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool file {path} is damaged ({reason}); set aside as {aside}")]
    Damaged {
        path: PathBuf,
        aside: PathBuf,
        reason: &'static str,
    },
}

/// A batch read back from the spool.
#[derive(Debug)]
pub(crate) struct Spooled {
    pub spans: u32,
    pub body: EncodedRequest,
}

#[derive(Debug, Default)]
struct State {
    /// Files present, by sequence number, with their sizes.
    files: BTreeMap<u64, u64>,
    bytes: u64,
    next_seq: u64,
}

/// The spool. It keeps its own gauges (`spool_bytes`, `spool_files`) up to
/// date with every change, under the same lock as the change.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    stats: Arc<Stats>,
}

/// The state, locked; publishes the gauges when let go.
struct Locked<'a> {
    state: MutexGuard<'a, State>,
    stats: &'a Stats,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.stats.spool_bytes.set(self.state.bytes);
        self.stats.spool_files.set(self.state.files.len() as u64);
    }
}

fn seq_of(path: &Path, ext: &str) -> Option<u64> {
    if path.extension()? != ext {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

impl Spool {
    /// Creates the spool's directory if it is missing.
    pub(crate) fn create_dir(dir: &Path) -> Result<(), SpoolError> {
        fs::create_dir_all(dir).map_err(|source| SpoolError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })
    }

    /// Opens (creating if needed) the spool in `dir`, taking stock of the
    /// batches a previous run left and deleting half-written ones.
    pub(crate) fn open(dir: &Path, max_bytes: u64, stats: Arc<Stats>) -> Result<Spool, SpoolError> {
        Self::create_dir(dir)?;
        let scan_err = |source| SpoolError::ScanDir {
            dir: dir.to_path_buf(),
            source,
        };
        let mut state = State::default();
        for entry in fs::read_dir(dir).map_err(scan_err)? {
            let path = entry.map_err(scan_err)?.path();
            if let Some(seq) = seq_of(&path, "batch") {
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                state.files.insert(seq, len);
                state.bytes += len;
                state.next_seq = state.next_seq.max(seq + 1);
            } else if let Some(seq) = seq_of(&path, "tmp") {
                let _ = fs::remove_file(&path);
                state.next_seq = state.next_seq.max(seq + 1);
            } else if let Some(seq) = seq_of(&path, "damaged") {
                state.next_seq = state.next_seq.max(seq + 1);
            }
        }
        if !state.files.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                batches = state.files.len(),
                bytes = state.bytes,
                "spool holds batches from an earlier run; they will be sent"
            );
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            stats,
        };
        drop(spool.lock());
        Ok(spool)
    }

    fn lock(&self) -> Locked<'_> {
        // A panic elsewhere while holding the lock leaves plain data behind,
        // still consistent enough to keep spooling.
        Locked {
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            stats: &self.stats,
        }
    }

    /// Bytes on disk now (the `spool_bytes` gauge, for the tests).
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Batches on disk now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().files.len()
    }

    /// Writes one encoded batch. Returns `Ok(false)` when it does not fit
    /// within the size bound.
    pub(crate) fn write(&self, body: &EncodedRequest, spans: u32) -> Result<bool, SpoolError> {
        let size = (HEADER_LEN + body.len()) as u64;
        let seq = {
            let mut st = self.lock();
            if st.bytes + size > self.max_bytes {
                return Ok(false);
            }
            // Reserve the space now so concurrent writers cannot overshoot.
            st.bytes += size;
            st.next_seq += 1;
            st.next_seq - 1
        };
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let path = self.dir.join(format!("{seq:020}.batch"));
        let res = (|| {
            let f = fs::File::create(&tmp)?;
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&VERSION.to_le_bytes());
            header.extend_from_slice(&spans.to_le_bytes());
            header.extend_from_slice(&(body.len() as u64).to_le_bytes());
            let mut crc = crc32fast::Hasher::new();
            for c in body.chunks() {
                crc.update(c);
            }
            header.extend_from_slice(&crc.finalize().to_le_bytes());
            let mut f = std::io::BufWriter::with_capacity(256 * 1024, f);
            f.write_all(&header)?;
            for c in body.chunks() {
                f.write_all(c)?;
            }
            let f = f
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // Make the rename itself durable.
            fs::File::open(&self.dir)?.sync_all()
        })();
        let mut st = self.lock();
        match res {
            Ok(()) => {
                st.files.insert(seq, size);
                Ok(true)
            }
            Err(source) => {
                st.bytes -= size;
                drop(st);
                let _ = fs::remove_file(&tmp);
                Err(SpoolError::WriteFile { path, source })
            }
        }
    }

    /// The oldest batch's sequence number.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.lock().files.keys().next().copied()
    }

    /// Reads a batch back, setting it aside if it is damaged.
    pub(crate) fn read(&self, seq: u64) -> Result<Spooled, SpoolError> {
        let path = self.dir.join(format!("{seq:020}.batch"));
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(source) => {
                // Gone or unreadable: forget it rather than retry forever.
                self.forget(seq);
                return Err(SpoolError::ReadFile { path, source });
            }
        };
        match parse(&data) {
            Ok((spans, body)) => Ok(Spooled {
                spans,
                body: Bytes::copy_from_slice(body).into(),
            }),
            Err(reason) => {
                let aside = self.dir.join(format!("{seq:020}.damaged"));
                let _ = fs::rename(&path, &aside);
                self.forget(seq);
                Err(SpoolError::Damaged {
                    path,
                    aside,
                    reason,
                })
            }
        }
    }

    /// Removes a batch that has been delivered.
    pub(crate) fn remove(&self, seq: u64) {
        let path = self.dir.join(format!("{seq:020}.batch"));
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove delivered spool file");
            }
        }
        self.forget(seq);
    }

    fn forget(&self, seq: u64) {
        let mut st = self.lock();
        if let Some(size) = st.files.remove(&seq) {
            st.bytes -= size;
        }
    }
}

fn parse(data: &[u8]) -> Result<(u32, &[u8]), &'static str> {
    let header = data.get(..HEADER_LEN).ok_or("shorter than its header")?;
    let (magic, rest) = header.split_at(8);
    if magic != MAGIC {
        return Err("bad magic");
    }
    let u32_at = |b: &[u8]| b.try_into().map(u32::from_le_bytes).unwrap_or(u32::MAX);
    let (version, rest) = rest.split_at(4);
    if u32_at(version) != VERSION {
        return Err("unknown version");
    }
    let (spans, rest) = rest.split_at(4);
    let (len, crc) = rest.split_at(8);
    let len = len.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
    let body = data.get(HEADER_LEN..).unwrap_or_default();
    if body.len() as u64 != len {
        return Err("length does not match");
    }
    if crc32fast::hash(body) != u32_at(crc) {
        return Err("checksum does not match");
    }
    Ok((u32_at(spans), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Spool {
        fn open_for_test(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
            Spool::open(dir, max_bytes, Arc::default())
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
        let b = spool.read(seq).unwrap();
        assert_eq!((b.spans, &b.body.to_bytes()[..]), (3, &b"first"[..]));
        spool.remove(seq);
        let b = spool.read(spool.oldest().unwrap()).unwrap();
        assert_eq!((b.spans, &b.body.to_bytes()[..]), (4, &b"second"[..]));
        // New writes continue the sequence after a reopen.
        assert!(spool.write(&req(b"third"), 1).unwrap());
        assert!(spool.oldest().unwrap() < spool.lock().next_seq);
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
                Ok(b) => {
                    good.push(b.body.to_bytes());
                    spool.remove(seq);
                }
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
}
