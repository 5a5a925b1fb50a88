//! The sagas the bench runs: the 2-step order strategy (reserve on inventory, then charge on
//! payment), its success and reversal paths, and the registered-outcall flow; and the load
//! loop that runs N of them (or for a while) at concurrency C, timing each from StartSaga sent
//! to its terminal state seen on WatchSaga.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::strategies_client::StrategiesClient;
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

use crate::participant::DECLINE_MARKER;
use crate::stopwatch::now;
use crate::under_test::within;
use crate::{Error, fail};

/// The business type of the bench's strategy.
const BUSINESS_TYPE: &str = "bench-order";
/// The node ids the bench registers; "orders" is the caller of registered outcalls.
pub const INVENTORY: &str = "inventory";
pub const PAYMENT: &str = "payment";
pub const ORDERS: &str = "orders";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// reserve RESERVED, then charge PAID: COMPLETED.
    Success,
    /// reserve RESERVED, then charge DECLINED: reserve is reversed, REVERSED.
    Reversal,
    /// Registered outcalls: start, 2 × (RegisterOutcall + ReportState), CompleteSaga.
    Outcalls,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Success => "success",
            Scenario::Reversal => "reversal",
            Scenario::Outcalls => "outcalls",
        }
    }

    /// The RPCs one saga takes, received and made by sagad, as the efficiency ratio counts
    /// them; the report also shows the participant calls it measured.
    pub fn rpcs_per_saga(self) -> u32 {
        match self {
            // StartSaga + WatchSaga; Execute reserve, Execute charge; Signal ×2.
            Scenario::Success => 6,
            // StartSaga + WatchSaga; Execute ×2, Reverse reserve; Signal ×2.
            Scenario::Reversal => 7,
            // StartSaga, RegisterOutcall ×2, ReportState ×2, CompleteSaga; Signal ×3
            // (orders, inventory, payment).
            Scenario::Outcalls => 9,
        }
    }

    pub fn rpcs_explained(self) -> &'static str {
        match self {
            Scenario::Success => {
                "6 = client StartSaga + WatchSaga, sagad→participants Execute ×2 + Signal ×2"
            }
            Scenario::Reversal => {
                "7 = client StartSaga + WatchSaga, sagad→participants Execute ×2 + Reverse ×1 + Signal ×2"
            }
            Scenario::Outcalls => {
                "9 = client StartSaga + RegisterOutcall ×2 + ReportState ×2 + CompleteSaga, sagad→participants Signal ×3"
            }
        }
    }

    /// The calls sagad makes to participants per saga, to know when a run's tail has drained.
    pub fn participant_rpcs(self) -> u64 {
        match self {
            Scenario::Success => 4,
            Scenario::Reversal => 5,
            Scenario::Outcalls => 3,
        }
    }

    fn expected_state(self) -> pb::SagaState {
        match self {
            Scenario::Success | Scenario::Outcalls => pb::SagaState::Completed,
            Scenario::Reversal => pb::SagaState::Reversed,
        }
    }
}

fn step(id: &str, node: &str, forward: &str, reversal: &str) -> pb::Step {
    pb::Step {
        id: id.into(),
        node_id: node.into(),
        forward_action: forward.into(),
        reversal_action: reversal.into(),
        // Unset: sagad's default step timeout (30 s), never reached in a healthy run.
        timeout: None,
    }
}

fn step_status(step_id: &str, status: &str) -> pb::StepStatus {
    pb::StepStatus {
        step_id: step_id.into(),
        status: status.into(),
    }
}

/// reserve on inventory first; RESERVED triggers charge on payment; PAID ends the saga;
/// DECLINED is abnormal and reverses reserve.
pub fn strategy() -> pb::Strategy {
    pb::Strategy {
        business_type: BUSINESS_TYPE.into(),
        description: "sagad-bench: reserve, then charge".into(),
        steps: vec![
            step("reserve", INVENTORY, "reserve", "release"),
            step("charge", PAYMENT, "charge", "refund"),
        ],
        first_set: vec!["reserve".into()],
        rules: vec![pb::Rule {
            when: vec![step_status("reserve", "RESERVED")],
            trigger: vec!["charge".into()],
        }],
        end_statuses: vec![step_status("charge", "PAID")],
        abnormal_statuses: vec![step_status("charge", "DECLINED")],
        exception_scopes: vec![pb::ExceptionScope {
            step_id: "charge".into(),
            reverse: vec!["reserve".into()],
        }],
        ..Default::default()
    }
}

