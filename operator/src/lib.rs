//! Tidepool's operator: the WarmPool and TestSession controllers, the fleet
//! of node agents and Backends, placement, leader election, the HTTP API and
//! /metrics.
//!
//! Each controller observes, asks a pure function for what to do
//! (`session::decide`, `pool::plan` and `pool::status`, `fleet::status`,
//! `leader::decide`), acts, and records. docs/architecture.md draws the
//! modules and which way each depends.

pub mod clock;
pub mod conditions;
pub mod context;
pub mod creators;
pub mod error;
pub mod events;
pub mod export;
pub mod fleet;
pub mod http;
pub mod keys;
pub mod labels;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub use tidepool_protocol::names;
pub mod placement;
pub mod pod_index;
pub mod pods;
pub mod pool;
pub mod run;
pub mod scope;
pub mod session;
pub mod supervisor;
#[cfg(test)]
mod testing;
pub mod ttl_cache;
pub mod tube;
