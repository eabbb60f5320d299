//! A WarmPool's status from its pass, and when to write it: pure.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tidepool_crds::warm_pool::WarmPoolStatus;

use super::plan::{DeleteReason, Plan};
use crate::conditions::{self, reason};
use crate::events::Notice;
use crate::labels;

/// The least time between two status writes that only change counts.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What kept a pass from its goal, worst first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Problems {
    /// Why a pod could not be created (the API server's answer).
    pub create: Option<String>,
    /// Why a pod could not be deleted.
    pub delete: Option<String>,
    /// Why the operator found no node for a pod (`nodeAssignment: Operator`).
    pub placement: Option<String>,
}

impl Problems {
    /// The Degraded reason and message these give, if any.
    pub fn degraded(&self) -> Option<(&'static str, &str)> {
        match (&self.create, &self.delete, &self.placement) {
            (Some(message), _, _) => Some((reason::CREATE_FAILED, message)),
            (None, Some(message), _) => Some((reason::DELETE_FAILED, message)),
            (None, None, Some(message)) => Some((reason::NO_NODE_FITS, message)),
            (None, None, None) => None,
        }
    }
}

/// The Events a pass gives: a rollout under way, failures, and pods being replaced.
pub fn notices(plan: &Plan, problems: &Problems) -> Vec<Notice> {
    let mut notices = Vec::new();
    if plan.rolling && plan.delete.iter().any(|(_, why)| *why == DeleteReason::Outdated) {
        notices.push(Notice::normal(reason::ROLLING_TEMPLATE, "Replacing warm pods made from an older template"));
    }
    for (why, message) in [
        (reason::CREATE_FAILED, &problems.create),
        (reason::DELETE_FAILED, &problems.delete),
        (reason::NO_NODE_FITS, &problems.placement),
    ] {
        if let Some(message) = message {
            notices.push(Notice::warning(why, message.clone()));
        }
    }
    let failed = finished(plan);
    if failed > 0 {
        notices.push(Notice::warning(reason::PODS_FAILING, format!("replacing {failed} pods that failed or exited")));
    }
    notices
}

fn finished(plan: &Plan) -> usize {
    plan.delete.iter().filter(|(_, why)| *why == DeleteReason::Finished).count()
}

/// What the pool is asked for, beside the plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Asked<'a> {
    pub name: &'a str,
    pub size: u32,
    pub max_size: i32,
    pub generation: Option<i64>,
}

/// The status a pass leads to; `old` keeps the conditions' transition times.
pub fn derive(
    old: &WarmPoolStatus,
    asked: Asked<'_>,
    plan: &Plan,
    problems: &Problems,
    now: Timestamp,
) -> WarmPoolStatus {
    let Asked { name, size, max_size, generation } = asked;
    let mut conditions = old.conditions.clone();
    let counts = plan.counts;
    let filled = counts.warm >= size;
    conditions::set(
        &mut conditions,
        conditions::READY,
        filled,
        if filled { reason::FILLED } else { reason::FILLING },
        format!("{}/{} warm", counts.warm, size),
        generation,
        now,
    );
    let progressing = plan.create > 0 || !plan.delete.is_empty() || plan.rolling || counts.pending > 0;
    let (why, message) = if plan.rolling {
        (reason::ROLLING_TEMPLATE, "replacing warm pods made from an older template".to_string())
    } else if progressing {
        (reason::SCALING, format!("{} pending, creating {}", counts.pending, plan.create))
    } else {
        (reason::STABLE, "nothing to do".to_string())
    };
    conditions::set(&mut conditions, conditions::PROGRESSING, progressing, why, message, generation, now);
    let failed = finished(plan);
    let (degraded, why, message) = match (problems.degraded(), failed, plan.capped) {
        (Some((why, message)), _, _) => (true, why, message.to_string()),
        (None, 1.., _) => {
            (true, reason::PODS_FAILING, format!("{failed} pods failed or exited and are being replaced"))
        }
        (None, 0, true) => (true, reason::MAX_SIZE_REACHED, format!("maxSize {max_size} reached")),
        (None, 0, false) => (false, reason::HEALTHY, String::new()),
    };
    conditions::set(&mut conditions, conditions::DEGRADED, degraded, why, message, generation, now);
    WarmPoolStatus {
        replicas: to_i32(counts.replicas),
        warm: to_i32(counts.warm),
        assigned: to_i32(counts.assigned),
        pending: to_i32(counts.pending),
        selector: Some(format!("{}={name}", labels::POOL)),
        conditions,
        observed_generation: generation,
    }
}

fn to_i32(count: u32) -> i32 {
    i32::try_from(count).unwrap_or(i32::MAX)
}

/// Whether to write `new` over `old` now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Nothing changed.
    Unchanged,
    Now,
    /// Only counts changed and the last write was less than [`STATUS_INTERVAL`] ago.
    Later,
}

