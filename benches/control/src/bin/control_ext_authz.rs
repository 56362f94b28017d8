//! Control for the gateway benchmark: a bare tonic Envoy ext_authz server
//! (`envoy.service.auth.v3.Authorization/Check`, the same `envoy-types`
//! crate as the service) that allows every request and sets no header. Same
//! tonic version, release profile and allocator as the identity service: the
//! floor for an external authorization call through Envoy.
//!
//! With `CONTROL_HEADERS=1` it answers what the service answers for a legacy
//! user instead: seven identity headers set, two removed (fixed values), so
//! that Envoy's own work on them is in the control too.
//!
//! Usage: `control-ext-authz [ADDR]` (default 127.0.0.1:50064, or `CONTROL_LISTEN_ADDR`).

use envoy_types::ext_authz::v3::{
    CheckResponseExt, OkHttpResponseBuilder,
    pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction},
};
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Default)]
struct AllowAll {
    headers: bool,
}

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let mut response = CheckResponse::with_status(Status::ok("allowed"));
        if self.headers {
            let mut ok = OkHttpResponseBuilder::new();
            for (name, value) in [
                ("x-identity-user-id", "5f0c5a4e-6a53-4c1e-9a55-3d6f7f1f2b11"),
                ("x-identity-auth-method", "legacy_jwt"),
                ("x-identity-clerk-user-id", "user_bench000000"),
                ("x-identity-email", "bench@example.com"),
                ("x-identity-migration-state", "migrated"),
                ("x-identity-org-id", "org_bench"),
                ("x-identity-org-role", "org:member"),
            ] {
                ok.add_header(name, value, Some(HeaderAppendAction::OverwriteIfExistsOrAdd), false);
            }
            ok.remove_header("x-identity-session-id");
            ok.remove_header("x-identity-org-slug");
            response.set_http_response(ok);
        }
        Ok(Response::new(response))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = identity_bench::listen_addr("127.0.0.1:50064")?;
    eprintln!("control-ext-authz listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(AllowAll {
            headers: std::env::var("CONTROL_HEADERS").is_ok_and(|v| v == "1"),
        }))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
