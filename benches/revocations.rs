//! One revocation reload tick with 1,000,000 unexpired revocations stored
//! (a mass logout) and a few new ones, against the full reload every tick
//! used to be:
//!
//! - `revocations/tick_incremental`: `RevocationList::reload` as the
//!   background task runs it every `IDENTITY_SETTINGS_REFRESH_SECONDS`, with
//!   the default overlap; each iteration first writes 10 new revocations
//!   (untimed) and ages the previous iteration's out of the overlap window,
//!   so a tick finds 10 changed rows among the million;
//! - `revocations/tick_full_reload_before`: what every tick did before,
//!   `active_revocations` and two fresh hash sets of every entry;
//! - `revocations/full_reload_now`: the start-up read (and hourly backstop)
//!   of the new list, into its concurrent maps.
//!
//! The database is SQLite (the default backend) in a temporary file; set
//! `IDENTITY_BENCH_POSTGRES_URL` to a database this may fill (a fresh one)
//! to measure PostgreSQL instead. `IDENTITY_BENCH_REVOCATIONS` changes the
//! million.
//!
//! Run: `cargo bench --bench revocations` (add `-- --quick` for a short run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use identity::{
    storage::{self, DatabaseOptions, Storage},
    verification::{OVERLAP, RevocationList},
};
use sqlx::Connection;

/// Revocations written per tick.
const NEW_PER_TICK: usize = 10;

struct Setup {
    url: String,
    postgres: bool,
    storage: Arc<dyn Storage>,
    _dir: Option<tempfile::TempDir>,
}

async fn setup(count: usize) -> Setup {
    let (url, postgres, dir) = match std::env::var("IDENTITY_BENCH_POSTGRES_URL") {
        Ok(url) => (url, true, None),
        Err(_) => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            (url, false, Some(dir))
        }
    };
    let storage = storage::connect(&url, &DatabaseOptions::default(), true).await.unwrap();
    let started = Instant::now();
    // One statement per backend writes the million, stamped an hour ago.
    let fill = if postgres {
        format!(
            "INSERT INTO identity_revocations (id, jti, expires_at, revoked_at, updated_at)
             SELECT gen_random_uuid(), 'mass-' || n, now() + interval '1 day', now() - interval '1 hour',
                    now() - interval '1 hour'
             FROM generate_series(1, {count}) AS n ON CONFLICT DO NOTHING"
        )
    } else {
        let day = Utc::now().timestamp_micros() + 86_400_000_000;
        let hour_ago = Utc::now().timestamp_micros() - 3_600_000_000;
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
             INSERT OR IGNORE INTO identity_revocations (id, jti, expires_at, revoked_at, updated_at)
             SELECT 'mass-' || i, 'mass-' || i, {day}, {hour_ago}, {hour_ago} FROM n"
        )
    };
    execute(&url, postgres, &fill).await;
    eprintln!(
        "revocations: {} with {count} revocations stored (filled in {:.1?}), {NEW_PER_TICK} new per tick, overlap {OVERLAP:?}",
        if postgres { "PostgreSQL" } else { "SQLite" },
        started.elapsed()
    );
    Setup {
        url,
        postgres,
        storage,
        _dir: dir,
    }
}

async fn execute(url: &str, postgres: bool, sql: &str) {
    if postgres {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// Writes the next few revocations through the service's own path and moves
/// the previous ones out of the overlap window (the time a tick has passed).
async fn new_revocations(setup: &Setup, tick: usize) {
    let age = if setup.postgres {
        "UPDATE identity_revocations SET updated_at = updated_at - interval '1 hour' WHERE jti LIKE 'tick-%'".to_owned()
    } else {
        "UPDATE identity_revocations SET updated_at = updated_at - 3600000000 WHERE jti LIKE 'tick-%'".to_owned()
    };
    execute(&setup.url, setup.postgres, &age).await;
    for n in 0..NEW_PER_TICK {
        let revocation = storage::NewRevocation {
            jti: Some(format!("tick-{tick}-{n}")),
            token_hash: None,
            user_id: None,
            expires_at: Utc::now() + chrono::Duration::hours(1),
        };
        let audit = storage::NewAuditEvent {
            caller: "bench".into(),
            action: "token.revoke".into(),
            user_id: None,
            outcome: identity::domain::AuditOutcome::Success,
            detail: String::new(),
        };
        setup.storage.revoke_token(&revocation, &audit).await.unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let count = std::env::var("IDENTITY_BENCH_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let setup = runtime.block_on(setup(count));
    let list = RevocationList::new(setup.storage.clone());
    let first = runtime.block_on(list.full_reload()).unwrap();
    assert!(first.held >= count, "{first:?}");
    let ticks = AtomicUsize::new(0);

    let mut group = c.benchmark_group("revocations");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("tick_incremental", |b| {
        b.iter_batched(
            || runtime.block_on(new_revocations(&setup, ticks.fetch_add(1, Ordering::Relaxed))),
            |()| {
                let stats = runtime.block_on(list.reload()).unwrap();
                assert!(!stats.full && stats.read <= 2 * NEW_PER_TICK, "{stats:?}");
                stats
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("tick_full_reload_before", |b| {
        b.iter(|| {
            let records = runtime.block_on(setup.storage.active_revocations(Utc::now())).unwrap();
            let mut jtis = HashSet::new();
            let mut hashes = HashSet::new();
            for record in records {
                if let Some(jti) = record.jti {
                    jtis.insert(jti);
                }
                if let Some(hash) = record.token_hash {
                    hashes.insert(hash);
                }
            }
            (jtis.len(), hashes.len())
        })
    });
    group.bench_function("full_reload_now", |b| {
        b.iter_batched(
            || RevocationList::new(setup.storage.clone()),
            |fresh| runtime.block_on(fresh.full_reload()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(revocations, benches);
criterion_main!(revocations);
