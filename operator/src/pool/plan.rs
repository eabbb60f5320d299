//! What a pool should do next, from what it has: pure, no I/O.

/// One pod of a pool, as the planner needs to see it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    /// Bound to a session.
    pub assigned: bool,
    /// Ready to serve.
    pub ready: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Failed or Succeeded: it will never serve again.
    pub finished: bool,
    /// Made from the pool's current template.
    pub current: bool,
    /// Creation time, Unix seconds; older pods go first in a rollout.
    pub created: i64,
}

/// What the pool is asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Warm pods to keep ready (`spec.size`).
    pub size: u32,
    /// The most pods the pool may own (`spec.maxSize`).
    pub max_size: Option<u32>,
    /// Sessions waiting for a pod: each gets an on-demand pod.
    pub waiting_sessions: u32,
    /// The most pods to create in one pass.
    pub batch: u32,
    /// Pods created but not seen in the cache yet.
    pub in_flight: u32,
    /// Live pods held by sessions that are not among the pods planned over:
    /// the pool counts them, and never touches them.
    pub assigned: u32,
}

/// The counts a pool reports in its status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pods that are not being deleted.
    pub replicas: u32,
    /// Ready and unassigned.
    pub warm: u32,
    /// Bound to a session.
    pub assigned: u32,
    /// Created, not ready yet.
    pub pending: u32,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// How many pods to create from the current template.
    pub create: u32,
    /// Which pods to delete, and why.
    pub delete: Vec<(String, DeleteReason)>,
    pub counts: Counts,
    /// Pods from an older template are still being replaced.
    pub rolling: bool,
    /// `maxSize` stopped the pool from creating what it needs.
    pub capped: bool,
}

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// It failed or exited, and is replaced.
    Finished,
    /// It was made from an older template.
    Outdated,
    /// The pool has more warm pods than it needs.
    ScaleDown,
}

