//! The Retries service (S5) end to end over gRPC against a real sagad: configuration versions,
//! the layering, each CheckRetry answer, concurrency, the retry check table, and sagactl.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;

use common::TestServer;
use sagad::clock::ManualClock;
use sagad::grpc::pb;
use sagad::grpc::pb::retries_client::RetriesClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const START_MS: u64 = 1_800_000_000_000;

fn retries(server: &TestServer) -> RetriesClient<Channel> {
    RetriesClient::new(server.channel.clone())
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1_000) as i64,
        nanos: ((ms % 1_000) * 1_000_000) as i32,
    }
}

fn codes(list: &[&str]) -> Vec<String> {
    list.iter().map(|c| (*c).to_owned()).collect()
}

fn policy(retryable: &[&str], max: u32, min_ms: u64, factor: f64, cap_ms: u64) -> pb::RetryPolicy {
    pb::RetryPolicy {
        retryable_codes: codes(retryable),
        max_retries: Some(max),
        min_interval: Some(duration(min_ms)),
        backoff_factor: Some(factor),
        max_interval: Some(duration(cap_ms)),
    }
}

fn defaults_only(defaults: pb::RetryPolicy) -> pb::RetryConfig {
    pb::RetryConfig {
        defaults: Some(defaults),
        ..pb::RetryConfig::default()
    }
}

/// Defaults retry TIMEOUT; payments.charge retries ISSUER_BUSY at most twice with a 5 s
/// floor; the mobile channel retries NETWORK_LOST, and only CARD_BUSY for payments.charge.
fn layered() -> pb::RetryConfig {
    pb::RetryConfig {
        defaults: Some(policy(&["TIMEOUT"], 3, 1_000, 2.0, 10_000)),
        transactions: vec![pb::TransactionRetry {
            transaction_code: "payments.charge".into(),
            policy: Some(pb::RetryPolicy {
                retryable_codes: codes(&["ISSUER_BUSY"]),
                max_retries: Some(2),
                min_interval: Some(duration(5_000)),
                ..pb::RetryPolicy::default()
            }),
        }],
        channels: vec![
            pb::ChannelRetry {
                channel: "mobile".into(),
                transaction_code: String::new(),
                retryable_codes: codes(&["NETWORK_LOST"]),
            },
            pb::ChannelRetry {
                channel: "mobile".into(),
                transaction_code: "payments.charge".into(),
                retryable_codes: codes(&["CARD_BUSY"]),
            },
        ],
        ..pb::RetryConfig::default()
    }
}

async fn put(
    client: &mut RetriesClient<Channel>,
    request_id: &str,
    config: pb::RetryConfig,
) -> pb::RetryConfig {
    client
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: request_id.into(),
            config: Some(config),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap()
}

fn check_request(
    request_id: &str,
    original: &str,
    code: &str,
    channel: &str,
    error: &str,
) -> pb::CheckRetryRequest {
    pb::CheckRetryRequest {
        request_id: request_id.into(),
        original_serial: original.into(),
        transaction_code: code.into(),
        channel: channel.into(),
        error_code: error.into(),
        idempotency_scope: String::new(),
    }
}

async fn check(
    client: &mut RetriesClient<Channel>,
    request: pb::CheckRetryRequest,
) -> pb::CheckRetryResponse {
    client.check_retry(request).await.unwrap().into_inner()
}

fn decision(response: &pb::CheckRetryResponse) -> pb::RetryDecision {
    response.decision()
}

