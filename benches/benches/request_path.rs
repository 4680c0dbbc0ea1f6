//! Micro-benchmarks of the pieces every prediction passes through: envelope parsing, routing by
//! access key, API key authentication, and a request's trip through a model's queue and
//! dispatcher to a replica's socket and back.
//!
//! `cargo bench -p modelgate-benches`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modelgate::auth::{key, Action, AuthIndex};
use modelgate::pool::{Pool, SlotHealth};
use modelgate::replica::{ReplicaConn, Slot};
use modelgate::routing::{ModelMetrics, ModelRoute, RouteEntry, RoutingSnapshot};
use modelgate_control::identity::{ApiKey, AuthState, Collaborator, User};

fn envelope(request_bytes: usize) -> Vec<u8> {
    let pad = "x".repeat(request_bytes.saturating_sub(64));
    format!(r#"{{"accessKey":"abcdefghijklmnopqrstuvwxyz012345","request":{{"a":3,"b":5,"pad":"{pad}"}}}}"#)
        .into_bytes()
}

/// The JSON of a request whose bulk is one string, or a list of numbers (a feature vector).
fn numeric_envelope(request_bytes: usize) -> Vec<u8> {
    let values: Vec<String> = (0..request_bytes / 9)
        .map(|i| format!("{:.5}", i as f64 / 7.0))
        .collect();
    format!(
        r#"{{"accessKey":"abcdefghijklmnopqrstuvwxyz012345","request":{{"instances":[{}]}}}}"#,
        values.join(",")
    )
    .into_bytes()
}

fn parse(c: &mut Criterion) {
    // `envelope` is the parser modelgate uses (whole body, and in the 64 KB frames hyper hands
    // over); `serde_json` is the same envelope parsed by serde_json from one buffer, for scale.
    let mut group = c.benchmark_group("parse_envelope");
    for (name, body) in [
        ("1KB", envelope(1024)),
        ("5MB", envelope(5 * 1024 * 1024 - 64)),
        ("5MB-numbers", numeric_envelope(5 * 1024 * 1024 - 64)),
    ] {
        let body = bytes::Bytes::from(body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("envelope", name), &body, |b, body| {
            b.iter(|| {
                let e = modelgate::envelope::parse(body).unwrap();
                std::hint::black_box((e.access_key.len(), e.request.len()))
            })
        });
        let frames: Vec<bytes::Bytes> = body.chunks(64 * 1024).map(|c| body.slice_ref(c)).collect();
        group.bench_with_input(
            BenchmarkId::new("envelope-64KB-frames", name),
            &frames,
            |b, frames| {
                b.iter(|| {
                    let mut s = modelgate::envelope::Scanner::new();
                    for f in frames {
                        s.feed(f).unwrap();
                    }
                    let e = s.finish().unwrap();
                    std::hint::black_box((e.access_key.len(), e.request.len()))
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("serde_json", name), &body, |b, body| {
            b.iter(|| {
                let (key, request) = modelgate::fuzzing::reference_envelope(body).unwrap();
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
        pool: Arc::new(Pool::new(name.clone(), 1, Default::default())),
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
            .map(|i| {
                let entry = RouteEntry {
                    route: route(i),
                    project_id: i as i64,
                    authenticate: true,
                };
                (format!("{i:032}"), entry)
            })
            .collect();
        let snapshot = RoutingSnapshot::new(entries);
        let key = format!("{:032}", models / 2);
        group.bench_with_input(BenchmarkId::from_parameter(models), &key, |b, key| {
            b.iter(|| std::hint::black_box(snapshot.by_access_key(key).is_some()))
        });
    }
    group.finish();
}

/// An auth index of `users` users, each with one key and a viewer role on one project; returns
/// it with the key of the user in the middle.
fn auth_index(users: usize) -> (AuthIndex, String) {
    let mut state = AuthState::default();
    let mut middle = String::new();
    for i in 0..users as i64 {
        let (secret, id) = key::generate();
        state.users.push(User {
            id: i,
            username: format!("user-{i}"),
            role: "user".into(),
            active: true,
            api_keys: 1,
            created_at: String::new(),
            updated_at: String::new(),
        });
        state.keys.push(ApiKey {
            key_id: id,
            user_id: i,
            digest: key::digest_hex(&secret),
            description: String::new(),
            created_at: String::new(),
            expires_at: i64::MAX,
        });
        state.collaborators.push(Collaborator {
            project_id: i,
            user_id: i,
            username: format!("user-{i}"),
            role: "viewer".into(),
            owner: false,
        });
        if i == users as i64 / 2 {
            middle = secret;
        }
    }
    (AuthIndex::from_state(&state), middle)
}

/// What authentication adds to a prediction: parse and check the key's format and checksum,
/// find it, compare SHA-256 digests in constant time, check expiry, user and project role.
fn authentication(c: &mut Criterion) {
    let mut group = c.benchmark_group("api_key_check");
    for users in [10usize, 10_000] {
        let (index, secret) = auth_index(users);
        let project = users as i64 / 2;
        let header = http::HeaderValue::from_str(&format!("Bearer {secret}")).unwrap();
        let now = modelgate::auth::now_unix();
        group.bench_with_input(BenchmarkId::new("valid", users), &header, |b, h| {
            b.iter(|| {
                let who = index.authenticate(Some(h), now).unwrap();
                std::hint::black_box(index.allowed(&who, project, Action::Predict))
            })
        });
    }
    let (index, secret) = auth_index(10);
    let now = modelgate::auth::now_unix();
    let mut bad = secret.into_bytes();
    bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
    let bad_checksum =
        http::HeaderValue::from_str(&format!("Bearer {}", String::from_utf8(bad).unwrap()))
            .unwrap();
    group.bench_function("reject_bad_checksum", |b| {
        b.iter(|| std::hint::black_box(index.authenticate(Some(&bad_checksum), now).is_err()))
    });
    let unknown = http::HeaderValue::from_str(&format!("Bearer {}", key::generate().0)).unwrap();
    group.bench_function("reject_unknown", |b| {
        b.iter(|| std::hint::black_box(index.authenticate(Some(&unknown), now).is_err()))
    });
    group.finish();
}

/// One request through a model's pool: queued, taken by the replica's dispatcher, written to the
/// replica's socket, its answer read and handed back. The far end of the socket is a task on the
/// same single-threaded runtime answering each frame at once (a replica whose function costs
/// nothing, and no thread to wake), so this is the queue and dispatch plus a write and a read on
/// each end of a Unix socket.
fn pool(c: &mut Criterion) {
    use modelgate_protocol::{self as protocol, Kind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let pool = Arc::new(Pool::new("m".into(), 1, Default::default()));
    let slot = Arc::new(Slot::new("m".into(), 0));
    let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
    rt.spawn(async move {
        let mut header = [0u8; protocol::HEADER_LEN];
        let mut payload = Vec::new();
        let answer = [&protocol::encode_header(Kind::ResultOk, 1)[..], b"8"].concat();
        while theirs.read_exact(&mut header).await.is_ok() {
            let h = protocol::decode_header(header).unwrap();
            payload.resize(h.payload_len, 0);
            theirs.read_exact(&mut payload).await.unwrap();
            theirs.write_all(&answer).await.unwrap();
        }
    });
    pool.set_health(0, SlotHealth::Ready);
    pool.release(ReplicaConn::new(slot, 1, ours).expect("register the socket"));
    let request = vec![bytes::Bytes::from_static(br#"{"a":3,"b":5}"#)];
    c.bench_function("pool_call_round_trip", |b| {
        b.iter(|| {
            rt.block_on(async {
                let served = pool
                    .call(request.clone(), Duration::from_secs(1))
                    .await
                    .unwrap();
                assert!(served.result.is_ok());
            })
        })
    });
}

/// Recording a request's metrics: a counter registered once (the hot path's cached handle) versus
/// looked up by labels on every call (the error path), and a histogram sample (a prediction
/// records five) into modelgate's counted buckets versus the Prometheus exporter's sample queue.
fn metrics_recording(c: &mut Criterion) {
    let (recorder, _handle) = modelgate::metrics::recorder();
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
        let histogram = metrics::histogram!(modelgate::metrics::REQUEST_DURATION, "model" => "add");
        c.bench_function("metrics_histogram_record", |b| {
            b.iter(|| histogram.record(std::hint::black_box(0.000_3)))
        });
    });
    let exporter = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.000_1, 0.001, 0.01, 0.1, 1.0])
        .expect("buckets")
        .build_recorder();
    let handle = exporter.handle();
    metrics::with_local_recorder(&exporter, || {
        let histogram = metrics::histogram!(modelgate::metrics::REQUEST_DURATION, "model" => "add");
        c.bench_function("metrics_histogram_record_exporter_queue", |b| {
            // Drained every 16,384 samples, as upkeep did before histograms were counted.
            let mut n = 0u32;
            b.iter(|| {
                histogram.record(std::hint::black_box(0.000_3));
                n += 1;
                if n.is_multiple_of(16_384) {
                    handle.run_upkeep();
                }
            })
        });
    });
}

/// Rendering `/metrics` with 1,000 models, each with the series a model without replicas has:
/// its five histograms, its queue depth and its requeue count (about 5 MB of exposition).
fn metrics_render(c: &mut Criterion) {
    use modelgate::metrics as m;
    let (recorder, handle) = m::recorder();
    let _kept = metrics::with_local_recorder(&recorder, || {
        (0..1000)
            .map(|i| {
                let model = format!("m{i}");
                let metrics = ModelMetrics::new(&model, &[]);
                metrics.duration.record(0.000_3);
                metrics.request_size.record(1024.0);
                let label = || [("model", model.clone())];
                let batch = metrics::histogram!(m::BATCH_SIZE, &label());
                batch.record(1.0);
                metrics::gauge!(m::QUEUE_DEPTH, &label()).set(0.0);
                metrics::counter!(m::REQUEUED, &label()).increment(0);
                (metrics, batch)
            })
            .collect::<Vec<_>>()
    });
    let bytes = handle.render().len();
    assert!(bytes > 4_000_000, "{bytes} bytes");
    c.bench_function("metrics_render/1000_models", |b| b.iter(|| handle.render()));
}

/// What hyper's header-read timeout costs on each timer: per request, hyper asks for a sleep
/// (its deadline from the timer's `now`), polls it once while the connection waits for the next
/// head (registering it), and drops it when the head arrives.
fn header_timer(c: &mut Criterion) {
    use hyper::rt::Timer;
    use std::task::{Context, Waker};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let arm_and_cancel = |timer: &dyn Timer| {
        let mut sleep = timer.sleep_until(timer.now() + Duration::from_secs(10));
        let pending = sleep
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending();
        assert!(pending);
    };
    let tokio_timer = hyper_util::rt::TokioTimer::new();
    c.bench_function("header_timer/tokio", |b| {
        b.iter(|| arm_and_cancel(&tokio_timer))
    });
    // The ticker is not run: no sleep here reaches its deadline.
    let (coarse, _ticker) = modelgate::timer::CoarseTimer::new(Duration::from_millis(250));
    c.bench_function("header_timer/coarse", |b| {
        b.iter(|| arm_and_cancel(&coarse))
    });
}

criterion_group!(
    benches,
    parse,
    routing,
    authentication,
    pool,
    metrics_recording,
    metrics_render,
    header_timer
);
criterion_main!(benches);
