use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use stacker_domain::clock::now_ms;
use stacker_domain::model::*;
use stacker_domain::store::MessageStore;
use stacker_domain::{Error, Result};

use crate::dialect::{placeholders, value_groups, Dialect};
use crate::error::{map_err, observe, Class};
use crate::exec::{finish_tx, Arg, Col, PoolTx, Stmt, Val, WriteTx};
use crate::mysql_batch::BatchedTx;
use crate::rows;
use crate::sqlite_writer::WriterTx;
use crate::{Fail, SqlStore};

/// Most rows in one multi-row `INSERT` (8 parameters each).
const INSERT_CHUNK: usize = 100;
/// ...and most content bytes: one statement stays well inside a packet
/// (MariaDB's `max_allowed_packet` is 16 MiB by default, and on MySQL the
/// text goes as hex, twice its size).
const INSERT_CHUNK_BYTES: usize = 1 << 20;
/// Most `(sender, client_msg_id)` pairs looked up in one statement.
const DEDUPE_CHUNK: usize = 200;
/// Runs of an append transaction that hit a deadlock or serialization failure
/// (MySQL/PostgreSQL; such a transaction was rolled back, so running it again is
/// safe). A run redone to look up repeated client_msg_ids does not count.
const MAX_ATTEMPTS: usize = 3;
const MESSAGE_NCOLS: usize = 8;
/// Most rooms whose seqs one statement reserves (3 parameters each).
const ROOM_CHUNK: usize = 200;
/// Most (room, sender) read cursors one statement moves (5 parameters each).
const CURSOR_CHUNK: usize = 150;
/// Most read cursors MySQL and PostgreSQL move with a `CASE` over OR-ed keys
/// rather than a join on a table of the cursors. Measured on MariaDB 10.11
/// (`SET profiling`, medians of 24): 2 cursors 0.08 ms against 0.15 ms
/// joined, 8: 0.14 / 0.20, 20: 0.26 / 0.26, 30: 0.38 / 0.32, 200: 4.6 / 1.3.
/// At a few thousand messages per second most batches are that small. Up to
/// 20, a cluster's p99 at 13,000 msg/s was worse in four runs of four; up to
/// 8 it was not (BENCHMARKS.md, the one-round-trip round). On PostgreSQL 15
/// (psql, with its round trip): 2: 0.28 against 0.35 ms, 8: 0.39 / 0.41,
/// 15: 0.50 / 0.42, 150: 3.1 / 1.7.
const CASE_CURSORS: usize = 8;
/// After a run meets a stored client_msg_id, appends look their ids up first
/// for this long: repeats come in bursts (clients resending after a reconnect
/// or a timeout), and each miss costs a rolled-back run.
const LOOK_UP_AFTER_REPEAT_MS: i64 = 2_000;

/// The batch, checked and encoded before any database work.
struct Prepared<'a> {
    batch: &'a [NewMessage],
    /// Content as JSON text, per item.
    json: Vec<String>,
    /// For an item repeating an earlier item's `(sender, client_msg_id)`: that item.
    repeat_of: Vec<Option<usize>>,
    /// Distinct `(sender, client_msg_id)` pairs of the batch, first occurrences.
    pairs: Vec<(UserId, &'a str)>,
}

impl<'a> Prepared<'a> {
    fn new(batch: &'a [NewMessage]) -> Result<Self> {
        let json = batch.iter().map(|m| rows::content_json(&m.content)).collect::<Result<Vec<_>>>()?;
        let mut first: HashMap<(UserId, &str), usize> = HashMap::new();
        let mut repeat_of = Vec::with_capacity(batch.len());
        let mut pairs = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let earlier = m.client_msg_id.as_deref().and_then(|cid| match first.get(&(m.sender_id, cid)) {
                Some(j) => Some(*j),
                None => {
                    first.insert((m.sender_id, cid), i);
                    pairs.push((m.sender_id, cid));
                    None
                }
            });
            repeat_of.push(earlier);
        }
        Ok(Self { batch, json, repeat_of, pairs })
    }
}

