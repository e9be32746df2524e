//! Database errors (sqlx's, and rusqlite's from the SQLite writer) → the
//! domain's [`Error`], in one place.

use std::future::Future;
use std::time::Instant;

use sqlx::error::{DatabaseError, ErrorKind};
use stacker_domain::Error;

/// What a failure means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// A unique key clash.
    Unique,
    /// Deadlock, serialization failure, lock wait timeout, SQLite busy: the
    /// transaction was rolled back and running it again may well succeed.
    Transient,
    /// The database cannot be reached (connection, pool, I/O).
    Unavailable,
    Other,
}

pub(crate) fn classify(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Database(db) => classify_db(db.as_ref()),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Class::Unavailable,
        _ => Class::Other,
    }
}

fn classify_db(db: &dyn DatabaseError) -> Class {
    if db.kind() == ErrorKind::UniqueViolation {
        return Class::Unique;
    }
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return match my.number() {
            // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
            1213 | 1205 => Class::Transient,
            // ER_CON_COUNT_ERROR, ER_TOO_MANY_USER_CONNECTIONS, ER_SERVER_SHUTDOWN,
            // ER_SERVER_GONE_ERROR-ish admin kills
            1040 | 1203 | 1053 | 1927 => Class::Unavailable,
            _ => Class::Other,
        };
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
        return sqlite_class(code);
    }
    // PostgreSQL: SQLSTATE.
    match db.code().as_deref() {
        Some("40001") | Some("40P01") | Some("55P03") => Class::Transient,
        Some(code) if code.starts_with("08") || code.starts_with("57P") || code == "53300" => Class::Unavailable,
        _ => Class::Other,
    }
}

/// A failure of the SQLite writer's own connection (see `sqlite_writer`).
pub(crate) fn classify_sqlite(e: &rusqlite::Error) -> Class {
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => sqlite_class(failure.extended_code),
        _ => Class::Other,
    }
}

/// `code` is SQLite's extended result code; its low byte is the primary one.
fn sqlite_class(code: i32) -> Class {
    match code {
        1555 | 2067 => Class::Unique, // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE
        _ if matches!(code & 0xff, 5 | 6) => Class::Transient, // SQLITE_BUSY, SQLITE_LOCKED
        _ => Class::Other,
    }
}

/// The text of a database error that names what clashed.
fn clash_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("{} {}", db.constraint().unwrap_or(""), db.message()),
        _ => String::new(),
    }
}

/// What clashed, for the `Conflict` message (which a client may see), from
/// the database's error text.
fn unique_subject(text: &str) -> &'static str {
    let text = text.to_ascii_lowercase();
    // SQLite names the columns, the others the index.
    if text.contains("join_requests_pending") || text.contains("join_requests.room_id") {
        "a pending join request of yours for this room"
    } else if text.contains("username") {
        "a user with that username"
    } else if text.contains("direct_key") {
        "a direct room between these users"
    } else if text.contains("client_msg_id") || text.contains("sender_client") {
        "a message with that client_msg_id"
    } else if text.contains("room_seq") || text.contains("messages.seq") {
        "a message with that seq"
    } else if text.contains("room_members") {
        "that membership"
    } else {
        "a record with that key"
    }
}

/// The one mapping from sqlx errors to the domain's errors. Details go to the
/// log; `Conflict` and `Unavailable` texts are safe to show a client.
pub(crate) fn map_err(op: &'static str, e: sqlx::Error) -> Error {
    to_error(op, classify(&e), &e, clash_text(&e))
}

/// [`map_err`] for the SQLite writer's connection.
pub(crate) fn map_sqlite_err(op: &'static str, e: rusqlite::Error) -> Error {
    to_error(op, classify_sqlite(&e), &e, e.to_string())
}

fn to_error(op: &'static str, class: Class, e: &dyn std::fmt::Display, clash_text: String) -> Error {
    match class {
        Class::Unique => Error::Conflict(format!("{} already exists", unique_subject(&clash_text))),
        Class::Transient => {
            tracing::warn!(op, error = %e, "database busy");
            Error::Unavailable("database busy; retry".into())
        }
        Class::Unavailable => {
            tracing::warn!(op, error = %e, "database unavailable");
            Error::Unavailable("database unavailable".into())
        }
        Class::Other => Error::Store(format!("{op}: {e}")),
    }
}

/// Times one store operation: `stacker_store_seconds{op}` always,
/// `stacker_store_errors_total{op}` when it failed for a reason other than a
/// documented outcome (`Conflict`, `NotFound`).
pub(crate) async fn observe<T>(op: &'static str, fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let started = Instant::now();
    let result = fut.await;
    let elapsed = started.elapsed();
    metrics::histogram!("stacker_store_seconds", "op" => op).record(elapsed.as_secs_f64());
    // Conflict and NotFound are answers, not failures of the database.
    let healthy = !matches!(&result, Err(e) if !matches!(e, Error::Conflict(_) | Error::NotFound(_)));
    stacker_domain::monitor::record("database", healthy, elapsed);
    if let Err(e) = &result {
        if !matches!(e, Error::Conflict(_) | Error::NotFound(_)) {
            metrics::counter!("stacker_store_errors_total", "op" => op).increment(1);
        }
    }
    result
}
