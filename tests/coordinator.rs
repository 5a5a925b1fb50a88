//! Black-box tests of the Coordinator service against a real sagad on 127.0.0.1:0.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{TestServer, assert_refused, start_request, violated_fields};
use sagad::clock::{ManualClock, SystemClock};
use sagad::config::Config;
use sagad::grpc::{REPLAYED_HEADER, pb};
use tonic::Code;

async fn saga_count(server: &TestServer) -> usize {
    server
        .coordinator()
        .list_sagas(pb::ListSagasRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sagas
        .len()
}

#[tokio::test]
async fn start_saga_stores_the_saga_and_get_saga_returns_it() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    let started = client
        .start_saga(start_request("r-1", "order"))
        .await
        .unwrap()
        .into_inner();
    assert!(started.gsn.starts_with("c1-"), "{}", started.gsn);

    let saga = client
        .get_saga(pb::GetSagaRequest {
            gsn: started.gsn.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.gsn, started.gsn);
    assert_eq!(saga.state, pb::SagaState::Running as i32);
    assert_eq!(saga.business_type, "order");
    assert_eq!(saga.mode, pb::SagaMode::RegisteredOutcalls as i32);
    assert_eq!(saga.payload, br#"{"order":42}"#);
    assert_eq!(saga.content_type, "application/json");
    assert_eq!(saga.labels.get("tenant").map(String::as_str), Some("acme"));
    assert_eq!(saga.request_id, "r-1");
    assert_eq!(saga, started.saga.unwrap());
}

#[tokio::test]
async fn start_saga_twice_with_one_request_id_returns_one_gsn() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    let first = client
        .start_saga(start_request("same", "order"))
        .await
        .unwrap();
    assert!(!first.metadata().contains_key(REPLAYED_HEADER));
    let second = client
        .start_saga(start_request("same", "order"))
        .await
        .unwrap();
    assert_eq!(second.metadata().get(REPLAYED_HEADER).unwrap(), "true");
    assert_eq!(
        first.into_inner(),
        second.into_inner(),
        "a repeat gets the stored response, field for field"
    );
    assert_eq!(saga_count(&server).await, 1);
}

#[tokio::test]
async fn a_request_id_reused_with_another_body_is_failed_precondition() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    client
        .start_saga(start_request("r-1", "order"))
        .await
        .unwrap();
    let err = client
        .start_saga(start_request("r-1", "refund"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("r-1"), "{}", err.message());
    assert_eq!(saga_count(&server).await, 1);
}

/// S3: a client whose answer was lost repeats the very same request, possibly after the
/// deadline it carried has passed; it must get the saga it started, not INVALID_ARGUMENT (which
/// would tempt it to start a second saga under a new request id).
#[tokio::test]
async fn a_repeated_start_gets_its_stored_answer_even_after_its_deadline_has_passed() {
    const START_MS: u64 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.coordinator();
    let request = pb::StartSagaRequest {
        deadline: Some(prost_types::Timestamp {
            seconds: i64::try_from(START_MS / 1000).unwrap() + 5,
            nanos: 0,
        }),
        ..start_request("pay-1", "order")
    };
    let first = client.start_saga(request.clone()).await.unwrap();

    clock.advance_ms(10_000);
    let again = client.start_saga(request.clone()).await.unwrap();
    assert_eq!(again.metadata().get(REPLAYED_HEADER).unwrap(), "true");
    assert_eq!(first.into_inner(), again.into_inner());
    assert_eq!(saga_count(&server).await, 1);

    // A new request with that deadline is still refused.
    let err = client
        .start_saga(pb::StartSagaRequest {
            request_id: "pay-2".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["deadline"]);
    assert_eq!(saga_count(&server).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_start_requests_are_processed_exactly_once() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = server.coordinator();
        tasks.push(tokio::spawn(async move {
            let response = client
                .start_saga(start_request("race", "order"))
                .await
                .unwrap();
            let replayed = response.metadata().contains_key(REPLAYED_HEADER);
            (response.into_inner().gsn, replayed)
        }));
    }
    let mut gsns = BTreeSet::new();
    let mut processed = 0;
    for task in tasks {
        let (gsn, replayed) = task.await.unwrap();
        gsns.insert(gsn);
        if !replayed {
            processed += 1;
        }
    }
    assert_eq!(gsns.len(), 1, "every caller got the same GSN");
    assert_eq!(
        processed, 1,
        "exactly one request was processed; the others were replays"
    );
    assert_eq!(saga_count(&server).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_distinct_starts_get_distinct_increasing_gsns() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut client = server.coordinator();
        tasks.push(tokio::spawn(async move {
            client
                .start_saga(start_request(&format!("r-{i}"), "order"))
                .await
                .unwrap()
                .into_inner()
                .gsn
        }));
    }
    let mut gsns = BTreeSet::new();
    for task in tasks {
        gsns.insert(task.await.unwrap());
    }
    assert_eq!(gsns.len(), 64);
    let sequences: Vec<u64> = gsns
        .iter()
        .map(|g| g.rsplit_once('-').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(sequences, (1..=64).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_orchestrated_saga_of_a_business_type_without_strategy_is_not_found() {
    let server = TestServer::start().await;
    let mut request = start_request("r-1", "order");
    request.mode = pb::SagaMode::Orchestrated as i32;
    let err = server.coordinator().start_saga(request).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"order\""), "{}", err.message());
    assert_eq!(saga_count(&server).await, 0);
}

#[tokio::test]
async fn bad_start_requests_name_every_field_to_fix_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data(dir.path().join("ledger"));
    config.max_payload_bytes = 64;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let mut client = server.coordinator();

    let cases: Vec<(pb::StartSagaRequest, &str)> = vec![
        (
            pb::StartSagaRequest {
                business_type: String::new(),
                ..start_request("a", "x")
            },
            "business_type",
        ),
        (
            pb::StartSagaRequest {
                business_type: "x".repeat(129),
                ..start_request("b", "x")
            },
            "business_type",
        ),
        (
            pb::StartSagaRequest {
                payload: vec![0; 65],
                ..start_request("c", "order")
            },
            "payload",
        ),
        (
            pb::StartSagaRequest {
                mode: 0,
                ..start_request("d", "order")
            },
            "mode",
        ),
        (
            pb::StartSagaRequest {
                mode: 9,
                ..start_request("e", "order")
            },
            "mode",
        ),
        (
            pb::StartSagaRequest {
                request_id: String::new(),
                ..start_request("", "order")
            },
            "request_id",
        ),
        (
            pb::StartSagaRequest {
                deadline: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..start_request("f", "order")
            },
            "deadline",
        ),
    ];
    for (request, field) in cases {
        let err = client.start_saga(request).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field),
            "message names {field}: {}",
            err.message()
        );
        assert_eq!(violated_fields(&err), vec![field.to_owned()]);
    }
    let err = client
        .start_saga(pb::StartSagaRequest {
            payload: vec![0; 65],
            ..start_request("c", "order")
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("at most 64"), "{}", err.message());
    assert_eq!(saga_count(&server).await, 0, "nothing was written");
}

/// A registered-outcall saga has no steps of sagad's own to time out: started without a
/// deadline it gets the server's --outcall-saga-timeout, so a caller that dies before
/// CompleteSaga does not leave what it booked in place for good. Its own deadline wins, and a
/// server configured with 0 gives none.
#[tokio::test]
async fn an_outcall_saga_started_without_a_deadline_gets_the_configured_default() {
    const NOW_S: i64 = 1_800_000_000;
    let deadline_of = |saga: pb::Saga| saga.deadline.map(|d| (d.seconds, d.nanos));
    let clock = Arc::new(ManualClock::new(NOW_S as u64 * 1000));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let client = server.coordinator();
    let started = |request: pb::StartSagaRequest| {
        let mut client = client.clone();
        async move {
            let answer = client.start_saga(request).await.expect("started");
            answer.into_inner().saga.expect("the saga")
        }
    };
    let plain = started(start_request("no-deadline", "transfer")).await;
    assert_eq!(
        deadline_of(plain),
        Some((NOW_S + 24 * 3600, 0)),
        "a day by default"
    );
    let own = started(pb::StartSagaRequest {
        timeout: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..start_request("own-timeout", "transfer")
    })
    .await;
    assert_eq!(deadline_of(own), Some((NOW_S + 60, 0)));
    drop(client);

    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = sagad::config::Config::with_data(dir.path().join("ledger"));
    config.outcall_saga_timeout = std::time::Duration::ZERO;
    let unbounded = TestServer::start_with(config, clock).await;
    let saga = unbounded
        .coordinator()
        .start_saga(start_request("no-default", "transfer"))
        .await
        .expect("started")
        .into_inner()
        .saga
        .expect("the saga");
    assert_eq!(deadline_of(saga), None, "configured off");
}

/// A saga's timeout and deadline are bounded by the 366 days a strategy's saga_timeout may
/// be: beyond that is INVALID_ARGUMENT naming the field, and nothing is stored (a deadline past
/// 9999 would make every later GetSaga and ListSagas unprintable as JSON). A timeout under a
/// millisecond is a 1 ms timeout, not the zero that is refused.
#[tokio::test]
async fn a_timeout_or_deadline_past_366_days_is_refused_and_one_under_a_millisecond_counts_as_one()
{
    const NOW_S: i64 = 1_800_000_000;
    let clock = Arc::new(ManualClock::new(NOW_S as u64 * 1000));
    let server = TestServer::start_with_clock(clock).await;
    let mut client = server.coordinator();
    let day = 24 * 3600;
    let after = |seconds: i64, nanos: i32| prost_types::Duration { seconds, nanos };
    let at = |seconds: i64| prost_types::Timestamp { seconds, nanos: 0 };
    let cases = [
        (
            pb::StartSagaRequest {
                timeout: Some(after(366 * day + 1, 0)),
                ..start_request("long-timeout", "transfer")
            },
            "timeout",
        ),
        (
            pb::StartSagaRequest {
                timeout: Some(after(i64::MAX, 0)),
                ..start_request("huge-timeout", "transfer")
            },
            "timeout",
        ),
        (
            pb::StartSagaRequest {
                deadline: Some(at(NOW_S + 367 * day)),
                ..start_request("far-deadline", "transfer")
            },
            "deadline",
        ),
        (
            pb::StartSagaRequest {
                // 10000-01-01: past what a Timestamp can show.
                deadline: Some(at(253_402_300_800)),
                ..start_request("year-10000", "transfer")
            },
            "deadline",
        ),
    ];
    for (request, field) in cases {
        let err = client.start_saga(request).await.unwrap_err();
        assert_refused(&err, field, "366 days");
    }
    assert_eq!(saga_count(&server).await, 0, "nothing was written");

    let quick = client
        .start_saga(pb::StartSagaRequest {
            timeout: Some(after(0, 500_000)),
            ..start_request("half-a-millisecond", "transfer")
        })
        .await
        .expect("half a millisecond is a timeout, not zero")
        .into_inner()
        .saga
        .unwrap();
    let deadline = quick.deadline.unwrap();
    assert_eq!(
        (deadline.seconds, deadline.nanos),
        (NOW_S, 1_000_000),
        "1 ms after the start"
    );
    let err = client
        .start_saga(pb::StartSagaRequest {
            timeout: Some(after(0, 0)),
            ..start_request("zero", "transfer")
        })
        .await
        .unwrap_err();
    assert_refused(&err, "timeout", "longer than zero");
    client
        .start_saga(pb::StartSagaRequest {
            timeout: Some(after(366 * day, 0)),
            ..start_request("a-year", "transfer")
        })
        .await
        .expect("366 days is allowed");
}

/// A page of ListSagas with `full` holds about 2 MiB of sagas at most, so five sagas with
/// 900 KiB payloads (4.5 MiB, past the 4 MiB a gRPC client receives by default) come two to
/// a page, each readable; without payloads they fit one page.
#[tokio::test]
async fn a_full_listing_pages_by_size_as_well_as_by_count() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    let payload = vec![7u8; 900 * 1024];
    for i in 0..5 {
        client
            .start_saga(pb::StartSagaRequest {
                payload: payload.clone(),
                ..start_request(&format!("big-{i}"), "transfer")
            })
            .await
            .unwrap();
    }
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sagas(pb::ListSagasRequest {
                full: true,
                page_token,
                ..Default::default()
            })
            .await
            .expect("every page fits what a client receives")
            .into_inner();
        assert!(page.sagas.iter().all(|s| s.payload == payload));
        pages.push(page.sagas.len());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        pages,
        [2, 2, 1],
        "a page stops before the saga that would take it past 2 MiB"
    );
    assert_eq!(saga_count(&server).await, 5, "without payloads, one page");
}

