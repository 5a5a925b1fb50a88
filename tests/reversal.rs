//! The reversal protocol (S1) end to end: a real sagad, real participant servers, and a caller
//! that registers its outcalls, makes them, reports them, and asks for reversals.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::orders::{eventually, get, register_node};
use common::participant::{Node, PushParticipant, Script};
use common::{TestServer, assert_refused};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

const LIMIT: Duration = Duration::from_secs(20);

struct Bank {
    server: TestServer,
    caller: PushParticipant,
    nodes: Vec<PushParticipant>,
}

/// Three callee nodes a, b, c and the caller "orders", all registered; retries come fast.
async fn bank() -> Bank {
    let server = TestServer::start().await;
    let caller = PushParticipant::start(Node::new("orders")).await;
    register_node(&server.channel, "orders", &caller.endpoint()).await;
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let node = PushParticipant::start(Node::new(id)).await;
        register_node(&server.channel, id, &node.endpoint()).await;
        nodes.push(node);
    }
    pb::retries_client::RetriesClient::new(server.channel.clone())
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: "fast-retries".into(),
            config: Some(pb::RetryConfig {
                defaults: Some(pb::RetryPolicy {
                    retryable_codes: vec!["UNAVAILABLE".into()],
                    max_retries: Some(5),
                    min_interval: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 50_000_000,
                    }),
                    backoff_factor: Some(1.0),
                    max_interval: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    Bank {
        server,
        caller,
        nodes,
    }
}

impl Bank {
    fn node(&self, id: &str) -> &Node {
        &self
            .nodes
            .iter()
            .find(|n| n.node.node_id == id)
            .unwrap()
            .node
    }

    fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.server.channel.clone())
    }

    async fn start(&self, request_id: &str) -> String {
        self.start_with(request_id, Vec::new()).await
    }

    /// Starts a saga carrying `payload`.
    async fn start_with(&self, request_id: &str, payload: Vec<u8>) -> String {
        self.client()
            .start_saga(pb::StartSagaRequest {
                request_id: request_id.into(),
                business_type: "transfer".into(),
                mode: pb::SagaMode::RegisteredOutcalls as i32,
                payload,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .gsn
    }

    async fn register(&self, gsn: &str, order: u32, callee: &str) -> String {
        self.register_with(gsn, order, callee, Vec::new()).await
    }

    /// Registers an outcall with a payload of its own (none if empty).
    async fn register_with(&self, gsn: &str, order: u32, callee: &str, payload: Vec<u8>) -> String {
        self.client()
            .register_outcall(pb::RegisterOutcallRequest {
                request_id: format!("{gsn}-reg-{order}"),
                gsn: gsn.into(),
                caller_node_id: "orders".into(),
                callee_node_id: callee.into(),
                forward_action: format!("debit-{callee}"),
                reversal_action: format!("credit-{callee}"),
                order,
                payload,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .branch_id
    }

    async fn report(&self, gsn: &str, branch_id: &str, outcome: pb::Outcome) {
        self.client()
            .report_state(pb::ReportStateRequest {
                request_id: format!("{gsn}-report-{branch_id}"),
                gsn: gsn.into(),
                branch_id: branch_id.into(),
                reporter_node_id: "orders".into(),
                outcome: outcome as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Registers, makes (when `makes`), and reports one outcall.
    async fn outcall(
        &self,
        gsn: &str,
        order: u32,
        callee: &str,
        makes: bool,
        reported: pb::Outcome,
    ) -> String {
        let branch = self.register(gsn, order, callee).await;
        if makes {
            self.node(callee)
                .execute_directly(gsn, &branch, &format!("debit-{callee}"))
                .await;
        }
        self.report(gsn, &branch, reported).await;
        branch
    }

    async fn reverse(
        &self,
        request_id: &str,
        gsn: &str,
        branch: &str,
        kind: pb::ReversalType,
        wait_ms: u32,
    ) -> tonic::Response<pb::RequestReversalResponse> {
        self.client()
            .request_reversal(pb::RequestReversalRequest {
                request_id: request_id.into(),
                gsn: gsn.into(),
                branch_id: branch.into(),
                reversal_type: kind as i32,
                reversal_serial: format!("serial-{request_id}"),
                reason: "test".into(),
                wait: Some(prost_types::Duration {
                    seconds: i64::from(wait_ms / 1000),
                    nanos: ((wait_ms % 1000) * 1_000_000) as i32,
                }),
            })
            .await
            .unwrap()
    }

    /// Runs sagactl against this sagad, whatever comes of it.
    fn run_sagactl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .arg("--addr")
            .arg(format!("http://{}", self.server.addr))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs sagactl against this sagad; its stdout, once it succeeded.
    fn sagactl(&self, args: &[&str]) -> String {
        let output = self.run_sagactl(args);
        assert!(
            output.status.success(),
            "sagactl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn signals_everywhere(&self, gsn: &str) -> Vec<Vec<i32>> {
        let mut all = vec![self.caller.node.signals_for(gsn)];
        all.extend(self.nodes.iter().map(|n| n.node.signals_for(gsn)));
        all
    }
}

const SUCCESS: i32 = pb::Signal::ReversalSuccess as i32;
const FAILURE: i32 = pb::Signal::ReversalFailure as i32;
const REPROCESS: i32 = pb::Signal::Reprocess as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_reversal_of_a_failed_original_signals_reversal_success_without_reversing() {
    let bank = bank().await;
    let gsn = bank.start("t-1").await;
    let branch = bank.outcall(&gsn, 1, "a", false, pb::Outcome::Failed).await;
    let answer = bank
        .reverse("r-1", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(answer.saga.unwrap().state, pb::SagaState::Reversed as i32);
    assert!(
        bank.node("a")
            .received
            .lock()
            .unwrap()
            .iter()
            .all(|(_, k)| *k != "reverse"),
        "nothing was sent to undo"
    );
    assert!(
        eventually(LIMIT, || bank.caller.node.signals_for(&gsn)
            == vec![SUCCESS])
        .await,
        "the caller is told"
    );
}

/// The caller saw its call fail and reported FAILED, the external reversal ended without
/// undoing it (S1: the original failed), and then the callee reports that it did book it: the
/// booking is reversed rather than kept inside a REVERSED saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcall_that_took_effect_after_its_saga_was_reversed_is_reversed_too() {
    let bank = bank().await;
    let gsn = bank.start("t-late").await;
    let branch = bank.outcall(&gsn, 1, "a", true, pb::Outcome::Failed).await;
    let answer = bank
        .reverse("r-late", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.saga.unwrap().state, pb::SagaState::Reversed as i32);
    assert!(bank.node("a").reversed_at(&gsn, &branch).is_none());

    bank.client()
        .report_state(pb::ReportStateRequest {
            request_id: format!("{gsn}-callee-report"),
            gsn: gsn.clone(),
            branch_id: branch.clone(),
            reporter_node_id: "a".into(),
            outcome: pb::Outcome::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        eventually(LIMIT, || bank
            .node("a")
            .reversed_at(&gsn, &branch)
            .is_some())
        .await,
        "the late booking is undone"
    );
    common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    // WatchSaga's messages carry no branches: read the saga whole.
    let saga = get(&bank.server.channel, &gsn).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    assert_eq!(
        common::orders::branch(&saga, &branch).state,
        pb::BranchState::Reversed as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_reversal_of_a_succeeded_original_reverses_it_and_signals_reversal_success() {
    let bank = bank().await;
    let gsn = bank.start("t-2").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    assert_eq!(branch, "1.a", "the branch id names the callee");
    let answer = bank
        .reverse("r-2", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(bank.node("a").reversals_of(&gsn, &branch), 1);
    assert!(
        eventually(LIMIT, || bank.signals_everywhere(&gsn)[..2]
            == [vec![SUCCESS], vec![SUCCESS]])
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reversal_that_fails_twice_answers_reprocess_then_reversal_success() {
    let bank = bank().await;
    let gsn = bank.start("t-3").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.node("a").script(
        "credit-a",
        vec![Script::Fail("UNAVAILABLE"), Script::Fail("UNAVAILABLE")],
    );
    let first = bank
        .reverse("r-3", &gsn, &branch, pb::ReversalType::External, 30)
        .await;
    assert!(!first.metadata().contains_key(sagad::grpc::REPLAYED_HEADER));
    assert_eq!(
        first.into_inner().signal,
        REPROCESS,
        "the caller could not wait for the retries"
    );
    assert!(
        eventually(LIMIT, || bank
            .node("a")
            .signals_for(&gsn)
            .contains(&REPROCESS))
        .await,
        "nodes are told REPROCESS"
    );

    let mut last = REPROCESS;
    for _ in 0..50 {
        last = bank
            .reverse("r-3", &gsn, &branch, pb::ReversalType::External, 2_000)
            .await
            .into_inner()
            .signal;
        if last != REPROCESS {
            break;
        }
    }
    assert_eq!(
        last, SUCCESS,
        "asking again with the same request id gets the final signal"
    );
    assert_eq!(bank.node("a").reversals_of(&gsn, &branch), 1);
    assert!(
        eventually(LIMIT, || bank.node("a").signals_for(&gsn)
            == vec![REPROCESS, SUCCESS])
        .await
    );
    let replay = bank
        .reverse("r-3", &gsn, &branch, pb::ReversalType::External, 2_000)
        .await;
    assert!(
        replay.metadata().contains_key(sagad::grpc::REPLAYED_HEADER),
        "the final answer is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_reversal_of_an_original_that_never_happened_signals_reversal_failure() {
    let bank = bank().await;
    let gsn = bank.start("t-4").await;
    let branch = bank.register(&gsn, 1, "a").await;
    let answer = bank
        .reverse("r-4", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, FAILURE);
    let saga = answer.saga.unwrap();
    assert_eq!(
        saga.branches[0].state,
        pb::BranchState::NotOccurred as i32,
        "a tombstone: a late forward is refused"
    );
    assert_eq!(
        saga.branches[0].last_poll_outcome,
        pb::Outcome::NotFound as i32,
        "the node was asked"
    );
    assert!(eventually(LIMIT, || bank.node("a").signals_for(&gsn) == vec![FAILURE]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_reversal_of_an_unknown_original_keeps_polling_and_answers_reprocess_meanwhile() {
    let bank = bank().await;
    let gsn = bank.start("t-5").await;
    // Until told otherwise, node a cannot say yet what became of the outcall.
    bank.node("a")
        .queries_answer_processing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let branch = bank.outcall(&gsn, 1, "a", true, pb::Outcome::Unknown).await;
    let answer = bank
        .reverse("r-5", &gsn, &branch, pb::ReversalType::External, 300)
        .await
        .into_inner();
    assert_eq!(answer.signal, REPROCESS);
    assert_eq!(answer.saga.unwrap().state, pb::SagaState::Reversing as i32);
    // What an operator sees meanwhile: the outcall is still being asked about.
    let stuck = pb::operations_client::OperationsClient::new(bank.server.channel.clone())
        .list_stuck(pb::ListStuckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    let item = stuck
        .iter()
        .find(|i| i.gsn == gsn && i.branch_id == branch)
        .expect("the unknown outcall is listed");
    assert!(item.reason.contains("asking node a"), "{}", item.reason);
    bank.node("a")
        .queries_answer_processing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let mut last = REPROCESS;
    for _ in 0..20 {
        last = bank
            .reverse("r-5", &gsn, &branch, pb::ReversalType::External, 2_000)
            .await
            .into_inner()
            .signal;
        if last != REPROCESS {
            break;
        }
    }
    assert_eq!(
        last, SUCCESS,
        "once the node knew it had succeeded, it was reversed"
    );
    assert_eq!(bank.node("a").reversals_of(&gsn, &branch), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_reversal_asked_twice_or_under_two_serials_reverses_once() {
    let bank = bank().await;
    let gsn = bank.start("t-6").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let first = bank
        .reverse("r-6", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    let again = bank
        .reverse("r-6", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await;
    assert!(again.metadata().contains_key(sagad::grpc::REPLAYED_HEADER));
    assert_eq!(again.into_inner(), first);
    let other_serial = bank
        .reverse("r-6b", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(other_serial.signal, first.signal);
    assert_eq!(bank.node("a").reversals_of(&gsn, &branch), 1);
    let saga = get(&bank.server.channel, &gsn).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
}

/// The caller books an outcall and dies before CompleteSaga or RequestReversal: the saga's
/// own deadline reverses what was booked instead of leaving it RUNNING forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcall_saga_still_running_at_its_deadline_is_reversed() {
    let bank = bank().await;
    let gsn = bank
        .client()
        .start_saga(pb::StartSagaRequest {
            request_id: "t-deadline".into(),
            business_type: "transfer".into(),
            mode: pb::SagaMode::RegisteredOutcalls as i32,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gsn;
    let one = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;

    let saga = common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{saga:?}");
    assert!(saga.reason.contains("deadline"), "{}", saga.reason);
    assert!(
        bank.node("a").reversed_at(&gsn, &one).is_some(),
        "what the outcall booked is undone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_reversal_undoes_earlier_outcalls_in_reverse_order_when_the_third_fails() {
    let bank = bank().await;
    let gsn = bank.start("t-7").await;
    let one = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let two = bank
        .outcall(&gsn, 2, "b", true, pb::Outcome::Succeeded)
        .await;
    let three = bank.outcall(&gsn, 3, "c", false, pb::Outcome::Failed).await;
    let answer = bank
        .reverse("r-7", &gsn, "", pb::ReversalType::Internal, 10_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    let saga = answer.saga.unwrap();
    let state = |id: &str| {
        saga.branches
            .iter()
            .find(|b| b.branch_id == id)
            .unwrap()
            .state
    };
    assert_eq!(
        state(&three),
        pb::BranchState::NotOccurred as i32,
        "the failed one is proven never to have happened"
    );
    assert_eq!(state(&two), pb::BranchState::Reversed as i32);
    assert_eq!(state(&one), pb::BranchState::Reversed as i32);
    let (b_at, a_at) = (
        bank.node("b").reversed_at(&gsn, &two).unwrap(),
        bank.node("a").reversed_at(&gsn, &one).unwrap(),
    );
    assert!(b_at < a_at, "2 is undone before 1");
    assert!(
        eventually(LIMIT, || bank
            .signals_everywhere(&gsn)
            .iter()
            .all(|s| s == &vec![SUCCESS]))
        .await,
        "every node, caller included, is told REVERSAL_SUCCESS: {:?}",
        bank.signals_everywhere(&gsn)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reversal_carries_the_outcalls_own_payload_else_the_sagas() {
    let bank = bank().await;
    let gsn = bank
        .start_with("t-payloads", b"the saga's payload".to_vec())
        .await;
    let own = bank
        .register_with(&gsn, 1, "a", b"outcall a's own payload".to_vec())
        .await;
    bank.node("a").execute_directly(&gsn, &own, "debit-a").await;
    bank.report(&gsn, &own, pb::Outcome::Succeeded).await;
    let shared = bank
        .outcall(&gsn, 2, "b", true, pb::Outcome::Succeeded)
        .await;
    let answer = bank
        .reverse("r-payloads", &gsn, "", pb::ReversalType::Internal, 10_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(
        bank.node("a").reversal_payload(&gsn, &own).as_deref(),
        Some(&b"outcall a's own payload"[..]),
        "an outcall registered with a payload is reversed with it"
    );
    assert_eq!(
        bank.node("b").reversal_payload(&gsn, &shared).as_deref(),
        Some(&b"the saga's payload"[..]),
        "one registered without is reversed with the saga's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_reversal_undoes_an_unknown_third_outcall_that_turns_out_to_have_succeeded() {
    let bank = bank().await;
    let gsn = bank.start("t-8").await;
    bank.outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.outcall(&gsn, 2, "b", true, pb::Outcome::Succeeded)
        .await;
    let three = bank.outcall(&gsn, 3, "c", true, pb::Outcome::Unknown).await;
    let answer = bank
        .reverse("r-8", &gsn, "", pb::ReversalType::Internal, 10_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(
        bank.node("c").reversals_of(&gsn, &three),
        1,
        "it had happened, so it was undone"
    );
    assert_eq!(bank.node("a").max_reversals(), 1);
    assert_eq!(bank.node("b").max_reversals(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn complete_saga_needs_every_outcall_succeeded_and_tells_every_node() {
    let bank = bank().await;
    let gsn = bank.start("t-9").await;
    bank.outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let pending = bank.register(&gsn, 2, "b").await;
    let err = bank
        .client()
        .complete_saga(pb::CompleteSagaRequest {
            request_id: "c-1".into(),
            gsn: gsn.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(&pending), "{}", err.message());
    bank.node("b")
        .execute_directly(&gsn, &pending, "debit-b")
        .await;
    bank.report(&gsn, &pending, pb::Outcome::Succeeded).await;
    let done = bank
        .client()
        .complete_saga(pb::CompleteSagaRequest {
            request_id: "c-2".into(),
            gsn: gsn.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.saga.unwrap().state, pb::SagaState::Completed as i32);
    let completed = pb::Signal::Completed as i32;
    assert!(
        eventually(LIMIT, || bank.node("a").signals_for(&gsn)
            == vec![completed]
            && bank.caller.node.signals_for(&gsn) == vec![completed])
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcall_misuse_gets_the_right_codes() {
    let bank = bank().await;
    let gsn = bank.start("t-10").await;
    bank.register(&gsn, 1, "a").await;
    let mut client = bank.client();
    let mut dup = pb::RegisterOutcallRequest {
        request_id: "dup".into(),
        gsn: gsn.clone(),
        caller_node_id: "orders".into(),
        callee_node_id: "b".into(),
        forward_action: "x".into(),
        reversal_action: "y".into(),
        order: 1,
        ..Default::default()
    };
    assert_eq!(
        client
            .register_outcall(dup.clone())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::AlreadyExists
    );
    dup.request_id = "zero".into();
    dup.order = 0;
    assert_eq!(
        client
            .register_outcall(dup.clone())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    dup.request_id = "nogsn".into();
    dup.order = 5;
    dup.gsn = "c1-0000000000000999".into();
    assert_eq!(
        client.register_outcall(dup).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let no_type = client
        .request_reversal(pb::RequestReversalRequest {
            request_id: "rt".into(),
            gsn: gsn.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_type.code(), tonic::Code::InvalidArgument);
    assert!(
        no_type.message().contains("REVERSAL_TYPE_EXTERNAL"),
        "{}",
        no_type.message()
    );
    let reprocess = client
        .reprocess_saga(pb::ReprocessSagaRequest {
            request_id: "rp".into(),
            gsn: gsn.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reprocess.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_by_neither_the_callee_nor_the_caller_is_refused_naming_both() {
    let bank = bank().await;
    let gsn = bank.start("t-stranger").await;
    let branch = bank.register(&gsn, 1, "a").await;
    let refused = bank
        .client()
        .report_state(pb::ReportStateRequest {
            request_id: "stranger-report".into(),
            gsn: gsn.clone(),
            branch_id: branch.clone(),
            reporter_node_id: "b".into(),
            outcome: pb::Outcome::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        refused.message()
    );
    assert!(
        refused
            .message()
            .contains("only its node \"a\" or the outcall's caller \"orders\" can"),
        "{}",
        refused.message()
    );
    let saga = get(&bank.server.channel, &gsn).await;
    let outcall = saga
        .branches
        .iter()
        .find(|b| b.branch_id == branch)
        .unwrap();
    assert_eq!(outcall.state, pb::BranchState::Triggered as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_needing_attention_is_reprocessed_by_an_operator() {
    let bank = bank().await;
    let gsn = bank.start("t-11").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.node("a")
        .script("credit-a", vec![Script::Fail("LOCKED")]);
    let answer = bank
        .reverse("r-11", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, REPROCESS);
    assert_eq!(
        answer.saga.unwrap().state,
        pb::SagaState::NeedsAttention as i32
    );
    // The operator's view: listed as needing attention, then re-driven.
    let listed = bank.sagactl(&["attention"]);
    assert!(listed.contains(&gsn), "{listed}");
    let reprocessed = bank.sagactl(&["reprocess", &gsn]);
    assert!(reprocessed.contains("REVERSING"), "{reprocessed}");
    assert!(eventually(LIMIT, || bank.node("a").reversals_of(&gsn, &branch) == 1).await);
    let saga = common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    // NEEDS_ATTENTION was no end: the upstream that was told to try again later learns the
    // outcome with the same request.
    let again = bank
        .reverse("r-11", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await;
    assert!(!again.metadata().contains_key(sagad::grpc::REPLAYED_HEADER));
    assert_eq!(again.into_inner().signal, SUCCESS);
}

/// The saga's reason names what started its reversal ("test" here), not what stopped it: an
/// operator sent by it alone would look at the wrong node. `attention` names the node whose
/// reversal failed and the error it gave, and labels the reason as the original one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sagactl_attention_names_the_node_whose_reversal_failed_and_its_error() {
    let bank = bank().await;
    let gsn = bank.start("t-attn").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.node("a")
        .script("credit-a", vec![Script::Fail("LOCKED")]);
    let answer = bank
        .reverse("r-attn", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, REPROCESS);
    let listed = bank.sagactl(&["attention"]);
    assert!(listed.contains(&gsn), "{listed}");
    assert!(
        listed.contains(&format!("credit-a of {branch} on node a, error LOCKED")),
        "{listed}"
    );
    assert!(
        listed.contains("reversing because (original reason): test"),
        "{listed}"
    );
}

/// A reprocess whose answer was lost (a client timeout) is run again by the operator: with the
/// default request id that is refused, since the saga no longer needs attention, and sagactl
/// says it was most likely reprocessed already rather than leaving a bare FAILED_PRECONDITION.
/// The first run names the reversal it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sagactl_reprocess_run_again_says_the_saga_was_probably_reprocessed_already() {
    let bank = bank().await;
    let gsn = bank.start("t-again").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    // The reversal after the reprocess is slow, so the saga is still REVERSING for the rerun:
    // slow enough for two sagactl processes on a loaded machine, and under sagad's 10 s
    // participant timeout, so it is not sent again meanwhile.
    bank.node("a").script(
        "credit-a",
        vec![
            Script::Fail("LOCKED"),
            Script::SucceedLate("OK", Duration::from_secs(6)),
        ],
    );
    let answer = bank
        .reverse("r-again", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, REPROCESS);
    let first = bank.sagactl(&["reprocess", &gsn]);
    assert!(
        first.contains("REVERSING") && first.contains(&format!("{branch} on node a")),
        "{first}"
    );
    assert!(!first.contains("failed reversals"), "{first}");
    let again = bank.run_sagactl(&["reprocess", &gsn]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("probably reprocessed already"),
        "{stderr}"
    );
    let saga = common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
}

/// A caller whose own deadline is shorter than `wait` gives up on its RequestReversal; the
/// reversal it started goes on, and its answer is still stored for the request, so a repeat
/// gets it as soon as there is one instead of being told "in progress" for `wait` + 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reversal_whose_caller_gave_up_early_still_stores_its_answer_for_the_repeat() {
    let bank = bank().await;
    let gsn = bank.start("t-hurry").await;
    let booked = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.node("a").script(
        "credit-a",
        vec![Script::SucceedLate("OK", Duration::from_millis(1_500))],
    );
    let request = || pb::RequestReversalRequest {
        request_id: "r-hurry".into(),
        gsn: gsn.clone(),
        branch_id: booked.clone(),
        reversal_type: pb::ReversalType::External as i32,
        reversal_serial: "serial-hurry".into(),
        wait: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut hurried = tonic::Request::new(request());
    hurried.set_timeout(Duration::from_millis(300));
    let gave_up = bank.client().request_reversal(hurried).await.unwrap_err();
    assert!(
        matches!(
            gave_up.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{gave_up:?}"
    );

    let mut answer = None;
    for _ in 0..50 {
        match bank.client().request_reversal(request()).await {
            Ok(response) => {
                answer = Some(response.into_inner());
                break;
            }
            Err(status) if status.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    let answer = answer.expect("the repeat is answered within 10 s, not refused for 35");
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(bank.node("a").reversals_of(&gsn, &booked), 1);
}

/// S1, row by row, for each request: a saga reversed for one original answers a later external
/// request about another by that other's own fate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_external_reversal_is_answered_by_its_own_originals_fate() {
    let bank = bank().await;
    let gsn = bank.start("t-own").await;
    let booked = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let never = bank
        .outcall(&gsn, 2, "b", false, pb::Outcome::Unknown)
        .await;
    // b's node says it never saw the call; a is reversed.
    let first = bank
        .reverse("r-b", &gsn, &never, pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(first.signal, FAILURE, "b never happened");
    assert_eq!(first.saga.unwrap().state, pb::SagaState::Reversed as i32);
    let second = bank
        .reverse("r-a", &gsn, &booked, pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(second.signal, SUCCESS, "a happened and was reversed");
}

/// A request about the whole saga that comes after one about an outcall that never happened is
/// answered by the whole saga's fate (one outcall happened and was reversed), not by the first
/// request's answer; an INTERNAL one after it is answered REVERSAL_SUCCESS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_saga_external_reversal_after_one_about_a_branch_that_never_happened_is_answered_by_the_whole_sagas_fate()
 {
    let bank = bank().await;
    let gsn = bank.start("t-whole").await;
    bank.outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let never = bank
        .outcall(&gsn, 2, "b", false, pb::Outcome::Unknown)
        .await;
    let first = bank
        .reverse("r-b", &gsn, &never, pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(first.signal, FAILURE, "b never happened");
    let whole = bank
        .reverse("r-all", &gsn, "", pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(whole.signal, SUCCESS, "a happened and was reversed");
    let internal = bank
        .reverse("r-int", &gsn, "", pb::ReversalType::Internal, 10_000)
        .await
        .into_inner();
    assert_eq!(internal.signal, SUCCESS);
}

/// The caller's call timed out, so it reports FAILED, after the callee reported SUCCEEDED: the
/// booking stands, and an external reversal undoes it instead of answering "nothing to undo".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callers_failed_report_after_the_callees_success_leaves_the_booking_to_be_reversed() {
    let bank = bank().await;
    let gsn = bank.start("t-late-failed").await;
    let booked = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let after = bank
        .client()
        .report_state(pb::ReportStateRequest {
            request_id: format!("{gsn}-late-failed"),
            gsn: gsn.clone(),
            branch_id: booked.clone(),
            reporter_node_id: "orders".into(),
            outcome: pb::Outcome::Failed as i32,
            error_code: "TIMEOUT".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.branch.map(|b| b.state),
        Some(pb::BranchState::Succeeded as i32)
    );
    let answer = bank
        .reverse("r-late", &gsn, &booked, pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, SUCCESS);
    assert_eq!(
        bank.node("a").reversals_of(&gsn, &booked),
        1,
        "the charge is undone"
    );
}

/// `wait` is how long a call blocks, not what it asks: a repeat that waits for another time is
/// answered from the stored answer, not refused as a reused request_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reversal_repeated_with_another_wait_is_answered_from_its_stored_answer() {
    let bank = bank().await;
    let gsn = bank.start("t-wait").await;
    let booked = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let first = bank
        .reverse("r-wait", &gsn, &booked, pb::ReversalType::External, 10_000)
        .await
        .into_inner();
    assert_eq!(first.signal, SUCCESS);
    let repeat = bank
        .reverse("r-wait", &gsn, &booked, pb::ReversalType::External, 2_000)
        .await;
    assert_eq!(
        repeat
            .metadata()
            .get("sagad-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(repeat.into_inner(), first);
    assert_eq!(bank.node("a").reversals_of(&gsn, &booked), 1);
}

fn reversal_request(request_id: &str, gsn: &str) -> pb::RequestReversalRequest {
    pb::RequestReversalRequest {
        request_id: request_id.into(),
        gsn: gsn.into(),
        reversal_type: pb::ReversalType::External as i32,
        wait: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_outcall_and_reversal_fields_are_refused_by_name_and_change_nothing() {
    let bank = bank().await;
    let gsn = bank.start("t-20").await;
    let mut client = bank.client();
    let outcall = pb::RegisterOutcallRequest {
        request_id: "reg-1".into(),
        gsn: gsn.clone(),
        caller_node_id: "orders".into(),
        callee_node_id: "a".into(),
        forward_action: "debit-a".into(),
        reversal_action: "credit-a".into(),
        order: 1,
        payload: b"{}".to_vec(),
        content_type: "t".repeat(129),
    };
    let err = client.register_outcall(outcall.clone()).await.unwrap_err();
    assert_refused(&err, "content_type", "at most 128");
    let untouched = get(&bank.server.channel, &gsn).await;
    assert!(untouched.branches.is_empty(), "no outcall was registered");
    client
        .register_outcall(pb::RegisterOutcallRequest {
            content_type: "t".repeat(128),
            ..outcall
        })
        .await
        .expect("128 characters is a content type");
    let before = get(&bank.server.channel, &gsn).await;

    let cases = [
        (
            pb::RequestReversalRequest {
                reversal_serial: "s".repeat(129),
                ..reversal_request("rv-serial", &gsn)
            },
            "reversal_serial",
            "at most 128",
        ),
        (
            pb::RequestReversalRequest {
                reason: "r".repeat(1025),
                ..reversal_request("rv-reason", &gsn)
            },
            "reason",
            "at most 1024",
        ),
    ];
    for (request, field, limit) in cases {
        let err = client.request_reversal(request).await.unwrap_err();
        assert_refused(&err, field, limit);
        assert_eq!(
            get(&bank.server.channel, &gsn).await,
            before,
            "{field}: nothing changed"
        );
    }
    let answer = client
        .request_reversal(pb::RequestReversalRequest {
            reversal_serial: "s".repeat(128),
            reason: "r".repeat(1024),
            ..reversal_request("rv-ok", &gsn)
        })
        .await
        .expect("both at their limit")
        .into_inner();
    assert_eq!(answer.saga.unwrap().reason, "r".repeat(1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_report_fields_are_refused_by_name_and_change_nothing() {
    let bank = bank().await;
    let gsn = bank.start("t-21").await;
    let branch = bank.register(&gsn, 1, "a").await;
    let mut client = bank.client();
    let report = |request_id: &str| pb::ReportStateRequest {
        request_id: request_id.into(),
        gsn: gsn.clone(),
        branch_id: branch.clone(),
        reporter_node_id: "orders".into(),
        outcome: pb::Outcome::Failed as i32,
        ..Default::default()
    };
    let status = |name: String, parameters: Vec<(String, String)>| {
        Some(pb::Status {
            name,
            parameters: parameters.into_iter().collect(),
        })
    };
    let before = get(&bank.server.channel, &gsn).await;
    let cases = [
        (
            pb::ReportStateRequest {
                message: "m".repeat(1025),
                ..report("rs-message")
            },
            "message",
            "at most 1024",
        ),
        (
            pb::ReportStateRequest {
                error_code: "E".repeat(129),
                ..report("rs-code")
            },
            "error_code",
            "at most 128",
        ),
        (
            pb::ReportStateRequest {
                status: status("N".repeat(129), vec![]),
                ..report("rs-name")
            },
            "status.name",
            "at most 128",
        ),
        (
            pb::ReportStateRequest {
                status: status(
                    "N".into(),
                    (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
                ),
                ..report("rs-count")
            },
            "status.parameters",
            "at most 32",
        ),
        (
            pb::ReportStateRequest {
                status: status("N".into(), vec![("k".repeat(129), "v".into())]),
                ..report("rs-key")
            },
            "status.parameters",
            "at most 128",
        ),
        (
            pb::ReportStateRequest {
                status: status("N".into(), vec![("k".into(), "v".repeat(257))]),
                ..report("rs-value")
            },
            "status.parameters[k]",
            "at most 256",
        ),
    ];
    for (request, field, limit) in cases {
        let err = client.report_state(request).await.unwrap_err();
        assert_refused(&err, field, limit);
        assert_eq!(
            get(&bank.server.channel, &gsn).await,
            before,
            "{field}: nothing changed"
        );
    }
    let at_limits = pb::ReportStateRequest {
        message: "m".repeat(1024),
        error_code: "E".repeat(128),
        status: status(
            "N".repeat(128),
            (0..32)
                .map(|i| (format!("{i:02}").repeat(64), "v".repeat(256)))
                .collect(),
        ),
        ..report("rs-ok")
    };
    let accepted = client
        .report_state(at_limits.clone())
        .await
        .expect("every field at its limit")
        .into_inner()
        .branch
        .unwrap();
    assert_eq!(accepted.state, pb::BranchState::Failed as i32);
    assert_eq!(accepted.error_code, at_limits.error_code);
    assert_eq!(accepted.last_status, at_limits.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_takes_at_most_1000_outcalls() {
    let bank = bank().await;
    let gsn = bank.start("t-22").await;
    let mut client = bank.client();
    let outcall = |order: u32| pb::RegisterOutcallRequest {
        request_id: format!("reg-{order}"),
        gsn: gsn.clone(),
        caller_node_id: "orders".into(),
        callee_node_id: "a".into(),
        forward_action: "debit".into(),
        reversal_action: "credit".into(),
        order,
        ..Default::default()
    };
    for order in 1..=1000 {
        client.register_outcall(outcall(order)).await.unwrap();
    }
    let before = get(&bank.server.channel, &gsn).await;
    let err = client.register_outcall(outcall(1001)).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(err.message().contains("1000 outcalls"), "{}", err.message());
    let after = get(&bank.server.channel, &gsn).await;
    assert_eq!(after, before, "nothing changed");
    assert_eq!(after.branches.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_records_at_most_100_reversal_serials_and_still_answers_known_ones() {
    let bank = bank().await;
    let gsn = bank.start("t-23").await;
    let mut client = bank.client();
    let reversal = |n: u32, serial: String| pb::RequestReversalRequest {
        reversal_serial: serial,
        ..reversal_request(&format!("rv-{n}"), &gsn)
    };
    // Nothing to undo: the first request reverses the saga, and the rest find it REVERSED.
    for n in 1..=100 {
        let answer = client
            .request_reversal(reversal(n, format!("serial-{n}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.signal, SUCCESS);
    }
    let before = get(&bank.server.channel, &gsn).await;
    let err = client
        .request_reversal(reversal(101, "serial-101".into()))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("100 reversal serials"),
        "{}",
        err.message()
    );
    assert_eq!(
        get(&bank.server.channel, &gsn).await,
        before,
        "nothing changed"
    );
    let known = client
        .request_reversal(reversal(102, "serial-7".into()))
        .await
        .expect("a serial already recorded is still answered")
        .into_inner();
    assert_eq!(known.signal, SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_oversized_error_code_is_cut_to_its_bound_and_the_answer_still_counts() {
    let bank = bank().await;
    let gsn = bank.start("t-24").await;
    let branch = bank
        .outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let huge: &'static str = Box::leak("LOCKED".repeat(2_000).into_boxed_str());
    bank.node("a").script("credit-a", vec![Script::Fail(huge)]);
    let answer = bank
        .reverse("r-24", &gsn, &branch, pb::ReversalType::External, 5_000)
        .await
        .into_inner();
    assert_eq!(answer.signal, REPROCESS, "the FAILED answer was applied");
    let saga = get(&bank.server.channel, &gsn).await;
    assert_eq!(saga.state, pb::SagaState::NeedsAttention as i32);
    let reversed = common::orders::branch(&saga, &branch);
    assert_eq!(reversed.error_code.chars().count(), 128);
    assert!(
        reversed.error_code.ends_with('…'),
        "{}",
        reversed.error_code
    );
    for entry in &reversed.timeline {
        assert!(entry.what.chars().count() < 1_000, "{}", entry.what);
    }
}

/// The next command sagad sends `stream`, within the test's limit.
async fn next_command(stream: &mut tonic::Streaming<pb::Command>) -> pb::Command {
    common::next_command(stream, LIMIT).await
}

/// A Subscribe stream for `node`, as a node that cannot be dialled holds one.
async fn hold_stream(bank: &Bank, node: &str) -> tonic::Streaming<pb::Command> {
    common::hold_stream(&bank.server.channel, node).await
}

/// A Reverse has no timer: its outbox entry is the only thing that sends it again. A command
/// id whose kind or send was edited on its way back (the Reverse acknowledged as a signal,
/// reported as a poll's answer or as another send's) is refused with FAILED_PRECONDITION
/// naming the id sagad sent, and takes nothing out of the outbox: the Reverse is sent again,
/// and its answer under its own id ends the reversal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_command_id_is_refused_and_leaves_the_reverse_pending() {
    let bank = bank().await;
    let gsn = bank.start("t-edited").await;
    // "d" has no endpoint: its commands go to its Subscribe stream.
    let mut stream = hold_stream(&bank, "d").await;
    let branch = bank.register(&gsn, 1, "d").await;
    bank.report(&gsn, &branch, pb::Outcome::Succeeded).await;
    let asked = bank
        .reverse("r-edited", &gsn, &branch, pb::ReversalType::External, 100)
        .await
        .into_inner();
    assert_eq!(asked.signal, REPROCESS, "still reversing");
    let reverse = next_command(&mut stream).await;
    assert!(matches!(reverse.kind, Some(pb::command::Kind::Reverse(_))));
    let (_, sent) = reverse.command_id.rsplit_once(':').unwrap();
    let (number, send) = sent[1..].split_once('.').unwrap();
    let report = |request_id: &str, command_id: String| pb::ReportStateRequest {
        request_id: request_id.into(),
        gsn: gsn.clone(),
        branch_id: branch.clone(),
        reporter_node_id: "d".into(),
        outcome: pb::Outcome::Succeeded as i32,
        command_id,
        ..Default::default()
    };
    let mut client = bank.client();

    let as_signal = client
        .ack(pb::AckRequest {
            request_id: "ack-edited".into(),
            node_id: "d".into(),
            command_id: format!("{gsn}:s{number}"),
        })
        .await
        .unwrap_err();
    let as_poll = client
        .report_state(report("poll-edited", format!("{gsn}:q{number}")))
        .await
        .unwrap_err();
    let next_send: u32 = send.parse::<u32>().unwrap() + 1;
    let as_other_send = client
        .report_state(report(
            "send-edited",
            format!("{gsn}:r{number}.{next_send}"),
        ))
        .await
        .unwrap_err();
    for refused in [as_signal, as_poll, as_other_send] {
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains(&reverse.command_id),
            "names the id sagad sent: {}",
            refused.message()
        );
    }
    assert_eq!(
        get(&bank.server.channel, &gsn).await.state,
        pb::SagaState::Reversing as i32
    );

    drop(stream);
    let mut stream = hold_stream(&bank, "d").await;
    assert_eq!(
        next_command(&mut stream).await.command_id,
        reverse.command_id,
        "the Reverse is still pending, and is sent again"
    );
    client
        .report_state(report("reversed", reverse.command_id.clone()))
        .await
        .unwrap();
    let saga = common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
}

/// A reversal an operator re-drives goes on numbering its sends, so the first round's answer,
/// reported again after ReprocessSaga (here by a node answering from its stream's replay), is
/// read as late: it does not send the saga back to NEEDS_ATTENTION while the new round's
/// Reverse is out, and the new round's own answer ends the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_answer_from_a_reversals_earlier_round_does_not_count_after_reprocess() {
    let bank = bank().await;
    let gsn = bank.start("t-rounds").await;
    // "d" has no endpoint: its commands go to its Subscribe stream.
    let mut stream = hold_stream(&bank, "d").await;
    let branch = bank.register(&gsn, 1, "d").await;
    bank.report(&gsn, &branch, pb::Outcome::Succeeded).await;
    bank.reverse("r-rounds", &gsn, &branch, pb::ReversalType::External, 100)
        .await;
    let first = next_command(&mut stream).await;
    assert!(matches!(first.kind, Some(pb::command::Kind::Reverse(_))));
    let report =
        |request_id: &str, command_id: &str, outcome: pb::Outcome| pb::ReportStateRequest {
            request_id: request_id.into(),
            gsn: gsn.clone(),
            branch_id: branch.clone(),
            reporter_node_id: "d".into(),
            outcome: outcome as i32,
            error_code: if outcome == pb::Outcome::Failed {
                "LOCKED".into()
            } else {
                String::new()
            },
            command_id: command_id.into(),
            ..Default::default()
        };
    let mut client = bank.client();
    client
        .report_state(report("locked", &first.command_id, pb::Outcome::Failed))
        .await
        .unwrap();
    assert_eq!(
        get(&bank.server.channel, &gsn).await.state,
        pb::SagaState::NeedsAttention as i32
    );
    client
        .reprocess_saga(pb::ReprocessSagaRequest {
            request_id: "reprocess-rounds".into(),
            gsn: gsn.clone(),
        })
        .await
        .unwrap();
    let second = loop {
        let command = next_command(&mut stream).await;
        if matches!(command.kind, Some(pb::command::Kind::Reverse(_))) {
            break command;
        }
    };
    assert_ne!(second.command_id, first.command_id);

    client
        .report_state(report(
            "locked-again",
            &first.command_id,
            pb::Outcome::Failed,
        ))
        .await
        .unwrap();
    let saga = get(&bank.server.channel, &gsn).await;
    assert_eq!(
        saga.state,
        pb::SagaState::Reversing as i32,
        "the first round's answer does not end the second"
    );
    let timeline = &saga.branches[0].timeline;
    assert!(
        timeline
            .iter()
            .any(|t| t.what.contains("late or repeated reversal answer")),
        "{timeline:?}"
    );
    client
        .report_state(report(
            "released",
            &second.command_id,
            pb::Outcome::Succeeded,
        ))
        .await
        .unwrap();
    let saga = common::orders::wait_terminal(&bank.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
}

/// CompleteSaga, RequestReversal and ReprocessSaga answer with the saga as GetSaga shows it:
/// its payload included, though the saga record itself holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn complete_reversal_and_reprocess_answer_with_the_sagas_payload() {
    let bank = bank().await;
    let payload = b"the saga's payload".to_vec();
    let completed = bank.start_with("t-complete-payload", payload.clone()).await;
    bank.outcall(&completed, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let done = bank
        .client()
        .complete_saga(pb::CompleteSagaRequest {
            request_id: "complete-payload".into(),
            gsn: completed.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(done.payload, payload, "CompleteSaga");

    let reversed = bank.start_with("t-reverse-payload", payload.clone()).await;
    let branch = bank
        .outcall(&reversed, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    bank.node("a")
        .script("credit-a", vec![Script::Fail("LOCKED")]);
    let answer = bank
        .reverse(
            "r-payload",
            &reversed,
            &branch,
            pb::ReversalType::External,
            5_000,
        )
        .await
        .into_inner();
    let saga = answer.saga.unwrap();
    assert_eq!(saga.state, pb::SagaState::NeedsAttention as i32);
    assert_eq!(saga.payload, payload, "RequestReversal");
    let reprocessed = bank
        .client()
        .reprocess_saga(pb::ReprocessSagaRequest {
            request_id: "reprocess-payload".into(),
            gsn: reversed.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(reprocessed.payload, payload, "ReprocessSaga");
    assert_eq!(reprocessed.branches.len(), 1);
}

/// Every reversal serial RequestReversal recorded (its own, or request_id by default) is shown
/// on the saga, in the order they arrived, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reversal_serials_recorded_on_a_saga_are_shown_on_it() {
    let bank = bank().await;
    let gsn = bank.start("t-serials").await;
    bank.outcall(&gsn, 1, "a", true, pb::Outcome::Succeeded)
        .await;
    let mut client = bank.client();
    let first = client
        .request_reversal(pb::RequestReversalRequest {
            reversal_serial: "REV-1".into(),
            ..reversal_request("serials-1", &gsn)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.saga.unwrap().reversal_serials, ["REV-1"]);
    for request_id in ["serials-2", "serials-2-again"] {
        client
            .request_reversal(pb::RequestReversalRequest {
                reversal_serial: if request_id == "serials-2" {
                    String::new()
                } else {
                    "REV-1".into()
                },
                ..reversal_request(request_id, &gsn)
            })
            .await
            .unwrap();
    }
    let saga = get(&bank.server.channel, &gsn).await;
    assert_eq!(
        saga.reversal_serials,
        ["REV-1", "serials-2"],
        "a request without a serial is recorded by its request_id; a known serial once"
    );
}

/// A status reported with parameters but no name is named after the outcome, as orchestrated
/// sagas name it, and so survives the ledger: stored nameless, it read back as no status and
/// its parameters were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_reported_without_a_name_keeps_its_parameters_under_the_outcomes_name() {
    let bank = bank().await;
    let gsn = bank.start("t-nameless").await;
    let branch = bank.register(&gsn, 1, "a").await;
    bank.client()
        .report_state(pb::ReportStateRequest {
            request_id: "nameless".into(),
            gsn: gsn.clone(),
            branch_id: branch.clone(),
            reporter_node_id: "orders".into(),
            outcome: pb::Outcome::Succeeded as i32,
            status: Some(pb::Status {
                name: String::new(),
                parameters: [("result_code".to_owned(), "E12".to_owned())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let saga = get(&bank.server.channel, &gsn).await;
    let status = common::orders::branch(&saga, &branch)
        .last_status
        .clone()
        .expect("the status is kept");
    assert_eq!(status.name, "SUCCEEDED");
    assert_eq!(status.parameters["result_code"], "E12");
}
