//! Stacker's store traits ([`stacker_domain::store`]) on SQL: SQLite (the
//! embedded default), MySQL/MariaDB and PostgreSQL, through one implementation
//! over sqlx's `Any` driver.
//!
//! - Statements are written with `?` placeholders; [`Dialect::sql`] numbers
//!   them for PostgreSQL. Only a handful of statements differ by dialect
//!   (insert-if-absent, reading back a reserved seq).
//! - Every integer is stored as a 64-bit integer (ids, seqs, Unix ms times,
//!   codes, 0/1 booleans) and every string as text, which keeps clear of the
//!   `Any` driver's type-mapping gaps. Message content is JSON text.
//! - The schema lives in `migrations/{sqlite,mysql,postgres}` and is applied by
//!   [`SqlStore::connect`]. Nothing at build time needs a database.
//! - Seqs: `append` reserves a room's seqs with
//!   `UPDATE rooms SET last_seq = last_seq + n`, whose row lock serializes every
//!   writer of that room (any number of processes) until commit, so seqs never
//!   gap or repeat. Rooms are locked in ascending id order, so writers never
//!   deadlock each other. On SQLite the write lock is taken up front
//!   (`BEGIN IMMEDIATE`).
//! - On a SQLite file, appends do not go through sqlx: a thread of their own
//!   runs each append transaction on one rusqlite connection (`sqlite_writer`).
//!   On MySQL they go through sqlx as text, several statements per round trip
//!   (`mysql_batch`). The append logic is written once, against `exec::WriteTx`.

mod checkpointer;
mod cursors;
mod dialect;
mod error;
mod exec;
mod messages;
mod mysql_batch;
mod rooms;
mod rows;
mod sqlite_writer;
#[cfg(test)]
mod test_dir;
mod users;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Once};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, ConnectOptions, Executor};
use stacker_domain::store::Store;
use stacker_domain::{Error, Result};

pub use dialect::Dialect;

use checkpointer::Checkpointer;
use sqlite_writer::SqliteWriter;

use error::{map_err, observe};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static MYSQL_MIGRATIONS: Migrator = sqlx::migrate!("migrations/mysql");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Pool and connection settings for [`SqlStore::connect`].
#[derive(Clone, Debug)]
pub struct SqlOptions {
    /// Most pooled connections. An in-memory SQLite database always uses one.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a query waits for a free connection before failing with
    /// `Error::Unavailable`.
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this long.
    pub idle_timeout: Option<Duration>,
    /// SQLite only: how long a statement waits for another writer's lock.
    pub sqlite_busy_timeout: Duration,
    /// Apply pending migrations on connect (the default).
    pub migrate: bool,
}

impl Default for SqlOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            sqlite_busy_timeout: Duration::from_secs(5),
            migrate: true,
        }
    }
}

/// The SQL store: implements [`Store`] for SQLite, MySQL/MariaDB and PostgreSQL.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    /// File-backed, writable SQLite: the background checkpointer, which runs
    /// until `close` or until the last clone of the store is dropped.
    checkpointer: Option<Arc<Checkpointer>>,
    /// When (Unix ms) an append last met a client_msg_id already stored; for a
    /// while after that, appends look their ids up first (see `MessageStore::append`).
    repeat_seen_ms: Arc<AtomicI64>,
    /// File-backed, writable SQLite: the thread that runs appends (see `sqlite_writer`).
    sqlite_writer: Option<Arc<SqliteWriter>>,
}

/// The WAL size (pages) at which a committing connection checkpoints by
/// itself: a safety net, well above `checkpointer::WAL_RESTART_PAGES`, for
/// when the hand-off to the writer thread cannot happen (say, a long reader
/// pins the WAL).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 32_768;
/// A WAL file grown past this is truncated back to it once it restarts.
const WAL_SIZE_LIMIT_BYTES: u64 = 256 * 1024 * 1024;

