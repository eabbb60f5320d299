//! What a run prints: an aligned table for people, JSON for programs.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{Grade, ProbeResult, Profile, SessionResults, Severity};
use tidepool_protocol::stored::ResultsPage;

/// A run's outcome: where it ran and what it measured. Its JSON is the
/// `SessionResults` of the TestSession's status with these fields beside
/// them, so it also reads back as `SessionResults`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The TestSession.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The Backend placement chose, its region, and how far it is from the
    /// client (when both have coordinates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
    pub endpoint: String,
    pub profile: Profile,
    /// Whether the operator took the results into the TestSession; absent
    /// when they were not submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<bool>,
    #[serde(flatten)]
    pub results: SessionResults,
}

/// The report as pretty JSON.
pub fn json(report: &Report) -> String {
    // A tree of plain structs, strings and finite numbers always serialises.
    serde_json::to_string_pretty(report).unwrap_or_default()
}

/// The report as aligned tables; grades in colour when `color`.
pub fn table(report: &Report, color: bool) -> String {
    let mut sections = vec![session_table(report).render(color)];
    let results = &report.results;
    let figures = figures_table(results);
    if !figures.rows.is_empty() {
        sections.push(figures.render(color));
    }
    if !results.household.is_empty() {
        sections.push(household_table(results).render(color));
    }
    if !results.probes.is_empty() {
        sections.push(probes_table(&results.probes).render(color));
    }
    let grades = grades_table(results);
    if !grades.rows.is_empty() {
        sections.push(grades.render(color));
    }
    sections.join("\n")
}

/// `node-2 in eu-west, 340 km away`: which backend, where, how far.
fn served_by(report: &Report) -> Option<String> {
    let mut line = report.backend.clone()?;
    if let Some(region) = &report.region {
        line.push_str(&format!(" in {region}"));
    }
    if let Some(km) = report.distance_km {
        line.push_str(&format!(", {km:.0} km away"));
    }
    Some(line)
}

fn session_table(report: &Report) -> Table {
    let mut table = Table::new(&[Align::Left, Align::Left]);
    if let Some(name) = &report.name {
        let name = match &report.namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.clone(),
        };
        table.row(["session".into(), name.into()]);
    }
    if let Some(pod) = &report.pod {
        let pod = match &report.node {
            Some(node) => format!("{pod} on {node}"),
            None => pod.clone(),
        };
        table.row(["pod".into(), pod.into()]);
    }
    if let Some(served) = served_by(report) {
        table.row(["served by".into(), served.into()]);
    }
    table.row(["endpoint".into(), report.endpoint.clone().into()]);
    let profile = serde_json::to_value(report.profile).ok().and_then(|v| v.as_str().map(String::from));
    table.row(["profile".into(), profile.unwrap_or_default().into()]);
    match report.reported {
        Some(true) => table.row(["results".into(), "reported to the operator".into()]),
        Some(false) => table.row(["results".into(), "not reported to the operator".into()]),
        None => {}
    }
    table
}

fn figures_table(results: &SessionResults) -> Table {
    let mut table = Table::new(&[Align::Left, Align::Right, Align::Left, Align::Left]);
    let mut row = |label: &str, value: String, unit: &str, note: String| {
        table.row([label.into(), value.into(), unit.into(), note.into()]);
    };
    let idle = results.latency.as_ref();
    if let Some(latency) = idle {
        let note = format!(
            "p95 {} ms, p99 {} ms, {} samples",
            number(latency.p95_ms),
            number(latency.p99_ms),
            latency.samples
        );
        row("latency", number(latency.p50_ms), "ms", note);
        row("jitter", number(latency.jitter_ms), "ms", String::new());
        row("loss", format!("{:.1}", latency.loss_percent), "%", String::new());
    }
    if let Some(mbps) = results.download_mbps {
        row("download", number(mbps), "Mbit/s", String::new());
    }
    if let Some(mbps) = results.upload_mbps {
        row("upload", number(mbps), "Mbit/s", String::new());
    }
    if let Some(loaded) = &results.loaded_latency {
        for (label, value) in [
            ("under download", loaded.download_ms),
            ("under upload", loaded.upload_ms),
            ("under both", loaded.bidirectional_ms),
        ] {
            let Some(ms) = value else { continue };
            let rise = idle.map(|i| format!("{} ms", signed(ms - i.p50_ms)));
            row(label, number(ms), "ms", rise.unwrap_or_default());
        }
    }
    table
}

