//! The Idempotency service (S3 offered to participants), end to end over gRPC.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, assert_refused, engine_on};
use sagad::clock::ManualClock;
use sagad::grpc::pb;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use tonic::Code;
use tonic::transport::Channel;

fn begin(scope: &str, request_id: &str) -> pb::BeginRequest {
    pb::BeginRequest {
        scope: scope.into(),
        request_id: request_id.into(),
        fingerprint: b"body-1".to_vec(),
        processing_timeout: None,
    }
}

fn finish(scope: &str, request_id: &str, response: &[u8]) -> pb::FinishRequest {
    pb::FinishRequest {
        scope: scope.into(),
        request_id: request_id.into(),
        result: "SUCCEEDED".into(),
        response: response.to_vec(),
        content_type: "text/plain".into(),
    }
}

const START_MS: u64 = 1_800_000_000_000;

#[tokio::test]
async fn begin_then_finish_then_every_repeat_gets_the_stored_response() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();

    let first = client
        .begin(begin("payments", "tx-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome, pb::BeginOutcome::New as i32);
    assert_eq!(
        first.record.unwrap().state,
        pb::RecordState::Processing as i32
    );

    let concurrent = client
        .begin(begin("payments", "tx-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        concurrent.outcome,
        pb::BeginOutcome::InProgress as i32,
        "a repeat while processing is told in progress"
    );

    let done = client
        .finish(finish("payments", "tx-1", b"charged 10"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.record.unwrap().state, pb::RecordState::Done as i32);

    let repeat = client
        .begin(begin("payments", "tx-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat.outcome, pb::BeginOutcome::Done as i32);
    let record = repeat.record.unwrap();
    assert_eq!(record.response, b"charged 10");
    assert_eq!(record.result, "SUCCEEDED");
    assert_eq!(record.content_type, "text/plain");

    let got = client
        .get(pb::GetRecordRequest {
            scope: "payments".into(),
            request_id: "tx-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.record.unwrap().response, b"charged 10");
}

#[tokio::test]
async fn scopes_keep_serial_numbers_apart() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    assert_eq!(
        client
            .begin(begin("payments", "1"))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        pb::BeginOutcome::New as i32
    );
    assert_eq!(
        client
            .begin(begin("inventory", "1"))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        pb::BeginOutcome::New as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_begins_exactly_one_is_told_to_do_the_work() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = server.idempotency();
        tasks.push(tokio::spawn(async move {
            client
                .begin(begin("payments", "hot"))
                .await
                .unwrap()
                .into_inner()
                .outcome
        }));
    }
    let mut new = 0;
    for task in tasks {
        if task.await.unwrap() == pb::BeginOutcome::New as i32 {
            new += 1;
        }
    }
    assert_eq!(new, 1);
}

#[tokio::test]
async fn misuse_is_refused_with_the_right_code() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    client.begin(begin("payments", "tx-1")).await.unwrap();

    let mut other_body = begin("payments", "tx-1");
    other_body.fingerprint = b"body-2".to_vec();
    assert_eq!(
        client.begin(other_body).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let err = client
        .finish(finish("payments", "never-begun", b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("Begin first"), "{}", err.message());

    client
        .finish(finish("payments", "tx-1", b"a"))
        .await
        .unwrap();
    client
        .finish(finish("payments", "tx-1", b"a"))
        .await
        .expect("the same Finish again is harmless");
    assert_eq!(
        client
            .finish(finish("payments", "tx-1", b"b"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    assert_eq!(
        client.begin(begin("", "tx-1")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .begin(begin("payments", ""))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .get(pb::GetRecordRequest {
                scope: "payments".into(),
                request_id: "nothing".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn an_oversized_fingerprint_or_content_type_is_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let get = |request_id: &str| pb::GetRecordRequest {
        scope: "payments".into(),
        request_id: request_id.into(),
    };

    let mut body_as_fingerprint = begin("payments", "tx-big");
    body_as_fingerprint.fingerprint = vec![7; 513];
    let err = client.begin(body_as_fingerprint).await.unwrap_err();
    assert_refused(&err, "fingerprint", "at most 512");
    assert_eq!(
        client.get(get("tx-big")).await.unwrap_err().code(),
        Code::NotFound,
        "nothing was registered"
    );
    let mut digest = begin("payments", "tx-big");
    digest.fingerprint = vec![7; 512];
    client.begin(digest).await.expect("512 bytes is a digest");

    let mut long_type = finish("payments", "tx-big", b"ok");
    long_type.content_type = "t".repeat(129);
    let err = client.finish(long_type).await.unwrap_err();
    assert_refused(&err, "content_type", "at most 128");
    let record = client
        .get(get("tx-big"))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(
        record.state,
        pb::RecordState::Processing as i32,
        "nothing was finished"
    );
    let mut at_limit = finish("payments", "tx-big", b"ok");
    at_limit.content_type = "t".repeat(128);
    let record = client
        .finish(at_limit)
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(record.content_type, "t".repeat(128));
}

#[tokio::test]
async fn a_processing_lease_that_expired_is_handed_to_the_next_caller() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.idempotency();
    let mut leased = begin("payments", "tx-1");
    leased.processing_timeout = Some(prost_types::Duration {
        seconds: 30,
        nanos: 0,
    });

    assert_eq!(
        client
            .begin(leased.clone())
            .await
            .unwrap()
            .into_inner()
            .outcome,
        pb::BeginOutcome::New as i32
    );
    clock.advance_ms(29_000);
    assert_eq!(
        client
            .begin(leased.clone())
            .await
            .unwrap()
            .into_inner()
            .outcome,
        pb::BeginOutcome::InProgress as i32
    );
    clock.advance_ms(1_000);
    let taken = client.begin(leased).await.unwrap().into_inner();
    assert_eq!(taken.outcome, pb::BeginOutcome::New as i32);
    assert_eq!(taken.record.unwrap().attempts, 2);
}

/// An operator reading a stuck PROCESSING record sees which lease it holds and when the next
/// Begin will take it over; a record without a lease, or a finished one, shows no takeover.
#[tokio::test]
async fn a_record_shows_its_lease_and_when_it_can_be_taken_over() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.idempotency();
    let leased = begun(
        &mut client,
        with_lease(begin("payments", "tx-leased"), 30, 0),
    )
    .await;
    assert_eq!(
        leased.processing_timeout,
        Some(prost_types::Duration {
            seconds: 30,
            nanos: 0
        })
    );
    let takeover = leased
        .takeover_at
        .expect("a PROCESSING record with a lease");
    let updated = leased.updated_at.expect("always set");
    assert_eq!(takeover.seconds - updated.seconds, 30);
    assert_eq!(takeover.nanos, updated.nanos);

    // A Begin with a shorter lease does not change the holder's, so neither moves.
    clock.advance_ms(5_000);
    let repeat = begun(
        &mut client,
        with_lease(begin("payments", "tx-leased"), 1, 0),
    )
    .await;
    assert_eq!(repeat.takeover_at, Some(takeover));

    let done = client
        .finish(finish("payments", "tx-leased", b"ok"))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(
        done.takeover_at, None,
        "a finished record is never taken over"
    );
    assert!(done.processing_timeout.is_some());

    let unleased = begun(&mut client, begin("payments", "tx-plain")).await;
    assert_eq!(unleased.processing_timeout, None);
    assert_eq!(unleased.takeover_at, None);
}

/// The record a Begin answers with.
async fn begun(
    client: &mut IdempotencyClient<Channel>,
    request: pb::BeginRequest,
) -> pb::IdempotencyRecord {
    let answer = client.begin(request).await.unwrap().into_inner();
    answer.record.expect("Begin answers with the record")
}

fn with_lease(mut request: pb::BeginRequest, seconds: i64, nanos: i32) -> pb::BeginRequest {
    request.processing_timeout = Some(prost_types::Duration { seconds, nanos });
    request
}

/// A lease under a millisecond is a lease of 1 ms, not one of 0 that has always expired: a
/// concurrent Begin in the same millisecond is told IN_PROGRESS, not handed the work again.
#[tokio::test]
async fn a_lease_under_a_millisecond_is_one_millisecond_long() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.idempotency();
    let leased = || with_lease(begin("payments", "tx-short"), 0, 500_000);

    let first = client.begin(leased()).await.unwrap().into_inner();
    assert_eq!(first.outcome, pb::BeginOutcome::New as i32);
    let second = client.begin(leased()).await.unwrap().into_inner();
    assert_eq!(
        second.outcome,
        pb::BeginOutcome::InProgress as i32,
        "the work is not handed out twice"
    );
    clock.advance_ms(1);
    let taken = client.begin(leased()).await.unwrap().into_inner();
    assert_eq!(taken.outcome, pb::BeginOutcome::New as i32);
    assert_eq!(taken.record.unwrap().attempts, 2);

    let zero = client
        .begin(with_lease(begin("payments", "tx-zero"), 0, 0))
        .await
        .unwrap_err();
    assert_refused(&zero, "processing_timeout", "longer than zero");
}

#[tokio::test]
async fn a_later_begin_with_a_shorter_lease_does_not_take_over_the_holders_lease() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.idempotency();

    let first = client
        .begin(with_lease(begin("payments", "tx-1"), 60, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome, pb::BeginOutcome::New as i32);
    clock.advance_ms(2_000);
    // Worker B's 1 s lease would have run out; worker A's 60 s lease has not, and it is A's.
    let second = client
        .begin(with_lease(begin("payments", "tx-1"), 1, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.outcome, pb::BeginOutcome::InProgress as i32);
    assert_eq!(second.record.unwrap().attempts, 1);

    // Once A's own lease runs out, the transaction is handed over as before.
    clock.advance_ms(58_000);
    let taken = client
        .begin(with_lease(begin("payments", "tx-1"), 1, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(taken.outcome, pb::BeginOutcome::New as i32);
    assert_eq!(taken.record.unwrap().attempts, 2);
}

#[tokio::test]
async fn a_guard_registration_cannot_be_taken_over_by_a_begin_with_a_lease() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock.clone()).await;
    let mut client = server.idempotency();

    let guarded = client
        .guard(pb::GuardRequest {
            node_id: "inventory".into(),
            gsn: "c1-0000000000000007".into(),
            branch_id: "reserve".into(),
            action: pb::BranchAction::Forward as i32,
            command_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guarded.verdict, pb::GuardVerdict::Proceed as i32);
    let record = guarded.record.unwrap();
    clock.advance_ms(10_000);

    // Begin has no say in the barrier's scope at all: refused, and the registration is kept.
    let asked = begin(&record.scope, &record.request_id);
    let refused = client
        .begin(with_lease(asked, 0, 1_000_000))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let kept = client
        .get(pb::GetRecordRequest {
            scope: record.scope.clone(),
            request_id: record.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(
        (kept.state, kept.attempts),
        (pb::RecordState::Processing as i32, 1)
    );
}

#[tokio::test]
async fn records_expire_after_the_retention_and_are_collected() {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let store = sagad::store::Store::open(sagad::store::Options::new(dir.path())).unwrap();
    let engine = engine_on(&store, clock.clone(), Some(Duration::from_secs(3600)));
    engine
        .begin("payments", "old", Vec::new(), None)
        .await
        .unwrap();
    clock.advance_ms(1_800_000);
    engine
        .begin("payments", "young", Vec::new(), None)
        .await
        .unwrap();

    clock.advance_ms(1_800_000);
    assert_eq!(
        engine.collect_expired(100).await.unwrap().removed,
        1,
        "only the record past its retention goes"
    );
    assert!(matches!(
        engine.get_record("payments", "old").await,
        Err(sagad::engine::Error::NotFound(_))
    ));
    assert!(engine.get_record("payments", "young").await.is_ok());
    store.close().await.unwrap();
}
