//! The operator's store: PostgreSQL, through tokio-postgres and a
//! deadpool pool, so that several core-ingest instances (stateless: any may
//! take any node's connection) share one database.
//!
//! * **Serialisation.** A batch's transaction takes the node's cursor row
//!   with `SELECT ... FOR UPDATE` (after making sure the row exists), so
//!   two instances committing batches of one node at once run one after
//!   the other, and the second places its batch against the cursor the
//!   first left.
//! * **Exactly once.** `record_keys(node_id, seq)` is the unique key: one
//!   row per stored record, whatever partition the record went to (a
//!   unique index on a partitioned table must contain the partition key,
//!   so the key lives beside it). It also holds what the audit walks
//!   (`prev_hash`, `hash`), so an audit never scans the records.
//! * **Partitions.** `records` is partitioned by range of
//!   `end_time_unix_ms`, a partition per UTC month (`records_y2026m12`),
//!   created ahead at start and daily by `serve` (this month, the last one
//!   and the next three); records outside them (a box whose clock is far
//!   off) land in `records_default`. An export of a month reads one
//!   partition; an old month can be detached and archived
//!   (`docs/core-postgres.md`).
//! * **Schema versions.** `schema_migrations(version)`; the migrations in
//!   [`MIGRATIONS`] run at start in one transaction under an advisory lock
//!   (instances starting together migrate once); a database with a newer
//!   version than this binary knows is refused.
//! * **Credentials.** The URL names the user, never needs the password:
//!   it comes from `PGPASSWORD`, a password file (`password_file` in the
//!   configuration) or `~/.pgpass` (`PGPASSFILE`), and is never logged
//!   (`describe` leaves it out; PostgreSQL's errors do not carry it).
//!
//! The store's methods are synchronous (core-ingest calls them from
//! blocking threads, as it does SQLite's): the store runs its own small
//! tokio runtime for the client and blocks on it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Config, NoTls};

use super::pg_tls::{self, SslMode, TlsRequest};

mod charging;

use super::{
    aside_only, debits_json, known_from, seq_i64, seqs_to_look_up, stored_at, to_i64, ChainAudit,
    ExportQuery, ExportValue, IngestStore, IngestStoreError, KeptAside, NodeAudit, NodeFacts,
    RowSink, StoredRecord,
};
use crate::ingest::{walk, BatchVerdict, CheckedBatch, KnownHashes, NodeCursor};
use crate::record::GENESIS_HASH;

/// The migrations, in order: `MIGRATIONS[i]` brings the schema to version
/// `i + 1`. Append only; never edit one that has shipped.
pub const MIGRATIONS: [&str; 6] = [
    SCHEMA_V1,
    charging::SCHEMA_V2,
    SCHEMA_V3,
    charging::SCHEMA_V4,
    SCHEMA_V5,
    SCHEMA_V6,
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Held (as a transaction-scoped advisory lock) while migrating or
/// creating partitions: instances starting together do it once.
const SCHEMA_LOCK: i64 = 0x6d65_635f_7363_6831;

const SCHEMA_V1: &str = "
CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY,
    contiguous_seq BIGINT NOT NULL,
    last_hash      BYTEA,
    duplicates     BIGINT NOT NULL DEFAULT 0,
    quarantined    BIGINT NOT NULL DEFAULT 0,
    first_seen_ms  BIGINT NOT NULL,
    last_seen_ms   BIGINT NOT NULL
);
CREATE TABLE record_keys (
    node_id          TEXT   NOT NULL,
    seq              BIGINT NOT NULL,
    prev_hash        BYTEA  NOT NULL,
    hash             BYTEA  NOT NULL,
    end_time_unix_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE TABLE records (
    node_id              TEXT    NOT NULL,
    seq                  BIGINT  NOT NULL,
    record_id            BYTEA   NOT NULL,
    schema_version       BIGINT  NOT NULL,
    key_id               TEXT    NOT NULL,
    imsi                 TEXT    NOT NULL,
    app_id               TEXT    NOT NULL,
    model_id             TEXT    NOT NULL,
    prompt_tokens        BIGINT  NOT NULL,
    cached_prompt_tokens BIGINT  NOT NULL,
    completion_tokens    BIGINT  NOT NULL,
    reserved_tokens      BIGINT  NOT NULL,
    billed_tokens        BIGINT  NOT NULL,
    package_ids          TEXT    NOT NULL,
    debits               TEXT    NOT NULL,
    outcome              TEXT    NOT NULL,
    failure_reason       TEXT    NOT NULL,
    start_time_unix_ms   BIGINT  NOT NULL,
    end_time_unix_ms     BIGINT  NOT NULL,
    clock_sync           TEXT    NOT NULL,
    duration_us          BIGINT  NOT NULL,
    ttft_us              BIGINT  NOT NULL,
    offline              BOOLEAN NOT NULL,
    prev_hash            BYTEA   NOT NULL,
    hash                 BYTEA   NOT NULL,
    signed               BYTEA   NOT NULL,
    received_ms          BIGINT  NOT NULL,
    PRIMARY KEY (node_id, seq, end_time_unix_ms)
) PARTITION BY RANGE (end_time_unix_ms);
CREATE TABLE records_default PARTITION OF records DEFAULT;
CREATE INDEX records_by_end ON records (end_time_unix_ms);
CREATE TABLE node_keys (
    node_id       TEXT   NOT NULL,
    public_key    BYTEA  NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, public_key)
);
CREATE TABLE gaps (
    node_id   TEXT   NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL,
    reason    TEXT   NOT NULL,
    PRIMARY KEY (node_id, first_seq)
);
CREATE TABLE quarantine (
    id          BIGSERIAL PRIMARY KEY,
    node_id     TEXT   NOT NULL,
    seq         BIGINT,
    reason      TEXT   NOT NULL,
    signed      BYTEA  NOT NULL,
    received_ms BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    signed_hash BYTEA  NOT NULL,
    UNIQUE (node_id, signed_hash)
);
CREATE INDEX quarantine_by_seq ON quarantine (node_id, seq);
";