/// At --max-payload-bytes' largest (3 MiB), a page just under the 2 MiB budget plus one more
/// saga came to 5 MiB, which a client refuses ("decoded message length too large"): that
/// saga now starts the next page, and a 3 MiB saga comes alone. Every saga is listed once, in
/// order, both ways.
#[tokio::test]
async fn a_full_listing_never_sends_a_page_over_4_mib_at_the_largest_payload_limit() {
    use prost::Message;
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data(dir.path().join("ledger"));
    config.max_payload_bytes = 3 * MIB;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let mut client = server.coordinator();
    let sizes = [2000 * 1024, 3 * MIB, 3 * MIB, 10, 3 * MIB];
    let mut gsns = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let started = client
            .start_saga(pb::StartSagaRequest {
                payload: vec![i as u8; *size],
                ..start_request(&format!("huge-{i}"), "transfer")
            })
            .await
            .unwrap()
            .into_inner();
        gsns.push(started.gsn);
    }
    for newest_first in [false, true] {
        let mut listed = Vec::new();
        let mut page_token = String::new();
        for _ in 0..sizes.len() + 1 {
            let page = client
                .list_sagas(pb::ListSagasRequest {
                    full: true,
                    newest_first,
                    page_token,
                    ..Default::default()
                })
                .await
                .expect("every page fits the 4 MiB a client receives by default")
                .into_inner();
            assert!(page.encoded_len() <= 4 * MIB, "{}", page.encoded_len());
            for saga in &page.sagas {
                let i = gsns.iter().position(|g| *g == saga.gsn).unwrap();
                assert_eq!(saga.payload, vec![i as u8; sizes[i]], "saga {i} whole");
            }
            listed.extend(page.sagas.into_iter().map(|s| s.gsn));
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        assert!(page_token.is_empty(), "the listing ends");
        let mut expected = gsns.clone();
        if newest_first {
            expected.reverse();
        }
        assert_eq!(
            listed, expected,
            "each saga once, in order (newest_first {newest_first})"
        );
    }
}

