//! The session pod: the warm pod that becomes one user's session.
//!
//! [`server::Server::start`] runs the server in-process; `main` wraps it
//! with flags ([`flags::Flags`]), signals and process exit.

pub mod auth;
pub mod body;
pub mod clock;
pub mod connection;
pub mod download;
pub mod error;
pub mod flags;
pub mod household;
pub mod latency;
pub mod limits;
pub mod metrics;
pub mod probe_runs;
pub mod probes;
pub mod random;
pub mod reporter;
pub mod results;
pub mod server;
pub mod session;
pub mod sockets;
pub mod state;
pub mod tube_routes;
pub mod tubes;
pub mod udp;
pub mod udp_cookie;
pub mod upload;
