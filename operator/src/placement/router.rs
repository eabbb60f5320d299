//! The resource-aware router: filters backends that have room for a tier,
//! scores the rest (lowest wins), and reserves the tier on the winner until
//! the agent's reports can show it.
//!
//! It follows the reference router and goes further in three places:
//! pending picks also raise a backend's score (not only its filter), so a
//! burst spreads instead of piling onto the first winner; ties are broken
//! at random; and with many backends it samples two candidates and keeps
//! the better (power of two choices) instead of scanning them all.
//!
//! No I/O and no clock of its own: callers pass `now`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use tidepool_crds::warm_pool::{PlacementWeights, Tier};
use tidepool_wire::report::{AgentReport, Coordinates};

use super::view::{BackendView, Health, Probes, distance_km};

/// What one session needs from a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Need {
    pub vcpu: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub gpus: u32,
    pub gpu_memory_bytes: u64,
}

impl From<&Tier> for Need {
    fn from(tier: &Tier) -> Self {
        let positive = |v: i64| u64::try_from(v).unwrap_or(0);
        Self {
            vcpu: u32::try_from(tier.vcpu).unwrap_or(0),
            memory_bytes: positive(tier.memory_mib) << 20,
            disk_bytes: positive(tier.disk_gib) << 30,
            gpus: u32::try_from(tier.gpus).unwrap_or(0),
            gpu_memory_bytes: positive(tier.gpu_memory_mib) << 20,
        }
    }
}

/// One placement question.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub need: Need,
    pub weights: &'a PlacementWeights,
    /// Where the client is, for the distance term.
    pub client: Option<Coordinates>,
    /// Sessions with the same key reuse a backend while it stays good.
    pub sticky: Option<&'a str>,
    /// A repeated sticky key and need replaces its own reservation instead
    /// of adding one: right for a client asking again (the route API), wrong
    /// for distinct sessions sharing a key, which each take room.
    pub replaces_own: bool,
}

/// The router's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub backend: String,
    pub score: f64,
    /// The pick reused the sticky key's backend.
    pub sticky: bool,
    /// How old the router's view of the backend was, by the operator's clock.
    pub view_age: Duration,
    /// When the pick was made, to release it by.
    pub at: Instant,
}

/// Why nothing fits, counted over the backends considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoFit {
    pub considered: u32,
    pub stale: u32,
    pub unhealthy: u32,
    pub cpu: u32,
    pub memory: u32,
    pub disk: u32,
    pub gpu: u32,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.considered == 0 {
            return write!(f, "no backend has reported");
        }
        write!(f, "none of {} backends fits:", self.considered)?;
        let parts = [
            (self.stale, "stale"),
            (self.unhealthy, "unhealthy"),
            (self.cpu, "short of idle cores"),
            (self.memory, "short of memory"),
            (self.disk, "short of disk"),
            (self.gpu, "short of GPUs or GPU memory"),
        ];
        let mut first = true;
        for (count, why) in parts.into_iter().filter(|(count, _)| *count > 0) {
            write!(f, "{} {count} {why}", if first { "" } else { "," })?;
            first = false;
        }
        Ok(())
    }
}

/// The router's knobs.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    /// A backend whose agent has missed this many reports is stale.
    pub stale_after_reports: u32,
    /// A pending pick is forgotten after this long even if no report shows it.
    pub pending_timeout: Duration,
    /// With more eligible backends than this, sample two instead of scanning.
    pub two_choices_above: usize,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self { stale_after_reports: 3, pending_timeout: Duration::from_secs(120), two_choices_above: 64 }
    }
}

/// A pick the reports cannot show yet.
#[derive(Clone, Debug)]
struct Pending {
    need: Need,
    at: Instant,
    sticky: Option<String>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    vcpu: u32,
    memory_bytes: u64,
    disk_bytes: u64,
    gpus: u32,
    gpu_memory_bytes: u64,
}

