//! The routing snapshot: which access key reaches which model's replicas.
//!
//! The snapshot is immutable; the control plane builds a new one and publishes it with a single
//! atomic swap, so the request path reads it without locks and never waits on the store. A request
//! keeps the snapshot it loaded until it finishes, which is what makes a swap safe mid-flight.

use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use metrics::{Counter, Histogram};

use crate::pool::Pool;
use crate::replica::Slot;

/// Everything the request path needs to know about one model.
pub struct ModelRoute {
    pub name: Arc<str>,
    pub pool: Arc<Pool>,
    pub slots: Vec<Arc<Slot>>,
    pub metrics: ModelMetrics,
    /// Whether `/readyz` waits for this model (false for stopped or never-deployed models).
    pub expected_ready: bool,
}

/// Metric handles registered once per model, so the hot path does no label hashing.
pub struct ModelMetrics {
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub request_size: Histogram,
    pub response_size: Histogram,
    /// `modelgate_requests_total{code="ok"}` per slot, indexed like `slots`.
    pub ok_by_slot: Vec<Counter>,
}

impl ModelMetrics {
    /// Records a prediction's duration, `started` being when its head arrived; once per
    /// prediction that reached this model, whatever its outcome.
    pub fn finished(&self, started: tokio::time::Instant) {
        self.duration.record(started.elapsed().as_secs_f64());
    }

    pub fn new(model: &str, slots: &[Arc<Slot>]) -> ModelMetrics {
        use crate::metrics as m;
        let label = || [("model", model.to_owned())];
        ModelMetrics {
            duration: metrics::histogram!(m::REQUEST_DURATION, &label()),
            queue_wait: metrics::histogram!(m::QUEUE_WAIT, &label()),
            request_size: metrics::histogram!(m::REQUEST_SIZE, &label()),
            response_size: metrics::histogram!(m::RESPONSE_SIZE, &label()),
            ok_by_slot: slots
                .iter()
                .map(|s| {
                    metrics::counter!(m::REQUESTS, "model" => model.to_owned(), "replica" => s.id.to_string(), "code" => "ok")
                })
                .collect(),
        }
    }
}

/// What an access key leads to: the model's route, and what a caller must prove to use it.
#[derive(Clone)]
pub struct RouteEntry {
    pub route: Arc<ModelRoute>,
    pub project_id: i64,
    /// The model's `enable_authentication`: callers need an API key of a project viewer.
    pub authenticate: bool,
}

#[derive(Default)]
pub struct RoutingSnapshot {
    /// foldhash, seeded per process, not SipHash: callers choose only the keys they look up,
    /// never the keys in the map (the control plane inserts those), and a lookup hashes in
    /// a few dozen instructions instead of a few hundred.
    by_access_key: HashMap<Box<str>, RouteEntry>,
    models: Vec<Arc<ModelRoute>>,
}

impl RoutingSnapshot {
    pub fn new(entries: Vec<(String, RouteEntry)>) -> RoutingSnapshot {
        let mut snap = RoutingSnapshot::default();
        for (key, entry) in entries {
            snap.models.push(entry.route.clone());
            snap.by_access_key.insert(key.into_boxed_str(), entry);
        }
        snap
    }

    pub fn by_access_key(&self, key: &str) -> Option<&RouteEntry> {
        self.by_access_key.get(key)
    }

    pub fn models(&self) -> &[Arc<ModelRoute>] {
        &self.models
    }
}

/// The published snapshot.
#[derive(Default)]
pub struct Routes(ArcSwap<RoutingSnapshot>);

impl Routes {
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingSnapshot>> {
        self.0.load()
    }

    pub fn publish(&self, snapshot: RoutingSnapshot) {
        self.0.store(Arc::new(snapshot));
    }
}
