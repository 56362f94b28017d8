//! Control 2: a bare tonic unary server whose one method does only a
//! jsonwebtoken verification (aws-lc-rs backend) of the token it receives,
//! with the same claim checks the identity service asks of jsonwebtoken
//! (`exp`/`nbf` with 5 s leeway, `iss` when configured, `sub` required).
//! No cache, no database, no principal.
//!
//! Configuration: `CONTROL_RSA_PEM` (path to an RSA public key in PEM form:
//! RS256) or `CONTROL_HS_SECRET` (HS256); `CONTROL_ISSUER` (optional).
//! Usage: `control-verify [ADDR]` (default 127.0.0.1:50062, or `CONTROL_LISTEN_ADDR`).

use identity_bench::pb::{
    TokenRequest, VerifyReply,
    raw_verify_server::{RawVerify, RawVerifyServer},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::{Request, Response, Status};

/// The identity service's allocator, so that a ratio against this control
/// measures the service's own work and not the difference of two allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
}

struct VerifyService {
    key: DecodingKey,
    validation: Validation,
}

#[tonic::async_trait]
impl RawVerify for VerifyService {
    async fn verify(&self, request: Request<TokenRequest>) -> Result<Response<VerifyReply>, Status> {
        let token = request.into_inner().token;
        match jsonwebtoken::decode::<Claims>(&token, &self.key, &self.validation) {
            Ok(data) => Ok(Response::new(VerifyReply {
                sub: data.claims.sub,
                exp: data.claims.exp,
            })),
            Err(err) => Err(Status::invalid_argument(format!("token: {err}"))),
        }
    }
}

fn service() -> Result<VerifyService, String> {
    let (key, algorithm) = match (std::env::var("CONTROL_RSA_PEM"), std::env::var("CONTROL_HS_SECRET")) {
        (Ok(path), _) => {
            let pem = std::fs::read(&path).map_err(|e| format!("CONTROL_RSA_PEM {path}: {e}"))?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| format!("CONTROL_RSA_PEM {path}: {e}"))?;
            (key, Algorithm::RS256)
        }
        (Err(_), Ok(secret)) => (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256),
        _ => return Err("set CONTROL_RSA_PEM (RS256) or CONTROL_HS_SECRET (HS256)".into()),
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = 5;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    let mut required = vec!["exp", "sub"];
    if let Ok(issuer) = std::env::var("CONTROL_ISSUER") {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    Ok(VerifyService { key, validation })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = identity_bench::listen_addr("127.0.0.1:50062")?;
    let service = service()?;
    eprintln!(
        "control-verify ({:?}) listening on {addr}",
        service.validation.algorithms
    );
    tonic::transport::Server::builder()
        .add_service(RawVerifyServer::new(service))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
