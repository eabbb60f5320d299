//! The TestSession controller: binds each session to exactly one warm pod,
//! rebinds it when its pod dies, and ends it when its TTL runs out or its
//! final results are in.
//!
//! Each pass observes (caches, memory, and the API server only for a pod
//! this process claimed that the cache does not show yet), asks
//! [`decide::decide`] for one step, acts on it, and decides again from what
//! the act changed, until a step leaves nothing to do now.
//!
//! Binding takes two API writes. First the pod is claimed ([`claim`]): its
//! labels say `assigned` and its annotation names the session's UID, written
//! with the pod's resourceVersion as a precondition. That claim is the
//! durable record of the binding. Then the session's status turns Ready.
//! Every step is idempotent: a pass that finds a pod already claimed for its
//! session just finishes the status.

pub mod claim;
pub mod decide;
#[cfg(test)]
mod scenarios;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tidepool_crds::test_session::{Phase, TestSessionStatus};
use tidepool_crds::{TestSession, WarmPool};

use crate::conditions::{self, reason};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{self, Notice};
use crate::export::{Outcome, record};
use crate::labels;
use crate::memory::Binding;
use crate::pods;
use crate::scope::Caches;
use claim::Claim;
use decide::{BoundPod, Export, Observed, Requeue, Step};
use status::{Ending, PodFacts, Times};
use tidepool_protocol::api::CLIENT_SEEN_ANNOTATION;

/// A pass takes at most this many steps; each step changes what the next
/// decision sees, and no path needs more than four.
const MAX_STEPS: usize = 6;

/// How soon a session that waits for a pod is looked at again (a pod turning
/// warm wakes it sooner, through the pod watch).
const WAIT_RECHECK: Duration = Duration::from_secs(5);

/// How soon a claim that lost a race is tried again, from fresher caches.
const LOST_RETRY: Duration = Duration::from_millis(10);

