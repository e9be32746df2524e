//! SQLite's message writer: one connection, on a thread of its own, runs each
//! append transaction from `BEGIN` to `COMMIT` without leaving the thread.
//!
//! Through sqlx every statement is a round trip between the async task and the
//! connection's worker thread, and on two busy cores each trip waited for the
//! task to be scheduled again: at 9,000 msg/s an append of ~25 messages took
//! ~2.7 ms, mostly waiting, where the same statements take ~0.4 ms run back to
//! back. Here a whole append is one hand-off. The connection also stays the
//! same, so its page cache stays warm (a pool hands out its connections in
//! turn, and each one's cache is stale after another connection's commit).
//!
//! Only appends run here; everything else uses the pool. SQLite allows one
//! writer at a time, so other writes wait on the lock (busy timeout) as before.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql};
use stacker_domain::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::dialect::Dialect;
use crate::exec::{Arg, Col, EndTx, Stmt, Val, WriteTx};
use crate::Fail;

type FailResult<T> = std::result::Result<T, Fail>;

/// Jobs waiting for the writer. The store's callers are the group-commit
/// writers (one for SQLite), so this rarely holds more than one.
const QUEUE: usize = 16;
/// Prepared statements the connection keeps (recurring batch shapes).
const STATEMENT_CACHE: usize = 128;
/// The writer's page cache, in KiB (SQLite's default is 2 MiB). An append
/// rewrites the newest index leaf of every room and every sender in its
/// batch, so a few hundred busy rooms keep a thousand or more pages hot; in
/// 2 MiB they evicted each other and each append read ~2 pages per message
/// back from the WAL, one `pread` each.
const PAGE_CACHE_KIB: i64 = 16 * 1024;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the writer thread; the thread ends, closing its connection, when
/// the last handle is dropped.
#[derive(Debug)]
pub(crate) struct SqliteWriter {
    /// `None` once closed.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SqliteWriter {
    /// Opens the writer's connection to the (existing, migrated) database file
    /// at `path` with `pragmas` (see `sqlite_pragmas`, which set the busy
    /// timeout too) and starts its thread. Whenever `finish_checkpoint` is set
    /// (by the background checkpointer), the thread checkpoints once the job
    /// it runs next is done, and clears it.
    pub(crate) async fn open(path: PathBuf, pragmas: Vec<String>, finish_checkpoint: Arc<AtomicBool>) -> Result<Self> {
        let open = move || open_connection(&path, &pragmas);
        let (conn, open) = tokio::task::spawn_blocking(move || open().map(|conn| (conn, open)))
            .await
            .map_err(|e| Error::Internal(format!("SQLite writer setup panicked: {e}")))?
            .map_err(|e| Error::Store(format!("cannot open the SQLite writer connection: {e}")))?;
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut conn = conn;
                while let Some(job) = queue.blocking_recv() {
                    // A panicking job must not take the writer down with it:
                    // its caller sees its reply channel dropped.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
                        tracing::error!("a SQLite writer job panicked");
                    }
                    // No transaction outlives its job (a failed COMMIT or
                    // ROLLBACK would otherwise hold the write lock for good).
                    if !conn.is_autocommit() {
                        tracing::warn!("a SQLite writer job left a transaction open; rolling it back");
                        if let Err(e) = conn.execute_batch("ROLLBACK") {
                            tracing::error!(error = %e, "rollback failed; reopening the SQLite writer connection");
                            match open() {
                                Ok(fresh) => conn = fresh,
                                Err(e) => tracing::error!(error = %e, "cannot reopen the SQLite writer connection"),
                            }
                        }
                    }
                    if finish_checkpoint.swap(false, Ordering::AcqRel) {
                        finish_wal_checkpoint(&conn);
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the SQLite writer thread: {e}")))?;
        Ok(Self { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    /// Stops taking jobs, lets the queued ones finish and closes the connection.
    pub(crate) async fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Runs `job` on the writer's connection and returns its result.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(job(conn));
        });
        let closed = || Error::Unavailable("the database is closed".into());
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(closed)?;
        jobs.send(job).await.map_err(|_| closed())?;
        answer.await.map_err(|_| Error::Internal("the SQLite writer failed on this batch".into()))
    }
}

/// Copies what was committed since the background checkpoint started (and
/// anything readers held back from it), so that the next transaction can
/// restart the WAL. PASSIVE never waits: with another checkpoint running it
/// answers busy at once.
fn finish_wal_checkpoint(conn: &Connection) {
    let started = std::time::Instant::now();
    // Answers (busy, WAL pages, pages copied).
    let checkpoint = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    let result = match checkpoint {
        Ok((0, wal_pages, copied)) => {
            tracing::trace!(wal_pages, copied, "writer finished a WAL checkpoint");
            "done"
        }
        Ok(_) => "busy",
        // The background checkpointer retries and reports lasting failures.
        Err(e) => {
            tracing::debug!(error = %e, "writer's WAL checkpoint failed");
            "failed"
        }
    };
    metrics::counter!("stacker_sqlite_writer_checkpoints_total", "result" => result).increment(1);
    // Appends wait for it: this is the writer's share of checkpointing.
    metrics::histogram!("stacker_sqlite_writer_checkpoint_seconds").record(started.elapsed().as_secs_f64());
}

/// A rusqlite connection to the existing SQLite file at `path`, set up with
/// `pragmas`, for one thread at a time (the writer's, the checkpointer's).
pub(crate) fn open_rusqlite(path: &Path, pragmas: &[String]) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    for pragma in pragmas {
        // `PRAGMA journal_mode` answers with a row; execute_batch ignores it.
        conn.execute_batch(pragma)?;
    }
    Ok(conn)
}

