//! The Tube controller: signalling through the resource (docs/tubes.md).
//!
//! A tube on a pool gets a TestSession of its own, which the tube owns:
//! the session claims a warm pod exactly as any session does (and goes
//! with the tube, through garbage collection). A tube that names a
//! session rides that session's pod. Once the pod serves the session, the
//! operator hands it the client's offer with a tube ticket (the tube, the
//! pod, its kind and target, and the pool's allowlist, signed by the
//! pool's key) and writes the pod's answer into the status. While the
//! tube lives, the operator reads its state, bytes, round trip and
//! connections from the pod; the tube ends with its session, when its pod
//! goes, when its client goes or idles, or when it is deleted (a finalizer
//! closes it on the pod first), and the reason is kept in the status.
//!
//! Each pass observes (caches), asks [`decide::decide`] for one step, acts,
//! and decides again from what the act changed.

pub mod decide;
pub mod pod;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tidepool_crds::test_session::{Phase, Profile, TestSessionSpec};
use tidepool_crds::tube::{ConversationType, TubeState, TubeStatus};
use tidepool_crds::{TestSession, Tube, WarmPool};
use tidepool_protocol::egress::EgressPolicy;
use tidepool_protocol::tube::{EndReason, KIND_SOCKS5, KIND_TUNNEL, PodTubeState, TubeOffer, TubeReport, target_text};
use tidepool_wire::token::TubeClaims;

use crate::conditions::{self, reason};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{self, Notice};
use crate::{labels, pods};
use decide::{Observed, SessionSeen, Step};
use pod::PodError;

/// Holds a tube until the operator has closed it on its pod.
pub const FINALIZER: &str = "tidepool.dev/tube";
/// A pass takes at most this many steps.
const MAX_STEPS: usize = 6;
/// How long a tube ticket is good for: one call, with room for clock skew.
const TICKET_SECONDS: u64 = 300;