/// Stores the strategy and points sagad at the participant nodes. `nonce` keeps request ids
/// fresh when one sagad (`--target`) serves many runs.
pub async fn set_up(channel: &Channel, nonce: &str, nodes: &[(&str, String)]) -> Result<(), Error> {
    let mut strategies = StrategiesClient::new(channel.clone());
    let put = strategies.put_strategy(pb::PutStrategyRequest {
        request_id: format!("bench-strategy-{nonce}"),
        strategy: Some(strategy()),
    });
    within("PutStrategy", put)
        .await?
        .map_err(|s| fail(format!("PutStrategy failed: {s}")))?;
    let mut coordinator = CoordinatorClient::new(channel.clone());
    for (node_id, endpoint) in nodes {
        let call = format!("RegisterNode {node_id}");
        let register = coordinator.register_node(pb::RegisterNodeRequest {
            request_id: format!("bench-node-{node_id}-{nonce}"),
            node_id: (*node_id).to_owned(),
            endpoint: endpoint.clone(),
        });
        within(&call, register)
            .await?
            .map_err(|s| fail(format!("{call} failed: {s}")))?;
    }
    Ok(())
}

/// A payload of about `size` bytes, JSON like a real order; its first bytes choose the path.
pub fn payload(scenario: Scenario, size: usize) -> Vec<u8> {
    let head: &[u8] = match scenario {
        Scenario::Reversal => DECLINE_MARKER,
        Scenario::Success | Scenario::Outcalls => b"{\"scenario\":\"success\"",
    };
    let mut payload = head.to_vec();
    payload.extend_from_slice(b",\"pad\":\"");
    let closing = b"\"}";
    let pad = size.saturating_sub(payload.len() + closing.len());
    payload.extend(std::iter::repeat_n(b'x', pad));
    payload.extend_from_slice(closing);
    payload
}

/// How one saga went wrong.
#[derive(Debug)]
pub enum Failure {
    /// sagad does not offer a method this scenario needs.
    Unimplemented(String),
    Other(String),
}

impl Failure {
    fn from_status(method: &str, status: tonic::Status) -> Failure {
        if status.code() == Code::Unimplemented {
            Failure::Unimplemented(format!("{method}: {}", status.message()))
        } else {
            Failure::Other(format!("{method}: {status}"))
        }
    }
}

/// Everything one saga needs; shared by the workers of a run.
pub struct Saga {
    pub scenario: Scenario,
    pub payload: Vec<u8>,
    pub timeout: Duration,
    /// Prefix of request ids: unique per run, so no saga replays another's answer.
    pub prefix: String,
}

impl Saga {
    /// Runs saga number `i` to its terminal state and returns how long that took, from
    /// StartSaga sent to the terminal state seen.
    pub async fn run(
        &self,
        client: &mut CoordinatorClient<Channel>,
        i: usize,
    ) -> Result<Duration, Failure> {
        let started = now();
        let ran = tokio::time::timeout(self.timeout, async {
            match self.scenario {
                Scenario::Success | Scenario::Reversal => self.orchestrated(client, i).await,
                Scenario::Outcalls => self.outcalls(client, i).await,
            }
        })
        .await;
        let (state, seen) = match ran {
            Ok(ended) => ended?,
            Err(_) => {
                return Err(Failure::Other(format!(
                    "saga {i} not terminal after {:?}",
                    self.timeout
                )));
            }
        };
        if state != self.scenario.expected_state() {
            return Err(Failure::Other(format!(
                "saga {i} ended {state:?}, expected {:?}",
                self.scenario.expected_state()
            )));
        }
        Ok(seen.duration_since(started))
    }

    fn start_request(&self, i: usize, mode: pb::SagaMode) -> pb::StartSagaRequest {
        pb::StartSagaRequest {
            request_id: format!("{}-{i}", self.prefix),
            business_type: BUSINESS_TYPE.into(),
            mode: mode as i32,
            payload: self.payload.clone(),
            content_type: "application/json".into(),
            ..Default::default()
        }
    }

    async fn orchestrated(
        &self,
        client: &mut CoordinatorClient<Channel>,
        i: usize,
    ) -> Result<(pb::SagaState, Instant), Failure> {
        let started = client
            .start_saga(self.start_request(i, pb::SagaMode::Orchestrated))
            .await
            .map_err(|s| Failure::from_status("StartSaga", s))?
            .into_inner();
        watch_until_terminal(client, started.gsn).await
    }

