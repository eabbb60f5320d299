//! Escalation: what each tier runs, and when a run goes up a tier. Pure.
//!
//! - Tier 1 runs the session's targets as given.
//! - Tier 2 adds, derived from them: a traceroute to each host, a TLS check
//!   of each https URL's certificate, a UDP jitter series to each udp
//!   target, and a bandwidth sample from the first http target.
//! - Tier 3 adds the long download from the first http target.
//!
//! A run goes from tier 1 to 2 when a tier-1 rule trips (ping, loss, HTTP
//! time, DNS time), and from 2 to 3 when a tier-2 rule trips (bandwidth,
//! jitter, hops, certificate expiry), judged on everything the run measured.

use tidepool_crds::test_session::{ProbeKind, ProbeTarget};

use super::http::parse_url;
use super::outcome::ProbeOutcome;

/// The top tier.
pub const MAX_TIER: u8 = 3;
/// A download smaller than this says too little about bandwidth to judge by
/// (TCP is still ramping up): it is reported, not judged.
pub const MIN_JUDGED_BYTES: u64 = 1_000_000;

/// When to escalate; [`Default`] gives the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    /// Tier 1 → 2: mean ICMP round trip above this, in ms.
    pub ping_ms: f64,
    /// Tier 1 → 2: ICMP or UDP loss above this, percent.
    pub loss_percent: f64,
    /// Tier 1 → 2: an HTTP probe's total time above this, in ms.
    pub http_total_ms: f64,
    /// Tier 1 → 2: a DNS lookup above this, in ms.
    pub dns_ms: f64,
    /// Tier 2 → 3: a bandwidth sample below this, in Mbit/s.
    pub bandwidth_mbps: f64,
    /// Tier 2 → 3: jitter above this, in ms.
    pub jitter_ms: f64,
    /// Tier 2 → 3: more hops than this.
    pub hops: usize,
    /// Tier 2 → 3: a certificate expiring in fewer days than this.
    pub cert_days: f64,
}

impl From<tidepool_wire::token::ThresholdClaims> for Thresholds {
    fn from(claims: tidepool_wire::token::ThresholdClaims) -> Self {
        Self {
            ping_ms: f64::from(claims.ping_ms),
            loss_percent: f64::from(claims.loss_percent),
            http_total_ms: f64::from(claims.http_total_ms),
            dns_ms: f64::from(claims.dns_ms),
            bandwidth_mbps: f64::from(claims.bandwidth_kbps) / 1000.0,
            jitter_ms: f64::from(claims.jitter_ms),
            hops: claims.hops as usize,
            cert_days: f64::from(claims.cert_days),
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            ping_ms: 100.0,
            loss_percent: 5.0,
            http_total_ms: 2_000.0,
            dns_ms: 1_000.0,
            bandwidth_mbps: 10.0,
            jitter_ms: 50.0,
            hops: 20,
            cert_days: 7.0,
        }
    }
}

/// The worst of what a run measured, for the rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// The highest mean ICMP round trip.
    pub ping_ms: Option<f64>,
    /// The highest ICMP or UDP loss.
    pub loss_percent: Option<f64>,
    /// The slowest HTTP probe (downloads aside).
    pub http_total_ms: Option<f64>,
    /// The slowest DNS lookup, by a dns probe or on the way to another.
    pub dns_ms: Option<f64>,
    /// The slowest download of at least [`MIN_JUDGED_BYTES`].
    pub bandwidth_mbps: Option<f64>,
    /// The highest jitter of a series of at least two replies.
    pub jitter_ms: Option<f64>,
    /// The longest route.
    pub hops: Option<usize>,
    /// The certificate closest to expiry.
    pub cert_days: Option<f64>,
}

fn worst(current: Option<f64>, value: f64, higher_is_worse: bool) -> Option<f64> {
    Some(match current {
        Some(current) if higher_is_worse => current.max(value),
        Some(current) => current.min(value),
        None => value,
    })
}

