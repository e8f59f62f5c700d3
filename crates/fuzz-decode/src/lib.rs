//! A fuzz driver for the forwarder's guest-facing code, on the stable
//! toolchain: random and mutated real agent frames through
//! `wire::Decoder::decode`, and every span that decodes through what the
//! forwarder does with it (the connection's direct protobuf encoder, held
//! byte for byte to the struct path, the export request, record splitting,
//! OTLP JSON); concatenated frames with hostile length headers through the
//! frame codec, driven the way the connection's read loop drives it.
//!
//! The guest is untrusted, so the property is "no input panics, aborts or
//! allocates out of proportion", plus consistency checks that a panic-free
//! but wrong path would break (see [`check`]). Seeds are real frames from
//! the real OpenTelemetry SDKs (see [`corpus`]); mutations are in
//! [`mutate`]. Case `k` of seed `s` is generated from `(s, k)` and the
//! corpus alone, so `--seed s --case k --corpus FILE` reruns it without the
//! cases before it (fresh SDK frames carry random ids and times, so the
//! binary saves each run's corpus); a failure is also reported with its
//! exact input, for `--replay`.
//!
//! The same [`run`] serves the `fuzz-decode` binary (a million cases and
//! more, in release) and a short run under `cargo test`.

pub mod check;
pub mod corpus;
pub mod guard;
pub mod mutate;
pub mod rng;

use std::any::Any;
use std::backtrace::Backtrace;
use std::fmt;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_trace_forwarder::wire::HEADER_LEN;

use check::{Prime, Sink, StreamCase, Tally};
use corpus::Corpus;
use rng::Rng;

#[global_allocator]
static ALLOC: guard::Counting = guard::Counting;

/// Stack of the thread that runs the cases: the forwarder decodes on
/// tokio worker threads, whose default stack is 2 MiB, so deep input must
/// be harmless within that.
const CASE_STACK: usize = 2 * 1024 * 1024;

/// Frame size limits used by stream cases: around the real frames' sizes
/// (a few hundred bytes to 64 KiB) and the forwarder's small and default
/// settings.
const MAX_FRAMES: &[usize] = &[64, 256, 1024, 4096, 16 * 1024, 64 * 1024, 1024 * 1024];

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Cases `first_case .. first_case + cases` run.
    pub first_case: u64,
    pub cases: u64,
    /// Share of stream cases, in percent; the rest are payload cases.
    pub stream_percent: u32,
    /// How often to print progress on stderr; `None` for never.
    pub progress: Option<Duration>,
    /// Where a failing input is written.
    pub crash_dir: PathBuf,
    /// Where the corpus of this run was saved, for rerun instructions.
    pub corpus_file: Option<PathBuf>,
}

impl Options {
    pub fn new(seed: u64, cases: u64) -> Self {
        Options {
            seed,
            first_case: 0,
            cases,
            stream_percent: 20,
            progress: None,
            crash_dir: std::env::temp_dir(),
            corpus_file: None,
        }
    }
}

/// A seed from the clock, for runs that are not told one.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Rng::new(t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)).next_u64()
}

/// A generated case.
#[derive(Debug, Clone)]
pub enum Case {
    Payload {
        input: Vec<u8>,
        prime: Prime,
        /// An unmutated valid seed: decoding it must succeed.
        must_decode: bool,
    },
    Stream(StreamCase),
}

impl Case {
    pub fn input(&self) -> &[u8] {
        match self {
            Case::Payload { input, .. } => input,
            Case::Stream(s) => &s.bytes,
        }
    }

    fn max_frame(&self) -> Option<usize> {
        match self {
            Case::Payload { .. } => None,
            Case::Stream(s) => Some(s.max_frame),
        }
    }
}

