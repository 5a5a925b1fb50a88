//! A caller that gives up while its write is queued (hyper drops a handler when its client
//! resets the stream, tonic when grpc-timeout runs out) does not take the write's follow-up
//! with it: the write is stored, so its commands are delivered, its node routed and its
//! watchers told all the same. Each test drops the engine call after its first poll, which
//! queues the write, as a dropped handler would.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use common::orders::{order_strategy, put_strategy, register_node};
use common::participant::{Node, PushParticipant, Script};
use futures::{FutureExt, StreamExt};
use sagad::clock::{ManualClock, SystemClock};
use sagad::config::Config;
use sagad::domain::saga::{Deadline, ReversalType, Saga, SagaMode, SagaState, StartRequest};
use sagad::engine::{Engine, ReversalInput};
use sagad::store::{Options, Store};

const START_MS: u64 = 1_800_000_000_000;
const LIMIT: Duration = Duration::from_secs(20);

/// Polls `call` once, which queues its write, and drops it, as a handler whose caller went
/// away is dropped.
async fn give_up<F: Future>(call: F) {
    let answered = call.now_or_never();
    assert!(
        answered.is_none(),
        "the call must still be waiting for its write"
    );
}

/// A ledger holding the order strategy and endpoints for `nodes`, stored through a real sagad,
/// and an engine on it with its delivery and timers running.
async fn engine_with(ledger: &Path, nodes: &[&PushParticipant]) -> (Store, Engine) {
    let server = TestServer::start_with(Config::with_data(ledger), Arc::new(SystemClock)).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    for node in nodes {
        register_node(&server.channel, &node.node.node_id, &node.endpoint()).await;
    }
    server.stop().await.unwrap();
    let store = Store::open(Options::new(ledger)).unwrap();
    let engine = common::engine_on(&store, Arc::new(ManualClock::new(START_MS)), None);
    engine.start().await.unwrap();
    (store, engine)
}

async fn participant(node_id: &str, action: &str, status: &'static str) -> PushParticipant {
    let participant = PushParticipant::start(Node::new(node_id)).await;
    participant
        .node
        .script(action, vec![Script::Succeed(status, vec![])]);
    participant
}

fn start_request(request_id: &str, business_type: &str, mode: SagaMode) -> StartRequest {
    StartRequest {
        request_id: request_id.into(),
        business_type: business_type.into(),
        mode: Some(mode),
        payload: b"an order".to_vec(),
        content_type: "text/plain".into(),
        labels: BTreeMap::new(),
        deadline: Deadline::None,
    }
}

async fn start_order(engine: &Engine, request_id: &str) -> String {
    let (_, gsn) = engine
        .start_saga(
            start_request(request_id, "order", SagaMode::Orchestrated),
            Vec::new(),
            |saga| (Vec::new(), saga.gsn.to_string()),
        )
        .await
        .unwrap();
    gsn.unwrap()
}