impl Observations {
    pub fn from_outcomes(outcomes: &[ProbeOutcome]) -> Self {
        let mut seen = Self::default();
        for outcome in outcomes {
            let (result, facts) = (&outcome.result, &outcome.facts);
            if let Some(timings) = &result.timings {
                if let Some(dns) = timings.dns_ms {
                    seen.dns_ms = worst(seen.dns_ms, dns, true);
                }
                if result.kind == ProbeKind::Http && facts.download.is_none() {
                    seen.http_total_ms = worst(seen.http_total_ms, timings.total_ms, true);
                }
            }
            if let Some(rtt) = &facts.rtt {
                seen.loss_percent = worst(seen.loss_percent, rtt.loss_percent(), true);
                if result.kind == ProbeKind::Icmp && rtt.received > 0 {
                    seen.ping_ms = worst(seen.ping_ms, rtt.mean_ms, true);
                }
                if rtt.received >= 2 {
                    seen.jitter_ms = worst(seen.jitter_ms, rtt.jitter_ms, true);
                }
            }
            if result.kind == ProbeKind::Traceroute && !facts.hops.is_empty() {
                seen.hops = Some(seen.hops.unwrap_or(0).max(facts.hops.len()));
            }
            if let Some(days) = facts.cert_days_left {
                seen.cert_days = worst(seen.cert_days, days, false);
            }
            if let Some(download) = facts.download.as_ref().filter(|download| download.bytes >= MIN_JUDGED_BYTES) {
                seen.bandwidth_mbps = worst(seen.bandwidth_mbps, download.mbps(), false);
            }
        }
        seen
    }
}

/// Why a run in `tier` goes up a tier; empty when it stays.
pub fn escalation_reasons(tier: u8, seen: &Observations, limits: &Thresholds) -> Vec<String> {
    let mut reasons = Vec::new();
    let mut above = |value: Option<f64>, limit: f64, what: &str, unit: &str| {
        if let Some(value) = value.filter(|value| *value > limit) {
            reasons.push(format!("{what} {value:.1} {unit} > {limit} {unit}"));
        }
    };
    match tier {
        1 => {
            above(seen.ping_ms, limits.ping_ms, "ping", "ms");
            above(seen.loss_percent, limits.loss_percent, "loss", "%");
            above(seen.http_total_ms, limits.http_total_ms, "HTTP total", "ms");
            above(seen.dns_ms, limits.dns_ms, "DNS", "ms");
        }
        2 => {
            above(seen.jitter_ms, limits.jitter_ms, "jitter", "ms");
            if let Some(mbps) = seen.bandwidth_mbps.filter(|mbps| *mbps < limits.bandwidth_mbps) {
                reasons.push(format!("bandwidth {mbps:.1} Mbit/s < {} Mbit/s", limits.bandwidth_mbps));
            }
            if let Some(hops) = seen.hops.filter(|hops| *hops > limits.hops) {
                reasons.push(format!("{hops} hops > {}", limits.hops));
            }
            if let Some(days) = seen.cert_days.filter(|days| *days < limits.cert_days) {
                reasons.push(format!("certificate expires in {days:.1} days < {} days", limits.cert_days));
            }
        }
        _ => {}
    }
    reasons
}

/// One thing a tier runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Job {
    /// The probe the target's kind names.
    Probe(ProbeTarget),
    /// A UDP jitter series to a udp target.
    UdpJitter(ProbeTarget),
    /// A download from an http target's URL.
    Download { url: String, stage: Stage },
    /// Something the tier would run but cannot, and why: reported as a failed result.
    Unavailable { kind: ProbeKind, reason: &'static str },
}

/// Which download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Tier 2's bandwidth sample.
    Sample,
    /// Tier 3's long download.
    Long,
}