/// Under load the counts change all the time, so a change of counts alone is
/// written at most once per [`STATUS_INTERVAL`]; a change of any condition's
/// status, or of the generation, is written at once.
pub fn write(old: &WarmPoolStatus, new: &WarmPoolStatus, since_last_write: Option<Duration>) -> Write {
    if old == new {
        return Write::Unchanged;
    }
    let conditions_changed =
        old.conditions.iter().map(|c| (&c.type_, &c.status)).ne(new.conditions.iter().map(|c| (&c.type_, &c.status)));
    let recently = since_last_write.is_some_and(|since| since < STATUS_INTERVAL);
    if recently && !conditions_changed && old.observed_generation == new.observed_generation {
        Write::Later
    } else {
        Write::Now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::plan::Counts;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn asked() -> Asked<'static> {
        Asked { name: "edge", size: 3, max_size: 5, generation: Some(2) }
    }

    fn plan(warm: u32, pending: u32) -> Plan {
        Plan { counts: Counts { replicas: warm + pending, warm, assigned: 0, pending }, ..Plan::default() }
    }

    fn reasons(status: &WarmPoolStatus) -> Vec<(String, String, String)> {
        status.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect()
    }

    fn triple(type_: &str, status: &str, why: &str) -> (String, String, String) {
        (type_.into(), status.into(), why.into())
    }

    #[test]
    fn a_full_quiet_pool_is_ready_stable_and_healthy() {
        let status = derive(&WarmPoolStatus::default(), asked(), &plan(3, 0), &Problems::default(), at(1));
        assert_eq!(
            reasons(&status),
            [
                triple("Ready", "True", "Filled"),
                triple("Progressing", "False", "Stable"),
                triple("Degraded", "False", "Healthy")
            ]
        );
        assert_eq!((status.warm, status.replicas, status.selector.as_deref()), (3, 3, Some("tidepool.dev/pool=edge")));
        assert_eq!(status.observed_generation, Some(2));
    }

    #[test]
    fn a_filling_pool_is_progressing() {
        let mut filling = plan(1, 1);
        filling.create = 1;
        let status = derive(&WarmPoolStatus::default(), asked(), &filling, &Problems::default(), at(1));
        assert_eq!(
            reasons(&status)[..2],
            [triple("Ready", "False", "Filling"), triple("Progressing", "True", "Scaling")]
        );
        let mut rolling = plan(3, 0);
        rolling.rolling = true;
        let status = derive(&WarmPoolStatus::default(), asked(), &rolling, &Problems::default(), at(1));
        assert_eq!(reasons(&status)[1], triple("Progressing", "True", "RollingTemplate"));
    }

    #[test]
    fn degraded_says_the_worst_problem() {
        let all = Problems {
            create: Some("quota".into()),
            delete: Some("forbidden".into()),
            placement: Some("no slots".into()),
        };
        let degraded = |problems: &Problems, plan: &Plan| {
            reasons(&derive(&WarmPoolStatus::default(), asked(), plan, problems, at(1)))[2].2.clone()
        };
        assert_eq!(degraded(&all, &plan(3, 0)), "CreateFailed");
        assert_eq!(degraded(&Problems { create: None, ..all.clone() }, &plan(3, 0)), "DeleteFailed");
        assert_eq!(
            degraded(&Problems { placement: Some("x".into()), ..Problems::default() }, &plan(3, 0)),
            "NoNodeFits"
        );
        let mut failing = plan(2, 0);
        failing.delete = vec![("dead".into(), DeleteReason::Finished)];
        assert_eq!(degraded(&Problems::default(), &failing), "PodsFailing");
        let mut capped = plan(3, 0);
        capped.capped = true;
        assert_eq!(degraded(&Problems::default(), &capped), "MaxSizeReached");
    }

    #[test]
    fn notices_follow_the_plan_and_the_problems() {
        assert!(notices(&plan(3, 0), &Problems::default()).is_empty());
        let mut busy = plan(2, 0);
        busy.rolling = true;
        busy.delete = vec![("old".into(), DeleteReason::Outdated), ("dead".into(), DeleteReason::Finished)];
        let problems = Problems { create: Some("quota".into()), delete: None, placement: Some("full".into()) };
        let said: Vec<(bool, &str)> = notices(&busy, &problems).iter().map(|n| (n.warning, n.reason)).collect();
        assert_eq!(
            said,
            [(false, "RollingTemplate"), (true, "CreateFailed"), (true, "NoNodeFits"), (true, "PodsFailing")]
        );
    }

    #[test]
    fn counts_alone_are_written_at_most_once_a_second() {
        let old = derive(&WarmPoolStatus::default(), asked(), &plan(3, 0), &Problems::default(), at(1));
        assert_eq!(write(&old, &old, None), Write::Unchanged);
        // Counts moved but the conditions did not (still not filled, still scaling).
        let mut a = plan(1, 2);
        a.create = 1;
        let first = derive(&old, asked(), &a, &Problems::default(), at(2));
        let mut b = plan(2, 1);
        b.create = 1;
        let second = derive(&first, asked(), &b, &Problems::default(), at(2));
        assert_eq!(write(&first, &second, Some(Duration::from_millis(200))), Write::Later);
        assert_eq!(write(&first, &second, Some(STATUS_INTERVAL)), Write::Now);
        assert_eq!(write(&first, &second, None), Write::Now);
        // A condition changed: at once.
        assert_eq!(write(&old, &first, Some(Duration::ZERO)), Write::Now);
        // A new generation: at once.
        let newer = derive(&first, Asked { generation: Some(3), ..asked() }, &b, &Problems::default(), at(2));
        assert_eq!(write(&first, &newer, Some(Duration::ZERO)), Write::Now);
    }
}
