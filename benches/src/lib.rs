//! Criterion benchmarks of the request path live in `benches/`; this crate has no code of its own.
