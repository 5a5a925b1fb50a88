//! Crash safety at the process level: the real sagad binary is killed with SIGKILL while
//! StartSaga calls are in flight, restarted on the same ledger, and every saga it answered must
//! still be there — with its request_id still bound to the same GSN.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{SagadProcess, start_request, wait_until_serving};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;

const ROUNDS: usize = 3;
const REQUESTS_PER_ROUND: usize = 200;
const KILL_AFTER_ANSWERS: usize = 80;

fn sequence(gsn: &str) -> u64 {
    gsn.rsplit_once('-').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_starts_are_in_flight_loses_no_answered_saga() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    // request_id -> GSN, for every StartSaga that was answered.
    let mut answered: BTreeMap<String, String> = BTreeMap::new();
    let mut highest_sequence = 0;

    for round in 0..ROUNDS {
        let process = SagadProcess::spawn(&data, &[]);
        let channel = wait_until_serving(process.addr).await;
        verify_all_answered_survived(&channel, &answered).await;

        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..REQUESTS_PER_ROUND {
            let mut client = CoordinatorClient::new(channel.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let request_id = format!("round{round}-{i}");
                if let Ok(response) = client.start_saga(start_request(&request_id, "order")).await {
                    let _ = tx.send((request_id, response.into_inner().gsn));
                }
            });
        }
        drop(tx);
        let mut this_round = 0;
        while let Some((request_id, gsn)) = rx.recv().await {
            assert!(
                sequence(&gsn) > highest_sequence || answered.values().any(|g| g == &gsn),
                "GSN {gsn} reused after restart"
            );
            answered.insert(request_id, gsn);
            this_round += 1;
            if this_round == KILL_AFTER_ANSWERS {
                process.kill();
                break;
            }
        }
        // Answers that raced the kill still count: they were acknowledged.
        while let Ok(Some((request_id, gsn))) =
            tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
        {
            answered.insert(request_id, gsn);
        }
        highest_sequence = answered.values().map(|g| sequence(g)).max().unwrap_or(0);
        assert!(
            this_round >= KILL_AFTER_ANSWERS,
            "round {round} was answered {this_round} times"
        );
    }

    let process = SagadProcess::spawn(&data, &[]);
    let channel = wait_until_serving(process.addr).await;
    verify_all_answered_survived(&channel, &answered).await;
    let fresh = CoordinatorClient::new(channel)
        .start_saga(start_request("after-the-crashes", "order"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        sequence(&fresh.gsn) > highest_sequence,
        "a new GSN is above every GSN issued before the crashes"
    );
}

async fn verify_all_answered_survived(
    channel: &tonic::transport::Channel,
    answered: &BTreeMap<String, String>,
) {
    let mut client = CoordinatorClient::new(channel.clone());
    for (request_id, gsn) in answered {
        let saga = client
            .get_saga(pb::GetSagaRequest { gsn: gsn.clone() })
            .await
            .unwrap_or_else(|e| panic!("answered saga {gsn} ({request_id}) was lost: {e}"))
            .into_inner()
            .saga
            .unwrap();
        assert_eq!(&saga.request_id, request_id);
        let again = client
            .start_saga(start_request(request_id, "order"))
            .await
            .unwrap();
        assert_eq!(
            &again.into_inner().gsn,
            gsn,
            "{request_id} must stay bound to {gsn}"
        );
    }
}
