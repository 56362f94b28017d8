//! Metrics: verification counters flushed into shared buckets, the
//! migration stats behind GetMigrationStats and StreamMigrationMetrics, and
//! the Prometheus endpoint.

pub mod auth;
pub(crate) mod per_thread;
pub mod prometheus;
mod stats;

pub use auth::{AuthOutcome, AuthRecorder};
pub use stats::{MethodFigures, MigrationStats, StatsSnapshot, StreamSlot, Window};
