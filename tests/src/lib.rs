//! The Tidepool test harness: a real Kubernetes control plane on loopback.
//!
//! [`ControlPlane::start`] runs etcd, kube-apiserver (TLS, RBAC, service-account
//! tokens), kube-controller-manager, kube-scheduler and kwok from the binaries
//! that `tests/control-plane/build.sh` builds and caches. kwok manages fake
//! nodes whose capacity the test chooses, and gives pods loopback addresses so
//! that later tests can run our own binaries as the processes behind them.
//! Dropping the [`ControlPlane`] stops every process and removes its directory,
//! also when the test panics; children also die with the test process.

mod binaries;
mod error;
mod nodes;
mod pki;
mod pod_runner;
mod process;

pub use process::Managed as Process;
pub use process::dies_with_parent;

pub mod control_plane;
pub mod external_crds;
pub mod mmdb;
pub mod netns;
pub mod proxy;
pub mod s3;
pub mod sshd;
pub mod targets;

pub use binaries::workspace_binary;
pub use control_plane::{ControlPlane, Options, free_port};
pub use error::HarnessError;
pub use nodes::FakeNode;
pub use pod_runner::PodRunner;
pub use proxy::Proxy;

/// A result whose error is a [`HarnessError`].
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// A program's arguments as rendered for a cluster, with the flags in `set`
/// given the values they need on this machine (`--flag=value`; loopback
/// addresses, local files); the others as they are.
pub fn with_flags(args: Vec<String>, set: &[(&str, String)]) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
            match set.iter().find(|(name, _)| *name == flag) {
                Some((name, value)) => format!("{name}={value}"),
                None => arg,
            }
        })
        .collect()
}

/// Polls `probe` every 100 ms until it yields a value, or fails after `limit`.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if start.elapsed() > limit {
            return Err(HarnessError::Timeout { what: what.to_string(), seconds: limit.as_secs() });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Checks `holds` every 10 ms until it does, or panics after 5 s: for a
/// condition on counters a test can read at once (no I/O to await).
pub async fn until(what: &str, holds: impl Fn() -> bool) {
    for _ in 0..500 {
        if holds() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_set_by_name_and_the_rest_kept() {
        let rendered = ["--listen=0.0.0.0:8080", "--namespaces=a", "--listener=x", "--flag"].map(String::from).to_vec();
        let set = [("--listen", "127.0.0.1:9".to_string()), ("--flag", "on".to_string())];
        assert_eq!(
            super::with_flags(rendered, &set),
            ["--listen=127.0.0.1:9", "--namespaces=a", "--listener=x", "--flag=on"]
        );
    }
}