async fn history(client: &mut RetriesClient<Channel>, serial: &str) -> pb::GetRetryHistoryResponse {
    client
        .get_retry_history(pb::GetRetryHistoryRequest {
            serial: serial.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn get_retry_config_shows_the_builtin_defaults_as_version_zero() {
    let server = TestServer::start().await;
    let config = common::shown_retry_config(&server.channel).await;
    assert_eq!(config.version, 0);
    assert_eq!(
        config.defaults,
        Some(policy(
            &[
                "UNAVAILABLE",
                "TIMEOUT",
                "DEADLINE_EXCEEDED",
                "RESOURCE_EXHAUSTED"
            ],
            5,
            1_000,
            2.0,
            60_000
        ))
    );
    assert!(config.updated_at.is_none());
}

#[tokio::test]
async fn put_retry_config_stores_numbered_versions_with_defaults_filled_in() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    let first = put(
        &mut client,
        "cfg-1",
        defaults_only(pb::RetryPolicy {
            max_retries: Some(2),
            ..pb::RetryPolicy::default()
        }),
    )
    .await;
    assert_eq!(first.version, 1);
    let defaults = first.defaults.clone().unwrap();
    assert_eq!(defaults.max_retries, Some(2));
    assert_eq!(
        defaults.min_interval,
        Some(duration(1_000)),
        "unset takes the built-in"
    );
    assert!(first.updated_at.is_some());

    let second = put(&mut client, "cfg-2", layered()).await;
    assert_eq!(second.version, 2);
    let shown = common::shown_retry_config(&server.channel).await;
    assert_eq!(shown, second);
    assert_eq!(shown.transactions, layered().transactions);
    assert_eq!(shown.channels, layered().channels);
}

#[tokio::test]
async fn put_retry_config_reports_every_invalid_field_at_once() {
    let server = TestServer::start().await;
    let mut config = layered();
    config.defaults = Some(pb::RetryPolicy {
        backoff_factor: Some(0.5),
        min_interval: Some(duration(30_000)),
        max_interval: Some(duration(1_000)),
        ..pb::RetryPolicy::default()
    });
    config.transactions.push(pb::TransactionRetry {
        transaction_code: "payments.charge".into(),
        policy: Some(pb::RetryPolicy {
            min_interval: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..pb::RetryPolicy::default()
        }),
    });
    let status = retries(&server)
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: "cfg-bad".into(),
            config: Some(config),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "config.transactions[1].policy.min_interval",
            "config.defaults.backoff_factor",
            "config.defaults.max_interval",
            // payments.charge's own 5 s floor is above the 1 s cap it inherits.
            "config.transactions[0].policy.min_interval",
            "config.transactions[1].transaction_code",
        ]
    );
    // Nothing was stored: the built-in configuration still applies.
    let shown = common::shown_retry_config(&server.channel).await;
    assert_eq!(shown.version, 0);
}

#[tokio::test]
async fn layering_lets_the_most_specific_setting_decide() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    put(&mut client, "cfg", layered()).await;
    // (transaction code, channel, error, decision, layer)
    let table = [
        (
            "other",
            "",
            "TIMEOUT",
            pb::RetryDecision::Allow,
            pb::RetryLayer::Defaults,
        ),
        (
            "other",
            "",
            "ISSUER_BUSY",
            pb::RetryDecision::NotRetryable,
            pb::RetryLayer::Defaults,
        ),
        (
            "payments.charge",
            "",
            "ISSUER_BUSY",
            pb::RetryDecision::Allow,
            pb::RetryLayer::Transaction,
        ),
        (
            "payments.charge",
            "",
            "TIMEOUT",
            pb::RetryDecision::NotRetryable,
            pb::RetryLayer::Transaction,
        ),
        (
            "other",
            "mobile",
            "NETWORK_LOST",
            pb::RetryDecision::Allow,
            pb::RetryLayer::Channel,
        ),
        (
            "other",
            "mobile",
            "TIMEOUT",
            pb::RetryDecision::NotRetryable,
            pb::RetryLayer::Channel,
        ),
        (
            "payments.charge",
            "mobile",
            "CARD_BUSY",
            pb::RetryDecision::Allow,
            pb::RetryLayer::Channel,
        ),
        (
            "payments.charge",
            "mobile",
            "NETWORK_LOST",
            pb::RetryDecision::NotRetryable,
            pb::RetryLayer::Channel,
        ),
        (
            "payments.charge",
            "web",
            "ISSUER_BUSY",
            pb::RetryDecision::Allow,
            pb::RetryLayer::Transaction,
        ),
    ];
    for (i, (code, channel, error, expected, layer)) in table.into_iter().enumerate() {
        let response = check(
            &mut client,
            check_request(&format!("r-{i}"), &format!("T-{i}"), code, channel, error),
        )
        .await;
        assert_eq!(
            decision(&response),
            expected,
            "{code} via {channel:?} failing {error}"
        );
        assert_eq!(
            response.layer(),
            layer,
            "{code} via {channel:?} failing {error}"
        );
        assert_eq!(response.config_version, 1);
        assert!(!response.reason.is_empty());
    }
}

#[tokio::test]
async fn allow_answers_a_linked_retry_serial_and_its_attempt() {
    let server = TestServer::start().await;
    let response = check(
        &mut retries(&server),
        check_request("r-1", "T-100", "payments.charge", "", "TIMEOUT"),
    )
    .await;
    assert_eq!(decision(&response), pb::RetryDecision::Allow);
    assert_eq!(response.retry_serial, "T-100.r1");
    assert_eq!(response.attempt, 1);
    assert_eq!(
        response.config_version, 0,
        "the built-in configuration decided"
    );
}

