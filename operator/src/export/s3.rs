//! A small S3 client: PUT, GET and ListObjectsV2, signed with AWS Signature
//! Version 4. Three calls is all the results store needs; a full SDK would
//! cost this workspace far more to build than these few hundred lines.
//!
//! Signing and the listing's XML are pure functions, tested below; the
//! store itself is tested against a real S3 server (SeaweedFS) in
//! `operator/tests/export.rs`.

use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest, Sha256};

/// Where the store is and who we are to it.
#[derive(Clone)]
pub struct S3Config {
    /// `http(s)://host[:port]`, with no path.
    pub endpoint: Url,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `bucket.host` instead of `host/bucket` (AWS buckets made since 2020
    /// need it; SeaweedFS, Ceph and Garage take either).
    pub virtual_hosted: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint.as_str())
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("virtual_hosted", &self.virtual_hosted)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("the store did not answer: {0}")]
    Transport(String),
    #[error("the store answered {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { status: StatusCode, code: Option<String> },
    #[error("the store's listing is not what S3 sends: {0}")]
    Listing(&'static str),
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("the object is larger than a results document can be")]
    TooLarge,
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub keys: Vec<String>,
    /// With a delimiter: the "folders" one level down.
    pub common_prefixes: Vec<String>,
    /// Where the next page starts, when there is one.
    pub next_token: Option<String>,
}

/// A bucket in an S3-compatible store.
#[derive(Clone, Debug)]
pub struct S3Store {
    config: S3Config,
    http: reqwest::Client,
    /// Keys per listing page; the store's own (1,000) when None.
    page_size: Option<u32>,
}

/// Each call gets this long, end to end.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Objects read back are results documents: a few KiB. Anything much larger
/// is not ours.
const MAX_OBJECT_BYTES: usize = 1024 * 1024;

impl S3Store {
    pub fn new(config: S3Config) -> Result<Self, S3Error> {
        if !matches!(config.endpoint.scheme(), "http" | "https") || config.endpoint.host_str().is_none() {
            return Err(S3Error::Config(format!("endpoint {} is not an http(s) URL", config.endpoint)));
        }
        if !valid_bucket(&config.bucket) {
            return Err(S3Error::Config(format!("{:?} is not an S3 bucket name", config.bucket)));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| S3Error::Config(format!("an HTTP client: {e}")))?;
        Ok(Self { config, http, page_size: None })
    }

