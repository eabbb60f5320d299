//! Names from requests, checked before they reach an API path: a namespace
//! is an RFC 1123 label, an object name an RFC 1123 subdomain. Anything
//! else (a slash, a dot-dot, an upper-case letter, a percent sign) is
//! refused with the rule it broke.

/// Why a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {shown:?} is not {rule}")]
pub struct BadName {
    what: &'static str,
    /// The name as given, cut short.
    shown: String,
    rule: &'static str,
}

const LABEL_RULE: &str =
    "an RFC 1123 label (at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit)";
const SUBDOMAIN_RULE: &str =
    "an RFC 1123 subdomain (at most 253 characters: labels of lower-case letters, digits and '-', joined by '.')";

fn bad(what: &'static str, name: &str, rule: &'static str) -> BadName {
    BadName { what, shown: name.chars().take(64).collect(), rule }
}

fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A namespace name.
pub fn namespace(name: &str) -> Result<(), BadName> {
    if is_label(name) { Ok(()) } else { Err(bad("namespace", name, LABEL_RULE)) }
}

/// The name of a namespaced object (a WarmPool, a TestSession).
pub fn object(what: &'static str, name: &str) -> Result<(), BadName> {
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(is_label) {
        Ok(())
    } else {
        Err(bad(what, name, SUBDOMAIN_RULE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_that_would_leave_their_path_are_refused() {
        for good in ["default", "a", "team-1", "0abc"] {
            assert_eq!(namespace(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "kube-system/secrets",
            "kube-system%2Fsecrets%2F",
            "..",
            "../../secrets",
            "Default",
            "-a",
            "a-",
            "a.b",
            "a b",
            "ä",
            &"a".repeat(64),
        ] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
        assert_eq!(object("WarmPool", "edge.v2"), Ok(()));
        for bad in ["../../secrets", "edge/status", ".edge", "edge.", "edge..v2", "EDGE", "", &"a".repeat(254)] {
            assert!(object("WarmPool", bad).is_err(), "{bad:?}");
        }
        let message = object("WarmPool", "../../secrets").unwrap_err().to_string();
        assert!(message.starts_with("WarmPool \"../../secrets\" is not an RFC 1123 subdomain"), "{message}");
    }

    proptest! {
        /// Whatever the input, an accepted name has nothing that could
        /// change an API path, and checking never panics.
        #[test]
        fn an_accepted_name_is_path_safe(name in "\\PC{0,80}") {
            if object("TestSession", &name).is_ok() {
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
                prop_assert!(!name.contains(".."));
                prop_assert!(name.len() <= 253);
            }
            if namespace(&name).is_ok() {
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                prop_assert!(name.len() <= 63);
            }
        }

        #[test]
        fn every_valid_label_is_accepted(name in "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?") {
            prop_assert_eq!(namespace(&name), Ok(()));
            prop_assert_eq!(object("WarmPool", &name), Ok(()));
        }
    }
}
