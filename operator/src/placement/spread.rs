//! The fallback choice of warm pod when no agent reports for the pool's
//! nodes: spread sessions over nodes.

use std::collections::HashMap;

/// A warm pod a session could take.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<'a> {
    pub pod: &'a str,
    pub node: &'a str,
}

/// Chooses among warm pods.
pub trait Placement: Send + Sync {
    /// The index of the chosen candidate, or None when none will do.
    /// `assigned_per_node` counts the pool's sessions already on each node.
    fn choose(&self, candidates: &[Candidate<'_>], assigned_per_node: &HashMap<&str, u32>) -> Option<usize>;
}

/// Spreads sessions: the warm pod on the node with the fewest sessions of the
/// pool; ties go to the first candidate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread;

impl Placement for Spread {
    fn choose(&self, candidates: &[Candidate<'_>], assigned_per_node: &HashMap<&str, u32>) -> Option<usize> {
        candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| assigned_per_node.get(c.node).copied().unwrap_or(0))
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_prefers_the_least_busy_node() {
        let candidates = [Candidate { pod: "a", node: "n1" }, Candidate { pod: "b", node: "n2" }];
        let busy = HashMap::from([("n1", 3), ("n2", 1)]);
        assert_eq!(Spread.choose(&candidates, &busy), Some(1));
        assert_eq!(Spread.choose(&candidates, &HashMap::new()), Some(0));
        assert_eq!(Spread.choose(&[], &busy), None);
    }
}