pub async fn reconcile(tube: Arc<Tube>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = tube.namespace().ok_or(Error::Missing("Tube", "namespace"))?;
    let mut status = tube.status.clone().unwrap_or_default();
    let mut session = ctx.sessions.get(&ObjectRef::new(&session_name(&tube)).within(&namespace));
    let mut observed = observe(&ctx, &tube, &namespace, &status, session.clone());
    let mut has_finalizer = observed.has_finalizer;
    // Every write is conditional on the version this pass started from (and
    // then on the version it wrote), so a pass acting on a stale cache fails
    // its write with 409 instead of repeating a transition, its Event and
    // its counts.
    let mut version = tube.resource_version();
    let mut read_fresh = false;
    for _ in 0..MAX_STEPS {
        observed.has_finalizer = has_finalizer;
        let step = decide::decide(&observed);
        tracing::trace!(tube = %tube.name_any(), ?step, "step");
        if !read_fresh && decide::session_may_be_stale(&observed, &step) {
            read_fresh = true;
            if let Some(fresh) = fresh_session(&ctx, &tube, &namespace).await {
                session = fresh;
                observed = observe(&ctx, &tube, &namespace, &status, session.clone());
                continue;
            }
        }
        match step {
            Step::Keep { remaining } => return Ok(Action::requeue(remaining)),
            Step::Release { close_on_pod } => {
                if let Some(pod) = &close_on_pod {
                    close_on(&ctx, &tube, &namespace, pod, session.as_deref()).await;
                }
                if has_finalizer {
                    set_finalizer(&ctx, &tube, &namespace, false, version.as_deref()).await?;
                    // Counted once: a pass whose finalizer write lost (409) comes again.
                    if close_on_pod.is_some() {
                        end_metrics(&ctx, EndReason::Deleted);
                    }
                }
                return Ok(Action::await_change());
            }
            Step::AddFinalizer => {
                version = set_finalizer(&ctx, &tube, &namespace, true, version.as_deref()).await?;
                has_finalizer = true;
            }
            Step::CreateSession => {
                let name = match create_session(&ctx, &tube, &namespace).await {
                    Ok(name) => name,
                    Err(Error::Invalid { reason, .. }) => {
                        (status, version) =
                            end(&ctx, &tube, &namespace, version, status, EndReason::Refused, &reason).await?;
                        observed.state = status.state;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let mut next = status.clone();
                next.session = Some(name.clone());
                waiting(&mut next, &tube, "WaitingForPod", &format!("TestSession {name} is claiming a pod"));
                write_status(&ctx, &tube, &namespace, version.as_deref(), &status, &next).await?;
                // Its binding wakes this tube through the session watch.
                return Ok(Action::requeue(decide::WAIT_RECHECK));
            }
            Step::Wait { reason, message } => {
                let mut next = status.clone();
                waiting(&mut next, &tube, reason, &message);
                write_status(&ctx, &tube, &namespace, version.as_deref(), &status, &next).await?;
                return Ok(Action::requeue(decide::WAIT_RECHECK));
            }
            Step::Offer { pod } => match offer(&ctx, &tube, &namespace, &pod, session.as_deref()).await {
                Ok(answer) => {
                    let mut next = status.clone();
                    next.answer = Some(answer);
                    next.pod = Some(pod.clone());
                    next.state = TubeState::Answered;
                    let message = format!("pod {pod} answered; waiting for the client's peer to connect");
                    set_ready(&mut next, &tube, false, "Answered", &message);
                    write_status(&ctx, &tube, &namespace, version.as_deref(), &status, &next).await?;
                    ctx.metrics.tube_creations.with_label_values(&["answered"]).inc();
                    events::publish(&ctx.recorder, tube.as_ref(), &Notice::normal("Answered", message)).await;
                    return Ok(Action::requeue(decide::poll_every(TubeState::Answered)));
                }
                Err(OfferFailed::Retry { after, why, busy }) => {
                    if busy {
                        ctx.metrics.tube_creations.with_label_values(&["pod_busy"]).inc();
                    }
                    let mut next = status.clone();
                    waiting(&mut next, &tube, if busy { "PodBusy" } else { "PodUnreachable" }, &why);
                    write_status(&ctx, &tube, &namespace, version.as_deref(), &status, &next).await?;
                    return Ok(Action::requeue(after));
                }
                Err(OfferFailed::End(reason, message)) => {
                    (status, version) = end(&ctx, &tube, &namespace, version, status, reason, &message).await?;
                    observed.state = status.state;
                }
            },
            Step::Poll { pod } => {
                let report = match poll(&ctx, &tube, &namespace, &pod, session.as_deref()).await {
                    Ok(report) => report,
                    Err(PodError::Unknown) => TubeReport {
                        state: PodTubeState::Ended,
                        bytes_sent: 0,
                        bytes_received: 0,
                        rtt_ms: None,
                        open_connections: 0,
                        ended: Some(EndReason::PodGone),
                        message: Some(format!("pod {pod} no longer knows the tube (it restarted)")),
                    },
                    Err(e) => {
                        tracing::debug!(tube = %tube.name_any(), error = %e, "tube report");
                        return Ok(Action::requeue(decide::poll_every(status.state)));
                    }
                };
                let (next, opened) = apply_report(&status, &report, Timestamp::now());
                let mut next = next;
                if opened {
                    set_ready(&mut next, &tube, true, "Connected", "the data channel is open");
                }
                // Bytes are counted once their status is written: a write
                // that loses to a newer version counts nothing, and its pass
                // runs again.
                if let Some(reason) = report.ended {
                    let message = report.message.clone().unwrap_or_else(|| reason.as_str().to_string());
                    let before = status.clone();
                    (status, version) = end(&ctx, &tube, &namespace, version, next, reason, &message).await?;
                    count_bytes(&ctx, &before, &status);
                    observed.state = status.state;
                    continue;
                }
                write_status(&ctx, &tube, &namespace, version.as_deref(), &status, &next).await?;
                count_bytes(&ctx, &status, &next);
                if opened {
                    let created = tube.creation_timestamp().map_or(Timestamp::now(), |t| t.0);
                    let setup = Timestamp::now().duration_since(created).as_secs_f64().max(0.0);
                    ctx.metrics.tube_setup.observe(setup);
                    ctx.metrics.tube_creations.with_label_values(&["connected"]).inc();
                    let note = format!("the client connected to pod {pod}; the tube is open");
                    events::publish(&ctx.recorder, tube.as_ref(), &Notice::normal("Opened", note)).await;
                }
                return Ok(Action::requeue(decide::poll_every(next.state)));
            }
            Step::End { reason, message, close_on_pod } => {
                if let Some(pod) = close_on_pod {
                    close_on(&ctx, &tube, &namespace, &pod, session.as_deref()).await;
                }
                (status, version) = end(&ctx, &tube, &namespace, version, status, reason, &message).await?;
                observed.state = status.state;
            }
            Step::ReleaseSession => {
                // By its name, which is the tube's: the status may not have recorded it.
                delete_session(&ctx, &namespace, &session_name(&tube)).await?;
                return Ok(Action::await_change());
            }
            Step::Delete => {
                let api: Api<Tube> = Api::namespaced(ctx.client.clone(), &namespace);
                match api.delete(&tube.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Action::await_change());
            }
        }
    }
    Ok(Action::requeue(Duration::from_millis(100)))
}

pub fn error_policy(_tube: Arc<Tube>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        // A write on a version the cache had not caught up with: the cache
        // is a moment behind the operator's own last write, so look again soon.
        Error::Kube(kube::Error::Api(status)) if status.code == 409 => Action::requeue(CONFLICT_RETRY),
        e if e.is_transient() => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(60)),
    }
}

