//! Every metric name, its description, and the Prometheus exposition.
//!
//! Labels are bounded: model names and replica slot ids come from configuration, codes from the
//! fixed set in `error`. Replica CPU and memory are read from `/proc` at scrape time, so an idle
//! proxy does no periodic work for them.
//!
//! Counters and gauges are the Prometheus exporter's. Histograms are this module's own
//! ([`Buckets`]): a sample is counted into its bucket as it is recorded, a few atomic adds, where
//! the exporter keeps every sample in a queue until a scrape or an upkeep drains it into the
//! buckets. That queue cost a prediction about 900 instructions for its five samples, and it grew
//! without bound when nobody scraped; counted buckets hold nothing to drain, so there is no upkeep
//! and an idle proxy does no periodic work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, HistogramFn,
    Key, KeyName, Metadata, SharedString, Unit,
};
use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::{
    LabelSet, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::replica::Slot;

pub const REQUESTS: &str = "modelgate_requests_total";
pub const REQUEST_DURATION: &str = "modelgate_request_duration_seconds";
pub const QUEUE_WAIT: &str = "modelgate_queue_wait_seconds";
pub const REQUEST_SIZE: &str = "modelgate_request_size_bytes";
pub const RESPONSE_SIZE: &str = "modelgate_response_size_bytes";
pub const QUEUE_DEPTH: &str = "modelgate_queue_depth";
pub const REPLICA_BUSY: &str = "modelgate_replica_busy";
pub const REPLICA_RESTARTS: &str = "modelgate_replica_restarts_total";
pub const REPLICA_CPU: &str = "modelgate_replica_cpu_seconds_total";
pub const REPLICA_MEMORY: &str = "modelgate_replica_memory_bytes";
pub const AUDIT_DROPPED: &str = "modelgate_audit_dropped_total";
pub const BATCH_SIZE: &str = "modelgate_dispatch_batch_size";
pub const REQUEUED: &str = "modelgate_requests_requeued_total";
pub const IN_PLACE: &str = "modelgate_requests_in_place_total";
pub const ANSWERS_IN_PLACE: &str = "modelgate_answers_in_place_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
const SIZE_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];
/// For a histogram none of the above fits (Prometheus clients' default).
const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The upper bounds of a histogram's buckets, by its name.
fn bounds_for(name: &str) -> &'static [f64] {
    if name == BATCH_SIZE {
        BATCH_BUCKETS
    } else if name.ends_with("_seconds") {
        LATENCY_BUCKETS
    } else if name.ends_with("_bytes") {
        SIZE_BUCKETS
    } else {
        DEFAULT_BUCKETS
    }
}

/// A histogram counted as its samples arrive: one count per bucket (the last for samples above
/// every bound) and the sum, each an atomic. A scrape reads them while they move, so a sample
/// recorded meanwhile may be in the counts and not in the sum, or the other way round: the
/// exposition is off by at most the samples in flight, never by more.
pub struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    /// The sum's `f64` bits.
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Buckets {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Cumulative counts per bound (`le`) and, last, the total (`+Inf`); and the sum.
    fn read(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect::<Vec<_>>();
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        (cumulative, sum)
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        // The first bound at or above the value; NaN is above every bound.
        let i = if value.is_nan() {
            self.bounds.len()
        } else {
            self.bounds.partition_point(|&b| b < value)
        };
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut sum = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(sum) + value).to_bits();
            match self
                .sum
                .compare_exchange_weak(sum, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => sum = now,
            }
        }
    }
}

/// A histogram's label sets, in the order they were registered.
type LabelSets = Vec<(Key, Arc<Buckets>)>;

/// Every histogram registered, by name, and their descriptions.
#[derive(Default)]
struct Histograms {
    by_name: Mutex<BTreeMap<String, LabelSets>>,
    help: Mutex<BTreeMap<String, String>>,
}

impl Histograms {
    fn register(&self, key: &Key) -> Arc<Buckets> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        let sets = by_name.entry(key.name().to_string()).or_default();
        if let Some((_, buckets)) = sets.iter().find(|(k, _)| k == key) {
            return buckets.clone();
        }
        let buckets = Arc::new(Buckets::new(bounds_for(key.name())));
        sets.push((key.clone(), buckets.clone()));
        buckets
    }

    fn render(&self, out: &mut String) {
        let help = self.help.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Copied out, so that registering a histogram (the control plane, on a runtime thread)
        // never waits for a render.
        let by_name = self
            .by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let no_global_labels = Default::default();
        // About 80 bytes a line, reserved at once rather than grown by copying a 5 MB string.
        let lines: usize = by_name
            .values()
            .flat_map(|sets| sets.iter().map(|(_, b)| b.bounds.len() + 3))
            .sum();
        out.reserve(lines * 80);
        for (name, sets) in by_name.iter() {
            if let Some(desc) = help.get(name) {
                write_help_line(out, name, None, None, desc);
            }
            write_type_line(out, name, None, None, "histogram");
            // The bounds as the exporter writes them, formatted once per histogram rather than
            // once per line (every label set of a name has the same bounds).
            let mut le: Vec<String> = Vec::new();
            for (key, buckets) in sets {
                let labels = LabelSet::from_key_and_global(key, &no_global_labels);
                // Sanitised and joined once per label set, not once per line.
                let joined = labels.to_strings().collect::<Vec<_>>().join(",");
                if le.len() != buckets.bounds.len() {
                    le = buckets.bounds.iter().map(f64::to_string).collect();
                }
                let (cumulative, sum) = buckets.read();
                let total = cumulative.last().copied().unwrap_or(0);
                for (le, count) in le.iter().zip(cumulative) {
                    write_count_line(out, name, "bucket", &joined, Some(le), count);
                }
                write_count_line(out, name, "bucket", &joined, Some("+Inf"), total);
                write_metric_line::<&str, f64>(out, name, Some("sum"), &labels, None, sum, None);
                write_count_line(out, name, "count", &joined, None, total);
            }
            out.push('\n');
        }
    }
}