    /// Lists in pages of `keys` (tests use small pages to see continuation).
    pub fn with_page_size(mut self, keys: u32) -> Self {
        self.page_size = Some(keys.max(1));
        self
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    /// Writes `body` at `key`, replacing what was there.
    pub async fn put(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<(), S3Error> {
        let response = self.send(Method::PUT, key, &[], body, Some(content_type)).await?;
        expect_success(response).await.map(drop)
    }

    /// The object at `key`, or None when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let response = self.send(Method::GET, key, &[], Vec::new(), None).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let mut response = check_status(response).await?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_OBJECT_BYTES {
                return Err(S3Error::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    /// One page of the keys under `prefix`, and with `delimiter`, the
    /// common prefixes one level down.
    pub async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
    ) -> Result<ListPage, S3Error> {
        let mut query = vec![("list-type", "2"), ("prefix", prefix)];
        if let Some(delimiter) = delimiter {
            query.push(("delimiter", delimiter));
        }
        if let Some(token) = continuation {
            query.push(("continuation-token", token));
        }
        let page_size = self.page_size.map(|n| n.to_string());
        if let Some(keys) = &page_size {
            query.push(("max-keys", keys));
        }
        let response = self.send(Method::GET, "", &query, Vec::new(), None).await?;
        let body = expect_success(response).await?;
        parse_list(&String::from_utf8_lossy(&body))
    }

    async fn send(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> Result<reqwest::Response, S3Error> {
        let (host, path) = self.host_and_path(key);
        let mut url = self.config.endpoint.clone();
        url.set_path(&path);
        url.set_query(Some(&canonical_query(query)).filter(|q| !q.is_empty()).map(String::as_str));
        let payload_hash = hex(&Sha256::digest(&body));
        let method_name = method.as_str().to_owned();
        let signing = Signing {
            method: &method_name,
            host: &host,
            path: &path,
            query,
            payload_hash: &payload_hash,
            time: Timestamp::now(),
            region: &self.config.region,
            access_key_id: &self.config.access_key_id,
            secret_access_key: &self.config.secret_access_key,
        };
        let mut request = self
            .http
            .request(method, url)
            .header("host", &host)
            .header("x-amz-date", amz_date(signing.time))
            .header("x-amz-content-sha256", &payload_hash)
            .header("authorization", signing.authorization());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.body(body).send().await.map_err(transport)
    }

    /// The Host header and the URL path of `key` (empty: the bucket itself).
    fn host_and_path(&self, key: &str) -> (String, String) {
        let endpoint = &self.config.endpoint;
        let host = endpoint.host_str().unwrap_or_default();
        let host = match endpoint.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let key = uri_encode(key, false);
        if self.config.virtual_hosted {
            (format!("{}.{host}", self.config.bucket), format!("/{key}"))
        } else if key.is_empty() {
            (host, format!("/{}", self.config.bucket))
        } else {
            (host, format!("/{}/{key}", self.config.bucket))
        }
    }
}

fn transport(error: reqwest::Error) -> S3Error {
    // Without the URL: it names the bucket, which an answer must not leak.
    S3Error::Transport(error.without_url().to_string())
}

async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, S3Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    Err(S3Error::Status { status, code: error_code(&String::from_utf8_lossy(&body)) })
}

async fn expect_success(response: reqwest::Response) -> Result<Vec<u8>, S3Error> {
    let response = check_status(response).await?;
    let body = response.bytes().await.map_err(transport)?;
    Ok(body.to_vec())
}

/// S3's bucket naming rules, the part that matters for a URL: 3 to 63
/// lowercase letters, digits, dots and hyphens, starting and ending with a
/// letter or digit.
fn valid_bucket(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(name.chars().next())
        && edge(name.chars().last())
}

/// What one request's signature covers.
struct Signing<'a> {
    method: &'a str,
    host: &'a str,
    /// Already URI-encoded.
    path: &'a str,
    query: &'a [(&'a str, &'a str)],
    payload_hash: &'a str,
    time: Timestamp,
    region: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
}

impl Signing<'_> {
    /// The Authorization header, signing host, x-amz-content-sha256 and x-amz-date.
    fn authorization(&self) -> String {
        let date = amz_date(self.time);
        let day = &date[..8];
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request = format!(
            "{}\n{}\n{}\nhost:{}\nx-amz-content-sha256:{}\nx-amz-date:{date}\n\n{signed_headers}\n{}",
            self.method,
            self.path,
            canonical_query(self.query),
            self.host,
            self.payload_hash,
            self.payload_hash,
        );
        let string_to_sign =
            format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
        let mut key = hmac(format!("AWS4{}", self.secret_access_key).as_bytes(), day.as_bytes());
        for part in [self.region, "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, string_to_sign.as_bytes()));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key_id
        )
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

fn amz_date(time: Timestamp) -> String {
    time.strftime("%Y%m%dT%H%M%SZ").to_string()
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Percent-encodes all but S3's unreserved characters; `/` too unless it
/// separates a key's parts (`encode_slash` false).
fn uri_encode(text: &str, encode_slash: bool) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => encoded.push(byte as char),
            b'/' if !encode_slash => encoded.push('/'),
            _ => {
                let _ = write!(encoded, "%{byte:02X}");
            }
        }
    }
    encoded
}

/// The query as signed and as sent: encoded, sorted by name.
fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(name, value)| (uri_encode(name, true), uri_encode(value, true))).collect();
    pairs.sort();
    pairs.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join("&")
}

/// The keys, common prefixes and continuation of a ListObjectsV2 answer.
pub fn parse_list(xml: &str) -> Result<ListPage, S3Error> {
    if !xml.contains("<ListBucketResult") {
        return Err(S3Error::Listing("no ListBucketResult"));
    }
    let mut page = ListPage::default();
    for contents in elements(xml, "Contents") {
        let key = elements(contents, "Key").next().ok_or(S3Error::Listing("an entry without a Key"))?;
        page.keys.push(unescape(key)?);
    }
    for common in elements(xml, "CommonPrefixes") {
        if let Some(prefix) = elements(common, "Prefix").next() {
            page.common_prefixes.push(unescape(prefix)?);
        }
    }
    let truncated = elements(xml, "IsTruncated").next() == Some("true");
    if truncated {
        let token = elements(xml, "NextContinuationToken").next().ok_or(S3Error::Listing("truncated with no token"))?;
        page.next_token = Some(unescape(token)?);
    }
    Ok(page)
}

