//! Placement: which backend a session (or an outside client) should use.
//!
//! - [`view`]: one backend as its reports and health probes describe it.
//! - [`router`]: filter, score, pending picks, sticky keys; pure and fast.
//! - [`spread`]: the fallback when no agent has reported for a pool's nodes.

pub mod router;
pub mod spread;
pub mod view;

pub use router::{Need, NoFit, Pick, Request, Router, RouterSettings};
pub use spread::{Candidate, Placement, Spread};
