use std::path::PathBuf;

/// What can go wrong while bringing up or driving the control plane.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("building the control plane failed ({0}); run tests/control-plane/build.sh to see why")]
    Build(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("{name} exited early with {status}; last lines of {log}:\n{tail}")]
    Exited { name: String, status: std::process::ExitStatus, log: PathBuf, tail: String },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0}")]
    Other(String),
}

impl HarnessError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
