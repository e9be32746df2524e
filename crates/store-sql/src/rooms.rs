use std::collections::{BTreeSet, HashSet};

use async_trait::async_trait;
use sqlx::AnyConnection;
use stacker_domain::clock::now_ms;
use stacker_domain::model::*;
use stacker_domain::store::{Removal, RoomStore, ROOM_CLOSED};
use stacker_domain::{Error, Result};

use crate::dialect::{contains_pattern, value_groups, Dialect};
use crate::error::{map_err, observe};
use crate::rows::{self, JOIN_REQUEST_COLS, MEMBER_COLS, ROOM_NCOLS};
use crate::{affected, finish, Fail, SqlStore};

/// Most rows in one multi-row `INSERT`.
const INSERT_CHUNK: usize = 100;
const MEMBER_NCOLS: usize = 7;

/// Inserts members (a clash is an error).
async fn insert_members(
    conn: &mut AnyConnection,
    dialect: Dialect,
    members: &[Member],
) -> std::result::Result<(), sqlx::Error> {
    for chunk in members.chunks(INSERT_CHUNK) {
        let sql = dialect
            .sql(&format!(
                "INSERT INTO room_members ({MEMBER_COLS}) VALUES {}",
                value_groups(chunk.len(), MEMBER_NCOLS)
            ))
            .into_owned();
        let mut query = sqlx::query(&sql).persistent(chunk.len() <= 2);
        for m in chunk {
            query = bind_member(query, m);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_member<'q>(query: AnyQuery<'q>, m: &'q Member) -> AnyQuery<'q> {
    query
        .bind(m.room_id)
        .bind(m.user_id)
        .bind(m.role.code())
        .bind(m.nickname.as_str())
        .bind(m.mute_until)
        .bind(m.joined_at)
        .bind(m.read_seq)
}

/// Inserts the members that are not members yet; returns the `(room, user)`
/// pairs actually inserted, in input order.
async fn insert_members_if_absent(
    conn: &mut AnyConnection,
    dialect: Dialect,
    members: &[Member],
) -> std::result::Result<Vec<(RoomId, UserId)>, Fail> {
    let mut seen = HashSet::with_capacity(members.len());
    let unique: Vec<&Member> = members.iter().filter(|m| seen.insert((m.room_id, m.user_id))).collect();
    let (head, tail) = dialect.insert_ignore();
    let mut inserted = HashSet::with_capacity(unique.len());
    match dialect {
        // MySQL has no RETURNING on INSERT IGNORE: one row at a time, by rows affected.
        Dialect::Mysql => {
            let sql = format!("{head} room_members ({MEMBER_COLS}) VALUES {}{tail}", value_groups(1, MEMBER_NCOLS));
            for m in &unique {
                let done = bind_member(sqlx::query(&sql), m).execute(&mut *conn).await?;
                if affected(&done) > 0 {
                    inserted.insert((m.room_id, m.user_id));
                }
            }
        }
        Dialect::Sqlite | Dialect::Postgres => {
            for chunk in unique.chunks(INSERT_CHUNK) {
                let sql = dialect
                    .sql(&format!(
                        "{head} room_members ({MEMBER_COLS}) VALUES {}{tail} RETURNING room_id, user_id",
                        value_groups(chunk.len(), MEMBER_NCOLS)
                    ))
                    .into_owned();
                let mut query = sqlx::query(&sql).persistent(chunk.len() <= 2);
                for m in chunk {
                    query = bind_member(query, m);
                }
                for row in query.fetch_all(&mut *conn).await? {
                    let pair = (row_int(&row, 0)?, row_int(&row, 1)?);
                    inserted.insert(pair);
                }
            }
        }
    }
    let added: Vec<(RoomId, UserId)> =
        unique.iter().map(|m| (m.room_id, m.user_id)).filter(|p| inserted.contains(p)).collect();
    crate::cursors::start_cursors_at_last_seq(conn, dialect, &added).await?;
    restore_kept_mutes(conn, dialect, &added).await?;
    Ok(added)
}

/// The suffix of a `SELECT` that locks its rows for update (SQLite: none, it
/// has one writer at a time, `BEGIN IMMEDIATE`).
fn lock_for_update(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "",
        _ => " FOR UPDATE",
    }
}

/// The suffix of a `SELECT` that share-locks its rows: it waits for a
/// transaction holding them for update, and then reads its committed result.
fn lock_for_share(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "",
        Dialect::Mysql => " LOCK IN SHARE MODE",
        Dialect::Postgres => " FOR SHARE",
    }
}

/// Deletes a member row, keeping a running mute for a rejoin.
async fn delete_member(
    conn: &mut AnyConnection,
    dialect: Dialect,
    room: RoomId,
    user: UserId,
) -> std::result::Result<bool, Fail> {
    // The row is locked first (SQLite: one writer at a time), so a
    // concurrent removal waits and then finds nothing, and an
    // unmute either lands before this read or waits for it.
    let lock = lock_for_update(dialect);
    let sql = dialect
        .sql(&format!("SELECT mute_until FROM room_members WHERE room_id = ? AND user_id = ?{lock}"))
        .into_owned();
    let Some(row) = sqlx::query(&sql).bind(room).bind(user).fetch_optional(&mut *conn).await? else {
        return Ok(false);
    };
    let mute_until = row_int(&row, 0)?;
    let sql = dialect.sql("DELETE FROM room_members WHERE room_id = ? AND user_id = ?");
    sqlx::query(&sql).bind(room).bind(user).execute(&mut *conn).await?;
    // A mute still running is kept for a rejoin (an upsert: no
    // read-then-insert gap for two removals to deadlock on).
    if mute_until > now_ms() {
        let keep = match dialect {
            Dialect::Mysql => {
                "INSERT INTO room_mutes (room_id, user_id, mute_until) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE mute_until = VALUES(mute_until)"
            }
            _ => {
                "INSERT INTO room_mutes (room_id, user_id, mute_until) VALUES (?, ?, ?) \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET mute_until = excluded.mute_until"
            }
        };
        sqlx::query(&dialect.sql(keep)).bind(room).bind(user).bind(mute_until).execute(&mut *conn).await?;
    }
    Ok(true)
}

/// The room's owner, read with the rooms row locked by `lock` (one of the
/// two suffixes above); `None` when there is no such room.
async fn locked_owner(
    conn: &mut AnyConnection,
    dialect: Dialect,
    room: RoomId,
    lock: &str,
) -> std::result::Result<Option<UserId>, Fail> {
    let sql = dialect.sql(&format!("SELECT owner_id FROM rooms WHERE id = ?{lock}")).into_owned();
    match sqlx::query(&sql).bind(room).fetch_optional(&mut *conn).await? {
        Some(row) => Ok(Some(row_int(&row, 0)?)),
        None => Ok(None),
    }
}

/// Refuses to add anyone to a room whose owner is not a member: the owner
/// left it last, and it takes no one in. The rooms row is share-locked (rooms
/// row first, as everywhere), so this and an owner's last leave, which locks
/// it for update, are serialized: one sees the other's result.
async fn require_owner_present(
    conn: &mut AnyConnection,
    dialect: Dialect,
    room: RoomId,
) -> std::result::Result<(), Fail> {
    let lock = lock_for_share(dialect);
    let Some(owner) = locked_owner(conn, dialect, room, lock).await? else {
        return Err(Fail::Domain(Error::not_found("room not found")));
    };
    // A statement of its own, after the lock is held: PostgreSQL re-checks
    // only the locked row of a statement that waited, not what it joined.
    let sql = dialect.sql(&format!("SELECT 1 FROM room_members WHERE room_id = ? AND user_id = ?{lock}")).into_owned();
    if sqlx::query(&sql).bind(room).bind(owner).fetch_optional(&mut *conn).await?.is_none() {
        return Err(Fail::Domain(Error::not_found(ROOM_CLOSED)));
    }
    Ok(())
}

/// Puts the mutes kept when members left back on the `(room, user)` pairs
/// just inserted, and forgets them. Only those rows are read and written
/// (by key), so joins to one room do not lock each other's rows.
async fn restore_kept_mutes(
    conn: &mut AnyConnection,
    dialect: Dialect,
    added: &[(RoomId, UserId)],
) -> std::result::Result<(), sqlx::Error> {
    let restore = dialect.sql("UPDATE room_members SET mute_until = ? WHERE room_id = ? AND user_id = ?");
    let forget = dialect.sql("DELETE FROM room_mutes WHERE room_id = ? AND user_id = ?");
    for (room, users) in crate::cursors::users_by_room(added) {
        for chunk in users.chunks(500) {
            let sql = dialect
                .sql(&format!(
                    "SELECT user_id, mute_until FROM room_mutes WHERE room_id = ? AND user_id IN ({})",
                    crate::dialect::placeholders(chunk.len())
                ))
                .into_owned();
            let mut query = sqlx::query(&sql).bind(room);
            for user in chunk {
                query = query.bind(*user);
            }
            for row in query.fetch_all(&mut *conn).await? {
                let (user, until) = (row_int(&row, 0)?, row_int(&row, 1)?);
                if until > now_ms() {
                    sqlx::query(&restore).bind(until).bind(room).bind(user).execute(&mut *conn).await?;
                }
                sqlx::query(&forget).bind(room).bind(user).execute(&mut *conn).await?;
            }
        }
    }
    Ok(())
}

fn row_int(row: &sqlx::any::AnyRow, i: usize) -> std::result::Result<i64, sqlx::Error> {
    use sqlx::Row;
    row.try_get::<i64, _>(i)
}

#[async_trait]
impl RoomStore for SqlStore {
    async fn insert_room(&self, room: &Room, members: &[Member]) -> Result<()> {
        const OP: &str = "insert_room";
        observe(OP, async {
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                let sql = self.sql(
                    "INSERT INTO rooms (id, name, name_lower, is_group, join_policy, owner_id, direct_key, last_seq, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                );
                sqlx::query(&sql)
                    .bind(room.id)
                    .bind(room.name.as_str())
                    .bind(room.name.to_lowercase())
                    .bind(rows::bool_int(room.is_group))
                    .bind(rows::join_policy_code(room.join_policy))
                    .bind(room.owner_id)
                    .bind(room.direct_key.as_deref())
                    .bind(room.last_seq)
                    .bind(room.created_at)
                    .execute(&mut *tx)
                    .await?;
                insert_members(&mut tx, self.dialect, members).await?;
                Ok::<_, Fail>(())
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }

    async fn room(&self, id: RoomId) -> Result<Option<Room>> {
        const OP: &str = "room";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {} FROM rooms WHERE id = ?", rows::room_cols("")));
            let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(|r| rows::room(r, 0)).transpose()
        })
        .await
    }

    async fn direct_room(&self, direct_key: &str) -> Result<Option<Room>> {
        const OP: &str = "direct_room";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {} FROM rooms WHERE direct_key = ?", rows::room_cols("")));
            let row =
                sqlx::query(&sql).bind(direct_key).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(|r| rows::room(r, 0)).transpose()
        })
        .await
    }

    async fn search_rooms(&self, query: &str, limit: u32) -> Result<Vec<Room>> {
        const OP: &str = "search_rooms";
        observe(OP, async {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let sql = self.sql_owned(format!(
                "SELECT {} FROM rooms WHERE is_group = 1 AND name_lower LIKE ? ESCAPE '!' \
                 AND EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = rooms.id AND m.user_id = rooms.owner_id) \
                 ORDER BY created_at DESC, id DESC LIMIT ?",
                rows::room_cols("")
            ));
            let found = sqlx::query(&sql)
                .bind(contains_pattern(&query.to_lowercase()))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| map_err(OP, e))?;
            found.iter().map(|r| rows::room(r, 0)).collect()
        })
        .await
    }

    async fn member(&self, room: RoomId, user: UserId) -> Result<Option<Member>> {
        const OP: &str = "member";
        observe(OP, async {
            let sql =
                self.sql_owned(format!("SELECT {MEMBER_COLS} FROM room_members WHERE room_id = ? AND user_id = ?"));
            let row =
                sqlx::query(&sql).bind(room).bind(user).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(rows::member).transpose()
        })
        .await
    }

    async fn members(&self, room: RoomId) -> Result<Vec<Member>> {
        const OP: &str = "members";
        observe(OP, async {
            let sql = self.sql_owned(format!(
                "SELECT {MEMBER_COLS} FROM room_members WHERE room_id = ? ORDER BY joined_at, user_id"
            ));
            let found = sqlx::query(&sql).bind(room).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            found.iter().map(rows::member).collect()
        })
        .await
    }

    async fn add_members(&self, members: &[Member]) -> Result<Vec<UserId>> {
        const OP: &str = "add_members";
        observe(OP, async {
            if members.is_empty() {
                return Ok(Vec::new());
            }
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                let rooms: BTreeSet<RoomId> = members.iter().map(|m| m.room_id).collect();
                for room in rooms {
                    require_owner_present(&mut tx, self.dialect, room).await?;
                }
                insert_members_if_absent(&mut tx, self.dialect, members).await
            }
            .await;
            let added = finish(tx, result).await.map_err(|f| f.into_error(OP))?;
            Ok(added.into_iter().map(|(_, user)| user).collect())
        })
        .await
    }

    async fn remove_member(&self, room: RoomId, user: UserId) -> Result<Removal> {
        const OP: &str = "remove_member";
        observe(OP, async {
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                // The rooms row first, for update: ownership transfers lock
                // it too, and `add_members` share-locks it, so the owner read
                // here is current and a join either committed before the
                // member read below or waits and then finds the owner gone.
                let Some(owner) = locked_owner(&mut tx, self.dialect, room, lock_for_update(self.dialect)).await?
                else {
                    return Ok::<_, Fail>(Removal::NotMember);
                };
                if owner == user {
                    let sql = self.sql_owned(format!(
                        "SELECT 1 FROM room_members WHERE room_id = ? AND user_id <> ? LIMIT 1{}",
                        lock_for_share(self.dialect)
                    ));
                    if sqlx::query(&sql).bind(room).bind(user).fetch_optional(&mut *tx).await?.is_some() {
                        return Ok(Removal::OwnerNotLast);
                    }
                }
                Ok(if delete_member(&mut tx, self.dialect, room, user).await? {
                    Removal::Removed
                } else {
                    Removal::NotMember
                })
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }

    async fn update_member(&self, room: RoomId, user: UserId, change: &MemberChange) -> Result<bool> {
        const OP: &str = "update_member";
        observe(OP, async {
            let set = match change {
                MemberChange::Nickname(_) => "nickname = ?",
                MemberChange::Role(_) => "role = ?",
                MemberChange::MuteUntil(_) => "mute_until = ?",
                MemberChange::ReadSeq(_) => "read_seq = CASE WHEN read_seq < ? THEN ? ELSE read_seq END",
            };
            let sql = self.sql_owned(format!("UPDATE room_members SET {set} WHERE room_id = ? AND user_id = ?"));
            let query = match change {
                MemberChange::Nickname(nickname) => sqlx::query(&sql).bind(nickname.as_str()),
                MemberChange::Role(role) => sqlx::query(&sql).bind(role.code()),
                MemberChange::MuteUntil(until) => sqlx::query(&sql).bind(*until),
                MemberChange::ReadSeq(seq) => sqlx::query(&sql).bind(*seq).bind(*seq),
            };
            // Rows matched, not changed, on MySQL too (sqlx connects with
            // CLIENT_FOUND_ROWS), so an unchanged value still reports "is a member".
            let query = query.bind(room).bind(user);
            if !matches!(change, MemberChange::Role(_)) {
                let done = query.execute(&self.pool).await.map_err(|e| map_err(OP, e))?;
                return Ok(affected(&done) > 0);
            }
            // A role never changes on the room's owner (only a transfer moves
            // it), judged under the rooms row's lock, as a transfer takes it:
            // a role change racing a transfer to its target cannot undo it.
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                let Some(owner) = locked_owner(&mut tx, self.dialect, room, lock_for_update(self.dialect)).await?
                else {
                    return Ok(false);
                };
                if owner == user {
                    return Err(Fail::Domain(Error::forbidden(
                        "the owner's role changes only by transferring ownership",
                    )));
                }
                Ok(affected(&query.execute(&mut *tx).await?) > 0)
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }

    async fn transfer_ownership(&self, room: RoomId, from: UserId, to: UserId) -> Result<()> {
        const OP: &str = "transfer_ownership";
        observe(OP, async {
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                // Lock order everywhere: the rooms row first, then member rows.
                // Only while `from` still owns the room: of two transfers at
                // once, the second finds the owner changed (one owner, always).
                let sql = self.sql("UPDATE rooms SET owner_id = ? WHERE id = ? AND owner_id = ?");
                let moved = sqlx::query(&sql).bind(to).bind(room).bind(from).execute(&mut *tx).await?;
                if affected(&moved) == 0 {
                    let sql = self.sql("SELECT 1 FROM rooms WHERE id = ?");
                    return Err(Fail::Domain(match sqlx::query(&sql).bind(room).fetch_optional(&mut *tx).await? {
                        Some(_) => Error::forbidden("only the room's owner may transfer it (the owner has changed)"),
                        None => Error::not_found("room not found"),
                    }));
                }
                let sql = self.sql("UPDATE room_members SET role = ? WHERE room_id = ? AND user_id = ?");
                let demoted =
                    sqlx::query(&sql).bind(Role::Admin.code()).bind(room).bind(from).execute(&mut *tx).await?;
                if affected(&demoted) == 0 {
                    return Err(Fail::Domain(Error::not_found("the current owner is not a member of this room")));
                }
                let promoted = sqlx::query(&sql).bind(Role::Owner.code()).bind(room).bind(to).execute(&mut *tx).await?;
                if affected(&promoted) == 0 {
                    return Err(Fail::Domain(Error::not_found("the new owner is not a member of this room")));
                }
                Ok(())
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }

    async fn joined_rooms(&self, user: UserId) -> Result<Vec<RoomId>> {
        const OP: &str = "joined_rooms";
        observe(OP, async {
            let sql = self.sql("SELECT room_id FROM room_members WHERE user_id = ? ORDER BY joined_at, room_id");
            let found = sqlx::query(&sql).bind(user).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            found.iter().map(|r| rows::int(r, 0)).collect()
        })
        .await
    }

    async fn room_summaries(&self, user: UserId) -> Result<Vec<RoomSummary>> {
        const OP: &str = "room_summaries";
        observe(OP, async {
            // One statement: the last message is the one at the room's last_seq
            // (found through the (room_id, seq) unique index). Most recently
            // active first: by last message time, or the room's creation time
            // for a room without messages.
            let sql = self.sql_owned(format!(
                "SELECT {}, rm.read_seq, {} \
                 FROM room_members rm \
                 JOIN rooms r ON r.id = rm.room_id \
                 LEFT JOIN messages m ON m.room_id = r.id AND m.seq = r.last_seq \
                 WHERE rm.user_id = ? \
                 ORDER BY COALESCE(m.created_at, r.created_at) DESC, r.created_at DESC, r.id DESC",
                rows::room_cols("r."),
                rows::message_cols("m.")
            ));
            let found = sqlx::query(&sql).bind(user).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            found
                .iter()
                .map(|row| {
                    Ok(RoomSummary {
                        room: rows::room(row, 0)?,
                        read_seq: rows::int(row, ROOM_NCOLS)?,
                        last_message: rows::opt_message(row, ROOM_NCOLS + 1)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn insert_join_request(&self, request: &JoinRequest) -> Result<()> {
        const OP: &str = "insert_join_request";
        observe(OP, async {
            let sql = self.sql(
                "INSERT INTO join_requests (id, room_id, user_id, message, status, created_at, decided_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            );
            let decided_at = (request.status != JoinRequestStatus::Pending).then_some(request.created_at);
            sqlx::query(&sql)
                .bind(request.id)
                .bind(request.room_id)
                .bind(request.user_id)
                .bind(request.message.as_str())
                .bind(rows::status_code(request.status))
                .bind(request.created_at)
                .bind(decided_at)
                .execute(&self.pool)
                .await
                .map_err(|e| map_err(OP, e))?;
            Ok(())
        })
        .await
    }

    async fn join_request(&self, id: i64) -> Result<Option<JoinRequest>> {
        const OP: &str = "join_request";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {JOIN_REQUEST_COLS} FROM join_requests WHERE id = ?"));
            let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(rows::join_request).transpose()
        })
        .await
    }

    async fn pending_join_request(&self, room: RoomId, user: UserId) -> Result<Option<JoinRequest>> {
        const OP: &str = "pending_join_request";
        observe(OP, async {
            let sql = self.sql_owned(format!(
                "SELECT {JOIN_REQUEST_COLS} FROM join_requests WHERE room_id = ? AND status = ? AND user_id = ? \
                 ORDER BY created_at DESC, id DESC LIMIT 1"
            ));
            let row = sqlx::query(&sql)
                .bind(room)
                .bind(rows::status_code(JoinRequestStatus::Pending))
                .bind(user)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| map_err(OP, e))?;
            row.as_ref().map(rows::join_request).transpose()
        })
        .await
    }

    async fn pending_join_requests(
        &self,
        room: RoomId,
        after: Option<(i64, i64)>,
        limit: u32,
    ) -> Result<Vec<JoinRequest>> {
        const OP: &str = "pending_join_requests";
        observe(OP, async {
            // Keyset paging; `i64::MIN` for "from the start" keeps one statement.
            let (created_at, id) = after.unwrap_or((i64::MIN, i64::MIN));
            let sql = self.sql_owned(format!(
                "SELECT {JOIN_REQUEST_COLS} FROM join_requests WHERE room_id = ? AND status = ? \
                 AND (created_at > ? OR (created_at = ? AND id > ?)) ORDER BY created_at, id LIMIT ?"
            ));
            let found = sqlx::query(&sql)
                .bind(room)
                .bind(rows::status_code(JoinRequestStatus::Pending))
                .bind(created_at)
                .bind(created_at)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| map_err(OP, e))?;
            found.iter().map(rows::join_request).collect()
        })
        .await
    }

    async fn decide_join_request(&self, id: i64, approve: bool, member: Option<&Member>) -> Result<Option<bool>> {
        const OP: &str = "decide_join_request";
        observe(OP, async {
            let status = if approve { JoinRequestStatus::Approved } else { JoinRequestStatus::Rejected };
            let decided_at = member.map(|m| m.joined_at).unwrap_or_else(now_ms);
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                // The rooms row before the request's, as `add_members` does.
                if let (true, Some(member)) = (approve, member) {
                    require_owner_present(&mut tx, self.dialect, member.room_id).await?;
                }
                let sql = self.sql("UPDATE join_requests SET status = ?, decided_at = ? WHERE id = ? AND status = ?");
                let done = sqlx::query(&sql)
                    .bind(rows::status_code(status))
                    .bind(decided_at)
                    .bind(id)
                    .bind(rows::status_code(JoinRequestStatus::Pending))
                    .execute(&mut *tx)
                    .await?;
                if affected(&done) == 0 {
                    return Ok(None);
                }
                let mut added = false;
                if let (true, Some(member)) = (approve, member) {
                    added = !insert_members_if_absent(&mut tx, self.dialect, std::slice::from_ref(member))
                        .await?
                        .is_empty();
                }
                Ok::<_, Fail>(Some(added))
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }
}