#[tokio::test]
async fn too_soon_reports_retry_after_and_allows_once_the_manual_clock_passes_it() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = retries(&server);
    put(
        &mut client,
        "cfg",
        defaults_only(policy(&["TIMEOUT"], 5, 1_000, 3.0, 60_000)),
    )
    .await;
    let ask = |n: u32| check_request(&format!("r-{n}"), "T-200", "t", "", "TIMEOUT");

    assert_eq!(
        decision(&check(&mut client, ask(1)).await),
        pb::RetryDecision::Allow
    );
    clock.advance_ms(1_000);
    // Retry 2 waits min × factor = 3 s after retry 1 was allowed.
    let early = check(&mut client, ask(2)).await;
    assert_eq!(decision(&early), pb::RetryDecision::TooSoon);
    assert_eq!(early.retry_after, Some(duration(2_000)));
    assert_eq!(early.layer(), pb::RetryLayer::Defaults);
    assert!(early.retry_serial.is_empty());

    clock.advance_ms(2_000);
    let on_time = check(&mut client, ask(3)).await;
    assert_eq!(decision(&on_time), pb::RetryDecision::Allow);
    assert_eq!(on_time.retry_serial, "T-200.r2");
}

#[tokio::test]
async fn exhausted_after_max_retries_reports_the_attempts_made() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = retries(&server);
    put(&mut client, "cfg", layered()).await;
    for n in 1..=2 {
        let allowed = check(
            &mut client,
            check_request(
                &format!("r-{n}"),
                "T-300",
                "payments.charge",
                "",
                "ISSUER_BUSY",
            ),
        )
        .await;
        assert_eq!(decision(&allowed), pb::RetryDecision::Allow);
        clock.advance_ms(60_000);
    }
    let refused = check(
        &mut client,
        check_request("r-3", "T-300", "payments.charge", "", "ISSUER_BUSY"),
    )
    .await;
    assert_eq!(decision(&refused), pb::RetryDecision::Exhausted);
    assert_eq!(refused.attempt, 2);
    assert_eq!(refused.layer(), pb::RetryLayer::Transaction);
}

#[tokio::test]
async fn already_succeeded_returns_the_participants_stored_response() {
    let server = TestServer::start().await;
    let mut participant = server.idempotency();
    participant
        .begin(pb::BeginRequest {
            scope: "payments".into(),
            request_id: "T-400".into(),
            fingerprint: b"charge 10 EUR".to_vec(),
            processing_timeout: None,
        })
        .await
        .unwrap();
    let mut client = retries(&server);
    let mut ask = check_request("r-1", "T-400", "payments.charge", "", "TIMEOUT");
    ask.idempotency_scope = "payments".into();
    let running = check(&mut client, ask.clone()).await;
    assert_eq!(decision(&running), pb::RetryDecision::InProgress);
    assert!(running.retry_serial.is_empty());

    participant
        .finish(pb::FinishRequest {
            scope: "payments".into(),
            request_id: "T-400".into(),
            result: "SUCCEEDED".into(),
            response: b"charged: receipt 77".to_vec(),
            content_type: "text/plain".into(),
        })
        .await
        .unwrap();
    ask.request_id = "r-2".into();
    let done = check(&mut client, ask).await;
    assert_eq!(decision(&done), pb::RetryDecision::AlreadySucceeded);
    assert_eq!(done.stored_response, b"charged: receipt 77");
    assert_eq!(done.layer(), pb::RetryLayer::Unspecified);
}

#[tokio::test]
async fn a_retry_still_processing_or_succeeded_answers_for_its_original() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = retries(&server);
    let mut participant = server.idempotency();
    let mut ask = check_request("r-1", "T-500", "payments.charge", "", "TIMEOUT");
    ask.idempotency_scope = "payments".into();
    let allowed = check(&mut client, ask.clone()).await;
    assert_eq!(allowed.retry_serial, "T-500.r1");

    participant
        .begin(pb::BeginRequest {
            scope: "payments".into(),
            request_id: "T-500.r1".into(),
            fingerprint: Vec::new(),
            processing_timeout: None,
        })
        .await
        .unwrap();
    clock.advance_ms(60_000);
    ask.request_id = "r-2".into();
    let running = check(&mut client, ask.clone()).await;
    assert_eq!(decision(&running), pb::RetryDecision::InProgress);
    assert!(running.reason.contains("T-500.r1"), "{}", running.reason);

    participant
        .finish(pb::FinishRequest {
            scope: "payments".into(),
            request_id: "T-500.r1".into(),
            result: "SUCCEEDED".into(),
            response: b"ok on retry 1".to_vec(),
            content_type: String::new(),
        })
        .await
        .unwrap();
    ask.request_id = "r-3".into();
    let done = check(&mut client, ask).await;
    assert_eq!(decision(&done), pb::RetryDecision::AlreadySucceeded);
    assert_eq!(done.stored_response, b"ok on retry 1");
}

