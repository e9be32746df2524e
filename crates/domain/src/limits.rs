//! Attempts per key in fixed windows: the per-minute, per-user and
//! per-address limits on logins, registrations, rooms, joins and search, and
//! how often a user's stale devices are looked for.

use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;

use crate::{Error, Result};

/// What [`AttemptWindow::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Let through and counted.
    Counted,
    /// Let through without counting: no key, or no limit.
    Free,
    /// Over the limit: not counted.
    Refused,
}

/// Attempts per key in a fixed window (a minute) that starts with the key's
/// first attempt, counted before the work so that a burst sent all at once
/// is counted too. Bounded and expiring.
pub(crate) struct AttemptWindow<K> {
    counts: Cache<K, u32>,
    /// 0: no limit. Changeable while running.
    limit: AtomicU32,
}

/// Ends a key's window a fixed time after its first attempt. (A time to
/// live would restart at every write, so an address that kept trying, even
/// slowly or successfully, would never see its count reset.)
struct FixedWindow(Duration);

impl<K, V> Expiry<K, V> for FixedWindow {
    fn expire_after_create(&self, _: &K, _: &V, _: Instant) -> Option<Duration> {
        Some(self.0)
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> AttemptWindow<K> {
    pub(crate) fn new(limit: u32) -> Self {
        Self::with_window(limit, Duration::from_secs(60))
    }

    pub(crate) fn with_window(limit: u32, window: Duration) -> Self {
        let counts = Cache::builder().max_capacity(100_000).expire_after(FixedWindow(window)).build();
        Self { counts, limit: AtomicU32::new(limit) }
    }

    pub(crate) fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub(crate) fn admit(&self, key: Option<K>) -> Admission {
        let limit = self.limit.load(Ordering::Relaxed);
        let Some(key) = key.filter(|_| limit > 0) else {
            return Admission::Free;
        };
        let count = self.counts.entry(key.clone()).and_upsert_with(|old| old.map_or(0, |e| e.into_value()) + 1);
        if count.into_value() > limit {
            self.take_back(Some(key), Admission::Counted);
            Admission::Refused
        } else {
            Admission::Counted
        }
    }

    /// [`AttemptWindow::admit`], with a refusal as a 429 saying `why`.
    pub(crate) fn admit_or(&self, key: Option<K>, why: &str) -> Result<Admission> {
        match self.admit(key) {
            Admission::Refused => Err(Error::RateLimited(why.into())),
            admitted => Ok(admitted),
        }
    }

    /// Runs `work` as one attempt for `key` (refused with a 429 saying `why`
    /// past the limit), taken back if the work fails: only work that was
    /// done counts.
    pub(crate) async fn counted<T>(
        &self,
        key: Option<K>,
        why: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let attempt = self.admit_or(key.clone(), why)?;
        let done = work.await;
        if done.is_err() {
            self.take_back(key, attempt);
        }
        done
    }

    /// Takes back an attempt `admit` counted (one that did not fail).
    pub(crate) fn take_back(&self, key: Option<K>, admission: Admission) {
        let Some(key) = key.filter(|_| admission == Admission::Counted) else {
            return;
        };
        self.counts.entry(key).and_compute_with(|old| match old.map(|e| e.into_value()) {
            Some(n) if n > 1 => Op::Put(n - 1),
            _ => Op::Remove,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_ends_on_time_however_often_its_key_keeps_trying() {
        let window = AttemptWindow::with_window(2, Duration::from_millis(400));
        let key = || Some("10.0.0.1".to_string());
        let started = Instant::now();
        assert_eq!(window.admit(key()), Admission::Counted);
        assert_eq!(window.admit(key()), Admission::Counted);
        // Refused attempts and successes (taken back) while the window runs
        // do not move its end.
        while started.elapsed() < Duration::from_millis(300) {
            assert_eq!(window.admit(key()), Admission::Refused);
            std::thread::sleep(Duration::from_millis(20));
        }
        window.take_back(key(), Admission::Counted);
        assert_eq!(window.admit(key()), Admission::Counted, "a success's place is free again");
        assert_eq!(window.admit(key()), Admission::Refused);
        std::thread::sleep(Duration::from_millis(400).saturating_sub(started.elapsed()) + Duration::from_millis(50));
        assert_eq!(window.admit(key()), Admission::Counted, "a new window");
        assert_eq!(window.admit(key()), Admission::Counted);
        assert_eq!(window.admit(key()), Admission::Refused);
        // No key or no limit: nothing counted.
        assert_eq!(window.admit(None), Admission::Free);
        window.set_limit(0);
        assert_eq!(window.admit(key()), Admission::Free);
    }
}
