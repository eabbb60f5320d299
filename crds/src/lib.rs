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
#[cfg(feature = "resource")]
pub mod generate;
pub mod monitor;
pub mod test_session;
pub mod tube;
pub mod warm_pool;

#[cfg(feature = "resource")]
pub use backend::Backend;
pub use backend::{BackendSpec, BackendStatus};
#[cfg(feature = "resource")]
pub use monitor::Monitor;
pub use monitor::{MonitorSpec, MonitorStatus};
#[cfg(feature = "resource")]
pub use test_session::TestSession;
pub use test_session::{TestSessionSpec, TestSessionStatus};
#[cfg(feature = "resource")]
pub use tube::Tube;
pub use tube::{TubeSpec, TubeStatus};
#[cfg(feature = "resource")]
pub use warm_pool::WarmPool;
pub use warm_pool::{WarmPoolSpec, WarmPoolStatus};

/// The API group of every Tidepool resource.
pub const GROUP: &str = "tidepool.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Tidepool object: `GROUP/VERSION`.
pub const API_VERSION: &str = "tidepool.dev/v1alpha1";

#[cfg(test)]
mod tests {
    #[test]
    fn the_api_version_is_the_group_and_version() {
        assert_eq!(super::API_VERSION, format!("{}/{}", super::GROUP, super::VERSION));
    }
}
