//! Tidepool's operator: the WarmPool and TestSession controllers, the
//! fleet of node agents and Backends, placement, leader election, the HTTP
//! API and /metrics. Logic that needs no I/O (pool
//! planning, placement, conditions) lives in its own modules with plain unit
//! tests.

pub mod api;
pub mod conditions;
pub mod context;
pub mod error;
pub mod fleet;
pub mod keys;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod pod_index;
pub mod pool;
pub mod results;
pub mod run;
pub mod session;
