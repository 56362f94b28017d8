//! The `identity` binary as an operator runs it: a free port, a clean
//! environment, and waiting until it serves.

use std::{process::Command, time::Duration};

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

pub const BIN: &str = env!("CARGO_BIN_EXE_identity");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with only PATH, the database URL and no metrics listener.
pub fn command(db_url: &str) -> Command {
    let mut command = Command::new(BIN);
    // Parallel tests must not race for the default metrics port.
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IDENTITY_DATABASE_URL", db_url)
        .env("IDENTITY_METRICS_ADDR", "off");
    command
}

/// Waits up to 10 s for the overall health to be SERVING.
pub async fn wait_serving(addr: &str) -> bool {
    for _ in 0..100 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest { service: String::new() })
                .await;
            if status.is_ok_and(|s| s.into_inner().status() == ServingStatus::Serving) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