/// Version 3: every unique key of the upload's tables holds `node_id`, so
/// that a distributed PostgreSQL (Citus) can distribute them by it.
const SCHEMA_V3: &str = "
ALTER TABLE quarantine DROP CONSTRAINT quarantine_pkey;
ALTER TABLE quarantine ADD PRIMARY KEY (node_id, id);
";

/// What the request asked (issue 24): the app's end user, the choices (0
/// for records from before), the output constraint.
const SCHEMA_V5: &str = "
ALTER TABLE records ADD COLUMN end_user TEXT NOT NULL DEFAULT '';
ALTER TABLE records ADD COLUMN choices INTEGER NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN output_constraint TEXT NOT NULL DEFAULT '';
";

/// Rating (issue 25): the package units charged (0 for records from
/// before: read billed_tokens), the rate table's version and digest.
const SCHEMA_V6: &str = "
ALTER TABLE records ADD COLUMN billed_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN rate_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN rate_digest BYTEA NOT NULL DEFAULT '';
";

/// How core-ingest connects to PostgreSQL (the configuration's
/// `[postgres]` table).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgOptions {
    /// Connections in the pool (batches beyond it wait for one).
    pub pool_size: usize,
    /// How long a batch waits for a free connection before its stream
    /// ends unacknowledged (the node resends it later), seconds.
    pub pool_wait_s: u64,
    /// A file whose first line is the password (instead of `PGPASSWORD`
    /// or `~/.pgpass`).
    pub password_file: Option<PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            pool_wait_s: 30,
            password_file: None,
        }
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    /// Runs the pool's connections; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    described: String,
    user: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // May be dropped inside another runtime, where blocking is refused.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn pg_err(e: tokio_postgres::Error, user: &str) -> IngestStoreError {
    if let Some(db) = e.as_db_error() {
        if db.code() == &SqlState::INSUFFICIENT_PRIVILEGE {
            return IngestStoreError::Privilege {
                user: user.to_string(),
                detail: db.message().to_string(),
            };
        }
        let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
        return IngestStoreError::Postgres(format!("{}: {}{detail}", db.severity(), db.message()));
    }
    // The error and its causes (a refused connection names the address).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    IngestStoreError::Postgres(text)
}

/// The user, host, port and database of `config`, never the password.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// The connection settings: the URL, then the standard `PG*` variables for
/// what it leaves out, then the password from a file.
fn pg_config(url: &str, opts: &PgOptions) -> Result<(Config, TlsRequest), IngestStoreError> {
    let bad = |why: String| IngestStoreError::Location(redact(url), why);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (rest, tls) = pg_tls::split(url, &env).map_err(bad)?;
    let mut config = if rest == "postgres:" || rest == "postgresql:" {
        Config::new()
    } else {
        Config::from_str(&rest).map_err(|e| bad(e.to_string()))?
    };
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    if config.get_hosts().is_empty() {
        // A path is a directory of Unix sockets, as libpq reads it.
        config.host(env("PGHOST").unwrap_or_else(|| "/var/run/postgresql".into()));
    }
    if config.get_ports().is_empty() {
        if let Some(p) = env("PGPORT") {
            config.port(
                p.parse()
                    .map_err(|_| bad(format!("PGPORT {p:?} is not a port")))?,
            );
        }
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .ok_or_else(|| bad("no user: name one in the URL or PGUSER".into()))?;
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        if let Some(db) = env("PGDATABASE") {
            config.dbname(&db);
        }
    }
    if config.get_application_name().is_none() {
        config.application_name("core-ingest");
    }
    if config.get_options().is_none() {
        // Notices ("already exists, skipping") are not the operator's news.
        // The timeouts bound what one stuck instance can hold: a node's
        // cursor lock held by an instance cut off mid-transaction is
        // released within a minute, and a batch waiting on it gives up
        // (unacknowledged: the node sends it again) instead of holding a
        // pool connection for as long as the cut lasts.
        config.options(
            "-c client_min_messages=warning -c lock_timeout=30s -c statement_timeout=120s \
             -c idle_in_transaction_session_timeout=60s",
        );
    }
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    if config.get_password().is_none() {
        if let Some(p) = password(&config, opts)? {
            config.password(p);
        }
    }
    Ok((config, tls))
}

