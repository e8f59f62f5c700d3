//! What `catch_unwind` cannot see: how much a case allocates, and an abort
//! (stack overflow, allocation failure) that kills the process outright.
//!
//! The allocator counts live bytes, their peak, and the largest single
//! request, so a case that turns a hostile length into a large allocation
//! is caught even when the allocation succeeds. The SIGABRT handler prints
//! the case and its input before the process dies, since an abort never
//! reaches the driver's panic report.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize, request: usize) {
    let live = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(live, Relaxed);
    LARGEST.fetch_max(request, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// only read for reporting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size(), new_size);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Allocation seen between [`AllocWindow::open`] and [`AllocWindow::close`].
/// The fuzz loop runs on one thread and nothing else in the process
/// allocates meanwhile, so the global counters are this case's.
pub struct AllocWindow {
    base: usize,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AllocUse {
    /// Highest live bytes above the level at `open`.
    pub peak: usize,
    /// Largest single allocation or reallocation.
    pub largest: usize,
}

impl AllocWindow {
    pub fn open() -> Self {
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        LARGEST.store(0, Relaxed);
        AllocWindow { base }
    }

    pub fn close(self) -> AllocUse {
        AllocUse {
            peak: PEAK.load(Relaxed).saturating_sub(self.base),
            largest: LARGEST.load(Relaxed),
        }
    }
}

// What the SIGABRT handler reports: set before each case is checked.
static SEED: AtomicU64 = AtomicU64::new(0);
static CASE: AtomicU64 = AtomicU64::new(u64::MAX);
static MAX_FRAME: AtomicUsize = AtomicUsize::new(0);
static INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);

/// Records the case about to run, for the abort handler. The input must
/// stay alive and unmodified until [`clear_case`].
pub fn set_case(seed: u64, case: u64, max_frame: Option<usize>, input: &[u8]) {
    SEED.store(seed, Relaxed);
    CASE.store(case, Relaxed);
    MAX_FRAME.store(max_frame.unwrap_or(0), Relaxed);
    INPUT_LEN.store(0, Relaxed);
    INPUT.store(input.as_ptr().cast_mut(), Relaxed);
    INPUT_LEN.store(input.len(), Relaxed);
}

pub fn clear_case() {
    INPUT_LEN.store(0, Relaxed);
    CASE.store(u64::MAX, Relaxed);
}

/// The corpus file named in the abort report, set once.
static CORPUS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Installs the SIGABRT handler (once per process is enough; installing
/// again is harmless).
pub fn install_abort_report(corpus_file: Option<&std::path::Path>) {
    if let Some(p) = corpus_file {
        let _ = CORPUS.set(p.as_os_str().as_encoded_bytes().to_vec());
    }
    // SAFETY: a plain sigaction with a handler that only calls write(2).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_abort as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGABRT, &sa, std::ptr::null_mut());
    }
}

/// Async-signal-safe: no allocation, no locks, only write(2) to stderr.
/// Returning lets abort(3) go on and end the process.
extern "C" fn on_abort(_sig: libc::c_int) {
    let case = CASE.load(Relaxed);
    if case == u64::MAX {
        return;
    }
    let len = INPUT_LEN.load(Relaxed);
    let input = INPUT.load(Relaxed);
    out(b"\nfuzz-decode: ABORT (stack overflow, allocation failure or abort) in case ");
    out_num(case);
    out(b" of seed ");
    out_num(SEED.load(Relaxed));
    let max_frame = MAX_FRAME.load(Relaxed);
    if max_frame != 0 {
        out(b", stream mode, max frame size ");
        out_num(max_frame as u64);
    }
    out(b"\nrerun: fuzz-decode --seed ");
    out_num(SEED.load(Relaxed));
    out(b" --case ");
    out_num(case);
    if let Some(c) = CORPUS.get() {
        out(b" --corpus ");
        out(c);
    }
    out(b"\ninput (");
    out_num(len as u64);
    out(b" bytes) as hex:\n");
    let mut buf = [0u8; 256];
    let mut i = 0;
    while i < len {
        let n = (len - i).min(buf.len() / 2);
        for k in 0..n {
            // SAFETY: set_case's contract keeps `input[..len]` alive.
            let b = unsafe { *input.add(i + k) };
            buf[2 * k] = HEX[usize::from(b >> 4)];
            buf[2 * k + 1] = HEX[usize::from(b & 0xf)];
        }
        out(&buf[..2 * n]);
        i += n;
    }
    out(b"\n");
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn out(bytes: &[u8]) {
    // SAFETY: write(2) on stderr with a valid buffer.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
    }
}

fn out_num(mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out(&buf[i..]);
}
