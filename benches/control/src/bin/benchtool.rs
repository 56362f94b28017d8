//! The load benchmark's helper: mints request bodies, checks them with a real
//! gRPC client, links seeded users, measures start-up, and drives HTTP/2 load
//! for the cases `h2load` cannot express (a different request body per call).
//!
//! The load generator (`benchtool load`) works like `h2load -t 1`: one
//! thread, `-c` HTTP/2 connections, `-m` concurrent streams on each, every
//! stream sending its next request as soon as the previous one finished.
//! Unlike h2load it reads every response's `grpc-status` and the first
//! protobuf tag of its message, so a rejection is counted as a failure
//! rather than a success.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use identity_bench::{
    grpc_frame,
    pb::{
        Ignored, LinkUserRequestView, TokenRequest, VerifyReply, VerifyTokenResponseView, verify_token_response_view,
    },
    read_frames,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "benchtool", about = "Helper for benches/load.sh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes `--count` legacy HS256 tokens (sub, exp, iat, jti) as gRPC
    /// VerifyTokenRequest frames, cycling over the user ids in `--users`.
    MintLegacy {
        #[arg(long)]
        secret: String,
        /// One user UUID per line.
        #[arg(long)]
        users: PathBuf,
        #[arg(long)]
        count: usize,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 7200)]
        ttl: i64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes `--count` Clerk-style RS256 session tokens as gRPC frames,
    /// cycling over the Clerk user ids in `--subs`.
    MintClerk {
        /// RSA private key (PEM).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        #[arg(long)]
        issuer: String,
        #[arg(long, default_value = "https://app.example.com")]
        azp: String,
        /// One Clerk user id per line.
        #[arg(long)]
        subs: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 7200)]
        ttl: i64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sends one request of a frames file (the exact bytes) with a gRPC client
    /// and checks grpc-status 0 and the expected answer.
    Check {
        #[arg(long)]
        addr: String,
        /// e.g. /identity.v1.IdentityService/VerifyToken
        #[arg(long)]
        path: String,
        #[arg(long)]
        frames: PathBuf,
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[arg(long)]
        api_key: Option<String>,
        #[arg(long, value_enum)]
        expect: Expect,
    },
    /// Links users to Clerk ids with MigrationService.LinkUser (admin);
    /// an existing link is fine.
    Link {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        api_key: String,
        /// `user_uuid,clerk_user_id` per line.
        #[arg(long)]
        pairs: PathBuf,
    },
    /// Drives HTTP/2 load from a frames file; prints one JSON line.
    Load(LoadArgs),
    /// Waits until an address accepts TCP (and answers SERVING to gRPC health unless --tcp).
    WaitServing {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        tcp: bool,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Starts a server binary `--runs` times, each on a new empty SQLite file,
    /// and reports the time from spawn to health SERVING. The environment is
    /// passed through; IDENTITY_DATABASE_URL and IDENTITY_LISTEN_ADDR are set here.
    Startup {
        #[arg(long)]
        bin: PathBuf,
        #[arg(long, default_value = "127.0.0.1:50071")]
        addr: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Expect {
    /// identity.v1.VerifyTokenResponse with a principal.
    Principal,
    /// The echo control: the same message back.
    Echo,
    /// The raw-verify control: a reply with the token's `sub`.
    Verified,
}

#[derive(Debug, Clone, clap::Args)]
struct LoadArgs {
    #[arg(long)]
    addr: String,
    #[arg(long)]
    path: String,
    #[arg(long)]
    frames: PathBuf,
    /// Index of the first frame to send; requests take frames in order, wrapping around.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Sends each frame this many times in a row before the next one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Total requests.
    #[arg(short = 'n', long)]
    requests: u64,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Concurrent streams per connection.
    #[arg(short = 'm', long, default_value_t = 8)]
    streams: usize,
    #[arg(long)]
    api_key: Option<String>,
    /// The first protobuf tag byte every response message must start with
    /// (10 = field 1, length-delimited: a principal, an echo, a verify reply).
    #[arg(long, default_value_t = 10)]
    expect_tag: u8,
    #[arg(long, default_value = "")]
    label: String,
    /// Also append the JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MintLegacy {
            secret,
            users,
            count,
            ttl,
            out,
        } => mint_legacy(&secret, &users, count, ttl, &out),
        Command::MintClerk {
            key,
            kid,
            issuer,
            azp,
            subs,
            count,
            ttl,
            threads,
            out,
        } => mint_clerk(&key, &kid, &issuer, &azp, &subs, count, ttl, threads, &out),
        Command::Check {
            addr,
            path,
            frames,
            index,
            api_key,
            expect,
        } => runtime().and_then(|rt| rt.block_on(check(&addr, &path, &frames, index, api_key.as_deref(), expect))),
        Command::Link { addr, api_key, pairs } => runtime().and_then(|rt| rt.block_on(link(&addr, &api_key, &pairs))),
        Command::Load(args) => runtime().and_then(|rt| rt.block_on(load(args))),
        Command::WaitServing { addr, tcp, timeout_ms } => runtime().and_then(|rt| {
            rt.block_on(async {
                let waited = wait_serving(&addr, tcp, Duration::from_millis(timeout_ms)).await?;
                println!("{addr} ready after {} ms", waited.as_millis());
                Ok(())
            })
        }),
        Command::Startup { bin, addr, dir, runs } => {
            runtime().and_then(|rt| rt.block_on(startup(&bin, &addr, &dir, runs)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("benchtool: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One thread, like `h2load -t 1`.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn lines(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(lines)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn request_frame(token: String) -> Vec<u8> {
    grpc_frame(
        &TokenRequest {
            token,
            expected_audience: String::new(),
        }
        .encode_to_vec(),
    )
}

fn write_frames(out: &Path, frames: &[Vec<u8>]) -> Result<(), String> {
    let file = std::fs::File::create(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    for frame in frames {
        writer
            .write_all(frame)
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    writer
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

fn mint_legacy(secret: &str, users: &Path, count: usize, ttl: i64, out: &Path) -> Result<(), String> {
    let users = lines(users)?;
    let key = EncodingKey::from_secret(secret.as_bytes());
    let header = Header::new(Algorithm::HS256);
    let iat = now();
    let mut frames = Vec::with_capacity(count);
    for i in 0..count {
        let claims = serde_json::json!({
            "sub": users[i % users.len()],
            "exp": iat + ttl,
            "iat": iat,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let token = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())?;
        frames.push(request_frame(token));
    }
    write_frames(out, &frames)?;
    println!("{count} legacy HS256 requests -> {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn mint_clerk(
    key: &Path,
    kid: &str,
    issuer: &str,
    azp: &str,
    subs: &Path,
    count: usize,
    ttl: i64,
    threads: usize,
    out: &Path,
) -> Result<(), String> {
    let subs = lines(subs)?;
    let pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    let iat = now();
    let threads = threads.clamp(1, 64);
    let started = Instant::now();
    let chunks: Vec<Result<Vec<Vec<u8>>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (key, header, subs) = (&key, &header, &subs);
                scope.spawn(move || {
                    let mut frames = Vec::new();
                    for i in (t..count).step_by(threads) {
                        let claims = serde_json::json!({
                            "sub": subs[i % subs.len()],
                            "sid": format!("sess_bench{i}"),
                            "iss": issuer,
                            "azp": azp,
                            "exp": iat + ttl,
                            "nbf": iat - 5,
                            "iat": iat,
                            "jti": uuid::Uuid::new_v4().simple().to_string(),
                            "v": 2,
                            "sts": "active",
                        });
                        let token = jsonwebtoken::encode(header, &claims, key).map_err(|e| e.to_string())?;
                        frames.push(request_frame(token));
                    }
                    Ok(frames)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("minting thread panicked".into())))
            .collect()
    });
    let chunks = chunks.into_iter().collect::<Result<Vec<_>, _>>()?;
    // Interleave back into index order.
    let mut iters: Vec<_> = chunks.into_iter().map(Vec::into_iter).collect();
    let mut frames = Vec::with_capacity(count);
    for i in 0..count {
        if let Some(frame) = iters[i % threads].next() {
            frames.push(frame);
        }
    }
    write_frames(out, &frames)?;
    println!(
        "{count} Clerk RS256 requests -> {} ({:.1} s, {threads} threads)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn channel(addr: &str) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

fn with_key<T>(message: T, api_key: Option<&str>) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = api_key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| "the API key is not valid metadata".to_owned())?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

async fn unary<Req, Resp>(
    channel: Channel,
    path: &str,
    request: tonic::Request<Req>,
) -> Result<tonic::Response<Resp>, tonic::Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let path = http::uri::PathAndQuery::try_from(path)
        .map_err(|e| tonic::Status::invalid_argument(format!("path {path:?}: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(request, path, tonic_prost::ProstCodec::<Req, Resp>::default())
        .await
}

async fn check(
    addr: &str,
    path: &str,
    frames: &Path,
    index: usize,
    api_key: Option<&str>,
    expect: Expect,
) -> Result<(), String> {
    let frames = read_frames(frames)?;
    let frame = frames
        .get(index)
        .ok_or_else(|| format!("the file has {} requests, not {}", frames.len(), index + 1))?;
    let message =
        TokenRequest::decode(&frame[5..]).map_err(|e| format!("request {index} is not a TokenRequest: {e}"))?;
    // prost encodes deterministically: what the client sends is byte for byte the file's body.
    if grpc_frame(&message.encode_to_vec()) != frame[..] {
        return Err(format!("request {index} does not re-encode to the same bytes"));
    }
    if message.token.trim() != message.token {
        return Err(format!("request {index}: the token has surrounding whitespace"));
    }
    let channel = channel(addr).await?;
    let what = format!("{addr}{path} request {index}");
    match expect {
        Expect::Principal => {
            let reply: VerifyTokenResponseView = unary(channel, path, with_key(message, api_key)?)
                .await
                .map_err(|s| format!("{what}: grpc-status {} ({})", s.code() as i32, s.message()))?
                .into_inner();
            match reply.result {
                Some(verify_token_response_view::Result::Principal(p)) => println!(
                    "check ok: {what}: grpc-status 0, principal user_id={} auth_method={} clerk_user_id={} migration_state={}",
                    p.user_id, p.auth_method, p.clerk_user_id, p.migration_state
                ),
                Some(verify_token_response_view::Result::Rejection(r)) => {
                    return Err(format!(
                        "{what}: grpc-status 0 but REJECTED (reason {}: {})",
                        r.reason, r.message
                    ));
                }
                None => return Err(format!("{what}: grpc-status 0 but an empty result")),
            }
        }
        Expect::Echo => {
            let reply: TokenRequest = unary(channel, path, with_key(message.clone(), api_key)?)
                .await
                .map_err(|s| format!("{what}: grpc-status {} ({})", s.code() as i32, s.message()))?
                .into_inner();
            if reply != message {
                return Err(format!("{what}: the echo differs from the request"));
            }
            println!("check ok: {what}: grpc-status 0, echoed {} bytes", frame.len() - 5);
        }
        Expect::Verified => {
            let reply: VerifyReply = unary(channel, path, with_key(message, api_key)?)
                .await
                .map_err(|s| format!("{what}: grpc-status {} ({})", s.code() as i32, s.message()))?
                .into_inner();
            if reply.sub.is_empty() {
                return Err(format!("{what}: no sub in the reply"));
            }
            println!("check ok: {what}: grpc-status 0, verified sub={}", reply.sub);
        }
    }
    Ok(())
}

async fn link(addr: &str, api_key: &str, pairs: &Path) -> Result<(), String> {
    let pairs = lines(pairs)?;
    let channel = channel(addr).await?;
    let (mut linked, mut existing) = (0, 0);
    for pair in pairs {
        let (user_id, clerk_user_id) = pair
            .split_once(',')
            .ok_or_else(|| format!("{pair:?}: expected user_id,clerk_user_id"))?;
        let request = with_key(
            LinkUserRequestView {
                user_id: user_id.to_owned(),
                clerk_user_id: clerk_user_id.to_owned(),
            },
            Some(api_key),
        )?;
        match unary::<_, Ignored>(channel.clone(), "/identity.v1.MigrationService/LinkUser", request).await {
            Ok(_) => linked += 1,
            Err(s) if s.code() == tonic::Code::AlreadyExists => existing += 1,
            Err(s) => return Err(format!("LinkUser {user_id} -> {clerk_user_id}: {s}")),
        }
    }
    println!("LinkUser: {linked} linked, {existing} already linked");
    Ok(())
}

async fn wait_serving(addr: &str, tcp_only: bool, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if started.elapsed() > timeout {
            return Err(format!("{addr} not ready after {} ms", timeout.as_millis()));
        }
        if tcp_only {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(started.elapsed());
            }
        } else if let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
        {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let serving = client
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .is_ok_and(|r| {
                    r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                });
            if serving {
                return Ok(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn startup(bin: &Path, addr: &str, dir: &Path, runs: usize) -> Result<(), String> {
    let mut times = Vec::new();
    for run in 0..runs {
        let db = dir.join(format!("startup-{run}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&db);
        let started = Instant::now();
        let mut child = tokio::process::Command::new(bin)
            .arg("serve")
            .env("IDENTITY_DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("IDENTITY_LISTEN_ADDR", addr)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let waited = tokio::select! {
            waited = wait_ready_from(addr, started) => waited,
            status = child.wait() => Err(format!("the server exited during start-up: {status:?}")),
        };
        let elapsed = waited?;
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(25), child.wait()).await;
        let _ = child.kill().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        println!(
            "startup run {}: {:.1} ms from spawn to SERVING (empty SQLite)",
            run + 1,
            elapsed.as_secs_f64() * 1e3
        );
        times.push(elapsed.as_secs_f64() * 1e3);
    }
    let json = serde_json::json!({ "kind": "startup", "runs_ms": times });
    println!("{json}");
    Ok(())
}

async fn wait_ready_from(addr: &str, started: Instant) -> Result<Duration, String> {
    wait_serving(addr, false, Duration::from_secs(30)).await?;
    Ok(started.elapsed())
}

#[derive(Debug, Default)]
struct StreamStats {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: u64,
    bad_status: u64,
    bad_answer: u64,
    first_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct LoadReport {
    kind: &'static str,
    label: String,
    tool: &'static str,
    addr: String,
    path: String,
    requests: u64,
    connections: usize,
    streams: usize,
    ok: u64,
    errors: u64,
    bad_status: u64,
    bad_answer: u64,
    elapsed_s: f64,
    rps: f64,
    mean_us: f64,
    p50_us: u32,
    p90_us: u32,
    p99_us: u32,
    max_us: u32,
    first_error: Option<String>,
}

struct Shared {
    frames: Vec<Bytes>,
    offset: usize,
    repeat: u64,
    total: u64,
    next: AtomicU64,
    uri: http::Uri,
    authorization: Option<http::HeaderValue>,
    expect_tag: u8,
}

async fn load(args: LoadArgs) -> Result<(), String> {
    let frames = read_frames(&args.frames)?;
    let uri: http::Uri = format!("http://{}{}", args.addr, args.path)
        .parse()
        .map_err(|e| format!("bad address or path: {e}"))?;
    let authorization = args
        .api_key
        .as_deref()
        .map(|k| http::HeaderValue::from_str(&format!("Bearer {k}")))
        .transpose()
        .map_err(|_| "the API key is not a valid header value".to_owned())?;
    let shared = Arc::new(Shared {
        frames,
        offset: args.offset,
        repeat: args.repeat,
        total: args.requests,
        next: AtomicU64::new(0),
        uri,
        authorization,
        expect_tag: args.expect_tag,
    });

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections.max(1) {
        let tcp = tokio::net::TcpStream::connect(&args.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {}: {e}", args.addr))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        for _ in 0..args.streams.max(1) {
            tasks.spawn(stream_loop(client.clone(), shared.clone()));
        }
    }
    let mut all = StreamStats::default();
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.map_err(|e| e.to_string())?;
        all.latencies_us.extend(stats.latencies_us);
        all.ok += stats.ok;
        all.errors += stats.errors;
        all.bad_status += stats.bad_status;
        all.bad_answer += stats.bad_answer;
        if all.first_error.is_none() {
            all.first_error = stats.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.latencies_us.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * all.latencies_us.len() as f64).ceil() as usize;
        all.latencies_us[rank.clamp(1, all.latencies_us.len()) - 1]
    };
    let done = all.latencies_us.len() as f64;
    let report = LoadReport {
        kind: "load",
        label: args.label,
        tool: "benchtool",
        addr: args.addr,
        path: args.path,
        requests: args.requests,
        connections: args.connections,
        streams: args.streams,
        ok: all.ok,
        errors: all.errors,
        bad_status: all.bad_status,
        bad_answer: all.bad_answer,
        elapsed_s: elapsed,
        rps: all.ok as f64 / elapsed,
        mean_us: all.latencies_us.iter().map(|&l| f64::from(l)).sum::<f64>() / done.max(1.0),
        p50_us: pct(50.0),
        p90_us: pct(90.0),
        p99_us: pct(99.0),
        max_us: pct(100.0),
        first_error: all.first_error,
    };
    let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
    println!("{line}");
    if let Some(path) = &args.json_out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        writeln!(file, "{line}").map_err(|e| e.to_string())?;
    }
    if report.ok != report.requests {
        return Err(format!(
            "{} of {} requests failed (errors {}, grpc-status != 0: {}, unexpected answer: {}){}",
            report.requests - report.ok,
            report.requests,
            report.errors,
            report.bad_status,
            report.bad_answer,
            report.first_error.map(|e| format!("; first: {e}")).unwrap_or_default()
        ));
    }
    Ok(())
}

async fn stream_loop(mut client: h2::client::SendRequest<Bytes>, shared: Arc<Shared>) -> StreamStats {
    let mut stats = StreamStats::default();
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.total {
            return stats;
        }
        let index = (shared.offset as u64 + i / shared.repeat) % shared.frames.len() as u64;
        let body = shared.frames[index as usize].clone();
        let started = Instant::now();
        match one_call(&mut client, &shared, body).await {
            Ok(outcome) => {
                let elapsed = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                stats.latencies_us.push(elapsed);
                match outcome {
                    Outcome::Ok => stats.ok += 1,
                    Outcome::BadStatus(s) => {
                        stats.bad_status += 1;
                        stats.first_error.get_or_insert(format!("grpc-status {s}"));
                    }
                    Outcome::BadAnswer(tag) => {
                        stats.bad_answer += 1;
                        stats
                            .first_error
                            .get_or_insert(format!("response message starts with tag byte {tag:?}"));
                    }
                }
            }
            Err(err) => {
                stats.errors += 1;
                stats.first_error.get_or_insert(err.to_string());
                if err.is_io() || err.is_go_away() {
                    return stats;
                }
            }
        }
    }
}

enum Outcome {
    Ok,
    BadStatus(String),
    BadAnswer(Option<u8>),
}

async fn one_call(
    client: &mut h2::client::SendRequest<Bytes>,
    shared: &Shared,
    body: Bytes,
) -> Result<Outcome, h2::Error> {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(shared.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(auth) = &shared.authorization {
        request = request.header(http::header::AUTHORIZATION, auth.clone());
    }
    let request = request.body(()).unwrap_or_default();
    std::future::poll_fn(|cx| client.poll_ready(cx)).await?;
    let (response, mut send) = client.send_request(request, false)?;
    send.send_data(body, true)?;
    let response = response.await?;
    let header_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = response.into_body();
    let mut seen = 0usize;
    let mut tag = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        if tag.is_none() && seen + chunk.len() > 5 {
            tag = chunk.get(5usize.saturating_sub(seen)).copied();
        }
        seen += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailer_status = body
        .trailers()
        .await?
        .and_then(|t| t.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned));
    let status = trailer_status.or(header_status).unwrap_or_else(|| "missing".into());
    if status != "0" {
        return Ok(Outcome::BadStatus(status));
    }
    if tag != Some(shared.expect_tag) {
        return Ok(Outcome::BadAnswer(tag));
    }
    Ok(Outcome::Ok)
}
