//! Outbound probes, after the WaddlePerf performance platform: the session
//! pod measures the session's targets from where it stands (HTTP(S), TCP,
//! TLS, UDP, DNS, ICMP echo, traceroute), escalating through three tiers when
//! what it sees looks bad, once ([`run_once`], [`run`]) or every few minutes
//! ([`spawn_continuous`]). `docs/probes.md` tells what each probe measures.
//!
//! Every probe is bounded by [`ProbeSettings::timeout`] and never fails as a
//! call: a failure is a result with `ok: false` and the reason in `error`.
//! Every probe that sends packets reaches only the addresses the egress
//! policy ([`ProbeSettings::egress`]) allows, after resolution, and counts
//! its bytes against [`ProbeSettings::budget`].
//! Linux only: ICMP datagram sockets and `IP_RECVERR`.
#![cfg(target_os = "linux")]

mod budget;
mod cert;
mod continuous;
mod escalate;
mod http;
mod icmp;
mod net;
mod outcome;
mod series;
mod settings;
mod ssh;
mod tls;
mod traceroute;
mod udp;

use std::sync::Arc;

use rustls::ClientConfig;
use tidepool_crds::test_session::{ProbeKind, ProbeResult, ProbeTarget};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use budget::{BudgetSpent, TrafficBudget};
pub use continuous::{Continuous, ContinuousRun, ContinuousSettings, spawn_continuous};
pub use escalate::{Job, MAX_TIER, MIN_JUDGED_BYTES, Observations, Stage, Thresholds, escalation_reasons, plan};
pub use outcome::{Download, Facts, Hop, IcmpSocket, ProbeOutcome, RttStats, SshFacts};
pub use settings::{MAX_HOPS, MAX_SAMPLE_BYTES, ProbeSettings};
pub use traceroute::BASE_PORT as TRACEROUTE_BASE_PORT;

use http::BodyRead;

/// Runs `targets` from `start_tier` (clamped to 1..=3), escalating as the
/// thresholds say; the results of every tier that ran, in order.
pub async fn run_once(targets: &[ProbeTarget], start_tier: u8, settings: &ProbeSettings) -> Vec<ProbeResult> {
    run(targets, start_tier, settings).await.results()
}

/// One run: what it measured and how it escalated.
#[derive(Clone, Debug)]
pub struct Run {
    /// The tier the run ended in.
    pub tier: u8,
    /// Every probe's outcome, tier by tier.
    pub outcomes: Vec<ProbeOutcome>,
    /// Each step up: the tier left and why.
    pub escalations: Vec<(u8, Vec<String>)>,
    /// For a run that started above tier 1: the reasons its start tier is
    /// still called for (the rules into it, judged on this run's figures).
    pub holding: Vec<String>,
}

impl Run {
    /// The results for the TestSession's status.
    pub fn results(&self) -> Vec<ProbeResult> {
        self.outcomes.iter().cloned().map(ProbeOutcome::into_result).collect()
    }
}

/// Like [`run_once`], keeping the facts and the reasons for each escalation.
pub async fn run(targets: &[ProbeTarget], start_tier: u8, settings: &ProbeSettings) -> Run {
    let ctx = Arc::new(Context::new(settings));
    let start = start_tier.clamp(1, MAX_TIER);
    let jobs = (1..=start).flat_map(|tier| plan(targets, tier)).collect();
    let mut outcomes = run_jobs(&ctx, jobs, start).await;
    let mut tier = start;
    let mut escalations = Vec::new();
    while tier < MAX_TIER {
        let reasons = escalation_reasons(tier, &Observations::from_outcomes(&outcomes), &settings.thresholds);
        if reasons.is_empty() {
            break;
        }
        escalations.push((tier, reasons));
        tier += 1;
        outcomes.extend(run_jobs(&ctx, plan(targets, tier), tier).await);
    }
    let holding = match start {
        1 => Vec::new(),
        _ => escalation_reasons(start - 1, &Observations::from_outcomes(&outcomes), &settings.thresholds),
    };
    Run { tier, outcomes, escalations, holding }
}

/// One probe of `target`, in tier 1.
pub async fn probe(target: &ProbeTarget, settings: &ProbeSettings) -> ProbeOutcome {
    run_job(&Context::new(settings), Job::Probe(target.clone())).await
}

/// What the probes of a run share.
pub(crate) struct Context {
    settings: ProbeSettings,
    /// Offering h2 and HTTP/1.1, for HTTPS.
    tls_http: Result<Arc<ClientConfig>, String>,
    /// Offering no ALPN, for the tls probe.
    tls_plain: Result<Arc<ClientConfig>, String>,
}

impl Context {
    fn new(settings: &ProbeSettings) -> Self {
        Self {
            settings: settings.clone(),
            tls_http: tls::client_config(&settings.roots, true),
            tls_plain: tls::client_config(&settings.roots, false),
        }
    }
}

