//! Bytes proxied per session, shared between replicas without a store of
//! their own: each replica writes the bytes it has proxied for a session in
//! an annotation of its own on that session (`bytes.tidepool.dev/<replica>`),
//! so no two replicas write one key, and any replica sums them all from its
//! watch cache. The anonymous bytes-per-hour limit reads that sum.

use std::collections::BTreeMap;

/// The annotations' prefix; the name after the `/` is the replica's.
pub const BYTES_ANNOTATION_PREFIX: &str = "bytes.tidepool.dev/";

/// The annotation key of replica `replica`: an annotation name is at most
/// 63 characters of letters, digits, `-`, `_` and `.`, beginning and ending
/// with a letter or digit, so a longer or odder name is shortened and
/// given a hash of the whole, to stay one replica's own.
pub fn annotation_key(replica: &str) -> String {
    let cleaned: String =
        replica.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let name = if trimmed.is_empty() || trimmed.len() > 63 || trimmed != replica {
        let hash = fnv1a(replica.as_bytes());
        let head: String = trimmed.chars().take(46).collect();
        let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        if head.is_empty() { format!("replica-{hash:016x}") } else { format!("{head}-{hash:016x}") }
    } else {
        trimmed.to_string()
    };
    format!("{BYTES_ANNOTATION_PREFIX}{name}")
}

/// Every replica's bytes for one session, from its annotations. A value
/// that is not a number counts as nothing.
pub fn proxied_bytes(annotations: &BTreeMap<String, String>) -> u64 {
    annotations
        .range(BYTES_ANNOTATION_PREFIX.to_string()..)
        .take_while(|(key, _)| key.starts_with(BYTES_ANNOTATION_PREFIX))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .fold(0, u64::saturating_add)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_name_is_its_own_key() {
        assert_eq!(annotation_key("tidepool-gateway-7d9f8-x2x4k"), "bytes.tidepool.dev/tidepool-gateway-7d9f8-x2x4k");
    }

    #[test]
    fn long_or_odd_names_are_shortened_with_a_hash_and_stay_apart() {
        let long = "g".repeat(80);
        let key = annotation_key(&long);
        let name = key.strip_prefix(BYTES_ANNOTATION_PREFIX).unwrap();
        assert!(name.len() <= 63, "{name}");
        assert_ne!(key, annotation_key(&format!("{long}x")));
        for odd in ["", "-", "a/b", "Ünïcode", "-edge-"] {
            let name = annotation_key(odd).strip_prefix(BYTES_ANNOTATION_PREFIX).unwrap().to_string();
            assert!(
                (1..=63).contains(&name.len())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.ends_with(|c: char| c.is_ascii_alphanumeric()),
                "{odd:?} gave {name:?}"
            );
        }
        assert_ne!(annotation_key("a/b"), annotation_key("a-b"));
    }

    #[test]
    fn every_replicas_bytes_are_summed_and_nothing_else() {
        let annotations: BTreeMap<String, String> = [
            ("bytes.tidepool.dev/a", "100"),
            ("bytes.tidepool.dev/b", "23"),
            ("bytes.tidepool.dev/c", "lots"),
            ("tidepool.dev/client-seen", "7"),
            ("zzz", "1000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(proxied_bytes(&annotations), 123);
        assert_eq!(proxied_bytes(&BTreeMap::new()), 0);
    }
}
