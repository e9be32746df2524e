//! Results: a human table on stdout and a JSON document (`--json PATH`).

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::procstat::{round, Usages};

/// A latency histogram in microseconds, sharded so that many tasks can record
/// into it without contending on one lock.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latency {
    pub fn new() -> Latency {
        let shards = (0..16).map(|_| Mutex::new(new_histogram())).collect();
        Latency { shards }
    }

    pub fn record(&self, shard: usize, micros: u64) {
        let mut h = self.shards[shard % self.shards.len()].lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.max(1));
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.add(&*h);
        }
        all
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

fn ms(micros: u64) -> f64 {
    round(micros as f64 / 1000.0, 3)
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p99_9_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": round(h.mean() / 1000.0, 3),
    })
}

pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.3} ms, p95 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3} ({} samples)",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// One scenario run.
pub struct Report {
    pub scenario: String,
    pub target: String,
    rows: Vec<(String, String)>,
    params: Map<String, Value>,
    results: Map<String, Value>,
    pub failures: Vec<String>,
    usage: Option<Value>,
}

impl Report {
    pub fn new(scenario: &str, target: &str) -> Report {
        Report {
            scenario: scenario.into(),
            target: target.into(),
            rows: Vec::new(),
            params: Map::new(),
            results: Map::new(),
            failures: Vec::new(),
            usage: None,
        }
    }

    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.insert(key.into(), value.into());
    }

    /// A result with its line in the table.
    pub fn result(&mut self, key: &str, label: &str, value: impl Into<Value>, shown: impl Into<String>) {
        self.results.insert(key.into(), value.into());
        self.rows.push((label.into(), shown.into()));
    }

    /// A result in the JSON only.
    pub fn data(&mut self, key: &str, value: impl Into<Value>) {
        self.results.insert(key.into(), value.into());
    }

    pub fn count(&mut self, key: &str, label: &str, n: u64) {
        self.result(key, label, n, n.to_string());
    }

    pub fn rate(&mut self, key: &str, label: &str, per_s: f64) {
        self.result(key, label, round(per_s, 1), format!("{per_s:.0} /s"));
    }

    pub fn latency(&mut self, key: &str, label: &str, h: &Histogram<u64>) {
        self.result(key, label, latency_json(h), latency_line(h));
    }

    pub fn usage(&mut self, u: &Usages) {
        if let Some(s) = &u.server {
            self.rows.push(("server".into(), s.line()));
        } else {
            self.rows.push(("server".into(), "not measured (give --server-pid or use --spawn)".into()));
        }
        self.rows.push(("generator".into(), u.generator.line()));
        self.usage = Some(u.json());
    }

    pub fn note(&mut self, label: &str, text: impl Into<String>) {
        self.rows.push((label.into(), text.into()));
    }

    /// A scenario's result after its server was stopped: a failed stop fails the report.
    pub fn after_stop(report: anyhow::Result<Report>, stopped: anyhow::Result<()>) -> anyhow::Result<Report> {
        let mut report = report?;
        if let Err(e) = stopped {
            report.fail(format!("{e:#}"));
        }
        Ok(report)
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(msg.into());
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.results.get(key)
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "target": self.target,
            "verified": self.ok(),
            "failures": self.failures,
            "params": self.params,
            "results": self.results,
            "processes": self.usage,
        })
    }

    pub fn print(&self) {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0).max(10);
        println!();
        println!("== {} against {} ==", self.scenario, self.target);
        let params: Vec<String> = self.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{:width$}  {}", "params", params.join(" "));
        for (label, value) in &self.rows {
            println!("{label:width$}  {value}");
        }
        if self.ok() {
            println!("{:width$}  OK: every check passed", "verified");
        } else {
            println!("{:width$}  FAILED ({} problems):", "verified", self.failures.len());
            for f in self.failures.iter().take(30) {
                println!("{:width$}    - {f}", "");
            }
            if self.failures.len() > 30 {
                println!("{:width$}    … and {} more", "", self.failures.len() - 30);
            }
        }
    }
}

/// Writes the reports (and a comparison, if any) to `path`.
pub fn write_json(path: &Path, reports: &[Report], comparison: Option<Value>) -> Result<()> {
    let machine = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())),
    });
    let generated =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let doc = json!({
        "tool": "stacker-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "generated_at_unix_ms": generated,
        "machine": machine,
        "verified": reports.iter().all(Report::ok),
        "runs": reports.iter().map(Report::json).collect::<Vec<_>>(),
        "comparison": comparison,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
