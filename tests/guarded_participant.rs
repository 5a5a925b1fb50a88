//! Whole sagas through a participant that guards every Execute and Reverse with sagad's
//! barrier (Idempotency.Guard, then Finish), as docs/participant.md tells real ones to: an
//! action Finished FAILED runs again when sagad tries again (its retry policy, or
//! ReprocessSaga), and only then.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::orders::{branch, get, put_retry_config, register_node, shop, wait_terminal};
use common::participant::Script;
use prost::Message;
use sagad::grpc::pb;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use sagad::grpc::pb::{BranchAction, GuardVerdict};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

const LIMIT: Duration = Duration::from_secs(20);

/// How one run of an action ends: SUCCEEDED with a status, or FAILED with an error code.
#[derive(Debug, Clone, Copy)]
enum Run {
    Succeed(&'static str),
    Fail(&'static str),
}

/// A participant whose only memory is sagad's barrier: it runs an action only on PROCEED,
/// Finishes it with what it answers, and answers repeats from the record.
struct Guarded {
    node_id: String,
    barrier: IdempotencyClient<Channel>,
    /// Runs by action name, used in order; when empty, SUCCEEDED with status "DONE".
    scripts: Mutex<HashMap<String, VecDeque<Run>>>,
    /// How often each action actually ran (PROCEED), the measure of "ran again".
    runs: Mutex<HashMap<String, u32>>,
}

impl Guarded {
    fn script(&self, action: &str, runs: Vec<Run>) {
        self.scripts
            .lock()
            .unwrap()
            .insert(action.to_owned(), runs.into());
    }

    fn runs_of(&self, action: &str) -> u32 {
        self.runs.lock().unwrap().get(action).copied().unwrap_or(0)
    }

    fn run(&self, action: &str) -> Run {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(action.to_owned())
            .or_default() += 1;
        self.scripts
            .lock()
            .unwrap()
            .get_mut(action)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Run::Succeed("DONE"))
    }

    async fn guard(
        &self,
        gsn: &str,
        branch_id: &str,
        action: BranchAction,
        command_id: &str,
    ) -> Result<(GuardVerdict, pb::IdempotencyRecord), Status> {
        let response = self
            .barrier
            .clone()
            .guard(pb::GuardRequest {
                node_id: self.node_id.clone(),
                gsn: gsn.into(),
                branch_id: branch_id.into(),
                action: action as i32,
                command_id: command_id.into(),
            })
            .await?
            .into_inner();
        let verdict = GuardVerdict::try_from(response.verdict)
            .map_err(|_| Status::internal("unknown verdict"))?;
        Ok((verdict, response.record.unwrap_or_default()))
    }

    async fn finish(
        &self,
        record: &pb::IdempotencyRecord,
        succeeded: bool,
        response: Vec<u8>,
    ) -> Result<(), Status> {
        self.barrier
            .clone()
            .finish(pb::FinishRequest {
                scope: record.scope.clone(),
                request_id: record.request_id.clone(),
                result: if succeeded { "SUCCEEDED" } else { "FAILED" }.into(),
                response,
                content_type: "application/x-protobuf".into(),
            })
            .await?;
        Ok(())
    }
}

fn outcome(run: Run) -> (pb::Outcome, Option<pb::Status>, String) {
    match run {
        Run::Succeed(name) => (
            pb::Outcome::Succeeded,
            Some(pb::Status {
                name: name.into(),
                parameters: Default::default(),
            }),
            String::new(),
        ),
        Run::Fail(code) => (pb::Outcome::Failed, None, code.into()),
    }
}

fn undecodable(e: prost::DecodeError) -> Status {
    Status::internal(format!("stored response: {e}"))
}

struct Service(Arc<Guarded>);

#[tonic::async_trait]
impl Participant for Service {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let r = request.into_inner();
        let node = &self.0;
        let (verdict, record) = node
            .guard(&r.gsn, &r.branch_id, BranchAction::Forward, &r.command_id)
            .await?;
        let answer = match verdict {
            GuardVerdict::Proceed => {
                let (outcome, status, error_code) = outcome(node.run(&r.action));
                let answer = pb::ExecuteResponse {
                    outcome: outcome as i32,
                    status,
                    error_code,
                    message: String::new(),
                };
                let succeeded = outcome == pb::Outcome::Succeeded;
                node.finish(&record, succeeded, answer.encode_to_vec())
                    .await?;
                answer
            }
            GuardVerdict::Duplicate => {
                pb::ExecuteResponse::decode(record.response.as_slice()).map_err(undecodable)?
            }
            GuardVerdict::InProgress => pb::ExecuteResponse {
                outcome: pb::Outcome::Processing as i32,
                ..Default::default()
            },
            GuardVerdict::Hanging => pb::ExecuteResponse {
                outcome: pb::Outcome::Failed as i32,
                error_code: "ALREADY_REVERSED".into(),
                ..Default::default()
            },
            other => return Err(Status::internal(format!("{other:?} for a forward action"))),
        };
        Ok(Response::new(answer))
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let r = request.into_inner();
        let node = &self.0;
        let (verdict, record) = node
            .guard(&r.gsn, &r.branch_id, BranchAction::Reversal, &r.command_id)
            .await?;
        let not_found = pb::ReverseResponse {
            outcome: pb::Outcome::NotFound as i32,
            ..Default::default()
        };
        let answer = match verdict {
            GuardVerdict::Proceed => {
                let (outcome, _, error_code) = outcome(node.run(&r.action));
                let answer = pb::ReverseResponse {
                    outcome: outcome as i32,
                    error_code,
                    message: String::new(),
                };
                let succeeded = outcome == pb::Outcome::Succeeded;
                node.finish(&record, succeeded, answer.encode_to_vec())
                    .await?;
                answer
            }
            GuardVerdict::NullCompensation => not_found,
            GuardVerdict::Duplicate if record.result == "NULL_COMPENSATION" => not_found,
            GuardVerdict::Duplicate => {
                pb::ReverseResponse::decode(record.response.as_slice()).map_err(undecodable)?
            }
            GuardVerdict::InProgress => pb::ReverseResponse {
                outcome: pb::Outcome::Processing as i32,
                ..Default::default()
            },
            other => return Err(Status::internal(format!("{other:?} for a reversal"))),
        };
        Ok(Response::new(answer))
    }