/// The global recorder: the Prometheus exporter's for counters and gauges, [`Buckets`] for
/// histograms.
pub struct Recorder {
    prometheus: PrometheusRecorder,
    histograms: Arc<Histograms>,
}

/// One sample line with an integer value, byte for byte as the exporter's `write_metric_line`
/// writes it, from labels already sanitised and joined. A scrape of 1,000 models writes 75,000 of
/// these: the exporter's function formats each through `fmt` and allocates for each label; with
/// it, the render took 3.6 times as long (`metrics_render` bench, together with the reserve and
/// the joins done once per label set).
fn write_count_line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &str,
    le: Option<&str>,
    value: u64,
) {
    out.push_str(name);
    if !name.ends_with(suffix) {
        out.push('_');
        out.push_str(suffix);
    }
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        out.push_str(labels);
        if let Some(le) = le {
            if !labels.is_empty() {
                out.push(',');
            }
            out.push_str("le=\"");
            out.push_str(le);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(itoa::Buffer::new().format(value));
    out.push('\n');
}

/// Renders the exposition of a [`Recorder`].
#[derive(Clone)]
pub struct Handle {
    prometheus: PrometheusHandle,
    histograms: Arc<Histograms>,
    /// One render at a time (see [`Handle::render_turn`]).
    rendering: Arc<tokio::sync::Semaphore>,
}

impl Handle {
    /// Counters and gauges, then histograms, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = self.prometheus.render();
        self.histograms.render(&mut out);
        out
    }

    /// Waits for the turn to render. Renders run one at a time, off the runtime's threads: with
    /// 1,000 models the exposition is about 5 MB and one render takes about 12 ms of CPU on the
    /// machine of `docs/PERFORMANCE.md`, so scrapes that arrive together wait for each other
    /// rather than each holding a blocking thread and a 5 MB string at once. The render owns the
    /// turn: a scraper that goes away while its render runs does not let the next one start.
    pub async fn render_turn(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.rendering
            .clone()
            .acquire_owned()
            .await
            .expect("the render semaphore is never closed")
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.histograms
            .help
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.as_str().to_string())
            .or_insert_with(|| description.to_string());
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.prometheus.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.prometheus.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.histograms.register(key))
    }
}

/// A recorder and the handle that renders it, not installed (benches and tests install it
/// locally).
pub fn recorder() -> (Recorder, Handle) {
    let prometheus = PrometheusBuilder::new().build_recorder();
    let histograms = Arc::new(Histograms::default());
    let handle = Handle {
        prometheus: prometheus.handle(),
        histograms: histograms.clone(),
        rendering: Arc::new(tokio::sync::Semaphore::new(1)),
    };
    (
        Recorder {
            prometheus,
            histograms,
        },
        handle,
    )
}

/// Installs the global recorder; returns the handle that renders `/metrics`.
pub fn install() -> anyhow::Result<Handle> {
    let (recorder, handle) = recorder();
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    describe();
    Ok(handle)
}

/// Describes every metric to the current recorder.
fn describe() {
    describe_counter!(
        REQUESTS,
        "Prediction requests answered, by model, replica and result code"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request head to response"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time a request waited for a free replica"
    );
    describe_histogram!(REQUEST_SIZE, Unit::Bytes, "Prediction request body size");
    describe_histogram!(RESPONSE_SIZE, Unit::Bytes, "Prediction response body size");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for a replica");
    describe_gauge!(REPLICA_BUSY, "1 while the replica handles a request");
    describe_counter!(REPLICA_RESTARTS, "Replica process restarts, by reason");
    describe_histogram!(
        BATCH_SIZE,
        "Requests written to a replica together (it runs them one at a time, in order)"
    );
    describe_counter!(
        REQUEUED,
        "Requests put back at the front of the queue because their replica ended before running them"
    );
    describe_counter!(
        IN_PLACE,
        "Requests over 64 KB written straight into their replica's memory after their body arrived (result=\"written\") or partly while it arrived (result=\"written_ahead\"), or sent over its socket because writing into that replica's memory failed (result=\"fell_back\")"
    );
    describe_counter!(
        ANSWERS_IN_PLACE,
        "Answers of 64 KB or more copied straight out of their replica's memory instead of read from its socket"
    );
    describe_counter!(
        AUDIT_DROPPED,
        "Audit records dropped because the writer's queue was full"
    );
}