impl Totals {
    fn of(pending: &[Pending]) -> Self {
        pending.iter().fold(Self::default(), |t, p| Self {
            vcpu: t.vcpu.saturating_add(p.need.vcpu),
            memory_bytes: t.memory_bytes.saturating_add(p.need.memory_bytes),
            disk_bytes: t.disk_bytes.saturating_add(p.need.disk_bytes),
            gpus: t.gpus.saturating_add(p.need.gpus),
            gpu_memory_bytes: t.gpu_memory_bytes.saturating_add(p.need.gpu_memory_bytes),
        })
    }
}

struct Entry {
    view: BackendView,
    pending: Vec<Pending>,
    totals: Totals,
}

impl Entry {
    fn recount(&mut self) {
        self.totals = Totals::of(&self.pending);
    }
}

/// A sticky key's backends: one per need, and the latest for affinity across tiers.
#[derive(Clone, Debug, Default)]
struct Sticky {
    per_need: Vec<(Need, String)>,
    latest: String,
    used: Option<Instant>,
}

/// Sticky keys kept at most; past this the least recently used half goes.
const STICKY_CAPACITY: usize = 100_000;

/// Every backend's view, their pending picks, and the sticky keys.
pub struct Router {
    settings: RouterSettings,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    sticky: HashMap<String, Sticky>,
    rng: u64,
}

impl Router {
    pub fn new(settings: RouterSettings) -> Self {
        Self::with_seed(settings, RandomState::new().hash_one(0u8))
    }

    /// A router whose tie-breaks and samples repeat, for tests.
    pub fn with_seed(settings: RouterSettings, seed: u64) -> Self {
        Self { settings, entries: Vec::new(), by_name: HashMap::new(), sticky: HashMap::new(), rng: seed }
    }

    pub fn settings(&self) -> &RouterSettings {
        &self.settings
    }

    /// Folds in a validated report. Pending picks old enough for this report
    /// to show them are released. Returns true for a backend seen first.
    pub fn ingest(&mut self, report: AgentReport, now: Instant) -> bool {
        match self.by_name.get(&report.backend) {
            Some(&i) => {
                let entry = &mut self.entries[i];
                let probes = std::mem::take(&mut entry.view.probes);
                entry.view = BackendView::from_report(report, now, probes);
                let shown_after = Duration::from_secs(u64::from(entry.view.window_seconds));
                let timeout = self.settings.pending_timeout;
                let before = entry.pending.len();
                entry.pending.retain(|p| {
                    let age = now.saturating_duration_since(p.at);
                    age < shown_after && age < timeout
                });
                if entry.pending.len() != before {
                    entry.recount();
                }
                false
            }
            None => {
                let name = report.backend.clone();
                let view = BackendView::from_report(report, now, Probes::default());
                self.by_name.insert(name, self.entries.len());
                self.entries.push(Entry { view, pending: Vec::new(), totals: Totals::default() });
                true
            }
        }
    }

    /// Forgets a backend (its node or Backend is gone).
    pub fn remove(&mut self, name: &str) {
        let Some(i) = self.by_name.remove(name) else { return };
        self.entries.swap_remove(i);
        if let Some(moved) = self.entries.get(i) {
            self.by_name.insert(moved.view.name.clone(), i);
        }
        self.drop_sticky_to(name);
    }

    /// Gives back a pick that was not used (its claim failed, or its pod
    /// could not be made), so it does not hold room until it times out.
    pub fn release(&mut self, pick: &Pick, need: Need) {
        let Some(&i) = self.by_name.get(&pick.backend) else { return };
        let entry = &mut self.entries[i];
        if let Some(at) = entry.pending.iter().rposition(|p| p.need == need && p.at == pick.at) {
            entry.pending.remove(at);
            entry.recount();
        }
    }

    /// Forgets backends whose agent has not reported for `after`: gone nodes
    /// and retired servers. Returns their names.
    pub fn evict_silent(&mut self, now: Instant, after: Duration) -> Vec<String> {
        let silent: Vec<String> = self
            .entries
            .iter()
            .filter(|e| now.saturating_duration_since(e.view.received) > after)
            .map(|e| e.view.name.clone())
            .collect();
        for name in &silent {
            self.remove(name);
        }
        silent
    }

    /// Drops pending picks past their timeout.
    pub fn sweep(&mut self, now: Instant) {
        let timeout = self.settings.pending_timeout;
        for entry in &mut self.entries {
            let before = entry.pending.len();
            entry.pending.retain(|p| now.saturating_duration_since(p.at) < timeout);
            if entry.pending.len() != before {
                entry.recount();
            }
        }
    }

