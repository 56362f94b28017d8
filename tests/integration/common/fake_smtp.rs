//! A small SMTP server on loopback that captures messages, and can refuse
//! connections or fail deliveries for a while.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

#[derive(Default)]
pub struct SmtpState {
    pub messages: Mutex<Vec<String>>,
    /// Connections to drop at once (the server "refuses").
    pub refuse: AtomicUsize,
    /// DATA commands to answer with a temporary failure.
    pub fail_data: AtomicUsize,
    /// How long the server takes to accept a message (a slow server).
    pub data_delay: Mutex<std::time::Duration>,
}

pub struct FakeSmtp {
    pub addr: SocketAddr,
    pub state: Arc<SmtpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn session(stream: tokio::net::TcpStream, state: Arc<SmtpState>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 fake.smtp ESMTP\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        if command.starts_with("EHLO") || command.starts_with("HELO") {
            write.write_all(b"250-fake.smtp\r\n250 8BITMIME\r\n").await?;
        } else if command.starts_with("MAIL") || command.starts_with("RCPT") || command == "RSET" || command == "NOOP" {
            write.write_all(b"250 OK\r\n").await?;
        } else if command == "DATA" {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut body = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                body.push_str(
                    line.strip_prefix('.')
                        .filter(|_| line.starts_with(".."))
                        .unwrap_or(&line),
                );
            }
            let delay = *state.data_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if take_one(&state.fail_data) {
                write.write_all(b"451 try again later\r\n").await?;
            } else {
                state.messages.lock().unwrap().push(body);
                write.write_all(b"250 queued\r\n").await?;
            }
        } else if command == "QUIT" {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            write.write_all(b"502 not implemented\r\n").await?;
        }
    }
}

impl FakeSmtp {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(SmtpState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if take_one(&shared.refuse) {
                    drop(stream);
                    continue;
                }
                tokio::spawn(session(stream, shared.clone()));
            }
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    pub fn messages(&self) -> Vec<String> {
        self.state.messages.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived (up to 30 s).
    pub async fn wait_for(&self, n: usize) -> Vec<String> {
        for _ in 0..300 {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("expected {n} messages, got {}", self.messages().len());
    }
}

/// The plain-text and HTML bodies and the subject of a captured message.
pub fn parse(raw: &str) -> (String, String, String) {
    let message = mail_parser::MessageParser::default()
        .parse(raw.as_bytes())
        .expect("a MIME message");
    (
        message.subject().unwrap_or_default().to_owned(),
        message.body_text(0).map(|b| b.into_owned()).unwrap_or_default(),
        message.body_html(0).map(|b| b.into_owned()).unwrap_or_default(),
    )
}

/// The migration token in a captured invitation.
pub fn token_in(raw: &str) -> String {
    let (_, text, _) = parse(raw);
    let at = text
        .find("migrate#token=")
        .or_else(|| text.find("migrate?token="))
        .expect("a migration link")
        + "migrate#token=".len();
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}
