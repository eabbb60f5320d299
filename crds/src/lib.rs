//! Tidepool's API: the custom resources of `tidepool.dev/v1alpha1`.
//!
//! The Rust types are the source of truth. `tidepool-crdgen` renders them to the
//! YAML checked in under `crds/yaml/`, and a test fails when the two drift.
//! Schema rules validate single fields; CEL rules (`x-kubernetes-validations`)
//! validate what spans fields, each with a message that names the field.

// clippy reads kube's repeated `printcolumn(type_ = ...)` arguments as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod backend;
pub mod common;
pub mod generate;
pub mod test_session;
pub mod tube;
pub mod warm_pool;

pub use backend::{Backend, BackendSpec, BackendStatus};
pub use test_session::{TestSession, TestSessionSpec, TestSessionStatus};
pub use tube::{Tube, TubeSpec, TubeStatus};
pub use warm_pool::{WarmPool, WarmPoolSpec, WarmPoolStatus};

/// The API group of every Tidepool resource.
pub const GROUP: &str = "tidepool.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";