/// Case `case` of a run seeded with `seed`.
pub fn generate(corpus: &Corpus, seed: u64, case: u64, stream_percent: u32) -> Case {
    let mut rng = Rng::for_case(seed, case);
    if rng.chance(stream_percent) {
        return Case::Stream(generate_stream(corpus, &mut rng));
    }
    let entry = rng.pick(&corpus.entries);
    let mut input = entry.payload.clone();
    // Now and then a seed unmutated: real frames must keep decoding, in
    // whatever state the connection's decoder is.
    let must_decode = entry.valid && rng.chance(2);
    if !must_decode {
        mutate::mutate(&mut input, &mut rng, corpus);
    }
    let prime = *rng.pick(&Prime::ALL);
    Case::Payload {
        input,
        prime,
        must_decode,
    }
}

fn generate_stream(corpus: &Corpus, rng: &mut Rng) -> StreamCase {
    let mut payloads = Vec::new();
    for _ in 0..rng.range(1, 6) {
        let mut payload = corpus.pick_other(rng).to_vec();
        if rng.chance(50) {
            mutate::mutate(&mut payload, rng, corpus);
        }
        payloads.push(payload);
    }
    // Either a fixed limit, or one right at the size of the largest frame so
    // that frames land on both sides of it.
    let largest = payloads.iter().map(Vec::len).max().unwrap_or(0);
    let max_frame = if rng.chance(40) {
        *rng.pick(MAX_FRAMES)
    } else {
        match rng.below(4) {
            0 => largest.saturating_sub(1),
            1 => largest,
            2 => largest + 1,
            _ => largest + rng.below(4096),
        }
    };
    let mut bytes = Vec::new();
    for payload in payloads {
        let len = payload.len() as u64;
        let header = if rng.chance(75) {
            len
        } else {
            match rng.below(4) {
                0 => max_frame as u64,
                1 => max_frame as u64 + 1,
                2 => (max_frame as u64).saturating_sub(1),
                _ => mutate::hostile_len(rng, payload.len(), payload.len(), len),
            }
        };
        bytes.extend_from_slice(&header.to_be_bytes());
        bytes.extend_from_slice(&payload);
    }
    match rng.below(10) {
        // Cut short anywhere: inside a header, inside data, right after a
        // header.
        0 | 1 => {
            let at = rng.below(bytes.len() + 1);
            bytes.truncate(at);
        }
        // A partial header at the end.
        2 => {
            let n = rng.range(1, HEADER_LEN - 1);
            bytes.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        // A hostile header at the end, with a little data or none.
        3 => {
            let claim = mutate::hostile_len(rng, bytes.len(), 0, max_frame as u64);
            bytes.extend_from_slice(&claim.to_be_bytes());
            let n = rng.below(16);
            bytes.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        _ => {}
    }
    StreamCase {
        bytes,
        max_frame,
        chunk_seed: rng.next_u64(),
    }
}

/// Memory one payload case may use: serde preallocates at most 1 MiB per
/// claimed sequence and the model nests sequences three deep (events,
/// their attributes, array values), and a decoded span's OTLP form is a
/// bounded multiple of its payload (one `AnyValue` per one-byte bool, and
/// the checks hold a few copies at once). A length that was believed would
/// need far more.
pub fn payload_alloc_bound(input_len: usize) -> usize {
    4 * 1024 * 1024 + 512 * input_len
}

/// The outcome of a run that found nothing.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seed: u64,
    pub cases: u64,
    pub elapsed: Duration,
    pub tally: Tally,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.cases as f64 / self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "{} cases in {:.1} s ({:.0} cases/s), seed {}, no panic",
            self.cases,
            self.elapsed.as_secs_f64(),
            rate,
            self.seed
        )?;
        write!(f, "{}", self.tally)
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  payload cases {}, stream cases {}; payloads decoded {}: ok {}",
            self.payload_cases,
            self.stream_cases,
            self.decoded(),
            self.ok
        )?;
        for (kind, n) in &self.errors {
            write!(f, ", {kind} {n}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  streams: {} frames; ended clean {}, oversized {}, trailing bytes {}",
            self.stream_frames, self.stream_clean, self.stream_oversized, self.stream_trailing,
        )?;
        writeln!(
            f,
            "  read from a lost place: {} streams, a whole frame found in {}",
            self.lost_streams, self.lost_found,
        )?;
        writeln!(
            f,
            "  read buffer: at most {}% of its bound; largest {} bytes (max frame size {})",
            self.max_buffer_pct, self.max_buffer.0, self.max_buffer.1
        )?;
        write!(
            f,
            "  memory: largest case peak {} bytes (input {} bytes), largest single allocation {} bytes",
            self.max_case_peak.0, self.max_case_peak.1, self.max_single_alloc
        )
    }
}

