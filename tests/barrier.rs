//! The participants' branch barrier (Idempotency.Guard, then Finish), end to end over gRPC:
//! each action PROCEEDs at most once, a reversal before its forward action is a null
//! compensation, and a forward action after its reversal is refused.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::sync::Arc;

use common::TestServer;
use sagad::clock::ManualClock;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use sagad::grpc::pb::{self, BranchAction, GuardVerdict, RecordState};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const GSN: &str = "c1-0000000000000007";
const FORWARD: BranchAction = BranchAction::Forward;
const REVERSAL: BranchAction = BranchAction::Reversal;

fn request(node: &str, gsn: &str, branch: &str, action: BranchAction) -> pb::GuardRequest {
    pb::GuardRequest {
        node_id: node.into(),
        gsn: gsn.into(),
        branch_id: branch.into(),
        action: action as i32,
        command_id: String::new(),
    }
}

/// A Guard of `branch`'s reversal for the Reverse sent as `command_id`.
async fn guard_reverse(
    client: &mut IdempotencyClient<Channel>,
    branch: &str,
    command_id: &str,
) -> (GuardVerdict, pb::IdempotencyRecord) {
    guard_as(client, branch, REVERSAL, command_id).await
}

/// A Guard of `branch`'s `action` for the command sent as `command_id`.
async fn guard_as(
    client: &mut IdempotencyClient<Channel>,
    branch: &str,
    action: BranchAction,
    command_id: &str,
) -> (GuardVerdict, pb::IdempotencyRecord) {
    let response = client
        .guard(pb::GuardRequest {
            command_id: command_id.into(),
            ..request("inventory", GSN, branch, action)
        })
        .await
        .unwrap()
        .into_inner();
    (
        GuardVerdict::try_from(response.verdict).unwrap(),
        response.record.unwrap(),
    )
}

async fn guard(
    client: &mut IdempotencyClient<Channel>,
    branch: &str,
    action: BranchAction,
) -> (GuardVerdict, pb::IdempotencyRecord) {
    let response = client
        .guard(request("inventory", GSN, branch, action))
        .await
        .unwrap()
        .into_inner();
    (
        GuardVerdict::try_from(response.verdict).unwrap(),
        response.record.unwrap(),
    )
}

/// Step 3 of the three calls: Finish with the names the Guard answer gave.
async fn finish(
    client: &mut IdempotencyClient<Channel>,
    record: &pb::IdempotencyRecord,
    result: &str,
    response: &[u8],
) -> pb::IdempotencyRecord {
    client
        .finish(pb::FinishRequest {
            scope: record.scope.clone(),
            request_id: record.request_id.clone(),
            result: result.into(),
            response: response.to_vec(),
            content_type: "text/plain".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap()
}

#[tokio::test]
async fn a_forward_finished_then_guarded_again_is_a_duplicate_with_the_stored_response() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();

    let (verdict, record) = guard(&mut client, "reserve", FORWARD).await;
    assert_eq!(verdict, GuardVerdict::Proceed);
    assert_eq!(record.scope, format!("guard/inventory/{GSN}"));
    assert_eq!(record.request_id, "reserve/forward");
    assert_eq!(record.state, RecordState::Processing as i32);

    let done = finish(&mut client, &record, "SUCCEEDED", b"reserved 3").await;
    assert_eq!(done.state, RecordState::Done as i32);

    let (verdict, repeat) = guard(&mut client, "reserve", FORWARD).await;
    assert_eq!(verdict, GuardVerdict::Duplicate);
    assert_eq!(repeat.response, b"reserved 3");
    assert_eq!(repeat.result, "SUCCEEDED");
    assert_eq!(repeat.content_type, "text/plain");
}

#[tokio::test]
async fn a_duplicate_forward_while_the_first_runs_is_in_progress() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    assert_eq!(
        guard(&mut client, "reserve", FORWARD).await.0,
        GuardVerdict::Proceed
    );
    let (verdict, record) = guard(&mut client, "reserve", FORWARD).await;
    assert_eq!(verdict, GuardVerdict::InProgress);
    assert_eq!(record.request_id, "reserve/forward");
}