/// How soon an offer is handed again to a pod that did not answer.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(250);

/// How soon a pass whose write lost to a newer version runs again.
const CONFLICT_RETRY: Duration = Duration::from_millis(50);

/// The session a tube rides: the one it names, or the one made for it.
fn session_name(tube: &Tube) -> String {
    tube.spec.session.clone().unwrap_or_else(|| tube.name_any())
}

/// The tube's session as the API has it now (`Some(None)`: there is
/// none), when the cache may lag: the session's change that woke this pass
/// came through the controller's own watch, and the shared cache may not
/// have it yet. `None` when the read fails (the pass goes on from the cache).
async fn fresh_session(ctx: &Context, tube: &Tube, namespace: &str) -> Option<Option<Arc<TestSession>>> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    match api.get_opt(&session_name(tube)).await {
        Ok(session) => Some(session.map(Arc::new)),
        Err(e) => {
            tracing::debug!(tube = %tube.name_any(), error = %e, "cannot read the tube's session; the cache decides");
            None
        }
    }
}

fn session_seen(ctx: &Context, tube: &Tube, namespace: &str, session: Option<&TestSession>) -> SessionSeen {
    let owns_session = tube.spec.session.is_none();
    let uid = tube.uid().unwrap_or_default();
    // A session of that name the tube did not make is not the tube's.
    let session = session.filter(|s| !owns_session || s.owner_references().iter().any(|o| o.uid == uid));
    match &session {
        None => SessionSeen::Missing,
        Some(s) => {
            let session_status = s.status.clone().unwrap_or_default();
            match (session_status.phase, session_status.pod) {
                (Phase::Ready | Phase::Running, Some(pod)) => {
                    let alive =
                        ctx.pods.get(&ObjectRef::new(&pod).within(namespace)).is_some_and(|p| pods::is_alive(&p));
                    SessionSeen::Ready { pod, alive }
                }
                (phase, _) if phase.has_ended() => SessionSeen::Ended(format!("{phase:?}")),
                (phase, _) => SessionSeen::Waiting(format!("TestSession {} is {phase:?}", s.name_any())),
            }
        }
    }
}