/// A worker that Begins with a processing_timeout and dies holds the retry back only for that
/// long: after it, CheckRetry allows the retry, as Begin would hand the work to a new caller.
#[tokio::test]
async fn a_worker_whose_processing_timeout_ran_out_no_longer_holds_the_retry_back() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut participant = server.idempotency();
    participant
        .begin(pb::BeginRequest {
            scope: "payments".into(),
            request_id: "T-42".into(),
            fingerprint: Vec::new(),
            processing_timeout: Some(duration(30_000)),
        })
        .await
        .unwrap();
    let mut client = retries(&server);
    let mut ask = check_request("r-1", "T-42", "payments.charge", "", "TIMEOUT");
    ask.idempotency_scope = "payments".into();
    let running = check(&mut client, ask.clone()).await;
    assert_eq!(decision(&running), pb::RetryDecision::InProgress);

    clock.advance_ms(30_000);
    ask.request_id = "r-2".into();
    let allowed = check(&mut client, ask).await;
    assert_eq!(
        decision(&allowed),
        pb::RetryDecision::Allow,
        "{}",
        allowed.reason
    );
    assert_eq!(allowed.retry_serial, "T-42.r1");
}

/// An original may be 120 characters; the retry serial issued for it is longer, and asking
/// about that serial again continues the original's history instead of being refused.
#[tokio::test]
async fn a_retry_serial_issued_for_a_longest_original_is_accepted_when_asked_again() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = retries(&server);
    let original = "T".repeat(120);
    let first = check(
        &mut client,
        check_request("r-1", &original, "payments.charge", "", "TIMEOUT"),
    )
    .await;
    assert_eq!(decision(&first), pb::RetryDecision::Allow);
    assert_eq!(first.retry_serial.len(), 123);

    clock.advance_ms(60_000);
    let again = check(
        &mut client,
        check_request("r-2", &first.retry_serial, "payments.charge", "", "TIMEOUT"),
    )
    .await;
    assert_eq!(
        decision(&again),
        pb::RetryDecision::Allow,
        "{}",
        again.reason
    );
    assert_eq!(again.retry_serial, format!("{original}.r2"));

    // A new original over 120 characters is still refused, naming the field.
    let status = client
        .check_retry(check_request(
            "r-3",
            &"U".repeat(121),
            "payments.charge",
            "",
            "TIMEOUT",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("original_serial"),
        "{}",
        status.message()
    );
}

