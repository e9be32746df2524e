//! A write transaction as the append path sees it: statements as SQL text
//! plus arguments, run on a pooled sqlx connection ([`PoolTx`]; on MySQL
//! `mysql_batch::BatchedTx`, several per round trip) or on the SQLite writer
//! thread's own connection (`sqlite_writer::WriterTx`).
//! The append logic is written once, against [`WriteTx`].

use std::future::Future;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::Any;

use crate::dialect::Dialect;
use crate::error::Class;
use crate::{rows, Fail, SqlStore, Tx};

/// A statement argument. Every column is a 64-bit integer or text (see the crate docs).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    Null,
}

impl<'a> From<i64> for Arg<'a> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        v.map_or(Arg::Null, Arg::Text)
    }
}

/// The type of a column read back.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Col {
    Int,
    /// Text, possibly NULL.
    Text,
}

/// A column value read back.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Int(i64),
    Text(Option<String>),
}

impl Val {
    pub(crate) fn int(&self) -> rows::R<i64> {
        match self {
            Val::Int(v) => Ok(*v),
            Val::Text(_) => Err(stacker_domain::Error::Store("expected an integer column, got text".into())),
        }
    }

    pub(crate) fn opt_text(self) -> rows::R<Option<String>> {
        match self {
            Val::Text(v) => Ok(v),
            Val::Int(_) => Err(stacker_domain::Error::Store("expected a text column, got an integer".into())),
        }
    }
}

/// One statement: its text (`?` placeholders), arguments, and whether its
/// prepared form is worth caching (a shape that recurs).
pub(crate) struct Stmt<'a> {
    pub sql: String,
    pub args: Vec<Arg<'a>>,
    pub cache: bool,
}

impl<'a> Stmt<'a> {
    pub(crate) fn new(sql: String, args: Vec<Arg<'a>>) -> Self {
        Self { sql, args, cache: true }
    }

    pub(crate) fn cached(mut self, cache: bool) -> Self {
        self.cache = cache;
        self
    }
}

/// An open transaction's two ways to end.
pub(crate) trait EndTx: Send {
    fn commit(&mut self) -> impl Future<Output = Result<(), Fail>> + Send;
    fn rollback(&mut self) -> impl Future<Output = Result<(), Fail>> + Send;
}

/// A connection that runs one write transaction at a time.
pub(crate) trait WriteTx: EndTx {
    fn dialect(&self) -> Dialect;
    /// Begins a transaction that will write (SQLite: `BEGIN IMMEDIATE`).
    fn begin(&mut self) -> impl Future<Output = Result<(), Fail>> + Send;
    fn execute(&mut self, stmt: Stmt<'_>) -> impl Future<Output = Result<(), Fail>> + Send;
    fn fetch(&mut self, stmt: Stmt<'_>, cols: &[Col]) -> impl Future<Output = Result<Vec<Vec<Val>>, Fail>> + Send;
}

/// Ends the open transaction of `tx`: commits if `result` is a success, rolls
/// back (explicitly, not on drop) if not.
pub(crate) async fn finish_tx<E: EndTx, T>(tx: &mut E, result: Result<T, Fail>) -> Result<T, Fail> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            if let Err(rollback) = tx.rollback().await {
                tracing::warn!(error = %rollback, "rollback failed");
            }
            Err(e)
        }
    }
}

/// A write transaction on a connection from the store's pool.
pub(crate) struct PoolTx<'s> {
    store: &'s SqlStore,
    tx: Option<Tx>,
}

impl<'s> PoolTx<'s> {
    pub(crate) fn new(store: &'s SqlStore) -> Self {
        Self { store, tx: None }
    }

    fn open(&mut self) -> Result<&mut Tx, Fail> {
        self.tx.as_mut().ok_or_else(|| Fail::Domain(stacker_domain::Error::Internal("no open transaction".into())))
    }
}

fn bind<'q>(query: Query<'q, Any, AnyArguments<'q>>, args: &[Arg<'q>]) -> Query<'q, Any, AnyArguments<'q>> {
    args.iter().fold(query, |q, arg| match *arg {
        Arg::Int(v) => q.bind(v),
        Arg::Text(v) => q.bind(v),
        Arg::Null => q.bind(None::<&str>),
    })
}

/// A sqlx transaction, ended once (then `None`).
impl<'t> EndTx for Option<sqlx::Transaction<'t, Any>> {
    async fn commit(&mut self) -> Result<(), Fail> {
        match self.take() {
            Some(tx) => Ok(tx.commit().await?),
            None => Ok(()),
        }
    }

    async fn rollback(&mut self) -> Result<(), Fail> {
        match self.take() {
            Some(tx) => Ok(tx.rollback().await?),
            None => Ok(()),
        }
    }
}

impl EndTx for PoolTx<'_> {
    async fn commit(&mut self) -> Result<(), Fail> {
        self.tx.commit().await
    }

    async fn rollback(&mut self) -> Result<(), Fail> {
        self.tx.rollback().await
    }
}

impl WriteTx for PoolTx<'_> {
    fn dialect(&self) -> Dialect {
        self.store.dialect
    }

    async fn begin(&mut self) -> Result<(), Fail> {
        self.tx = Some(self.store.begin_write().await?);
        Ok(())
    }

    async fn execute(&mut self, stmt: Stmt<'_>) -> Result<(), Fail> {
        let sql = self.store.sql_owned(stmt.sql);
        let tx = self.open()?;
        bind(sqlx::query(&sql).persistent(stmt.cache), &stmt.args).execute(&mut **tx).await?;
        Ok(())
    }

    async fn fetch(&mut self, stmt: Stmt<'_>, cols: &[Col]) -> Result<Vec<Vec<Val>>, Fail> {
        let sql = self.store.sql_owned(stmt.sql);
        let tx = self.open()?;
        let found = bind(sqlx::query(&sql).persistent(stmt.cache), &stmt.args).fetch_all(&mut **tx).await?;
        decode_rows(&found, cols)
    }
}

/// The `cols` of each row.
pub(crate) fn decode_rows(found: &[sqlx::any::AnyRow], cols: &[Col]) -> Result<Vec<Vec<Val>>, Fail> {
    let mut out = Vec::with_capacity(found.len());
    for row in found {
        let vals = cols
            .iter()
            .enumerate()
            .map(|(i, col)| match col {
                Col::Int => rows::int(row, i).map(Val::Int),
                Col::Text => rows::opt_text(row, i).map(Val::Text),
            })
            .collect::<rows::R<Vec<_>>>()?;
        out.push(vals);
    }
    Ok(out)
}

impl Fail {
    /// What a database failure means; `None` for a domain rule.
    pub(crate) fn class(&self) -> Option<Class> {
        match self {
            Fail::Db(e) => Some(crate::error::classify(e)),
            Fail::Sqlite(e) => Some(crate::error::classify_sqlite(e)),
            Fail::Domain(_) => None,
        }
    }
}
