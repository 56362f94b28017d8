//! Control for the gateway benchmark: a bare tonic Envoy ext_authz server
//! (`envoy.service.auth.v3.Authorization/Check`, the same `envoy-types`
//! crate as the service) that allows every request and sets no header. Same
//! tonic version, release profile and allocator as the identity service: the
//! floor for an external authorization call through Envoy.
//!
//! Usage: `control-ext-authz [ADDR]` (default 127.0.0.1:50064, or `CONTROL_LISTEN_ADDR`).

use envoy_types::ext_authz::v3::{
    CheckResponseExt,
    pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse},
};
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Default)]
struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse::with_status(Status::ok("allowed"))))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = identity_bench::listen_addr("127.0.0.1:50064")?;
    eprintln!("control-ext-authz listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(AllowAll))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