#[tokio::test]
async fn unknown_and_malformed_gsns_are_told_apart() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    let err = client
        .get_saga(pb::GetSagaRequest {
            gsn: "c1-0000000000000999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .get_saga(pb::GetSagaRequest {
            gsn: "c2-0000000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a GSN of another coordinator is not ours"
    );
    let err = client
        .get_saga(pb::GetSagaRequest {
            gsn: "not-a-gsn".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("<coordinator_id>-<16 digits>"),
        "{}",
        err.message()
    );
    // WatchSaga subscribes before its read, and still tells the three apart the same way.
    for (gsn, code) in [
        ("c1-0000000000000999", Code::NotFound),
        ("c2-0000000000000001", Code::NotFound),
        ("not-a-gsn", Code::InvalidArgument),
    ] {
        let err = client
            .watch_saga(pb::WatchSagaRequest { gsn: gsn.into() })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code(), code, "WatchSaga {gsn}");
    }
}

#[tokio::test]
async fn list_sagas_filters_orders_and_pages() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    for i in 0..7 {
        let business_type = if i % 2 == 0 { "order" } else { "refund" };
        client
            .start_saga(start_request(&format!("r-{i}"), business_type))
            .await
            .unwrap();
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sagas(pb::ListSagasRequest {
                business_type: "order".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sagas.len() <= 2);
        assert!(
            page.sagas.iter().all(|s| s.payload.is_empty()),
            "listings leave payloads out unless full"
        );
        seen.extend(page.sagas.into_iter().map(|s| s.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["r-0", "r-2", "r-4", "r-6"]);

    let newest = client
        .list_sagas(pb::ListSagasRequest {
            newest_first: true,
            page_size: 3,
            states: vec![pb::SagaState::Running as i32],
            full: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = newest.sagas.iter().map(|s| s.request_id.as_str()).collect();
    assert_eq!(ids, ["r-6", "r-5", "r-4"]);
    assert!(!newest.sagas[0].payload.is_empty());

    let none = client
        .list_sagas(pb::ListSagasRequest {
            states: vec![pb::SagaState::Completed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.sagas.is_empty() && none.next_page_token.is_empty());
}

#[tokio::test]
async fn bad_listing_requests_are_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    for request in [
        pb::ListSagasRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        pb::ListSagasRequest {
            page_size: 501,
            ..Default::default()
        },
        pb::ListSagasRequest {
            states: vec![42],
            ..Default::default()
        },
    ] {
        let err = client.list_sagas(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
}

#[tokio::test]
async fn health_is_serving_while_up_and_shutdown_is_clean() {
    let server = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    for service in ["", "sagad.v1.Coordinator", "sagad.v1.Idempotency"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.stop().await.unwrap();
}

/// sagad calls nodes over plain HTTP/2, so an endpoint it could never dial (https, another
/// scheme, no host) is refused when it is registered, saying what to give instead; so is one
/// longer than the stated bound.
#[tokio::test]
async fn an_endpoint_sagad_cannot_dial_is_refused_at_registration() {
    let server = TestServer::start().await;
    let mut client = server.coordinator();
    let register = |request_id: &str, endpoint: &str| pb::RegisterNodeRequest {
        request_id: request_id.into(),
        node_id: "inventory".into(),
        endpoint: endpoint.into(),
    };
    client
        .register_node(register("r-ok", "http://127.0.0.1:7001"))
        .await
        .unwrap();
    let too_long = format!("http://{}.example:7001", "a".repeat(1_024));
    for (i, (endpoint, says)) in [
        ("https://127.0.0.1:7001", "https is not supported"),
        ("127.0.0.1:7001", "must start with http://"),
        ("http://", "http://127.0.0.1:7001"),
        (too_long.as_str(), "at most 1024"),
    ]
    .into_iter()
    .enumerate()
    {
        let err = client
            .register_node(register(&format!("r-bad-{i}"), endpoint))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{endpoint}: {}",
            err.message()
        );
        assert!(
            err.message().contains("endpoint") && err.message().contains(says),
            "{endpoint}: {}",
            err.message()
        );
    }
}
