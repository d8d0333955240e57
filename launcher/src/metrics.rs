//! Node metrics for Prometheus, as a text-format file for node_exporter's textfile collector
//! (`[metrics] file`). The root `berth policy check --fetch` the SPANK plugin runs before each
//! containerized step updates it: its counters (decisions, denials, failures, cache hits and
//! misses, pulls) are read back from the file itself, advanced and written with the gauges
//! of the moment (cache bytes and entries, containers running), all under a lock and through
//! a temporary file and a rename, so node_exporter never reads half a file and two steps
//! starting together never lose a count.
//!
//! Like the audit trail, metrics never change a decision: a failure to write them is a
//! warning on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::cache::{self, Cache, FetchOptions};
use crate::config::Config;
use crate::{Error, Result};

/// `[metrics]`: where the textfile goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The `.prom` file; written only if its directory exists. "": no metrics.
    pub file: PathBuf,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            // Debian's prometheus-node-exporter reads this directory.
            file: PathBuf::from("/var/lib/prometheus/node-exporter/berth.prom"),
        }
    }
}

/// One metric family: name, type, help.
struct Family(&'static str, &'static str, &'static str);

const FAMILIES: &[Family] = &[
    Family(
        "berth_decisions_total",
        "counter",
        "Node policy decisions for job steps, by verdict.",
    ),
    Family(
        "berth_allowed_total",
        "counter",
        "Allowed steps, by the [policy] allowed pattern that allowed them.",
    ),
    Family(
        "berth_denied_total",
        "counter",
        "Refused steps, by the kind of rule that refused them.",
    ),
    Family(
        "berth_failures_total",
        "counter",
        "Steps whose image could not be made ready, by cause.",
    ),
    Family(
        "berth_cache_hits_total",
        "counter",
        "Allowed images already in the node cache.",
    ),
    Family(
        "berth_cache_misses_total",
        "counter",
        "Allowed images pulled into the node cache.",
    ),
    Family(
        "berth_pull_duration_seconds",
        "summary",
        "Time to pull and convert an image into the cache.",
    ),
    Family(
        "berth_pull_bytes_total",
        "counter",
        "Bytes of images added to the cache by pulls.",
    ),
    Family(
        "berth_cache_bytes",
        "gauge",
        "Bytes of images in the node cache.",
    ),
    Family("berth_cache_entries", "gauge", "Images in the node cache."),
    Family(
        "berth_containers_running",
        "gauge",
        "berth containers running on this node.",
    ),
];

/// What one launcher call observed.
#[derive(Debug, Default)]
pub struct Observation {
    counters: BTreeMap<String, f64>,
}

impl Observation {
    fn add(&mut self, series: String, by: f64) {
        *self.counters.entry(series).or_default() += by;
    }

    /// A decision: allowed by `rule`, or refused for `reason`.
    pub fn decision(&mut self, allowed_by: std::result::Result<&str, &str>) {
        match allowed_by {
            Ok(rule) => {
                self.add(r#"berth_decisions_total{verdict="allow"}"#.into(), 1.0);
                self.add(
                    format!("berth_allowed_total{{rule=\"{}\"}}", escape(rule)),
                    1.0,
                );
            }
            Err(reason) => {
                self.add(r#"berth_decisions_total{verdict="deny"}"#.into(), 1.0);
                self.add(
                    format!("berth_denied_total{{kind=\"{}\"}}", denial_kind(reason)),
                    1.0,
                );
            }
        }
    }
}

/// `cache::fetch_with`, observed: a hit or a miss (and then how long the pull took and how
/// many bytes it added), or a failure and its cause.
pub fn fetch(
    config: &Config,
    image: &str,
    options: &FetchOptions,
    observed: &mut Observation,
) -> Result<PathBuf> {
    let before = cached(config);
    let started = Instant::now();
    match cache::fetch_with(config, image, options) {
        Ok(path) => {
            match before.get(&path) {
                Some(_) => observed.add("berth_cache_hits_total".into(), 1.0),
                None => {
                    observed.add("berth_cache_misses_total".into(), 1.0);
                    observed.add(
                        "berth_pull_duration_seconds_sum".into(),
                        secs(started.elapsed()),
                    );
                    observed.add("berth_pull_duration_seconds_count".into(), 1.0);
                    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                    observed.add("berth_pull_bytes_total".into(), bytes as f64);
                }
            }
            Ok(path)
        }
        Err(e) => {
            observed.add(
                format!("berth_failures_total{{cause=\"{}\"}}", failure_cause(&e)),
                1.0,
            );
            Err(e)
        }
    }
}

/// The cache's images by path, with their sizes; empty if it cannot be read.
fn cached(config: &Config) -> BTreeMap<PathBuf, u64> {
    Cache::open(&config.cache)
        .and_then(|c| c.list())
        .map(|images| images.into_iter().map(|i| (i.path, i.size)).collect())
        .unwrap_or_default()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Writes the textfile with `observed` added to its counters. A warning if that failed.
pub fn publish(config: &Config, observed: &Observation) -> Option<String> {
    let file = &config.metrics.file;
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty())?;
    if file.as_os_str().is_empty() || !dir.is_dir() {
        return None;
    }
    write_locked(config, file, observed)
        .err()
        .map(|e| format!("metrics: {e}"))
}

fn write_locked(config: &Config, file: &Path, observed: &Observation) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", file.display()), e);
    let lock_path = file.with_extension("prom.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail("locking", e))?;
    lock.lock().map_err(|e| fail("locking", e))?;
    let previous = std::fs::read_to_string(file).unwrap_or_default();
    let mut counters = read_counters(&previous);
    for (series, by) in &observed.counters {
        *counters.entry(series.clone()).or_default() += by;
    }
    let images = cached(config);
    let mut values = counters;
    values.insert(
        "berth_cache_bytes".into(),
        images.values().sum::<u64>() as f64,
    );
    values.insert("berth_cache_entries".into(), images.len() as f64);
    values.insert(
        "berth_containers_running".into(),
        containers_running() as f64,
    );
    let text = render(&values);
    let tmp = file.with_extension("prom.tmp");
    std::fs::write(&tmp, text).map_err(|e| fail("writing", e))?;
    std::fs::rename(&tmp, file).map_err(|e| fail("renaming into", e))
}

/// The counter series of a textfile this module wrote (gauges are measured afresh).
fn read_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let name = series.split('{').next().unwrap_or_default();
            FAMILIES.iter().any(|f| {
                f.1 != "gauge"
                    && (name == f.0
                        || name
                            .strip_prefix(f.0)
                            .is_some_and(|s| s == "_sum" || s == "_count"))
            })
        })
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
        .collect()
}