pub async fn reconcile(session: Arc<TestSession>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = session.namespace().ok_or(Error::Missing("TestSession", "namespace"))?;
    let uid = session.uid().ok_or(Error::Missing("TestSession", "uid"))?;
    let pool = ctx.pools.get(&ObjectRef::new(&session.spec.pool).within(&namespace));
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut status = ctx.memory.newest_status(&uid, session.status.clone().unwrap_or_default());
    let mut observed = observe(&ctx, &session, &status, pool.as_deref(), &pods_api, &uid).await?;
    let mut claimed: Option<Arc<Pod>> = None;
    // Pods this pass deleted: the cache shows them a while longer.
    let mut released: Vec<String> = Vec::new();
    for _ in 0..MAX_STEPS {
        let step = decide::decide(&observed, &session.spec.pool);
        tracing::trace!(session = %session.name_any(), ?step, "step");
        match step {
            Step::Idle(Requeue::OnChange) => return Ok(Action::await_change()),
            Step::Idle(Requeue::After(after)) => return Ok(Action::requeue(after)),
            Step::Delete => {
                delete_session(&ctx, &session).await?;
                return Ok(Action::await_change());
            }
            Step::Complete { release } => {
                status = end(&ctx, &session, status, Ending::Completed, release.as_deref(), &pods_api).await?;
                observed.ended(&status);
            }
            Step::Expire { release } => {
                status = end(&ctx, &session, status, Ending::Expired, release.as_deref(), &pods_api).await?;
                observed.ended(&status);
            }
            Step::ClientGone { release } => {
                status = end(&ctx, &session, status, Ending::ClientGone, release.as_deref(), &pods_api).await?;
                observed.ended(&status);
            }
            Step::Fail { release } => {
                status = end(&ctx, &session, status, Ending::Failed, release.as_deref(), &pods_api).await?;
                observed.ended(&status);
            }
            Step::Export => {
                let (next, stored) = store_results(&ctx, &session, status.clone()).await;
                if next != status {
                    write_status(&ctx, &session, &next).await?;
                    ctx.memory.remember_ended(&uid, next.clone());
                    publish_export_failure(&ctx, &session, &status, &next).await;
                }
                status = next;
                match stored {
                    Ok(()) => observed.export = Export::Done,
                    Err(after) => return Ok(Action::requeue(after)),
                }
            }
            Step::Wait { reason, message } => return wait(&ctx, &session, status, reason, message).await,
            Step::Claim { replacing } => {
                // A pod that died under a live session is replaced: the session heals.
                if let Some(dead) = replacing {
                    delete_pod(&pods_api, &pod_uid(&ctx, &namespace, &dead), &dead).await?;
                    released.push(dead);
                }
                let Some(pool) = pool.as_deref() else {
                    return Ok(Action::requeue(WAIT_RECHECK));
                };
                match claim::claim(&ctx, &session, pool, &pods_api).await? {
                    Claim::Won(pod) => {
                        ctx.memory.remember(&uid, Binding { pod: pod.name_any(), ready: false });
                        tracing::debug!(session = %session.name_any(), pod = %pod.name_any(), "claimed");
                        if let Some(delay) = ctx.settings.fault_claim_delay {
                            tokio::time::sleep(delay).await;
                        }
                        observed.bound = Some(BoundPod { name: pod.name_any(), alive: true, in_cache: false });
                        // Scanned again, not reused from the start of the pass: the
                        // cache may have caught up with a second claim by now.
                        observed.extra_claims = extra_claims(&ctx, &namespace, &uid, &pod.name_any())
                            .into_iter()
                            .filter(|name| !released.contains(name))
                            .collect();
                        claimed = Some(pod);
                    }
                    Claim::NoneFree => {
                        let message = format!("WarmPool {} has no warm pod free; one is being made", pool.name_any());
                        return wait(&ctx, &session, status, reason::POOL_EMPTY, message).await;
                    }
                    Claim::NoFit(message) => {
                        return wait(&ctx, &session, status, reason::NO_BACKEND_FITS, message).await;
                    }
                    Claim::Lost => return Ok(Action::requeue(LOST_RETRY)),
                }
            }
            Step::ReleaseExtras(extras) => {
                // A claim whose answer was lost (a timeout after the API server
                // applied it) can leave a second pod claimed for this session.
                for extra in &extras {
                    tracing::warn!(session = %session.name_any(), pod = %extra, "deleting a second pod claimed for one session");
                    delete_pod(&pods_api, &pod_uid(&ctx, &namespace, extra), extra).await?;
                }
                observed.extra_claims.clear();
            }
            Step::WriteReady { pod, rebound } => {
                if claimed.is_none() {
                    // Claimed by an earlier pass that stopped before the status write.
                    tracing::info!(session = %session.name_any(), %pod, "adopting a pod claimed earlier");
                }
                let mut facts = match claimed.as_deref() {
                    Some(won) if won.name_any() == pod => pod_facts_of(&pod, Some(won), ctx.settings.session_port),
                    _ => pod_facts(&ctx, &namespace, &pod, &pods_api).await?,
                };
                // A node's Backend bears its name; placement chose it when agents report there.
                facts.backend =
                    facts.node.clone().filter(|node| ctx.fleet.with_router(|router| router.view(node).is_some()));
                let times = Times {
                    created: observed_created(&session, observed.now),
                    expires: observed.expires,
                    now: observed.now,
                    generation: session.meta().generation,
                };
                let next = status::ready(status.clone(), &facts, times, rebound);
                write_status(&ctx, &session, &next).await?;
                if let Some(previous) = &observed.status_pod.filter(|_| rebound) {
                    let note = format!("pod {previous} went away; rebound to pod {pod}");
                    events::publish(&ctx.recorder, session.as_ref(), &Notice::normal(reason::REBOUND, note)).await;
                }
                ctx.memory.remember(&uid, Binding { pod: pod.clone(), ready: true });
                if let Some(progress) = ctx.memory.take_progress(&uid)
                    && !rebound
                {
                    ctx.metrics.session_ready.observe(progress.elapsed.as_secs_f64());
                    ctx.metrics.binding_writes.observe(f64::from(progress.writes));
                }
                status = next;
                observed.phase = Phase::Ready;
                observed.status_pod = Some(pod);
                observed.written = ctx.memory.binding(&uid);
            }
            Step::Settled { forget, recheck } => {
                if forget {
                    // Both caches have caught up with this binding.
                    ctx.memory.forget(&uid);
                }
                return Ok(Action::requeue(recheck));
            }
        }
    }
    Ok(Action::requeue(LOST_RETRY))
}