/// A case that panicked (or broke a check, which panics).
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub case: u64,
    pub mode: String,
    /// For a stream case: the max frame size and chunk seed to replay with.
    pub stream: Option<(usize, u64)>,
    pub message: String,
    pub input: Vec<u8>,
    pub crash_file: Option<PathBuf>,
    pub corpus_file: Option<PathBuf>,
    pub backtrace: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "PANIC in case {} of seed {} ({})",
            self.case, self.seed, self.mode
        )?;
        writeln!(f, "message: {}", self.message)?;
        match &self.corpus_file {
            Some(c) => writeln!(
                f,
                "rerun: fuzz-decode --seed {} --case {} --corpus {}",
                self.seed,
                self.case,
                c.display()
            )?,
            // Without the same corpus the case is regenerated from fresh
            // SDK frames: the same mutations, on slightly different bytes.
            None => writeln!(
                f,
                "rerun (same mutations, fresh corpus): fuzz-decode --seed {} --case {}",
                self.seed, self.case
            )?,
        }
        if let Some(p) = &self.crash_file {
            let stream = match self.stream {
                Some((max, chunk_seed)) => {
                    format!(" --stream --max-frame-size {max} --chunk-seed {chunk_seed}")
                }
                None => String::new(),
            };
            writeln!(
                f,
                "exact input: fuzz-decode --replay {}{stream}",
                p.display()
            )?;
        }
        writeln!(f, "input ({} bytes) as hex:", self.input.len())?;
        writeln!(f, "{}", hex(&self.input))?;
        write!(f, "backtrace:\n{}", self.backtrace)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The message and backtrace of the last panic on the case thread, kept by
/// the panic hook for the failure report.
type PanicNote = Arc<Mutex<Option<(String, String)>>>;

/// Runs the cases on a thread with the forwarder's worker stack size.
/// Returns the first failure, if any: later cases are not run.
pub fn run(corpus: Arc<Corpus>, opts: Options) -> Result<Summary, Box<Failure>> {
    guard::install_abort_report(opts.corpus_file.as_deref());
    let note: PanicNote = Arc::default();
    let previous: Arc<dyn Fn(&panic::PanicHookInfo<'_>) + Send + Sync> = panic::take_hook().into();
    {
        let note = Arc::clone(&note);
        let previous = Arc::clone(&previous);
        panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("fuzz-decode") {
                let location = info
                    .location()
                    .map(|l| format!(" at {l}"))
                    .unwrap_or_default();
                let msg = format!("{}{location}", payload_text(info.payload()));
                let bt = Backtrace::force_capture().to_string();
                *note.lock().unwrap_or_else(|e| e.into_inner()) = Some((msg, bt));
            } else {
                previous(info);
            }
        }));
    }
    let result = std::thread::Builder::new()
        .name("fuzz-decode".into())
        .stack_size(CASE_STACK)
        .spawn({
            let note = Arc::clone(&note);
            move || run_cases(&corpus, &opts, &note)
        })
        .expect("spawn the case thread")
        .join()
        .unwrap_or_else(|e| panic::resume_unwind(e));
    panic::set_hook(Box::new(move |info| previous(info)));
    result
}

fn payload_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