fn grades_table(results: &SessionResults) -> Table {
    let mut table = Table::new(&[Align::Left, Align::Left]);
    let Some(grades) = &results.grades else { return table };
    for (label, grade) in [("bufferbloat", grades.bufferbloat), ("household", grades.household)] {
        if let Some(grade) = grade {
            table.row([format!("{label} grade").into(), grade_cell(grade)]);
        }
    }
    if let Some(points) = grades.quality_points {
        let paint = match points {
            p if p >= 30 => Paint::Good,
            p if p >= 0 => Paint::Fair,
            _ => Paint::Bad,
        };
        table.row(["quality".into(), Cell::painted(format!("{points} points of 40"), paint)]);
    }
    if let Some(grade) = grades.overall {
        table.row(["overall".into(), grade_cell(grade)]);
    }
    table
}

fn household_table(results: &SessionResults) -> Table {
    use Align::{Left, Right};
    let mut table = Table::new(&[Left, Right, Right, Right, Right, Left]);
    table.header(["user", "baseline ms", "mean ms", "jitter ms", "share %", "latency rise"]);
    for user in &results.household {
        let (rise, paint) = match user.severity {
            Severity::None => ("none", Paint::Good),
            Severity::Mild => ("mild", Paint::Good),
            Severity::Moderate => ("moderate", Paint::Fair),
            Severity::Severe => ("severe", Paint::Bad),
        };
        table.row([
            user.user.clone().into(),
            number(user.baseline_ms).into(),
            number(user.mean_ms).into(),
            number(user.jitter_ms).into(),
            format!("{:.0}", user.share_percent).into(),
            Cell::painted(rise.into(), paint),
        ]);
    }
    table
}

fn probes_table(probes: &[ProbeResult]) -> Table {
    use Align::{Left, Right};
    let mut table = Table::new(&[Left, Left, Left, Right, Right, Right, Right, Right, Right, Left, Left]);
    table.header([
        "probe",
        "target",
        "result",
        "tier",
        "total ms",
        "dns",
        "connect",
        "tls/kex",
        "first byte",
        "protocol",
        "note",
    ]);
    let ms = |value: Option<f64>| value.map(number).unwrap_or_default();
    for probe in probes {
        let kind = serde_json::to_value(probe.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let timings = probe.timings.clone().unwrap_or_default();
        let total = probe.timings.as_ref().map(|t| t.total_ms);
        let result =
            if probe.ok { Cell::painted("ok".into(), Paint::Good) } else { Cell::painted("failed".into(), Paint::Bad) };
        table.row([
            kind.into(),
            probe.target.clone().into(),
            result,
            probe.tier.to_string().into(),
            ms(total).into(),
            ms(timings.dns_ms).into(),
            ms(timings.connect_ms).into(),
            // tls for tls and https, the key exchange for ssh.
            ms(timings.tls_ms.or(timings.kex_ms)).into(),
            ms(timings.first_byte_ms).into(),
            probe.protocol.clone().unwrap_or_default().into(),
            // Why it failed, or what else it found (hops, loss, days left).
            probe.error.clone().or_else(|| probe.detail.clone()).unwrap_or_default().into(),
        ]);
    }
    table
}

fn grade_cell(grade: Grade) -> Cell {
    let paint = match grade {
        Grade::APlus | Grade::A => Paint::Good,
        Grade::B | Grade::C => Paint::Fair,
        Grade::D | Grade::F => Paint::Bad,
    };
    let text = serde_json::to_value(grade).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    Cell::painted(text, paint)
}

/// Stored results as one aligned table, newest first; grades in colour when `color`.
pub fn stored_table(page: &ResultsPage, color: bool) -> String {
    if page.items.is_empty() {
        return "no stored results match\n".to_string();
    }
    let mut table = Table::new(&[
        Align::Left,
        Align::Left,
        Align::Left,
        Align::Left,
        Align::Left,
        Align::Right,
        Align::Right,
        Align::Right,
        Align::Left,
    ]);
    table.header(["ENDED", "POOL", "SESSION", "PHASE", "GRADE", "P50 MS", "DOWN MBPS", "UP MBPS", "CLIENT"]);
    let figure = |value: Option<f64>| Cell::from(value.map(number).unwrap_or_else(|| "-".into()));
    for item in &page.items {
        let results = item.results.as_ref();
        let grade = item.overall_grade().map(grade_cell).unwrap_or_else(|| "-".into());
        let client = item.client.address.clone().or_else(|| item.client.created_by.clone());
        let session = match &item.monitor {
            Some(monitor) => format!("{} (monitor {monitor})", item.name),
            None => item.name.clone(),
        };
        table.row([
            whole_seconds(&item.ended_at).into(),
            item.pool.clone().into(),
            session.into(),
            item.phase.to_string().into(),
            grade,
            figure(results.and_then(|r| r.latency.as_ref()).map(|l| l.p50_ms)),
            figure(results.and_then(|r| r.download_mbps)),
            figure(results.and_then(|r| r.upload_mbps)),
            client.unwrap_or_else(|| "-".into()).into(),
        ]);
    }
    let mut out = table.render(color);
    if page.truncated {
        out.push_str("(more matched: narrow --since and --until, filter, or raise --limit)\n");
    }
    out
}

/// An RFC 3339 time without its fraction of a second (`…T14:40:12.25Z` → `…T14:40:12Z`).
fn whole_seconds(time: &str) -> String {
    match time.split_once('.') {
        Some((whole, fraction))
            if fraction.ends_with('Z') && fraction[..fraction.len() - 1].bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{whole}Z")
        }
        _ => time.to_owned(),
    }
}

