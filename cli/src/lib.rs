//! `tidepool`, the command-line client of Tidepool: asks the operator for a
//! session, runs a test profile against the session pod, and shows what the
//! line gives and how it grades.
//!
//! The library holds the parts: [`operator`] and [`pod`] talk to the two
//! servers, [`engine`] runs the measurements (its arithmetic is in
//! [`measure`]), [`output`] renders the results, [`tube`] runs a tunnel
//! through a tube, and [`app`] is the command line itself.

pub mod app;
pub mod engine;
pub mod error;
pub mod measure;
pub mod operator;
pub mod output;
pub mod pod;
mod progress;
pub mod tube;

pub use engine::{Observer, Quiet, Settings, run};
pub use error::{Error, Result};
pub use pod::{Credentials, PodClient};