fn run_cases(corpus: &Corpus, opts: &Options, note: &PanicNote) -> Result<Summary, Box<Failure>> {
    let mut sink = Sink::default();
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut last_report = start;
    for (i, case_no) in (opts.first_case..opts.first_case.saturating_add(opts.cases)).enumerate() {
        let case =
            match panic::catch_unwind(|| generate(corpus, opts.seed, case_no, opts.stream_percent))
            {
                Ok(c) => c,
                Err(_) => {
                    let (message, backtrace) = take_note(note);
                    return Err(Box::new(Failure {
                        seed: opts.seed,
                        case: case_no,
                        mode: "generating the case: a fuzz-decode bug".into(),
                        stream: None,
                        message,
                        input: Vec::new(),
                        crash_file: None,
                        corpus_file: opts.corpus_file.clone(),
                        backtrace,
                    }));
                }
            };
        guard::set_case(opts.seed, case_no, case.max_frame(), case.input());
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            run_case(&case, corpus, &mut sink, &mut tally);
        }));
        guard::clear_case();
        if outcome.is_err() {
            let (message, backtrace) = take_note(note);
            return Err(Box::new(failure(opts, case_no, &case, message, backtrace)));
        }
        if let Some(every) = opts.progress {
            if i % 1024 == 0 && last_report.elapsed() >= every {
                last_report = Instant::now();
                let done = i as u64 + 1;
                let rate = done as f64 / start.elapsed().as_secs_f64();
                eprintln!(
                    "[fuzz-decode] {done}/{} cases, {rate:.0} cases/s\n{tally}",
                    opts.cases
                );
            }
        }
    }
    Ok(Summary {
        seed: opts.seed,
        cases: opts.cases,
        elapsed: start.elapsed(),
        tally,
    })
}

/// Runs one case's checks, memory included (what `catch_unwind` guards).
pub fn run_case(case: &Case, corpus: &Corpus, sink: &mut Sink, tally: &mut Tally) {
    let window = guard::AllocWindow::open();
    match case {
        Case::Payload {
            input,
            prime,
            must_decode,
        } => {
            tally.payload_cases += 1;
            let mut decoder = prime.decoder(corpus);
            match check::payload(input, &mut decoder, sink, tally) {
                Some(rec) => check::export(&[rec], 1, &mut Rng::new(input.len() as u64)),
                None => assert!(!must_decode, "a valid seed did not decode"),
            }
        }
        Case::Stream(s) => {
            tally.stream_cases += 1;
            check::stream(s, corpus, sink, tally);
            let cut = (s.chunk_seed as usize) % (s.bytes.len() + 1);
            check::lost_stream(s, cut, sink, tally);
        }
    }
    note_alloc(case, window.close(), tally);
}

fn note_alloc(case: &Case, used: guard::AllocUse, tally: &mut Tally) {
    let len = case.input().len();
    let bound = match case {
        // The stream's spans are held until it ends, as a connection's
        // record holds a read's; the read buffer is bounded separately.
        Case::Stream(s) => payload_alloc_bound(len) + check::buffer_bound(s.max_frame),
        Case::Payload { .. } => payload_alloc_bound(len),
    };
    assert!(
        used.peak <= bound,
        "case allocated {} bytes at its peak (largest single allocation {}) for {len} input bytes; bound {bound}",
        used.peak,
        used.largest
    );
    if used.peak > tally.max_case_peak.0 {
        tally.max_case_peak = (used.peak, len);
    }
    tally.max_single_alloc = tally.max_single_alloc.max(used.largest);
}

fn take_note(note: &PanicNote) -> (String, String) {
    note.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_else(|| ("(no panic message recorded)".into(), String::new()))
}

