//! A local OTLP/gRPC trace collector that accepts every export and drops it,
//! so the load benchmark can measure the service with trace export on and
//! nothing leaving the machine. It counts what it received and prints the
//! totals every 2 s when they changed (standard error).
//!
//! Usage: `otlp-sink [ADDR]` (default 127.0.0.1:4317, or `CONTROL_LISTEN_ADDR`).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
struct Counts {
    exports: AtomicU64,
    spans: AtomicU64,
}

#[derive(Debug, Default)]
struct Sink(Arc<Counts>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.exports.fetch_add(1, Ordering::Relaxed);
        self.0.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = identity_bench::listen_addr("127.0.0.1:4317")?;
    eprintln!("otlp-sink listening on {addr}");
    let counts = Arc::new(Counts::default());
    let report = counts.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let spans = report.spans.load(Ordering::Relaxed);
            if spans != last {
                last = spans;
                eprintln!(
                    "otlp-sink: {} spans in {} exports",
                    spans,
                    report.exports.load(Ordering::Relaxed)
                );
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink(counts)))
        .serve_with_shutdown(addr, async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
