//! SIGKILL during reversals: sagad is killed while internal reversals are being retried, and
//! after a restart on the same ledger every reversal finishes with no outcall undone twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::orders::eventually;
use common::participant::{Node, PushParticipant, Script};
use common::{SagadProcess, wait_until_serving};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

const SAGAS: usize = 12;

async fn start_and_make_outcalls(channel: &Channel, nodes: &[PushParticipant], i: usize) -> String {
    let mut client = CoordinatorClient::new(channel.clone());
    let gsn = client
        .start_saga(pb::StartSagaRequest {
            request_id: format!("t-{i}"),
            business_type: "transfer".into(),
            mode: pb::SagaMode::RegisteredOutcalls as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gsn;
    for (order, participant) in nodes.iter().enumerate() {
        let callee = participant.node.node_id.clone();
        let branch = client
            .register_outcall(pb::RegisterOutcallRequest {
                request_id: format!("{gsn}-reg-{order}"),
                gsn: gsn.clone(),
                caller_node_id: "orders".into(),
                callee_node_id: callee.clone(),
                forward_action: "debit".into(),
                reversal_action: "credit".into(),
                order: order as u32 + 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .branch_id;
        participant
            .node
            .execute_directly(&gsn, &branch, "debit")
            .await;
        client
            .report_state(pb::ReportStateRequest {
                request_id: format!("{gsn}-rep-{order}"),
                gsn: gsn.clone(),
                branch_id: branch,
                reporter_node_id: "orders".into(),
                outcome: pb::Outcome::Succeeded as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    gsn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_reversals_finishes_them_after_restart_without_reversing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let orders = PushParticipant::start(Node::new("orders")).await;
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let node = Node::new(id);
        // Every reversal fails twice before it works: the kill lands while they are retried.
        node.script(
            "credit",
            (0..SAGAS * 2)
                .map(|_| Script::Fail("UNAVAILABLE"))
                .collect(),
        );
        nodes.push(PushParticipant::start(node).await);
    }
    let mut flags: Vec<String> = vec!["--node".into(), format!("orders={}", orders.endpoint())];
    for participant in &nodes {
        flags.push("--node".into());
        flags.push(format!(
            "{}={}",
            participant.node.node_id,
            participant.endpoint()
        ));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    let process = SagadProcess::spawn(&data, &flags);
    let channel = wait_until_serving(process.addr).await;
    pb::retries_client::RetriesClient::new(channel.clone())
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: "retries".into(),
            config: Some(pb::RetryConfig {
                defaults: Some(pb::RetryPolicy {
                    retryable_codes: vec!["UNAVAILABLE".into()],
                    max_retries: Some(100),
                    min_interval: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                    backoff_factor: Some(1.0),
                    max_interval: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 200_000_000,
                    }),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut gsns = Vec::new();
    for i in 0..SAGAS {
        gsns.push(start_and_make_outcalls(&channel, &nodes, i).await);
    }
    let mut client = CoordinatorClient::new(channel.clone());
    for (i, gsn) in gsns.iter().enumerate() {
        let answer = client
            .request_reversal(pb::RequestReversalRequest {
                request_id: format!("rev-{i}"),
                gsn: gsn.clone(),
                reversal_type: pb::ReversalType::Internal as i32,
                wait: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1_000_000,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.signal,
            pb::Signal::Reprocess as i32,
            "the reversal is still being retried"
        );
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    process.kill();

    let restarted = SagadProcess::spawn(&data, &flags);
    let channel = wait_until_serving(restarted.addr).await;
    let mut client = CoordinatorClient::new(channel.clone());
    for gsn in &gsns {
        let mut state = 0;
        for _ in 0..300 {
            let saga = client
                .get_saga(pb::GetSagaRequest { gsn: gsn.clone() })
                .await
                .unwrap()
                .into_inner()
                .saga
                .unwrap();
            state = saga.state;
            if state == pb::SagaState::Reversed as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            state,
            pb::SagaState::Reversed as i32,
            "saga {gsn} finished its reversal after the restart"
        );
    }
    for participant in &nodes {
        assert_eq!(
            participant.node.max_reversals(),
            1,
            "node {} undid an outcall twice",
            participant.node.node_id
        );
        for gsn in &gsns {
            assert_eq!(
                participant.node.reversals_of(
                    gsn,
                    &format!(
                        "{}.{}",
                        nodes
                            .iter()
                            .position(|p| p.node.node_id == participant.node.node_id)
                            .unwrap()
                            + 1,
                        participant.node.node_id
                    )
                ),
                1
            );
        }
    }
    let success = pb::Signal::ReversalSuccess as i32;
    let told = eventually(Duration::from_secs(15), || {
        gsns.iter()
            .all(|gsn| orders.node.signals_for(gsn).last() == Some(&success))
    })
    .await;
    assert!(told, "the caller got the final signal of every saga");
}