/// Whether `url` carries a password (in its user part or as `password=`).
pub fn url_has_password(url: &str) -> bool {
    Config::from_str(url).is_ok_and(|c| c.get_password().is_some())
        || url.contains("password=")
        || redact(url) != url
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let url = match url.find("password=") {
        Some(q) => {
            let value = q + "password=".len();
            let end = url[value..].find('&').map_or(url.len(), |e| value + e);
            format!("{}***{}", &url[..value], &url[end..])
        }
        None => url.to_string(),
    };
    let url = url.as_str();
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &auth[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `PGPASSWORD`, then the configured file, then the pgpass file.
fn password(config: &Config, opts: &PgOptions) -> Result<Option<String>, IngestStoreError> {
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Ok(Some(p));
    }
    if let Some(file) = &opts.password_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            IngestStoreError::Location(file.display().to_string(), format!("password file: {e}"))
        })?;
        return Ok(text.lines().next().map(str::to_string));
    }
    let pgpass = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")));
    Ok(pgpass
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| pgpass_lookup(&text, config)))
}

/// The password of the first matching `host:port:database:user:password`
/// line (`*` matches anything; `\:` and `\\` are escapes), as libpq reads
/// `~/.pgpass`.
fn pgpass_lookup(text: &str, config: &Config) -> Option<String> {
    let host = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user()?.to_string();
    let db = config.get_dbname().unwrap_or(&user).to_string();
    let want = [host, port, db, user];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let mut fields = vec![String::new()];
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => fields.last_mut()?.extend(chars.next()),
                    ':' if fields.len() < 5 => fields.push(String::new()),
                    c => fields.last_mut()?.push(c),
                }
            }
            (fields.len() == 5
                && fields[..4]
                    .iter()
                    .zip(&want)
                    .all(|(f, w)| f == "*" || f == w))
            .then(|| fields[4].clone())
        })
}

/// The first instant of the UTC month `months` after the one holding
/// `ms`, in Unix ms, and that month's partition name.
fn month_start(ms: i64, months: i32) -> (i64, String) {
    use chrono::{Datelike, TimeZone};
    let t = chrono::Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default();
    let index = t.year() * 12 + t.month0() as i32 + months;
    let (y, m) = (index.div_euclid(12), index.rem_euclid(12) as u32 + 1);
    let start = chrono::Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .map_or(0, |d| d.timestamp_millis());
    (start, format!("records_y{y:04}m{m:02}"))
}

