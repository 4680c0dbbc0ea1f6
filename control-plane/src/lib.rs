//! modelgate's control plane: the durable store of projects, models, builds and deployments.
//!
//! The data plane never calls into this crate on the request path; it receives routing snapshots
//! built from what the store holds.
#![forbid(unsafe_code)]

pub mod archive;
pub mod builds;
pub mod identity;
pub mod store;
