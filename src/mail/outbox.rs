//! The outbox worker: leases one due message at a time (several replicas
//! never hold the same one), sends it, and marks it sent only after the
//! server accepted it. Failures are retried with exponential backoff up to
//! the maximum number of attempts; a restart picks up whatever is still due.
//!
//! A message is leased alone, for three times the send timeout (plus a
//! margin), and its send is cut at the timeout: the lease cannot lapse while
//! it is being sent, so no other replica sends it meanwhile. (Leasing a batch
//! and sending it in turn let the later leases expire mid-batch.)

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::watch;

use super::Mailer;
use crate::{
    config::MailConfig,
    storage::{OutboxMessage, Storage},
};

/// Messages handled per poll before the worker polls again at once.
const BATCH: usize = 20;
/// Added to a message's lease beyond three send timeouts.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct OutboxWorker {
    storage: Arc<dyn Storage>,
    mailer: Mailer,
    config: MailConfig,
    id: String,
}

/// The delay after failed attempt `attempt` (1-based): `base`, doubling, at most an hour.
fn retry_delay(base: Duration, attempt: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(Duration::from_secs(3600))
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_secs(3600))
}

impl OutboxWorker {
    pub fn new(storage: Arc<dyn Storage>, mailer: Mailer, config: MailConfig) -> Self {
        Self {
            storage,
            mailer,
            config,
            id: format!("outbox-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// How long one claimed message is reserved for this worker: longer
    /// than its send (cut at the timeout) and the write of its outcome.
    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.send_timeout.saturating_mul(3).saturating_add(LEASE_MARGIN))
            .unwrap_or_else(|_| chrono::Duration::minutes(15))
    }

    /// Delivers what is due now (up to [`BATCH`] messages, each leased on
    /// its own); returns how many messages were handled.
    pub async fn run_once(&self) -> usize {
        let mut handled = 0;
        while handled < BATCH {
            let now = Utc::now();
            let message = match self.storage.claim_outbox(&self.id, now, now + self.lease(), 1).await {
                Ok(mut claimed) => match claimed.pop() {
                    Some(message) => message,
                    None => break,
                },
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the outbox");
                    break;
                }
            };
            self.deliver(&message).await;
            handled += 1;
        }
        handled
    }

    /// Sends one leased message and records the outcome.
    async fn deliver(&self, message: &OutboxMessage) {
        let attempt = message.attempts + 1;
        let outcome = match tokio::time::timeout(self.config.send_timeout, self.mailer.send(message)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(super::MailError::Delivery(format!(
                "no answer within {} s",
                self.config.send_timeout.as_secs()
            ))),
        };
        let recorded = match outcome {
            Ok(()) => {
                tracing::info!(id = %message.id, kind = %message.kind, attempt, "email sent");
                self.storage.outbox_sent(message.id, &self.id).await
            }
            Err(err) => {
                let give_up = attempt >= self.config.max_attempts || matches!(err, super::MailError::Invalid(_));
                let retry_at = (!give_up).then(|| {
                    Utc::now()
                        + chrono::Duration::from_std(retry_delay(self.config.retry_base, attempt))
                            .unwrap_or_else(|_| chrono::Duration::hours(1))
                });
                if give_up {
                    tracing::error!(id = %message.id, attempt, error = %err, "email given up");
                } else {
                    tracing::warn!(id = %message.id, attempt, error = %err, "email not sent; will retry");
                }
                self.storage
                    .outbox_failed(message.id, &self.id, &err.to_string(), retry_at)
                    .await
            }
        };
        if let Err(err) = recorded {
            // The lease expires and the message is tried again: at least once, never lost.
            tracing::warn!(id = %message.id, error = %err, "cannot record the delivery outcome");
        }
    }

    /// Publishes the outbox depth for Prometheus.
    async fn report_depth(&self) {
        if let Ok(counts) = self.storage.outbox_counts().await {
            ::metrics::gauge!("identity_outbox_messages", "state" => "pending").set(counts.pending as f64);
            ::metrics::gauge!("identity_outbox_messages", "state" => "sent").set(counts.sent as f64);
            ::metrics::gauge!("identity_outbox_messages", "state" => "failed").set(counts.failed as f64);
        }
    }

    /// Polls until `stop` flips.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let handled = self.run_once().await;
            self.report_depth().await;
            if handled >= BATCH {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(5);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(5));
        assert_eq!(retry_delay(base, 2), Duration::from_secs(10));
        assert_eq!(retry_delay(base, 3), Duration::from_secs(20));
        assert_eq!(retry_delay(base, 30), Duration::from_secs(3600));
    }
}