/// Plans the next pass. Assigned pods are never touched: they belong to
/// their sessions until the sessions end.
///
/// The warm count never drops below what is wanted while a rollout replaces
/// outdated pods: an outdated ready pod goes only once a current one can stand
/// in for it. Creating never overshoots: pods in flight count as created.
pub fn plan(pods: &[PodView], target: Target) -> Plan {
    let live: Vec<&PodView> = pods.iter().filter(|p| !p.terminating).collect();
    let mut plan = Plan::default();

    let mut finished = Vec::new();
    let (mut fresh_ready, mut fresh_pending, mut stale_ready, mut stale_pending) = (vec![], vec![], vec![], vec![]);
    for pod in &live {
        if pod.assigned {
            plan.counts.assigned += 1;
        } else if pod.finished {
            finished.push(*pod);
        } else {
            match (pod.current, pod.ready) {
                (true, true) => fresh_ready.push(*pod),
                (true, false) => fresh_pending.push(*pod),
                (false, true) => stale_ready.push(*pod),
                (false, false) => stale_pending.push(*pod),
            }
        }
    }
    plan.counts.assigned += target.assigned;
    plan.counts.replicas = live.len() as u32 + target.assigned;
    plan.counts.warm = (fresh_ready.len() + stale_ready.len()) as u32;
    plan.counts.pending = (fresh_pending.len() + stale_pending.len()) as u32 + target.in_flight;

    let want = target.size + target.waiting_sessions;
    let fresh = (fresh_ready.len() + fresh_pending.len()) as u32 + target.in_flight;

    for pod in &finished {
        plan.delete.push((pod.name.clone(), DeleteReason::Finished));
    }
    // Outdated pods that are not ready yet serve nobody: replace them now.
    for pod in &stale_pending {
        plan.delete.push((pod.name.clone(), DeleteReason::Outdated));
    }
    // Outdated ready pods go, oldest first, as far as current ready pods cover `want`.
    stale_ready.sort_by_key(|p| p.created);
    let covered = (fresh_ready.len() as u32 + stale_ready.len() as u32).saturating_sub(want);
    let mut stale_going = covered.min(stale_ready.len() as u32) as usize;

    // Pods that stay after this pass, against maxSize.
    let staying = plan.counts.replicas + target.in_flight
        - finished.len() as u32
        - stale_pending.len() as u32
        - stale_going as u32;
    let needed = want.saturating_sub(fresh);
    let mut room = target.max_size.map_or(u32::MAX, |max| max.saturating_sub(staying));
    if needed > room && stale_going < stale_ready.len() {
        // At the cap mid-rollout: trade outdated warm pods for current ones.
        let trade = ((needed - room) as usize).min(stale_ready.len() - stale_going);
        stale_going += trade;
        room += trade as u32;
    }
    for pod in &stale_ready[..stale_going] {
        plan.delete.push((pod.name.clone(), DeleteReason::Outdated));
    }
    plan.create = needed.min(room).min(target.batch);
    plan.capped = needed > room;
    plan.rolling = !stale_ready.is_empty() || !stale_pending.is_empty();

    // Scale down: more current unassigned pods than wanted. Pending ones go
    // first (they serve nobody yet), then the newest ready ones.
    // Only pods the cache shows count: pods in flight are trimmed once they appear.
    let excess = (fresh - target.in_flight).saturating_sub(want) as usize;
    if excess > 0 {
        fresh_ready.sort_by_key(|p| std::cmp::Reverse(p.created));
        let surplus = fresh_pending.iter().chain(fresh_ready.iter()).take(excess);
        plan.delete.extend(surplus.map(|p| (p.name.clone(), DeleteReason::ScaleDown)));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, assigned: bool, current: bool, created: i64) -> PodView {
        PodView { name: name.into(), assigned, ready, terminating: false, finished: false, current, created }
    }

    fn warm(name: &str, created: i64) -> PodView {
        pod(name, true, false, true, created)
    }

    fn target(size: u32) -> Target {
        Target { size, max_size: None, waiting_sessions: 0, batch: 10, in_flight: 0, assigned: 0 }
    }

    fn deleted(plan: &Plan) -> Vec<&str> {
        plan.delete.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn an_empty_pool_fills_in_batches() {
        let plan = plan(&[], target(25));
        assert_eq!(plan.create, 10);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn pods_in_flight_count_so_nothing_overshoots() {
        let plan = plan(&[warm("a", 1)], Target { in_flight: 2, ..target(3) });
        assert_eq!(plan.create, 0);
        assert_eq!(plan.counts.pending, 2);
    }

    #[test]
    fn an_assignment_is_refilled_and_the_assigned_pod_is_left_alone() {
        let pods = [warm("a", 1), warm("b", 2), pod("c", true, true, true, 3)];
        let plan = plan(&pods, target(3));
        assert_eq!(plan.create, 1);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.counts, Counts { replicas: 3, warm: 2, assigned: 1, pending: 0 });
    }

    #[test]
    fn max_size_caps_warm_and_assigned_together() {
        let pods = [warm("a", 1), pod("b", true, true, true, 2), pod("c", true, true, true, 3)];
        let plan = plan(&pods, Target { max_size: Some(4), ..target(3) });
        assert_eq!(plan.create, 1);
        assert!(plan.capped);
    }

    #[test]
    fn held_pods_counted_apart_weigh_like_listed_ones() {
        // The operator passes a count of the pods sessions hold, not the pods.
        let plan = plan(&[warm("a", 1)], Target { max_size: Some(4), assigned: 2, ..target(3) });
        assert_eq!(plan.create, 1);
        assert!(plan.capped);
        assert_eq!(plan.counts, Counts { replicas: 3, warm: 1, assigned: 2, pending: 0 });
        let listed = [warm("a", 1), pod("b", true, true, true, 2), pod("c", true, true, true, 3)];
        assert_eq!(super::plan(&listed, Target { max_size: Some(4), ..target(3) }), plan);
    }

    #[test]
    fn waiting_sessions_get_on_demand_pods_within_the_cap() {
        let pods = [pod("b", true, true, true, 2)];
        let plan = plan(&pods, Target { waiting_sessions: 2, ..target(0) });
        assert_eq!(plan.create, 2);
        let plan = super::plan(&pods, Target { waiting_sessions: 2, max_size: Some(2), ..target(0) });
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn finished_pods_are_replaced() {
        let mut dead = warm("dead", 1);
        dead.finished = true;
        let plan = plan(&[dead, warm("b", 2)], target(2));
        assert_eq!(deleted(&plan), ["dead"]);
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn terminating_pods_are_neither_counted_nor_deleted_again() {
        let mut going = warm("going", 1);
        going.terminating = true;
        let plan = plan(&[going], target(1));
        assert_eq!(plan.create, 1);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.counts.replicas, 0);
    }

    #[test]
    fn a_rollout_keeps_the_warm_count_while_it_replaces_old_pods() {
        let old = [pod("o1", true, false, false, 1), pod("o2", true, false, false, 2)];
        // First pass: create two current pods, delete nothing yet.
        let first = plan(&old, target(2));
        assert_eq!(first.create, 2);
        assert!(first.delete.is_empty());
        assert!(first.rolling);
        // One current pod is ready: the oldest outdated one can go.
        let pods = [old[0].clone(), old[1].clone(), warm("n1", 5), pod("n2", false, false, true, 6)];
        let second = plan(&pods, target(2));
        assert_eq!(deleted(&second), ["o1"]);
        assert_eq!(second.create, 0);
    }

    #[test]
    fn a_rollout_leaves_assigned_pods_on_the_old_template() {
        let pods = [pod("busy", true, true, false, 1), warm("n1", 2)];
        let plan = plan(&pods, target(1));
        assert!(plan.delete.is_empty());
        assert!(!plan.rolling);
    }

    #[test]
    fn a_rollout_at_the_cap_trades_old_pods_for_new() {
        let old = [pod("o1", true, false, false, 1), pod("o2", true, false, false, 2)];
        let plan = plan(&old, Target { max_size: Some(2), ..target(2) });
        assert_eq!(deleted(&plan), ["o1", "o2"]);
        assert_eq!(plan.create, 2);
    }

    #[test]
    fn scaling_down_removes_pending_then_newest_warm_pods() {
        let pods = [warm("a", 1), warm("b", 2), warm("c", 3), pod("p", false, false, true, 4)];
        let plan = plan(&pods, target(2));
        assert_eq!(deleted(&plan), ["p", "c"]);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn scaling_down_never_counts_pods_in_flight_as_deletable() {
        let plan = plan(&[warm("a", 1)], Target { in_flight: 3, ..target(1) });
        assert!(plan.delete.is_empty());
    }
}
