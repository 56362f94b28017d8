//! Protects an axum route with the identity service.
//!
//! `IDENTITY_URL=http://127.0.0.1:50051 IDENTITY_API_KEY=... cargo run -p identity-client --example axum`
//! then `curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:3000/me`.

use axum::{Router, routing::get};
use identity_client::{AuthLayer, CacheOptions, IdentityClient, Principal};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = IdentityClient::builder(std::env::var("IDENTITY_API_KEY")?)
        .endpoint(std::env::var("IDENTITY_URL")?)
        .cache(CacheOptions::default())
        .connect()
        .await?;
    let app = Router::new()
        .route("/me", get(|p: Principal| async move { format!("hello {}", p.user_id) }))
        .layer(AuthLayer::http(client));
    Ok(axum::serve(tokio::net::TcpListener::bind("127.0.0.1:3000").await?, app).await?)
}
