//! `fuzz-decode`: runs random and mutated real agent frames through the
//! forwarder's decode and conversion (see the library docs), prints
//! progress, and exits 0 when no case panicked, 1 on the first that did.
//!
//! ```text
//! cargo run --release -p kata-fuzz-decode -- --cases 1000000
//! cargo run --release -p kata-fuzz-decode -- --seed S --case K --corpus FILE
//! cargo run --release -p kata-fuzz-decode -- --replay FILE [--stream --max-frame-size N]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kata_fuzz_decode::{corpus, random_seed, replay, run, Options};

#[derive(Debug, Parser)]
#[command(
    name = "fuzz-decode",
    about = "Fuzz the forwarder's frame decoding and OTLP conversion with mutated real agent frames"
)]
struct Args {
    /// Number of cases to run.
    #[arg(long, default_value_t = 1_000_000)]
    cases: u64,
    /// Seed of the run (random and printed if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Run only this case of the seed (to reproduce a failure).
    #[arg(long, conflicts_with = "cases")]
    case: Option<u64>,
    /// Percentage of stream cases (frames through the frame codec).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100))]
    stream_percent: u32,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    /// Where the input of a failing case (and the run's corpus) is written.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    crash_dir: PathBuf,
    /// Start from this saved corpus instead of fresh SDK frames (a run
    /// saves its corpus in --crash-dir and keeps it if a case fails).
    #[arg(long, value_name = "FILE")]
    corpus: Option<PathBuf>,
    /// Rerun one exact input (raw bytes, or hex text) instead of fuzzing.
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// With --replay: the input is a stream of frames, not one payload.
    #[arg(long, requires = "replay", requires = "max_frame_size")]
    stream: bool,
    /// With --replay --stream: the frame size limit of the failing case.
    #[arg(long, requires = "stream")]
    max_frame_size: Option<usize>,
    /// With --replay --stream: the failing case's chunking (others are
    /// tried as well).
    #[arg(long, requires = "stream")]
    chunk_seed: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let t = Instant::now();
    let corpus = match &args.corpus {
        Some(path) => match corpus::Corpus::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fuzz-decode: reading corpus {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => corpus::build(),
    };
    let corpus = Arc::new(corpus);
    eprintln!(
        "[fuzz-decode] corpus: {} seed payloads from the real SDKs and by hand, ready in {:.1} s",
        corpus.entries.len(),
        t.elapsed().as_secs_f64()
    );

    if let Some(path) = &args.replay {
        let input = match read_input(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("fuzz-decode: reading {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        let stream = args
            .stream
            .then(|| (args.max_frame_size.unwrap_or_default(), args.chunk_seed));
        let tally = replay(&corpus, &input, stream);
        println!("replayed without a panic\n{tally}");
        return ExitCode::SUCCESS;
    }

    let seed = args.seed.unwrap_or_else(random_seed);
    let mut opts = Options::new(seed, args.cases);
    if let Some(k) = args.case {
        opts.first_case = k;
        opts.cases = 1;
    }
    opts.stream_percent = args.stream_percent;
    opts.progress = (args.progress_secs > 0).then(|| Duration::from_secs(args.progress_secs));
    // A fresh corpus differs from run to run (span ids, times): save it, so
    // that a failing case can be rerun exactly from its seed and number.
    let saved = match &args.corpus {
        Some(path) => {
            opts.corpus_file = Some(path.clone());
            None
        }
        None => {
            let path = args
                .crash_dir
                .join(format!("fuzz-decode-corpus-{seed}.bin"));
            match corpus.save(&path) {
                Ok(()) => {
                    opts.corpus_file = Some(path.clone());
                    Some(path)
                }
                Err(e) => {
                    eprintln!(
                        "[fuzz-decode] not saving the corpus to {}: {e}",
                        path.display()
                    );
                    None
                }
            }
        }
    };
    opts.crash_dir = args.crash_dir;
    eprintln!(
        "[fuzz-decode] seed {seed}: cases {}..{}",
        opts.first_case,
        opts.first_case + opts.cases
    );
    match run(corpus, opts) {
        Ok(summary) => {
            if let Some(path) = saved {
                let _ = std::fs::remove_file(path);
            }
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::FAILURE
        }
    }
}

/// A crash file holds the raw input; hex text (as printed in a report) is
/// accepted too, so a report pasted into a file replays as well.
fn read_input(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    let raw = std::fs::read(path)?;
    let text: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let is_hex = !text.is_empty() && text.len() % 2 == 0 && text.iter().all(u8::is_ascii_hexdigit);
    if !is_hex {
        return Ok(raw);
    }
    Ok(text
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).expect("hex digits are ASCII");
            u8::from_str_radix(s, 16).expect("checked hex digits")
        })
        .collect())
}
