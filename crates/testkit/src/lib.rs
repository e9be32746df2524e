//! Test support: finds the services tests run against (Redis, MariaDB/MySQL,
//! PostgreSQL), makes throwaway databases, and reads what a delivery session
//! writes ([`frames_until_quiet`]).
//!
//! Team rules:
//! - A service is found through its environment variable
//!   (`STACKER_TEST_REDIS_URL`, `STACKER_TEST_MYSQL_URL`, `STACKER_TEST_POSTGRES_URL`).
//! - When it is not set, the tests that need it are skipped *loudly*: a
//!   `SKIPPED: …` line goes to stderr, past the test harness's output capture
//!   (see [`announce`]), so it shows in plain `cargo test` output.
//! - With `STACKER_TEST_REQUIRE_SERVICES=1` (CI) a missing service is a failure:
//!   [`service_url`] panics instead of skipping.
//!
//! SQLite needs no service and is always available.

use std::fmt;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use sqlx::{AnyConnection, Connection, Executor};
use stacker_domain::delivery::{Close, Session};

/// Set to `1` to turn a missing service into a test failure instead of a skip.
pub const REQUIRE_SERVICES_VAR: &str = "STACKER_TEST_REQUIRE_SERVICES";

/// An external service some tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Redis,
    Mysql,
    Postgres,
}

impl Service {
    /// The environment variable holding the service's URL.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::Redis => "STACKER_TEST_REDIS_URL",
            Service::Mysql => "STACKER_TEST_MYSQL_URL",
            Service::Postgres => "STACKER_TEST_POSTGRES_URL",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Redis => "redis",
            Service::Mysql => "mysql",
            Service::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `STACKER_TEST_REQUIRE_SERVICES=1` is set.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES_VAR).map(|v| v.trim() == "1").unwrap_or(false)
}

/// The URL of `service` from its environment variable.
///
/// When the variable is unset or empty: panics if `STACKER_TEST_REQUIRE_SERVICES=1`,
/// otherwise prints a `SKIPPED: …` line to stderr and returns `None`.
pub fn service_url(service: Service) -> Option<String> {
    let var = service.env_var();
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            if services_required() {
                panic!("{REQUIRE_SERVICES_VAR}=1 but {var} is not set (it must name the {service} service tests run against)");
            }
            announce(&format!("SKIPPED: {service} tests — set {var} to run them"));
            None
        }
    }
}

/// Writes a line straight to the process's stderr, past the test harness's
/// output capture, so it shows in `cargo test` output (and CI logs) even when
/// the test passes. For `SKIPPED: …` notices and suite summaries.
pub fn announce(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// Installs sqlx's `Any` drivers; safe to call any number of times.
pub fn install_any_drivers() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(sqlx::any::install_default_drivers);
}

/// A kind of SQL database the store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbKind {
    Sqlite,
    Mysql,
    Postgres,
}

impl DbKind {
    pub fn name(self) -> &'static str {
        match self {
            DbKind::Sqlite => "sqlite",
            DbKind::Mysql => "mysql",
            DbKind::Postgres => "postgres",
        }
    }

    /// The service a kind needs; `None` for SQLite.
    pub fn service(self) -> Option<Service> {
        match self {
            DbKind::Sqlite => None,
            DbKind::Mysql => Some(Service::Mysql),
            DbKind::Postgres => Some(Service::Postgres),
        }
    }
}

impl fmt::Display for DbKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every database kind, SQLite first.
pub fn all_db_kinds() -> [DbKind; 3] {
    [DbKind::Sqlite, DbKind::Mysql, DbKind::Postgres]
}

/// A throwaway database. Call [`TestDb::drop_database`] when done.
#[derive(Debug)]
pub struct TestDb {
    /// Connection URL of the fresh database.
    pub url: String,
    pub kind: DbKind,
    /// Database name (MySQL/PostgreSQL) or file name (SQLite).
    pub name: String,
    admin_url: Option<String>,
    sqlite_dir: Option<PathBuf>,
}

fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Creates an empty database of `kind`.
///
/// SQLite: a new file in a new directory under the system temp dir; always available.
/// MySQL/PostgreSQL: `CREATE DATABASE stacker_test_<hex>` on the service named by
/// the environment ([`service_url`]); `None` (after printing `SKIPPED`) when the
/// service is not configured. Panics when a configured service cannot be used.
pub async fn fresh_database(kind: DbKind) -> Option<TestDb> {
    let Some(service) = kind.service() else {
        return Some(fresh_sqlite());
    };
    let admin_url = service_url(service)?;
    install_any_drivers();
    let name = format!("stacker_test_{}", random_hex());
    let mut conn = AnyConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the {service} test service at {admin_url}: {e}"));
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name} on {admin_url}: {e}"));
    let _ = conn.close().await;
    let url = with_database(&admin_url, &name);
    Some(TestDb { url, kind, name, admin_url: Some(admin_url), sqlite_dir: None })
}

fn fresh_sqlite() -> TestDb {
    let dir = std::env::temp_dir().join(format!("stacker-test-{}", random_hex()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {} for a SQLite test database: {e}", dir.display()));
    let name = "stacker.db".to_string();
    let path = dir.join(&name);
    let url = format!("sqlite://{}?mode=rwc", path.display());
    TestDb { url, kind: DbKind::Sqlite, name, admin_url: None, sqlite_dir: Some(dir) }
}

impl TestDb {
    /// The database file of a SQLite test database.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.sqlite_dir.as_ref().map(|dir| dir.join(&self.name))
    }

    /// Drops the database (PostgreSQL: `WITH (FORCE)`, closing leftover
    /// connections) or removes the SQLite files. Failures are printed, not fatal.
    pub async fn drop_database(mut self) {
        if let Some(dir) = self.sqlite_dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("warning: could not remove test database dir {}: {e}", dir.display());
            }
            return;
        }
        let Some(admin_url) = &self.admin_url else { return };
        install_any_drivers();
        let sql = match self.kind {
            DbKind::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS {}", self.name),
        };
        match AnyConnection::connect(admin_url).await {
            Ok(mut conn) => {
                if let Err(e) = conn.execute(sql.as_str()).await {
                    eprintln!("warning: could not drop test database {}: {e}", self.name);
                }
                let _ = conn.close().await;
            }
            Err(e) => eprintln!("warning: could not connect to drop test database {}: {e}", self.name),
        }
    }
}

/// A SQLite test database is removed even when the test panics before
/// `drop_database`; a MySQL/PostgreSQL one is then left for inspection.
impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = self.sqlite_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `url` with its database (path) replaced by `db`, keeping any `?query`.
///
/// `mysql://root@127.0.0.1:3306/test?x=1` + `db` → `mysql://root@127.0.0.1:3306/db?x=1`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[authority_start..].find('/').map(|i| authority_start + i).unwrap_or(base.len());
    format!("{}/{}{}", &base[..host_end], db, query)
}

/// The frames `session` writes until `quiet` passes with no new frame (and
/// at most [`FRAMES_AT_MOST`]), as JSON, and the close that ended it early,
/// if any.
pub async fn frames_until_quiet(session: &mut Session, quiet: Duration) -> (Vec<serde_json::Value>, Option<Close>) {
    let started = tokio::time::Instant::now();
    let mut until = started + quiet;
    let mut frames = Vec::new();
    let close = loop {
        // `next` returns once it has appended frames (at once while the
        // session holds some).
        match tokio::time::timeout_at(until.min(started + FRAMES_AT_MOST), session.next(&mut frames)).await {
            Ok(Ok(())) => until = tokio::time::Instant::now() + quiet,
            Ok(Err(close)) => break Some(close),
            Err(_) => break None,
        }
    };
    let json = frames.iter().map(|f| serde_json::from_slice(f.bytes()).expect("a JSON frame")).collect();
    (json, close)
}

/// How long [`frames_until_quiet`] reads at the most.
pub const FRAMES_AT_MOST: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_in_a_url() {
        assert_eq!(with_database("mysql://root@127.0.0.1:3306/test", "x"), "mysql://root@127.0.0.1:3306/x");
        assert_eq!(
            with_database("postgres://u:p@h:5432/test?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(with_database("postgres://h/", "x"), "postgres://h/x");
    }
}