    /// Folds in one health probe; returns the new verdict when it changed.
    /// An unhealthy backend loses its sticky keys.
    pub fn observe_probe(&mut self, name: &str, outcome: Option<f64>) -> Option<Health> {
        let &i = self.by_name.get(name)?;
        let probes = &mut self.entries[i].view.probes;
        if !probes.observe(outcome) {
            return None;
        }
        let health = probes.health;
        if health == Health::Unhealthy {
            self.drop_sticky_to(name);
        }
        Some(health)
    }

    pub fn view(&self, name: &str) -> Option<&BackendView> {
        self.by_name.get(name).map(|&i| &self.entries[i].view)
    }

    pub fn views(&self) -> impl Iterator<Item = &BackendView> {
        self.entries.iter().map(|e| &e.view)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Picks not yet shown by a backend's reports.
    pub fn pending(&self, name: &str) -> usize {
        self.by_name.get(name).map_or(0, |&i| self.entries[i].pending.len())
    }

    /// Whether the backend's agent is reporting on time.
    pub fn is_fresh(&self, view: &BackendView, now: Instant) -> bool {
        let limit = Duration::from_millis(u64::from(view.interval_ms) * u64::from(self.settings.stale_after_reports));
        now.saturating_duration_since(view.received) <= limit
    }

    /// Chooses among every backend and reserves the need on the winner.
    pub fn route(&mut self, request: &Request<'_>, now: Instant) -> Result<Pick, NoFit> {
        self.route_within(request, now, |_| true)
    }

    /// Chooses among the backends `allowed` admits (for example the nodes
    /// that hold a pool's warm pods) and reserves the need on the winner.
    pub fn route_within(
        &mut self,
        request: &Request<'_>,
        now: Instant,
        allowed: impl Fn(&BackendView) -> bool,
    ) -> Result<Pick, NoFit> {
        if let Some(pick) = self.sticky_pick(request, now, &allowed) {
            return Ok(pick);
        }
        let chosen = if self.entries.len() > self.settings.two_choices_above {
            self.two_choices(request, now, &allowed).or_else(|| self.scan(request, now, &allowed).ok())
        } else {
            None
        };
        let (index, score) = match chosen {
            Some(found) => found,
            None => self.scan(request, now, &allowed)?,
        };
        Ok(self.commit(index, score, request, now, false))
    }

    fn commit(&mut self, index: usize, score: f64, request: &Request<'_>, now: Instant, sticky: bool) -> Pick {
        let entry = &mut self.entries[index];
        let key = request.sticky.map(str::to_owned);
        if let Some(key) = &key
            && request.replaces_own
        {
            entry.pending.retain(|p| !(p.need == request.need && p.sticky.as_ref() == Some(key)));
        }
        entry.pending.push(Pending { need: request.need, at: now, sticky: key });
        entry.recount();
        let backend = entry.view.name.clone();
        let view_age = now.saturating_duration_since(entry.view.received);
        if let Some(key) = request.sticky {
            self.remember_sticky(key, request.need, &backend, now);
        }
        Pick { backend, score, sticky, view_age, at: now }
    }

    fn sticky_pick(
        &mut self,
        request: &Request<'_>,
        now: Instant,
        allowed: &impl Fn(&BackendView) -> bool,
    ) -> Option<Pick> {
        let key = request.sticky?;
        let remembered = self.sticky.get(key)?;
        let same_need = remembered.per_need.iter().find(|(need, _)| *need == request.need).map(|(_, b)| b.clone());
        let mut tried = Vec::with_capacity(2);
        for name in same_need.into_iter().chain([remembered.latest.clone()]) {
            let Some(&i) = self.by_name.get(&name) else { continue };
            if tried.contains(&name) || !allowed(&self.entries[i].view) {
                continue;
            }
            tried.push(name);
            // A request that replaces its own earlier reservation must not be kept out by it.
            let own = Totals::of(
                &self.entries[i]
                    .pending
                    .iter()
                    .filter(|p| !(request.replaces_own && p.need == request.need && p.sticky.as_deref() == Some(key)))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let entry = &self.entries[i];
            if self.check(entry, &own, request.need, now).is_ok() {
                let score = score(&entry.view, &own, request);
                return Some(self.commit(i, score, request, now, true));
            }
        }
        None
    }

    /// Learns a sticky key's backend from a session that carries it, bound
    /// there at `assigned`: so a key outlives the replica that picked it
    /// (a new leader learns every key from the session cache). A newer
    /// assignment replaces what is known; an older one changes nothing.
    pub fn learn_sticky(&mut self, key: &str, backend: &str, assigned: Instant) {
        if let Some(known) = self.sticky.get_mut(key) {
            if known.used.is_some_and(|used| used >= assigned) {
                return;
            }
            // What the key had for other tiers is older than this assignment.
            known.per_need.retain(|(_, b)| b == backend);
            known.latest = backend.to_owned();
            known.used = Some(assigned);
            return;
        }
        self.make_room_for_sticky(key);
        let learned = Sticky { per_need: Vec::new(), latest: backend.to_owned(), used: Some(assigned) };
        self.sticky.insert(key.to_owned(), learned);
    }

    /// The backend a sticky key goes to first, if it has one.
    pub fn sticky_backend(&self, key: &str) -> Option<&str> {
        self.sticky.get(key).map(|s| s.latest.as_str())
    }

    fn make_room_for_sticky(&mut self, key: &str) {
        if self.sticky.len() >= STICKY_CAPACITY && !self.sticky.contains_key(key) {
            let mut ages: Vec<Instant> = self.sticky.values().filter_map(|s| s.used).collect();
            ages.sort_unstable();
            if let Some(&cut) = ages.get(ages.len() / 2) {
                self.sticky.retain(|_, s| s.used.is_some_and(|u| u > cut));
            }
        }
    }

    fn remember_sticky(&mut self, key: &str, need: Need, backend: &str, now: Instant) {
        self.make_room_for_sticky(key);
        let entry = self.sticky.entry(key.to_owned()).or_default();
        match entry.per_need.iter_mut().find(|(n, _)| *n == need) {
            Some(slot) => slot.1 = backend.to_owned(),
            None => entry.per_need.push((need, backend.to_owned())),
        }
        entry.latest = backend.to_owned();
        entry.used = Some(now);
    }

    fn drop_sticky_to(&mut self, backend: &str) {
        self.sticky.retain(|_, s| {
            s.per_need.retain(|(_, b)| b != backend);
            match s.per_need.last() {
                Some((_, b)) if s.latest == backend => {
                    s.latest = b.clone();
                    true
                }
                _ => s.latest != backend,
            }
        });
    }

    fn check(&self, entry: &Entry, pending: &Totals, need: Need, now: Instant) -> Result<(), Shortfall> {
        let view = &entry.view;
        if !self.is_fresh(view, now) {
            return Err(Shortfall::Stale);
        }
        if view.probes.health == Health::Unhealthy {
            return Err(Shortfall::Unhealthy);
        }
        if view.idle_cores.saturating_sub(pending.vcpu) < need.vcpu {
            return Err(Shortfall::Cpu);
        }
        if view.memory_free.saturating_sub(pending.memory_bytes) < need.memory_bytes {
            return Err(Shortfall::Memory);
        }
        if view.disk_free.saturating_sub(pending.disk_bytes) < need.disk_bytes {
            return Err(Shortfall::Disk);
        }
        if need.gpus > 0
            && (view.idle_gpus.saturating_sub(pending.gpus) < need.gpus
                || view.gpu_memory_free.saturating_sub(pending.gpu_memory_bytes) < need.gpu_memory_bytes)
        {
            return Err(Shortfall::Gpu);
        }
        Ok(())
    }

    /// Every allowed backend, lowest score wins, equal scores at random.
    fn scan(
        &mut self,
        request: &Request<'_>,
        now: Instant,
        allowed: &impl Fn(&BackendView) -> bool,
    ) -> Result<(usize, f64), NoFit> {
        let mut best: Option<(usize, f64)> = None;
        let mut ties = 0u64;
        let mut no_fit = NoFit::default();
        for (i, entry) in self.entries.iter().enumerate() {
            if !allowed(&entry.view) {
                continue;
            }
            no_fit.considered += 1;
            if let Err(why) = self.check(entry, &entry.totals, request.need, now) {
                why.count(&mut no_fit);
                continue;
            }
            let s = score(&entry.view, &entry.totals, request);
            match best {
                Some((_, b)) if s > b => {}
                Some((_, b)) if s == b => {
                    ties += 1;
                    // Reservoir sampling: each of the tied keeps an equal chance.
                    if next(&mut self.rng).is_multiple_of(ties + 1) {
                        best = Some((i, s));
                    }
                }
                _ => {
                    best = Some((i, s));
                    ties = 0;
                }
            }
        }
        best.ok_or(no_fit)
    }

    /// Samples allowed backends until two fit and keeps the better; None
    /// when too few fit among the samples (the caller scans instead).
    fn two_choices(
        &mut self,
        request: &Request<'_>,
        now: Instant,
        allowed: &impl Fn(&BackendView) -> bool,
    ) -> Option<(usize, f64)> {
        let mut found: [Option<(usize, f64)>; 2] = [None, None];
        let mut got = 0;
        for _ in 0..16 {
            let i = (next(&mut self.rng) % self.entries.len() as u64) as usize;
            let entry = &self.entries[i];
            if found[0].is_some_and(|(j, _)| j == i) || !allowed(&entry.view) {
                continue;
            }
            if self.check(entry, &entry.totals, request.need, now).is_err() {
                continue;
            }
            found[got] = Some((i, score(&entry.view, &entry.totals, request)));
            got += 1;
            if got == 2 {
                break;
            }
        }
        match found {
            [Some(a), Some(b)] => Some(if b.1 < a.1 { b } else { a }),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Shortfall {
    Stale,
    Unhealthy,
    Cpu,
    Memory,
    Disk,
    Gpu,
}

impl Shortfall {
    fn count(self, no_fit: &mut NoFit) {
        let slot = match self {
            Self::Stale => &mut no_fit.stale,
            Self::Unhealthy => &mut no_fit.unhealthy,
            Self::Cpu => &mut no_fit.cpu,
            Self::Memory => &mut no_fit.memory,
            Self::Disk => &mut no_fit.disk,
            Self::Gpu => &mut no_fit.gpu,
        };
        *slot += 1;
    }
}

/// Lower is better: distance, the least loaded cores a session would get,
/// memory use, GPU use for GPU tiers, and probe latency, each weighted.
/// Pending picks count as load, so a burst spreads.
fn score(view: &BackendView, pending: &Totals, request: &Request<'_>) -> f64 {
    let w = request.weights;
    let need = request.need;
    let cores = view.cores_by_load.len().max(1) as f64;
    let mut total = 0.0;
    if let (Some(client), Some(here)) = (request.client, view.coordinates) {
        total += w.distance * distance_km(client, here);
    }
    let cpu =
        f64::from(view.least_loaded_mean(pending.vcpu, need.vcpu.max(1))) + 100.0 * f64::from(pending.vcpu) / cores;
    total += w.cpu * cpu;
    total += w.memory * f64::from(view.memory_percent(pending.memory_bytes));
    if need.gpus > 0 {
        let gpus = view.report.capacity.gpus.len().max(1) as f64;
        let gpu = (f64::from(view.gpu_percent) + 100.0 * f64::from(pending.gpus) / gpus).min(100.0);
        total += w.gpu * gpu;
    }
    total += w.latency * view.probes.latency_ms.unwrap_or(0.0);
    total
}

/// SplitMix64: a tiny, fast generator; placement needs spread, not secrecy.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_wire::report::{Capacity, Gpu, GpuWindow, ReportKind, Window};

    fn report(name: &str, cores: usize, load: f32, memory_percent: u64) -> AgentReport {
        let memory: u64 = 256 << 30;
        AgentReport::new(
            name,
            ReportKind::Node,
            Capacity { cores: cores as u32, memory_bytes: memory, disk_bytes: 1 << 40, gpus: vec![] },
            vec![Window {
                seconds: 10,
                samples: 10,
                cores: vec![load; cores],
                memory_used_bytes: memory / 100 * memory_percent,
                ..Window::default()
            }],
        )
    }

    fn with_gpus(mut r: AgentReport, utilization: &[f32]) -> AgentReport {
        r.capacity.gpus = (0..utilization.len())
            .map(|i| Gpu { index: i as u32, model: "Fake".into(), memory_bytes: 16 << 30 })
            .collect();
        r.windows[0].gpus = utilization
            .iter()
            .map(|&u| GpuWindow { utilization_percent: u, memory_used_bytes: 1 << 30, ..GpuWindow::default() })
            .collect();
        r
    }

    const SMALL: Need = Need { vcpu: 1, memory_bytes: 1 << 30, disk_bytes: 0, gpus: 0, gpu_memory_bytes: 0 };

    fn request(need: Need, weights: &PlacementWeights) -> Request<'_> {
        Request { need, weights, client: None, sticky: None, replaces_own: false }
    }

    #[test]
    fn the_least_loaded_backend_wins() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("busy", 8, 60.0, 70), now);
        router.ingest(report("idle", 8, 5.0, 10), now);
        router.ingest(report("mid", 8, 30.0, 40), now);
        let weights = PlacementWeights::default();
        let pick = router.route(&request(SMALL, &weights), now).unwrap();
        assert_eq!(pick.backend, "idle");
        assert!((pick.score - 15.0).abs() < 1e-6, "{}", pick.score);
        assert_eq!(router.pending("idle"), 1);
    }

    #[test]
    fn filters_name_what_is_short() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("hot", 2, 95.0, 10), now);
        router.ingest(report("full", 8, 5.0, 100), now);
        router.ingest(report("old", 8, 5.0, 10), now - Duration::from_secs(10));
        let weights = PlacementWeights::default();
        let err = router.route(&request(SMALL, &weights), now).unwrap_err();
        assert_eq!(err, NoFit { considered: 3, stale: 1, cpu: 1, memory: 1, ..NoFit::default() });
        assert_eq!(err.to_string(), "none of 3 backends fits: 1 stale, 1 short of idle cores, 1 short of memory");
        assert_eq!(
            Router::new(RouterSettings::default()).route(&request(SMALL, &weights), now).unwrap_err().to_string(),
            "no backend has reported"
        );
    }

    #[test]
    fn pending_picks_fill_a_backend_until_reports_show_them() {
        let start = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("only", 2, 0.0, 0), start);
        let weights = PlacementWeights::default();
        assert!(router.route(&request(SMALL, &weights), start).is_ok());
        assert!(router.route(&request(SMALL, &weights), start).is_ok());
        let err = router.route(&request(SMALL, &weights), start).unwrap_err();
        assert_eq!(err.cpu, 1);
        // A report received before the window covers the picks keeps them.
        router.ingest(report("only", 2, 0.0, 0), start + Duration::from_secs(5));
        assert_eq!(router.pending("only"), 2);
        // One received a full window later shows them: they are released.
        router.ingest(report("only", 2, 0.0, 0), start + Duration::from_secs(10));
        assert_eq!(router.pending("only"), 0);
        // The timeout releases them too.
        let later = start + Duration::from_secs(11);
        router.route(&request(SMALL, &weights), later).unwrap();
        router.sweep(later + Duration::from_secs(121));
        assert_eq!(router.pending("only"), 0);
    }

    #[test]
    fn unused_picks_are_given_back_and_silent_backends_forgotten() {
        let start = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("a", 2, 0.0, 0), start);
        let weights = PlacementWeights::default();
        let first = router.route(&request(SMALL, &weights), start).unwrap();
        let second = router.route(&request(SMALL, &weights), start + Duration::from_millis(1)).unwrap();
        assert_eq!(router.pending("a"), 2);
        router.release(&first, SMALL);
        assert_eq!(router.pending("a"), 1);
        // Releasing twice, or a pick it never made, changes nothing.
        router.release(&first, SMALL);
        assert_eq!(router.pending("a"), 1);
        router.release(&second, SMALL);
        assert_eq!(router.pending("a"), 0);
        router.ingest(report("b", 2, 0.0, 0), start + Duration::from_secs(600));
        let gone = router.evict_silent(start + Duration::from_secs(601), Duration::from_secs(300));
        assert_eq!(gone, ["a"]);
        assert!(router.view("a").is_none() && router.view("b").is_some());
    }

    #[test]
    fn a_burst_spreads_over_equal_backends() {
        // The herd check: 1,000 picks over 10 equal backends with
        // frozen metrics spread with max/mean <= 1.1.
        let now = Instant::now();
        let mut router = Router::new(RouterSettings::default());
        for b in 0..10 {
            router.ingest(report(&format!("b{b}"), 256, 20.0, 20), now);
        }
        let weights = PlacementWeights::default();
        let started = Instant::now();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..1000 {
            *counts.entry(router.route(&request(SMALL, &weights), now).unwrap().backend).or_default() += 1;
        }
        let elapsed = started.elapsed();
        let max = *counts.values().max().unwrap();
        assert_eq!(counts.len(), 10);
        assert!(f64::from(max) / 100.0 <= 1.1, "max {max} of 1000 over 10: {counts:?}");
        assert!(elapsed < Duration::from_millis(100), "1,000 placements took {elapsed:?}");
    }

    #[test]
    fn ties_go_either_way() {
        let now = Instant::now();
        let weights = PlacementWeights { memory: 0.0, cpu: 0.0, ..PlacementWeights::default() };
        let mut winners = std::collections::HashSet::new();
        for seed in 0..32 {
            let mut router = Router::with_seed(RouterSettings::default(), seed);
            router.ingest(report("a", 4, 10.0, 10), now);
            router.ingest(report("b", 4, 10.0, 10), now);
            winners.insert(router.route(&request(SMALL, &weights), now).unwrap().backend);
        }
        assert_eq!(winners.len(), 2);
    }

    #[test]
    fn gpu_tiers_land_only_where_gpus_are_free() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("cpu-only", 64, 0.0, 0), now);
        router.ingest(with_gpus(report("gpu-busy", 8, 50.0, 50), &[95.0, 90.0]), now);
        router.ingest(with_gpus(report("gpu", 8, 50.0, 50), &[10.0, 95.0]), now);
        let weights = PlacementWeights::default();
        let need = Need { gpus: 1, gpu_memory_bytes: 8 << 30, ..SMALL };
        assert_eq!(router.route(&request(need, &weights), now).unwrap().backend, "gpu");
        // Its one idle GPU is now pending: the next GPU session waits.
        let err = router.route(&request(need, &weights), now).unwrap_err();
        assert_eq!(err.gpu, 3);
        // CPU tiers still prefer the idle CPU backend.
        assert_eq!(router.route(&request(SMALL, &weights), now).unwrap().backend, "cpu-only");
    }

    #[test]
    fn distance_and_latency_count() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        let mut near = report("near", 8, 10.0, 10);
        near.coordinates = Some(Coordinates { latitude: 48.85, longitude: 2.35 });
        let mut far = report("far", 8, 0.0, 0);
        far.coordinates = Some(Coordinates { latitude: 40.71, longitude: -74.0 });
        router.ingest(near, now);
        router.ingest(far, now);
        let weights = PlacementWeights::default();
        let mut req = request(SMALL, &weights);
        req.client = Some(Coordinates { latitude: 51.5, longitude: -0.12 });
        assert_eq!(router.route(&req, now).unwrap().backend, "near");
        // Slow probes push a backend down.
        for _ in 0..2 {
            router.observe_probe("near", Some(10_000.0));
        }
        assert_eq!(router.route(&req, now).unwrap().backend, "far");
    }

    #[test]
    fn sticky_keys_reuse_a_backend_while_it_is_good() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("a", 8, 10.0, 10), now);
        router.ingest(report("b", 8, 20.0, 20), now);
        let weights = PlacementWeights::default();
        let mut req = request(SMALL, &weights);
        req.sticky = Some("user-1");
        req.replaces_own = true;
        let first = router.route(&req, now).unwrap();
        assert_eq!((first.backend.as_str(), first.sticky), ("a", false));
        // Make b the better one: the key still goes to a.
        router.ingest(report("a", 8, 50.0, 50), now);
        let again = router.route(&req, now).unwrap();
        assert_eq!((again.backend.as_str(), again.sticky), ("a", true));
        // A repeated key and tier replaces its own reservation.
        assert_eq!(router.pending("a"), 1);
        // Affinity across tiers: a bigger tier from the same key goes to a too.
        let bigger = Request { need: Need { vcpu: 2, ..SMALL }, ..req.clone() };
        assert_eq!(router.route(&bigger, now).unwrap().backend, "a");
        // Distinct sessions sharing a key each take room.
        let session = Request { replaces_own: false, ..req.clone() };
        router.route(&session, now).unwrap();
        assert_eq!(router.pending("a"), 3);
        // An unhealthy backend loses its keys.
        for _ in 0..3 {
            router.observe_probe("a", None);
        }
        let moved = router.route(&req, now).unwrap();
        assert_eq!((moved.backend.as_str(), moved.sticky), ("b", false));
    }

    #[test]
    fn learned_sticky_keys_follow_the_newest_assignment() {
        let now = Instant::now();
        let earlier = now - Duration::from_secs(60);
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("a", 8, 10.0, 10), now);
        router.ingest(report("b", 8, 50.0, 50), now);
        let weights = PlacementWeights::default();
        let mut req = request(SMALL, &weights);
        req.sticky = Some("user-1");
        // Learned from a session a former leader bound to b: the key goes
        // to b, though a is less loaded.
        router.learn_sticky("user-1", "b", earlier);
        let pick = router.route(&req, now).unwrap();
        assert_eq!((pick.backend.as_str(), pick.sticky), ("b", true));
        // An older session (seen later) changes nothing.
        router.learn_sticky("user-1", "a", earlier - Duration::from_secs(1));
        assert_eq!(router.sticky_backend("user-1"), Some("b"));
        // A newer one moves the key, its tiers' earlier picks included.
        router.learn_sticky("user-1", "a", now + Duration::from_secs(1));
        assert_eq!(router.sticky_backend("user-1"), Some("a"));
        assert_eq!(router.route(&req, now).unwrap().backend, "a");
        // A learned key whose backend is not known yet falls through to a normal pick.
        router.learn_sticky("user-2", "gone", now);
        req.sticky = Some("user-2");
        let pick = router.route(&req, now).unwrap();
        assert_eq!((pick.backend.as_str(), pick.sticky), ("a", false));
    }

    #[test]
    fn two_choices_with_many_backends() {
        let now = Instant::now();
        let settings = RouterSettings { two_choices_above: 8, ..RouterSettings::default() };
        let mut router = Router::with_seed(settings, 7);
        for b in 0..100 {
            router.ingest(report(&format!("b{b}"), 16, b as f32 / 2.0, 10), now);
        }
        let weights = PlacementWeights::default();
        let mut sum = 0usize;
        for _ in 0..200 {
            let pick = router.route(&request(SMALL, &weights), now).unwrap();
            sum += pick.backend[1..].parse::<usize>().unwrap();
        }
        // The better of two random backends averages well below the middle.
        assert!(sum / 200 < 45, "mean index {}", sum / 200);
        // When only one backend fits, sampling falls back to the scan.
        let mut router = Router::with_seed(RouterSettings { two_choices_above: 8, ..RouterSettings::default() }, 7);
        for b in 0..100 {
            router.ingest(report(&format!("b{b}"), 16, if b == 42 { 0.0 } else { 99.0 }, 10), now);
        }
        assert_eq!(router.route(&request(SMALL, &weights), now).unwrap().backend, "b42");
    }

    #[test]
    fn route_within_keeps_to_the_allowed() {
        let now = Instant::now();
        let mut router = Router::with_seed(RouterSettings::default(), 1);
        router.ingest(report("a", 8, 10.0, 10), now);
        router.ingest(report("b", 8, 50.0, 50), now);
        let weights = PlacementWeights::default();
        let pick = router.route_within(&request(SMALL, &weights), now, |v| v.name == "b").unwrap();
        assert_eq!(pick.backend, "b");
        router.remove("a");
        assert_eq!(router.len(), 1);
        assert!(router.view("b").is_some());
    }
}