/// The saga once it is in `state`, or a panic naming what it is instead. A saga whose write
/// has not run yet is not found at first.
async fn wait_for(engine: &Engine, gsn: &str, state: SagaState) -> Saga {
    let mut found = engine.get_saga(gsn).await;
    for _ in 0..(LIMIT.as_millis() / 20) {
        if let Ok(saga) = found
            && saga.state == state
        {
            return saga;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        found = engine.get_saga(gsn).await;
    }
    panic!("saga {gsn} is not {state:?}: {found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_whose_caller_gave_up_mid_write_still_delivers_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = participant("inventory", "reserve", "RESERVED").await;
    let payment = participant("payment", "charge", "PAID").await;
    let shipping = participant("shipping", "ship", "SHIPPED").await;
    let (store, engine) = engine_with(
        &dir.path().join("ledger"),
        &[&inventory, &payment, &shipping],
    )
    .await;

    let request = start_request("o-gone", "order", SagaMode::Orchestrated);
    give_up(engine.start_saga(request, Vec::new(), |_| (Vec::new(), ()))).await;
    // The first saga of the ledger.
    let gsn = "c1-0000000000000001";
    wait_for(&engine, gsn, SagaState::Completed).await;
    assert_eq!(inventory.node.executions_of(gsn, "reserve"), 1);
    assert_eq!(payment.node.executions_of(gsn, "charge"), 1);
    assert_eq!(shipping.node.executions_of(gsn, "ship"), 1);

    // The caller's retry gets the first answer.
    let request = start_request("o-gone", "order", SagaMode::Orchestrated);
    let (answered, _) = engine
        .start_saga(request, Vec::new(), |_| (Vec::new(), ()))
        .await
        .unwrap();
    assert!(answered.replayed);
    engine.stop();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_whose_caller_gave_up_mid_write_still_routes_commands_to_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = participant("inventory", "reserve", "RESERVED").await;
    let payment = participant("payment", "charge", "PAID").await;
    let shipping = participant("shipping", "ship", "SHIPPED").await;
    // Shipping has no endpoint yet.
    let (store, engine) = engine_with(&dir.path().join("ledger"), &[&inventory, &payment]).await;

    give_up(engine.register_node(
        "node-shipping",
        "shipping",
        &shipping.endpoint(),
        Vec::new(),
        |_| Vec::new(),
    ))
    .await;
    let gsn = start_order(&engine, "o-shipped").await;
    wait_for(&engine, &gsn, SagaState::Completed).await;
    assert_eq!(shipping.node.executions_of(&gsn, "ship"), 1);
    engine.stop();
    store.close().await.unwrap();
}

/// An outcall saga with one outcall from `shop` to `payment`, reported SUCCEEDED.
async fn outcall_saga(engine: &Engine, request_id: &str) -> (String, String) {
    let start = start_request(request_id, "transfer", SagaMode::RegisteredOutcalls);
    common::outcall_saga_on(engine, start, Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_whose_caller_gave_up_mid_write_still_ends_the_watch_and_tells_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let payment = PushParticipant::start(Node::new("payment")).await;
    let (store, engine) = engine_with(&dir.path().join("ledger"), &[&payment]).await;
    let (gsn, _) = outcall_saga(&engine, "t-complete").await;
    let mut watch = Box::pin(engine.watch_saga(&gsn).await.unwrap());
    assert_eq!(watch.next().await.unwrap().state, SagaState::Running);

    give_up(engine.complete_saga("t-complete-done", &gsn, Vec::new(), |_| Vec::new())).await;
    let ended = tokio::time::timeout(LIMIT, watch.next()).await.unwrap();
    assert_eq!(ended.unwrap().state, SagaState::Completed);
    let told = common::orders::eventually(LIMIT, || !payment.node.signals_for(&gsn).is_empty());
    assert!(told.await, "the callee is told the saga completed");
    engine.stop();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reversal_request_whose_caller_gave_up_mid_write_still_reverses_and_stores_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let payment = PushParticipant::start(Node::new("payment")).await;
    let (store, engine) = engine_with(&dir.path().join("ledger"), &[&payment]).await;
    let (gsn, branch_id) = outcall_saga(&engine, "t-reverse").await;
    // The node took the charge, as the caller's outcall reached it.
    payment
        .node
        .execute_directly(&gsn, &branch_id, "charge")
        .await;
    let reversal = || ReversalInput {
        request_id: "t-reverse-undo".into(),
        gsn: gsn.clone(),
        branch_id: String::new(),
        reversal_type: Some(ReversalType::Internal),
        serial: String::new(),
        reason: "the order was cancelled".into(),
        wait: Some(Duration::from_secs(10)),
        digest_with_wait: None,
    };

    give_up(engine.request_reversal(reversal(), Vec::new(), |_, _| b"answer".to_vec())).await;
    wait_for(&engine, &gsn, SagaState::Reversed).await;
    assert_eq!(payment.node.reversals_of(&gsn, &branch_id), 1);
    // The answer is stored once the reversal ended, for the caller's retry.
    let mut answered = None;
    for _ in 0..(LIMIT.as_millis() / 20) {
        let repeat = engine
            .request_reversal(reversal(), Vec::new(), |_, _| b"again".to_vec())
            .await;
        match repeat {
            Ok(repeat) => {
                answered = Some(repeat);
                break;
            }
            // The first request's task is still storing its answer.
            Err(sagad::engine::Error::InProgress { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the repeat failed: {e}"),
        }
    }
    let answered = answered.expect("the repeat is answered");
    assert!(answered.replayed, "{answered:?}");
    assert_eq!(answered.response, b"answer");
    engine.stop();
    store.close().await.unwrap();
}