impl PgStore {
    /// Connects to the database at `url`, brings its schema to this
    /// binary's version (or refuses a newer one), and creates the record
    /// partitions around now.
    pub fn connect(url: &str, opts: &PgOptions) -> Result<PgStore, IngestStoreError> {
        let (config, tls) = pg_config(url, opts)?;
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
        let tls_config = pg_tls::client_config(&tls, home.as_deref())
            .map_err(|why| IngestStoreError::Location(redact(url), why))?;
        if tls.mode == SslMode::Disable {
            let remote = config.get_hosts().iter().find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h)
                    if !["localhost", "127.0.0.1", "::1"].contains(&h.as_str()) =>
                {
                    Some(h.clone())
                }
                _ => None,
            });
            if let Some(host) = remote {
                tracing::warn!(
                    %host,
                    "the connection to the database is not encrypted: add \
                     sslmode=verify-full&sslrootcert=PATH to the store URL"
                );
            }
        }
        let described = match tls.mode {
            SslMode::Disable => describe(&config),
            SslMode::VerifyCa => format!("{} (TLS, verify-ca)", describe(&config)),
            SslMode::VerifyFull => format!("{} (TLS, verify-full)", describe(&config)),
        };
        let user = config.get_user().unwrap_or("").to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("core-ingest-pg")
            .enable_all()
            .build()
            .map_err(|e| IngestStoreError::Postgres(format!("starting the client runtime: {e}")))?;
        let manager_config = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls_config {
            None => Manager::from_config(config, NoTls, manager_config()),
            Some(tls) => Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config(),
            ),
        };
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(opts.pool_wait_s)))
            .create_timeout(Some(Duration::from_secs(15)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| IngestStoreError::Postgres(format!("the connection pool: {e}")))?;
        let store = PgStore {
            rt: Some(rt),
            pool,
            described,
            user,
        };
        store.block_on(store.migrate())?;
        store.ensure_partitions(now_ms())?;
        Ok(store)
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
            .block_on(f)
    }

    fn err(&self, e: tokio_postgres::Error) -> IngestStoreError {
        pg_err(e, &self.user)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, IngestStoreError> {
        self.pool.get().await.map_err(|e| match e {
            // Where it tried to connect (never the password).
            PoolError::Backend(e) => match self.err(e) {
                IngestStoreError::Postgres(m) if m.contains("invalid peer certificate") => {
                    IngestStoreError::Postgres(format!(
                        "{}: {m} (is sslrootcert the CA that signed the database server's \
                         certificate, and does that certificate name the host connected to?)",
                        self.described
                    ))
                }
                IngestStoreError::Postgres(m) => {
                    IngestStoreError::Postgres(format!("{}: {m}", self.described))
                }
                other => other,
            },
            PoolError::Timeout(_) => IngestStoreError::Postgres(format!(
                "no database connection free or made in time (pool of {}; {})",
                self.pool.status().max_size,
                self.described
            )),
            other => IngestStoreError::Postgres(format!("{}: {other}", self.described)),
        })
    }

    /// A transaction at READ COMMITTED whatever the database's default: a
    /// second instance waiting on a cursor's row lock then reads what the
    /// first committed (under REPEATABLE READ it would fail instead).
    async fn begin<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, IngestStoreError> {
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| self.err(e))
    }

    /// One query on a pooled connection, outside any transaction.
    fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, IngestStoreError> {
        self.block_on(async {
            let client = self.client().await?;
            client.query(sql, params).await.map_err(|e| self.err(e))
        })
    }

    /// The schema version the database is at (0: none).
    pub fn schema_version(&self) -> Result<i32, IngestStoreError> {
        let rows = self.rows(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            &[],
        )?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    async fn migrate(&self) -> Result<(), IngestStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| self.err(e))?;
        // Made only where missing: `CREATE ... IF NOT EXISTS` still asks
        // for CREATE on the schema, which a user that only writes rows to a
        // current schema need not hold.
        let versioned: bool = tx
            .query_one(
                "SELECT to_regclass(quote_ident(current_schema()) || '.schema_migrations') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        if !versioned {
            tx.batch_execute(
                "CREATE TABLE schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        let found: i32 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        if found > SCHEMA_VERSION {
            return Err(IngestStoreError::NewerSchema {
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as i32 + 1;
            tx.batch_execute(sql).await.map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(|e| self.err(e))?;
            tracing::info!(version, store = %self.described, "schema migrated");
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Creates the monthly partitions of `records` from the month before
    /// `now_ms` to three months after it (those that exist are kept). A
    /// month's records that arrived before its partition, in the default
    /// partition, move into it as it is made. A month that cannot be made
    /// is logged and left to the next upkeep; the others are still made.
    /// Returns the months that exist.
    pub fn ensure_partitions(&self, now_ms: i64) -> Result<Vec<String>, IngestStoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let mut made = Vec::new();
            for months in -1..=3 {
                let (from, name) = month_start(now_ms, months);
                let (to, _) = month_start(now_ms, months + 1);
                // One month's failure (a right missing, a lock not had in
                // time) leaves its records in the default partition, where
                // nothing is lost: logged, and tried again at the next
                // upkeep; the other months are still made.
                match self.make_month(&mut client, &name, from, to).await {
                    Ok(()) => made.push(name),
                    Err(e) => tracing::warn!(partition = %name, error = %e, "partition not made; its records wait in records_default"),
                }
            }
            Ok(made)
        })
    }

    /// Makes `records`' partition `name` for `[from, to)` unless it exists,
    /// moving the month's records out of the default partition into it.
    async fn make_month(
        &self,
        client: &mut deadpool_postgres::Object,
        name: &str,
        from: i64,
        to: i64,
    ) -> Result<(), IngestStoreError> {
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| self.err(e))?;
        // Made already (by this instance or another): nothing to do, and
        // nothing asked of a user that does not own `records`.
        let exists: bool = tx
            .query_one(
                "SELECT to_regclass(quote_ident(current_schema()) || '.' || $1) IS NOT NULL",
                &[&name],
            )
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        if exists {
            return tx.commit().await.map_err(|e| self.err(e));
        }
        // Records of this month that arrived before its partition (a box's
        // clock months ahead, say) wait in the default partition, and
        // PostgreSQL refuses a partition whose rows the default holds: they
        // move into the new partition in the transaction that makes it, so
        // the month is whole and no reader sees it half moved. `records` is
        // locked first, so that no batch adds a row of the month to the
        // default partition between the move and the making (a batch
        // already running is waited for; the next ones wait for the commit).
        let stray = "moving_from_default";
        tx.batch_execute(&format!(
            "LOCK TABLE records IN ACCESS EXCLUSIVE MODE;
             CREATE TEMP TABLE {stray} (LIKE records) ON COMMIT DROP;
             WITH moved AS (DELETE FROM records_default
                            WHERE end_time_unix_ms >= {from} AND end_time_unix_ms < {to}
                            RETURNING *)
             INSERT INTO {stray} SELECT * FROM moved;
             CREATE TABLE {name} PARTITION OF records FOR VALUES FROM ({from}) TO ({to});
             INSERT INTO records SELECT * FROM {stray};"
        ))
        .await
        .map_err(|e| self.err(e))?;
        let moved: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {stray}"), &[])
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        tx.commit().await.map_err(|e| self.err(e))?;
        if moved > 0 {
            tracing::info!(partition = %name, moved, "records of the month moved out of the default partition");
        }
        Ok(())
    }

    async fn cursor_locked(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        node_id: &str,
        now_ms: i64,
    ) -> Result<NodeCursor, IngestStoreError> {
        // The row first (a new node's cursor is the genesis), then the lock:
        // a second instance waits here until the first commits.
        let insert = tx
            .prepare_cached(
                "INSERT INTO nodes (node_id, contiguous_seq, last_hash, first_seen_ms, last_seen_ms)
                 VALUES ($1, 0, $2, $3, $3) ON CONFLICT (node_id) DO NOTHING",
            )
            .await
            .map_err(|e| self.err(e))?;
        tx.execute(&insert, &[&node_id, &GENESIS_HASH.as_slice(), &now_ms])
            .await
            .map_err(|e| self.err(e))?;
        let lock = tx
            .prepare_cached(
                "SELECT contiguous_seq, last_hash FROM nodes WHERE node_id = $1 FOR UPDATE",
            )
            .await
            .map_err(|e| self.err(e))?;
        let row = tx
            .query_one(&lock, &[&node_id])
            .await
            .map_err(|e| self.err(e))?;
        let hash: Option<Vec<u8>> = row.get(1);
        Ok(NodeCursor {
            node_id: node_id.to_string(),
            contiguous_seq: row.get::<_, i64>(0) as u64,
            last_hash: hash.and_then(|h| h.try_into().ok()),
        })
    }

    async fn known_hashes(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        node_id: &str,
        seqs: &[u64],
    ) -> Result<KnownHashes, IngestStoreError> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|&s| i64::try_from(s).ok()).collect();
        let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(u64, Vec<u8>)> {
            rows.iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect()
        };
        let stored = client
            .prepare_cached(
                "SELECT seq, hash FROM record_keys WHERE node_id = $1 AND seq = ANY($2)",
            )
            .await
            .map_err(|e| self.err(e))?;
        let stored = client
            .query(&stored, &[&node_id, &seqs])
            .await
            .map_err(|e| self.err(e))?;
        let forks = client
            .prepare_cached(
                "SELECT seq, signed FROM quarantine WHERE node_id = $1 AND seq = ANY($2) AND kind = 'fork' ORDER BY id",
            )
            .await
            .map_err(|e| self.err(e))?;
        let forks = client
            .query(&forks, &[&node_id, &seqs])
            .await
            .map_err(|e| self.err(e))?;
        Ok(known_from(pairs(stored), pairs(forks)))
    }

    async fn commit(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        v: &BatchVerdict,
        now_ms: i64,
    ) -> Result<(), IngestStoreError> {
        let node = v.cursor.node_id.as_str();
        if !v.accepted.is_empty() {
            self.insert_records(tx, v, now_ms).await?;
        }
        for (ranges, reason) in [(&v.gaps, "edge_salvaged"), (&v.lost_by_core, "core_lost")] {
            for (first, last) in ranges {
                tx.execute(
                    "INSERT INTO gaps (node_id, first_seq, last_seq, reason) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&node, &seq_i64(*first)?, &seq_i64(*last)?, &reason],
                )
                .await
                .map_err(|e| self.err(e))?;
            }
        }
        // A resend of bytes already kept aside is not kept (nor counted) again.
        let mut quarantined = 0i64;
        for q in &v.quarantined {
            let seq = q.seq.map(seq_i64).transpose()?;
            let kind = if q.fork { "fork" } else { "fault" };
            quarantined += tx
                .execute(
                    "INSERT INTO quarantine (node_id, seq, reason, signed, received_ms, kind, signed_hash)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node_id, signed_hash) DO NOTHING",
                    &[
                        &node,
                        &seq,
                        &q.reason,
                        &q.signed,
                        &now_ms,
                        &kind,
                        &crate::log::format::sha256(&q.signed).as_slice(),
                    ],
                )
                .await
                .map_err(|e| self.err(e))? as i64;
        }
        let update = tx
            .prepare_cached(
                "UPDATE nodes SET contiguous_seq = GREATEST(contiguous_seq, $2),
                     last_hash = CASE WHEN $2 >= contiguous_seq THEN $3 ELSE last_hash END,
                     duplicates = duplicates + $4, quarantined = quarantined + $5, last_seen_ms = $6
                 WHERE node_id = $1",
            )
            .await
            .map_err(|e| self.err(e))?;
        tx.execute(
            &update,
            &[
                &node,
                &seq_i64(v.cursor.contiguous_seq)?,
                &v.cursor.last_hash.map(|h| h.to_vec()),
                &to_i64(v.duplicates),
                &quarantined,
                &now_ms,
            ],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every accepted record in two statements, whatever their number: the
    /// keys (the unique key on (node, seq): a key already there stores
    /// nothing) and then the records whose key went in, from column arrays.
    async fn insert_records(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        v: &BatchVerdict,
        now_ms: i64,
    ) -> Result<(), IngestStoreError> {
        let node = v.cursor.node_id.as_str();
        let a = &v.accepted;
        let col =
            |f: &dyn Fn(&crate::ingest::Accepted) -> i64| a.iter().map(f).collect::<Vec<i64>>();
        let text = |f: &dyn Fn(&crate::ingest::Accepted) -> String| {
            a.iter().map(f).collect::<Vec<String>>()
        };
        let bytes = |f: &dyn Fn(&crate::ingest::Accepted) -> Vec<u8>| {
            a.iter().map(f).collect::<Vec<Vec<u8>>>()
        };
        let seqs = a
            .iter()
            .map(|x| seq_i64(x.seq))
            .collect::<Result<Vec<i64>, _>>()?;
        let hashes = bytes(&|x| x.hash.to_vec());
        let prev = bytes(&|x| x.record.prev_hash.clone());
        let ends = col(&|x| x.record.end_time_unix_ms);
        let keys = tx
            .prepare_cached(
                "INSERT INTO record_keys (node_id, seq, prev_hash, hash, end_time_unix_ms)
                 SELECT $1::text, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[], $5::bigint[])
                 ON CONFLICT DO NOTHING RETURNING seq",
            )
            .await
            .map_err(|e| self.err(e))?;
        let inserted: Vec<i64> = tx
            .query(&keys, &[&node, &seqs, &prev, &hashes, &ends])
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The cursor's lock makes every accepted record new; a key already
        // there would be a record acknowledged and not stored: refuse the
        // batch (rolled back, unacknowledged) instead.
        if inserted.len() != a.len() {
            return Err(IngestStoreError::Postgres(format!(
                "node {node}: {} of {} records of the batch were already stored; the batch is \
                 not committed",
                a.len() - inserted.len(),
                a.len()
            )));
        }
        let record_ids = bytes(&|x| x.record.record_id.clone());
        let schema_versions = col(&|x| i64::from(x.record.schema_version));
        let key_ids = text(&|x| x.record.key_id.clone());
        let imsis = text(&|x| x.record.imsi.clone());
        let app_ids = text(&|x| x.record.app_id.clone());
        let model_ids = text(&|x| x.record.model_id.clone());
        let prompt = col(&|x| to_i64(x.record.prompt_tokens));
        let cached = col(&|x| to_i64(x.record.cached_prompt_tokens));
        let completion = col(&|x| to_i64(x.record.completion_tokens));
        let reserved = col(&|x| to_i64(x.record.reserved_tokens));
        let billed = col(&|x| to_i64(x.record.billed_tokens));
        let packages = text(&|x| serde_json::to_string(&x.record.package_ids).unwrap_or_default());
        let debits = text(&|x| debits_json(&x.record));
        let outcomes = text(&|x| x.record.outcome().as_str_name().to_string());
        let failures = text(&|x| x.record.failure_reason.clone());
        let starts = col(&|x| x.record.start_time_unix_ms);
        let clocks = text(&|x| x.record.clock_sync().as_str_name().to_string());
        let durations = col(&|x| to_i64(x.record.duration_us));
        let ttfts = col(&|x| to_i64(x.record.ttft_us));
        let offline: Vec<bool> = a.iter().map(|x| x.record.offline).collect();
        let signed = bytes(&|x| x.signed.clone());
        let end_users = text(&|x| x.record.end_user.clone());
        let choices: Vec<i32> = a
            .iter()
            .map(|x| i32::try_from(x.record.choices).unwrap_or(i32::MAX))
            .collect();
        let constraints = text(&|x| x.record.constraint.clone());
        let units = col(&|x| to_i64(crate::record::units_charged(&x.record)));
        let rate_versions = col(&|x| to_i64(x.record.rate_version));
        let rate_digests = bytes(&|x| x.record.rate_digest.clone());
        // Every row: the check above makes each of them new.
        let params: [&(dyn ToSql + Sync); 33] = [
            &node,
            &seqs,
            &record_ids,
            &schema_versions,
            &key_ids,
            &imsis,
            &app_ids,
            &model_ids,
            &prompt,
            &cached,
            &completion,
            &reserved,
            &billed,
            &packages,
            &debits,
            &outcomes,
            &failures,
            &starts,
            &ends,
            &clocks,
            &durations,
            &ttfts,
            &offline,
            &prev,
            &hashes,
            &signed,
            &now_ms,
            &end_users,
            &choices,
            &constraints,
            &units,
            &rate_versions,
            &rate_digests,
        ];
        let insert = tx
            .prepare_cached(
            "INSERT INTO records (node_id, seq, record_id, schema_version, key_id, imsi, app_id,
                 model_id, prompt_tokens, cached_prompt_tokens, completion_tokens, reserved_tokens,
                 billed_tokens, package_ids, debits, outcome, failure_reason, start_time_unix_ms,
                 end_time_unix_ms, clock_sync, duration_us, ttft_us, offline, prev_hash, hash,
                 signed, received_ms, end_user, choices, output_constraint, billed_units,
                 rate_version, rate_digest)
             SELECT $1::text, r.seq, r.record_id, r.schema_version, r.key_id, r.imsi, r.app_id,
                 r.model_id, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens,
                 r.reserved_tokens, r.billed_tokens, r.package_ids, r.debits, r.outcome,
                 r.failure_reason, r.start_time_unix_ms, r.end_time_unix_ms, r.clock_sync,
                 r.duration_us, r.ttft_us, r.offline, r.prev_hash, r.hash, r.signed,
                 $27::bigint, r.end_user, r.choices, r.output_constraint, r.billed_units,
                 r.rate_version, r.rate_digest
             FROM unnest($2::bigint[], $3::bytea[], $4::bigint[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[],
                 $12::bigint[], $13::bigint[], $14::text[], $15::text[], $16::text[], $17::text[],
                 $18::bigint[], $19::bigint[], $20::text[], $21::bigint[], $22::bigint[],
                 $23::boolean[], $24::bytea[], $25::bytea[], $26::bytea[], $28::text[],
                 $29::int[], $30::text[], $31::bigint[], $32::bigint[], $33::bytea[])
                 AS r(seq, record_id, schema_version, key_id, imsi, app_id, model_id,
                      prompt_tokens, cached_prompt_tokens, completion_tokens, reserved_tokens,
                      billed_tokens, package_ids, debits, outcome, failure_reason,
                      start_time_unix_ms, end_time_unix_ms, clock_sync, duration_us, ttft_us,
                      offline, prev_hash, hash, signed, end_user, choices, output_constraint,
                      billed_units, rate_version, rate_digest)",
            )
            .await
            .map_err(|e| self.err(e))?;
        tx.execute(&insert, &params)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn audit_node(
        &self,
        client: &deadpool_postgres::Object,
        node_id: String,
        contiguous: i64,
        duplicates: i64,
        quarantined: i64,
    ) -> Result<NodeAudit, IngestStoreError> {
        let gaps = client
            .query(
                "SELECT first_seq, last_seq, reason FROM gaps WHERE node_id = $1 ORDER BY first_seq",
                &[&node_id],
            )
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64, r.get(2)))
            .collect();
        let forks = client
            .query(
                "SELECT seq, signed FROM quarantine WHERE node_id = $1 AND kind = 'fork' ORDER BY seq, id",
                &[&node_id],
            )
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect();
        let quarantined_seqs = client
            .query(
                "SELECT seq FROM quarantine WHERE node_id = $1 AND seq IS NOT NULL",
                &[&node_id],
            )
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        let mut audit = ChainAudit::new(NodeFacts {
            node_id: node_id.clone(),
            contiguous_seq: contiguous as u64,
            duplicates: duplicates as u64,
            quarantined: quarantined as u64,
            gaps,
            forks,
            quarantined_seqs,
        });
        // Streamed: a node's chain is never held in memory whole.
        let rows = client
            .query_raw(
                "SELECT seq, prev_hash, hash FROM record_keys WHERE node_id = $1 ORDER BY seq",
                [&node_id],
            )
            .await
            .map_err(|e| self.err(e))?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
            audit.push(row.get::<_, i64>(0) as u64, row.get(1), row.get(2));
        }
        Ok(audit.finish())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl IngestStore for PgStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    fn position(&self, node_id: &str) -> Result<(NodeCursor, Option<[u8; 32]>), IngestStoreError> {
        self.block_on(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT contiguous_seq, last_hash FROM nodes WHERE node_id = $1",
                    &[&node_id],
                )
                .await
                .map_err(|e| self.err(e))?;
            let cursor = match row {
                None => NodeCursor::new(node_id),
                Some(row) => NodeCursor {
                    node_id: node_id.to_string(),
                    contiguous_seq: row.get::<_, i64>(0) as u64,
                    last_hash: row
                        .get::<_, Option<Vec<u8>>>(1)
                        .and_then(|h| h.try_into().ok()),
                },
            };
            let known = self
                .known_hashes(&client, node_id, &[cursor.contiguous_seq])
                .await?;
            let at = stored_at(&cursor, &known);
            Ok((cursor, at))
        })
    }

    fn ingest(
        &self,
        node_id: &str,
        checked: CheckedBatch,
        now_ms: i64,
    ) -> Result<BatchVerdict, IngestStoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let cursor = self.cursor_locked(&tx, node_id, now_ms).await?;
            let keys = tx
                .prepare_cached(
                    "INSERT INTO node_keys (node_id, public_key, first_seen_ms) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(|e| self.err(e))?;
            tx.execute(&keys, &[&node_id, &checked.key().as_slice(), &now_ms])
                .await
                .map_err(|e| self.err(e))?;
            let known = self
                .known_hashes(&tx, node_id, &seqs_to_look_up(&cursor, &checked))
                .await?;
            let v = walk(&cursor, checked, &known);
            self.commit(&tx, &v, now_ms).await?;
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(v)
        })
    }

    fn audit(&self) -> Result<Vec<NodeAudit>, IngestStoreError> {
        self.block_on(async {
            let client = self.client().await?;
            let nodes = client
                .query(
                    "SELECT node_id, contiguous_seq, duplicates, quarantined FROM nodes ORDER BY node_id",
                    &[],
                )
                .await
                .map_err(|e| self.err(e))?;
            let mut out = Vec::with_capacity(nodes.len());
            for n in nodes {
                out.push(
                    self.audit_node(&client, n.get(0), n.get(1), n.get(2), n.get(3))
                        .await?,
                );
            }
            Ok(out)
        })
    }

    fn export(&self, q: &ExportQuery, sink: &mut RowSink<'_>) -> Result<u64, IngestStoreError> {
        let sql = if q.by_imsi_day {
            "SELECT imsi, to_char(to_timestamp(end_time_unix_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,
                    COUNT(*)::bigint, SUM(prompt_tokens)::bigint, SUM(cached_prompt_tokens)::bigint,
                    SUM(completion_tokens)::bigint, SUM(billed_tokens)::bigint,
                    SUM(CASE billed_units WHEN 0 THEN billed_tokens ELSE billed_units END)::bigint
             FROM records WHERE end_time_unix_ms >= $1 AND end_time_unix_ms < $2
             GROUP BY imsi, day ORDER BY imsi, day"
        } else {
            "SELECT node_id, seq, encode(record_id, 'hex'), imsi, app_id, model_id, prompt_tokens,
                    cached_prompt_tokens, completion_tokens, billed_tokens, outcome, failure_reason,
                    start_time_unix_ms, end_time_unix_ms, package_ids, offline::int::int8,
                    choices::int8, output_constraint, end_user,
                    CASE billed_units WHEN 0 THEN billed_tokens ELSE billed_units END,
                    rate_version, encode(rate_digest, 'hex')
             FROM records WHERE end_time_unix_ms >= $1 AND end_time_unix_ms < $2
             ORDER BY node_id, seq"
        };
        self.block_on(async {
            let client = self.client().await?;
            let rows = client
                .query_raw(sql, [&q.from_ms, &q.to_ms])
                .await
                .map_err(|e| self.err(e))?;
            pin_mut!(rows);
            let (mut n, mut values) = (0u64, Vec::new());
            while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
                values.clear();
                for (i, c) in row.columns().iter().enumerate() {
                    values.push(if *c.type_() == Type::INT8 {
                        row.get::<_, Option<i64>>(i)
                            .map_or(ExportValue::Null, ExportValue::Int)
                    } else {
                        row.get::<_, Option<String>>(i)
                            .map_or(ExportValue::Null, ExportValue::Text)
                    });
                }
                sink(&values)?;
                n += 1;
            }
            Ok(n)
        })
    }

    fn maintain(&self) -> Result<(), IngestStoreError> {
        self.ensure_partitions(now_ms()).map(|_| ())
    }

    fn is_empty(&self) -> Result<bool, IngestStoreError> {
        let rows = self.rows("SELECT COUNT(*) FROM nodes", &[])?;
        Ok(rows.first().is_none_or(|r| r.get::<_, i64>(0) == 0))
    }

    fn node_keys(&self, node_id: &str) -> Result<Vec<[u8; 32]>, IngestStoreError> {
        let rows = self.rows(
            "SELECT public_key FROM node_keys WHERE node_id = $1 ORDER BY first_seen_ms",
            &[&node_id],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| r.get::<_, Vec<u8>>(0).try_into().ok())
            .collect())
    }

    fn records_after(
        &self,
        node_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, IngestStoreError> {
        let rows = self.rows(
            "SELECT seq, signed, received_ms FROM records WHERE node_id = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
            &[&node_id, &seq_i64(after_seq)?, &to_i64(limit as u64)],
        )?;
        Ok(rows
            .iter()
            .map(|r| StoredRecord {
                seq: r.get::<_, i64>(0) as u64,
                signed: r.get(1),
                received_ms: r.get(2),
            })
            .collect())
    }

    fn kept_aside(&self, node_id: &str) -> Result<Vec<KeptAside>, IngestStoreError> {
        let rows = self.rows(
            "SELECT seq, reason, signed, received_ms, kind FROM quarantine WHERE node_id = $1 ORDER BY id",
            &[&node_id],
        )?;
        Ok(rows
            .iter()
            .map(|r| KeptAside {
                seq: r.get::<_, Option<i64>>(0).map(|s| s as u64),
                reason: r.get(1),
                signed: r.get(2),
                received_ms: r.get(3),
                fork: r.get::<_, String>(4) == "fork",
            })
            .collect())
    }

    fn restore_kept_aside(
        &self,
        node_id: &str,
        rows: &[KeptAside],
    ) -> Result<(), IngestStoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            for row in rows {
                let cursor = self.cursor_locked(&tx, node_id, row.received_ms).await?;
                self.commit(&tx, &aside_only(cursor, row), row.received_ms)
                    .await?;
            }
            tx.commit().await.map_err(|e| self.err(e))
        })
    }

    fn check_ready(&self) -> Result<(), IngestStoreError> {
        match self.schema_version()? {
            v if v == SCHEMA_VERSION => Ok(()),
            found if found > SCHEMA_VERSION => Err(IngestStoreError::NewerSchema {
                found,
                known: SCHEMA_VERSION,
            }),
            found => Err(IngestStoreError::Postgres(format!(
                "the schema is at version {found}, not {SCHEMA_VERSION}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_their_partitions() {
        // 2026-12-01T07:00Z.
        let now = 1_796_108_400_000;
        assert_eq!(
            month_start(now, 0),
            (1_796_083_200_000, "records_y2026m12".into())
        );
        assert_eq!(month_start(now, 1).1, "records_y2027m01");
        assert_eq!(month_start(now, -12).1, "records_y2025m12");
        assert_eq!(month_start(now, 1).0, 1_798_761_600_000);
    }

    #[test]
    fn a_password_never_shows_in_a_description_or_a_redacted_url() {
        let c = Config::from_str("postgres://core:s3cret@db.example:6432/usage").unwrap();
        let d = describe(&c);
        assert_eq!(d, "postgres://core@db.example:6432/usage");
        assert_eq!(
            redact("postgres://core:s3cret@db.example/usage"),
            "postgres://core:***@db.example/usage"
        );
        assert_eq!(
            redact("postgres://core@db.example/usage?sslmode=disable&password=s3cret"),
            "postgres://core@db.example/usage?sslmode=disable&password=***"
        );
        assert!(url_has_password("postgres://core@db/usage?password=x"));
        assert!(url_has_password("postgres://core:x@db/usage"));
        assert!(!url_has_password("postgres://core@db/usage"));
        let e = pg_config(
            "postgres://core:s3cret@db.example:notaport/x",
            &PgOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn pgpass_lines_match_as_libpq_reads_them() {
        let c = Config::from_str("postgres://core@db.example:5433/usage").unwrap();
        let text = "# comment\n\
                    other:5433:usage:core:no\n\
                    db.example:5433:usage:core:p\\:ss\n\
                    *:*:*:*:fallback\n";
        assert_eq!(pgpass_lookup(text, &c).as_deref(), Some("p:ss"));
        assert_eq!(pgpass_lookup("*:*:*:*:any\n", &c).as_deref(), Some("any"));
        assert_eq!(pgpass_lookup("db.example:5432:usage:core:x\n", &c), None);
    }
}