/// A forward action Finished FAILED did nothing: a new Execute (sagad's retry of the step)
/// runs it again, while a redelivery of the Execute that failed, or a Guard that does not say
/// which Execute it guards, is answered from the failed record.
#[tokio::test]
async fn a_forward_finished_failed_runs_again_for_a_new_execute_not_for_a_redelivery() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let first_send = format!("{GSN}:e3.1");
    let (_, record) = guard_as(&mut client, "reserve", FORWARD, &first_send).await;
    finish(&mut client, &record, "FAILED", b"out of stock").await;
    for sent_as in [first_send.as_str(), ""] {
        let (verdict, repeat) = guard_as(&mut client, "reserve", FORWARD, sent_as).await;
        assert_eq!(verdict, GuardVerdict::Duplicate, "{sent_as:?}");
        assert_eq!(
            (repeat.result.as_str(), repeat.response.as_slice()),
            ("FAILED", b"out of stock".as_slice())
        );
    }
    let retry = format!("{GSN}:e9.2");
    let (verdict, again) = guard_as(&mut client, "reserve", FORWARD, &retry).await;
    assert_eq!(verdict, GuardVerdict::Proceed);
    assert_eq!(
        (again.state, again.attempts),
        (RecordState::Processing as i32, 2)
    );
    finish(&mut client, &again, "SUCCEEDED", b"reserved 3").await;
    // Succeeded is final, whatever command asks.
    let (verdict, done) = guard_as(&mut client, "reserve", FORWARD, &format!("{GSN}:e10.3")).await;
    assert_eq!(verdict, GuardVerdict::Duplicate);
    assert_eq!(done.response, b"reserved 3");
}

#[tokio::test]
async fn a_duplicate_reversal_runs_once_and_is_then_answered_from_its_record() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (_, forward) = guard(&mut client, "reserve", FORWARD).await;
    finish(&mut client, &forward, "SUCCEEDED", b"reserved").await;

    let (verdict, reversal) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::Proceed);
    assert_eq!(reversal.request_id, "reserve/reversal");
    assert_eq!(
        guard(&mut client, "reserve", REVERSAL).await.0,
        GuardVerdict::InProgress,
        "a repeat while the reversal runs"
    );
    finish(&mut client, &reversal, "SUCCEEDED", b"released").await;

    let (verdict, repeat) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::Duplicate);
    assert_eq!(repeat.response, b"released");
}

/// A new Reverse (another command id: a retry, or ReprocessSaga after an operator fixed the
/// cause) runs a reversal Finished FAILED again; a redelivery of the Reverse that failed keeps
/// its id and is answered from the failed record, so a slow reversal is not run again outside
/// the retry policy; one that then succeeds is final.
#[tokio::test]
async fn a_reversal_finished_failed_runs_again_for_a_new_reverse_not_for_a_redelivery() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (_, forward) = guard(&mut client, "charge", FORWARD).await;
    finish(&mut client, &forward, "SUCCEEDED", b"charged").await;
    const FIRST: &str = "c1-0000000000000007:r4.1";
    const RETRY: &str = "c1-0000000000000007:r9.2";

    let (verdict, first) = guard_reverse(&mut client, "charge", FIRST).await;
    assert_eq!(verdict, GuardVerdict::Proceed);
    finish(&mut client, &first, "FAILED", b"issuer down").await;
    for redelivered in [FIRST, ""] {
        let (verdict, shown) = guard_reverse(&mut client, "charge", redelivered).await;
        assert_eq!(verdict, GuardVerdict::Duplicate, "{redelivered:?}");
        assert_eq!(shown.response, b"issuer down");
    }

    let (verdict, second) = guard_reverse(&mut client, "charge", RETRY).await;
    assert_eq!(
        verdict,
        GuardVerdict::Proceed,
        "a new Reverse runs it again"
    );
    assert_eq!(second.attempts, 2);
    assert_eq!(second.state, RecordState::Processing as i32);
    assert!(
        second.response.is_empty(),
        "the failed answer is not shown as this run's"
    );
    assert_eq!(
        guard_reverse(&mut client, "charge", RETRY).await.0,
        GuardVerdict::InProgress
    );
    assert_eq!(
        guard(&mut client, "charge", FORWARD).await.0,
        GuardVerdict::Hanging,
        "the forward action stays refused while its reversal runs again"
    );
    finish(&mut client, &second, "SUCCEEDED", b"refunded").await;

    let (verdict, repeat) = guard_reverse(&mut client, "charge", "c1-0000000000000007:r11.3").await;
    assert_eq!(
        verdict,
        GuardVerdict::Duplicate,
        "a succeeded reversal is final"
    );
    assert_eq!(repeat.response, b"refunded");
}

