//! Micro-benchmarks of the pieces every prediction passes through: envelope parsing, routing by
//! access key, and taking and returning a replica from a model's pool.
//!
//! `cargo bench -p modelgate-benches`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modelgate::pool::{Pool, SlotHealth};
use modelgate::replica::{ReplicaConn, Slot};
use modelgate::routing::{ModelMetrics, ModelRoute, RoutingSnapshot};

fn envelope(request_bytes: usize) -> Vec<u8> {
    let pad = "x".repeat(request_bytes.saturating_sub(64));
    format!(r#"{{"accessKey":"abcdefghijklmnopqrstuvwxyz012345","request":{{"a":3,"b":5,"pad":"{pad}"}}}}"#)
        .into_bytes()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_envelope");
    for (name, size) in [("1KB", 1024), ("5MB", 5 * 1024 * 1024 - 64)] {
        let body = envelope(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| {
                let (key, request) = modelgate::predict::parse_envelope(body).unwrap();
                std::hint::black_box((key.len(), request.get().len()))
            })
        });
    }
    group.finish();
}

fn route(model: usize) -> Arc<ModelRoute> {
    let name: Arc<str> = format!("model-{model}").into();
    let slots = vec![Arc::new(Slot::new(name.clone(), 0))];
    Arc::new(ModelRoute {
        pool: Arc::new(Pool::new(name.clone(), 1, 16)),
        metrics: ModelMetrics::new(&name, &slots),
        slots,
        expected_ready: true,
        name,
    })
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_by_access_key");
    for models in [10usize, 10_000] {
        let entries = (0..models)
            .map(|i| (format!("{i:032}"), route(i)))
            .collect();
        let snapshot = RoutingSnapshot::new(entries);
        let key = format!("{:032}", models / 2);
        group.bench_with_input(BenchmarkId::from_parameter(models), &key, |b, key| {
            b.iter(|| std::hint::black_box(snapshot.by_access_key(key).is_some()))
        });
    }
    group.finish();
}

fn pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = Arc::new(Pool::new("m".into(), 1, 16));
    let slot = Arc::new(Slot::new("m".into(), 0));
    let (ours, _theirs) = rt.block_on(async { tokio::net::UnixStream::pair().unwrap() });
    let _guard = rt.enter();
    pool.set_health(0, SlotHealth::Ready);
    pool.release(ReplicaConn::new(slot, 1, ours));
    c.bench_function("pool_acquire_release_idle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let conn = pool.acquire(Duration::from_secs(1)).await.unwrap();
                pool.release(conn);
            })
        })
    });
}

/// Recording a request's metrics: a counter registered once (the hot path's cached handle) versus
/// looked up by labels on every call (the error path).
fn metrics_recording(c: &mut Criterion) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        let cached = metrics::counter!("bench_total", "model" => "add", "replica" => "add-0", "code" => "ok");
        c.bench_function("metrics_counter_cached_handle", |b| {
            b.iter(|| cached.increment(1))
        });
        c.bench_function("metrics_counter_by_labels", |b| {
            b.iter(|| {
                metrics::counter!("bench_total", "model" => "add", "replica" => "add-0", "code" => "model.error")
                    .increment(1)
            })
        });
    });
}

criterion_group!(benches, parse, routing, pool, metrics_recording);
criterion_main!(benches);
