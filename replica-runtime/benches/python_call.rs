//! The in-process cost of one prediction inside a replica: JSON request → Python dict → the
//! function → JSON answer, with the GIL taken per call as the replica does.
//!
//! `cargo bench -p replica-runtime`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replica_runtime::python::Model;

fn calls(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("python-call-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("m.py"),
        "def add(args):\n    return args['a'] + args['b']\n\ndef echo(args):\n    return args\n",
    )
    .unwrap();
    let add = Model::load(std::slice::from_ref(&dir), "m.py", "add").unwrap();
    let echo = Model::load(std::slice::from_ref(&dir), "m.py", "echo").unwrap();
    c.bench_function("predict_add", |b| {
        b.iter(|| add.predict(br#"{"a":3,"b":5}"#).unwrap())
    });
    let mut group = c.benchmark_group("predict_echo");
    for size in [1024usize, 100 * 1024] {
        let body = format!(r#"{{"pad":"{}","n":[1,2.5,true,null]}}"#, "x".repeat(size));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| echo.predict(body.as_bytes()).unwrap())
        });
    }
    group.finish();
    // Generated text: a line break every 20 characters, each one escaped on the way out.
    let lines = format!(r#"{{"text":"{}"}}"#, "nineteen characters\\n".repeat(5000));
    let mut group = c.benchmark_group("predict_echo_lines");
    group.throughput(Throughput::Bytes(lines.len() as u64));
    group.bench_function("100KB", |b| {
        b.iter(|| echo.predict(lines.as_bytes()).unwrap())
    });
    group.finish();
    // A batch of feature records, the shape of a typical tabular request.
    let records = (0..1000)
        .map(|i| {
            format!(
                r#"{{"id":{i},"x":{}.25,"y":-{}e-3,"label":"class-{}","ok":true}}"#,
                i * 7,
                i,
                i % 3
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let body = format!(r#"{{"records":[{records}]}}"#);
    let mut group = c.benchmark_group("predict_echo_records");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("1000", |b| {
        b.iter(|| echo.predict(body.as_bytes()).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, calls);
criterion_main!(benches);
