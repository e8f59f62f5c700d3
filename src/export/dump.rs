//! `--dump-only`: spans as OTLP JSON lines on stdout, no collector needed.
//!
//! Each line is a complete OTLP/JSON `TracesData` object holding one span
//! with its resource, so lines can be read one at a time, grepped, or fed
//! to anything that takes OTLP JSON (ids in hex, 64-bit numbers as strings,
//! as the OTLP JSON mapping says).

use std::io::{self, Write};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, TracesData};
use prost::Message;

use crate::otlp::EncodedRequest;

pub(crate) struct DumpWriter {
    out: Box<dyn Write + Send + Sync>,
}

impl DumpWriter {
    pub(crate) fn new(out: Box<dyn Write + Send + Sync>) -> Self {
        Self { out }
    }

    /// Writes every span of an export request as its own line.
    pub(crate) fn write_request(&mut self, body: &EncodedRequest) -> io::Result<()> {
        // Spans arrive encoded for export; this slow path decodes them back
        // into OTLP structs for the JSON mapping.
        let request = ExportTraceServiceRequest::decode(body.to_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        for rs in request.resource_spans {
            let resource = rs.resource.unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let line = TracesData {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: None,
                            spans: vec![span],
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                serde_json::to_writer(&mut self.out, &line)?;
                self.out.write_all(b"\n")?;
            }
        }
        self.out.flush()
    }
}