/// Messages already stored under any of `pairs`.
async fn stored_by_client_id<W: WriteTx>(
    tx: &mut W,
    pairs: &[(UserId, &str)],
) -> std::result::Result<HashMap<(UserId, String), Message>, Fail> {
    let mut found = HashMap::new();
    for chunk in pairs.chunks(tx.dialect().rows_per_statement(DEDUPE_CHUNK)) {
        // OR of equalities on (sender_id, client_msg_id): a range/index look-up
        // on the unique index on every database (unlike a cross-product of two
        // IN lists, which fetches other senders' rows).
        let cond = vec!["(sender_id = ? AND client_msg_id = ?)"; chunk.len()].join(" OR ");
        let sql = format!("SELECT {} FROM messages WHERE {cond}", rows::message_cols(""));
        let args = chunk.iter().flat_map(|(sender, cid)| [Arg::Int(*sender), Arg::Text(cid)]).collect();
        for row in tx.fetch(Stmt::new(sql, args).cached(chunk.len() <= 2), &MESSAGE_COLS).await? {
            let message = message_from(row)?;
            if let Some(cid) = message.client_msg_id.clone() {
                found.insert((message.sender_id, cid), message);
            }
        }
    }
    Ok(found)
}

const MESSAGE_COLS: [Col; 7] = [Col::Int, Col::Int, Col::Int, Col::Int, Col::Text, Col::Text, Col::Int];

/// A message from the columns of [`rows::message_cols`].
fn message_from(row: Vec<Val>) -> Result<Message> {
    let [id, room_id, seq, sender_id, client_msg_id, content, created_at]: [Val; 7] =
        row.try_into().map_err(|_| Error::Store("a message row has the wrong number of columns".into()))?;
    let content = content.opt_text()?.ok_or_else(|| Error::Store("a message's content is NULL".into()))?;
    Ok(Message {
        id: id.int()?,
        room_id: room_id.int()?,
        seq: seq.int()?,
        sender_id: sender_id.int()?,
        client_msg_id: client_msg_id.opt_text()?,
        content: rows::content_from(&content)?,
        created_at: created_at.int()?,
    })
}

/// Reserves `count` seqs in each room; returns each room's new last seq.
/// One statement per [`ROOM_CHUNK`] rooms (1:1 traffic puts nearly every
/// message of a batch in a room of its own). The row locks taken here are
/// held until commit, serializing every writer of a room; rooms are
/// visited in ascending id, a fixed lock order.
async fn reserve_seqs<W: WriteTx>(
    tx: &mut W,
    rooms: &[(RoomId, i64)],
) -> std::result::Result<HashMap<RoomId, i64>, Fail> {
    let mut last = HashMap::with_capacity(rooms.len());
    for chunk in rooms.chunks(tx.dialect().rows_per_statement(ROOM_CHUNK)) {
        let case = "WHEN ? THEN ? ".repeat(chunk.len());
        let ids = placeholders(chunk.len());
        let update = format!("UPDATE rooms SET last_seq = last_seq + CASE id {case}END WHERE id IN ({ids})");
        let room_ids = || chunk.iter().map(|(room, _)| Arg::Int(*room)).collect::<Vec<_>>();
        let mut update_args: Vec<Arg> = chunk.iter().flat_map(|(room, n)| [Arg::Int(*room), Arg::Int(*n)]).collect();
        update_args.extend(room_ids());
        let cols = [Col::Int, Col::Int];
        let rows = match tx.dialect() {
            // No UPDATE … RETURNING: read the rows back under our own locks.
            Dialect::Mysql => {
                tx.execute(Stmt::new(update, update_args)).await?;
                let select = format!("SELECT id, last_seq FROM rooms WHERE id IN ({ids})");
                tx.fetch(Stmt::new(select, room_ids()), &cols).await?
            }
            Dialect::Postgres => {
                // An UPDATE locks rows in scan order, which is not id order on
                // PostgreSQL: take the locks in id order first (no deadlocks
                // between writers whose batches share rooms).
                let lock = format!("SELECT id FROM rooms WHERE id IN ({ids}) ORDER BY id FOR UPDATE");
                tx.fetch(Stmt::new(lock, room_ids()), &[Col::Int]).await?;
                tx.fetch(Stmt::new(format!("{update} RETURNING id, last_seq"), update_args), &cols).await?
            }
            // One writer at a time (BEGIN IMMEDIATE).
            Dialect::Sqlite => {
                tx.fetch(Stmt::new(format!("{update} RETURNING id, last_seq"), update_args), &cols).await?
            }
        };
        for row in &rows {
            last.insert(row[0].int()?, row[1].int()?);
        }
        if let Some((missing, _)) = chunk.iter().find(|(room, _)| !last.contains_key(room)) {
            return Err(Fail::Domain(Error::not_found(format!("room {missing} not found"))));
        }
    }
    Ok(last)
}