/// The settings every SQLite connection runs with: WAL journaling,
/// `synchronous=FULL` (a commit syncs the WAL before it returns, so an
/// acknowledged message survives a power cut, not only a crash of the
/// process; with `NORMAL` the last commits before a power cut could be lost
/// and their seqs handed out again), foreign keys, a busy timeout, statement journals in
/// memory (a multi-row statement in a transaction keeps one, and past 64 KiB
/// SQLite spills it to a temporary file, which every batch insert did), and
/// for a file the checkpoint and WAL size limits.
fn sqlite_pragmas(busy_timeout: Duration, file_backed: bool) -> Vec<String> {
    let mut pragmas: Vec<String> = vec![
        // The busy timeout first: setting the journal mode may wait for a lock.
        format!("PRAGMA busy_timeout = {}", busy_timeout.as_millis()),
        "PRAGMA journal_mode = WAL".into(),
        "PRAGMA synchronous = FULL".into(),
        "PRAGMA foreign_keys = ON".into(),
        "PRAGMA temp_store = MEMORY".into(),
    ];
    if file_backed {
        pragmas.push(format!("PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}"));
        pragmas.push(format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}"));
    }
    pragmas
}

/// Installs sqlx's `Any` drivers once per process.
fn install_drivers() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(sqlx::any::install_default_drivers);
}

/// The `mode=` parameter of a SQLite URL (`ro`, `rw`, `rwc`, `memory`), if any.
fn sqlite_mode(url: &str) -> Option<&str> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|kv| kv.strip_prefix("mode="))
}

/// The file path of a SQLite URL, or `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    if path.is_empty() || path == ":memory:" || sqlite_mode(url) == Some("memory") {
        None
    } else {
        Some(path)
    }
}

/// The file a SQLite URL names, as sqlx opens it (its path percent-decoded).
fn sqlite_file(url: &str) -> Result<PathBuf> {
    let options =
        sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|e| Error::Store(format!("bad SQLite URL: {e}")))?;
    Ok(options.get_filename().to_path_buf())
}

/// A SQLite file URL that creates the file when missing, unless it names a mode.
fn sqlite_url_with_mode(url: &str) -> String {
    match (sqlite_mode(url), url.contains('?')) {
        (Some(_), _) => url.to_string(),
        (None, true) => format!("{url}&mode=rwc"),
        (None, false) => format!("{url}?mode=rwc"),
    }
}