/// A serial shaped like one CheckRetry issues (`<original>.r<N>`) but never issued cannot
/// start a history of its own: CheckRetry may issue that very serial for its original later,
/// and the two transactions' records would then answer for each other.
#[tokio::test]
async fn a_serial_shaped_like_an_issued_retry_serial_is_refused_as_an_original() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    let status = client
        .check_retry(check_request(
            "r-1",
            "PAY-7.r1",
            "payments.charge",
            "",
            "TIMEOUT",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("original_serial") && status.message().contains("PAY-7"),
        "{}",
        status.message()
    );
    // Not a retry suffix: allowed as an original.
    for serial in ["PAY-7.r", "PAY-7.rx", "PAY-7.r01b", "PAY.r1.x"] {
        let answer = check(
            &mut client,
            check_request(
                &format!("r-{serial}"),
                serial,
                "payments.charge",
                "",
                "TIMEOUT",
            ),
        )
        .await;
        assert_eq!(decision(&answer), pb::RetryDecision::Allow, "{serial}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checks_for_one_original_allow_exactly_max_retries_with_distinct_serials() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock).await;
    let mut client = retries(&server);
    // No interval: only the maximum limits how many of the concurrent checks are allowed.
    put(
        &mut client,
        "cfg",
        defaults_only(policy(&["TIMEOUT"], 4, 0, 1.0, 0)),
    )
    .await;
    let mut tasks = Vec::new();
    for n in 0..40 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .check_retry(check_request(
                    &format!("r-{n}"),
                    "T-600",
                    "t",
                    "",
                    "TIMEOUT",
                ))
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut serials = HashSet::new();
    let mut exhausted = 0;
    for task in tasks {
        let response = task.await.unwrap();
        match decision(&response) {
            pb::RetryDecision::Allow => assert!(serials.insert(response.retry_serial)),
            pb::RetryDecision::Exhausted => exhausted += 1,
            other => panic!("unexpected {other:?}: {}", response.reason),
        }
    }
    let expected: HashSet<String> = (1..=4).map(|n| format!("T-600.r{n}")).collect();
    assert_eq!(serials, expected);
    assert_eq!(exhausted, 36);
    assert_eq!(history(&mut client, "T-600").await.attempts.len(), 4 + 36);
}

#[tokio::test]
async fn a_config_change_takes_effect_on_the_next_decision() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    put(
        &mut client,
        "cfg-1",
        defaults_only(policy(&["TIMEOUT"], 3, 0, 1.0, 0)),
    )
    .await;
    let refused = check(
        &mut client,
        check_request("r-1", "T-700", "t", "", "CONN_RESET"),
    )
    .await;
    assert_eq!(decision(&refused), pb::RetryDecision::NotRetryable);
    assert_eq!(refused.config_version, 1);

    put(
        &mut client,
        "cfg-2",
        defaults_only(policy(&["TIMEOUT", "CONN_RESET"], 3, 0, 1.0, 0)),
    )
    .await;
    let allowed = check(
        &mut client,
        check_request("r-2", "T-700", "t", "", "CONN_RESET"),
    )
    .await;
    assert_eq!(decision(&allowed), pb::RetryDecision::Allow);
    assert_eq!(allowed.config_version, 2);

    let versions: Vec<u64> = history(&mut client, "T-700")
        .await
        .attempts
        .iter()
        .map(|a| a.config_version)
        .collect();
    assert_eq!(versions, [1, 2]);
}

#[tokio::test]
async fn history_links_the_original_and_its_retries_both_ways() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    put(
        &mut client,
        "cfg",
        defaults_only(policy(&["TIMEOUT"], 5, 0, 1.0, 0)),
    )
    .await;
    check(
        &mut client,
        check_request("r-1", "T-800", "t", "mobile", "TIMEOUT"),
    )
    .await;
    check(
        &mut client,
        check_request("r-2", "T-800", "t", "mobile", "CARD_DECLINED"),
    )
    .await;
    // Asking about a retry serial continues its original's history.
    let third = check(
        &mut client,
        check_request("r-3", "T-800.r1", "t", "mobile", "TIMEOUT"),
    )
    .await;
    assert_eq!(third.retry_serial, "T-800.r2");

    let by_original = history(&mut client, "T-800").await;
    assert_eq!(by_original.original_serial, "T-800");
    assert_eq!(by_original.transaction_code, "t");
    let rows: Vec<(String, u32, String, pb::RetryDecision)> = by_original
        .attempts
        .iter()
        .map(|a| {
            (
                a.retry_serial.clone(),
                a.attempt,
                a.error_code.clone(),
                a.decision(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "T-800.r1".into(),
                1,
                "TIMEOUT".into(),
                pb::RetryDecision::Allow
            ),
            (
                String::new(),
                2,
                "CARD_DECLINED".into(),
                pb::RetryDecision::NotRetryable
            ),
            (
                "T-800.r2".into(),
                2,
                "TIMEOUT".into(),
                pb::RetryDecision::Allow
            ),
        ]
    );
    assert!(by_original.attempts.iter().all(|a| a.decided_at.is_some()));

    let by_retry = history(&mut client, "T-800.r2").await;
    assert_eq!(by_retry, by_original);

    let unknown = client
        .get_retry_history(pb::GetRetryHistoryRequest {
            serial: "T-nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// `version` and `updated_at` are ignored on input, so they are no part of what makes two puts
/// the same request: a configuration read back and put again under its first request_id (say,
/// by a client retrying with what it last saw) is a repeat, not another body.
#[tokio::test]
async fn a_config_read_back_and_put_again_under_its_first_request_id_is_replayed() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    let stored = put(&mut client, "cfg-1", layered()).await;
    let read_back = common::shown_retry_config(&server.channel).await;
    assert_eq!(read_back.version, 1);
    assert!(read_back.updated_at.is_some());
    let again = client
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: "cfg-1".into(),
            config: Some(read_back),
        })
        .await
        .unwrap();
    assert_eq!(
        again.metadata().get(sagad::grpc::REPLAYED_HEADER).unwrap(),
        "true"
    );
    assert_eq!(again.into_inner().config.unwrap(), stored);
}

#[tokio::test]
async fn a_repeated_request_id_replays_the_first_decision() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    let request = check_request("r-1", "T-900", "t", "", "TIMEOUT");
    let first = client.check_retry(request.clone()).await.unwrap();
    assert!(!first.metadata().contains_key(sagad::grpc::REPLAYED_HEADER));
    let again = client.check_retry(request.clone()).await.unwrap();
    assert_eq!(
        again.metadata().get(sagad::grpc::REPLAYED_HEADER).unwrap(),
        "true"
    );
    assert_eq!(again.into_inner(), first.into_inner());
    assert_eq!(
        history(&mut client, "T-900").await.attempts.len(),
        1,
        "decided once"
    );

    let mut other_body = request;
    other_body.error_code = "UNAVAILABLE".into();
    let reused = client.check_retry(other_body).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);

    let config = layered();
    let stored = put(&mut client, "cfg", config.clone()).await;
    assert_eq!(
        put(&mut client, "cfg", config).await,
        stored,
        "a repeated put is not a new version"
    );
}

