use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::AnyConnection;
use stacker_domain::model::*;
use stacker_domain::store::MessageStore;
use stacker_domain::{Error, Result};

use crate::dialect::{placeholders, value_groups, Dialect};
use crate::error::{classify, map_err, observe, Class};
use crate::rows;
use crate::{finish, Fail, SqlStore};

/// Most rows in one multi-row `INSERT` (8 parameters each).
const INSERT_CHUNK: usize = 100;
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
/// After a run meets a stored client_msg_id, appends look their ids up first
/// for this long: repeats come in bursts (clients resending after a reconnect
/// or a timeout), and each miss costs a rolled-back run.
const LOOK_UP_AFTER_REPEAT_MS: i64 = 2_000;

fn bind_rooms<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rooms: &[(RoomId, i64)],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let query = rooms.iter().fold(query, |q, (room, n)| q.bind(*room).bind(*n));
    rooms.iter().fold(query, |q, (room, _)| q.bind(*room))
}

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

impl SqlStore {
    /// Messages already stored under any of `pairs`.
    async fn stored_by_client_id(
        &self,
        conn: &mut AnyConnection,
        pairs: &[(UserId, &str)],
    ) -> std::result::Result<HashMap<(UserId, String), Message>, Fail> {
        let mut found = HashMap::new();
        for chunk in pairs.chunks(DEDUPE_CHUNK) {
            // OR of equalities on (sender_id, client_msg_id): a range/index look-up
            // on the unique index on every database (unlike a cross-product of two
            // IN lists, which fetches other senders' rows).
            let cond = vec!["(sender_id = ? AND client_msg_id = ?)"; chunk.len()].join(" OR ");
            let sql = self.sql_owned(format!("SELECT {} FROM messages WHERE {cond}", rows::message_cols("")));
            let mut query = sqlx::query(&sql).persistent(chunk.len() <= 2);
            for (sender, cid) in chunk {
                query = query.bind(*sender).bind(*cid);
            }
            for row in query.fetch_all(&mut *conn).await? {
                let message = rows::message(&row, 0)?;
                if let Some(cid) = message.client_msg_id.clone() {
                    found.insert((message.sender_id, cid), message);
                }
            }
        }
        Ok(found)
    }

    /// Reserves `count` seqs in each room; returns each room's new last seq.
    /// One statement per [`ROOM_CHUNK`] rooms (1:1 traffic puts nearly every
    /// message of a batch in a room of its own). The row locks taken here are
    /// held until commit, serializing every writer of a room; rooms are
    /// visited in ascending id, a fixed lock order.
    async fn reserve_seqs(
        &self,
        conn: &mut AnyConnection,
        rooms: &[(RoomId, i64)],
    ) -> std::result::Result<HashMap<RoomId, i64>, Fail> {
        let mut last = HashMap::with_capacity(rooms.len());
        for chunk in rooms.chunks(ROOM_CHUNK) {
            let case = "WHEN ? THEN ? ".repeat(chunk.len());
            let ids = placeholders(chunk.len());
            let update = format!("UPDATE rooms SET last_seq = last_seq + CASE id {case}END WHERE id IN ({ids})");
            let rows = match self.dialect {
                // No UPDATE … RETURNING: read the rows back under our own locks.
                Dialect::Mysql => {
                    bind_rooms(sqlx::query(&update), chunk).execute(&mut *conn).await?;
                    let select = format!("SELECT id, last_seq FROM rooms WHERE id IN ({ids})");
                    chunk.iter().fold(sqlx::query(&select), |q, (room, _)| q.bind(*room)).fetch_all(&mut *conn).await?
                }
                Dialect::Postgres => {
                    // An UPDATE locks rows in scan order, which is not id order on
                    // PostgreSQL: take the locks in id order first (no deadlocks
                    // between writers whose batches share rooms).
                    let lock =
                        self.sql_owned(format!("SELECT id FROM rooms WHERE id IN ({ids}) ORDER BY id FOR UPDATE"));
                    chunk.iter().fold(sqlx::query(&lock), |q, (room, _)| q.bind(*room)).fetch_all(&mut *conn).await?;
                    let sql = self.sql_owned(format!("{update} RETURNING id, last_seq"));
                    bind_rooms(sqlx::query(&sql), chunk).fetch_all(&mut *conn).await?
                }
                // One writer at a time (BEGIN IMMEDIATE).
                Dialect::Sqlite => {
                    let sql = self.sql_owned(format!("{update} RETURNING id, last_seq"));
                    bind_rooms(sqlx::query(&sql), chunk).fetch_all(&mut *conn).await?
                }
            };
            for row in &rows {
                last.insert(rows::int(row, 0)?, rows::int(row, 1)?);
            }
            if let Some((missing, _)) = chunk.iter().find(|(room, _)| !last.contains_key(room)) {
                return Err(Fail::Domain(Error::not_found(format!("room {missing} not found"))));
            }
        }
        Ok(last)
    }

