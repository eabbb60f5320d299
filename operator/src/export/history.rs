//! Reading stored results back: a query becomes the days and pools to list
//! (pure, below), then the documents are fetched and filtered.
//!
//! Keys are filed by namespace, pool and day, so a query reads only the
//! days it spans. Grades and clients are inside the documents: the scan
//! reads at most [`MAX_SCANNED`] of them and says when it stopped short.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::civil::Date;
use k8s_openapi::jiff::{SignedDuration, Timestamp, ToSpan};
use tidepool_crds::test_session::Grade;
use tidepool_protocol::stored::{
    DEFAULT_LIMIT, MAX_LIMIT, ResultsPage, ResultsQuery, StoredResult, keeps, parse_grades,
};

use super::Exporter;
use super::record::{day_of, day_prefix, namespace_prefix};
use super::s3::S3Error;

/// Documents one query reads at most.
pub const MAX_SCANNED: usize = 2_000;
/// Days one query may span.
pub const MAX_DAYS: i64 = 31;
/// Pools one namespace-wide query lists at most.
const MAX_POOLS: usize = 1_000;
/// Listing calls one query makes at most: a query over every pool of a
/// busy namespace for a month would otherwise make one per pool and day.
pub const MAX_LISTS: usize = 100;
/// Documents fetched at once.
const FETCHES_AT_ONCE: usize = 16;
/// How far back a query reaches when it does not say.
const DEFAULT_SPAN: SignedDuration = SignedDuration::from_hours(24);

/// A query, checked: what to list and what to keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub namespace: String,
    pub pool: Option<String>,
    pub since: Timestamp,
    pub until: Timestamp,
    pub grades: Vec<Grade>,
    pub client: Option<String>,
    pub limit: usize,
}

/// Checks a query's times, grades and limit (names are checked by the route).
pub fn plan(query: &ResultsQuery, namespace: String, now: Timestamp) -> Result<Plan, String> {
    let until = match &query.until {
        Some(text) => moment("until", text, now)?,
        None => now,
    };
    let since = match &query.since {
        Some(text) => moment("since", text, now)?,
        None => until - DEFAULT_SPAN,
    };
    if since > until {
        return Err("since is after until".into());
    }
    if day_of(until).since(day_of(since)).map_err(|e| e.to_string())?.get_days() as i64 >= MAX_DAYS {
        return Err(format!("a query spans {MAX_DAYS} days at most; narrow since and until"));
    }
    let grades = match &query.grade {
        Some(text) => parse_grades(text).map_err(|e| format!("grade: {e}"))?,
        None => Vec::new(),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(format!("limit is 1 to {MAX_LIMIT}"));
    }
    if query.client.as_ref().is_some_and(|c| c.is_empty() || c.len() > 256) {
        return Err("client is 1 to 256 characters".into());
    }
    Ok(Plan { namespace, pool: query.pool.clone(), since, until, grades, client: query.client.clone(), limit })
}

/// An RFC 3339 time, or a span back from `now`: a whole number and s, m, h or d.
pub fn moment(field: &str, text: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(at);
    }
    let bad = || format!("{field}: {text:?} is neither an RFC 3339 time nor a span such as 90m, 2h or 7d");
    let split = text.len().checked_sub(1).filter(|&i| text.is_char_boundary(i)).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().ok().filter(|n| (0..=100_000).contains(n)).ok_or_else(bad)?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3_600,
        "d" => number * 86_400,
        _ => return Err(bad()),
    };
    now.checked_sub(seconds.seconds()).map_err(|_| bad())
}

/// The days a plan spans, newest first.
pub fn days(plan: &Plan) -> Vec<Date> {
    let first = day_of(plan.since);
    let mut day = day_of(plan.until);
    let mut days = vec![day];
    while day > first {
        match day.yesterday() {
            Ok(before) => day = before,
            Err(_) => break,
        }
        days.push(day);
    }
    days
}

/// Keeps what a plan asks for from fetched documents: in its time range,
/// passing its filters, newest first, at most its limit. The flag says
/// whether more matched.
pub fn select(plan: &Plan, documents: Vec<StoredResult>) -> (Vec<StoredResult>, bool) {
    let mut kept: Vec<(Timestamp, StoredResult)> = documents
        .into_iter()
        .filter(|d| d.namespace == plan.namespace)
        .filter(|d| keeps(d, &plan.grades, plan.client.as_deref()))
        .filter_map(|d| d.ended_at.parse::<Timestamp>().ok().map(|at| (at, d)))
        .filter(|(at, _)| (plan.since..=plan.until).contains(at))
        .collect();
    kept.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let more = kept.len() > plan.limit;
    kept.truncate(plan.limit);
    (kept.into_iter().map(|(_, d)| d).collect(), more)
}