/// Runs a tier's jobs: the probes `parallel` at a time, then the downloads
/// one by one, alone, so that they measure the line rather than each other.
async fn run_jobs(ctx: &Arc<Context>, jobs: Vec<Job>, tier: u8) -> Vec<ProbeOutcome> {
    let (downloads, probes): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|job| matches!(job, Job::Download { .. }));
    let permits = Arc::new(Semaphore::new(ctx.settings.parallel.max(1)));
    let mut running = JoinSet::new();
    let mut outcomes: Vec<Option<ProbeOutcome>> = vec![None; probes.len()];
    let mut labels = Vec::with_capacity(probes.len());
    for (index, job) in probes.into_iter().enumerate() {
        labels.push(job_label(&job));
        let (ctx, permits) = (Arc::clone(ctx), Arc::clone(&permits));
        running.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (index, run_job(&ctx, job).await)
        });
    }
    while let Some(joined) = running.join_next().await {
        if let Ok((index, outcome)) = joined {
            outcomes[index] = Some(outcome);
        }
    }
    let mut done: Vec<ProbeOutcome> = outcomes
        .into_iter()
        .zip(labels)
        .map(|(outcome, (kind, target))| {
            outcome.unwrap_or_else(|| ProbeOutcome::failed(kind, target, "the probe stopped unexpectedly"))
        })
        .collect();
    for job in downloads {
        done.push(run_job(ctx, job).await);
    }
    for outcome in &mut done {
        outcome.result.tier = i32::from(tier);
    }
    done
}

async fn run_job(ctx: &Context, job: Job) -> ProbeOutcome {
    let settings = &ctx.settings;
    // Once the session's bytes are spent, every probe fails at once, without I/O.
    if let Err(spent) = settings.budget.check() {
        let (kind, target) = job_label(&job);
        return ProbeOutcome::failed(kind, target, spent.to_string());
    }
    match job {
        Job::Probe(target) => probe_target(ctx, &target).await,
        Job::UdpJitter(target) => match host_and_port(&target) {
            Ok((host, port)) => udp::jitter_probe(ctx, host, port).await,
            Err(error) => ProbeOutcome::failed(target.kind, target_label(&target), error),
        },
        Job::Download { url, stage } => {
            let read = match stage {
                Stage::Sample => {
                    BodyRead::Download { max_bytes: settings.sample_bytes(), max_time: settings.sample_time }
                }
                Stage::Long => BodyRead::Download { max_bytes: settings.long_bytes, max_time: settings.long_time },
            };
            http::http_probe(ctx, &url, read).await
        }
        Job::Unavailable { kind, reason } => ProbeOutcome::failed(kind, String::new(), reason),
    }
}

async fn probe_target(ctx: &Context, target: &ProbeTarget) -> ProbeOutcome {
    let settings = &ctx.settings;
    let failed = |error: String| ProbeOutcome::failed(target.kind, target_label(target), error);
    match target.kind {
        ProbeKind::Http => match &target.url {
            Some(url) => http::http_probe(ctx, url, BodyRead::Probe { max_bytes: settings.max_body_bytes }).await,
            None => failed("the http probe needs a url".into()),
        },
        ProbeKind::Tcp | ProbeKind::Tls | ProbeKind::Udp => match host_and_port(target) {
            Ok((host, port)) => match target.kind {
                ProbeKind::Tcp => net::tcp_probe(ctx, host, port).await,
                ProbeKind::Tls => tls::tls_probe(ctx, host, port).await,
                _ => udp::udp_probe(ctx, host, port).await,
            },
            Err(error) => failed(error),
        },
        ProbeKind::Ssh => match host_and_port(target) {
            Ok((host, port)) => ssh::ssh_probe(ctx, host, port).await,
            Err(error) => failed(error),
        },
        ProbeKind::Dns | ProbeKind::Icmp | ProbeKind::Traceroute => match target.host.as_deref() {
            Some(host) => match target.kind {
                ProbeKind::Dns => net::dns_probe(ctx, host).await,
                ProbeKind::Icmp => icmp::icmp_probe(ctx, host).await,
                _ => traceroute::traceroute_probe(ctx, host).await,
            },
            None => failed(format!("the {} probe needs a host", kind_name(target.kind))),
        },
    }
}

fn host_and_port(target: &ProbeTarget) -> Result<(&str, u16), String> {
    let kind = kind_name(target.kind);
    let host = target.host.as_deref().ok_or_else(|| format!("the {kind} probe needs a host"))?;
    let port = target.port.or(default_port(target.kind)).ok_or_else(|| format!("the {kind} probe needs a port"))?;
    match u16::try_from(port) {
        Ok(port) if port > 0 => Ok((host, port)),
        _ => Err(format!("port {port} is outside 1 to 65535")),
    }
}