#[tokio::test]
async fn check_retry_refuses_invalid_fields_and_a_changed_transaction_code() {
    let server = TestServer::start().await;
    let mut client = retries(&server);
    let status = client
        .check_retry(check_request("", "", "", "no trailing space ", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "request_id",
            "original_serial",
            "transaction_code",
            "channel",
            "error_code"
        ]
    );

    check(
        &mut client,
        check_request("r-1", "T-1000", "payments.charge", "", "TIMEOUT"),
    )
    .await;
    let changed = client
        .check_retry(check_request("r-2", "T-1000", "refunds", "", "TIMEOUT"))
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::FailedPrecondition);
    assert!(
        changed.message().contains("payments.charge"),
        "{}",
        changed.message()
    );
}

fn sagactl(addr: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "sagactl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_puts_the_example_gets_checks_and_shows_history() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let example = common::repo_path("examples/retry.toml");
    let example = example.to_str().unwrap();

    let stored = sagactl(&addr, &["retry", "put", example, "--request-id", "cfg-1"]);
    assert!(stored.contains("version 1"), "{stored}");
    let replayed = sagactl(&addr, &["retry", "put", example, "--request-id", "cfg-1"]);
    assert!(
        replayed.contains("version 1") && replayed.contains("replayed"),
        "{replayed}"
    );

    let shown = sagactl(&addr, &["retry", "get"]);
    assert!(shown.starts_with("# version 1"), "{shown}");
    assert!(
        shown.contains("payments.charge") && shown.contains("card-network"),
        "{shown}"
    );

    let allowed = sagactl(
        &addr,
        &[
            "retry",
            "check",
            "--original",
            "T-1",
            "--code",
            "payments.charge",
            "--error",
            "ISSUER_BUSY",
            "--channel",
            "card-network",
        ],
    );
    assert!(
        allowed.contains("ALLOW") && allowed.contains("T-1.r1"),
        "{allowed}"
    );
    let refused = sagactl(
        &addr,
        &[
            "retry",
            "check",
            "--original",
            "T-1",
            "--code",
            "payments.charge",
            "--error",
            "TIMEOUT",
            "--channel",
            "branch",
        ],
    );
    assert!(
        refused.contains("NOT_RETRYABLE") && refused.contains("CHANNEL"),
        "{refused}"
    );

    let shown = sagactl(&addr, &["retry", "history", "T-1.r1"]);
    assert!(shown.contains("original:    T-1"), "{shown}");
    assert!(
        shown.contains("T-1.r1") && shown.contains("NOT_RETRYABLE"),
        "{shown}"
    );
}

/// A check that fails (here refused; in practice often a timeout after sagad recorded it) still
/// names the request id sagactl made up, so the operator can repeat that very request instead
/// of a new one that would decide, and use a retry, again.
#[tokio::test(flavor = "multi_thread")]
async fn sagactl_retry_check_names_its_request_id_when_the_call_fails() {
    let server = TestServer::start().await;
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(["--addr", &format!("http://{}", server.addr)])
        .args([
            "retry",
            "check",
            "--original",
            "T 1",
            "--code",
            "payments.charge",
            "--error",
            "TIMEOUT",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("InvalidArgument")
            && stderr.contains("request id sagactl-retry-check-")
            && stderr.contains("--request-id sagactl-retry-check-"),
        "{stderr}"
    );
}