/// A sender has read everything up to their own last message: one
/// statement per [`CURSOR_CHUNK`] (room, sender) pairs.
async fn advance_read_cursors<W: WriteTx>(
    tx: &mut W,
    cursors: &[((RoomId, UserId), i64)],
) -> std::result::Result<(), Fail> {
    for chunk in cursors.chunks(tx.dialect().rows_per_statement(CURSOR_CHUNK)) {
        let mut args: Vec<Arg> =
            chunk.iter().flat_map(|((room, user), seq)| [Arg::Int(*room), Arg::Int(*user), Arg::Int(*seq)]).collect();
        let sql = match tx.dialect() {
            // A join on the cursors' keys. MariaDB runs the CASE over OR-ed
            // keys below at twice the cost (~7.8 ms against ~3.6 ms for the
            // cursors of 230 messages), all of it under the room locks.
            // STRAIGHT_JOIN: the cursors drive, so only their rows are read
            // (and locked), through the primary key. The derived table costs
            // ~0.15 ms even for two rows, though, and for a few cursors the
            // CASE is cheaper (see `CASE_CURSORS`).
            Dialect::Mysql if chunk.len() > CASE_CURSORS => {
                let cursor_rows = vec!["SELECT ? AS room_id, ? AS user_id, ? AS seq"; chunk.len()].join(" UNION ALL ");
                format!(
                    "UPDATE ({cursor_rows}) c STRAIGHT_JOIN room_members m \
                     ON m.room_id = c.room_id AND m.user_id = c.user_id \
                     SET m.read_seq = GREATEST(m.read_seq, c.seq)"
                )
            }
            // The same join, in PostgreSQL's words.
            Dialect::Postgres if chunk.len() > CASE_CURSORS => {
                let cursor_rows = vec!["(?::BIGINT, ?::BIGINT, ?::BIGINT)"; chunk.len()].join(", ");
                format!(
                    "UPDATE room_members m SET read_seq = GREATEST(m.read_seq, c.seq) \
                     FROM (VALUES {cursor_rows}) AS c (room_id, user_id, seq) \
                     WHERE m.room_id = c.room_id AND m.user_id = c.user_id"
                )
            }
            // The CASE: a few cursors on MySQL/PostgreSQL, and on SQLite
            // always (one cursor per statement, see `rows_per_statement`).
            dialect => {
                let greatest = if dialect == Dialect::Sqlite { "MAX" } else { "GREATEST" };
                let case = "WHEN room_id = ? AND user_id = ? THEN ? ".repeat(chunk.len());
                let cond = vec!["(room_id = ? AND user_id = ?)"; chunk.len()].join(" OR ");
                args.extend(chunk.iter().flat_map(|((room, user), _)| [Arg::Int(*room), Arg::Int(*user)]));
                format!("UPDATE room_members SET read_seq = {greatest}(read_seq, CASE {case}ELSE read_seq END) WHERE {cond}")
            }
        };
        tx.execute(Stmt::new(sql, args)).await?;
    }
    Ok(())
}

async fn insert_messages<W: WriteTx>(
    tx: &mut W,
    messages: &[&Message],
    json: &[&str],
) -> std::result::Result<(), Fail> {
    let items: Vec<(&Message, &str)> = messages.iter().copied().zip(json.iter().copied()).collect();
    let most_rows = tx.dialect().rows_per_statement(INSERT_CHUNK);
    let mut rest = &items[..];
    while !rest.is_empty() {
        // As many rows as fit INSERT_CHUNK and INSERT_CHUNK_BYTES (at least one).
        let mut bytes = 0;
        let rows = rest
            .iter()
            .take(most_rows)
            .take_while(|(_, content)| {
                bytes += content.len();
                bytes <= INSERT_CHUNK_BYTES
            })
            .count()
            .max(1);
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        let sql = format!(
            "INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, content, created_at, flags) VALUES {}",
            value_groups(chunk.len(), MESSAGE_NCOLS)
        );
        let args = chunk
            .iter()
            .flat_map(|(m, content)| {
                [
                    Arg::Int(m.id),
                    Arg::Int(m.room_id),
                    Arg::Int(m.seq),
                    Arg::Int(m.sender_id),
                    Arg::from(m.client_msg_id.as_deref()),
                    Arg::Text(content),
                    Arg::Int(m.created_at),
                    Arg::Int(0),
                ]
            })
            .collect();
        tx.execute(Stmt::new(sql, args).cached(chunk.len() <= 2 || chunk.len() == most_rows)).await?;
    }
    Ok(())
}

