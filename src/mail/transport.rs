//! Where an email goes: SMTP (lettre, STARTTLS/TLS and auth from the URL),
//! one `.eml` file per message, or the log (recipient and subject only).

use lettre::{
    AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
};
use secrecy::ExposeSecret;

use crate::{config::MailTransportConfig, storage::OutboxMessage};

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The message itself is unusable (bad address): retrying cannot help.
    #[error("message rejected before sending: {0}")]
    Invalid(String),
    /// The server or the network failed; worth retrying.
    #[error("delivery failed: {0}")]
    Delivery(String),
}

#[derive(Clone)]
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(AsyncFileTransport<Tokio1Executor>),
    Log,
}

#[derive(Clone)]
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.transport {
            Transport::Smtp(_) => "smtp",
            Transport::File(_) => "file",
            Transport::Log => "log",
        };
        f.debug_struct("Mailer").field("transport", &kind).finish()
    }
}

impl Mailer {
    /// `timeout` bounds each SMTP command (the outbox worker bounds the whole send too).
    pub fn new(config: &MailTransportConfig, from: &str, timeout: std::time::Duration) -> Result<Self, String> {
        let from: Mailbox = from.parse().map_err(|e| format!("IDENTITY_MAIL_FROM: {e}"))?;
        let transport = match config {
            MailTransportConfig::Smtp(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
                    .map_err(|_| "IDENTITY_SMTP_URL: not a usable SMTP URL (the value is not shown)".to_owned())?
                    .timeout(Some(timeout))
                    .build(),
            ),
            MailTransportConfig::File(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("IDENTITY_MAIL_DIR: cannot create {}: {e}", dir.display()))?;
                Transport::File(AsyncFileTransport::<Tokio1Executor>::new(dir))
            }
            MailTransportConfig::Log => Transport::Log,
        };
        Ok(Self { transport, from })
    }

    /// Sends one outbox message; `Ok` only once the server accepted it.
    pub async fn send(&self, message: &OutboxMessage) -> Result<(), MailError> {
        let to: Mailbox = message
            .recipient
            .parse()
            .map_err(|_| MailError::Invalid("bad recipient address".into()))?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .multipart(MultiPart::alternative_plain_html(
                message.body_text.clone(),
                message.body_html.clone(),
            ))
            .map_err(|e| MailError::Invalid(e.to_string()))?;
        match &self.transport {
            Transport::Smtp(smtp) => smtp
                .send(email)
                .await
                .map(|_| ())
                .map_err(|e| MailError::Delivery(e.to_string())),
            Transport::File(file) => file
                .send(email)
                .await
                .map(|_| ())
                .map_err(|e| MailError::Delivery(e.to_string())),
            Transport::Log => {
                // The body carries the migration link: it is not logged.
                tracing::info!(kind = %message.kind, subject = %message.subject, "email (log transport; body withheld)");
                Ok(())
            }
        }
    }
}
