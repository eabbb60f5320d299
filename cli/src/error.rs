//! What can go wrong, and the exit code each failure gives.

use std::process::ExitCode;

/// A failure of a `tidepool` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line does not make sense (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The operator could not be reached or answered with an error (exit code 3).
    #[error("{0}")]
    Operator(String),
    /// The session pod refused the session's token or binding ticket (exit code 3).
    #[error("the pod refused the credentials: {0}")]
    Refused(String),
    /// The session pod answered a request with an error (exit code 3).
    #[error("the pod answered {status}: {message}")]
    Pod { status: u16, message: String },
    /// The pod or the operator answered something the protocol does not
    /// allow (exit code 3).
    #[error("{0}")]
    Protocol(String),
    /// A measurement could not be made: the pod could not be reached, a
    /// connection broke, or a test produced nothing to measure (exit code 1).
    #[error("{0}")]
    Test(String),
    /// Ctrl-C stopped the command (exit code 130).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn test(message: impl Into<String>) -> Self {
        Self::Test(message.into())
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    /// 0 is success; see docs/cli.md for the table.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Test(_) => 1,
            Self::Usage(_) => 2,
            Self::Operator(_) | Self::Refused(_) | Self::Pod { .. } | Self::Protocol(_) => 3,
            Self::Interrupted => 130,
        }
    }
}

impl From<Error> for ExitCode {
    fn from(error: Error) -> Self {
        ExitCode::from(error.exit_code())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line: reqwest's and hyper's own messages
/// leave the interesting part (refused, reset, timed out) to the sources.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The message of a JSON error body (`{"error": "..."}`), or the start of the
/// body as text when it is not one.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Body>(body) {
        return parsed.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "(no message)".to_string(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_docs() {
        assert_eq!(Error::test("x").exit_code(), 1);
        assert_eq!(Error::usage("x").exit_code(), 2);
        assert_eq!(Error::Operator("x".into()).exit_code(), 3);
        assert_eq!(Error::Refused("x".into()).exit_code(), 3);
        assert_eq!(Error::Pod { status: 500, message: "x".into() }.exit_code(), 3);
    }

    #[test]
    fn error_messages_come_from_json_or_text() {
        assert_eq!(error_message(br#"{"error":"bad binding","code":403}"#), "bad binding");
        assert_eq!(error_message(b"  plain text\n"), "plain text");
        assert_eq!(error_message(b""), "(no message)");
        assert_eq!(error_message("é".repeat(300).as_bytes()).chars().count(), 201);
    }
}
