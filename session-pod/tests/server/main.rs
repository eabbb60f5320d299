//! The session pod's server, started in-process and driven over real
//! sockets on 127.0.0.1.

mod bad_inputs;
mod connections;
mod credentials;
mod household;
mod latency;
mod limits;
mod metrics;
mod probe_runs;
mod results;
mod streams;
mod support;
mod tubes;
mod udp_echo;