/// The text inside each `<tag>…</tag>` (no attributes, no nesting of the same tag).
fn elements<'a>(xml: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let end = rest[start..].find(&close)? + start;
        let inner = &rest[start..end];
        rest = &rest[end + close.len()..];
        Some(inner)
    })
}

/// XML's five entities and numeric references.
fn unescape(text: &str) -> Result<String, S3Error> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let end = rest[amp..].find(';').ok_or(S3Error::Listing("an unterminated entity"))? + amp;
        let entity = &rest[amp + 1..end];
        let decoded = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let number = match entity.strip_prefix("#x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => entity.strip_prefix('#').and_then(|n| n.parse().ok()),
                };
                number.and_then(char::from_u32).ok_or(S3Error::Listing("an unknown entity"))?
            }
        };
        out.push(decoded);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `<Code>` of an S3 error answer.
fn error_code(xml: &str) -> Option<String> {
    elements(xml, "Code").next().map(|code| code.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's "Signature Calculations for the
    /// Authorization Header" page (GET /test.txt), reduced to the three
    /// headers this client signs; the expected signature was computed
    /// independently with Python's hmac and hashlib.
    #[test]
    fn signs_as_signature_version_4() {
        let empty = hex(&Sha256::digest(b""));
        assert_eq!(empty, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let signing = Signing {
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/test.txt",
            query: &[],
            payload_hash: &empty,
            time: "2013-05-24T00:00:00Z".parse().unwrap(),
            region: "us-east-1",
            access_key_id: "AKIAIOSFODNN7EXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        };
        assert_eq!(
            signing.authorization(),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
             Signature=df548e2ce037944d03f3e68682813b093763996d597cf890ca3d9037fd231eb4"
        );
    }

    #[test]
    fn queries_are_encoded_and_sorted() {
        let query = [("prefix", "tidepool/a b/"), ("list-type", "2"), ("delimiter", "/")];
        assert_eq!(canonical_query(&query), "delimiter=%2F&list-type=2&prefix=tidepool%2Fa%20b%2F");
        assert_eq!(uri_encode("ns/pool/2026-12-05/x_y~z.json", false), "ns/pool/2026-12-05/x_y~z.json");
        assert_eq!(uri_encode("a+b=c", false), "a%2Bb%3Dc");
    }

    #[test]
    fn bucket_names_follow_the_rules() {
        assert!(valid_bucket("tidepool-results"));
        assert!(valid_bucket("a.b.c"));
        for bad in ["ab", "Tidepool", "-results", "results-", "a/b", "a?b", &"a".repeat(64)] {
            assert!(!valid_bucket(bad), "{bad}");
        }
    }

    #[test]
    fn a_listing_gives_its_keys_prefixes_and_continuation() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>t/</Prefix>
<KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>true</IsTruncated>
<NextContinuationToken>abc&amp;def</NextContinuationToken>
<Contents><Key>t/one.json</Key><Size>10</Size></Contents>
<Contents><Key>t/a&amp;b&#x20;c&#33;.json</Key><Size>11</Size></Contents>
<CommonPrefixes><Prefix>t/pool-a/</Prefix></CommonPrefixes><CommonPrefixes><Prefix>t/pool-b/</Prefix></CommonPrefixes>
</ListBucketResult>"#;
        let page = parse_list(xml).unwrap();
        assert_eq!(page.keys, ["t/one.json", "t/a&b c!.json"]);
        assert_eq!(page.common_prefixes, ["t/pool-a/", "t/pool-b/"]);
        assert_eq!(page.next_token.as_deref(), Some("abc&def"));
    }

    #[test]
    fn a_last_page_has_no_continuation() {
        let xml = "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>";
        assert_eq!(parse_list(xml).unwrap(), ListPage::default());
    }

    #[test]
    fn what_is_not_a_listing_is_refused() {
        for bad in [
            "<Error><Code>AccessDenied</Code></Error>",
            "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
            "<ListBucketResult><Contents><Key>a&bogus;</Key></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>a&amp</Key></Contents></ListBucketResult>",
        ] {
            assert!(parse_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_error_answer_gives_its_code() {
        assert_eq!(
            error_code("<Error><Code>NoSuchBucket</Code><Message>x</Message></Error>").as_deref(),
            Some("NoSuchBucket")
        );
        assert_eq!(error_code("not xml"), None);
    }
}
