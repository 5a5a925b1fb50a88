//! Recovery's edges (S4 with S2 and S5), pinned as they were found while building the
//! operators' view: what an escalation after the poll budget must reverse, and a step timeout
//! that must not pre-empt a retry the retry policy already decided.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use common::orders::{
    branch, eventually, get, order_strategy, put_strategy, register_node, shop, start_order,
    wait_terminal,
};
use common::participant::{Node, PushParticipant, Script};
use sagad::clock::SystemClock;
use sagad::config::Config;
use sagad::grpc::pb;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

const LIMIT: Duration = Duration::from_secs(20);

/// A node whose forward action takes effect at once but which never manages to say so: it
/// answers PROCESSING to Execute and to every QueryStatus. It reverses what it did when asked.
#[derive(Default)]
struct Sluggish {
    executed: Mutex<Vec<String>>,
    reversed: Mutex<Vec<String>>,
    signals: Mutex<Vec<(String, i32)>>,
}

#[derive(Clone)]
struct SluggishService(Arc<Sluggish>);

#[tonic::async_trait]
impl Participant for SluggishService {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let gsn = request.into_inner().gsn;
        let mut executed = self.0.executed.lock().unwrap();
        if !executed.contains(&gsn) {
            executed.push(gsn);
        }
        Ok(Response::new(pb::ExecuteResponse {
            outcome: pb::Outcome::Processing as i32,
            ..Default::default()
        }))
    }
    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let gsn = request.into_inner().gsn;
        let took_effect = self.0.executed.lock().unwrap().contains(&gsn);
        let mut reversed = self.0.reversed.lock().unwrap();
        if took_effect && !reversed.contains(&gsn) {
            reversed.push(gsn);
        }
        let outcome = if took_effect {
            pb::Outcome::Succeeded
        } else {
            pb::Outcome::NotFound
        };
        Ok(Response::new(pb::ReverseResponse {
            outcome: outcome as i32,
            ..Default::default()
        }))
    }
    async fn query_status(
        &self,
        _: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        Ok(Response::new(pb::QueryStatusResponse {
            outcome: pb::Outcome::Processing as i32,
            ..Default::default()
        }))
    }
    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let request = request.into_inner();
        self.0
            .signals
            .lock()
            .unwrap()
            .push((request.gsn, request.signal));
        Ok(Response::new(pb::SignalResponse {}))
    }
}

async fn start_sluggish() -> (Arc<Sluggish>, String) {
    let sluggish = Arc::new(Sluggish::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        Server::builder()
            .add_service(ParticipantServer::new(SluggishService(sluggish.clone())))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (sluggish, endpoint)
}

/// The order strategy reverses only `reserve` when `charge` reports an abnormal status (a
/// DECLINED charge took no money). When charge's outcome stays unknown past the poll budget,
/// though, the money may have been taken: the escalation must reverse charge itself too (or
/// leave the saga to an operator), never end REVERSED — "consistently reversed everywhere" —
/// with charge still UNKNOWN and in effect at its node. Today sagad escalates with charge's
/// exception scope only, so charge is left UNKNOWN, never polled again, and every node is told
/// REVERSAL_SUCCESS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_escalated_step_is_reversed_even_outside_its_own_exception_scope() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data(dir.path().join("ledger"));
    config.max_polls = 2;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let inventory = PushParticipant::start(Node::new("inventory")).await;
    inventory
        .node
        .script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    let (payment, payment_endpoint) = start_sluggish().await;
    put_strategy(&server.channel, order_strategy(Duration::from_millis(200))).await;
    register_node(&server.channel, "inventory", &inventory.endpoint()).await;
    register_node(&server.channel, "payment", &payment_endpoint).await;

    let gsn = start_order(&server.channel, "o-escalated", "order").await;
    let ended = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(ended.state, pb::SagaState::Reversed as i32, "{ended:?}");
    let saga = get(&server.channel, &gsn).await;
    assert_eq!(
        branch(&saga, "reserve").state,
        pb::BranchState::Reversed as i32
    );
    assert!(
        payment.executed.lock().unwrap().contains(&gsn),
        "charge took effect at payment"
    );
    let charge = branch(&saga, "charge");
    assert_eq!(
        charge.state,
        pb::BranchState::Reversed as i32,
        "a saga that ends REVERSED leaves no step in effect; charge: {:#?}",
        charge
            .timeline
            .iter()
            .map(|t| t.what.as_str())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        payment.reversed.lock().unwrap().as_slice(),
        std::slice::from_ref(&gsn)
    );
}

