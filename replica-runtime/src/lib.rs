//! The replica's interpreter side, as a library so benchmarks can call it in-process.
#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod fuzzing;
pub mod json;
pub mod python;
