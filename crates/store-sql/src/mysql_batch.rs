//! MySQL/MariaDB appends in two round trips instead of six to eight.
//!
//! As prepared statements, an append is one round trip per statement (`BEGIN`,
//! seq reservation, reading the seqs back, insert, read cursors, `COMMIT`),
//! plus a `PREPARE` for each statement shape sqlx has not cached (they vary
//! with the batch size). In a cluster at a few thousand messages per second,
//! batches are small and these round trips were most of a gateway's system
//! calls and of MariaDB's CPU. Here statements are text with their arguments
//! written in, and those that return nothing wait to go with the next one
//! that does, or with the `COMMIT`: MySQL runs several `;`-separated
//! statements from one packet (sqlx asks for multi-statements), and stops at
//! the first that fails.

use std::fmt::Write as _;

use sqlx::pool::PoolConnection;
use sqlx::{Any, Executor};
use stacker_domain::Error;

use crate::dialect::{replace_placeholders, Dialect};
use crate::exec::{decode_rows, Arg, Col, EndTx, Stmt, Val, WriteTx};
use crate::{Fail, SqlStore};

/// Statements held back are sent before they reach this size, so a packet
/// (what is held back plus one statement, whose size `messages.rs` bounds)
/// stays far below MariaDB's `max_allowed_packet` (16 MiB by default).
const MAX_PENDING_BYTES: usize = 1 << 20;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `stmt` as MySQL text with its arguments written in: integers in decimal
/// (negative ones in parentheses), text as a hex literal with a UTF-8
/// introducer (`_utf8mb4 X'…'`), which needs no escaping whatever the
/// server's `sql_mode`. Only our own SQL is scanned for placeholders (see
/// `replace_placeholders`), never an argument.
pub(crate) fn mysql_text(stmt: &Stmt<'_>) -> Result<String, Fail> {
    let extra: usize = stmt.args.iter().map(|a| if let Arg::Text(t) = a { 2 * t.len() + 12 } else { 20 }).sum();
    let mut count = 0;
    let text = replace_placeholders(&stmt.sql, extra, |n, out| {
        count += 1;
        match stmt.args.get(n) {
            Some(Arg::Int(v)) if *v < 0 => {
                let _ = write!(out, "({v})");
            }
            Some(Arg::Int(v)) => {
                let _ = write!(out, "{v}");
            }
            Some(Arg::Text(t)) => {
                out.push_str("_utf8mb4 X'");
                for b in t.as_bytes() {
                    out.push(HEX[usize::from(b >> 4)] as char);
                    out.push(HEX[usize::from(b & 0xF)] as char);
                }
                out.push('\'');
            }
            Some(Arg::Null) => out.push_str("NULL"),
            None => {}
        }
    });
    if count != stmt.args.len() {
        return Err(Fail::Domain(Error::Internal(format!(
            "a statement has {count} placeholders and {} arguments",
            stmt.args.len()
        ))));
    }
    Ok(text)
}

/// A write transaction on a pooled MySQL connection whose statements go out
/// several at a time (see the module docs).
pub(crate) struct BatchedTx<'s> {
    store: &'s SqlStore,
    conn: Option<PoolConnection<Any>>,
    /// Statements not sent yet, `;`-separated (the first batch starts with `BEGIN`).
    pending: String,
    /// `BEGIN` has been sent: the server holds a transaction for this connection.
    open: bool,
}

impl<'s> BatchedTx<'s> {
    pub(crate) fn new(store: &'s SqlStore) -> Self {
        Self { store, conn: None, pending: String::new(), open: false }
    }

    fn push(&mut self, sql: &str) {
        if !self.pending.is_empty() {
            self.pending.push_str(";\n");
        }
        self.pending.push_str(sql);
    }

