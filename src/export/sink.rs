//! Where batches go: the collector over gRPC or HTTP, or, with
//! `--dump-only`, standard output as JSON lines or trees.

use super::*;

/// Each transport takes the same encoded request.
pub struct Sink(pub(super) Transport);

pub(super) enum Transport {
    Grpc(grpc::GrpcTransport),
    Http(Box<http::HttpTransport>),
    Dump(std::sync::Mutex<Box<dyn std::io::Write + Send + Sync>>),
    Tree(std::sync::Mutex<tree::TreeWriter>),
}

impl Sink {
    /// Opens the configured transport, reaching the collector in `connect_timeout`.
    pub async fn connect(cfg: &OtlpConfig, connect_timeout: Duration) -> Result<Self, ExportError> {
        Ok(Sink(match cfg.protocol {
            OtlpProtocol::Grpc => {
                Transport::Grpc(grpc::GrpcTransport::connect(cfg, connect_timeout).await?)
            }
            OtlpProtocol::HttpProtobuf => Transport::Http(Box::new(
                http::HttpTransport::connect(cfg, connect_timeout).await?,
            )),
        }))
    }

    pub fn dump(out: Box<dyn std::io::Write + Send + Sync>) -> Sink {
        Sink(Transport::Dump(std::sync::Mutex::new(out)))
    }

    pub fn tree(out: Box<dyn std::io::Write + Send + Sync>, cfg: &DumpConfig) -> Sink {
        Sink(Transport::Tree(std::sync::Mutex::new(
            tree::TreeWriter::new(out, *cfg),
        )))
    }

    fn trees(&self) -> Option<std::sync::MutexGuard<'_, tree::TreeWriter>> {
        match &self.0 {
            Transport::Tree(w) => Some(lock(w)),
            _ => None,
        }
    }

    /// Writes out whatever the sink still holds (the tree view's traces).
    pub(crate) fn finish(&self) -> std::io::Result<()> {
        self.trees().map_or(Ok(()), |mut w| w.finish())
    }

    pub fn describe(&self) -> String {
        match &self.0 {
            Transport::Grpc(t) => format!("otlp grpc {}", t.cfg.endpoint),
            Transport::Http(t) => format!("otlp http/protobuf {}", t.cfg.endpoint),
            Transport::Dump(_) => "stdout (OTLP JSON lines)".to_owned(),
            Transport::Tree(_) => "stdout (trace trees)".to_owned(),
        }
    }

    pub(super) async fn send(
        &self,
        body: &EncodedRequest,
    ) -> Result<ExportTraceServiceResponse, ExportError> {
        let (cfg, res) = match &self.0 {
            Transport::Grpc(t) => (&t.cfg, t.export(body).await.map_err(SendError::Grpc)),
            Transport::Http(t) => (&t.cfg, t.export(body).await.map_err(SendError::Http)),
            Transport::Dump(w) => return written(dump::write_request(&mut *lock(w), body)),
            Transport::Tree(w) => return written(lock(w).write_request(body)),
        };
        res.map_err(|source| ExportError::Send {
            endpoint: cfg.endpoint.to_string(),
            source,
        })
    }
}

fn written(r: std::io::Result<()>) -> Result<ExportTraceServiceResponse, ExportError> {
    r.map(|()| ExportTraceServiceResponse::default())
        .map_err(ExportError::WriteDump)
}

/// Ticks the tree view, printing its quiet traces, until shutdown begins
/// (`Sink::finish` prints the rest); ends at once for other sinks.
pub(crate) async fn run_sink_ticker(exporter: Arc<Exporter>, shutdown: Shutdown) {
    let Some(linger) = exporter.sink.trees().map(|w| w.opts.linger) else {
        return;
    };
    // A quiet trace waits at most a quarter of the linger longer than asked.
    let mut ticks = tokio::time::interval((linger / 4).max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.stopping() => return,
        }
        let now = std::time::Instant::now();
        if let Some(Err(e)) = exporter.sink.trees().map(|mut w| w.tick(now)) {
            tracing::warn!(error = %e, "cannot write the trace trees to stdout");
        }
    }
}
