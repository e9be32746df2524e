//! Registration, login and token checks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::auth::{hash_password, verify_password, Tokens};
use crate::clock::now_ms;
use crate::ids::IdGenerator;
use crate::model::{User, UserId};
use crate::store::Store;
use crate::{validate, Error, Result};

const BAD_LOGIN: &str = "invalid username or password";

pub struct Accounts {
    store: Arc<dyn Store>,
    ids: Arc<IdGenerator>,
    tokens: Tokens,
    /// Verified against when the user does not exist, so both failures cost the same.
    dummy_hash: String,
    /// Failed logins per username in the current minute (bounded, expiring).
    failures: Cache<String, u32>,
    /// Changeable while running (config reload).
    max_failures_per_minute: AtomicU32,
}

pub struct LoginToken {
    pub token: String,
    pub user_id: UserId,
    pub expires_at: i64,
}

impl Accounts {
    /// `max_failures_per_minute`: failed logins for one username before further
    /// attempts get 429 until the minute is over.
    pub async fn new(
        store: Arc<dyn Store>,
        ids: Arc<IdGenerator>,
        tokens: Tokens,
        max_failures_per_minute: u32,
    ) -> Result<Self> {
        let dummy_hash = hash_password("stacker-dummy-password".into()).await?;
        let failures = Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(60)).build();
        let max_failures_per_minute = AtomicU32::new(max_failures_per_minute);
        Ok(Self { store, ids, tokens, dummy_hash, failures, max_failures_per_minute })
    }

    pub fn set_max_failures_per_minute(&self, n: u32) {
        self.max_failures_per_minute.store(n, Ordering::Relaxed);
    }

    pub async fn register(&self, username: &str, password: &str, nickname: Option<&str>) -> Result<UserId> {
        let username = validate::username(username)?;
        validate::password(password)?;
        let nickname = match nickname {
            Some(n) => validate::short_text("nickname", n, validate::NICKNAME_MAX, false)?,
            None => String::new(),
        };
        if self.store.user_by_name(&username).await?.is_some() {
            return Err(Error::conflict("username is taken"));
        }
        let user = User {
            id: self.ids.next_id(),
            nickname: if nickname.is_empty() { username.clone() } else { nickname },
            username,
            password_hash: hash_password(password.to_string()).await?,
            created_at: now_ms(),
        };
        self.store.insert_user(&user).await.map_err(|e| match e {
            Error::Conflict(_) => Error::conflict("username is taken"),
            other => other,
        })?;
        Ok(user.id)
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<LoginToken> {
        let key = username.trim().to_ascii_lowercase();
        // Counted before the password is checked, so that guesses sent all
        // at once count too (checked first and counted after, a burst of
        // hundreds all passed a limit of ten); taken back unless it failed.
        if self.count_attempt(&key) > self.max_failures_per_minute.load(Ordering::Relaxed) {
            self.take_back_attempt(&key);
            return Err(Error::RateLimited("too many failed logins for this user; wait a minute".into()));
        }
        match self.check_password(username, password).await {
            Ok(Some(token)) => {
                self.take_back_attempt(&key);
                Ok(token)
            }
            Ok(None) => Err(Error::Unauthorized(BAD_LOGIN.into())),
            Err(e) => {
                self.take_back_attempt(&key);
                Err(e)
            }
        }
    }

    /// One more attempt for `key`; answers how many it has now.
    fn count_attempt(&self, key: &str) -> u32 {
        let entry = self.failures.entry(key.to_string()).and_upsert_with(|old| old.map_or(0, |e| e.into_value()) + 1);
        entry.into_value()
    }

    /// Takes back an attempt that did not fail.
    fn take_back_attempt(&self, key: &str) {
        self.failures.entry(key.to_string()).and_compute_with(|old| match old.map(|e| e.into_value()) {
            Some(n) if n > 1 => Op::Put(n - 1),
            _ => Op::Remove,
        });
    }

    /// A token when `password` is the user's; `None` when the username or
    /// the password is wrong (both cost one argon2 verification).
    async fn check_password(&self, username: &str, password: &str) -> Result<Option<LoginToken>> {
        let user = match validate::username(username) {
            Ok(name) => self.store.user_by_name(&name).await?,
            Err(_) => None,
        };
        let hash = user.as_ref().map_or_else(|| self.dummy_hash.clone(), |u| u.password_hash.clone());
        let ok = verify_password(password.to_string(), hash).await?;
        match user {
            Some(user) if ok => {
                let (token, expires_at) = self.tokens.issue(user.id)?;
                Ok(Some(LoginToken { token, user_id: user.id, expires_at }))
            }
            _ => Ok(None),
        }
    }

    /// The user a bearer token belongs to; the user must still exist.
    pub fn authenticate(&self, token: &str) -> Result<UserId> {
        self.tokens.verify(token)
    }

    pub async fn user(&self, id: UserId) -> Result<User> {
        self.store.user_by_id(id).await?.ok_or_else(|| Error::not_found("user not found"))
    }
}