fn proc_stats(pid: i32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: f64 = fields.get(21)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as f64;
    Some(((utime + stime) / ticks, rss_pages * page))
}

/// Called when a slot's process `pgid` (0: none) has ended, and the slot has forgotten it: folds
/// its last CPU time (read while it is not yet reaped) into the slot's total, so the counter
/// never goes backwards across restarts.
pub fn retire_replica_cpu(slot: &Slot, pgid: i32) {
    let now = if pgid > 0 {
        proc_stats(pgid).map(|s| s.0)
    } else {
        None
    };
    let mut cpu = slot.cpu.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(now) = now {
        cpu.current = cpu.current.max(now);
    }
    cpu.retired += cpu.current;
    cpu.current = 0.0;
}

/// Appends the replica CPU counter and memory gauge, read from `/proc` now, to an exposition.
///
/// They are written here rather than through the registry because the `metrics` counter type is
/// an integer and CPU seconds need fractions.
pub fn render_replicas<'a>(out: &mut String, slots: impl Iterator<Item = &'a Slot>) {
    use std::fmt::Write;
    let mut cpu_lines = String::new();
    let mut mem_lines = String::new();
    for slot in slots {
        let pgid = slot.pgid();
        let (now_cpu, rss) = if pgid > 0 {
            proc_stats(pgid).unwrap_or((0.0, 0.0))
        } else {
            (0.0, 0.0)
        };
        let total = {
            let mut cpu = slot.cpu.lock().unwrap_or_else(|p| p.into_inner());
            cpu.current = cpu.current.max(now_cpu);
            cpu.retired + cpu.current
        };
        let labels = format!("model=\"{}\",replica=\"{}\"", slot.model, slot.id);
        let _ = writeln!(cpu_lines, "{REPLICA_CPU}{{{labels}}} {total}");
        let _ = writeln!(mem_lines, "{REPLICA_MEMORY}{{{labels}}} {rss}");
    }
    let _ = writeln!(
        out,
        "# HELP {REPLICA_CPU} CPU time used by the replica's processes\n# TYPE {REPLICA_CPU} counter\n{cpu_lines}# HELP {REPLICA_MEMORY} Resident memory of the replica process\n# TYPE {REPLICA_MEMORY} gauge\n{mem_lines}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::Matcher;

    /// Our histograms render exactly as the Prometheus exporter renders the same samples into the
    /// same buckets.
    #[test]
    fn histograms_render_as_the_exporter_renders_them() {
        let (ours, handle) = recorder();
        let theirs = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
            .unwrap()
            .set_buckets_for_metric(Matcher::Full(REQUEST_SIZE.into()), SIZE_BUCKETS)
            .unwrap()
            .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), LATENCY_BUCKETS)
            .unwrap()
            .build_recorder();
        let samples = [0.0, 0.000_05, 0.000_07, 0.3, 1.0, 59.0, 61.0, 1e9];
        for recorder in [&ours as &dyn metrics::Recorder, &theirs] {
            metrics::with_local_recorder(recorder, || {
                describe();
                for model in ["a", "b\"c"] {
                    let h = metrics::histogram!(REQUEST_DURATION, "model" => model);
                    let s = metrics::histogram!(REQUEST_SIZE, "model" => model);
                    for v in samples {
                        h.record(v);
                        s.record(v * 1e6);
                    }
                }
                // Without labels: no braces on the sum and count lines.
                let unlabelled = metrics::histogram!(QUEUE_WAIT);
                for v in samples {
                    unlabelled.record(v);
                }
            });
        }
        let ours = handle.render();
        let theirs = theirs.handle().render();
        let lines = |text: &str| {
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains("_seconds") || l.contains("_bytes"))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        assert!(ours
            .contains("modelgate_request_duration_seconds_bucket{model=\"a\",le=\"0.0001\"} 3\n"));
        assert!(ours.contains("modelgate_request_duration_seconds_count{model=\"b\\\"c\"} 8\n"));
        assert!(ours.contains("\nmodelgate_queue_wait_seconds_count 8\n"));
        assert!(ours.contains("\nmodelgate_queue_wait_seconds_bucket{le=\"+Inf\"} 8\n"));
        assert_eq!(lines(&ours), lines(&theirs));
    }

    #[test]
    fn a_sample_lands_in_the_first_bucket_at_or_above_it() {
        let b = Buckets::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 3.0, f64::NAN] {
            b.record(v);
        }
        let (cumulative, sum) = b.read();
        assert_eq!(cumulative, [2, 4, 6]);
        assert!(sum.is_nan());
    }
}
