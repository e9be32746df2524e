//! For unit tests: a directory of its own for a SQLite file, removed when
//! dropped.

use std::path::PathBuf;

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("stacker-test-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        Self(dir)
    }

    /// The database file in it.
    pub(crate) fn file(&self) -> PathBuf {
        self.0.join("t.db")
    }

    /// The size of the database's WAL file (0 if there is none).
    pub(crate) fn wal_bytes(&self) -> u64 {
        std::fs::metadata(self.0.join("t.db-wal")).map_or(0, |m| m.len())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