/// What `tier` adds to the tiers below it.
pub fn plan(targets: &[ProbeTarget], tier: u8) -> Vec<Job> {
    let first_url = targets.iter().find(|target| target.kind == ProbeKind::Http).and_then(|target| target.url.clone());
    let download = |stage, reason| match &first_url {
        Some(url) => Job::Download { url: url.clone(), stage },
        None => Job::Unavailable { kind: ProbeKind::Http, reason },
    };
    match tier {
        1 => targets.iter().cloned().map(Job::Probe).collect(),
        2 => {
            let mut jobs = Vec::new();
            let traced: Vec<&str> = targets
                .iter()
                .filter(|target| target.kind == ProbeKind::Traceroute)
                .filter_map(|target| target.host.as_deref())
                .collect();
            let mut hosts: Vec<String> = Vec::new();
            for host in targets.iter().filter_map(target_host) {
                if !traced.contains(&host.as_str()) && !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            jobs.extend(hosts.into_iter().map(|host| Job::Probe(target(ProbeKind::Traceroute, host, None))));
            let checked: Vec<(Option<&str>, Option<i32>)> = targets
                .iter()
                .filter(|target| target.kind == ProbeKind::Tls)
                .map(|target| (target.host.as_deref(), target.port))
                .collect();
            let mut https: Vec<(String, i32)> = Vec::new();
            for url in targets.iter().filter(|target| target.kind == ProbeKind::Http).filter_map(|t| t.url.as_deref()) {
                let Ok(url) = parse_url(url) else { continue };
                let endpoint = (url.host, i32::from(url.port));
                if url.https && !checked.contains(&(Some(&endpoint.0), Some(endpoint.1))) && !https.contains(&endpoint)
                {
                    https.push(endpoint);
                }
            }
            jobs.extend(https.into_iter().map(|(host, port)| Job::Probe(target(ProbeKind::Tls, host, Some(port)))));
            jobs.extend(targets.iter().filter(|target| target.kind == ProbeKind::Udp).cloned().map(Job::UdpJitter));
            jobs.push(download(Stage::Sample, "no http target to take the bandwidth sample from"));
            jobs
        }
        3 => vec![download(Stage::Long, "no http target for the long download")],
        _ => Vec::new(),
    }
}

/// The host a target reaches: its `host`, or its URL's.
fn target_host(target: &ProbeTarget) -> Option<String> {
    match target.kind {
        ProbeKind::Http => parse_url(target.url.as_deref()?).ok().map(|url| url.host),
        _ => target.host.clone(),
    }
}

fn target(kind: ProbeKind, host: String, port: Option<i32>) -> ProbeTarget {
    ProbeTarget { kind, url: None, host: Some(host), port }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::outcome::{Download, Hop, RttStats};

    #[test]
    fn the_default_rules_are_the_same_whether_the_pod_or_a_token_gives_them() {
        assert_eq!(Thresholds::from(tidepool_wire::token::ThresholdClaims::default()), Thresholds::default());
    }
    use tidepool_crds::test_session::ProbeTimings;

    fn outcome(kind: ProbeKind) -> ProbeOutcome {
        ProbeOutcome::new(kind, "t".into())
    }

    fn timed(kind: ProbeKind, dns_ms: Option<f64>, total_ms: f64) -> ProbeOutcome {
        let mut outcome = outcome(kind);
        outcome.result.timings = Some(ProbeTimings { dns_ms, total_ms, ..ProbeTimings::default() });
        outcome
    }

    fn pinged(rtts: &[f64], sent: u32) -> ProbeOutcome {
        let mut outcome = outcome(ProbeKind::Icmp);
        outcome.facts.rtt = Some(RttStats::new(sent, rtts));
        outcome
    }

    fn t(kind: ProbeKind, url: Option<&str>, host: Option<&str>, port: Option<i32>) -> ProbeTarget {
        ProbeTarget { kind, url: url.map(Into::into), host: host.map(Into::into), port }
    }

    #[test]
    fn quiet_runs_stay_in_tier_one() {
        let outcomes = [pinged(&[20.0, 22.0, 21.0, 20.0], 4), timed(ProbeKind::Http, Some(5.0), 300.0)];
        let seen = Observations::from_outcomes(&outcomes);
        assert_eq!(seen.ping_ms, Some(20.75));
        assert_eq!(seen.loss_percent, Some(0.0));
        assert_eq!(seen.http_total_ms, Some(300.0));
        assert!(escalation_reasons(1, &seen, &Thresholds::default()).is_empty());
        assert!(escalation_reasons(1, &Observations::default(), &Thresholds::default()).is_empty());
    }

    #[test]
    fn each_tier_one_rule_trips() {
        let limits = Thresholds::default();
        let reasons =
            |outcomes: &[ProbeOutcome]| escalation_reasons(1, &Observations::from_outcomes(outcomes), &limits);
        assert_eq!(reasons(&[pinged(&[150.0, 110.0], 2)]), ["ping 130.0 ms > 100 ms"]);
        assert_eq!(reasons(&[pinged(&[10.0; 3], 4)]), ["loss 25.0 % > 5 %"]);
        assert_eq!(reasons(&[pinged(&[], 4)]), ["loss 100.0 % > 5 %"]);
        assert_eq!(reasons(&[timed(ProbeKind::Http, None, 2_500.0)]), ["HTTP total 2500.0 ms > 2000 ms"]);
        assert_eq!(reasons(&[timed(ProbeKind::Dns, Some(1_200.0), 1_200.0)]), ["DNS 1200.0 ms > 1000 ms"]);
        assert_eq!(reasons(&[timed(ProbeKind::Tcp, Some(1_001.0), 1_050.0)]), ["DNS 1001.0 ms > 1000 ms"]);
        // At the threshold is not above it.
        assert!(reasons(&[pinged(&[100.0], 1), timed(ProbeKind::Http, Some(1_000.0), 2_000.0)]).is_empty());
        // Tier-2 rules do not move tier 1.
        assert!(reasons(&[pinged(&[1.0, 90.0, 1.0, 90.0], 4)]).is_empty());
    }

    #[test]
    fn each_tier_two_rule_trips() {
        let limits = Thresholds::default();
        let reasons =
            |outcomes: &[ProbeOutcome]| escalation_reasons(2, &Observations::from_outcomes(outcomes), &limits);
        assert_eq!(reasons(&[pinged(&[10.0, 80.0, 10.0], 3)]), ["jitter 70.0 ms > 50 ms"]);

        let mut slow = timed(ProbeKind::Http, Some(1.0), 9_000.0);
        slow.facts.download = Some(Download { bytes: 10_000_000, seconds: 10.0 });
        assert_eq!(reasons(&[slow.clone()]), ["bandwidth 8.0 Mbit/s < 10 Mbit/s"]);
        let mut tiny = slow.clone();
        tiny.facts.download = Some(Download { bytes: 100_000, seconds: 1.0 });
        assert!(reasons(&[tiny]).is_empty(), "a small download is not judged");
        assert!(escalation_reasons(1, &Observations::from_outcomes(&[slow]), &limits).is_empty(), "nor timed");

        let mut route = outcome(ProbeKind::Traceroute);
        route.facts.hops = (1..=21).map(|ttl| Hop { ttl, addr: None, rtt_ms: None }).collect();
        assert_eq!(reasons(&[route.clone()]), ["21 hops > 20"]);
        route.facts.hops.pop();
        assert!(reasons(&[route]).is_empty());

        let mut cert = outcome(ProbeKind::Tls);
        cert.facts.cert_days_left = Some(3.5);
        assert_eq!(reasons(&[cert.clone()]), ["certificate expires in 3.5 days < 7 days"]);
        cert.facts.cert_days_left = Some(-1.0);
        assert_eq!(reasons(&[cert]), ["certificate expires in -1.0 days < 7 days"]);
        assert!(
            escalation_reasons(3, &Observations { jitter_ms: Some(1e9), ..Default::default() }, &limits).is_empty()
        );
    }

    #[test]
    fn thresholds_are_configurable() {
        let seen = Observations { ping_ms: Some(30.0), ..Observations::default() };
        let strict = Thresholds { ping_ms: 25.0, ..Thresholds::default() };
        assert_eq!(escalation_reasons(1, &seen, &strict), ["ping 30.0 ms > 25 ms"]);
    }

    #[test]
    fn worst_values_win() {
        let mut near = outcome(ProbeKind::Tls);
        near.facts.cert_days_left = Some(2.0);
        let mut far = outcome(ProbeKind::Http);
        far.facts.cert_days_left = Some(200.0);
        let seen = Observations::from_outcomes(&[far, near, pinged(&[50.0], 1), pinged(&[70.0], 1)]);
        assert_eq!((seen.cert_days, seen.ping_ms), (Some(2.0), Some(70.0)));
    }

    #[test]
    fn tiers_plan_their_additions() {
        let targets = vec![
            t(ProbeKind::Http, Some("https://a.test/x"), None, None),
            t(ProbeKind::Http, Some("http://b.test:8080/"), None, None),
            t(ProbeKind::Tcp, None, Some("a.test"), Some(22)),
            t(ProbeKind::Udp, None, Some("c.test"), Some(9)),
            t(ProbeKind::Traceroute, None, Some("b.test"), None),
        ];
        assert_eq!(plan(&targets, 1), targets.iter().cloned().map(Job::Probe).collect::<Vec<_>>());
        assert_eq!(
            plan(&targets, 2),
            vec![
                Job::Probe(t(ProbeKind::Traceroute, None, Some("a.test"), None)),
                Job::Probe(t(ProbeKind::Traceroute, None, Some("c.test"), None)),
                Job::Probe(t(ProbeKind::Tls, None, Some("a.test"), Some(443))),
                Job::UdpJitter(targets[3].clone()),
                Job::Download { url: "https://a.test/x".into(), stage: Stage::Sample },
            ]
        );
        assert_eq!(plan(&targets, 3), vec![Job::Download { url: "https://a.test/x".into(), stage: Stage::Long }]);
        assert_eq!(plan(&targets, 4), vec![]);
    }

    #[test]
    fn tls_targets_are_not_checked_twice_and_downloads_need_http() {
        let targets =
            vec![t(ProbeKind::Tls, None, Some("a.test"), Some(443)), t(ProbeKind::Icmp, None, Some("a.test"), None)];
        assert_eq!(
            plan(&targets, 2),
            vec![
                Job::Probe(t(ProbeKind::Traceroute, None, Some("a.test"), None)),
                Job::Unavailable { kind: ProbeKind::Http, reason: "no http target to take the bandwidth sample from" },
            ]
        );
        let with_https = [targets, vec![t(ProbeKind::Http, Some("https://a.test/"), None, None)]].concat();
        assert!(!plan(&with_https, 2).iter().any(|job| matches!(job, Job::Probe(t) if t.kind == ProbeKind::Tls)));
    }
}
