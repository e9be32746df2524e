//! CPU and memory of a process (or of every process of a cluster, summed),
//! read from /proc/<pid>.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    /// utime + stime of every thread, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// One reading of several processes, CPU and RSS summed.
pub fn sample_all(pids: &[u32]) -> Result<Sample> {
    let at = Instant::now();
    let (mut cpu_ticks, mut rss_kib) = (0, 0);
    for pid in pids {
        let s = sample(*pid)?;
        cpu_ticks += s.cpu_ticks;
        rss_kib += s.rss_kib;
    }
    Ok(Sample { at, cpu_ticks, rss_kib })
}

pub fn sample(pid: u32) -> Result<Sample> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (is process {pid} running?)"))?;
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields.get(n - 3).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("/proc/{pid}/stat: field {n} missing"))
    };
    let cpu_ticks = field(14)? + field(15)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Sample { at, cpu_ticks, rss_kib })
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(a: &Sample, b: &Sample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / clock_ticks() / wall * 100.0
}

/// CPU seconds between two samples.
pub fn cpu_seconds(a: &Sample, b: &Sample) -> f64 {
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / clock_ticks()
}

/// Watches a process over a measured window: CPU from the first to the last
/// sample, RSS at both ends and the peak seen by a sampler every 200 ms.
pub struct Watch {
    pids: Vec<u32>,
    first: Sample,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// What a [`Watch`] saw.
#[derive(Clone, Debug)]
pub struct Usage {
    pub pids: Vec<u32>,
    pub wall_s: f64,
    pub cpu_s: f64,
    /// Percent of one core over the window (200% = both cores of this machine).
    pub cpu_pct: f64,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "pids": self.pids,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "cpu_pct_of_one_core": round(self.cpu_pct, 1),
            "rss_start_mib": round(self.rss_start_kib as f64 / 1024.0, 1),
            "rss_end_mib": round(self.rss_end_kib as f64 / 1024.0, 1),
            "rss_peak_mib": round(self.rss_peak_kib as f64 / 1024.0, 1),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "cpu {:.1}% of a core ({:.2} s over {:.1} s), rss {:.1} -> {:.1} MiB (peak {:.1})",
            self.cpu_pct,
            self.cpu_s,
            self.wall_s,
            self.rss_start_kib as f64 / 1024.0,
            self.rss_end_kib as f64 / 1024.0,
            self.rss_peak_kib as f64 / 1024.0
        )
    }
}

impl Watch {
    pub fn start(pids: Vec<u32>) -> Result<Watch> {
        let first = sample_all(&pids)?;
        let peak_kib = Arc::new(AtomicU64::new(first.rss_kib));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt, watched) = (peak_kib.clone(), stop.clone(), pids.clone());
        tokio::spawn(async move {
            while !halt.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match sample_all(&watched) {
                    Ok(s) => {
                        peak.fetch_max(s.rss_kib, Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Watch { pids, first, peak_kib, stop })
    }

    pub fn finish(self) -> Result<Usage> {
        self.stop.store(true, Ordering::Relaxed);
        let last = sample_all(&self.pids)?;
        let peak = self.peak_kib.load(Ordering::Relaxed).max(last.rss_kib);
        Ok(Usage {
            pids: self.pids,
            wall_s: last.at.duration_since(self.first.at).as_secs_f64(),
            cpu_s: cpu_seconds(&self.first, &last),
            cpu_pct: cpu_percent(&self.first, &last),
            rss_start_kib: self.first.rss_kib,
            rss_end_kib: last.rss_kib,
            rss_peak_kib: peak,
        })
    }
}

/// Watches the server (when its pids are known: one, or every process of a
/// cluster) and this generator together.
pub struct Watches {
    server: Option<Watch>,
    generator: Watch,
}

pub struct Usages {
    pub server: Option<Usage>,
    pub generator: Usage,
}

impl Watches {
    pub fn start(server_pids: &[u32]) -> Result<Watches> {
        let server = (!server_pids.is_empty()).then(|| Watch::start(server_pids.to_vec())).transpose()?;
        Ok(Watches { server, generator: Watch::start(vec![std::process::id()])? })
    }

    pub fn finish(self) -> Result<Usages> {
        Ok(Usages { server: self.server.map(Watch::finish).transpose()?, generator: self.generator.finish()? })
    }
}

impl Usages {
    pub fn json(&self) -> Value {
        json!({
            "server": self.server.as_ref().map(Usage::json),
            "generator": self.generator.json(),
        })
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let a = sample(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = sample(std::process::id()).unwrap();
        assert!(a.rss_kib > 0);
        assert!(cpu_percent(&a, &b) >= 0.0);
    }
}
