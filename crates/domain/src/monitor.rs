//! A sliding-window monitor of calls to each dependency (database, bus, …):
//! calls, success rate and latency over the last minute, in one-second buckets.
//! Process-wide, like the metrics recorder, so any layer can report to it.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::clock::now_ms;

/// Seconds the window covers.
pub const WINDOW_SECS: usize = 60;

#[derive(Clone, Copy, Default)]
struct Bucket {
    second: i64,
    calls: u64,
    failures: u64,
    total_us: u64,
    max_us: u64,
}

struct Window {
    buckets: [Bucket; WINDOW_SECS],
}

/// One dependency's last minute.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DependencyHealth {
    pub name: &'static str,
    pub calls: u64,
    pub failures: u64,
    /// 1.0 when there were no calls.
    pub success_rate: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
}

fn windows() -> &'static Mutex<BTreeMap<&'static str, Window>> {
    static WINDOWS: OnceLock<Mutex<BTreeMap<&'static str, Window>>> = OnceLock::new();
    WINDOWS.get_or_init(Default::default)
}

/// Records one call to `dependency`.
pub fn record(dependency: &'static str, ok: bool, elapsed: Duration) {
    record_at(dependency, ok, elapsed, now_ms() / 1000);
}

fn record_at(dependency: &'static str, ok: bool, elapsed: Duration, second: i64) {
    let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
    let mut all = windows().lock().unwrap_or_else(|e| e.into_inner());
    let window = all.entry(dependency).or_insert_with(|| Window { buckets: [Bucket::default(); WINDOW_SECS] });
    let bucket = &mut window.buckets[second.rem_euclid(WINDOW_SECS as i64) as usize];
    if bucket.second != second {
        *bucket = Bucket { second, ..Bucket::default() };
    }
    bucket.calls += 1;
    bucket.failures += u64::from(!ok);
    bucket.total_us += us;
    bucket.max_us = bucket.max_us.max(us);
}

/// Every dependency seen so far, over the last [`WINDOW_SECS`] seconds.
pub fn snapshot() -> Vec<DependencyHealth> {
    snapshot_at(now_ms() / 1000)
}

fn snapshot_at(now_s: i64) -> Vec<DependencyHealth> {
    let all = windows().lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .map(|(name, window)| {
            let live = window.buckets.iter().filter(|b| now_s - b.second < WINDOW_SECS as i64 && b.second <= now_s);
            let (calls, failures, total_us, max_us) = live
                .fold((0, 0, 0, 0), |(c, f, t, m), b| (c + b.calls, f + b.failures, t + b.total_us, m.max(b.max_us)));
            DependencyHealth {
                name,
                calls,
                failures,
                success_rate: if calls == 0 { 1.0 } else { (calls - failures) as f64 / calls as f64 },
                avg_ms: if calls == 0 { 0.0 } else { total_us as f64 / calls as f64 / 1000.0 },
                max_ms: max_us as f64 / 1000.0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(name: &str, now: i64) -> DependencyHealth {
        snapshot_at(now).into_iter().find(|h| h.name == name).unwrap()
    }

    #[test]
    fn counts_the_last_minute_only() {
        let t = 1_000_000;
        record_at("test-dep", true, Duration::from_millis(2), t);
        record_at("test-dep", true, Duration::from_millis(4), t + 1);
        record_at("test-dep", false, Duration::from_millis(6), t + 1);
        let h = health("test-dep", t + 1);
        assert_eq!((h.calls, h.failures), (3, 1));
        assert!((h.success_rate - 2.0 / 3.0).abs() < 1e-9);
        assert!((h.avg_ms - 4.0).abs() < 1e-9 && (h.max_ms - 6.0).abs() < 1e-9);
        // A minute later the first second has left the window, then all of it.
        assert_eq!(health("test-dep", t + 60).calls, 2);
        assert_eq!(health("test-dep", t + 61).calls, 0);
        assert_eq!(health("test-dep", t + 61).success_rate, 1.0);
        // A bucket is reused for a new second, not added to.
        record_at("test-dep", true, Duration::from_millis(1), t + 120);
        assert_eq!(health("test-dep", t + 120).calls, 1);
    }
}
