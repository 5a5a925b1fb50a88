//! The engine under SIGKILL (issue 3, "Crash"): the real sagad binary drives sixty orchestrated
//! order sagas through three real participants and is killed twice while they are in flight
//! (steps carried out at the nodes, their answers not yet back: in the first stage, then in the
//! second), restarted on the same ledger each time. Every saga must reach the terminal state it
//! would have reached without the crashes, with no step executed or reversed twice at the
//! participants, and every node of each saga told how it ended, once.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::time::Duration;

use common::orders::{branch, eventually, get, order_strategy, put_strategy, wait_terminal};
use common::participant::{Node, PushParticipant, Script};
use common::{SagadProcess, wait_until_serving};
use futures::future::join_all;
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;

const SAGAS: usize = 60;
/// Every fourth order is declined by payment, so its reservation must be reversed.
const DECLINE_EVERY: usize = 4;
/// Each step answers this late (well inside sagad's participant timeout), so sagas are still
/// in flight when sagad is killed.
const ANSWER_AFTER: Duration = Duration::from_millis(150);
const LIMIT: Duration = Duration::from_secs(30);

fn declined(i: usize) -> bool {
    i.is_multiple_of(DECLINE_EVERY)
}

fn payload(i: usize) -> String {
    if declined(i) {
        format!("order {i} decline")
    } else {
        format!("order {i}")
    }
}

fn node_flags(participants: &[&PushParticipant]) -> Vec<String> {
    participants
        .iter()
        .flat_map(|p| {
            [
                "--node".to_owned(),
                format!("{}={}", p.node.node_id, p.endpoint()),
            ]
        })
        .collect()
}

fn spawn(data: &std::path::Path, flags: &[String]) -> SagadProcess {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    SagadProcess::spawn(data, &flags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_flight_then_restart_ends_every_saga_as_it_would_have_ended() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let inventory = PushParticipant::start(Node::new("inventory")).await;
    let payment = PushParticipant::start(Node::new("payment")).await;
    let shipping = PushParticipant::start(Node::new("shipping")).await;
    // Every payload contains "order"; the first matching rule wins, so "decline" comes first.
    inventory.node.when_payload_contains(
        "reserve",
        "order",
        Script::SucceedLate("RESERVED", ANSWER_AFTER),
    );
    payment
        .node
        .when_payload_contains("charge", "decline", Script::Succeed("DECLINED", vec![]));
    payment.node.when_payload_contains(
        "charge",
        "order",
        Script::SucceedLate("PAID", ANSWER_AFTER),
    );
    shipping.node.when_payload_contains(
        "ship",
        "order",
        Script::SucceedLate("SHIPPED", ANSWER_AFTER),
    );
    let flags = node_flags(&[&inventory, &payment, &shipping]);

    let first = spawn(&data, &flags);
    let channel = wait_until_serving(first.addr).await;
    put_strategy(&channel, order_strategy(Duration::from_secs(10))).await;
    let starts = (0..SAGAS).map(|i| {
        let mut client = CoordinatorClient::new(channel.clone());
        async move {
            client
                .start_saga(pb::StartSagaRequest {
                    request_id: format!("crash-order-{i}"),
                    business_type: "order".into(),
                    mode: pb::SagaMode::Orchestrated as i32,
                    payload: payload(i).into_bytes(),
                    content_type: "text/plain".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .gsn
        }
    });
    let gsns: Vec<String> = join_all(starts).await;
    // Let the first stage get under way, then kill sagad in the middle of it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.kill();
    let shipped_before_kill = lock_len(&shipping.node.executions);
    eprintln!(
        "sagad killed with {} reservations, {} charges and {shipped_before_kill} shipments made",
        lock_len(&inventory.node.executions),
        lock_len(&payment.node.executions)
    );
    assert!(
        shipped_before_kill < SAGAS - SAGAS / DECLINE_EVERY,
        "the kill came after every saga had shipped ({shipped_before_kill}): nothing was in flight"
    );

    // Killed again once shipping has started, before its late answers are back.
    let second = spawn(&data, &flags);
    wait_until_serving(second.addr).await;
    let shipping_started = eventually(LIMIT, || lock_len(&shipping.node.executions) >= 5).await;
    assert!(shipping_started, "shipping started after the restart");
    second.kill();
    eprintln!(
        "sagad killed again with {} shipments made",
        lock_len(&shipping.node.executions)
    );

    let third = spawn(&data, &flags);
    let channel = wait_until_serving(third.addr).await;
    let ended = join_all(gsns.iter().map(|gsn| wait_terminal(&channel, gsn, LIMIT))).await;

    let completed = pb::Signal::Completed as i32;
    let reversal_success = pb::Signal::ReversalSuccess as i32;
    for (i, (gsn, saga)) in gsns.iter().zip(&ended).enumerate() {
        let saga_now = get(&channel, gsn).await;
        if declined(i) {
            assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{saga_now:#?}");
            let reserve = branch(&saga_now, "reserve");
            let reserve_undone = (reserve.state == pb::BranchState::Reversed as i32
                && inventory.node.reversals_of(gsn, "reserve") == 1)
                || (reserve.state == pb::BranchState::NotOccurred as i32
                    && inventory.node.executions_of(gsn, "reserve") == 0);
            assert!(reserve_undone, "reserve of {gsn} is undone: {reserve:#?}");
            assert_eq!(shipping.node.executions_of(gsn, "ship"), 0, "{gsn}");
            assert!(saga_now.branches.iter().all(|b| b.branch_id != "ship"));
        } else {
            assert_eq!(saga.state, pb::SagaState::Completed as i32, "{saga_now:#?}");
            for (node, step) in [
                (&inventory, "reserve"),
                (&payment, "charge"),
                (&shipping, "ship"),
            ] {
                assert_eq!(
                    branch(&saga_now, step).state,
                    pb::BranchState::Succeeded as i32,
                    "{gsn} {step}"
                );
                assert_eq!(node.node.executions_of(gsn, step), 1, "{gsn} {step}");
                assert_eq!(node.node.reversals_of(gsn, step), 0, "{gsn} {step}");
            }
        }
    }
    for node in [&inventory.node, &payment.node, &shipping.node] {
        assert!(
            node.max_executions() <= 1,
            "{} executed a branch twice",
            node.node_id
        );
        assert!(
            node.max_reversals() <= 1,
            "{} reversed a branch twice",
            node.node_id
        );
    }

    // Signals are commands too: delivered after the saga ended, across the crash, once each.
    let told = eventually(LIMIT, || {
        gsns.iter().enumerate().all(|(i, gsn)| {
            if declined(i) {
                inventory.node.signals_for(gsn) == vec![reversal_success]
                    && payment.node.signals_for(gsn) == vec![reversal_success]
                    && shipping.node.signals_for(gsn).is_empty()
            } else {
                [&inventory, &payment, &shipping]
                    .iter()
                    .all(|p| p.node.signals_for(gsn) == vec![completed])
            }
        })
    })
    .await;
    assert!(
        told,
        "every node of every saga is told how it ended, once: inventory {:?}, payment {:?}, \
         shipping {:?}",
        inventory.node.signals.lock().unwrap(),
        payment.node.signals.lock().unwrap(),
        shipping.node.signals.lock().unwrap()
    );
    third.kill();
}

fn lock_len<K, V>(map: &std::sync::Mutex<std::collections::BTreeMap<K, V>>) -> usize {
    map.lock().unwrap_or_else(|p| p.into_inner()).len()
}