/// Lists, fetches and selects the stored results a plan asks for.
pub async fn read(exporter: &Exporter, plan: &Plan) -> Result<ResultsPage, S3Error> {
    let store = exporter.store_handle();
    let prefix = exporter.prefix();
    let mut lists_left = MAX_LISTS;
    let mut stopped_short = false;
    let pools = match &plan.pool {
        Some(pool) => vec![pool.clone()],
        None => {
            let under = namespace_prefix(prefix, &plan.namespace);
            let (_, folders, whole) = list_all(exporter, &under, Some("/"), MAX_POOLS, &mut lists_left).await?;
            stopped_short |= !whole;
            folders
                .iter()
                .filter_map(|f| f.strip_prefix(&under)?.strip_suffix('/').map(String::from))
                .collect::<Vec<_>>()
        }
    };
    let mut keys = Vec::new();
    'days: for day in days(plan) {
        for pool in &pools {
            if lists_left == 0 {
                stopped_short = true;
                break 'days;
            }
            let room = MAX_SCANNED - keys.len();
            let under = day_prefix(prefix, &plan.namespace, pool, day);
            let (found, _, whole) = list_all(exporter, &under, None, room + 1, &mut lists_left).await?;
            keys.extend(found);
            stopped_short |= !whole;
            if keys.len() > MAX_SCANNED {
                keys.truncate(MAX_SCANNED);
                stopped_short = true;
                break 'days;
            }
        }
    }
    // Owned futures: a stream of borrowing ones does not satisfy axum's Send bound.
    let fetches = keys.into_iter().map(|key| {
        let store = store.clone();
        async move {
            match store.get(&key).await {
                // Not ours (nothing we store is that large): skipped, like any other stranger.
                Err(S3Error::TooLarge) => {
                    tracing::warn!(%key, "a stored object is too large to be a results document; skipped");
                    Ok(None)
                }
                other => other,
            }
        }
    });
    let documents: Vec<Option<Vec<u8>>> =
        futures::stream::iter(fetches).buffer_unordered(FETCHES_AT_ONCE).try_collect().await?;
    let documents = documents
        .into_iter()
        .flatten()
        .filter_map(|bytes| match serde_json::from_slice::<StoredResult>(&bytes) {
            Ok(document) => Some(document),
            Err(e) => {
                tracing::warn!(error = %e, "a stored object is not a results document; skipped");
                None
            }
        })
        .collect();
    let (items, more) = select(plan, documents);
    Ok(ResultsPage { items, truncated: more || stopped_short })
}