/// The text format: each family's HELP and TYPE, then its series.
fn render(values: &BTreeMap<String, f64>) -> String {
    let mut out = String::new();
    for Family(name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (series, value) in values {
            let base = series.split('{').next().unwrap_or_default();
            let base = base
                .strip_suffix("_sum")
                .or_else(|| base.strip_suffix("_count"))
                .filter(|_| *kind == "summary")
                .unwrap_or(base);
            if base == *name {
                let _ = writeln!(out, "{series} {value}");
            }
        }
    }
    out
}

/// How many `berth start` holders (one per containerized step) are running.
fn containers_running() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let mut args = cmdline.split(|&b| b == 0);
            let program = args.next().unwrap_or_default();
            program.ends_with(b"berth") && args.next() == Some(b"start")
        })
        .count()
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A bounded label for a refusal (the reasons themselves name images).
fn denial_kind(reason: &str) -> &'static str {
    let reason = reason.to_ascii_lowercase();
    if reason.contains("digest") {
        "require_digest"
    } else if reason.contains("local") || reason.contains("file") {
        "local_image"
    } else if reason.contains("not valid")
        || reason.contains("malformed")
        || reason.contains("invalid")
    {
        "invalid_reference"
    } else {
        "not_allowed"
    }
}

/// A bounded label for a failed fetch.
pub(crate) fn failure_cause(e: &Error) -> &str {
    match e {
        Error::AsCacheOwner { cause, .. } => cause,
        Error::RegistryDown { .. } => "registry_unreachable",
        Error::Unauthorized { .. } => "unauthorized",
        Error::ImageNotFound { .. } => "not_found",
        Error::DigestMismatch { .. } | Error::BadLayer { .. } | Error::UnsafeLayer { .. } => {
            "bad_image"
        }
        Error::Registry { .. } | Error::Manifest { .. } => "registry_error",
        Error::Cache { .. } | Error::Io { .. } | Error::Mksquashfs { .. } => "node_storage",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> Config {
        let mut config = Config::default();
        config.metrics.file = dir.join("berth.prom");
        config.cache.dir = dir.join("cache");
        config
    }

    #[test]
    fn counters_add_up_across_calls_and_gauges_are_measured() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let mut one = Observation::default();
        one.decision(Ok("h/*"));
        one.add("berth_cache_misses_total".into(), 1.0);
        one.add("berth_pull_duration_seconds_sum".into(), 2.5);
        one.add("berth_pull_duration_seconds_count".into(), 1.0);
        assert_eq!(publish(&config, &one), None);
        let mut two = Observation::default();
        two.decision(Ok("h/*"));
        two.decision(Err("image `x` is not from an approved registry"));
        assert_eq!(publish(&config, &two), None);
        let text = std::fs::read_to_string(&config.metrics.file).unwrap();
        assert!(
            text.contains("berth_allowed_total{rule=\"h/*\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_decisions_total{verdict=\"deny\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_denied_total{kind=\"not_allowed\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("berth_cache_misses_total 1\n"), "{text}");
        assert!(
            text.contains("berth_pull_duration_seconds_sum 2.5\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE berth_pull_duration_seconds summary\n"),
            "{text}"
        );
        assert!(text.contains("berth_cache_entries 0\n"), "{text}");
        assert!(!dir.path().join("berth.prom.tmp").exists());
    }

    #[test]
    fn no_metrics_without_the_textfile_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.metrics.file = dir.path().join("absent/berth.prom");
        assert_eq!(publish(&config, &Observation::default()), None);
        assert!(!config.metrics.file.exists());
    }

    #[test]
    fn the_grafana_dashboard_queries_only_metrics_berth_writes() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../packaging/grafana-dashboard.json")).unwrap();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(!panels.is_empty());
        for panel in panels {
            let expr = panel["targets"][0]["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(metric) = word.strip_prefix("berth_").map(|_| word) {
                    let base = metric
                        .strip_suffix("_sum")
                        .or_else(|| metric.strip_suffix("_count"))
                        .unwrap_or(metric);
                    assert!(
                        FAMILIES.iter().any(|f| f.0 == base),
                        "{metric} in {expr} is not a berth metric"
                    );
                }
            }
        }
    }

    #[test]
    fn labels_are_escaped_and_bounded() {
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
        assert_eq!(
            denial_kind("only digest-pinned references"),
            "require_digest"
        );
        assert_eq!(
            denial_kind("local image files are not allowed"),
            "local_image"
        );
    }
}