    async fn query_status(
        &self,
        _request: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        // Every action here answers at once, so sagad never needs to ask.
        Err(Status::unimplemented("not expected in these tests"))
    }

    async fn signal(
        &self,
        _request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        Ok(Response::new(pb::SignalResponse {}))
    }
}

/// Serves `node_id` as a guarded participant on loopback, registered with the shop's sagad in
/// place of the scripted node it had.
async fn guarded(channel: &Channel, node_id: &str) -> Arc<Guarded> {
    let node = Arc::new(Guarded {
        node_id: node_id.into(),
        barrier: IdempotencyClient::new(channel.clone()),
        scripts: Mutex::default(),
        runs: Mutex::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = ParticipantServer::new(Service(node.clone()));
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    register_node(channel, node_id, &endpoint).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guarded_step_finished_failed_with_a_retryable_code_runs_again_on_sagads_retry() {
    let shop = shop(Duration::from_secs(10)).await;
    let channel = shop.server.channel.clone();
    put_retry_config(&channel, "fast-retries", &["UNAVAILABLE"]).await;
    let payment = guarded(&channel, "payment").await;
    payment.script(
        "charge",
        vec![Run::Fail("UNAVAILABLE"), Run::Succeed("PAID")],
    );
    shop.inventory
        .node
        .script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    let gsn = common::orders::start_order(&channel, "guarded-retry", "one widget").await;

    let saga = wait_terminal(&channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32, "{saga:#?}");
    assert_eq!(
        payment.runs_of("charge"),
        2,
        "the failed charge ran again on the retry, and only then"
    );
    assert_eq!(branch(&get(&channel, &gsn).await, "charge").attempts, 2);
    assert_eq!(payment.runs_of("refund"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guarded_reversal_finished_failed_runs_again_after_reprocess_saga_and_the_saga_ends_reversed()
 {
    let shop = shop(Duration::from_secs(10)).await;
    let channel = shop.server.channel.clone();
    let inventory = guarded(&channel, "inventory").await;
    inventory.script("reserve", vec![Run::Succeed("RESERVED")]);
    // LOCKED is not retryable by the default policy: the saga waits for an operator.
    inventory.script(
        "release",
        vec![Run::Fail("LOCKED"), Run::Succeed("RELEASED")],
    );
    shop.payment
        .node
        .script("charge", vec![Script::Succeed("DECLINED", vec![])]);
    let gsn = common::orders::start_order(&channel, "guarded-reprocess", "one widget").await;

    let mut saga = get(&channel, &gsn).await;
    for _ in 0..1_000 {
        if saga.state == pb::SagaState::NeedsAttention as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        saga = get(&channel, &gsn).await;
    }
    assert_eq!(
        saga.state,
        pb::SagaState::NeedsAttention as i32,
        "{saga:#?}"
    );
    assert_eq!(inventory.runs_of("release"), 1);

    // The operator fixed the lock; ReprocessSaga sends a new Reverse, which the barrier runs.
    shop.server
        .coordinator()
        .reprocess_saga(pb::ReprocessSagaRequest {
            request_id: "reprocess-1".into(),
            gsn: gsn.clone(),
        })
        .await
        .unwrap();
    let saga = wait_terminal(&channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{saga:#?}");
    assert_eq!(
        branch(&get(&channel, &gsn).await, "reserve").state,
        pb::BranchState::Reversed as i32
    );
    assert_eq!(
        inventory.runs_of("release"),
        2,
        "the failed release ran again, once"
    );
    assert_eq!(inventory.runs_of("reserve"), 1);
}