/// Every key (and with a delimiter, every common prefix) under `prefix`,
/// page after page, stopping once `at_most` keys or prefixes are in or
/// `lists_left` (each page takes one) runs out; the flag is false when the
/// budget ran out with pages left.
async fn list_all(
    exporter: &Exporter,
    prefix: &str,
    delimiter: Option<&str>,
    at_most: usize,
    lists_left: &mut usize,
) -> Result<(Vec<String>, Vec<String>, bool), S3Error> {
    let (mut keys, mut prefixes) = (Vec::new(), Vec::new());
    let mut token: Option<String> = None;
    loop {
        if *lists_left == 0 {
            return Ok((keys, prefixes, false));
        }
        *lists_left -= 1;
        let page = exporter.store_handle().list(prefix, delimiter, token.as_deref()).await?;
        keys.extend(page.keys);
        prefixes.extend(page.common_prefixes);
        token = page.next_token;
        if token.is_none() || keys.len() >= at_most || prefixes.len() >= at_most {
            return Ok((keys, prefixes, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::{Grades, Phase, Profile, SessionResults};
    use tidepool_protocol::stored::StoredClient;

    fn now() -> Timestamp {
        "2026-12-05T12:00:00Z".parse().unwrap()
    }

    fn query() -> ResultsQuery {
        ResultsQuery::default()
    }

    #[test]
    fn an_empty_query_reads_the_last_day() {
        let plan = plan(&query(), "ns".into(), now()).unwrap();
        assert_eq!(plan.until, now());
        assert_eq!(plan.since, "2026-12-04T12:00:00Z".parse().unwrap());
        assert_eq!(plan.limit, DEFAULT_LIMIT);
        assert_eq!(days(&plan), [Date::new(2026, 12, 5).unwrap(), Date::new(2026, 12, 4).unwrap()]);
    }

    #[test]
    fn times_are_rfc3339_or_spans_back_from_now() {
        assert_eq!(moment("since", "90m", now()).unwrap(), "2026-12-05T10:30:00Z".parse().unwrap());
        assert_eq!(moment("since", "2h", now()).unwrap(), "2026-12-05T10:00:00Z".parse().unwrap());
        assert_eq!(moment("since", "7d", now()).unwrap(), "2026-11-28T12:00:00Z".parse().unwrap());
        assert_eq!(moment("since", "30s", now()).unwrap(), "2026-12-05T11:59:30Z".parse().unwrap());
        assert_eq!(moment("since", "2026-12-01T00:00:00Z", now()).unwrap(), "2026-12-01T00:00:00Z".parse().unwrap());
        for bad in ["", "h", "2w", "-2h", "1.5h", "999999999d", "é", "yesterday"] {
            let error = moment("since", bad, now()).unwrap_err();
            assert!(error.starts_with("since: "), "{bad}: {error}");
        }
    }

    #[test]
    fn a_query_is_checked() {
        let bad = |q: ResultsQuery| plan(&q, "ns".into(), now()).unwrap_err();
        assert!(bad(ResultsQuery { since: Some("1h".into()), until: Some("2h".into()), ..query() }).contains("after"));
        assert!(bad(ResultsQuery { since: Some("40d".into()), ..query() }).contains("31 days"));
        assert!(bad(ResultsQuery { grade: Some("E".into()), ..query() }).starts_with("grade: "));
        assert!(bad(ResultsQuery { limit: Some(0), ..query() }).contains("limit"));
        assert!(bad(ResultsQuery { limit: Some(MAX_LIMIT + 1), ..query() }).contains("limit"));
        assert!(bad(ResultsQuery { client: Some(String::new()), ..query() }).contains("client"));
        let good = ResultsQuery { since: Some("30d".into()), grade: Some("D,F".into()), limit: Some(5), ..query() };
        let plan = plan(&good, "ns".into(), now()).unwrap();
        assert_eq!(plan.grades, [Grade::D, Grade::F]);
        assert_eq!(days(&plan).len(), 31);
    }

    fn document(name: &str, ended_at: &str, grade: Grade) -> StoredResult {
        StoredResult {
            api_version: "tidepool.dev/v1alpha1".into(),
            kind: "TestSessionResult".into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: name.into(),
            pool: "edge".into(),
            profile: Profile::Latency,
            phase: Phase::Completed,
            created_at: None,
            ended_at: ended_at.into(),
            pod: None,
            node: None,
            backend: None,
            client: StoredClient::default(),
            monitor: None,
            results: Some(SessionResults {
                grades: Some(Grades { overall: Some(grade), ..Default::default() }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn selection_keeps_the_range_and_filters_newest_first() {
        let query = ResultsQuery { since: Some("3h".into()), grade: Some("B,C".into()), limit: Some(2), ..query() };
        let plan = plan(&query, "ns".into(), now()).unwrap();
        let documents = vec![
            document("old", "2026-12-05T08:00:00Z", Grade::B),
            document("b1", "2026-12-05T10:00:00Z", Grade::B),
            document("c1", "2026-12-05T11:00:00Z", Grade::C),
            document("a1", "2026-12-05T11:30:00Z", Grade::A),
            document("b2", "2026-12-05T09:30:00Z", Grade::B),
            document("future", "2026-12-05T12:00:01Z", Grade::B),
            document("garbled", "not a time", Grade::B),
        ];
        let (kept, more) = select(&plan, documents.clone());
        let names: Vec<&str> = kept.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["c1", "b1"]);
        assert!(more, "b2 matched too");
        let everything = Plan { limit: 10, ..plan.clone() };
        assert!(!select(&everything, documents.clone()).1);
        // A document of another namespace (a prefix shared by mistake) is not shown.
        let elsewhere = Plan { namespace: "other".into(), ..everything };
        assert!(select(&elsewhere, documents).0.is_empty());
    }
}
