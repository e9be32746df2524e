//! Metric handles looked up once per call site.
//!
//! `metrics::counter!("name")` looks the name up in the recorder's registry
//! and allocates a handle on every call, which costs more than the update on
//! the per-message paths. `hot_metric!(counter, "name")` does that once and
//! keeps the handle. Only for label-free names, and only where the recorder is
//! installed before the site first runs (the server installs it at start); a
//! handle taken with no recorder installed records nothing, ever. (Nor would
//! a kept handle survive the exporter's `idle_timeout`, which is not set.)

/// For the macro: callers need not depend on `metrics` themselves.
#[doc(hidden)]
pub use metrics;

#[macro_export]
macro_rules! hot_metric {
    (counter, $name:literal) => {
        $crate::hot_metric!(@cached $crate::hot_metric::metrics::Counter, $crate::hot_metric::metrics::counter!($name))
    };
    (gauge, $name:literal) => {
        $crate::hot_metric!(@cached $crate::hot_metric::metrics::Gauge, $crate::hot_metric::metrics::gauge!($name))
    };
    (histogram, $name:literal) => {
        $crate::hot_metric!(
            @cached $crate::hot_metric::metrics::Histogram,
            $crate::hot_metric::metrics::histogram!($name)
        )
    };
    (@cached $handle:ty, $lookup:expr) => {{
        static HANDLE: ::std::sync::OnceLock<$handle> = ::std::sync::OnceLock::new();
        HANDLE.get_or_init(|| $lookup)
    }};
}
