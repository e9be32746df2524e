use std::collections::HashSet;

use async_trait::async_trait;
use stacker_domain::model::*;
use stacker_domain::store::UserStore;
use stacker_domain::Result;

use crate::dialect::placeholders;
use crate::error::{map_err, observe};
use crate::rows::{self, USER_COLS};
use crate::SqlStore;

/// Most ids in one `IN (…)` list.
const IN_CHUNK: usize = 500;

#[async_trait]
impl UserStore for SqlStore {
    async fn insert_user(&self, user: &User) -> Result<()> {
        const OP: &str = "insert_user";
        observe(OP, async {
            let sql = self
                .sql("INSERT INTO users (id, username, nickname, password_hash, created_at) VALUES (?, ?, ?, ?, ?)");
            sqlx::query(&sql)
                .bind(user.id)
                .bind(user.username.as_str())
                .bind(user.nickname.as_str())
                .bind(user.password_hash.as_str())
                .bind(user.created_at)
                .execute(&self.pool)
                .await
                .map_err(|e| map_err(OP, e))?;
            Ok(())
        })
        .await
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
        const OP: &str = "user_by_name";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {USER_COLS} FROM users WHERE username = ?"));
            let row = sqlx::query(&sql).bind(username).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(rows::user).transpose()
        })
        .await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>> {
        const OP: &str = "user_by_id";
        observe(OP, async {
            let sql = self.sql_owned(format!("SELECT {USER_COLS} FROM users WHERE id = ?"));
            let row = sqlx::query(&sql).bind(id).fetch_optional(&self.pool).await.map_err(|e| map_err(OP, e))?;
            row.as_ref().map(rows::user).transpose()
        })
        .await
    }

    async fn existing_users(&self, ids: &[UserId]) -> Result<Vec<UserId>> {
        const OP: &str = "existing_users";
        observe(OP, async {
            let mut wanted: Vec<UserId> = Vec::with_capacity(ids.len());
            let mut seen = HashSet::with_capacity(ids.len());
            for id in ids {
                if seen.insert(*id) {
                    wanted.push(*id);
                }
            }
            let mut found = HashSet::with_capacity(wanted.len());
            for chunk in wanted.chunks(IN_CHUNK) {
                let sql = self.sql_owned(format!("SELECT id FROM users WHERE id IN ({})", placeholders(chunk.len())));
                let mut query = sqlx::query(&sql).persistent(chunk.len() == 1 || chunk.len() == IN_CHUNK);
                for id in chunk {
                    query = query.bind(*id);
                }
                for row in query.fetch_all(&self.pool).await.map_err(|e| map_err(OP, e))? {
                    found.insert(rows::int(&row, 0)?);
                }
            }
            Ok(wanted.into_iter().filter(|id| found.contains(id)).collect())
        })
        .await
    }
}