/// Begin in the barrier's scope would register a forward action without reading its
/// reversal's record, so it could run after its compensation: only Guard registers there.
#[tokio::test]
async fn begin_in_a_barrier_scope_is_refused_and_cannot_bypass_a_tombstone() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (verdict, tombstone) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::NullCompensation);
    let status = client
        .begin(pb::BeginRequest {
            scope: tombstone.scope.clone(),
            request_id: "reserve/forward".into(),
            fingerprint: Vec::new(),
            processing_timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Guard"), "{}", status.message());
    assert_eq!(
        guard(&mut client, "reserve", FORWARD).await.0,
        GuardVerdict::Hanging
    );
}

#[tokio::test]
async fn a_reversal_before_its_forward_is_a_null_compensation_and_the_late_forward_is_hanging() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();

    let (verdict, tombstone) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::NullCompensation);
    assert_eq!(tombstone.request_id, "reserve/reversal");
    assert_eq!(tombstone.state, RecordState::Done as i32);
    assert_eq!(tombstone.result, "NULL_COMPENSATION");

    let (verdict, refusal) = guard(&mut client, "reserve", FORWARD).await;
    assert_eq!(verdict, GuardVerdict::Hanging);
    assert_eq!(
        refusal.request_id, "reserve/reversal",
        "the record shown is the tombstone that refuses it"
    );

    let (verdict, again) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::Duplicate);
    assert_eq!(again.result, "NULL_COMPENSATION");

    let forward = client
        .get(pb::GetRecordRequest {
            scope: format!("guard/inventory/{GSN}"),
            request_id: "reserve/forward".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        forward.code(),
        Code::NotFound,
        "the refused forward registered nothing"
    );
}

#[tokio::test]
async fn a_forward_after_its_reversal_is_hanging() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (_, forward) = guard(&mut client, "reserve", FORWARD).await;
    finish(&mut client, &forward, "SUCCEEDED", b"reserved").await;
    let (_, reversal) = guard(&mut client, "reserve", REVERSAL).await;

    assert_eq!(
        guard(&mut client, "reserve", FORWARD).await.0,
        GuardVerdict::Hanging,
        "while the reversal runs"
    );
    finish(&mut client, &reversal, "SUCCEEDED", b"released").await;
    assert_eq!(
        guard(&mut client, "reserve", FORWARD).await.0,
        GuardVerdict::Hanging,
        "after the reversal finished"
    );
}

#[tokio::test]
async fn a_reversal_while_its_forward_runs_waits_and_proceeds_once_the_forward_finished() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (_, forward) = guard(&mut client, "reserve", FORWARD).await;

    let (verdict, running) = guard(&mut client, "reserve", REVERSAL).await;
    assert_eq!(verdict, GuardVerdict::InProgress);
    assert_eq!(
        running.request_id, "reserve/forward",
        "the record shown is the forward still running"
    );

    finish(&mut client, &forward, "SUCCEEDED", b"reserved").await;
    assert_eq!(
        guard(&mut client, "reserve", REVERSAL).await.0,
        GuardVerdict::Proceed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_guards_for_one_branch_action_exactly_one_proceeds() {
    let server = TestServer::start().await;
    for action in [FORWARD, REVERSAL] {
        if action == REVERSAL {
            // A reversal can only PROCEED once its forward action finished.
            let mut client = server.idempotency();
            let (_, forward) = guard(&mut client, "reserve", FORWARD).await;
            finish(&mut client, &forward, "SUCCEEDED", b"reserved").await;
        }
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut client = server.idempotency();
            tasks.push(tokio::spawn(async move {
                guard(&mut client, "reserve", action).await.0
            }));
        }
        let mut verdicts = Vec::new();
        for task in tasks {
            verdicts.push(task.await.unwrap());
        }
        let proceeded = verdicts
            .iter()
            .filter(|v| **v == GuardVerdict::Proceed)
            .count();
        assert_eq!(proceeded, 1, "{action:?}: {verdicts:?}");
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, GuardVerdict::Proceed | GuardVerdict::InProgress)),
            "{verdicts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_and_a_reversal_racing_on_a_fresh_branch_never_both_run() {
    let server = TestServer::start().await;
    for round in 0..16 {
        let branch = format!("race-{round}");
        let (mut a, mut b) = (server.idempotency(), server.idempotency());
        let (forward_branch, reversal_branch) = (branch.clone(), branch.clone());
        let forward = tokio::spawn(async move { guard(&mut a, &forward_branch, FORWARD).await.0 });
        let reversal =
            tokio::spawn(async move { guard(&mut b, &reversal_branch, REVERSAL).await.0 });
        let verdicts = (forward.await.unwrap(), reversal.await.unwrap());
        assert!(
            matches!(
                verdicts,
                (GuardVerdict::Proceed, GuardVerdict::InProgress)
                    | (GuardVerdict::Hanging, GuardVerdict::NullCompensation)
            ),
            "{branch}: {verdicts:?}"
        );
    }
}

