//! Delivery cursors: per device (`device_cursors`) and per member
//! (`room_members.delivered_seq`).

use std::collections::HashMap;

use async_trait::async_trait;
use stacker_domain::clock::now_ms;
use stacker_domain::model::*;
use stacker_domain::store::CursorStore;
use stacker_domain::Result;

use crate::dialect::{placeholders, Dialect};
use crate::error::{map_err, observe};
use crate::{finish, rows, Fail, SqlStore};

#[async_trait]
impl CursorStore for SqlStore {
    async fn member_cursors(&self, user: UserId) -> Result<Vec<MemberCursor>> {
        const OP: &str = "member_cursors";
        observe(OP, async {
            let sql = self.sql(
                "SELECT m.room_id, m.delivered_seq, r.last_seq, m.joined_seq FROM room_members m \
                 JOIN rooms r ON r.id = m.room_id WHERE m.user_id = ?",
            );
            let found = sqlx::query(&sql).bind(user).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            found
                .iter()
                .map(|row| {
                    Ok(MemberCursor {
                        room_id: rows::int(row, 0)?,
                        delivered_seq: rows::int(row, 1)?,
                        last_seq: rows::int(row, 2)?,
                        joined_seq: rows::int(row, 3)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn device_cursors(&self, user: UserId, device_id: &str) -> Result<Vec<(RoomId, i64)>> {
        const OP: &str = "device_cursors";
        observe(OP, async {
            let sql = self.sql("SELECT room_id, seq FROM device_cursors WHERE user_id = ? AND device_id = ?");
            let found =
                sqlx::query(&sql).bind(user).bind(device_id).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            found.iter().map(|row| Ok((rows::int(row, 0)?, rows::int(row, 1)?))).collect()
        })
        .await
    }

    async fn forget_stale_devices(&self, user: UserId, keep: usize, idle_before: i64, spare: &[&str]) -> Result<usize> {
        const OP: &str = "forget_stale_devices";
        observe(OP, async {
            let sql = self.sql(
                "SELECT device_id, MAX(updated_at) FROM device_cursors WHERE user_id = ? GROUP BY device_id \
                 ORDER BY MAX(updated_at) DESC, device_id",
            );
            let devices = sqlx::query(&sql).bind(user).fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))?;
            let mut stale = Vec::new();
            for row in devices.iter().skip(keep) {
                let device: String = sqlx::Row::try_get(row, 0).map_err(|e| map_err(OP, e))?;
                if rows::int(row, 1)? < idle_before && !spare.contains(&device.as_str()) {
                    stale.push(device);
                }
            }
            for chunk in stale.chunks(500) {
                // Rows written since the read above (an ack) stay.
                let sql = self.sql_owned(format!(
                    "DELETE FROM device_cursors WHERE user_id = ? AND updated_at < ? AND device_id IN ({})",
                    placeholders(chunk.len())
                ));
                let mut query = sqlx::query(&sql).bind(user).bind(idle_before);
                for device in chunk {
                    query = query.bind(device.as_str());
                }
                query.execute(&self.pool).await.map_err(|e| map_err(OP, e))?;
            }
            Ok(stale.len())
        })
        .await
    }

    async fn save_cursors(&self, cursors: &[DeviceCursor]) -> Result<()> {
        const OP: &str = "save_cursors";
        observe(OP, async {
            if cursors.is_empty() {
                return Ok(());
            }
            let mut tx = self.begin_write().await.map_err(|e| map_err(OP, e))?;
            let result = async {
                // Clamp to each room's last seq, and only for members: an ack past
                // the end would make the next messages look like duplicates.
                let mut limits: HashMap<(RoomId, UserId), i64> = HashMap::new();
                for c in cursors {
                    let key = (c.room_id, c.user_id);
                    if limits.contains_key(&key) {
                        continue;
                    }
                    let sql = self.sql(
                        "SELECT r.last_seq FROM room_members m JOIN rooms r ON r.id = m.room_id \
                         WHERE m.room_id = ? AND m.user_id = ?",
                    );
                    let row = sqlx::query(&sql).bind(c.room_id).bind(c.user_id).fetch_optional(&mut *tx).await?;
                    limits.insert(key, match row {
                        Some(row) => rows::int(&row, 0)?,
                        None => -1,
                    });
                }
                let now = now_ms();
                let upsert = match self.dialect {
                    Dialect::Mysql => {
                        "INSERT INTO device_cursors (user_id, device_id, room_id, seq, updated_at) VALUES (?, ?, ?, ?, ?) \
                         ON DUPLICATE KEY UPDATE seq = GREATEST(seq, VALUES(seq)), updated_at = VALUES(updated_at)"
                    }
                    _ => {
                        "INSERT INTO device_cursors (user_id, device_id, room_id, seq, updated_at) VALUES (?, ?, ?, ?, ?) \
                         ON CONFLICT (user_id, device_id, room_id) DO UPDATE SET \
                         seq = CASE WHEN excluded.seq > device_cursors.seq THEN excluded.seq ELSE device_cursors.seq END, \
                         updated_at = excluded.updated_at"
                    }
                };
                let upsert = self.sql(upsert);
                let bump = self.sql(
                    "UPDATE room_members SET delivered_seq = ? WHERE room_id = ? AND user_id = ? AND delivered_seq < ?",
                );
                for c in cursors {
                    let limit = limits.get(&(c.room_id, c.user_id)).copied().unwrap_or(-1);
                    if limit < 0 {
                        continue; // not a member
                    }
                    let seq = c.seq.clamp(0, limit);
                    sqlx::query(&upsert)
                        .bind(c.user_id)
                        .bind(c.device_id.as_str())
                        .bind(c.room_id)
                        .bind(seq)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(&bump).bind(seq).bind(c.room_id).bind(c.user_id).bind(seq).execute(&mut *tx).await?;
                }
                Ok::<_, Fail>(())
            }
            .await;
            finish(tx, result).await.map_err(|f| f.into_error(OP))
        })
        .await
    }
}

/// The users of `(room, user)` pairs, per room.
pub(crate) fn users_by_room(pairs: &[(RoomId, UserId)]) -> HashMap<RoomId, Vec<UserId>> {
    let mut by_room: HashMap<RoomId, Vec<UserId>> = HashMap::new();
    for (room, user) in pairs {
        by_room.entry(*room).or_default().push(*user);
    }
    by_room
}

/// Starts new members' read and delivered cursors, and their joined seq, at
/// their room's last seq.
pub(crate) async fn start_cursors_at_last_seq(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    added: &[(RoomId, UserId)],
) -> std::result::Result<(), sqlx::Error> {
    for (room, users) in users_by_room(added) {
        for chunk in users.chunks(500) {
            let sql = dialect
                .sql(&format!(
                    "UPDATE room_members SET \
                     read_seq = (SELECT last_seq FROM rooms WHERE rooms.id = ?), \
                     delivered_seq = (SELECT last_seq FROM rooms WHERE rooms.id = ?), \
                     joined_seq = (SELECT last_seq FROM rooms WHERE rooms.id = ?) \
                     WHERE room_id = ? AND user_id IN ({})",
                    placeholders(chunk.len())
                ))
                .into_owned();
            let mut query = sqlx::query(&sql).bind(room).bind(room).bind(room).bind(room);
            for user in chunk {
                query = query.bind(*user);
            }
            query.execute(&mut *conn).await?;
        }
    }
    Ok(())
}
