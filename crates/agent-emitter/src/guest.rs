//! The agent inside a real guest (tests/vm.rs): a connection that behaves as
//! Kata's vsock-exporter's does, and the manifest of what went out on it,
//! which the agent prints on a serial port so that the host can check every
//! span that arrived against the very `SpanData` the SDK exported.

use std::io::{self, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ExpectedSpan, WireFormat};

/// The port Kata's agent sends its spans to, on the host (CID 2).
pub const KATA_TRACE_PORT: u32 = 10240;

/// Kata's vsock-exporter's connection: opened when the first span is
/// exported (a connect that fails is tried again at the next span), one
/// frame per span written as the exporter writes it (the 8-byte header,
/// then the payload), and after a write error it keeps the stream it has,
/// unless the error is `NotConnected`. So a forwarder that drops the
/// connection loses the rest of that guest's spans for good, as it would
/// with a real agent.
pub struct KataConnection<S, C> {
    connect: C,
    stream: Option<S>,
}

impl<S: Write, C: FnMut() -> io::Result<S>> KataConnection<S, C> {
    pub fn new(connect: C) -> Self {
        KataConnection {
            connect,
            stream: None,
        }
    }

    /// Writes one whole frame.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send_part(frame, frame.len())
    }

    /// Writes the first `len` bytes of `frame` only: a frame cut short, as
    /// when the guest dies in the middle of it.
    pub fn send_part(&mut self, frame: &[u8], len: usize) -> io::Result<()> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self.stream.insert((self.connect)()?),
        };
        let cut = &frame[..len.min(frame.len())];
        let (header, payload) = cut.split_at(cut.len().min(8));
        let result = stream
            .write_all(header)
            .and_then(|()| stream.write_all(payload));
        if let Err(e) = &result {
            if e.kind() == io::ErrorKind::NotConnected {
                self.stream = None;
            }
        }
        result
    }
}

/// What starts each manifest line; anything else on the port is not ours.
pub const MANIFEST_PREFIX: &str = "KTF ";

/// One line of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// The agent runs: since the guest kernel started, in milliseconds.
    Started { format: WireFormat, uptime_ms: u64 },
    /// The first frame went out whole.
    FirstFrame { uptime_ms: u64 },
    /// A span with expectations (the kitchen-sink scenario), written whole.
    Span(Box<ExpectedSpan>),
    /// Frame `frame` (0-based, in sending order) failed.
    WriteError {
        frame: usize,
        kind: String,
        message: String,
    },
    /// Frames before `whole` went out whole; frame `whole` only its first
    /// `bytes` bytes. The agent then waits to be killed.
    Cut { whole: usize, bytes: usize },
    /// Every frame was tried: `written` went out whole, `errors` failed.
    Done {
        frames: usize,
        written: usize,
        errors: usize,
        secs: f64,
    },
}

impl Report {
    /// The manifest line, newline included: printable ASCII only (every
    /// other character escaped as JSON allows, and JSON puts them only in
    /// strings), so no terminal setting of the port can alter it.
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        let mut out = String::with_capacity(MANIFEST_PREFIX.len() + json.len() + 1);
        out.push_str(MANIFEST_PREFIX);
        for c in json.chars() {
            if (' '..='~').contains(&c) {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        out.push('\n');
        out
    }

    /// Every manifest line of a serial port's capture, in order. A line
    /// that starts as one but does not parse is an error: a manifest
    /// garbled on the way must fail the check, not shorten it.
    pub fn parse_all(capture: &str) -> Result<Vec<Report>, String> {
        capture
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(MANIFEST_PREFIX))
            .map(|l| serde_json::from_str(l).map_err(|e| format!("manifest line {l:?}: {e}")))
            .collect()
    }
}

/// Writes manifest lines, each in one write so that lines never interleave.
pub struct Manifest<W: Write>(pub W);

impl<W: Write> Manifest<W> {
    pub fn report(&mut self, r: &Report) {
        // A manifest that cannot be written shows as missing lines, which
        // the host reports; the agent goes on sending regardless.
        let _ = self.0.write_all(r.line().as_bytes());
        let _ = self.0.flush();
    }
}

/// Milliseconds since the guest kernel started (`/proc/uptime`), 0 if unknown.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| Duration::from_secs_f64(secs).as_millis() as u64)
}

/// Floats in the manifest by their bits: a decimal round trip is not
/// guaranteed to be exact, and the host compares every bit.
pub(crate) mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to_bits())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// [`f64_bits`] for arrays.
pub(crate) mod f64_bits_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|f| f.to_bits()))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<u64>::deserialize(d).map(|v| v.into_iter().map(f64::from_bits).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scenario, ScenarioOptions};

    #[test]
    fn manifest_lines_round_trip_every_field_in_ascii() {
        for format in WireFormat::ALL {
            let sc = scenario(&ScenarioOptions {
                format,
                ..Default::default()
            });
            let mut text = String::from("kernel noise\r\n");
            for e in &sc.expected {
                text.push_str(
                    &Report::Span(Box::new(e.clone()))
                        .line()
                        .replace('\n', "\r\n"),
                );
            }
            assert!(text.is_ascii());
            let back = Report::parse_all(&text).unwrap();
            let want: Vec<_> = sc
                .expected
                .iter()
                .map(|e| Report::Span(Box::new(e.clone())))
                .collect();
            assert_eq!(back, want, "{format}");
        }
        assert!(Report::parse_all("KTF {\"done\":").is_err());
    }

    /// A writer that fails with `kind` from the `fail_at`-th write on.
    struct Failing {
        writes: usize,
        fail_at: usize,
        kind: io::ErrorKind,
        got: Vec<u8>,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            if self.writes >= self.fail_at {
                return Err(io::Error::from(self.kind));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn connects_lazily_and_keeps_a_dead_stream_unless_not_connected() {
        for (kind, reconnects) in [
            (io::ErrorKind::BrokenPipe, false),
            (io::ErrorKind::NotConnected, true),
        ] {
            let mut connects = 0;
            let mut conn = KataConnection::new(|| {
                connects += 1;
                Ok(Failing {
                    writes: 0,
                    fail_at: 3,
                    kind,
                    got: Vec::new(),
                })
            });
            let frame = crate::frame(b"span");
            conn.send(&frame).unwrap();
            assert!(conn.send(&frame).is_err());
            let again = conn.send(&frame);
            drop(conn);
            assert_eq!(again.is_ok(), reconnects, "{kind:?}");
            assert_eq!(connects, if reconnects { 2 } else { 1 }, "{kind:?}");
        }
        let mut never = KataConnection::new(|| Err::<Vec<u8>, _>(io::Error::other("down")));
        assert!(never.send(b"x").is_err());
    }

    #[test]
    fn a_cut_frame_is_its_prefix() {
        let mut conn = KataConnection::new(|| Ok(Vec::new()));
        let frame = crate::frame(b"0123456789");
        conn.send_part(&frame, 12).unwrap();
        assert_eq!(conn.stream.unwrap(), frame[..12]);
    }
}