fn failure(
    opts: &Options,
    case_no: u64,
    case: &Case,
    message: String,
    backtrace: String,
) -> Failure {
    let (mode, name) = match case {
        Case::Payload { prime, .. } => (
            format!("payload, decoder primed {prime:?}"),
            format!("fuzz-decode-crash-{}-{case_no}.bin", opts.seed),
        ),
        Case::Stream(s) => (
            format!(
                "stream, max frame size {}, chunk seed {}",
                s.max_frame, s.chunk_seed
            ),
            format!("fuzz-decode-crash-{}-{case_no}.stream", opts.seed),
        ),
    };
    let path = opts.crash_dir.join(name);
    let crash_file = std::fs::write(&path, case.input()).ok().map(|_| path);
    let stream = match case {
        Case::Payload { .. } => None,
        Case::Stream(s) => Some((s.max_frame, s.chunk_seed)),
    };
    Failure {
        seed: opts.seed,
        case: case_no,
        mode,
        stream,
        message,
        input: case.input().to_vec(),
        crash_file,
        corpus_file: opts.corpus_file.clone(),
        backtrace,
    }
}

/// Reruns one exact input (from a crash file) under every decoder state,
/// or as a stream under several chunkings. Panics as the failing case did.
pub fn replay(corpus: &Corpus, input: &[u8], stream: Option<(usize, Option<u64>)>) -> Tally {
    let mut sink = Sink::default();
    let mut tally = Tally::default();
    match stream {
        None => {
            for prime in Prime::ALL {
                eprintln!("replaying as a payload, decoder primed {prime:?}");
                let case = Case::Payload {
                    input: input.to_vec(),
                    prime,
                    must_decode: false,
                };
                run_case(&case, corpus, &mut sink, &mut tally);
            }
        }
        Some((max_frame, chunk_seed)) => {
            let seeds = chunk_seed.into_iter().chain(0..16);
            for chunk_seed in seeds {
                eprintln!(
                    "replaying as a stream, max frame size {max_frame}, chunk seed {chunk_seed}"
                );
                let case = Case::Stream(StreamCase {
                    bytes: input.to_vec(),
                    max_frame,
                    chunk_seed,
                });
                run_case(&case, corpus, &mut sink, &mut tally);
            }
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocation counters are process-wide: tests that allocate must
    /// not overlap a fuzz run.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// The CI run: the same driver, briefly. The seed is fixed so that an
    /// unrelated change does not meet a new input by chance; set
    /// `FUZZ_DECODE_SEED` to try others, and run the binary for volume.
    #[test]
    fn short_fuzz_run_finds_no_panic() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let seed = std::env::var("FUZZ_DECODE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6b61_7461);
        let cases = std::env::var("FUZZ_DECODE_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000);
        let corpus = Arc::new(corpus::build());
        match run(corpus, Options::new(seed, cases)) {
            Ok(summary) => {
                println!("{summary}");
                let t = &summary.tally;
                assert!(
                    t.ok > 0,
                    "no mutated input decoded: the corpus or mutations are off"
                );
                assert!(t.stream_frames > 0 && t.stream_oversized > 0);
            }
            Err(f) => panic!("{f}"),
        }
    }

    #[test]
    fn reference_framing_matches_the_codec_on_the_edges() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let corpus = corpus::build();
        let mut sink = Sink::default();
        let mut tally = Tally::default();
        let frame = kata_agent_emitter::frame(&corpus.prime_bincode);
        let max = corpus.prime_bincode.len();
        let cases: Vec<Vec<u8>> = vec![
            frame.clone(),
            [frame.clone(), frame.clone()].concat(),
            frame[..HEADER_LEN].to_vec(),
            frame[..HEADER_LEN + 1].to_vec(),
            frame[..3].to_vec(),
            [&(max as u64 + 1).to_be_bytes()[..], b"x"].concat(),
            u64::MAX.to_be_bytes().to_vec(),
            0u64.to_be_bytes().to_vec(),
        ];
        for bytes in cases {
            for chunk_seed in 0..8 {
                let s = StreamCase {
                    bytes: bytes.clone(),
                    max_frame: max,
                    chunk_seed,
                };
                check::stream(&s, &corpus, &mut sink, &mut tally);
            }
        }
        assert_eq!(tally.ok, 8 * 3);
        assert_eq!(tally.stream_oversized, 8 * 2);
    }
}