#[tokio::test]
async fn nodes_sagas_and_branches_each_have_their_own_barrier() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    for (node, gsn, branch) in [
        ("inventory", GSN, "reserve"),
        ("payments", GSN, "reserve"),
        ("inventory", "c1-0000000000000008", "reserve"),
        ("inventory", GSN, "reserve-2"),
    ] {
        let verdict = client
            .guard(request(node, gsn, branch, FORWARD))
            .await
            .unwrap()
            .into_inner()
            .verdict;
        assert_eq!(
            verdict,
            GuardVerdict::Proceed as i32,
            "{node} {gsn} {branch}"
        );
    }
}

#[tokio::test]
async fn a_tombstone_cannot_be_finished_into_something_else() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    let (_, tombstone) = guard(&mut client, "reserve", REVERSAL).await;
    let refused = client
        .finish(pb::FinishRequest {
            scope: tombstone.scope.clone(),
            request_id: tombstone.request_id.clone(),
            result: "SUCCEEDED".into(),
            response: b"released".to_vec(),
            content_type: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn guard_records_expire_with_the_usual_retention() {
    const START_MS: u64 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(START_MS));
    let server = TestServer::start_with_clock(clock).await;
    let mut client = server.idempotency();
    let (_, record) = guard(&mut client, "reserve", FORWARD).await;
    let expires = record.expires_at.unwrap();
    let retention_s = 7 * 24 * 3600;
    assert_eq!(
        expires.seconds,
        (START_MS / 1000) as i64 + retention_s,
        "the default retention is 7 days"
    );
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn invalid_guards_are_refused_naming_every_bad_field() {
    let server = TestServer::start().await;
    let mut client = server.idempotency();
    // Fits alone; composed into the reversal key it passes 128.
    let long_branch = "b".repeat(120);
    // What a participant might pass by mistake: the command's id, or its own order number.
    let command_id = format!("{GSN}:e7.1");
    let cases: Vec<(pb::GuardRequest, Vec<&str>)> = vec![
        (request("", GSN, "reserve", FORWARD), vec!["node_id"]),
        (request("inventory", "", "reserve", FORWARD), vec!["gsn"]),
        (request("inventory", GSN, "", REVERSAL), vec!["branch_id"]),
        (
            request("inventory", GSN, "reserve", BranchAction::Unspecified),
            vec!["action"],
        ),
        (
            pb::GuardRequest {
                action: 9,
                ..request("", "", "", FORWARD)
            },
            vec!["action", "node_id", "gsn", "branch_id"],
        ),
        (
            request("inv/entory", GSN, "reserve", FORWARD),
            vec!["node_id"],
        ),
        (
            request("inventory", &command_id, "reserve", FORWARD),
            vec!["gsn"],
        ),
        (
            request("inventory", "order-42", "reserve", FORWARD),
            vec!["gsn"],
        ),
        (
            request("inventory", GSN, &long_branch, FORWARD),
            vec!["branch_id"],
        ),
    ];
    for (bad, fields) in cases {
        let status = client.guard(bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violations(&status), fields, "{bad:?}: {}", status.message());
    }
    let message = client
        .guard(request("inventory", GSN, &long_branch, FORWARD))
        .await
        .unwrap_err()
        .message()
        .to_owned();
    assert!(
        message.contains("branch_id") && message.contains("128"),
        "the message names the field and the limit: {message}"
    );
    let message = client
        .guard(request("inventory", &command_id, "reserve", FORWARD))
        .await
        .unwrap_err()
        .message()
        .to_owned();
    assert!(
        message.contains("not a GSN") && message.contains("not its command_id"),
        "the message says what a gsn is: {message}"
    );
}

/// Starts a registered-outcall saga on `engine` with no outcalls yet (it runs until completed).
async fn start_outcall_saga(engine: &sagad::engine::Engine, request_id: &str) {
    use sagad::domain::saga::{Deadline, SagaMode, StartRequest};
    let request = StartRequest {
        request_id: request_id.into(),
        business_type: "transfer".into(),
        mode: Some(SagaMode::RegisteredOutcalls),
        payload: Vec::new(),
        content_type: String::new(),
        labels: Default::default(),
        deadline: Deadline::None,
    };
    engine
        .start_saga(request, Vec::new(), |_| (Vec::new(), ()))
        .await
        .unwrap();
}

/// A forward record that expired while its saga could still reverse would make the saga's
/// reversal look like a null compensation: the booking would stay. Barrier records are kept
/// while their saga runs, and while it is COMPLETED too (a node undoing a step and an
/// operator's ReprocessSaga reverse the rest, however late); they are collected as usual
/// once sagad no longer holds the saga (removed by its retention, or unknown).
#[tokio::test]
async fn barrier_records_outlive_their_retention_while_their_saga_may_still_reverse() {
    use sagad::domain::barrier::{Action, Verdict};
    use sagad::domain::idempotency::Answer;

    const START_MS: u64 = 1_800_000_000_000;
    const HOUR_MS: u64 = 3_600_000;
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let store = sagad::store::Store::open(sagad::store::Options::new(dir.path())).unwrap();
    let engine = common::engine_on(
        &store,
        clock.clone(),
        Some(std::time::Duration::from_secs(3600)),
    );
    start_outcall_saga(&engine, "s-1").await;
    let live = "c1-0000000000000001";
    let unknown = "c1-0000000000000099";
    let done = |result: &str| Answer {
        result: result.into(),
        response: Vec::new(),
        content_type: String::new(),
    };
    let mut forwards = Vec::new();
    for gsn in [live, unknown] {
        let guarded = engine
            .guard("bank", gsn, "1.bank", Action::Forward, "")
            .await
            .unwrap();
        assert_eq!(guarded.verdict, Verdict::Proceed);
        engine
            .finish(&guarded.scope, &guarded.request_id, done("SUCCEEDED"))
            .await
            .unwrap();
        forwards.push((guarded.scope, guarded.request_id));
    }
    let kept = |engine: &sagad::engine::Engine, (scope, request_id): &(String, String)| {
        let (engine, scope, request_id) = (engine.clone(), scope.clone(), request_id.clone());
        async move { engine.get_record(&scope, &request_id).await.is_ok() }
    };

    clock.advance_ms(2 * HOUR_MS);
    engine.collect_expired(100).await.unwrap();
    assert!(
        kept(&engine, &forwards[0]).await,
        "the running saga's record stays"
    );
    assert!(
        !kept(&engine, &forwards[1]).await,
        "the record of a saga sagad does not know goes"
    );
    let reversal = engine
        .guard("bank", live, "1.bank", Action::Reversal, "")
        .await
        .unwrap();
    assert_eq!(
        reversal.verdict,
        Verdict::Proceed,
        "the booking is still known, so its reversal runs"
    );
    engine
        .finish(&reversal.scope, &reversal.request_id, done("SUCCEEDED"))
        .await
        .unwrap();

    engine
        .complete_saga("done-1", live, Vec::new(), |_| Vec::new())
        .await
        .unwrap();
    clock.advance_ms(2 * HOUR_MS);
    engine.collect_expired(100).await.unwrap();
    assert!(
        kept(&engine, &forwards[0]).await,
        "a COMPLETED saga may still be reversed, so its records stay"
    );
    assert_eq!(
        engine
            .collect_finished_sagas(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        1
    );
    clock.advance_ms(2 * HOUR_MS);
    engine.collect_expired(100).await.unwrap();
    assert!(
        !kept(&engine, &forwards[0]).await,
        "once the saga is gone, its records go as usual"
    );
    assert!(
        !kept(
            &engine,
            &(reversal.scope.clone(), reversal.request_id.clone())
        )
        .await
    );
    store.close().await.unwrap();
}

/// Records held for their saga use up a collection's batch without being collected, so the
/// collection says how many it looked at, and the records it holds are not looked at again
/// until their new time: the next batch reaches the expired records behind them. A COMPLETED
/// saga's records are held until a retention after saga retention would remove the saga, not
/// rewritten every idempotency retention for as long as it is kept.
#[tokio::test]
async fn records_held_for_their_saga_fill_a_batch_and_the_next_reaches_the_ones_behind() {
    use sagad::domain::barrier::{Action, Verdict};
    use sagad::domain::idempotency::Answer;

    const START_MS: u64 = 1_800_000_000_000;
    const HOUR_MS: u64 = 3_600_000;
    const DAY_MS: u64 = 24 * HOUR_MS;
    let clock = Arc::new(ManualClock::new(START_MS));
    let dir = tempfile::tempdir().unwrap();
    let store = sagad::store::Store::open(sagad::store::Options::new(dir.path())).unwrap();
    let defaults =
        sagad::engine::Settings::new(sagad::domain::ids::CoordinatorId::parse("c1").unwrap());
    let engine = sagad::engine::Engine::new(
        store.clone(),
        clock.clone(),
        Arc::new(sagad::random::FixedRandom(0.5)),
        sagad::engine::Settings {
            idempotency_retention: std::time::Duration::from_secs(3600),
            saga_retention: std::time::Duration::from_secs(30 * 24 * 3600),
            ..defaults
        },
    );
    start_outcall_saga(&engine, "s-1").await;
    let gsn = "c1-0000000000000001";
    let mut guarded = Vec::new();
    for branch in ["1.bank", "2.bank", "3.bank"] {
        let g = engine
            .guard("bank", gsn, branch, Action::Forward, "")
            .await
            .unwrap();
        assert_eq!(g.verdict, Verdict::Proceed);
        let done = Answer {
            result: "SUCCEEDED".into(),
            response: Vec::new(),
            content_type: String::new(),
        };
        engine.finish(&g.scope, &g.request_id, done).await.unwrap();
        guarded.push((g.scope, g.request_id));
    }
    // Registered after the barrier's records, so it comes due after them.
    clock.advance_ms(1);
    engine
        .begin("payments", "plain", Vec::new(), None)
        .await
        .unwrap();

    clock.advance_ms(2 * HOUR_MS);
    // The StartSaga's own record goes; the barrier's three are held, and fill the batch.
    let first = engine.collect_expired(4).await.unwrap();
    assert_eq!(
        (first.removed, first.examined),
        (1, 4),
        "a full batch, mostly of held records"
    );
    let second = engine.collect_expired(4).await.unwrap();
    assert_eq!((second.removed, second.examined), (1, 1));
    assert!(engine.get_record("payments", "plain").await.is_err());

    // Completed, the saga is kept 30 days: its records are held past that, once.
    engine
        .complete_saga("done-1", gsn, Vec::new(), |_| Vec::new())
        .await
        .unwrap();
    let completed_ms = sagad::clock::Clock::now_ms(clock.as_ref());
    clock.advance_ms(2 * HOUR_MS);
    // CompleteSaga's own record goes; the barrier's are held again.
    let held = engine.collect_expired(10).await.unwrap();
    assert_eq!((held.removed, held.examined), (1, 4));
    for (scope, request_id) in &guarded {
        let record = engine.get_record(scope, request_id).await.unwrap();
        assert_eq!(record.expires_ms, completed_ms + 30 * DAY_MS + HOUR_MS);
    }
    clock.advance_ms(10 * DAY_MS);
    let later = engine.collect_expired(10).await.unwrap();
    assert_eq!(later.examined, 0, "nothing is due again before then");
    store.close().await.unwrap();
}