    /// Sends what is pending followed by `last` (if any); the rows returned,
    /// which come from `last` alone, as only `fetch` gives statements that
    /// return rows.
    async fn send(&mut self, last: Option<&str>) -> Result<Vec<sqlx::any::AnyRow>, Fail> {
        if let Some(last) = last {
            self.push(last);
        }
        let sql = std::mem::take(&mut self.pending);
        if sql.is_empty() {
            return Ok(Vec::new()); // MySQL rejects an empty query
        }
        let conn = self.conn.as_mut().ok_or_else(|| Fail::Domain(Error::Internal("no open transaction".into())))?;
        // From here the server may hold the transaction, even if this fails.
        self.open = true;
        // Through `Executor`, whose boxed future is `Send` as written (the
        // generic `RawSql::fetch_all` trips the compiler's `Send` inference).
        let conn: &mut sqlx::AnyConnection = conn;
        Ok(conn.fetch_all(sqlx::raw_sql(&sql)).await?)
    }

    /// Gives the connection back, or closes it if its transaction could not
    /// be ended (it must not reach another user half-way through one).
    fn release(&mut self, ended: bool) {
        if let Some(mut conn) = self.conn.take() {
            if self.open && !ended {
                conn.close_on_drop();
            }
        }
        self.pending.clear();
        self.open = false;
    }
}

impl Drop for BatchedTx<'_> {
    fn drop(&mut self) {
        // A cancelled append: its transaction was neither committed nor rolled back.
        self.release(false);
    }
}

impl EndTx for BatchedTx<'_> {
    async fn commit(&mut self) -> Result<(), Fail> {
        if self.conn.is_none() {
            return Ok(());
        }
        let result = self.send(Some("COMMIT")).await.map(drop);
        if result.is_err() {
            // A statement sent with the COMMIT failed (MySQL stopped there),
            // or the COMMIT itself did: leave nothing open (a failed rollback
            // closes the connection; the COMMIT's error is the one to report).
            let _ = self.rollback().await;
        } else {
            self.release(true);
        }
        result
    }

    async fn rollback(&mut self) -> Result<(), Fail> {
        if self.conn.is_none() {
            return Ok(());
        }
        self.pending.clear();
        if !self.open {
            self.release(true); // nothing was sent: no transaction to end
            return Ok(());
        }
        let result = self.send(Some("ROLLBACK")).await.map(drop);
        self.release(result.is_ok());
        result
    }
}

impl WriteTx for BatchedTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Mysql
    }

    async fn begin(&mut self) -> Result<(), Fail> {
        debug_assert!(self.conn.is_none(), "commit and rollback release the connection");
        self.release(false);
        self.conn = Some(self.store.pool.acquire().await?);
        self.push("BEGIN");
        Ok(())
    }

    async fn execute(&mut self, stmt: Stmt<'_>) -> Result<(), Fail> {
        let text = mysql_text(&stmt)?;
        if !self.pending.is_empty() && self.pending.len() + text.len() > MAX_PENDING_BYTES {
            self.send(None).await?;
        }
        self.push(&text);
        Ok(())
    }

    async fn fetch(&mut self, stmt: Stmt<'_>, cols: &[Col]) -> Result<Vec<Vec<Val>>, Fail> {
        let text = mysql_text(&stmt)?;
        let rows = self.send(Some(&text)).await?;
        decode_rows(&rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_written_in_as_literals() {
        let stmt = Stmt::new(
            "INSERT INTO t (a, b, c) VALUES (?, ?, ?) -- '?' stays".into(),
            vec![Arg::Int(-7), Arg::Text("it's ✓ \\ ?"), Arg::Null],
        );
        let text = mysql_text(&stmt).ok().expect("as many arguments as placeholders");
        assert_eq!(
            text,
            "INSERT INTO t (a, b, c) VALUES ((-7), _utf8mb4 X'6974277320E29C93205C203F', NULL) -- '?' stays"
        );
        assert!(mysql_text(&Stmt::new("SELECT ?".into(), vec![Arg::Int(1), Arg::Int(2)])).is_err());
        assert!(mysql_text(&Stmt::new("SELECT ?, ?".into(), vec![Arg::Int(1)])).is_err());
        assert_eq!(
            mysql_text(&Stmt::new("SELECT ?".into(), vec![Arg::Text("")])).ok().as_deref(),
            Some("SELECT _utf8mb4 X''")
        );
    }
}