/// What a pass knows, from the caches and `session` (the tube's, from the
/// cache or read afresh).
fn observe(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    status: &TubeStatus,
    session: Option<Arc<TestSession>>,
) -> Observed {
    let owns_session = tube.spec.session.is_none();
    let seen = session_seen(ctx, tube, namespace, session.as_deref());
    let pool = tube.spec.pool.clone().or_else(|| session.as_ref().map(|s| s.spec.pool.clone()));
    let found = pool.as_deref().map(|name| (name, ctx.pools.get(&ObjectRef::new(name).within(namespace))));
    let (refused_by_pool, pool_unseen) = match &found {
        Some((name, Some(pool))) => (refusal(tube, name, Some(pool)), None),
        Some((name, None)) => (None, Some((*name).to_string())),
        None => (None, None),
    };
    let now = Timestamp::now();
    let created = tube.creation_timestamp().map_or(now, |t| t.0);
    let age = now.duration_since(created).try_into().unwrap_or(Duration::ZERO);
    // Tubes that ended before `endedAt` was written count from their last
    // Ready transition.
    let ended_for = matches!(status.state, TubeState::Closed | TubeState::Failed)
        .then(|| status.ended_at.as_ref().map(|at| at.0))
        .flatten()
        .or_else(|| {
            let terminal = matches!(status.state, TubeState::Closed | TubeState::Failed);
            terminal.then(|| conditions::last_transition(&status.conditions, conditions::READY)).flatten()
        })
        .map(|at| now.duration_since(at).try_into().unwrap_or(Duration::ZERO));
    Observed {
        deleting: tube.meta().deletion_timestamp.is_some(),
        has_finalizer: tube.finalizers().iter().any(|f| f == FINALIZER),
        state: status.state,
        answered: status.answer.is_some(),
        status_pod: status.pod.clone(),
        owns_session,
        session: seen,
        refused_by_pool,
        pool_unseen,
        age,
        ended_for,
        retention: ctx.settings.result_retention,
    }
}

/// Why `pool` will not take `tube`, if it will not. Pure.
pub fn refusal(tube: &Tube, name: &str, pool: Option<&WarmPool>) -> Option<String> {
    let Some(pool) = pool else { return Some(format!("no WarmPool {name}")) };
    let allow = &pool.spec.tubes.allow;
    if allow.is_empty() {
        return Some(format!("WarmPool {name} allows tubes nowhere: its spec.tubes.allow is empty"));
    }
    let policy = match EgressPolicy::new(allow, Vec::new()) {
        Ok(policy) => policy,
        Err(e) => return Some(format!("WarmPool {name}'s spec.tubes.allow: {e}")),
    };
    match (&tube.spec.conversation_type, &tube.spec.target) {
        (ConversationType::Tunnel, Some(target)) => {
            let port = u16::try_from(target.port).unwrap_or(0);
            (!policy.lists_name(&target.host, port))
                .then(|| format!("WarmPool {name}'s allowlist does not allow {}", target_text(target)))
        }
        (ConversationType::Tunnel, None) => Some("a tunnel needs spec.target".into()),
        (ConversationType::Socks5, _) => None,
    }
}

/// The status after a report, and whether the tube opened just now. Pure.
pub fn apply_report(status: &TubeStatus, report: &TubeReport, now: Timestamp) -> (TubeStatus, bool) {
    let mut next = status.clone();
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    // The pod's counters only grow; a smaller figure is a stale report.
    next.bytes_sent = status.bytes_sent.max(as_i64(report.bytes_sent));
    next.bytes_received = status.bytes_received.max(as_i64(report.bytes_received));
    next.rtt_ms = report.rtt_ms.map(|ms| (ms * 1000.0).round() / 1000.0).or(status.rtt_ms);
    next.open_connections = i32::try_from(report.open_connections).unwrap_or(i32::MAX);
    let opened = report.state == PodTubeState::Connected && status.state == TubeState::Answered;
    if opened {
        next.state = TubeState::Connected;
        next.connected_at = Some(Time(now));
    }
    (next, opened)
}

