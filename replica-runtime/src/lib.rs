//! The replica's interpreter side, as a library so benchmarks can call it in-process.
#![forbid(unsafe_code)]

pub mod python;
