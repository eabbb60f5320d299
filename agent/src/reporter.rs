//! Sends reports to the operator, through the circuit breaker.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tidepool_wire::error_chain;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use thiserror::Error;
use tidepool_wire::report::AgentReport;
use tracing::{debug, info, warn};

use crate::breaker::Breaker;
use crate::config::Config;
use crate::metrics::{Metrics, Outcome};
use crate::sampler::Outbox;

/// How long one report may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a refusal's body that is read and logged.
const MAX_ERROR_BODY: usize = 4096;
/// A warning repeats at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the token could not be had.
#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("token file {0} is empty")]
    Empty(String),
    #[error("token in {0} is not a valid header value")]
    Invalid(String),
}

/// The bearer token, re-read whenever its file changes. Projected
/// ServiceAccount tokens are rotated by swapping the file under a symlink,
/// so the file's identity (inode, size, mtime) is compared, not just mtime.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    stamp: Option<(u64, u64, SystemTime)>,
    header: Option<HeaderValue>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> TokenFile {
        TokenFile { path, stamp: None, header: None }
    }

    /// Makes the next [`TokenFile::header`] read the file again.
    pub fn reload(&mut self) {
        self.stamp = None;
    }

    /// The `Authorization` header value. If the file cannot be read but a
    /// token was read before, the old one is kept (a rotation may be
    /// half-way) and the error is returned beside it for logging.
    pub fn header(&mut self) -> (Option<&HeaderValue>, Option<TokenError>) {
        let error = self.refresh().err();
        (self.header.as_ref(), error)
    }

    fn refresh(&mut self) -> Result<(), TokenError> {
        let display = || self.path.display().to_string();
        let meta = fs::metadata(&self.path).map_err(|source| TokenError::Read { path: display(), source })?;
        let stamp = (meta.ino(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if self.stamp == Some(stamp) && self.header.is_some() {
            return Ok(());
        }
        let text = fs::read_to_string(&self.path).map_err(|source| TokenError::Read { path: display(), source })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty(display()));
        }
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| TokenError::Invalid(display()))?;
        value.set_sensitive(true);
        if self.header.is_some() {
            info!(path = %self.path.display(), "token file changed; using the new token");
        }
        self.header = Some(value);
        self.stamp = Some(stamp);
        Ok(())
    }
}

/// Lets a warning through at most once per message per [`LOG_EVERY`], so a
/// long outage does not flood the log.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: HashMap<String, Instant>,
}

impl LogLimiter {
    /// The most messages remembered; older ones are forgotten first.
    const CAPACITY: usize = 64;

    pub fn allow(&mut self, message: &str, now: Instant) -> bool {
        if let Some(last) = self.last.get_mut(message) {
            if now.duration_since(*last) < LOG_EVERY {
                return false;
            }
            *last = now;
            return true;
        }
        if self.last.len() >= Self::CAPACITY {
            self.last.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
            if self.last.len() >= Self::CAPACITY {
                self.last.clear();
            }
        }
        self.last.insert(message.to_owned(), now);
        true
    }
}

/// The operator's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    code: Option<u16>,
}

/// What the operator's refusal said, for the log.
fn refusal_message(body: &[u8]) -> (String, Option<u16>) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => (parsed.error, parsed.code),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(200).collect();
            (text, None)
        }
    }
}

/// Sends reports from the outbox, one at a time.
pub struct Reporter {
    url: String,
    client: reqwest::Client,
    token: TokenFile,
    breaker: Breaker,
    seq: u64,
    metrics: Arc<Metrics>,
    limiter: LogLimiter,
}

fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).pool_max_idle_per_host(1).build()
}

/// How one send ended.
enum Sent {
    Accepted,
    /// Refused with this status; the breaker counts it as a failure.
    Refused(StatusCode),
    Failed,
}

impl Reporter {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> reqwest::Result<Reporter> {
        Ok(Reporter {
            url: config.report_url.clone(),
            client: client()?,
            token: TokenFile::new(config.token_file.clone()),
            breaker: Breaker::new(config.breaker_failures, config.breaker_open),
            seq: 0,
            metrics,
            limiter: LogLimiter::default(),
        })
    }

    /// Sends whatever the sampler puts in the outbox, forever.
    pub async fn run(mut self, outbox: &Outbox) {
        loop {
            let report = outbox.take().await;
            if !self.breaker.allow(Instant::now()) {
                // Open: the report is dropped; the windows keep everything,
                // so the next report after the breaker closes catches up.
                continue;
            }
            self.send(report).await;
        }
    }

    fn warn_limited(&mut self, message: &str) -> bool {
        self.limiter.allow(message, Instant::now())
    }

