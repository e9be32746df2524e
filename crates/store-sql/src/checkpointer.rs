//! SQLite's background checkpointer: copies committed WAL frames into the
//! database file from a connection of its own, off the message writer's path,
//! and asks the writer thread to take the last step when the WAL should start
//! over (see `WAL_RESTART_PAGES`). By default SQLite makes the committing
//! connection checkpoint every 1,000 pages, fsyncs included, which was most of
//! the commit time of the group-commit writer.
//!
//! Each round runs on tokio's blocking pool with the connection moved in and
//! back out, so the connection is only ever used by one thread at a time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{ffi, Connection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::sqlite_writer::open_rusqlite;

/// How often the checkpointer copies the WAL into the database file.
const INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait between rounds while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Once the WAL holds this many pages and a background checkpoint has copied
/// (nearly) all it found, the writer thread checkpoints after its next append:
/// it copies what was committed while the background run worked, and its next
/// transaction then starts the WAL over from the top (SQLite restarts a WAL
/// only when every frame has been copied and no reader still uses it). With a
/// commit every millisecond or so the background checkpointer, copying while
/// the writer commits, never gets there by itself: the WAL then grew to the
/// autocheckpoint size, where the writer copied thousands of pages in line
/// (25-50 ms, the p99 of half-rate latency).
///
/// The writer's share (a WAL sync, the copy, a database sync) takes a few
/// milliseconds, and appends wait for it. At 1,000 pages it came ~7 times a
/// second at 5,000 msg/s and held up 10% of all messages (p95 15-17 ms); at
/// 16,384 pages (64 MiB) it comes every few seconds at that rate.
pub(crate) const WAL_RESTART_PAGES: i64 = 16_384;
/// Pages that readers kept a background checkpoint from copying, past which
/// the writer is not asked to finish (it would copy them in line).
const WAL_RESTART_MAX_LEFT: i64 = 256;
/// Most checkpoint passes in a row before the writer is asked to finish...
const CATCH_UP_PASSES: usize = 4;
/// ...stopping once a pass found at most this many pages committed since the
/// one before.
const CAUGHT_UP_PAGES: i64 = 64;

/// Handle to the running checkpointer; it stops on `close` or when dropped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    /// Starts checkpointing the (existing) SQLite file at `path`, opened with
    /// `pragmas`. Whenever the WAL should start over it sets `finish_wanted`
    /// for the writer thread.
    pub(crate) fn spawn(path: PathBuf, pragmas: Vec<String>, finish_wanted: Arc<AtomicBool>) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(path, pragmas, finish_wanted, stopped));
        Self { stop: Mutex::new(Some(stop)), task: Mutex::new(Some(task)) }
    }

    /// Stops after the current round and closes the connection.
    pub(crate) async fn close(&self) {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(path: PathBuf, pragmas: Vec<String>, finish_wanted: Arc<AtomicBool>, mut stopped: oneshot::Receiver<()>) {
    let mut state = Some(Rounds { path, pragmas, conn: None, synced: (0, 0) });
    // While rounds fail (disk full, I/O errors) wait longer between tries, and
    // log when failing starts and ends rather than every time.
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(INTERVAL + backoff) => {}
        }
        let Some(mut rounds) = state.take() else { return };
        let (path, pragmas) = (rounds.path.clone(), rounds.pragmas.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let result = rounds.round();
            (rounds, result)
        })
        .await;
        let result = match outcome {
            Ok((rounds, Err(RoundError::Sync(e)))) => {
                // Linux reports a write-back error once per open file: a later
                // sync on this same handle could answer success for pages that
                // never reached the disk, and let the WAL start over on top of
                // them. So no more background checkpoints; the writers' own
                // (SQLite's autocheckpoint, on their own handles) go on.
                tracing::error!(error = %e, "cannot sync the SQLite database file; background checkpoints stop");
                metrics::counter!("stacker_sqlite_checkpoint_failures_total").increment(1);
                state = Some(rounds);
                break;
            }
            Ok((rounds, result)) => {
                state = Some(rounds);
                result.map_err(|e| e.to_string())
            }
            // The round panicked and took the connection with it: open a new one next time.
            Err(e) => {
                state = Some(Rounds { path, pragmas, conn: None, synced: (0, 0) });
                Err(format!("a checkpoint round panicked: {e}"))
            }
        };
        match result {
            Ok(finish) => {
                if !backoff.is_zero() {
                    tracing::info!("SQLite WAL checkpoints work again");
                    backoff = Duration::ZERO;
                }
                if finish {
                    finish_wanted.store(true, Ordering::Release);
                }
            }
            Err(e) => {
                if backoff.is_zero() {
                    tracing::warn!(error = %e, "SQLite WAL checkpoint failed; retrying with back-off");
                }
                metrics::counter!("stacker_sqlite_checkpoint_failures_total").increment(1);
                backoff = (backoff * 2).clamp(INTERVAL, MAX_BACKOFF);
            }
        }
    }
    // Closing may touch the file: off the async threads.
    if let Some(rounds) = state {
        let _ = tokio::task::spawn_blocking(move || drop(rounds)).await;
    }
}

