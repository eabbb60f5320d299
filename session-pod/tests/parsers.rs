//! Properties of every parser of outside bytes in the pod: credentials from
//! headers and query strings, WebSocket client messages, JSON bodies, the
//! streams' query strings, and UDP datagrams with their cookies. None may
//! panic, each takes what it must and refuses what it must.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use proptest::prelude::*;
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{ClientMessage, MAX_STREAM_SECONDS, ProbeRequest, UdpProbe};
use tidepool_protocol::results::ResultsSubmission;
use tidepool_session::auth::presented_credentials;
use tidepool_session::body::parse_json;
use tidepool_session::download::{StreamQuery, stream_duration};
use tidepool_session::error::{Reason, parse_query};
use tidepool_session::sockets::read_client_message;
use tidepool_session::udp::{Dropped, UdpCookies, check};

/// What tokens and tickets look like: base64url pieces joined by dots.
fn credential() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,40}(\\.[A-Za-z0-9_-]{1,40}){0,2}"
}

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![any::<[u8; 4]>().prop_map(IpAddr::from), any::<[u8; 16]>().prop_map(IpAddr::from)]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(seq, client_time_us)| ClientMessage::Ping { seq, client_time_us }),
        Just(ClientMessage::Terminate),
        (1u32..4_000_000).prop_map(|quarters| ClientMessage::Start { line_mbps: f64::from(quarters) / 4.0 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn credentials_never_panic(
        authorization in proptest::collection::vec(any::<u8>(), 0..80),
        binding in proptest::collection::vec(any::<u8>(), 0..80),
        query in proptest::option::of("\\PC{0,120}"),
    ) {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&authorization) {
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Ok(value) = HeaderValue::from_bytes(&binding) {
            headers.insert(BINDING_HEADER, value);
        }
        let _ = presented_credentials(&headers, query.as_deref());
    }

    #[test]
    fn credentials_come_from_headers_first_then_the_query(
        token in credential(), ticket in credential(), other in credential(), scheme in "(?i)bearer",
    ) {
        let query = format!("token={}&binding={}&seconds=3", other, other);
        let (from_query, _) = presented_credentials(&HeaderMap::new(), Some(&query));
        prop_assert_eq!(from_query.as_deref(), Some(other.as_str()));

        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("{scheme} {token}")).unwrap());
        headers.insert(BINDING_HEADER, HeaderValue::from_str(&ticket).unwrap());
        let both = presented_credentials(&headers, Some(&query));
        prop_assert_eq!(both, (Some(token.clone()), Some(ticket.clone())));

        // A scheme other than Bearer carries no token; the query fills the gap.
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {token}")).unwrap());
        let (token_seen, _) = presented_credentials(&basic, None);
        prop_assert_eq!(token_seen, None);
        let (token_seen, _) = presented_credentials(&basic, Some(&query));
        prop_assert_eq!(token_seen.as_deref(), Some(other.as_str()));
    }

    #[test]
    fn client_messages_never_panic(text in "\\PC{0,200}") {
        let _ = read_client_message(&text);
    }

    #[test]
    fn client_messages_are_read_as_sent(message in client_message()) {
        let text = serde_json::to_string(&message).unwrap();
        prop_assert_eq!(read_client_message(&text), Ok(message));
    }

    #[test]
    fn other_message_types_are_refused(kind in "[a-z]{1,10}") {
        prop_assume!(!["ping", "terminate", "start"].contains(&kind.as_str()));
        let refused = read_client_message(&format!(r#"{{"type":"{kind}"}}"#)).unwrap_err();
        prop_assert!(refused.starts_with("not a client message: unknown variant"), "{}", refused);
    }

    #[test]
    fn bodies_never_panic_and_refuse_with_400_or_422(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        for refused in [parse_json::<ResultsSubmission>(&body).err(), parse_json::<ProbeRequest>(&body).err()].into_iter().flatten() {
            prop_assert!(
                matches!((refused.status, refused.reason), (StatusCode::BAD_REQUEST, Reason::BadJson) | (StatusCode::UNPROCESSABLE_ENTITY, Reason::BadField)),
                "{:?}", refused
            );
        }
    }

    #[test]
    fn well_formed_bodies_are_taken(p50 in 0u32..100_000, tier in proptest::option::of(1i32..=3), is_final in any::<bool>()) {
        let results = format!(r#"{{"results":{{"latency":{{"p50Ms":{p50},"p95Ms":1,"p99Ms":1,"jitterMs":0,"lossPercent":0,"samples":3}}}},"final":{is_final}}}"#);
        let taken: ResultsSubmission = parse_json(results.as_bytes()).unwrap();
        prop_assert_eq!(taken.results.latency.unwrap().p50_ms, f64::from(p50));
        let request = ProbeRequest { targets: Vec::new(), tier };
        let parsed: ProbeRequest = parse_json(&serde_json::to_vec(&request).unwrap()).unwrap();
        prop_assert_eq!(parsed, request);
    }

    #[test]
    fn stream_queries_take_one_to_sixty_seconds(seconds in any::<u64>(), extra in "[a-z]{1,6}=[a-z0-9]{0,6}") {
        let query = format!("{extra}&seconds={seconds}");
        let parsed = parse_query::<StreamQuery>(Some(&query)).and_then(|q| stream_duration(q.seconds, 10));
        if (1..=MAX_STREAM_SECONDS).contains(&seconds) {
            prop_assert_eq!(parsed.unwrap(), Duration::from_secs(seconds));
        } else {
            let refused = parsed.unwrap_err();
            prop_assert_eq!((refused.status, refused.reason), (StatusCode::BAD_REQUEST, Reason::BadQuery));
        }
    }

    #[test]
    fn stream_queries_never_panic(query in "\\PC{0,80}") {
        match parse_query::<StreamQuery>(Some(&query)).and_then(|q| stream_duration(q.seconds, 10)) {
            Ok(duration) => prop_assert!((1..=MAX_STREAM_SECONDS).contains(&duration.as_secs())),
            Err(refused) => prop_assert_eq!(refused.reason, Reason::BadQuery),
        }
    }

    #[test]
    fn datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600), source in any_ip()) {
        let cookies = UdpCookies::with_secret(b"secret");
        let _ = check(&bytes, || Some(cookies.cookie("sid", source)), &cookies);
        let _ = check(&bytes, || None, &cookies);
    }

    #[test]
    fn only_the_address_a_cookie_was_granted_to_is_echoed(
        owner in any_ip(), other in any_ip(), seq in any::<u32>(), len in 32usize..=1472,
    ) {
        prop_assume!(owner.to_canonical() != other.to_canonical());
        let cookies = UdpCookies::with_secret(b"secret");
        let cookie = cookies.grant("sid", owner);
        let mut datagram = vec![0u8; len];
        UdpProbe { cookie, seq, client_time_us: 1, server_time_us: 0 }.write(&mut datagram).unwrap();
        let from = |sid: &'static str, source: IpAddr| { let cookies = &cookies; move || Some(cookies.cookie(sid, source)) };
        prop_assert_eq!(check(&datagram, from("sid", owner), &cookies), Ok(()));
        prop_assert_eq!(check(&datagram, from("sid", other), &cookies), Err(Dropped::WrongSource));
        prop_assert_eq!(check(&datagram, from("another-session", owner), &cookies), Err(Dropped::WrongSource));
        prop_assert_eq!(check(&datagram, || None, &cookies), Err(Dropped::BadCookie));
    }
}
