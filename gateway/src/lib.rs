//! `tidepool-gateway`: the one thing users reach. It serves the session API
//! (relaying identified callers to the operator, starting anonymous
//! sessions on public pools within per-address limits) and proxies each
//! session's streams to the pod bound to it now; and, where paths are routed,
//! it is the resource-aware router's reverse proxy; and it relays the
//! session pods' UDP echo (docs/gateway.md).

pub mod anonymous;
pub mod api;
pub mod cache;
pub mod client;
pub mod cluster;
pub mod cors;
pub mod flags;
pub mod join;
pub mod metrics;
pub mod operator;
pub mod proxy;
pub mod reply;
pub mod routed;
pub mod seen;
pub mod server;
pub mod state;
pub mod target;
pub mod tasks;
pub mod tls;
pub mod traffic;
pub mod udp_relay;
pub mod ui;