/// One run of the append transaction's body. With `look_up_repeats` off, the
/// batch's client_msg_ids are taken to be new, and the unique index on
/// `(sender_id, client_msg_id)` fails the run if one is not.
async fn append_in<W: WriteTx>(
    tx: &mut W,
    prep: &Prepared<'_>,
    look_up_repeats: bool,
) -> std::result::Result<Vec<Appended>, Fail> {
    let batch = prep.batch;
    // 1. Dedupe against the store.
    let existing = if look_up_repeats && !prep.pairs.is_empty() {
        stored_by_client_id(tx, &prep.pairs).await?
    } else {
        HashMap::new()
    };
    let earlier = |m: &NewMessage| m.client_msg_id.as_ref().and_then(|cid| existing.get(&(m.sender_id, cid.clone())));

    // 2. Reserve seqs room by room, in ascending room id (a fixed lock order).
    let mut by_room: BTreeMap<RoomId, Vec<usize>> = BTreeMap::new();
    for (i, m) in batch.iter().enumerate() {
        if prep.repeat_of[i].is_none() && earlier(m).is_none() {
            by_room.entry(m.room_id).or_default().push(i);
        }
    }
    let counts: Vec<(RoomId, i64)> = by_room.iter().map(|(room, items)| (*room, items.len() as i64)).collect();
    let last_seqs = reserve_seqs(tx, &counts).await?;
    let mut stored: Vec<Option<Message>> = vec![None; batch.len()];
    for (room, items) in &by_room {
        let n = items.len() as i64;
        let last = last_seqs[room];
        for (k, i) in items.iter().enumerate() {
            let m = &batch[*i];
            stored[*i] = Some(Message {
                id: m.id,
                room_id: m.room_id,
                seq: last - n + 1 + k as i64,
                sender_id: m.sender_id,
                client_msg_id: m.client_msg_id.clone(),
                content: m.content.clone(),
                created_at: m.created_at,
            });
        }
    }

    // 3. Insert the new messages, in (room, seq) order.
    let order: Vec<usize> = by_room.values().flatten().copied().collect();
    let to_insert: Vec<&Message> = order.iter().filter_map(|i| stored[*i].as_ref()).collect();
    let json: Vec<&str> = order.iter().map(|i| prep.json[*i].as_str()).collect();
    insert_messages(tx, &to_insert, &json).await?;

    // 4. A sender has read everything up to their own last message.
    let mut cursors: BTreeMap<(RoomId, UserId), i64> = BTreeMap::new();
    for m in &to_insert {
        let seq = cursors.entry((m.room_id, m.sender_id)).or_insert(m.seq);
        *seq = (*seq).max(m.seq);
    }
    let cursors: Vec<((RoomId, UserId), i64)> = cursors.into_iter().collect();
    advance_read_cursors(tx, &cursors).await?;

    // 5. Outcomes in batch order.
    let mut out: Vec<Appended> = Vec::with_capacity(batch.len());
    for (i, m) in batch.iter().enumerate() {
        let outcome = if let Some(j) = prep.repeat_of[i] {
            Appended::Duplicate(out[j].message().clone())
        } else if let Some(message) = earlier(m) {
            Appended::Duplicate(message.clone())
        } else {
            match stored[i].take() {
                Some(message) => Appended::Stored(message),
                None => return Err(Fail::Domain(Error::Internal("append lost track of a message".into()))),
            }
        };
        out.push(outcome);
    }
    Ok(out)
}

/// Appends `prep`'s batch in one transaction of `tx`, running it again when
/// it met a stored client_msg_id without looking (see `MessageStore::append`)
/// or, on MySQL/PostgreSQL, when the database rolled it back.
async fn append_with<W: WriteTx>(
    tx: &mut W,
    prep: &Prepared<'_>,
    repeat_seen_ms: &AtomicI64,
) -> std::result::Result<Vec<Appended>, Fail> {
    let mut attempt = 1;
    // Nearly every send is a first try, so the first run does not look its
    // client_msg_ids up; a repeat fails it on the unique index and it runs
    // again with the look-up (and so do appends for a while).
    let mut look_up_repeats = now_ms() - repeat_seen_ms.load(Ordering::Relaxed) < LOOK_UP_AFTER_REPEAT_MS;
    loop {
        tx.begin().await?;
        let result = append_in(tx, prep, look_up_repeats).await;
        let failure = match finish_tx(tx, result).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(f) => f,
        };
        match failure.class() {
            Some(Class::Unique) if !look_up_repeats && !prep.pairs.is_empty() => {
                look_up_repeats = true;
                repeat_seen_ms.store(now_ms(), Ordering::Relaxed);
            }
            // SQLite's busy timeout has already waited for the lock.
            Some(Class::Transient) if attempt < MAX_ATTEMPTS && tx.dialect() != Dialect::Sqlite => {
                tracing::warn!(attempt, error = %failure, "append transaction rolled back by the database; running it again");
                tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                attempt += 1;
            }
            _ => return Err(failure),
        }
    }
}

