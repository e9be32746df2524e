//! Logs and Prometheus metrics.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0])
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding); then ours
            // only renders, and nothing records into it that needs folding.
            if metrics::set_global_recorder(recorder).is_ok() {
                spawn_upkeep(handle.clone());
            }
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample until it is folded into its
/// buckets, which `render` does for a scrape and `run_upkeep` does here: with
/// no scraper, samples would pile up at several per message for ever.
fn spawn_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms fold only when /metrics is read");
    }
}

/// Counts requests and their latency by route template, method and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("stacker_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("stacker_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// The running process's logging: keeps file logs flushing and lets the level change live.
pub struct Logging {
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
    filter: reload::Handle<EnvFilter, Registry>,
}

impl Logging {
    /// Applies a new `log.level` directive.
    pub fn set_level(&self, level: &str) -> anyhow::Result<()> {
        let filter = EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("config: log.level: {e}"))?;
        self.filter.reload(filter).map_err(|e| anyhow::anyhow!("log.level: {e}"))
    }
}

/// Installs the global tracing subscriber.
pub fn init_logging(config: &LogConfig) -> anyhow::Result<Logging> {
    let filter = EnvFilter::try_new(&config.level).map_err(|e| anyhow::anyhow!("config: log.level: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let (file_layer, guard) = match &config.dir {
        Some(dir) => {
            let appender = tracing_appender::rolling::daily(dir, "stacker.log");
            let (writer, guard) = tracing_appender::non_blocking(appender);
            (Some(fmt::layer().json().with_writer(writer)), Some(guard))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(file_layer);
    match config.format {
        LogFormat::Human => registry.with(fmt::layer()).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json()).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    Ok(Logging { _guard: guard, filter: handle })
}
