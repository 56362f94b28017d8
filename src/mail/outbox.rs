//! The outbox worker: leases due messages (several replicas never hold the
//! same one), sends them, and marks each sent only after the server
//! accepted it. Failures are retried with exponential backoff up to the
//! maximum number of attempts; a restart picks up whatever is still due.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::watch;

use super::Mailer;
use crate::{config::MailConfig, storage::Storage};

/// How long a claimed message is reserved for this worker.
const LEASE: Duration = Duration::from_secs(120);
const BATCH: u32 = 20;

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

    /// Delivers what is due now; returns how many messages were handled.
    pub async fn run_once(&self) -> usize {
        let now = Utc::now();
        let lease_until = now + chrono::Duration::from_std(LEASE).unwrap_or_else(|_| chrono::Duration::minutes(2));
        let batch = match self.storage.claim_outbox(&self.id, now, lease_until, BATCH).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the outbox");
                return 0;
            }
        };
        for message in &batch {
            let attempt = message.attempts + 1;
            let outcome = self.mailer.send(message).await;
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
        batch.len()
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
            if handled as u32 >= BATCH {
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