    async fn send(&mut self, mut report: AgentReport) {
        if let Err(error) = report.validate() {
            // A bug or a very strange host; sending it would only be refused.
            let message = format!("not sending an invalid report: {error}");
            if self.warn_limited(&message) {
                warn!("{message}");
            }
            return;
        }
        let (header, token_error) = self.token.header();
        let header = header.cloned();
        if let Some(error) = token_error {
            let message = error.to_string();
            if self.warn_limited(&message) {
                warn!(error = %message, "cannot read the token");
            }
        }
        let Some(header) = header else {
            self.metrics.report(Outcome::Failed, None);
            return;
        };
        // The first report is 0: seq "restarts from 0 with the agent".
        report.seq = self.seq;
        self.seq += 1;
        let body = match serde_json::to_vec(&report) {
            Ok(body) => body,
            Err(error) => {
                warn!(%error, "cannot encode the report");
                return;
            }
        };
        let started = Instant::now();
        let sent = self.post(header, body).await;
        let elapsed = started.elapsed().as_secs_f64();
        let now = Instant::now();
        match sent {
            Sent::Accepted => {
                self.metrics.report(Outcome::Accepted, Some(elapsed));
                if self.breaker.is_open() {
                    info!("the operator takes reports again; breaker closed");
                }
                self.breaker.success();
            }
            Sent::Refused(status) => {
                self.metrics.report(Outcome::Refused, Some(elapsed));
                if status == StatusCode::UNAUTHORIZED {
                    self.token.reload();
                }
                self.failure(now);
            }
            Sent::Failed => {
                self.metrics.report(Outcome::Failed, Some(elapsed));
                // A fresh connection next time: the old one may be stuck to
                // an operator replica that is not the leader.
                if let Ok(fresh) = client() {
                    self.client = fresh;
                }
                self.failure(now);
            }
        }
        self.metrics.set_breaker_open(self.breaker.is_open());
    }

    fn failure(&mut self, now: Instant) {
        if self.breaker.failure(now) {
            let message = "breaker opened; holding reports back";
            if self.warn_limited(message) {
                warn!(seconds = self.breaker.open_for().as_secs(), "{message}");
            } else {
                debug!("{message}");
            }
        }
    }

    async fn post(&mut self, authorization: HeaderValue, body: Vec<u8>) -> Sent {
        let request = self
            .client
            .post(&self.url)
            .header(AUTHORIZATION, authorization)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let message = format!("cannot reach the operator: {}", error_chain(&error));
                if self.warn_limited(&message) {
                    warn!("{message}");
                }
                return Sent::Failed;
            }
        };
        let status = response.status();
        // Read what there is (bounded), so the connection can be reused.
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())]),
                Ok(None) | Err(_) => break,
            }
        }
        if status.is_success() {
            Sent::Accepted
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            let message = "the operator is not ready or not the leader (503); retrying next report";
            if self.warn_limited(message) {
                info!("{message}");
            }
            Sent::Failed
        } else if status.is_client_error() {
            let (error, code) = refusal_message(&body);
            let message = format!("{} {error}", status.as_u16());
            if self.warn_limited(&message) {
                warn!(status = status.as_u16(), code, error = %error, "the operator refused the report");
            }
            Sent::Refused(status)
        } else {
            let message = format!("the operator answered {status}");
            if self.warn_limited(&message) {
                warn!("{message}");
            }
            Sent::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_each_message_through_once_a_minute() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::default();
        assert!(limiter.allow("a", t0));
        assert!(!limiter.allow("a", t0 + Duration::from_secs(59)));
        assert!(limiter.allow("b", t0 + Duration::from_secs(1)));
        assert!(limiter.allow("a", t0 + Duration::from_secs(60)));
        assert!(!limiter.allow("a", t0 + Duration::from_secs(61)));
        // Many distinct messages stay bounded.
        for i in 0..1000 {
            limiter.allow(&i.to_string(), t0);
        }
        assert!(limiter.last.len() <= LogLimiter::CAPACITY);
    }

    #[test]
    fn refusals_are_read_from_json_or_text() {
        assert_eq!(
            refusal_message(br#"{"error":"windows: too many","code":400}"#),
            ("windows: too many".into(), Some(400))
        );
        assert_eq!(refusal_message(b"plain words"), ("plain words".into(), None));
    }

    #[test]
    fn the_token_is_reread_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("tidepool-agent-token-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let mut token = TokenFile::new(path.clone());
        let (header, error) = token.header();
        assert!(header.is_none() && matches!(error, Some(TokenError::Read { .. })));
        fs::write(&path, "first\n").unwrap();
        assert_eq!(token.header().0.unwrap(), "Bearer first");
        // Rotation writes a new file and renames it over the old one.
        fs::write(dir.join("token.new"), "second-token").unwrap();
        fs::rename(dir.join("token.new"), &path).unwrap();
        assert_eq!(token.header().0.unwrap(), "Bearer second-token");
        // Gone for a moment: the last token is kept.
        fs::remove_file(&path).unwrap();
        let (header, error) = token.header();
        assert_eq!(header.unwrap(), "Bearer second-token");
        assert!(error.is_some());
        fs::write(&path, "  \n").unwrap();
        assert!(matches!(token.header().1, Some(TokenError::Empty(_))));
        fs::remove_dir_all(dir).unwrap();
    }
}