/// A change, with its sign.
fn signed(value: f64) -> String {
    if value >= 0.0 { format!("+{}", number(value)) } else { number(value) }
}

/// A figure with the precision that matters at its size: 0.82, 12.3, 943.
pub fn number(value: f64) -> String {
    match value.abs() {
        x if x < 10.0 => format!("{value:.2}"),
        x if x < 1000.0 => format!("{value:.1}"),
        _ => format!("{value:.0}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paint {
    Good,
    Fair,
    Bad,
}

impl Paint {
    fn ansi(self) -> &'static str {
        match self {
            Self::Good => "\x1b[32m",
            Self::Fair => "\x1b[33m",
            Self::Bad => "\x1b[31m",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Cell {
    text: String,
    paint: Option<Paint>,
}

impl Cell {
    fn painted(text: String, paint: Paint) -> Self {
        Self { text, paint: Some(paint) }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Self { text, paint: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Self { text: text.to_string(), paint: None }
    }
}

/// Columns padded to their widest cell, two spaces apart.
struct Table {
    align: Vec<Align>,
    header: Option<Vec<Cell>>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    fn new(align: &[Align]) -> Self {
        Self { align: align.to_vec(), header: None, rows: Vec::new() }
    }

    fn header<const N: usize>(&mut self, cells: [&str; N]) {
        self.header = Some(cells.into_iter().map(Cell::from).collect());
    }

    fn row<const N: usize>(&mut self, cells: [Cell; N]) {
        self.rows.push(cells.into());
    }

    fn render(&self, color: bool) -> String {
        let all = || self.header.iter().chain(&self.rows);
        let widths: Vec<usize> = (0..self.align.len())
            .map(|column| all().filter_map(|row| row.get(column)).map(|c| c.text.chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in all() {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[column] - cell.text.chars().count());
                let (before, after) = match self.align[column] {
                    Align::Left => ("", pad.as_str()),
                    Align::Right => (pad.as_str(), ""),
                };
                line.push_str(before);
                match cell.paint.filter(|_| color) {
                    Some(paint) => line.push_str(&format!("{}{}\x1b[0m", paint.ansi(), cell.text)),
                    None => line.push_str(&cell.text),
                }
                line.push_str(after);
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_results_are_one_row_each_newest_first_and_say_when_cut() {
        use tidepool_crds::test_session::{Grades, LatencySummary, Phase};
        use tidepool_protocol::stored::{StoredClient, StoredResult};
        let item = |name: &str, monitor: Option<&str>, results: Option<SessionResults>| StoredResult {
            api_version: "tidepool.dev/v1alpha1".into(),
            kind: "TestSessionResult".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: "u".into(),
            pool: "edge".into(),
            profile: Profile::Bufferbloat,
            phase: if results.is_some() { Phase::Completed } else { Phase::Expired },
            created_at: None,
            ended_at: "2026-12-05T14:40:12.250190096Z".into(),
            pod: None,
            node: None,
            backend: None,
            client: StoredClient { address: Some("192.0.2.44".into()), created_by: None },
            monitor: monitor.map(String::from),
            results,
        };
        let measured = SessionResults {
            latency: Some(LatencySummary { p50_ms: 10.0, ..Default::default() }),
            download_mbps: Some(20.0),
            upload_mbps: Some(5.0),
            grades: Some(Grades { overall: Some(Grade::C), ..Default::default() }),
            ..Default::default()
        };
        let page = ResultsPage {
            items: vec![item("s1", Some("edge-watch"), Some(measured)), item("s2", None, None)],
            truncated: true,
        };
        let text = stored_table(&page, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("ENDED") && lines[0].contains("GRADE"), "{text}");
        assert!(lines[1].starts_with("2026-12-05T14:40:12Z  edge"), "{text}");
        assert!(lines[1].contains("s1 (monitor edge-watch)") && lines[1].contains(" C "), "{text}");
        assert!(lines[1].contains("10.0") && lines[1].contains("20.0") && lines[1].contains("192.0.2.44"), "{text}");
        assert!(lines[2].contains("s2") && lines[2].contains("Expired") && lines[2].contains(" - "), "{text}");
        assert!(lines[3].starts_with("(more matched"), "{text}");
        assert_eq!(stored_table(&ResultsPage::default(), false), "no stored results match\n");
    }
    use tidepool_crds::test_session::{
        Grades, HouseholdUserResult, LatencySummary, LoadedLatency, ProbeKind, ProbeTimings,
    };

    fn report() -> Report {
        Report {
            name: Some("session-x7k2p".into()),
            namespace: Some("default".into()),
            pod: Some("edge-abc12".into()),
            node: Some("worker-1".into()),
            backend: Some("worker-1".into()),
            region: Some("eu-west".into()),
            distance_km: Some(343.4),
            endpoint: "http://10.0.0.5:8080".into(),
            profile: Profile::Bufferbloat,
            reported: Some(true),
            results: SessionResults {
                latency: Some(LatencySummary {
                    p50_ms: 12.34,
                    p95_ms: 15.1,
                    p99_ms: 18.0,
                    jitter_ms: 0.8,
                    loss_percent: 0.0,
                    samples: 20,
                }),
                loaded_latency: Some(LoadedLatency {
                    download_ms: Some(25.1),
                    upload_ms: Some(80.2),
                    bidirectional_ms: None,
                }),
                download_mbps: Some(943.21),
                upload_mbps: Some(41.2),
                grades: Some(Grades {
                    bufferbloat: Some(Grade::B),
                    household: None,
                    overall: Some(Grade::B),
                    quality_points: Some(20),
                }),
                ..SessionResults::default()
            },
        }
    }

    #[test]
    fn the_table_aligns_figures_and_grades() {
        let expected = "\
session    default/session-x7k2p
pod        edge-abc12 on worker-1
served by  worker-1 in eu-west, 343 km away
endpoint   http://10.0.0.5:8080
profile    bufferbloat
results    reported to the operator

latency          12.3  ms      p95 15.1 ms, p99 18.0 ms, 20 samples
jitter           0.80  ms
loss              0.0  %
download        943.2  Mbit/s
upload           41.2  Mbit/s
under download   25.1  ms      +12.8 ms
under upload     80.2  ms      +67.9 ms

bufferbloat grade  B
quality            20 points of 40
overall            B
";
        assert_eq!(table(&report(), false), expected);
    }

    #[test]
    fn colour_wraps_only_the_painted_cells() {
        let text = table(&report(), true);
        assert!(text.contains("bufferbloat grade  \x1b[33mB\x1b[0m\n"), "{text}");
        assert!(!table(&report(), false).contains('\x1b'));
    }

    #[test]
    fn household_and_probe_tables_have_headers() {
        let results = SessionResults {
            household: vec![HouseholdUserResult {
                user: "videoCall".into(),
                baseline_ms: 10.0,
                mean_ms: 31.26,
                jitter_ms: 2.5,
                share_percent: 99.6,
                severity: Severity::Mild,
            }],
            probes: vec![ProbeResult {
                kind: ProbeKind::Http,
                target: "https://example.com/".into(),
                ok: true,
                tier: 1,
                timings: Some(ProbeTimings { dns_ms: Some(1.5), total_ms: 120.0, ..Default::default() }),
                protocol: Some("h2".into()),
                error: None,
                detail: Some("certificate expires in 60 days".into()),
            }],
            ..SessionResults::default()
        };
        assert_eq!(
            household_table(&results).render(false),
            "\
user       baseline ms  mean ms  jitter ms  share %  latency rise
videoCall         10.0     31.3       2.50      100  mild
"
        );
        assert_eq!(
            probes_table(&results.probes).render(false),
            "\
probe  target                result  tier  total ms   dns  connect  tls/kex  first byte  protocol  note
http   https://example.com/  ok         1     120.0  1.50                                h2        certificate expires in 60 days
"
        );
    }

    #[test]
    fn the_json_reads_back_as_session_results() {
        let report = report();
        let text = json(&report);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["name"], "session-x7k2p");
        assert_eq!(value["profile"], "bufferbloat");
        assert_eq!(value["latency"]["p50Ms"], 12.34);
        assert_eq!(value["grades"]["bufferbloat"], "B");
        let results: SessionResults = serde_json::from_str(&text).unwrap();
        assert_eq!(results, report.results);
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn numbers_keep_three_significant_places_or_so() {
        assert_eq!(number(0.823), "0.82");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(943.21), "943.2");
        assert_eq!(number(12_345.6), "12346");
        assert_eq!(number(-3.0), "-3.00");
        assert_eq!(signed(0.5), "+0.50");
        assert_eq!(signed(-0.5), "-0.50");
    }
}