pub fn error_policy(_session: Arc<TestSession>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        Action::requeue(Duration::from_millis(500))
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

/// When a session served by the gateway is to be released for want of its
/// client: the gateway's last sighting plus the pool's grace. A sighting
/// that does not parse counts as none, so the session is not released by it.
fn client_gone_at(session: &TestSession, pool: Option<&WarmPool>) -> Option<Timestamp> {
    let grace = pool?.spec.release_when_client_gone_seconds?;
    let seen: Timestamp = session.annotations().get(CLIENT_SEEN_ANNOTATION)?.parse().ok()?;
    Some(seen + SignedDuration::from_secs(i64::from(grace.max(1))))
}

/// Everything a decision needs, from the caches and the memory; the API
/// server is asked only for a pod this process claimed that the cache does
/// not show yet.
async fn observe(
    ctx: &Context,
    session: &TestSession,
    status: &TestSessionStatus,
    pool: Option<&WarmPool>,
    pods_api: &Api<Pod>,
    uid: &str,
) -> Result<Observed> {
    let now = Timestamp::now();
    let namespace = session.namespace().unwrap_or_default();
    let written = ctx.memory.binding(uid);
    if status.phase != Phase::Ready && written.as_ref().is_none_or(|b| !b.ready) {
        ctx.memory.binding_seen(uid);
    }
    // A session made around the API may ask for more than its pool allows:
    // it ends at the pool's limit.
    let ttl = match pool {
        Some(pool) => {
            let asked = session.spec.ttl_seconds.unwrap_or(pool.spec.session_ttl_seconds);
            asked.min(pool.spec.max_session_ttl_seconds)
        }
        None => session.spec.ttl_seconds.unwrap_or(0),
    };
    let expires = observed_created(session, now) + SignedDuration::from_secs(ttl);
    let client_gone_at = client_gone_at(session, pool);
    let claimed = claimed_in_cache(ctx, &namespace, uid);
    let names: Vec<String> = claimed.iter().map(|p| p.name_any()).collect();
    let remembered = written.as_ref().map(|b| b.pod.as_str());
    let bound = match decide::choose_bound(&names, status.pod.as_deref(), remembered) {
        Some(name) => {
            let pod = claimed.iter().find(|p| &p.name_any() == name);
            Some(BoundPod { name: name.clone(), alive: pod.is_some_and(|p| pods::is_alive(p)), in_cache: true })
        }
        None => remembered_pod(ctx, pods_api, uid, remembered).await?,
    };
    let extra_claims = match &bound {
        Some(pod) if !status.phase.has_ended() => names.iter().filter(|n| **n != pod.name).cloned().collect(),
        _ => Vec::new(),
    };
    Ok(Observed {
        now,
        deleting: session.meta().deletion_timestamp.is_some(),
        phase: status.phase,
        status_pod: status.pod.clone(),
        results_final: status.results.as_ref().is_some_and(|r| r.is_final),
        ended_at: status::ended_at(status),
        retention: ctx.settings.result_retention,
        export: match (&ctx.exporter, &status.exported_at) {
            (None, _) => Export::Off,
            (Some(_), Some(_)) => Export::Done,
            (Some(_), None) => Export::Due,
        },
        pool_exists: pool.is_some(),
        expires,
        client_gone_at,
        bound,
        extra_claims,
        written,
        rebinds: status.rebinds,
        max_rebinds: pool.map_or(0, |p| p.spec.max_rebinds),
    })
}

fn observed_created(session: &TestSession, now: Timestamp) -> Timestamp {
    session.meta().creation_timestamp.as_ref().map_or(now, |t| t.0)
}

/// A pod this process claimed that the cache does not show yet, read from
/// the API server; forgotten when it is no longer claimed for the session.
async fn remembered_pod(
    ctx: &Context,
    pods_api: &Api<Pod>,
    uid: &str,
    remembered: Option<&str>,
) -> Result<Option<BoundPod>> {
    let Some(name) = remembered else { return Ok(None) };
    match pods_api.get_opt(name).await? {
        Some(pod) if pods::claimed_by(&pod) == Some(uid) => {
            Ok(Some(BoundPod { name: name.to_owned(), alive: pods::is_alive(&pod), in_cache: false }))
        }
        _ => {
            ctx.memory.forget(uid);
            Ok(None)
        }
    }
}

/// Live pods the cache shows claimed for session `uid`: looked up through
/// the pod index, and checked again on the cached pod itself.
fn claimed_in_cache(ctx: &Context, namespace: &str, uid: &str) -> Vec<Arc<Pod>> {
    let keys = ctx.with_pod_index(|index| index.pods_of(uid));
    keys.into_iter()
        .filter(|(ns, _)| ns == namespace)
        .filter_map(|(ns, name)| ctx.pods.get(&ObjectRef::new(&name).within(&ns)))
        .filter(|p| !pods::is_terminating(p) && pods::claimed_by(p) == Some(uid))
        .collect()
}

fn extra_claims(ctx: &Context, namespace: &str, uid: &str, bound: &str) -> Vec<String> {
    claimed_in_cache(ctx, namespace, uid).iter().map(|p| p.name_any()).filter(|n| n != bound).collect()
}

/// The pod's UID from the cache, as the delete's precondition.
fn pod_uid(ctx: &Context, namespace: &str, pod: &str) -> Option<String> {
    ctx.pods.get(&ObjectRef::new(pod).within(namespace)).and_then(|p| p.uid())
}

/// What the Ready status says of the pod: from the cache, or from the API
/// server when the cache does not show it yet (a claim just made returns the
/// pod, but the pass may have been cut between claim and status).
async fn pod_facts(ctx: &Context, namespace: &str, name: &str, pods_api: &Api<Pod>) -> Result<PodFacts> {
    let cached = ctx.pods.get(&ObjectRef::new(name).within(namespace));
    let pod = match cached {
        Some(pod) => Some(pod),
        None => pods_api.get_opt(name).await?.map(Arc::new),
    };
    Ok(pod_facts_of(name, pod.as_deref(), ctx.settings.session_port))
}

fn pod_facts_of(name: &str, pod: Option<&Pod>, default_port: u16) -> PodFacts {
    PodFacts {
        name: name.to_owned(),
        node: pod.and_then(pods::node_of).map(String::from),
        backend: None,
        endpoint: pod.and_then(|p| pods::endpoint(p, default_port)),
        key_id: pod.and_then(|p| p.labels().get(labels::KEY_ID)).cloned(),
    }
}

/// Ends the session (Completed, Expired or Failed), releasing its pod.
/// Returns the status written.
async fn end(
    ctx: &Context,
    session: &TestSession,
    status: TestSessionStatus,
    ending: Ending,
    release: Option<&str>,
    pods_api: &Api<Pod>,
) -> Result<TestSessionStatus> {
    let namespace = session.namespace().unwrap_or_default();
    if let Some(pod) = release {
        delete_pod(pods_api, &pod_uid(ctx, &namespace, pod), pod).await?;
    }
    ctx.memory.forget(&session.uid().unwrap_or_default());
    let ended = status::ended(status, ending, session.meta().generation, Timestamp::now());
    // Stored before the status is written, so one write says both that the
    // session ended and that its results are stored: a watcher never sees
    // one without the other, and the API server takes one write, not two.
    let next = match ctx.exporter {
        Some(_) => store_results(ctx, session, ended.clone()).await.0,
        None => ended.clone(),
    };
    write_status(ctx, session, &next).await?;
    ctx.memory.remember_ended(&session.uid().unwrap_or_default(), next.clone());
    publish_export_failure(ctx, session, &ended, &next).await;
    match ending {
        Ending::Completed => {
            let notice = Notice::normal(reason::COMPLETED, status::COMPLETED_MESSAGE);
            events::publish(&ctx.recorder, session, &notice).await;
        }
        Ending::Failed => {
            let notice = Notice::warning(reason::TOO_MANY_REBINDS, status::TOO_MANY_REBINDS_MESSAGE);
            events::publish(&ctx.recorder, session, &notice).await;
        }
        Ending::ClientGone => {
            let notice = Notice::normal(reason::CLIENT_GONE, status::CLIENT_GONE_MESSAGE);
            events::publish(&ctx.recorder, session, &notice).await;
        }
        Ending::Expired => {}
    }
    Ok(next)
}

/// Stores an ended session's results. Returns its status with `exportedAt`
/// and the `Exported` condition as they now stand (unchanged when the store
/// fails and the status already says so), and either that they are stored
/// or how long to wait before trying again.
async fn store_results(
    ctx: &Context,
    session: &TestSession,
    status: TestSessionStatus,
) -> (TestSessionStatus, std::result::Result<(), Duration>) {
    let Some(exporter) = ctx.exporter.as_deref() else { return (status, Ok(())) };
    let ended_at = status::ended_at(&status).unwrap_or_else(Timestamp::now);
    let document = record::record(session, &status, ended_at);
    let generation = session.meta().generation;
    match exporter.store(&document, ended_at).await {
        Outcome::Stored { key } => (status::exported(status, &key, generation, Timestamp::now()), Ok(())),
        Outcome::Later { after, why } => {
            let next = status::export_failed(status.clone(), &why, generation, Timestamp::now()).unwrap_or(status);
            (next, Err(after))
        }
    }
}

/// A Warning Event when this write is the one that says the store failed.
async fn publish_export_failure(
    ctx: &Context,
    session: &TestSession,
    before: &TestSessionStatus,
    after: &TestSessionStatus,
) {
    let failing = |s: &TestSessionStatus| {
        conditions::reason(&s.conditions, conditions::EXPORTED) == Some(reason::STORE_UNAVAILABLE)
    };
    if failing(after) && !failing(before) {
        let message = after
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::EXPORTED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        events::publish(&ctx.recorder, session, &Notice::warning(reason::STORE_UNAVAILABLE, message)).await;
    }
}

/// Marks the session as waiting (once; later passes change nothing).
async fn wait(
    ctx: &Context,
    session: &TestSession,
    status: TestSessionStatus,
    why: &'static str,
    message: String,
) -> Result<Action> {
    let created_at = session.meta().creation_timestamp.clone();
    let next = status::waiting(status, why, message, created_at, session.meta().generation, Timestamp::now());
    if let Some(next) = next {
        write_status(ctx, session, &next).await?;
    }
    Ok(Action::requeue(WAIT_RECHECK))
}

async fn delete_session(ctx: &Context, session: &TestSession) -> Result<()> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: session.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&session.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_pod(pods_api: &Api<Pod>, uid: &Option<String>, name: &str) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: uid.clone(), resource_version: None }),
        ..DeleteParams::default()
    };
    match pods_api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(ctx: &Context, session: &TestSession, status: &TestSessionStatus) -> Result<()> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    ctx.memory.count_write(&session.uid().unwrap_or_default());
    // A merge patch, not a server-side apply: this write is on every
    // session's critical path, and an apply costs the API server a typed
    // merge and field-set bookkeeping on top (docs/benchmarks.md).
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&session.name_any(), &params, &Patch::Merge(&status::patch(status)?)).await?;
    Ok(())
}

