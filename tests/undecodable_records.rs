//! One ledger record sagad cannot decode (corrupt, or written by a newer sagad) is logged and
//! passed over, or dropped with its timer: it never stops sagad from starting, stops no timer
//! of another saga, and stops no retention. The bad records are written with sled directly,
//! while the ledger is closed.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use common::orders::{get, order_strategy, put_strategy, register_node, start_order};
use common::participant::{Node, PushParticipant, Script};
use sagad::clock::{Clock, ManualClock, SystemClock};
use sagad::config::Config;
use sagad::domain::saga::{Deadline, SagaMode, SagaState, StartRequest};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::operations_client::OperationsClient;
use sagad::store::{Options, Store};

const START_MS: u64 = 1_800_000_000_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
const LIMIT: Duration = Duration::from_secs(20);

/// A value no record decodes from: a version byte, then a postcard integer that never ends.
const GARBAGE: &[u8] = &[
    1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

/// Stores `value` under `key` in the sled tree `tree` of the closed ledger at `ledger`.
fn write_raw(ledger: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = sled::Config::new().path(ledger).open().unwrap();
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// `at_ms BE ++ id BE`, as the due index keys its timers.
fn due_key(at_ms: u64, id: u64) -> Vec<u8> {
    [at_ms.to_be_bytes(), id.to_be_bytes()].concat()
}

/// Starts three registered-outcall sagas on a sagad over `ledger`, then stops it; returns their
/// GSNs and the middle one's sequence, for a test to spoil one of its records.
async fn three_sagas(ledger: &Path) -> (Vec<String>, u64) {
    let server = TestServer::start_with(Config::with_data(ledger), Arc::new(SystemClock)).await;
    let mut gsns = Vec::new();
    for i in 1..=3 {
        let started = CoordinatorClient::new(server.channel.clone())
            .start_saga(common::start_request(&format!("t-{i}"), "transfer"))
            .await
            .unwrap()
            .into_inner();
        gsns.push(started.gsn);
    }
    server.stop().await.unwrap();
    let middle = gsns[1].rsplit('-').next().unwrap().parse().unwrap();
    (gsns, middle)
}

fn start(request_id: &str, deadline: Deadline) -> StartRequest {
    StartRequest {
        request_id: request_id.into(),
        business_type: "transfer".into(),
        mode: Some(SagaMode::RegisteredOutcalls),
        payload: b"a payload".to_vec(),
        content_type: String::new(),
        labels: BTreeMap::new(),
        deadline,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_garbage_due_entry_does_not_stop_a_valid_timer_from_firing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    // No node has an endpoint, so nothing but the deadline moves the saga.
    let gsn = CoordinatorClient::new(server.channel.clone())
        .start_saga(pb::StartSagaRequest {
            request_id: "o-deadline".into(),
            business_type: "order".into(),
            mode: pb::SagaMode::Orchestrated as i32,
            timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gsn;
    server.stop().await.unwrap();
    // Due long before the deadline, so every read of the due index meets it first.
    let garbage_key = due_key(1, u64::MAX);
    write_raw(&ledger, "due", &garbage_key, GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut saga = get(&server.channel, &gsn).await;
    for _ in 0..(LIMIT.as_millis() / 50) {
        if saga.state != pb::SagaState::Running as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        saga = get(&server.channel, &gsn).await;
    }
    assert_eq!(saga.reason, "the saga's deadline passed", "{saga:#?}");
    server.stop().await.unwrap();
    let db = sled::Config::new().path(&ledger).open().unwrap();
    assert_eq!(
        db.open_tree("due").unwrap().get(&garbage_key).unwrap(),
        None,
        "the garbage timer was dropped, not kept to fail again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_in_the_outbox_nodes_and_sagas_does_not_stop_sagad_starting_and_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let inventory = PushParticipant::start(Node::new("inventory")).await;
    inventory.node.script(
        "reserve",
        vec![
            Script::Succeed("RESERVED", vec![]),
            Script::Succeed("RESERVED", vec![]),
        ],
    );
    let payment = PushParticipant::start(Node::new("payment")).await;
    payment.node.script(
        "charge",
        vec![
            Script::Succeed("PAID", vec![]),
            Script::Succeed("PAID", vec![]),
        ],
    );
    let shipping = PushParticipant::start(Node::new("shipping")).await;
    shipping
        .node
        .script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    register_node(&server.channel, "inventory", &inventory.endpoint()).await;
    register_node(&server.channel, "payment", &payment.endpoint()).await;
    register_node(&server.channel, "shipping", &shipping.endpoint()).await;
    // With payment down, each order's charge waits in the outbox across the restart.
    let (payment, payment_addr) = payment.stop().await;
    let kept = start_order(&server.channel, "o-kept", "order kept").await;
    let spoiled = start_order(&server.channel, "o-spoiled", "order spoiled").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop().await.unwrap();

    // Outbox ids and sequences start at 1, so these come first in their trees.
    write_raw(&ledger, "outbox", &u64_key(0), GARBAGE);
    write_raw(&ledger, "nodes", b"a-ghost", GARBAGE);
    let spoiled_sequence: u64 = spoiled.rsplit('-').next().unwrap().parse().unwrap();
    write_raw(&ledger, "sagas", &u64_key(spoiled_sequence), GARBAGE);

    let payment = PushParticipant::start_on(payment, payment_addr).await;
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut state = 0;
    for _ in 0..(LIMIT.as_millis() / 50) {
        state = get(&server.channel, &kept).await.state;
        if state == pb::SagaState::Completed as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        state,
        pb::SagaState::Completed as i32,
        "sagad started and delivered the commands it could read"
    );
    assert_eq!(payment.node.executions_of(&kept, "charge"), 1);
    assert_eq!(shipping.node.executions_of(&kept, "ship"), 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_saga_record_does_not_stop_retention_removing_other_finished_sagas() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Options::new(dir.path())).unwrap();
    let engine = common::engine_on(&store, Arc::new(ManualClock::new(START_MS)), None);
    for i in 1..=3 {
        engine
            .start_saga(start(&format!("s-{i}"), Deadline::None), Vec::new(), |_| {
                (Vec::new(), ())
            })
            .await
            .unwrap();
        let gsn = format!("c1-{i:016}");
        engine
            .complete_saga(&format!("done-{i}"), &gsn, Vec::new(), |_| Vec::new())
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    write_raw(dir.path(), "sagas", &u64_key(2), GARBAGE);

    let store = Store::open(Options::new(dir.path())).unwrap();
    let engine = common::engine_on(
        &store,
        Arc::new(ManualClock::new(START_MS + 4 * DAY_MS)),
        None,
    );
    let retention = Duration::from_secs(3 * 24 * 3600);
    let removed = engine.collect_finished_sagas(retention).await.unwrap();
    assert_eq!(removed, 2, "sagas 1 and 3 are removed past the garbage");
    // A restarted sagad's scan starts from the oldest saga, so it meets the garbage again.
    let restarted = common::engine_on(
        &store,
        Arc::new(ManualClock::new(START_MS + 4 * DAY_MS)),
        None,
    );
    assert_eq!(
        restarted.collect_finished_sagas(retention).await.unwrap(),
        0,
        "a scan from the oldest passes the garbage again without failing"
    );
    let left = store
        .read(|tx| {
            tx.sagas(None, false)
                .map(|saga| saga.is_ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
    assert_eq!(
        left,
        [false],
        "only the garbage is left: it cannot be judged finished, so it is kept"
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_saga_record_is_listed_as_unreadable_and_hides_no_other_saga() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let (gsns, spoiled_sequence) = three_sagas(&ledger).await;
    write_raw(&ledger, "sagas", &u64_key(spoiled_sequence), GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut coordinator = CoordinatorClient::new(server.channel.clone());
    for newest_first in [false, true] {
        let page = coordinator
            .list_sagas(pb::ListSagasRequest {
                newest_first,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut listed: Vec<String> = page.sagas.into_iter().map(|s| s.gsn).collect();
        listed.sort();
        assert_eq!(
            listed,
            [gsns[0].clone(), gsns[2].clone()],
            "the sagas on either side of the garbage are listed (newest_first {newest_first})"
        );
        assert_eq!(page.unreadable_sequences, [spoiled_sequence]);
    }

    let stuck = OperationsClient::new(server.channel.clone())
        .list_stuck(pb::ListStuckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let unreadable: Vec<&pb::StuckItem> = stuck
        .items
        .iter()
        .filter(|item| item.kind == pb::StuckKind::UnreadableSaga as i32)
        .collect();
    assert_eq!(unreadable.len(), 1, "{:?}", stuck.items);
    assert!(
        unreadable[0]
            .reason
            .contains(&format!("{spoiled_sequence:016}")),
        "the item names the record's sequence: {}",
        unreadable[0].reason
    );

    let error = coordinator
        .get_saga(pb::GetSagaRequest {
            gsn: gsns[1].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::DataLoss, "{error:?}");
    server.stop().await.unwrap();
}

/// A strategy record sagad cannot read (damaged, or written by a newer sagad) is passed over
/// by ListStrategies, on every page size, and named once: it no longer fails every page that
/// reaches it, and an operator sees which business type to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_strategy_record_is_passed_over_by_list_strategies() {
    use sagad::grpc::pb::strategies_client::StrategiesClient;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    for business_type in ["a-order", "b-order", "c-order"] {
        put_strategy(
            &server.channel,
            pb::Strategy {
                business_type: business_type.into(),
                ..order_strategy(Duration::from_secs(30))
            },
        )
        .await;
    }
    server.stop().await.unwrap();
    // b-order's version 2, so the listing, which shows each type's latest, meets it.
    let key = [&b"b-order\0"[..], &2u64.to_be_bytes()].concat();
    write_raw(&ledger, "strategies", &key, GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut client = StrategiesClient::new(server.channel.clone());
    for page_size in [0, 1] {
        let mut listed = Vec::new();
        let mut unreadable = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_strategies(pb::ListStrategiesRequest {
                    page_size,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            listed.extend(page.strategies.into_iter().map(|s| s.business_type));
            unreadable.extend(page.unreadable_business_types);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(listed, ["a-order", "c-order"], "page_size {page_size}");
        assert_eq!(unreadable, ["b-order"], "named once, page_size {page_size}");
    }
    let error = client
        .get_strategy(pb::GetStrategyRequest {
            business_type: "b-order".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::DataLoss, "{error:?}");
    server.stop().await.unwrap();
}

/// The obvious repair of a strategy sagad cannot read is to store a new version over it; the
/// next version number is in the latest record's key, so the record need not decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_strategy_stores_a_new_version_over_an_undecodable_latest() {
    use sagad::grpc::pb::strategies_client::StrategiesClient;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    server.stop().await.unwrap();
    let key = [&b"order\0"[..], &2u64.to_be_bytes()].concat();
    write_raw(&ledger, "strategies", &key, GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut client = StrategiesClient::new(server.channel.clone());
    let stored = client
        .put_strategy(pb::PutStrategyRequest {
            request_id: "repair-order".into(),
            strategy: Some(order_strategy(Duration::from_secs(30))),
        })
        .await
        .unwrap()
        .into_inner()
        .strategy
        .unwrap();
    assert_eq!(stored.version, 3);
    let latest = client
        .get_strategy(pb::GetStrategyRequest {
            business_type: "order".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .strategy
        .unwrap();
    assert_eq!(latest.version, 3);
    server.stop().await.unwrap();
}

/// As for strategies: a retry configuration sagad cannot read is repaired by putting a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_retry_config_replaces_an_undecodable_latest_config() {
    use sagad::grpc::pb::retries_client::RetriesClient;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let put = |request_id: &'static str| pb::PutRetryConfigRequest {
        request_id: request_id.into(),
        config: Some(pb::RetryConfig {
            defaults: Some(pb::RetryPolicy {
                max_retries: Some(2),
                ..pb::RetryPolicy::default()
            }),
            ..pb::RetryConfig::default()
        }),
    };
    RetriesClient::new(server.channel.clone())
        .put_retry_config(put("cfg-1"))
        .await
        .unwrap();
    server.stop().await.unwrap();
    write_raw(&ledger, "retry_config", &u64_key(2), GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut client = RetriesClient::new(server.channel.clone());
    let stored = client
        .put_retry_config(put("cfg-repair"))
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(stored.version, 3);
    let latest = common::shown_retry_config(&server.channel).await;
    assert_eq!(latest.version, 3);
    assert_eq!(latest.defaults.unwrap().max_retries, Some(2));
    server.stop().await.unwrap();
}

/// A timer whose transition needs a record that does not decode (here the payload its Reverse
/// would carry) is dropped with nothing of the transition kept: stored in part, the saga would
/// be REVERSING with its Reverse never made, stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_whose_transition_meets_an_undecodable_payload_is_dropped_with_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = Store::open(Options::new(dir.path())).unwrap();
    let engine = common::engine_on(&store, clock.clone(), None);
    let (gsn, _) = common::outcall_saga_on(
        &engine,
        start("t-1", Deadline::After(60_000)),
        b"the charge".to_vec(),
    )
    .await;
    store.close().await.unwrap();
    // The outcall's own payload, which its Reverse would carry.
    write_raw(
        dir.path(),
        "payloads",
        &[&u64_key(1)[..], b"1.payment"].concat(),
        GARBAGE,
    );

    let store = Store::open(Options::new(dir.path())).unwrap();
    let engine = common::engine_on(&store, clock.clone(), None);
    engine.start().await.unwrap();
    clock.advance_ms(61_000);
    assert_eq!(
        common::timers_due_after(&store, LIMIT).await,
        0,
        "the deadline came due and was dropped"
    );
    let saga = engine.get_saga(&gsn).await.unwrap();
    assert_eq!(
        saga.state,
        SagaState::Running,
        "the deadline's transition was taken back whole: {saga:#?}"
    );
    let outbox = store.read(|tx| tx.scan_outbox().count()).await.unwrap();
    assert_eq!(outbox, 0, "no command of the transition was kept");
    engine.stop();
    store.close().await.unwrap();
}

/// With `full`, a saga whose payload does not decode is passed over and named among the
/// unreadable sequences, as a saga record that does not decode is: it no longer fails the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_payload_does_not_decode_is_listed_as_unreadable_and_hides_no_other_saga() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let (gsns, spoiled_sequence) = three_sagas(&ledger).await;
    // The saga's own payload is stored under its sequence and branch id "".
    write_raw(&ledger, "payloads", &u64_key(spoiled_sequence), GARBAGE);

    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut coordinator = CoordinatorClient::new(server.channel.clone());
    let page = coordinator
        .list_sagas(pb::ListSagasRequest {
            full: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(String, Vec<u8>)> =
        page.sagas.into_iter().map(|s| (s.gsn, s.payload)).collect();
    let payload = br#"{"order":42}"#.to_vec();
    assert_eq!(
        listed,
        [
            (gsns[0].clone(), payload.clone()),
            (gsns[2].clone(), payload)
        ],
        "the sagas on either side are listed with their payloads"
    );
    assert_eq!(page.unreadable_sequences, [spoiled_sequence]);
    // Without payloads the saga is readable, and listed.
    let page = coordinator
        .list_sagas(pb::ListSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sagas.len(), 3);
    assert!(page.unreadable_sequences.is_empty());
    server.stop().await.unwrap();
}

/// A command resumed from the outbox whose payload does not decode is not read again every
/// second for ever: its delivery stops, its outbox entry is kept, and operators see it among the
/// deliveries in flight with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_payload_does_not_decode_stops_its_delivery_and_is_shown_to_operators() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    // No node has an endpoint, so the saga's Executes wait in the outbox.
    let gsn = start_order(&server.channel, "o-spoiled", "order spoiled").await;
    server.stop().await.unwrap();
    let sequence: u64 = gsn.rsplit('-').next().unwrap().parse().unwrap();
    write_raw(&ledger, "payloads", &u64_key(sequence), GARBAGE);

    let store = Store::open(Options::new(&ledger)).unwrap();
    // Now, so that the step timeouts re-armed from the outbox are not yet due.
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let engine = common::engine_on(&store, clock, None);
    engine.start().await.unwrap();
    let outbox = store.read(|tx| tx.scan_outbox().count()).await.unwrap();
    assert!(outbox > 0, "the saga's commands wait in the outbox");
    let mut given_up = Vec::new();
    for _ in 0..(LIMIT.as_millis() / 20) {
        given_up = engine
            .deliveries_in_flight()
            .into_iter()
            .filter(|flight| flight.gsn == gsn && flight.last_error.contains("payload"))
            .collect();
        if given_up.len() == outbox {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(given_up.len(), outbox, "{given_up:?}");
    let kept = store.read(|tx| tx.scan_outbox().count()).await.unwrap();
    assert_eq!(kept, outbox, "the entries stay for an operator");
    engine.stop();
    store.close().await.unwrap();
}

/// A finished saga can leave a command out (a resend its node never took). Once retention has
/// removed the saga, that command is dropped when it is resumed, instead of reaching its node
/// without the saga's payload for a saga nobody can look up any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_saga_retention_removed_is_dropped_not_sent_without_its_payload() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    // No node has an endpoint, so the saga's Executes wait in the outbox.
    let gsn = start_order(&server.channel, "o-removed", "order removed").await;
    server.stop().await.unwrap();
    let sequence: u64 = gsn.rsplit('-').next().unwrap().parse().unwrap();

    let store = Store::open(Options::new(&ledger)).unwrap();
    let outbox = store.read(|tx| tx.scan_outbox().count()).await.unwrap();
    assert!(outbox > 0, "the saga's commands wait in the outbox");
    // What retention's write does to a saga past its retention.
    store
        .write(move |tx| tx.delete_saga(sequence))
        .await
        .unwrap()
        .unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let engine = common::engine_on(&store, clock, None);
    engine.start().await.unwrap();
    let mut left = outbox;
    for _ in 0..(LIMIT.as_millis() / 20) {
        left = store.read(|tx| tx.scan_outbox().count()).await.unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "the removed saga's commands are dropped");
    assert!(
        engine
            .deliveries_in_flight()
            .iter()
            .all(|flight| flight.gsn != gsn),
        "and no longer delivered"
    );
    engine.stop();
    store.close().await.unwrap();
}
