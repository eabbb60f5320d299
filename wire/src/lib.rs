//! What Tidepool's programs say to each other, kept free of I/O.
//!
//! - [`token`]: the session token the operator signs and the session pod
//!   verifies, and the binding ticket that pins a session to one pod.
//! - [`report`]: the node agent's report to the operator, and its checks.
//! - [`tube`]: the frames a tube's two ends exchange over its data channel,
//!   and the per-connection credit that keeps each connection's memory bounded.

pub mod report;
pub mod token;
pub mod tube;

/// An error and its sources on one line, `outer: inner: innermost`, for the
/// messages the programs log and send each other (reqwest's own message is
/// often just "error sending request"). A source whose text the line already
/// holds is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_joins_the_sources_once() {
        let outer = Outer(std::io::Error::other("connection reset"));
        assert_eq!(super::error_chain(&outer), "request failed: connection reset");
        let repeated = Outer(std::io::Error::other("request failed"));
        assert_eq!(super::error_chain(&repeated), "request failed");
    }
}
