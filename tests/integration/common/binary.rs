//! The `identity` binary as an operator runs it: a free port, a clean
//! environment, and waiting until it serves.

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::transport::Channel;

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

/// A running binary whose standard output and error are collected.
pub struct Served {
    pub child: Option<Child>,
    pub addr: String,
    logs: Arc<Mutex<String>>,
}

impl Served {
    /// `serve` on a free port.
    pub fn start(mut command: std::process::Command) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = command
            .arg("serve")
            .env("IDENTITY_LISTEN_ADDR", &addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    logs.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            });
        }
        Self {
            child: Some(child),
            addr,
            logs,
        }
    }

    /// Everything it printed, once it has printed `needle` (or after 5 s).
    pub async fn logs_once(&self, needle: &str) -> String {
        for _ in 0..50 {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.logs()
    }

    /// Everything it printed so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub async fn client(&self, key: &str) -> super::IdentityClient {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        identity::pb::identity_service_client::IdentityServiceClient::with_interceptor(
            channel,
            super::WithKey(Some(key.to_owned())),
        )
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.as_ref().unwrap().id().to_string()])
            .status();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
