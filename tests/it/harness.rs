//! Test harness: a database of its own for every test (created from a
//! migrated template), an app on port 0, helpers that run background work
//! inside the test instead of sleeping. A service that cannot be reached
//! fails the test; nothing is ever skipped.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use slate_events::projections::{self, Projection};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// The PostgreSQL server the tests use (any database on it; each test gets
/// its own).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A child process (`slate serve`, `slate work`, a driver) that is killed
/// when the test ends, passed or failed.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait (up to 30 s) until a `slate serve` process spawned at `address`
/// answers `/healthz`; fails the test if it exits first (`alive` says
/// whether it still runs) or never answers.
pub async fn until_serving(address: &str, mut alive: impl FnMut() -> bool) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while client
        .get(format!("{address}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(alive(), "serve exited");
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub async fn admin_connection(url: &str) -> PgConnection {
    let options: PgConnectOptions = url.parse().expect("a PostgreSQL URL");
    match options
        .database("postgres")
        .disable_statement_logging()
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL unreachable at {url} ({e}); run scripts/services (or scripts/test), \
             which installs and starts it"
        ),
    }
}

fn with_database(url: &str, db: &str) -> PgConnectOptions {
    let options: PgConnectOptions = url.parse().expect("a PostgreSQL URL");
    options.database(db).disable_statement_logging()
}

/// A fingerprint of every migration, so a changed migration gets a new template.
fn migrations_fingerprint() -> String {
    let mut h = DefaultHasher::new();
    for m in slate_events::db::migrator().iter() {
        m.version.hash(&mut h);
        m.checksum.hash(&mut h);
    }
    env!("CARGO_PKG_VERSION").hash(&mut h);
    format!("{:016x}", h.finish())
}

const TEMPLATE_LOCK: i64 = 0x736c_6174_6500;

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let url = server_url();
            let name = format!("slate_tmpl_{}", migrations_fingerprint());
            let mut admin = admin_connection(&url).await;
            sqlx::query("select pg_advisory_lock($1)")
                .bind(TEMPLATE_LOCK)
                .execute(&mut admin)
                .await
                .unwrap();
            let exists: bool =
                sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            if !exists {
                let building = format!("{name}_building");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {building}"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("create database {building}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let pool = PgPool::connect_with(with_database(&url, &building))
                    .await
                    .unwrap();
                slate::migrate::run(&pool).await.expect("migrations run");
                pool.close().await;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "alter database {building} rename to {name}"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
            }
            sqlx::query("select pg_advisory_unlock($1)")
                .bind(TEMPLATE_LOCK)
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.ok();
            name
        })
        .await
}

/// A migrated database of this test's own.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with_pool_size(20).await
    }

    pub async fn with_pool_size(max: u32) -> Self {
        let template = template().await;
        let url = server_url();
        let name = format!("slate_test_{}", Uuid::new_v4().simple());
        let mut admin = admin_connection(&url).await;
        // Copying a template needs it to be idle: one copy at a time.
        sqlx::query("select pg_advisory_lock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut admin)
            .await
            .unwrap();
        let created = sqlx::query(sqlx::AssertSqlSafe(format!(
            "create database {name} template {template}"
        )))
        .execute(&mut admin)
        .await;
        sqlx::query("select pg_advisory_unlock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut admin)
            .await
            .unwrap();
        created.expect("test database created");
        admin.close().await.ok();
        let options = with_database(&url, &name);
        let pool = slate_events::db::pool_options()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .expect("connect to the test database");
        let db_url = options.to_url_lossy().to_string();
        Self { pool, url: db_url }
    }

    pub async fn conn(&self) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
        self.pool.acquire().await.unwrap()
    }

    /// Run every asynchronous projection until it has applied every event of
    /// its types. Waits (bounded) while other transactions on the server hold
    /// back the snapshot horizon.
    pub async fn settle_projections(&self) {
        for &p in Projection::ASYNC {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                projections::catch_up(&self.pool, p).await.unwrap();
                let behind: i64 = sqlx::query_scalar(
                    "select count(*) from events e
                      where e.event_type = any($2)
                        and (e.transaction_id, e.global_position) >
                            coalesce((select (last_transaction_id, last_position)
                                        from projection_checkpoints where projection = $1),
                                     ('0'::xid8, 0::bigint))",
                )
                .bind(p.name())
                .bind(p.event_types())
                .fetch_one(&self.pool)
                .await
                .unwrap();
                if behind == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "projection {} still {behind} events behind after 30 s",
                    p.name()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The transactions other connections of this test's database have open:
/// their state and transaction id, if they hold one. A transaction id held
/// open holds back every asynchronous projector's gap-safe reads.
pub async fn open_transactions(pool: &sqlx::PgPool) -> Vec<(Option<String>, Option<String>)> {
    sqlx::query_as(
        "select state, backend_xid::text from pg_stat_activity
          where datname = current_database() and pid <> pg_backend_pid()
            and backend_type = 'client backend'
            and (backend_xid is not null or state like 'idle in transaction%')",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A small deterministic PRNG (xorshift64*), so randomized tests can print
/// and replay their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

impl TestDb {
    /// Wait until a session of this database waits for a lock, or `task`
    /// has finished (then there was nothing to wait for).
    pub async fn until_waiting_for_a_lock<T>(
        &self,
        task: &tokio::task::JoinHandle<T>,
        never: &str,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let waiting: bool = sqlx::query_scalar(
                "select exists(select 1 from pg_stat_activity
                                where datname = current_database() and wait_event_type = 'Lock')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if waiting || task.is_finished() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{never}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The types of generation `id`'s events, in its stream's order.
    pub async fn generation_log(&self, id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "select event_type from events where stream_id = 'generation-' || $1
              order by stream_version",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}
