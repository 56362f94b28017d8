//! Control 1: a bare tonic unary server whose one method returns its input.
//! Same tonic version and release profile as the identity service; no
//! interceptor, no tracing, no reflection: the floor for a unary call.
//!
//! Usage: `control-echo [ADDR]` (default 127.0.0.1:50061, or `CONTROL_LISTEN_ADDR`).

use identity_bench::pb::{
    TokenRequest,
    echo_server::{Echo, EchoServer},
};
use tonic::{Request, Response, Status};

/// The identity service's allocator, so that a ratio against this control
/// measures the service's own work and not the difference of two allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<TokenRequest>) -> Result<Response<TokenRequest>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = identity_bench::listen_addr("127.0.0.1:50061")?;
    eprintln!("control-echo listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
