//! Cross-origin requests: allowed only from the origins the operator lists
//! (`--cors-origins`), never `*`, so a page elsewhere cannot drive a user's
//! session from their browser. Pure.

/// The methods and headers a listed origin may use.
pub const ALLOW_METHODS: &str = "GET, POST, DELETE";
pub const ALLOW_HEADERS: &str = "authorization, content-type, x-tidepool-binding";
/// How long a browser may keep a preflight's answer.
pub const MAX_AGE_SECONDS: &str = "600";

/// Why an origin given as a flag is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an origin (scheme://host[:port], http or https, nothing after)")]
pub struct BadOrigin(pub String);

/// Checks an origin from the flags: `http(s)://host[:port]`, lower case, no path.
pub fn parse_origin(text: &str) -> Result<String, BadOrigin> {
    let bad = || BadOrigin(text.chars().take(100).collect());
    let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://")).ok_or_else(bad)?;
    let sane = !rest.is_empty()
        && rest.len() <= 253
        && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:[]".contains(&b));
    if sane { Ok(text.to_string()) } else { Err(bad()) }
}

/// The origin to allow for a request that says `origin`: itself when
/// listed (compared exactly, as browsers send it), else none.
pub fn allowed<'a>(origin: Option<&'a str>, listed: &[String]) -> Option<&'a str> {
    origin.filter(|origin| listed.iter().any(|l| l == origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_from_flags_are_scheme_host_and_port_only() {
        assert_eq!(parse_origin("https://speed.example.com"), Ok("https://speed.example.com".into()));
        assert_eq!(parse_origin("http://127.0.0.1:8080"), Ok("http://127.0.0.1:8080".into()));
        for bad in ["*", "speed.example.com", "https://", "https://a.example/path", "ftp://a", "https://A.example"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_listed_origin_is_allowed_and_exactly() {
        let listed = vec!["https://speed.example.com".to_string()];
        assert_eq!(allowed(Some("https://speed.example.com"), &listed), Some("https://speed.example.com"));
        assert_eq!(allowed(Some("https://speed.example.com.evil.test"), &listed), None);
        assert_eq!(allowed(Some("http://speed.example.com"), &listed), None);
        assert_eq!(allowed(Some("null"), &listed), None);
        assert_eq!(allowed(None, &listed), None);
        assert_eq!(allowed(Some("https://speed.example.com"), &[]), None);
    }
}