impl SqlStore {
    /// Connects to `url` (`sqlite://path/to/file.db`, `sqlite::memory:`,
    /// `mysql://…`, `mariadb://…`, `postgres://…`) and applies pending migrations.
    ///
    /// SQLite: the file and its directory are created when missing (unless the
    /// URL names a `mode=`), and every connection runs with WAL journaling,
    /// `synchronous=FULL`, foreign keys on and a busy timeout. An in-memory
    /// database uses a single connection that is never recycled. A writable
    /// SQLite file also gets one more connection, the appends' writer thread's.
    pub async fn connect(url: &str, opts: SqlOptions) -> Result<SqlStore> {
        install_drivers();
        let dialect = Dialect::from_url(url).ok_or_else(|| {
            Error::Store("unsupported database URL: it must start with sqlite:, mysql:, mariadb: or postgres:".into())
        })?;
        // A SQLite file: the path sqlx will open (its URL path percent-decoded).
        let file = match dialect {
            Dialect::Sqlite if sqlite_path(url).is_some() => Some(sqlite_file(url)?),
            _ => None,
        };
        let file_backed = file.is_some();
        // The pool's connections and the SQLite writer's (see below) alike.
        let pragmas = sqlite_pragmas(opts.sqlite_busy_timeout, file_backed);
        let mut url = url.to_string();
        let mut pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .min_connections(opts.min_connections.min(opts.max_connections.max(1)))
            .acquire_timeout(opts.acquire_timeout)
            .idle_timeout(opts.idle_timeout);
        if dialect == Dialect::Sqlite {
            match &file {
                Some(file) => {
                    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            Error::Store(format!("cannot create the SQLite directory {}: {e}", dir.display()))
                        })?;
                    }
                    url = sqlite_url_with_mode(&url);
                }
                None => {
                    // Each connection to `:memory:` is its own database: keep exactly one, forever.
                    pool = pool.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None);
                }
            }
            // An embedded database has no connection to lose: skip the ping
            // sqlx sends before handing out a pooled connection.
            pool = pool.test_before_acquire(false);
            let pragmas = pragmas.clone();
            pool = pool.after_connect(move |conn, _meta| {
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    for pragma in &pragmas {
                        conn.execute(pragma.as_str()).await?;
                    }
                    Ok(())
                })
            });
        }
        // sqlx logs a slow statement with its full text, which for MySQL appends
        // holds the messages themselves (`mysql_batch`); statement time is
        // measured by `stacker_store_seconds` instead.
        let options = sqlx::any::AnyConnectOptions::from_str(&url)
            .map_err(|e| Error::Store(format!("bad {dialect} database URL: {e}")))?
            .disable_statement_logging();
        let pool = pool.connect_with(options).await.map_err(|e| match error::classify(&e) {
            error::Class::Unavailable => Error::Unavailable(format!("cannot connect to the {dialect} database: {e}")),
            _ => Error::Store(format!("cannot open the {dialect} database: {e}")),
        })?;
        // A read-only database has nothing to checkpoint.
        let checkpointed = file.filter(|_| sqlite_mode(&url) != Some("ro"));
        let mut store =
            SqlStore { pool, dialect, checkpointer: None, repeat_seen_ms: Arc::default(), sqlite_writer: None };
        if opts.migrate {
            store.migrate().await?;
        }
        // Opened after the migrations, which create the file's tables.
        if let Some(file) = checkpointed {
            let finish_checkpoint = Arc::new(AtomicBool::new(false));
            let checkpointer = Checkpointer::spawn(file.clone(), pragmas.clone(), finish_checkpoint.clone());
            store.checkpointer = Some(Arc::new(checkpointer));
            let writer = SqliteWriter::open(file, pragmas, finish_checkpoint).await?;
            store.sqlite_writer = Some(Arc::new(writer));
        }
        Ok(store)
    }

    /// Applies pending migrations for this store's dialect (done by `connect`
    /// unless [`SqlOptions::migrate`] is off). Safe to run from several
    /// processes at once on MySQL/PostgreSQL (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<()> {
        let migrator = match self.dialect {
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
            Dialect::Mysql => &MYSQL_MIGRATIONS,
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
        };
        // Several instances may start at once. sqlx's own migration lock did not
        // hold on MariaDB (two instances applied the same migration), so on
        // MySQL/MariaDB we hold a named lock of our own, checking that we got it.
        let fail = |e: String| Error::Store(format!("{} database migration failed: {e}", self.dialect));
        let mut lock = None;
        if self.dialect == Dialect::Mysql {
            let mut conn = self.pool.acquire().await.map_err(|e| map_err("migrate", e))?;
            let got: i64 = sqlx::query_scalar("SELECT CAST(GET_LOCK('stacker_migrations', 120) AS SIGNED)")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| map_err("migrate", e))?;
            if got != 1 {
                return Err(fail("timed out waiting for another instance's migrations".into()));
            }
            lock = Some(conn);
        }
        let result = migrator.run(&self.pool).await.map_err(|e| fail(e.to_string()));
        if let Some(mut conn) = lock {
            if let Err(e) = sqlx::query("SELECT RELEASE_LOCK('stacker_migrations')").execute(&mut *conn).await {
                // The lock goes with the connection; make sure it is not reused.
                tracing::warn!(error = %e, "cannot release the migration lock; closing its connection");
                conn.close_on_drop();
            }
        }
        result
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// How many concurrent message writers (group-commit tasks) suit this
    /// database: 1 for SQLite, which has one writer at a time anyway; 4 otherwise.
    pub fn recommended_writers(&self) -> usize {
        match self.dialect {
            Dialect::Sqlite => 1,
            _ => 4,
        }
    }

    /// How many messages one group-commit transaction should hold at most.
    /// SQLite's one writer gains from big batches (each index page written
    /// once for more messages); on MySQL/PostgreSQL, in a cluster, 2,048
    /// measured slower than 512 (bigger Redis pipelines per batch).
    pub fn recommended_max_batch(&self) -> usize {
        match self.dialect {
            Dialect::Sqlite => 2048,
            _ => 512,
        }
    }

    /// The connection pool (for tests and tools).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes the pool (and SQLite's writer), waiting for checked-out
    /// connections to return.
    pub async fn close(&self) {
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.close().await;
        }
        if let Some(writer) = &self.sqlite_writer {
            writer.close().await;
        }
        self.pool.close().await;
    }

    fn sql<'a>(&self, sql: &'a str) -> std::borrow::Cow<'a, str> {
        self.dialect.sql(sql)
    }

    fn sql_owned(&self, sql: String) -> String {
        match self.dialect {
            Dialect::Postgres => dialect::numbered_placeholders(&sql),
            _ => sql,
        }
    }

    /// Begins a transaction that will write. SQLite takes the database's write
    /// lock at once (`BEGIN IMMEDIATE`), so it waits up to the busy timeout
    /// instead of failing on a lock upgrade later.
    async fn begin_write(&self) -> std::result::Result<Tx, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            _ => self.pool.begin().await,
        }
    }
}