/// The default retry policy retries UNAVAILABLE after at least 1 s; this step's timeout is
/// 500 ms. The failure is known (FAILED, retryable), so the retry must happen and the saga
/// complete. Today the step's timeout fires while the branch waits for its retry: the branch
/// becomes UNKNOWN, the node truthfully answers the poll NOT_FOUND (the failed attempt never
/// took effect), the saga is reversed, and the retry that comes due finds the branch no longer
/// TRIGGERED and is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_the_policy_decided_is_not_pre_empted_by_the_step_timeout() {
    let shop = shop(Duration::from_millis(500)).await;
    let server = &shop.server;
    shop.payment.node.script(
        "charge",
        vec![Script::Fail("UNAVAILABLE"), Script::Succeed("PAID", vec![])],
    );

    let gsn = start_order(&server.channel, "o-retried", "order").await;
    let ended = wait_terminal(&server.channel, &gsn, LIMIT).await;
    let saga = get(&server.channel, &gsn).await;
    let charge = branch(&saga, "charge");
    assert_eq!(
        ended.state,
        pb::SagaState::Completed as i32,
        "the retried charge succeeds and the saga completes ({}); charge: {:#?}",
        saga.reason,
        charge
            .timeline
            .iter()
            .map(|t| t.what.as_str())
            .collect::<Vec<_>>()
    );
    assert_eq!(charge.attempts, 2);
    assert_eq!(shop.payment.node.executions_of(&gsn, "charge"), 1);
    let completed = pb::Signal::Completed as i32;
    assert!(
        eventually(LIMIT, || shop.shipping.node.signals_for(&gsn)
            == vec![completed])
        .await,
        "shipping is told the saga completed"
    );
}

/// A step's timeout is kept in memory while its Execute is unanswered (the outbox entry stands
/// for it), so a restart must arm it again from the outbox: a step whose node is down when
/// sagad stops, and stays down, still times out after the restart and is polled, instead of
/// waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_sent_before_a_restart_to_a_node_that_never_answers_still_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::with_data(dir.path().join("ledger"));
    let server = TestServer::start_with(config.clone(), Arc::new(SystemClock)).await;
    // Nothing listens on either endpoint: every delivery fails.
    let down = format!("http://127.0.0.1:{}", common::free_port());
    put_strategy(
        &server.channel,
        order_strategy(Duration::from_millis(1_500)),
    )
    .await;
    register_node(&server.channel, "inventory", &down).await;
    register_node(&server.channel, "payment", &down).await;
    let gsn = start_order(&server.channel, "o-restart-timeout", "order").await;
    let before = get(&server.channel, &gsn).await;
    assert_eq!(
        branch(&before, "reserve").state,
        pb::BranchState::Triggered as i32
    );
    server.stop().await.unwrap();

    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let both_unknown = |saga: &pb::Saga| {
        ["reserve", "charge"]
            .iter()
            .all(|step| branch(saga, step).state == pb::BranchState::Unknown as i32)
    };
    let mut saga = get(&server.channel, &gsn).await;
    for _ in 0..LIMIT.as_millis() / 50 {
        if both_unknown(&saga) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        saga = get(&server.channel, &gsn).await;
    }
    let timed_out = both_unknown(&saga);
    assert!(
        timed_out,
        "both steps timed out after the restart: {:#?}",
        saga.branches
            .iter()
            .map(|b| (&b.branch_id, b.state, &b.timeline))
            .collect::<Vec<_>>()
    );
    for step in ["reserve", "charge"] {
        assert!(
            branch(&saga, step)
                .timeline
                .iter()
                .any(|t| t.what == "no report within the step's timeout: asking the node"),
            "{step} timed out by its timeout"
        );
    }
}