/// Why a round failed.
#[derive(Debug)]
enum RoundError {
    /// Opening the connection or a checkpoint pass failed: retried.
    Checkpoint(rusqlite::Error),
    /// Syncing the database file failed: background checkpoints stop.
    Sync(rusqlite::Error),
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundError::Checkpoint(e) => write!(f, "{e}"),
            RoundError::Sync(e) => write!(f, "sync: {e}"),
        }
    }
}

/// The checkpointer's connection and what it last synced.
struct Rounds {
    path: PathBuf,
    pragmas: Vec<String>,
    /// Opened on the first round (and again after a failed open).
    conn: Option<Connection>,
    /// (WAL pages, pages copied) after the pass last synced.
    synced: (i64, i64),
}

impl Rounds {
    /// A pass, then, while the writer should finish, up to `CATCH_UP_PASSES`
    /// in all, each copying what was committed during the one before (and
    /// its sync), so the writer is left little to copy and sync while appends
    /// wait. Each pass that copied pages is followed by a sync of the database
    /// file. Answers whether the writer should now finish.
    fn round(&mut self) -> Result<bool, RoundError> {
        if self.conn.is_none() {
            self.conn = Some(open_rusqlite(&self.path, &self.pragmas).map_err(RoundError::Checkpoint)?);
        }
        let Some(conn) = self.conn.as_ref() else { return Ok(false) };
        let (mut wal_pages, mut copied) = passive_checkpoint(conn).map_err(RoundError::Checkpoint)?;
        sync_if_copied(conn, &mut self.synced, (wal_pages, copied)).map_err(RoundError::Sync)?;
        let mut passes = 1;
        while wal_restart_wanted(wal_pages, copied) && passes < CATCH_UP_PASSES {
            // A failed catch-up pass ends the catch-up; the next round retries.
            let Ok((now_pages, now_copied)) = passive_checkpoint(conn) else { break };
            sync_if_copied(conn, &mut self.synced, (now_pages, now_copied)).map_err(RoundError::Sync)?;
            let added = now_pages - wal_pages;
            (wal_pages, copied, passes) = (now_pages, now_copied, passes + 1);
            // Negative: the WAL restarted meanwhile.
            if added <= CAUGHT_UP_PAGES {
                break;
            }
        }
        Ok(wal_restart_wanted(wal_pages, copied))
    }
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: copies what it can without waiting for
/// readers or writers. Answers (WAL pages, pages copied), (-1, -1) when
/// another checkpoint is running.
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?)))
}

/// Whether, after a background checkpoint that found `wal_pages` in the WAL
/// and copied `copied` of them, the writer should finish the job.
fn wal_restart_wanted(wal_pages: i64, copied: i64) -> bool {
    wal_pages >= WAL_RESTART_PAGES && wal_pages - copied <= WAL_RESTART_MAX_LEFT
}

/// Whether a pass that left the WAL at `now` (WAL pages, pages copied)
/// copied anything not yet synced, the last sync having been at `synced`.
/// The counts fall when the WAL restarts.
fn copied_since_sync(synced: (i64, i64), now: (i64, i64)) -> bool {
    now.1 > 0 && now != synced
}

fn sync_if_copied(conn: &Connection, synced: &mut (i64, i64), now: (i64, i64)) -> rusqlite::Result<()> {
    if copied_since_sync(*synced, now) {
        sync_database_file(conn)?;
        *synced = now;
    }
    Ok(())
}