fn count_bytes(ctx: &Context, before: &TubeStatus, after: &TubeStatus) {
    let delta = |a: i64, b: i64| u64::try_from(b - a).unwrap_or(0);
    ctx.metrics.tube_bytes.with_label_values(&["to_client"]).inc_by(delta(before.bytes_sent, after.bytes_sent));
    ctx.metrics
        .tube_bytes
        .with_label_values(&["from_client"])
        .inc_by(delta(before.bytes_received, after.bytes_received));
}

/// The creation outcome an end before any connection counts as.
fn refusal_label(reason: EndReason) -> Option<&'static str> {
    match reason {
        EndReason::BadOffer => Some("bad_offer"),
        EndReason::Refused => Some("refused"),
        EndReason::NotConnected => Some("failed"),
        _ => None,
    }
}

fn end_metrics(ctx: &Context, reason: EndReason) {
    ctx.metrics.tube_ends.with_label_values(&[reason.as_str()]).inc();
}

/// Writes the tube's end, with its Event.
async fn end(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    version: Option<String>,
    before: TubeStatus,
    reason: EndReason,
    message: &str,
) -> Result<(TubeStatus, Option<String>)> {
    let mut next = before.clone();
    next.state = decide::ended_state(reason);
    next.end_reason = Some(reason.as_str().to_string());
    next.ended_at = Some(Time(Timestamp::now()));
    next.open_connections = 0;
    set_ready(&mut next, tube, false, reason.as_str(), message);
    let version = write_status(ctx, tube, namespace, version.as_deref(), &before, &next).await?.or(version);
    end_metrics(ctx, reason);
    if let Some(label) = refusal_label(reason) {
        ctx.metrics.tube_creations.with_label_values(&[label]).inc();
    }
    let notice = if reason.is_normal() {
        Notice::normal(reason::TUBE_CLOSED, format!("closed: {message}"))
    } else {
        Notice::warning(reason::TUBE_FAILED, format!("{}: {message}", reason.as_str()))
    };
    events::publish(&ctx.recorder, tube, &notice).await;
    Ok((next, version))
}

fn set_ready(status: &mut TubeStatus, tube: &Tube, ready: bool, why: &str, message: &str) {
    let generation = tube.meta().generation;
    conditions::set(&mut status.conditions, conditions::READY, ready, why, message, generation, Timestamp::now());
    status.observed_generation = generation;
}

fn waiting(status: &mut TubeStatus, tube: &Tube, why: &str, message: &str) {
    status.state = TubeState::Pending;
    set_ready(status, tube, false, why, message);
}