    /// A sender has read everything up to their own last message: one
    /// statement per [`CURSOR_CHUNK`] (room, sender) pairs.
    async fn advance_read_cursors(
        &self,
        conn: &mut AnyConnection,
        cursors: &[((RoomId, UserId), i64)],
    ) -> std::result::Result<(), Fail> {
        let greatest = match self.dialect {
            Dialect::Sqlite => "MAX",
            Dialect::Mysql | Dialect::Postgres => "GREATEST",
        };
        for chunk in cursors.chunks(CURSOR_CHUNK) {
            let case = "WHEN room_id = ? AND user_id = ? THEN ? ".repeat(chunk.len());
            let cond = vec!["(room_id = ? AND user_id = ?)"; chunk.len()].join(" OR ");
            let sql = self.sql_owned(format!(
                "UPDATE room_members SET read_seq = {greatest}(read_seq, CASE {case}ELSE read_seq END) WHERE {cond}"
            ));
            let mut query = sqlx::query(&sql);
            for ((room, user), seq) in chunk {
                query = query.bind(*room).bind(*user).bind(*seq);
            }
            for ((room, user), _) in chunk {
                query = query.bind(*room).bind(*user);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    async fn insert_messages(
        &self,
        conn: &mut AnyConnection,
        messages: &[&Message],
        json: &[&str],
    ) -> std::result::Result<(), Fail> {
        let items: Vec<(&Message, &str)> = messages.iter().copied().zip(json.iter().copied()).collect();
        for chunk in items.chunks(INSERT_CHUNK) {
            let sql = self.sql_owned(format!(
                "INSERT INTO messages (id, room_id, seq, sender_id, client_msg_id, content, created_at, flags) VALUES {}",
                value_groups(chunk.len(), MESSAGE_NCOLS)
            ));
            let mut query = sqlx::query(&sql).persistent(chunk.len() <= 2 || chunk.len() == INSERT_CHUNK);
            for (m, content) in chunk {
                query = query
                    .bind(m.id)
                    .bind(m.room_id)
                    .bind(m.seq)
                    .bind(m.sender_id)
                    .bind(m.client_msg_id.as_deref())
                    .bind(*content)
                    .bind(m.created_at)
                    .bind(0i64);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// One run of the append transaction. With `look_up_repeats` off, the
    /// batch's client_msg_ids are taken to be new, and the unique index on
    /// `(sender_id, client_msg_id)` fails the run if one is not.
    async fn append_in(
        &self,
        conn: &mut AnyConnection,
        prep: &Prepared<'_>,
        look_up_repeats: bool,
    ) -> std::result::Result<Vec<Appended>, Fail> {
        let batch = prep.batch;
        // 1. Dedupe against the store.
        let existing = if look_up_repeats && !prep.pairs.is_empty() {
            self.stored_by_client_id(conn, &prep.pairs).await?
        } else {
            HashMap::new()
        };
        let earlier =
            |m: &NewMessage| m.client_msg_id.as_ref().and_then(|cid| existing.get(&(m.sender_id, cid.clone())));

        // 2. Reserve seqs room by room, in ascending room id (a fixed lock order).
        let mut by_room: BTreeMap<RoomId, Vec<usize>> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            if prep.repeat_of[i].is_none() && earlier(m).is_none() {
                by_room.entry(m.room_id).or_default().push(i);
            }
        }
        let counts: Vec<(RoomId, i64)> = by_room.iter().map(|(room, items)| (*room, items.len() as i64)).collect();
        let last_seqs = self.reserve_seqs(conn, &counts).await?;
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
        self.insert_messages(conn, &to_insert, &json).await?;

        // 4. A sender has read everything up to their own last message.
        let mut cursors: BTreeMap<(RoomId, UserId), i64> = BTreeMap::new();
        for m in &to_insert {
            let seq = cursors.entry((m.room_id, m.sender_id)).or_insert(m.seq);
            *seq = (*seq).max(m.seq);
        }
        let cursors: Vec<((RoomId, UserId), i64)> = cursors.into_iter().collect();
        self.advance_read_cursors(conn, &cursors).await?;

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
}

#[async_trait]
impl MessageStore for SqlStore {
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        const OP: &str = "append";
        observe(OP, async {
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            let prep = Prepared::new(batch)?;
            let mut attempt = 1;
            // Nearly every send is a first try, so the first run does not look
            // its client_msg_ids up; a repeat fails it on the unique index and
            // it runs again with the look-up (and so do appends for a while).
            let repeat_seen = self.repeat_seen_ms.load(Ordering::Relaxed);
            let mut look_up_repeats = stacker_domain::clock::now_ms() - repeat_seen < LOOK_UP_AFTER_REPEAT_MS;
            loop {
                let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
                let result = self.append_in(&mut tx, &prep, look_up_repeats).await;
                match finish(tx, result).await {
                    Ok(outcomes) => return Ok(outcomes),
                    Err(Fail::Db(e)) if !look_up_repeats && !prep.pairs.is_empty() && classify(&e) == Class::Unique => {
                        look_up_repeats = true;
                        self.repeat_seen_ms.store(stacker_domain::clock::now_ms(), Ordering::Relaxed);
                    }
                    Err(Fail::Db(e))
                        if attempt < MAX_ATTEMPTS
                            && self.dialect != Dialect::Sqlite
                            && classify(&e) == Class::Transient =>
                    {
                        tracing::warn!(attempt, error = %e, "append transaction rolled back by the database; running it again");
                        tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                        attempt += 1;
                    }
                    Err(f) => return Err(f.into_error(OP)),
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
