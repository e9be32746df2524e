//! Registration, login and token checks.

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{hash_password, verify_password, Tokens};
use crate::clock::now_ms;
use crate::ids::IdGenerator;
use crate::limits::{Admission, AttemptWindow};
use crate::model::{User, UserId};
use crate::store::Store;
use crate::{validate, Error, Result};

const BAD_LOGIN: &str = "invalid username or password";

/// Per-minute limits on the password work (argon2) one key may cause; 0
/// means no limit.
#[derive(Clone, Copy, Debug)]
pub struct AuthLimits {
    /// Failed logins for one username from one client address before
    /// further attempts from there get 429 (per address, so that nobody can
    /// lock a user out by guessing wrong on purpose).
    pub failures_per_user: u32,
    /// Failed logins for one username from all addresses together: a cap on
    /// guessing one account from many addresses, set well above
    /// `failures_per_user` so that locking a user out takes many addresses.
    pub failures_per_user_anywhere: u32,
    /// Logins for one username from one client address, successful or not:
    /// each costs an argon2 check, so one account's password sent in a loop
    /// would otherwise fill the hashing slots as well as random guesses do.
    pub logins_per_user: u32,
    /// Failed logins from one client address (any usernames): a flood of
    /// guesses at random names would otherwise fill the hashing slots.
    pub failures_per_address: u32,
    /// Registrations from one client address.
    pub registrations_per_address: u32,
}

pub struct Accounts {
    store: Arc<dyn Store>,
    ids: Arc<IdGenerator>,
    tokens: Tokens,
    /// Verified against when the user does not exist, so both failures cost the same.
    dummy_hash: String,
    // Per username *and* client address: counted per username alone, anyone
    // could lock a named user out by sending a few wrong passwords.
    failures_by_user: AttemptWindow<(String, Option<IpAddr>)>,
    failures_by_user_anywhere: AttemptWindow<String>,
    logins_by_user: AttemptWindow<(String, Option<IpAddr>)>,
    failures_by_address: AttemptWindow<IpAddr>,
    registrations_by_address: AttemptWindow<IpAddr>,
}

pub struct LoginToken {
    pub token: String,
    pub user_id: UserId,
    pub expires_at: i64,
}

impl Accounts {
    pub async fn new(store: Arc<dyn Store>, ids: Arc<IdGenerator>, tokens: Tokens, limits: AuthLimits) -> Result<Self> {
        let dummy_hash = hash_password("stacker-dummy-password".into()).await?;
        Ok(Self {
            store,
            ids,
            tokens,
            dummy_hash,
            failures_by_user: AttemptWindow::new(limits.failures_per_user),
            failures_by_user_anywhere: AttemptWindow::new(limits.failures_per_user_anywhere),
            logins_by_user: AttemptWindow::new(limits.logins_per_user),
            failures_by_address: AttemptWindow::new(limits.failures_per_address),
            registrations_by_address: AttemptWindow::new(limits.registrations_per_address),
        })
    }

    /// Changeable while running (config reload).
    pub fn set_limits(&self, limits: AuthLimits) {
        self.failures_by_user.set_limit(limits.failures_per_user);
        self.failures_by_user_anywhere.set_limit(limits.failures_per_user_anywhere);
        self.logins_by_user.set_limit(limits.logins_per_user);
        self.failures_by_address.set_limit(limits.failures_per_address);
        self.registrations_by_address.set_limit(limits.registrations_per_address);
    }

    /// `from`: the client's address, when known.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        nickname: Option<&str>,
        from: Option<IpAddr>,
    ) -> Result<UserId> {
        let username = validate::username(username)?;
        validate::password(password)?;
        let nickname = match nickname {
            Some(n) => validate::short_text("nickname", n, validate::NICKNAME_MAX, false)?,
            None => String::new(),
        };
        if self.store.user_by_name(&username).await?.is_some() {
            return Err(Error::conflict("username is taken"));
        }
        // Counted once the request is valid and about to be hashed; taken back
        // only if no hashing happened (no slot free). A registration that
        // loses a race for its name after hashing still counts: otherwise a
        // burst for one name would hash many times for one count.
        let why = "too many registrations from this address; wait a minute";
        let password_hash =
            self.registrations_by_address.counted(from, why, hash_password(password.to_string())).await?;
        let user = User {
            id: self.ids.next_id(),
            nickname: if nickname.is_empty() { username.clone() } else { nickname },
            username,
            password_hash,
            created_at: now_ms(),
        };
        self.store.insert_user(&user).await.map_err(|e| match e {
            Error::Conflict(_) => Error::conflict("username is taken"),
            other => other,
        })?;
        Ok(user.id)
    }

    /// `from`: the client's address, when known.
    pub async fn login(&self, username: &str, password: &str, from: Option<IpAddr>) -> Result<LoginToken> {
        // Counted before the password is checked, so that guesses sent all
        // at once count too (checked first and counted after, a burst of
        // hundreds all passed a limit of ten); taken back unless it failed.
        let by_address = self.failures_by_address.admit(from);
        if by_address == Admission::Refused {
            return Err(Error::RateLimited("too many failed logins from this address; wait a minute".into()));
        }
        // Names that cannot exist are counted per address only (and never
        // become large keys).
        let name = validate::username(username).ok();
        let key = name.clone().map(|name| (name, from));
        let by_user = self.failures_by_user.admit(key.clone());
        if by_user == Admission::Refused {
            self.failures_by_address.take_back(from, by_address);
            return Err(Error::RateLimited(
                "too many failed logins for this user from this address; wait a minute".into(),
            ));
        }
        let anywhere = self.failures_by_user_anywhere.admit(name.clone());
        if anywhere == Admission::Refused {
            self.failures_by_user.take_back(key, by_user);
            self.failures_by_address.take_back(from, by_address);
            return Err(Error::RateLimited("too many failed logins for this user; wait a minute".into()));
        }
        // Every login counts here, and stays counted unless no check ran.
        let any = self.logins_by_user.admit(key.clone());
        if any == Admission::Refused {
            self.failures_by_user_anywhere.take_back(name, anywhere);
            self.failures_by_user.take_back(key, by_user);
            self.failures_by_address.take_back(from, by_address);
            return Err(Error::RateLimited("too many logins for this user from this address; wait a minute".into()));
        }
        let checked = self.check_password(username, password).await;
        if checked.is_err() {
            self.logins_by_user.take_back(key.clone(), any);
        }
        if !matches!(checked, Ok(None)) {
            self.failures_by_user_anywhere.take_back(name, anywhere);
            self.failures_by_user.take_back(key, by_user);
            self.failures_by_address.take_back(from, by_address);
        }
        checked?.ok_or_else(|| Error::Unauthorized(BAD_LOGIN.into()))
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
