//! Every metric name, its description, and the Prometheus exposition.
//!
//! Labels are bounded: model names and replica slot ids come from configuration, codes from the
//! fixed set in `error`. Replica CPU and memory are read from `/proc` at scrape time, so an idle
//! proxy does no periodic work for them.
//!
//! The Prometheus recorder keeps every histogram sample until it is drained into the buckets, by
//! a scrape or by upkeep. Nothing scraping must not mean memory growing with traffic (it did:
//! about 3.5 MB a second at 47,000 requests a second), so the global recorder is the Prometheus
//! one wrapped to count histogram samples, and upkeep runs on a thread of its own, woken after
//! every [`UPKEEP_EVERY`] samples, wherever they were recorded: the samples waiting stay under a
//! few hundred kilobytes, and an idle proxy still does no periodic work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, HistogramFn,
    Key, KeyName, Metadata, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
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

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
const SIZE_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Histogram samples between two drains (a prediction records four or five).
pub const UPKEEP_EVERY: u64 = 16_384;

/// Counts histogram samples and wakes the upkeep thread after every [`UPKEEP_EVERY`].
struct Upkeep {
    samples: AtomicU64,
    thread: std::thread::Thread,
}

impl Upkeep {
    fn sampled(&self) {
        if self.samples.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.thread.unpark();
        }
    }
}

/// The Prometheus recorder, its histograms counted for [`Upkeep`].
struct Recorder {
    prometheus: PrometheusRecorder,
    upkeep: Arc<Upkeep>,
}

struct CountedHistogram {
    histogram: Histogram,
    upkeep: Arc<Upkeep>,
}

impl HistogramFn for CountedHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value);
        self.upkeep.sampled();
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_histogram(key, unit, description)
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.prometheus.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.prometheus.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(CountedHistogram {
            histogram: self.prometheus.register_histogram(key, metadata),
            upkeep: self.upkeep.clone(),
        }))
    }
}

/// Installs the global recorder and its upkeep thread; returns the handle that renders
/// `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)?
        .build_recorder();
    let handle = prometheus.handle();
    let drains = handle.clone();
    let thread = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            // A spurious wake-up only drains early.
            std::thread::park();
            drains.run_upkeep();
        })
        .expect("spawning the metrics upkeep thread");
    let upkeep = Arc::new(Upkeep {
        samples: AtomicU64::new(0),
        thread: thread.thread().clone(),
    });
    metrics::set_global_recorder(Recorder { prometheus, upkeep })
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
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
        AUDIT_DROPPED,
        "Audit records dropped because the writer's queue was full"
    );
    Ok(handle)
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

/// Called when a slot's process ends: folds its last observed CPU time into the slot's total,
/// so the counter never goes backwards across restarts.
pub fn retire_replica_cpu(slot: &Slot) {
    let pgid = slot.pgid();
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