fn open_connection(path: &Path, pragmas: &[String]) -> rusqlite::Result<Connection> {
    let conn = open_rusqlite(path, pragmas)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Negative: a size in KiB rather than in pages.
    conn.execute_batch(&format!("PRAGMA cache_size = -{PAGE_CACHE_KIB}"))?;
    Ok(conn)
}

impl ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Int(v) => ValueRef::Integer(v),
            Arg::Text(v) => ValueRef::Text(v.as_bytes()),
            Arg::Null => ValueRef::Null,
        }))
    }
}

/// [`WriteTx`] on the writer thread's connection. Its futures never wait:
/// each is done when first polled (see `messages.rs`, which polls once).
pub(crate) struct WriterTx<'c> {
    conn: &'c mut Connection,
}

impl<'c> WriterTx<'c> {
    pub(crate) fn new(conn: &'c mut Connection) -> Self {
        Self { conn }
    }

    fn run<T>(
        &mut self,
        stmt: &Stmt<'_>,
        f: impl FnOnce(&mut rusqlite::Statement<'_>) -> FailResult<T>,
    ) -> FailResult<T> {
        if stmt.cache {
            f(&mut *self.conn.prepare_cached(&stmt.sql)?)
        } else {
            f(&mut self.conn.prepare(&stmt.sql)?)
        }
    }
}

impl EndTx for WriterTx<'_> {
    async fn commit(&mut self) -> FailResult<()> {
        Ok(self.conn.execute_batch("COMMIT")?)
    }

    async fn rollback(&mut self) -> FailResult<()> {
        if self.conn.is_autocommit() {
            return Ok(()); // SQLite already rolled it back (e.g. on SQLITE_FULL)
        }
        Ok(self.conn.execute_batch("ROLLBACK")?)
    }
}

impl WriteTx for WriterTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn begin(&mut self) -> FailResult<()> {
        Ok(self.conn.execute_batch("BEGIN IMMEDIATE")?)
    }

    async fn execute(&mut self, stmt: Stmt<'_>) -> FailResult<()> {
        self.run(&stmt, |s| {
            s.execute(rusqlite::params_from_iter(stmt.args.iter()))?;
            Ok(())
        })
    }

    async fn fetch(&mut self, stmt: Stmt<'_>, cols: &[Col]) -> FailResult<Vec<Vec<Val>>> {
        self.run(&stmt, |s| {
            let mut rows = s.query(rusqlite::params_from_iter(stmt.args.iter()))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let vals = cols
                    .iter()
                    .enumerate()
                    .map(|(i, col)| match col {
                        Col::Int => row.get::<_, i64>(i).map(Val::Int),
                        Col::Text => row.get::<_, Option<String>>(i).map(Val::Text),
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                out.push(vals);
            }
            Ok(out)
        })
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sqlite(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_dir::TempDir as TempDb;

    async fn insert_rows(writer: &SqliteWriter) {
        writer
            .run(|conn| {
                let tx = conn.transaction()?;
                for i in 0..2000 {
                    tx.execute("INSERT INTO t (body) VALUES (?1)", [format!("row {i} {}", "x".repeat(100))])?;
                }
                tx.commit()
            })
            .await
            .expect("the writer answers")
            .expect("the rows are inserted");
    }

    /// Size of the WAL after two equal transactions, the writer asked to
    /// finish a checkpoint between them when `finish` is set.
    async fn wal_after_two_transactions(finish: bool) -> (u64, u64) {
        let db = TempDb::new(if finish { "finish" } else { "control" });
        let pragmas = vec!["PRAGMA journal_mode = WAL".to_string(), "PRAGMA wal_autocheckpoint = 0".to_string()];
        let conn = Connection::open(db.file()).expect("create the database");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .expect("create the table");
        conn.close().map_err(|(_, e)| e).expect("close the setup connection");

        let flag = Arc::new(AtomicBool::new(false));
        let writer = SqliteWriter::open(db.file(), pragmas, flag.clone()).await.expect("open the writer");
        insert_rows(&writer).await;
        let first = db.wal_bytes();
        flag.store(finish, Ordering::Release);
        // The flag is read after a job: this one only lets the writer see it.
        writer.run(|_| ()).await.expect("the writer answers");
        insert_rows(&writer).await;
        let second = db.wal_bytes();
        writer.close().await;
        assert!(!flag.load(Ordering::Acquire), "the writer clears the flag it acted on");
        (first, second)
    }

    #[tokio::test]
    async fn the_writer_keeps_a_larger_page_cache() {
        let db = TempDb::new("cache");
        Connection::open(db.file())
            .expect("create the database")
            .execute_batch("PRAGMA journal_mode = WAL")
            .expect("WAL");
        let writer = SqliteWriter::open(db.file(), Vec::new(), Arc::default()).await.expect("open the writer");
        let size = writer
            .run(|conn| conn.query_row("PRAGMA cache_size", [], |row| row.get::<_, i64>(0)))
            .await
            .expect("the writer answers")
            .expect("cache_size is readable");
        writer.close().await;
        assert_eq!(size, -PAGE_CACHE_KIB);
    }

    #[tokio::test]
    async fn a_finished_checkpoint_restarts_the_wal() {
        let (first, second) = wal_after_two_transactions(true).await;
        assert!(first > 0, "the first transaction went to the WAL");
        // The second transaction wrote the WAL again from its start (a few
        // more pages than the first: the table grew).
        assert!(second < first + first / 4, "the WAL restarted instead of growing ({first} -> {second})");

        // Without the writer's checkpoint (and no autocheckpoint) it grows.
        let (first, second) = wal_after_two_transactions(false).await;
        assert!(second > first + first / 2, "control: the WAL grows without a checkpoint ({first} -> {second})");
    }
}