/// Writes the status when it changed, on condition of `version`; the
/// version written, when it wrote.
async fn write_status(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    version: Option<&str>,
    before: &TubeStatus,
    next: &TubeStatus,
) -> Result<Option<String>> {
    if before == next {
        return Ok(None);
    }
    let api: Api<Tube> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({ "metadata": { "resourceVersion": version }, "status": next });
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    match api.patch_status(&tube.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(written) => Ok(written.resource_version()),
        // Deleted meanwhile: nothing left to describe.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Adds or removes the finalizer, guarded by the resourceVersion read, so
/// another writer's finalizers are never lost.
async fn set_finalizer(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    present: bool,
    version: Option<&str>,
) -> Result<Option<String>> {
    let mut finalizers: Vec<String> = tube.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": version } });
    let api: Api<Tube> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    match api.patch(&tube.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(written) => Ok(written.resource_version()),
        Err(kube::Error::Api(s)) if s.code == 404 && !present => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes the session that claims a pool's pod for the tube, owned by the
/// tube and named after it, so a pass that repeats it finds it made.
async fn create_session(ctx: &Context, tube: &Tube, namespace: &str) -> Result<String> {
    let pool = tube.spec.pool.clone().ok_or(Error::Missing("Tube", "spec.pool"))?;
    let owner = OwnerReference {
        api_version: tidepool_crds::API_VERSION.into(),
        kind: "Tube".into(),
        name: tube.name_any(),
        uid: tube.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let spec = TestSessionSpec {
        pool,
        profile: Profile::Latency,
        ttl_seconds: tube.spec.ttl_seconds,
        sticky_key: None,
        client: None,
        probes: Vec::new(),
    };
    let mut session = TestSession::new(&tube.name_any(), spec);
    session.metadata = ObjectMeta {
        name: Some(tube.name_any()),
        namespace: Some(namespace.to_owned()),
        owner_references: Some(vec![owner]),
        labels: Some([(labels::TUBE.to_string(), label_value(&tube.name_any()))].into()),
        ..ObjectMeta::default()
    };
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    match api.create(&PostParams::default(), &session).await {
        Ok(created) => {
            tracing::info!(tube = %tube.name_any(), session = %created.name_any(), "tube session made");
            Ok(created.name_any())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Made by an earlier pass, or someone else's: only the first is the tube's.
            let existing = api.get(&tube.name_any()).await?;
            let uid = tube.uid().unwrap_or_default();
            if existing.owner_references().iter().any(|o| o.uid == uid) {
                Ok(existing.name_any())
            } else {
                Err(Error::Invalid {
                    kind: "Tube",
                    name: tube.name_any(),
                    reason: format!("a TestSession named {} exists and is not this tube's", tube.name_any()),
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// A name as a label value: at most 63 characters, ending in an alphanumeric.
fn label_value(name: &str) -> String {
    name.chars().take(63).collect::<String>().trim_end_matches(['-', '.']).to_owned()
}

async fn delete_session(ctx: &Context, namespace: &str, name: &str) -> Result<()> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Where the tube's pod is reached, and a ticket for one call to it.
async fn pod_call(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    pod: &str,
    session: Option<&TestSession>,
) -> Result<(String, String), PodError> {
    let session = session.ok_or_else(|| PodError::Unreachable("the tube's session is not seen".into()))?;
    let session_status = session.status.clone().unwrap_or_default();
    let endpoint = session_status.endpoint.ok_or_else(|| PodError::Unreachable("the pod has no endpoint".into()))?;
    let pool_name = &session.spec.pool;
    let pool = ctx.pools.get(&ObjectRef::new(pool_name).within(namespace));
    let pool_uid = pool
        .as_ref()
        .and_then(|p| p.uid())
        .ok_or_else(|| PodError::Unreachable(format!("WarmPool {pool_name} is not seen")))?;
    let keys = match ctx.keys.load(&ctx.client, namespace, pool_name, &pool_uid).await {
        Ok(Some(keys)) => keys,
        Ok(None) => return Err(PodError::Unreachable("the pool's key is not readable".into())),
        Err(e) => {
            // The detail is the operator's; the Tube's readers get the gist.
            tracing::warn!(error = %e, pool = %pool_name, "reading the pool's key for a tube");
            return Err(PodError::Unreachable("the pool's key could not be read".into()));
        }
    };
    let allow = pool.map(|p| p.spec.tubes.allow.clone()).unwrap_or_default();
    let claims = TubeClaims {
        tube: tube.uid().unwrap_or_default(),
        ns: namespace.to_owned(),
        name: tube.name_any(),
        pod: pod.to_owned(),
        kind: match tube.spec.conversation_type {
            ConversationType::Tunnel => KIND_TUNNEL,
            ConversationType::Socks5 => KIND_SOCKS5,
        }
        .into(),
        target: tube.spec.target.as_ref().map(target_text),
        allow: serde_json::to_string(&allow).unwrap_or_else(|_| "[]".into()),
        idle: u64::try_from(tube.spec.idle_timeout_seconds).unwrap_or(600),
        exp: u64::try_from(Timestamp::now().as_second()).unwrap_or(0) + TICKET_SECONDS,
        kid: String::new(),
    };
    let ticket = keys.signer_for(session_status.key_id.as_deref()).sign_tube(&claims);
    Ok((endpoint, ticket))
}

enum OfferFailed {
    /// Try again after `after`; `busy` when the pod said it is at a limit.
    Retry {
        after: Duration,
        why: String,
        busy: bool,
    },
    End(EndReason, String),
}

async fn offer(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    pod: &str,
    session: Option<&TestSession>,
) -> Result<String, OfferFailed> {
    // A warm pod that does not answer yet is most often one whose server is
    // still starting: look again soon (the answer deadline bounds it).
    let retry = |why: String| OfferFailed::Retry { after: UNREACHABLE_RETRY, why, busy: false };
    let (endpoint, ticket) = pod_call(ctx, tube, namespace, pod, session).await.map_err(|e| match e {
        PodError::Refused(why) => OfferFailed::End(EndReason::Refused, why),
        other => retry(other.to_string()),
    })?;
    let body = TubeOffer { offer: tube.spec.offer.clone() };
    pod::offer(&ctx.monitor_http, &endpoint, &ticket, &body).await.map_err(|e| match e {
        PodError::Busy { retry_after, message } => OfferFailed::Retry { after: retry_after, why: message, busy: true },
        PodError::BadOffer(why) => OfferFailed::End(EndReason::BadOffer, why),
        PodError::Refused(why) => OfferFailed::End(EndReason::Refused, why),
        PodError::Unknown => OfferFailed::End(EndReason::Refused, format!("pod {pod} does not serve tubes")),
        other => retry(format!("pod {pod}: {other}")),
    })
}

async fn poll(
    ctx: &Context,
    tube: &Tube,
    namespace: &str,
    pod: &str,
    session: Option<&TestSession>,
) -> Result<TubeReport, PodError> {
    let (endpoint, ticket) = pod_call(ctx, tube, namespace, pod, session).await?;
    pod::report(&ctx.monitor_http, &endpoint, &ticket, &tube.uid().unwrap_or_default()).await
}

/// Closes the tube on its pod; a pod that cannot be reached has nothing
/// left open (its tubes go with it), so a failure is only logged.
async fn close_on(ctx: &Context, tube: &Tube, namespace: &str, pod: &str, session: Option<&TestSession>) {
    let closed = match pod_call(ctx, tube, namespace, pod, session).await {
        Ok((endpoint, ticket)) => {
            pod::close(&ctx.monitor_http, &endpoint, &ticket, &tube.uid().unwrap_or_default()).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = closed {
        tracing::info!(tube = %tube.name_any(), %pod, error = %e, "could not close the tube on its pod");
    }
}

/// Keeps the tube gauges: tubes by state and the connections they carry,
/// counted from the cache every few seconds. Runs until the process ends.
pub async fn keep_gauges(tubes: crate::scope::Caches<Tube>, metrics: Arc<crate::metrics::Metrics>) {
    const STATES: [(TubeState, &str); 6] = [
        (TubeState::Pending, "Pending"),
        (TubeState::Answered, "Answered"),
        (TubeState::Connected, "Connected"),
        (TubeState::Disconnected, "Disconnected"),
        (TubeState::Failed, "Failed"),
        (TubeState::Closed, "Closed"),
    ];
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        every.tick().await;
        let all = tubes.state();
        for (state, label) in STATES {
            let count =
                all.iter().filter(|t| t.status.as_ref().map_or(TubeState::Pending, |s| s.state) == state).count();
            metrics.tubes.with_label_values(&[label]).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let connections: i64 =
            all.iter().filter_map(|t| t.status.as_ref()).map(|s| i64::from(s.open_connections.max(0))).sum();
        metrics.tube_connections.set(connections);
    }
}

/// Tubes that a session change concerns: those riding it.
pub fn tubes_for_session(session: &TestSession, tubes: &crate::scope::Caches<Tube>) -> Vec<ObjectRef<Tube>> {
    let namespace = session.namespace().unwrap_or_default();
    let name = session.name_any();
    let owners = session.owner_references().iter().filter(|o| o.kind == "Tube").map(|o| o.name.clone());
    let riders = tubes
        .state()
        .into_iter()
        .filter(|t| t.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|t| t.spec.session.as_deref() == Some(name.as_str()))
        .map(|t| t.name_any());
    owners.chain(riders).map(|tube| ObjectRef::new(&tube).within(&namespace)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::tube::{Target, TubeSpec};
    use tidepool_crds::warm_pool::EgressRule;

    fn tube(kind: ConversationType, target: Option<(&str, i32)>) -> Tube {
        Tube::new(
            "t",
            TubeSpec {
                session: None,
                pool: Some("edge".into()),
                conversation_type: kind,
                target: target.map(|(host, port)| Target { host: host.into(), port }),
                offer: "dj0w".into(),
                ice_servers: Vec::new(),
                trickle: false,
                ttl_seconds: None,
                idle_timeout_seconds: 600,
            },
        )
    }

    fn pool(allow: Vec<EgressRule>) -> WarmPool {
        let mut pool: WarmPool = serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
            "metadata": { "name": "edge" },
            "spec": { "template": {}, "tier": { "vcpu": 1, "memoryMiB": 64 }, "size": 1 }
        }))
        .unwrap();
        pool.spec.tubes.allow = allow;
        pool
    }

    fn rule(host: &str, port: i32) -> EgressRule {
        EgressRule { cidr: None, host: Some(host.into()), ports: vec![port] }
    }

    #[test]
    fn a_pool_takes_a_tube_only_to_what_its_allowlist_names() {
        let tunnel = tube(ConversationType::Tunnel, Some(("db.default.svc", 5432)));
        assert_eq!(refusal(&tunnel, "edge", None), Some("no WarmPool edge".into()));
        let empty = pool(Vec::new());
        assert!(refusal(&tunnel, "edge", Some(&empty)).unwrap().contains("allows tubes nowhere"));
        let socks = tube(ConversationType::Socks5, None);
        assert!(refusal(&socks, "edge", Some(&empty)).is_some(), "no open proxy");
        let listed = pool(vec![rule("db.default.svc", 5432)]);
        assert_eq!(refusal(&tunnel, "edge", Some(&listed)), None);
        assert_eq!(refusal(&socks, "edge", Some(&listed)), None);
        let other = tube(ConversationType::Tunnel, Some(("db.default.svc", 22)));
        assert_eq!(
            refusal(&other, "edge", Some(&listed)),
            Some("WarmPool edge's allowlist does not allow db.default.svc:22".into())
        );
        assert!(refusal(&tube(ConversationType::Tunnel, None), "edge", Some(&listed)).is_some());
    }

    fn report(state: PodTubeState, sent: u64) -> TubeReport {
        TubeReport {
            state,
            bytes_sent: sent,
            bytes_received: 7,
            rtt_ms: Some(0.1234),
            open_connections: 2,
            ended: None,
            message: None,
        }
    }

    #[test]
    fn a_report_moves_an_answered_tube_to_connected_once_and_its_counters_only_up() {
        let now = Timestamp::from_second(1_000).unwrap();
        let answered = TubeStatus { state: TubeState::Answered, ..TubeStatus::default() };
        let (connecting, opened) = apply_report(&answered, &report(PodTubeState::Connecting, 0), now);
        assert!(!opened);
        assert_eq!(connecting.state, TubeState::Answered);
        let (connected, opened) = apply_report(&answered, &report(PodTubeState::Connected, 100), now);
        assert!(opened);
        assert_eq!(connected.state, TubeState::Connected);
        assert_eq!(connected.connected_at, Some(Time(now)));
        assert_eq!((connected.bytes_sent, connected.bytes_received, connected.open_connections), (100, 7, 2));
        assert_eq!(connected.rtt_ms, Some(0.123));
        let (again, opened) = apply_report(&connected, &report(PodTubeState::Connected, 50), now);
        assert!(!opened, "opened only once");
        assert_eq!(again.bytes_sent, 100, "a stale report does not move a counter back");
    }
}