/// The sessions a pod event concerns: the one it is bound to, or, when it is
/// a ready warm pod, the longest-waiting session of its pool. One pod wakes
/// one waiter, so a busy pool is not woken in a herd.
pub fn sessions_for_pod(pod: &Pod, sessions: &Caches<TestSession>) -> Vec<ObjectRef<TestSession>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    if let Some(session) = pod.labels().get(labels::SESSION) {
        return vec![ObjectRef::new(session).within(namespace)];
    }
    let Some(pool) = pod.labels().get(labels::POOL) else { return vec![] };
    if !pods::is_ready(pod) {
        return vec![];
    }
    let waiting = |s: &TestSession| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && &s.spec.pool == pool
            && s.status.as_ref().is_some_and(|st| st.pod.is_none() && st.phase == Phase::Pending)
    };
    // Almost always nobody waits: find that out without copying the cache.
    if sessions.find(|s| waiting(s)).is_none() {
        return vec![];
    }
    sessions
        .state()
        .iter()
        .filter(|s| waiting(s))
        .min_by_key(|s| s.meta().creation_timestamp.as_ref().map(|t| t.0))
        .map(|s| ObjectRef::from(s.as_ref()))
        .into_iter()
        .collect()
}

/// Whether a session waits for a pod the pool owes it an on-demand pod for:
/// unbound because the pool had no warm pod free. One that waits on
/// `NoBackendFits` waits for room on a backend, which a new pod would not
/// make: it gets none (a pool with every backend full would otherwise make
/// pods up to maxSize that no session could use).
pub fn waits_for_a_pod(session: &TestSession) -> bool {
    session.meta().deletion_timestamp.is_none()
        && session.status.as_ref().is_some_and(|st| {
            st.pod.is_none() && conditions::reason(&st.conditions, conditions::BOUND) == Some(reason::POOL_EMPTY)
        })
}