/// Syncs the database file as SQLite's own checkpoint would, through the
/// connection's handle on it.
///
/// SQLite syncs the database file only at the end of a checkpoint that has
/// reached the end of the WAL, which a background pass beside a busy writer
/// never does: the pages it copied stayed dirty until the writer's finishing
/// checkpoint, whose sync then wrote all of them while appends waited (the
/// finish took 5-25 ms at 20,000 msg/s, and p99 latency with it). Synced
/// after each background pass, the finish writes only what was copied since.
///
/// The sync goes through SQLite's file handle rather than one of our own:
/// on Unix, closing any handle on a file drops every POSIX lock the process
/// holds on it, SQLite's included (sqlite.org/howtocorrupt.html, 2.2).
fn sync_database_file(conn: &Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `conn.handle()` is this open connection's, used by this thread
    // only; SQLITE_FCNTL_FILE_POINTER writes the main database's file object
    // (owned by SQLite, valid while the connection stays open) into `file`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&mut file as *mut *mut ffi::sqlite3_file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some("no database file to sync".into())));
    }
    // SAFETY: `file`, when not null, points at the open file object above;
    // its methods table is SQLite's VFS's, and `xSync` is called as SQLite
    // calls it, on a file no other thread is using through this connection.
    let rc = unsafe {
        match file.as_ref().and_then(|f| f.pMethods.as_ref()).and_then(|m| m.xSync) {
            Some(sync) => sync(file, ffi::SQLITE_SYNC_NORMAL),
            None => ffi::SQLITE_MISUSE,
        }
    };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(rc),
            Some("syncing the database file failed".into()),
        ));
    }
    metrics::histogram!("stacker_sqlite_checkpoint_sync_seconds").record(started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_dir::TempDir as TempDb;

    /// A WAL database with a table `t`, in a directory of its own.
    fn wal_db(name: &str) -> TempDb {
        let db = TempDb::new(name);
        let conn = Connection::open(db.file()).expect("create the database");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        )
        .expect("create the table");
        db
    }

    fn insert_rows(conn: &mut Connection, n: usize) {
        let tx = conn.transaction().expect("begin");
        for i in 0..n {
            tx.execute("INSERT INTO t (body) VALUES (?1)", [format!("row {i} {}", "x".repeat(200))]).expect("insert");
        }
        tx.commit().expect("commit");
    }

    #[test]
    fn the_writer_finishes_checkpoints_of_a_big_wal_that_readers_did_not_hold_back() {
        assert!(!wal_restart_wanted(WAL_RESTART_PAGES - 1, WAL_RESTART_PAGES - 1), "small WAL: left to the background");
        assert!(wal_restart_wanted(WAL_RESTART_PAGES, WAL_RESTART_PAGES));
        let big = WAL_RESTART_PAGES + 4000;
        assert!(wal_restart_wanted(big, big - WAL_RESTART_MAX_LEFT));
        assert!(!wal_restart_wanted(big, big - WAL_RESTART_MAX_LEFT - 1), "readers held pages back");
        // A busy checkpoint (another one running) answers -1, -1.
        assert!(!wal_restart_wanted(-1, -1));
    }

    #[test]
    fn the_checkpointer_syncs_after_passes_that_copied_pages() {
        assert!(copied_since_sync((0, 0), (1200, 1100)), "first pages copied");
        assert!(copied_since_sync((1200, 1100), (2500, 2400)), "more copied");
        assert!(copied_since_sync((17000, 16990), (300, 280)), "copied after the WAL restarted");
        assert!(!copied_since_sync((2500, 2400), (2500, 2400)), "nothing new: idle");
        assert!(!copied_since_sync((0, 0), (40, 0)), "nothing copied (readers held it back)");
        assert!(!copied_since_sync((2500, 2400), (-1, -1)), "busy: another checkpoint runs");
    }

    #[test]
    fn a_round_copies_the_wal_and_syncs_through_sqlites_own_handle() {
        let db = wal_db("round");
        let mut writer = Connection::open(db.file()).expect("open the writer");
        insert_rows(&mut writer, 500);
        let mut rounds = Rounds { path: db.file(), pragmas: Vec::new(), conn: None, synced: (0, 0) };
        assert!(!rounds.round().expect("the round works"), "a small WAL is not handed to the writer");
        let (wal_pages, copied) = rounds.synced;
        assert!(
            wal_pages > 0 && copied == wal_pages,
            "the pass copied the whole WAL and synced it: {:?}",
            rounds.synced
        );

        // Nothing new: no second sync (the synced mark stays), and the
        // database reads back what was written.
        assert!(!rounds.round().expect("an idle round works"));
        assert_eq!(rounds.synced, (wal_pages, copied));
        let rows: i64 = writer.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
        assert_eq!(rows, 500);
    }

    /// Whether a lock (this process's included) covers SQLite's shared-lock
    /// bytes of `file`. Its probe handle is closed on return, which drops
    /// every POSIX lock the process holds on the file: call it last.
    #[cfg(target_os = "linux")]
    fn shared_lock_held(file: &std::path::Path) -> bool {
        use std::os::fd::AsRawFd;
        let probe = std::fs::File::open(file).expect("open the probe");
        // SAFETY: a zeroed flock is valid (l_pid must be 0 for F_OFD_GETLK).
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as _;
        lock.l_whence = libc::SEEK_SET as _;
        lock.l_start = 0x4000_0002; // SHARED_FIRST: PENDING_BYTE (1 GiB) + 2
        lock.l_len = 510; // SHARED_SIZE
                          // SAFETY: a valid descriptor and a valid flock for F_OFD_GETLK. An OFD
                          // probe sees conflicting record locks of its own process too.
        let rc = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        lock.l_type != libc::F_UNLCK as libc::c_short
    }

    /// A WAL database with a writer connection that has written to it.
    #[cfg(target_os = "linux")]
    fn written(name: &str) -> (TempDb, Connection) {
        let db = wal_db(name);
        let mut writer = Connection::open(db.file()).expect("open the writer");
        insert_rows(&mut writer, 200);
        (db, writer)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_lock_probe_sees_sqlites_shared_lock() {
        let (db, _writer) = written("probe");
        assert!(shared_lock_held(&db.file()), "a WAL connection holds its shared lock between transactions");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_handle_of_our_own_closed_drops_sqlites_locks() {
        let (db, _writer) = written("own-handle");
        std::fs::File::open(db.file()).and_then(|f| f.sync_data()).expect("sync through a handle of our own");
        assert!(
            !shared_lock_held(&db.file()),
            "closing any handle dropped the process's locks (why syncs go through SQLite)"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_synced_round_keeps_sqlites_locks() {
        let (db, _writer) = written("keeps-locks");
        let mut rounds = Rounds { path: db.file(), pragmas: Vec::new(), conn: None, synced: (0, 0) };
        rounds.round().expect("the round works");
        assert!(rounds.synced.1 > 0, "the round copied and synced pages");
        assert!(shared_lock_held(&db.file()), "the sync left the process's locks in place");
    }

    /// Whether `conn` could take the database out of WAL mode, which SQLite
    /// refuses while another connection has it open.
    fn alone(conn: &Connection) -> bool {
        conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get::<_, String>(0)).is_ok_and(|mode| mode == "delete")
    }

    /// A checkpointer that has run a few rounds, and another connection.
    async fn running(name: &str) -> (TempDb, Checkpointer, Connection) {
        let db = wal_db(name);
        let checkpointer = Checkpointer::spawn(db.file(), Vec::new(), Arc::default());
        tokio::time::sleep(INTERVAL * 4).await;
        let conn = Connection::open(db.file()).expect("open");
        assert!(!alone(&conn), "the checkpointer's connection is open");
        (db, checkpointer, conn)
    }

    #[tokio::test]
    async fn close_stops_the_checkpointer_and_closes_its_connection() {
        let (_db, checkpointer, conn) = running("close").await;
        tokio::time::timeout(Duration::from_secs(10), checkpointer.close()).await.expect("close returns");
        assert!(alone(&conn), "close closed the checkpointer's connection");
    }

    #[tokio::test]
    async fn the_checkpointer_stops_when_dropped() {
        let (_db, checkpointer, conn) = running("drop").await;
        drop(checkpointer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !alone(&conn) {
            assert!(Instant::now() < deadline, "the dropped checkpointer's connection stayed open");
            tokio::time::sleep(INTERVAL).await;
        }
    }

    #[test]
    fn a_round_on_a_missing_file_fails_and_the_next_one_opens_it() {
        let db = wal_db("missing");
        let mut rounds = Rounds { path: db.0.join("later.db"), pragmas: Vec::new(), conn: None, synced: (0, 0) };
        assert!(rounds.round().is_err(), "no file: the open fails");
        assert!(rounds.conn.is_none());
        std::fs::copy(db.file(), db.0.join("later.db")).expect("the file appears");
        assert!(!rounds.round().expect("the next round opens it"));
        assert!(rounds.conn.is_some());
    }
}
