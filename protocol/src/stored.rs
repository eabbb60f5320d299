//! Results kept in object storage: the document the operator writes there
//! once for each ended session, and the route that reads them back
//! (`GET /api/v1/results`), which the CLI's `tidepool results` calls.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{Grade, Phase, Profile, SessionResults};

/// GET: stored results, filtered by [`ResultsQuery`], answered with a [`ResultsPage`].
pub const STORED_RESULTS_PATH: &str = "/api/v1/results";
/// The `kind` of a stored document.
pub const STORED_RESULT_KIND: &str = "TestSessionResult";
/// Most documents one answer carries.
pub const MAX_LIMIT: usize = 500;
/// Documents one answer carries when the query does not say.
pub const DEFAULT_LIMIT: usize = 50;

/// One ended session as it is stored: what it was, who asked for it, where
/// it ran, and its results. Times are RFC 3339 in UTC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredResult {
    /// `tidepool.dev/v1alpha1`.
    pub api_version: String,
    /// [`STORED_RESULT_KIND`].
    pub kind: String,
    pub namespace: String,
    /// The TestSession's name and UID.
    pub name: String,
    pub uid: String,
    pub pool: String,
    pub profile: Profile,
    /// Completed, Expired or Failed.
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    pub ended_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default)]
    pub client: StoredClient,
    /// The Monitor whose run this was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<SessionResults>,
}

/// Who the session was for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredClient {
    /// The client's address, as it said or as the operator saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The Kubernetes identity that created the session through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

impl StoredResult {
    /// The session's overall grade, when it has one.
    pub fn overall_grade(&self) -> Option<Grade> {
        self.results.as_ref()?.grades.as_ref()?.overall
    }
}

/// The query of `GET /api/v1/results`. `since` and `until` are RFC 3339
/// times or spans back from now (`90m`, `2h`, `7d`); without them, the last
/// day.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResultsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Overall grades to keep, comma-separated (`D,F`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<String>,
    /// A client address or creator identity to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// The answer of `GET /api/v1/results`: newest first.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultsPage {
    pub items: Vec<StoredResult>,
    /// More matched than the limit, or the scan stopped at its bound: narrow
    /// the query to see the rest.
    #[serde(default)]
    pub truncated: bool,
}

/// Parses a comma-separated list of grades as the results show them (`A+`, `A` … `F`).
pub fn parse_grades(text: &str) -> Result<Vec<Grade>, String> {
    text.split(',')
        .map(str::trim)
        .map(|letter| {
            serde_json::from_value(serde_json::Value::String(letter.to_string()))
                .map_err(|_| format!("{letter:?} is not a grade (A+, A, B, C, D or F)"))
        })
        .collect()
}

/// Whether a stored result passes the query's grade and client filters
/// (times and pools are the store's listing's business).
pub fn keeps(result: &StoredResult, grades: &[Grade], client: Option<&str>) -> bool {
    let grade_ok = grades.is_empty() || result.overall_grade().is_some_and(|g| grades.contains(&g));
    let client_ok = client.is_none_or(|client| {
        result.client.address.as_deref() == Some(client) || result.client.created_by.as_deref() == Some(client)
    });
    grade_ok && client_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::Grades;

    fn stored(overall: Option<Grade>, address: Option<&str>, created_by: Option<&str>) -> StoredResult {
        StoredResult {
            api_version: "tidepool.dev/v1alpha1".into(),
            kind: STORED_RESULT_KIND.into(),
            namespace: "default".into(),
            name: "s".into(),
            uid: "u".into(),
            pool: "edge".into(),
            profile: Profile::Latency,
            phase: Phase::Completed,
            created_at: None,
            ended_at: "2026-12-05T10:00:00Z".into(),
            pod: None,
            node: None,
            backend: None,
            client: StoredClient { address: address.map(String::from), created_by: created_by.map(String::from) },
            monitor: None,
            results: overall.map(|overall| SessionResults {
                grades: Some(Grades { overall: Some(overall), ..Default::default() }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn grades_parse_as_the_results_spell_them() {
        assert_eq!(parse_grades("A+, D,F"), Ok(vec![Grade::APlus, Grade::D, Grade::F]));
        assert!(parse_grades("E").unwrap_err().contains("\"E\" is not a grade"));
        assert!(parse_grades("").is_err());
    }

    #[test]
    fn filters_keep_what_matches() {
        let b = stored(Some(Grade::B), Some("192.0.2.7"), Some("system:serviceaccount:default:ci"));
        assert!(keeps(&b, &[], None));
        assert!(keeps(&b, &[Grade::B, Grade::C], None));
        assert!(!keeps(&b, &[Grade::F], None));
        assert!(keeps(&b, &[], Some("192.0.2.7")));
        assert!(keeps(&b, &[], Some("system:serviceaccount:default:ci")));
        assert!(!keeps(&b, &[], Some("192.0.2.8")));
        // A session with no grade is not kept by a grade filter.
        assert!(!keeps(&stored(None, None, None), &[Grade::F], None));
    }

    #[test]
    fn a_document_round_trips() {
        let document = stored(Some(Grade::APlus), Some("2001:db8::1"), None);
        let text = serde_json::to_string(&document).unwrap();
        assert!(text.contains(r#""kind":"TestSessionResult""#) && text.contains(r#""overall":"A+""#), "{text}");
        assert_eq!(serde_json::from_str::<StoredResult>(&text).unwrap(), document);
    }
}