    async fn outcalls(
        &self,
        client: &mut CoordinatorClient<Channel>,
        i: usize,
    ) -> Result<(pb::SagaState, Instant), Failure> {
        let gsn = client
            .start_saga(self.start_request(i, pb::SagaMode::RegisteredOutcalls))
            .await
            .map_err(|s| Failure::from_status("StartSaga", s))?
            .into_inner()
            .gsn;
        let outcalls = [
            (1, INVENTORY, "reserve", "release", "RESERVED"),
            (2, PAYMENT, "charge", "refund", "PAID"),
        ];
        for (order, callee, forward, reversal, status) in outcalls {
            let branch_id = client
                .register_outcall(pb::RegisterOutcallRequest {
                    request_id: format!("{}-{i}-register-{order}", self.prefix),
                    gsn: gsn.clone(),
                    caller_node_id: ORDERS.into(),
                    callee_node_id: callee.into(),
                    forward_action: forward.into(),
                    reversal_action: reversal.into(),
                    order,
                    payload: Vec::new(),
                    content_type: String::new(),
                })
                .await
                .map_err(|s| Failure::from_status("RegisterOutcall", s))?
                .into_inner()
                .branch_id;
            // The outcall itself goes from the caller straight to the callee; sagad never sees
            // it, so the bench skips it and reports its outcome at once.
            client
                .report_state(pb::ReportStateRequest {
                    request_id: format!("{}-{i}-report-{order}", self.prefix),
                    gsn: gsn.clone(),
                    branch_id,
                    reporter_node_id: ORDERS.into(),
                    outcome: pb::Outcome::Succeeded as i32,
                    status: Some(pb::Status {
                        name: status.into(),
                        parameters: Default::default(),
                    }),
                    ..Default::default()
                })
                .await
                .map_err(|s| Failure::from_status("ReportState", s))?;
        }
        let completed = client
            .complete_saga(pb::CompleteSagaRequest {
                request_id: format!("{}-{i}-complete", self.prefix),
                gsn: gsn.clone(),
            })
            .await
            .map_err(|s| Failure::from_status("CompleteSaga", s))?
            .into_inner();
        match completed.saga.map(|s| s.state()) {
            Some(state) if is_terminal(state) => Ok((state, now())),
            _ => watch_until_terminal(client, gsn).await,
        }
    }
}

fn is_terminal(state: pb::SagaState) -> bool {
    matches!(
        state,
        pb::SagaState::Completed | pb::SagaState::Reversed | pb::SagaState::NeedsAttention
    )
}

/// Follows WatchSaga until the saga is terminal, and returns the state and when it was seen.
/// NEEDS_ATTENTION counts as an end here (the stream would wait for an operator), and the
/// caller reports it as a wrong ending.
///
/// The stream is then read to its end (sagad closes it right after a terminal state) rather
/// than dropped: every stream a client drops early is a reset its own h2 library counts, and
/// after 1,024 on one connection h2 sends GOAWAY, failing every call in flight on it
/// (hyperium/h2#856; seen here after ~100,000 sagas).
async fn watch_until_terminal(
    client: &mut CoordinatorClient<Channel>,
    gsn: String,
) -> Result<(pb::SagaState, Instant), Failure> {
    let mut stream = client
        .watch_saga(pb::WatchSagaRequest { gsn })
        .await
        .map_err(|s| Failure::from_status("WatchSaga", s))?
        .into_inner();
    let mut ended = None;
    while let Some(change) = stream
        .message()
        .await
        .map_err(|s| Failure::from_status("WatchSaga", s))?
    {
        if ended.is_none()
            && let Some(state) = change.saga.map(|s| s.state())
            && is_terminal(state)
        {
            ended = Some((state, now()));
            if state == pb::SagaState::NeedsAttention {
                // sagad keeps this stream open until an operator acts: stop here.
                break;
            }
        }
    }
    ended.ok_or_else(|| Failure::Other("WatchSaga ended before the saga was terminal".into()))
}

/// How much load a run applies.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    Sagas(usize),
    For(Duration),
}

/// What a run of many sagas measured.
#[derive(Debug, Default)]
pub struct Load {
    /// One per saga that ended as expected, in microseconds.
    pub latencies_us: Vec<u64>,
    pub failures: usize,
    pub first_failure: Option<String>,
    /// Set when sagad answered UNIMPLEMENTED to a method the scenario needs.
    pub unimplemented: Option<String>,
    pub elapsed: Duration,
}

/// Runs sagas on `concurrency` workers, spread over `channels`, until `amount` is done.
pub async fn drive(
    channels: &[Channel],
    saga: Arc<Saga>,
    concurrency: usize,
    amount: Amount,
) -> Result<Load, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = now();
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency.max(1) {
        let channel = channels
            .get(w % channels.len().max(1))
            .ok_or_else(|| fail("no connection to sagad"))?
            .clone();
        let saga = saga.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut client = CoordinatorClient::new(channel);
            let mut load = Load::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let more = match amount {
                    Amount::Sagas(n) => i < n,
                    Amount::For(limit) => started.elapsed() < limit,
                };
                if !more {
                    break;
                }
                match saga.run(&mut client, i).await {
                    Ok(latency) => load.latencies_us.push(latency.as_micros() as u64),
                    Err(Failure::Unimplemented(what)) => {
                        load.unimplemented = Some(what);
                        break;
                    }
                    Err(Failure::Other(what)) => {
                        load.failures += 1;
                        load.first_failure.get_or_insert(what);
                    }
                }
            }
            load
        }));
    }
    let mut total = Load::default();
    for worker in workers {
        let load = worker.await?;
        total.latencies_us.extend(load.latencies_us);
        total.failures += load.failures;
        if total.first_failure.is_none() {
            total.first_failure = load.first_failure;
        }
        if total.unimplemented.is_none() {
            total.unimplemented = load.unimplemented;
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