#[async_trait]
impl MessageStore for SqlStore {
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        const OP: &str = "append";
        observe(OP, async {
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            match &self.sqlite_writer {
                // The whole transaction on the writer's thread (its futures never wait).
                Some(writer) => {
                    let batch = batch.to_vec();
                    let repeat_seen_ms = self.repeat_seen_ms.clone();
                    writer
                        .run(move |conn| {
                            let prep = Prepared::new(&batch)?;
                            // Polled once: nothing on this path waits (a future
                            // that did would be a bug, reported, not a hang).
                            append_with(&mut WriterTx::new(conn), &prep, &repeat_seen_ms)
                                .now_or_never()
                                .unwrap_or_else(|| {
                                    Err(Fail::Domain(Error::Internal("a SQLite writer step waited".into())))
                                })
                                .map_err(|f| f.into_error(OP))
                        })
                        .await?
                }
                None => {
                    let prep = Prepared::new(batch)?;
                    let appended = match self.dialect {
                        // Several statements per round trip (see `mysql_batch`).
                        Dialect::Mysql => append_with(&mut BatchedTx::new(self), &prep, &self.repeat_seen_ms).await,
                        _ => append_with(&mut PoolTx::new(self), &prep, &self.repeat_seen_ms).await,
                    };
                    appended.map_err(|f| f.into_error(OP))
                }
            }
        })
        .await
    }

    async fn message(&self, id: MessageId) -> Result<Option<Message>> {
        const OP: &str = "message";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {} FROM messages WHERE id = ?", rows::message_cols("")));
            let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(|r| rows::message(r, 0)).transpose()
        })
        .await
    }

    async fn message_by_client_id(&self, sender: UserId, client_msg_id: &str) -> Result<Option<Message>> {
        const OP: &str = "message_by_client_id";
        observe(OP, async {
            let sql = self.sql_owned(format!(
                "SELECT {} FROM messages WHERE sender_id = ? AND client_msg_id = ?",
                rows::message_cols("")
            ));
            let query = sqlx::query(&sql).bind(sender).bind(client_msg_id);
            let row = query.fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(|r| rows::message(r, 0)).transpose()
        })
        .await
    }

    async fn history(&self, room: RoomId, page: HistoryPage) -> Result<Vec<Message>> {
        const OP: &str = "history";
        observe(OP, async {
            let cols = rows::message_cols("");
            // Seqs are gapless, so a page after or before a seq is a closed seq
            // range: an index range on every database (MariaDB turns an open
            // `seq < ?` with ORDER BY … LIMIT into a scan of every newer message).
            let (sql, limit, newest_first) = match page {
                HistoryPage::Latest { limit } => {
                    (format!("SELECT {cols} FROM messages WHERE room_id = ? ORDER BY seq DESC LIMIT ?"), limit, true)
                }
                HistoryPage::Before { limit, .. } => (
                    format!(
                        "SELECT {cols} FROM messages WHERE room_id = ? AND seq >= ? AND seq < ? ORDER BY seq DESC LIMIT ?"
                    ),
                    limit,
                    true,
                ),
                HistoryPage::After { limit, .. } => (
                    format!(
                        "SELECT {cols} FROM messages WHERE room_id = ? AND seq > ? AND seq <= ? ORDER BY seq ASC LIMIT ?"
                    ),
                    limit,
                    false,
                ),
            };
            if limit == 0 {
                return Ok(Vec::new());
            }
            let bound = match page {
                HistoryPage::Latest { .. } => None,
                // A `before_seq` past the newest message pages back from the newest.
                HistoryPage::Before { seq, limit } => {
                    let last_sql = self.sql("SELECT last_seq FROM rooms WHERE id = ?");
                    let row = sqlx::query(&last_sql)
                        .bind(room)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| map_err(OP, e))?;
                    let Some(row) = row else { return Ok(Vec::new()) };
                    let high = seq.min(rows::int(&row, 0)? + 1);
                    Some((high - i64::from(limit), high))
                }
                HistoryPage::After { seq, limit } => Some((seq, seq.saturating_add(i64::from(limit)))),
            };
            let sql = self.sql_owned(sql);
            let mut query = sqlx::query(&sql).bind(room);
            if let Some((low, high)) = bound {
                query = query.bind(low).bind(high);
            }
            let found = query.bind(i64::from(limit)).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            let mut messages = found.iter().map(|r| rows::message(r, 0)).collect::<Result<Vec<_>>>()?;
            if newest_first {
                messages.reverse();
            }
            Ok(messages)
        })
        .await
    }
}