type Tx = sqlx::Transaction<'static, Any>;

/// Why a transaction body failed: the database, or a domain rule.
pub(crate) enum Fail {
    Db(sqlx::Error),
    /// The SQLite writer's own connection.
    Sqlite(rusqlite::Error),
    Domain(Error),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Domain(e)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Db(e) => e.fmt(f),
            Fail::Sqlite(e) => e.fmt(f),
            Fail::Domain(e) => e.fmt(f),
        }
    }
}

impl Fail {
    fn into_error(self, op: &'static str) -> Error {
        match self {
            Fail::Db(e) => map_err(op, e),
            Fail::Sqlite(e) => error::map_sqlite_err(op, e),
            Fail::Domain(e) => e,
        }
    }
}

/// Commits on success; rolls back (explicitly, not on drop) on failure.
async fn finish<T>(tx: Tx, result: std::result::Result<T, Fail>) -> std::result::Result<T, Fail> {
    exec::finish_tx(&mut Some(tx), result).await
}

fn affected(result: &AnyQueryResult) -> u64 {
    result.rows_affected()
}

#[async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<()> {
        observe("ping", async {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(|e| map_err("ping", e))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(sqlite_path("sqlite://data/x.db?mode=rwc"), Some("data/x.db"));
        assert_eq!(sqlite_path("sqlite:///tmp/x.db"), Some("/tmp/x.db"));
        assert_eq!(sqlite_path("sqlite:x.db"), Some("x.db"));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://:memory:"), None);
        assert_eq!(sqlite_path("sqlite://x?mode=memory&cache=shared"), None);
    }

    /// Every connection that commits (the pool's and the writer thread's)
    /// syncs the WAL at each commit: an acknowledged send is on disk.
    #[tokio::test]
    async fn sqlite_commits_are_synced() {
        const FULL: i64 = 2;
        let dir = test_dir::TempDir::new("synchronous");
        let url = format!("sqlite://{}", dir.file().display());
        let store = SqlStore::connect(&url, SqlOptions::default()).await.expect("open the store");
        for _ in 0..3 {
            let pool: (i64,) = sqlx::query_as("PRAGMA synchronous").fetch_one(&store.pool).await.expect("pool");
            assert_eq!(pool.0, FULL, "a pooled connection");
        }
        let writer = store.sqlite_writer.clone().expect("a file-backed store has a writer thread");
        let on_writer = writer
            .run(|conn| conn.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0)))
            .await
            .expect("the writer answers")
            .expect("synchronous is readable");
        assert_eq!(on_writer, FULL, "the appends' writer connection");
        store.close().await;
    }

    #[test]
    fn sqlite_mode_is_added_once() {
        assert_eq!(sqlite_url_with_mode("sqlite://x.db"), "sqlite://x.db?mode=rwc");
        assert_eq!(sqlite_url_with_mode("sqlite://x.db?cache=shared"), "sqlite://x.db?cache=shared&mode=rwc");
        assert_eq!(sqlite_url_with_mode("sqlite://x.db?mode=ro"), "sqlite://x.db?mode=ro");
        assert_eq!(sqlite_mode("sqlite://x.db?cache=shared&mode=ro"), Some("ro"));
        assert_eq!(sqlite_mode("sqlite://mode=ro.db"), None);
    }
}
