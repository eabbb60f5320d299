//! The operator's errors, split by what the controllers should do about them.

/// An error from a reconcile or from serving the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed; retrying may help.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object can't be acted on as it is; retrying won't help until it changes.
    #[error("invalid {kind} {name}: {reason}")]
    Invalid { kind: &'static str, name: String, reason: String },
    /// A pool's signing key could not be read or made.
    #[error("session key: {0}")]
    Key(#[from] tidepool_wire::token::TokenError),
    /// An object lacks something Kubernetes always sets (name, namespace, uid).
    #[error("{0} has no {1}")]
    Missing(&'static str, &'static str),
    /// A pool's key Secret exists but the pool does not own it: someone else
    /// made it, and it is not trusted.
    #[error("Secret {secret} is not owned by WarmPool {pool}; delete it so the operator can make the pool's key")]
    KeyNotOwned { secret: String, pool: String },
}

impl Error {
    /// Whether a retry could succeed without anyone changing the object.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::Invalid { .. } | Error::KeyNotOwned { .. })
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Invalid { .. } => "invalid",
            Error::Key(_) => "key",
            Error::Missing(..) => "missing",
            Error::KeyNotOwned { .. } => "key_not_owned",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