/// The port of a probe kind that has one by default: ssh's 22.
fn default_port(kind: ProbeKind) -> Option<i32> {
    (kind == ProbeKind::Ssh).then_some(22)
}

/// What a result names as its target: the URL, `host:port`, or the host.
fn target_label(target: &ProbeTarget) -> String {
    match (target.kind, &target.url, &target.host, target.port.or(default_port(target.kind))) {
        (ProbeKind::Http, Some(url), _, _) => url.clone(),
        (ProbeKind::Tcp | ProbeKind::Tls | ProbeKind::Udp | ProbeKind::Ssh, _, Some(host), Some(port)) => {
            u16::try_from(port).map_or_else(|_| format!("{host}:{port}"), |port| net::host_port(host, port))
        }
        (_, _, Some(host), _) => host.clone(),
        _ => String::new(),
    }
}

fn job_label(job: &Job) -> (ProbeKind, String) {
    match job {
        Job::Probe(target) | Job::UdpJitter(target) => (target.kind, target_label(target)),
        Job::Download { url, .. } => (ProbeKind::Http, url.clone()),
        Job::Unavailable { kind, .. } => (*kind, String::new()),
    }
}

fn kind_name(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Http => "http",
        ProbeKind::Tcp => "tcp",
        ProbeKind::Tls => "tls",
        ProbeKind::Udp => "udp",
        ProbeKind::Dns => "dns",
        ProbeKind::Icmp => "icmp",
        ProbeKind::Traceroute => "traceroute",
        ProbeKind::Ssh => "ssh",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(kind: ProbeKind, host: Option<&str>, port: Option<i32>) -> ProbeTarget {
        ProbeTarget { kind, url: None, host: host.map(Into::into), port }
    }

    #[test]
    fn targets_are_checked_and_labelled() {
        assert_eq!(host_and_port(&target(ProbeKind::Tcp, Some("h"), Some(22))), Ok(("h", 22)));
        assert_eq!(host_and_port(&target(ProbeKind::Tcp, Some("h"), None)), Err("the tcp probe needs a port".into()));
        assert_eq!(host_and_port(&target(ProbeKind::Udp, None, Some(1))), Err("the udp probe needs a host".into()));
        assert_eq!(
            host_and_port(&target(ProbeKind::Tls, Some("h"), Some(70_000))),
            Err("port 70000 is outside 1 to 65535".into())
        );
        assert_eq!(target_label(&target(ProbeKind::Tls, Some("::1"), Some(443))), "[::1]:443");
        assert_eq!(target_label(&target(ProbeKind::Icmp, Some("h"), None)), "h");
        assert_eq!(host_and_port(&target(ProbeKind::Ssh, Some("h"), None)), Ok(("h", 22)));
        assert_eq!(target_label(&target(ProbeKind::Ssh, Some("h"), None)), "h:22");
        assert_eq!(target_label(&target(ProbeKind::Ssh, Some("h"), Some(2222))), "h:2222");
        assert_eq!(target_label(&target(ProbeKind::Http, None, None)), "");
    }

    #[tokio::test]
    async fn a_spent_budget_fails_every_probe_at_once() {
        let settings = ProbeSettings { budget: Arc::new(TrafficBudget::new(0)), ..ProbeSettings::default() };
        let targets = [target(ProbeKind::Dns, Some("localhost"), None), target(ProbeKind::Tcp, Some("h"), Some(1))];
        let results = run_once(&targets, 1, &settings).await;
        for result in results {
            assert_eq!(result.error.as_deref(), Some("the session's probe traffic cap of 0 bytes is spent"));
            assert!(result.timings.is_none(), "{result:?}");
        }
    }

    #[tokio::test]
    async fn the_default_policy_refuses_loopback_before_any_packet() {
        let refused = probe(&target(ProbeKind::Tcp, Some("127.0.0.1"), Some(9)), &ProbeSettings::default()).await;
        assert_eq!(refused.result.error.as_deref(), Some("refused by the pool's egress policy: 127.0.0.1 is loopback"));
        assert_eq!(refused.facts.egress_refused, Some("loopback"));
        let timings = refused.result.timings.unwrap();
        assert!(timings.dns_ms.is_none() && timings.connect_ms.is_none(), "{timings:?}");
    }

    #[tokio::test]
    async fn malformed_targets_fail_plainly() {
        let settings = ProbeSettings::default();
        let results =
            run_once(&[target(ProbeKind::Http, None, None), target(ProbeKind::Icmp, None, None)], 1, &settings).await;
        let errors: Vec<_> = results.iter().map(|result| (result.ok, result.error.as_deref().unwrap())).collect();
        assert_eq!(errors, [(false, "the http probe needs a url"), (false, "the icmp probe needs a host")]);
    }
}
