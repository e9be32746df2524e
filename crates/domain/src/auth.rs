//! Password hashing (argon2id, off the async threads) and JWT tokens (HS256 only).

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::model::UserId;
use crate::{clock::now_ms, Error, Result};

/// Each argon2 run holds 19 MiB (the default m_cost) and a core: at most one
/// per core runs at once, so a burst of registrations or logins queues here
/// instead of growing memory by 19 MiB per request.
static HASHING: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))));

/// How long a request waits for a hashing slot before it is told to retry.
const HASHING_WAIT: Duration = Duration::from_secs(10);

/// Runs `work` on the blocking pool once a hashing slot is free.
async fn with_hashing_slot<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let slot = tokio::time::timeout(HASHING_WAIT, HASHING.clone().acquire_owned())
        .await
        .map_err(|_| Error::Unavailable("too many logins and registrations at once; retry shortly".into()))?
        .map_err(|_| Error::Internal("hashing semaphore closed".into()))?;
    // The slot travels with the hash: a request that is dropped meanwhile does
    // not free it while argon2 still runs.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| Error::Internal(format!("hash task: {e}")))
}

/// Hashes a password with argon2id on the blocking pool.
pub async fn hash_password(password: String) -> Result<String> {
    with_hashing_slot(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::Internal(format!("argon2: {e}")))
    })
    .await?
}

/// Verifies on the blocking pool. A malformed stored hash counts as a mismatch.
pub async fn verify_password(password: String, hash: String) -> Result<bool> {
    with_hashing_slot(move || {
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
    })
    .await
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, as a string like every id on the wire.
    user_id: String,
    iat: i64,
    exp: i64,
}

/// Issues and checks access tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_ms: i64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_ms: (ttl_secs as i64).saturating_mul(1000),
        }
    }

    /// Returns the token and its expiry (Unix ms).
    pub fn issue(&self, user_id: UserId) -> Result<(String, i64)> {
        let now = now_ms();
        let expires_at = now + self.ttl_ms;
        let claims = Claims { user_id: user_id.to_string(), iat: now / 1000, exp: expires_at / 1000 };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("jwt encode: {e}")))?;
        Ok((token, expires_at))
    }

    pub fn verify(&self, token: &str) -> Result<UserId> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| Error::Unauthorized("invalid or expired token".into()))?;
        data.claims.user_id.parse().map_err(|_| Error::Unauthorized("invalid or expired token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn password_roundtrip() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse".into(), hash.clone()).await.unwrap());
        assert!(!verify_password("wrong horse".into(), hash).await.unwrap());
        assert!(!verify_password("x".into(), "not a hash".into()).await.unwrap());
    }

    #[test]
    fn tokens() {
        let tokens = Tokens::new(b"secret-one", 60);
        let (token, exp) = tokens.issue(42).unwrap();
        assert!(exp > now_ms());
        assert_eq!(tokens.verify(&token).unwrap(), 42);
        assert!(Tokens::new(b"secret-two", 60).verify(&token).is_err());
        assert!(tokens.verify("garbage").is_err());
        // Pinned algorithm: an HS512 token signed with the same secret is refused.
        let claims = Claims { user_id: "42".into(), iat: 0, exp: now_ms() / 1000 + 60 };
        let other = encode(&Header::new(Algorithm::HS512), &claims, &EncodingKey::from_secret(b"secret-one")).unwrap();
        assert!(tokens.verify(&other).is_err());
        // Expired.
        let claims = Claims { user_id: "42".into(), iat: 0, exp: now_ms() / 1000 - 60 };
        let old = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"secret-one")).unwrap();
        assert!(tokens.verify(&old).is_err());
    }
}
