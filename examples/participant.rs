//! An example participant node to copy: an "inventory" service that reserves and releases stock
//! in memory, with sagad's branch barrier (Idempotency.Guard, then Finish) around every forward
//! and reversal action, so nothing runs twice, a reversal of what never ran runs nothing, and a
//! forward action arriving after its reversal is refused.
//!
//! ```sh
//! cargo run --example participant -- --register     # sagad calls us at --listen
//! cargo run --example participant -- --subscribe    # we hold a Subscribe stream instead
//! ```
//! Payloads are JSON like `{"sku":"widget","qty":3}`. docs/participant.md explains the protocol
//! for any language; replace `State` with your database and keep the rest.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clap::Parser;
use prost::Message;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use sagad::grpc::pb::{self, BranchAction, GuardVerdict, Outcome};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server, server::TcpIncoming};
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
#[command(about = "An example sagad participant: an in-memory inventory")]
struct Args {
    /// sagad's address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    sagad: String,
    /// This node's id, as strategies and outcalls name it.
    #[arg(long, default_value = "inventory")]
    node_id: String,
    /// Where to serve the Participant service (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Register this node's endpoint with sagad at start (Coordinator.RegisterNode).
    #[arg(long, conflicts_with = "subscribe")]
    register: bool,
    /// The URL to register, when sagad reaches this node under another address than --listen.
    #[arg(long)]
    endpoint: Option<String>,
    /// Serve nothing: receive commands on a Coordinator.Subscribe stream (for a node sagad
    /// cannot dial) and answer them with ReportState and Ack.
    #[arg(long)]
    subscribe: bool,
    /// Initial stock as SKU=QUANTITY; repeat the flag for more SKUs.
    #[arg(long = "stock", value_parser = parse_stock, default_value = "widget=10")]
    stock: Vec<(String, u64)>,
}

fn parse_stock(text: &str) -> Result<(String, u64), String> {
    let (sku, qty) = text.split_once('=').ok_or("expected SKU=QUANTITY")?;
    Ok((sku.to_owned(), qty.parse().map_err(|e| format!("{e}"))?))
}

/// What a saga's payload asks of this node.
#[derive(serde::Deserialize)]
struct Order {
    sku: String,
    qty: u64,
}

/// What this node knows of one branch: the truth QueryStatus answers from.
enum Held {
    Reserved {
        sku: String,
        qty: u64,
    },
    Refused(String),
    Released,
    /// A reversal came before the forward action (null compensation).
    NeverRan,
}

#[derive(Default)]
struct State {
    stock: HashMap<String, u64>,
    branches: HashMap<(String, String), Held>,
    /// Signals are delivered at least once; their command ids de-duplicate them.
    signals_seen: HashSet<String>,
}

/// The result the barrier stores on a reversal that found nothing to undo (idempotency.proto).
const NULL_COMPENSATION: &str = "NULL_COMPENSATION";

struct Inventory {
    node_id: String,
    barrier: IdempotencyClient<Channel>,
    state: Mutex<State>,
}

fn executed(outcome: Outcome, error_code: &str, status: &str) -> pb::ExecuteResponse {
    let status = (!status.is_empty()).then(|| pb::Status {
        name: status.into(),
        ..Default::default()
    });
    pb::ExecuteResponse {
        outcome: outcome as i32,
        status,
        error_code: error_code.into(),
        ..Default::default()
    }
}

fn reversed(outcome: Outcome) -> pb::ReverseResponse {
    pb::ReverseResponse {
        outcome: outcome as i32,
        ..Default::default()
    }
}

/// A verdict the barrier never gives for this action: a gRPC error makes sagad send the command
/// again rather than record a wrong answer.
fn unexpected(verdict: GuardVerdict) -> Status {
    Status::internal(format!("unexpected verdict {}", verdict.as_str_name()))
}

fn stored<M: Message + Default>(record: &pb::IdempotencyRecord) -> Result<M, Status> {
    M::decode(record.response.as_slice()).map_err(|e| Status::internal(e.to_string()))
}

impl Inventory {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Call 1 of 3. Trouble reaching sagad is passed on as an error, so sagad sends the command
    /// again later rather than hear an answer nobody guarded.
    /// `command_id` is the command's own: it lets an action that failed run again when sagad
    /// sends a new command for it (a retry, or ReprocessSaga), but not for a redelivery of the
    /// same one.
    async fn guard(
        &self,
        gsn: &str,
        branch_id: &str,
        action: BranchAction,
        command_id: &str,
    ) -> Result<(GuardVerdict, pb::IdempotencyRecord), Status> {
        let request = pb::GuardRequest {
            node_id: self.node_id.clone(),
            gsn: gsn.into(),
            branch_id: branch_id.into(),
            action: action as i32,
            command_id: command_id.into(),
        };
        let response = self.barrier.clone().guard(request).await?.into_inner();
        let verdict = GuardVerdict::try_from(response.verdict).unwrap_or_default();
        Ok((verdict, response.record.unwrap_or_default()))
    }

    /// Call 3 of 3: stores our answer, so every repeat is answered from it (DUPLICATE). It must
    /// happen in the end: the barrier never takes a PROCESSING record over (there is no lease),
    /// so until Finish every Guard of this branch is IN_PROGRESS, its reversal's included, and
    /// the saga could never be reversed. One try comes before we answer, so in the usual case
    /// the record is DONE before sagad hears of it; if that fails, a task keeps trying while we
    /// answer at once. The answer is true either way (the action ran), and holding it back
    /// would only keep sagad's call waiting on what is most likely sagad itself being away.
    async fn finish(&self, record: &pb::IdempotencyRecord, outcome: i32, response: Vec<u8>) {
        let succeeded = outcome == Outcome::Succeeded as i32;
        let request = pb::FinishRequest {
            scope: record.scope.clone(),
            request_id: record.request_id.clone(),
            result: if succeeded { "SUCCEEDED" } else { "FAILED" }.into(),
            response,
            content_type: "application/x-protobuf".into(),
        };
        match self.barrier.clone().finish(request.clone()).await {
            Ok(_) => {}
            Err(e) if finish_is_refused(&e) => finish_refused(&request, &e),
            Err(e) => {
                tracing::warn!(record = %request.request_id, error = %e, "could not finish; trying again");
                tokio::spawn(keep_finishing(
                    self.barrier.clone(),
                    request,
                    record.attempts,
                ));
            }
        }
    }

    async fn execute(&self, r: &pb::ExecuteRequest) -> Result<pb::ExecuteResponse, Status> {
        let (verdict, record) = self
            .guard(&r.gsn, &r.branch_id, BranchAction::Forward, &r.command_id)
            .await?;
        match verdict {
            GuardVerdict::Proceed => {
                let done = self.reserve(r);
                self.finish(&record, done.outcome, done.encode_to_vec())
                    .await;
                Ok(done)
            }
            GuardVerdict::Duplicate => stored(&record),
            GuardVerdict::InProgress => Ok(executed(Outcome::Processing, "", "")),
            // Hanging: its reversal came first, so running it now would never be undone.
            GuardVerdict::Hanging => Ok(executed(Outcome::Failed, "ALREADY_REVERSED", "")),
            GuardVerdict::NullCompensation | GuardVerdict::Unspecified => Err(unexpected(verdict)),
        }
    }

    /// The business action; runs only after PROCEED, so at most once per branch.
    fn reserve(&self, r: &pb::ExecuteRequest) -> pb::ExecuteResponse {
        let key = (r.gsn.clone(), r.branch_id.clone());
        let mut state = self.state();
        let Ok(order) = serde_json::from_slice::<Order>(&r.payload) else {
            state
                .branches
                .insert(key, Held::Refused("BAD_PAYLOAD".into()));
            return executed(Outcome::Failed, "BAD_PAYLOAD", "");
        };
        match state.stock.get_mut(&order.sku) {
            Some(available) if *available >= order.qty => *available -= order.qty,
            // A business refusal, not retryable by sagad's default policy: the saga reverses.
            Some(_) | None => {
                state
                    .branches
                    .insert(key, Held::Refused("OUT_OF_STOCK".into()));
                return executed(Outcome::Failed, "OUT_OF_STOCK", "");
            }
        }
        tracing::info!(gsn = %r.gsn, sku = %order.sku, qty = order.qty, "reserved");
        let held = Held::Reserved {
            sku: order.sku,
            qty: order.qty,
        };
        state.branches.insert(key, held);
        executed(Outcome::Succeeded, "", "RESERVED")
    }

    async fn reverse(&self, r: &pb::ReverseRequest) -> Result<pb::ReverseResponse, Status> {
        let (verdict, record) = self
            .guard(&r.gsn, &r.branch_id, BranchAction::Reversal, &r.command_id)
            .await?;
        match verdict {
            GuardVerdict::Proceed => {
                let done = self.release(&r.gsn, &r.branch_id);
                self.finish(&record, done.outcome, done.encode_to_vec())
                    .await;
                Ok(done)
            }
            // Nothing ran here as far as the barrier knows; never_ran checks our own state too.
            GuardVerdict::NullCompensation => Ok(self.never_ran(&r.gsn, &r.branch_id)),
            GuardVerdict::Duplicate if record.result == NULL_COMPENSATION => {
                Ok(self.never_ran(&r.gsn, &r.branch_id))
            }
            GuardVerdict::Duplicate => stored(&record),
            // Never reverse half-done work: sagad asks again once the forward action finished.
            GuardVerdict::InProgress => Ok(reversed(Outcome::Processing)),
            GuardVerdict::Hanging | GuardVerdict::Unspecified => Err(unexpected(verdict)),
        }
    }

    /// The reversal action; runs only after PROCEED: once, and only after a reserve finished.
    fn release(&self, gsn: &str, branch_id: &str) -> pb::ReverseResponse {
        let key = (gsn.to_owned(), branch_id.to_owned());
        give_back(&mut self.state(), key);
        reversed(Outcome::Succeeded)
    }

    /// The barrier found no forward action to undo (NULL_COMPENSATION, or the DUPLICATE of
    /// one). If our own state says the reservation was made, it wins: the barrier's records can
    /// be lost (collected, or a ledger restored from an older copy), and NOT_FOUND would then
    /// have sagad record a branch that took effect as never having happened, so its stock would
    /// never come back. Give it back (or find it given back already) and say so: SUCCEEDED.
    fn never_ran(&self, gsn: &str, branch_id: &str) -> pb::ReverseResponse {
        let key = (gsn.to_owned(), branch_id.to_owned());
        // One lock for the look and the change: two copies of this Reverse must not both
        // decide from a state the other is about to change.
        let mut state = self.state();
        match state.branches.get(&key) {
            Some(Held::Reserved { .. } | Held::Released) => {
                give_back(&mut state, key);
                reversed(Outcome::Succeeded)
            }
            Some(Held::Refused(_) | Held::NeverRan) | None => {
                state.branches.insert(key, Held::NeverRan);
                reversed(Outcome::NotFound)
            }
        }
    }

    async fn query(&self, r: &pb::QueryStatusRequest) -> Result<pb::QueryStatusResponse, Status> {
        let key = (r.gsn.clone(), r.branch_id.clone());
        let known = self.state().branches.get(&key).map(|held| match held {
            Held::Reserved { .. } => (Outcome::Succeeded, String::new()),
            Held::Refused(code) => (Outcome::Failed, code.clone()),
            Held::Released => (Outcome::Reversed, String::new()),
            Held::NeverRan => (Outcome::NotFound, String::new()),
        });
        let (outcome, error_code) = match known {
            Some(known) => known,
            None => (self.no_trace(key.0, key.1).await?, String::new()),
        };
        let status = (outcome == Outcome::Succeeded).then(|| pb::Status {
            name: "RESERVED".into(),
            ..Default::default()
        });
        Ok(pb::QueryStatusResponse {
            outcome: outcome as i32,
            status,
            error_code,
            ..Default::default()
        })
    }

    /// QueryStatus of a branch this node has no trace of. Answering NOT_FOUND promises to refuse
    /// its forward action if that comes later, and guarding the reversal stores exactly that
    /// tombstone; or it says the forward is running (PROCESSING); or, if the forward finished
    /// just now, it undoes it (REVERSED). Either way the answer stays true.
    async fn no_trace(&self, gsn: String, branch_id: String) -> Result<Outcome, Status> {
        let request = pb::ReverseRequest {
            gsn,
            branch_id,
            ..Default::default()
        };
        Ok(match self.reverse(&request).await?.outcome() {
            Outcome::Succeeded => Outcome::Reversed,
            other => other,
        })
    }

    fn signal(&self, r: &pb::SignalRequest) {
        if !self.state().signals_seen.insert(r.command_id.clone()) {
            return;
        }
        // COMPLETED and REVERSAL_SUCCESS: the saga is settled; a real node releases whatever it
        // held for it. REPROCESS: a reversal is being retried; keep state. REVERSAL_FAILURE: a
        // branch never happened; the barrier's tombstone already refuses its late forward.
        let signal = r.signal().as_str_name();
        tracing::info!(gsn = %r.gsn, signal, reason = %r.reason, "signal");
    }
}

/// Undoes a branch's reservation, if it holds one: a refused reserve (or one this process
/// forgot) left nothing to give back, and one released already must not be given back twice.
fn give_back(state: &mut State, key: (String, String)) {
    let gsn = key.0.clone();
    if let Some(Held::Reserved { sku, qty }) = state.branches.insert(key, Held::Released) {
        *state.stock.entry(sku.clone()).or_default() += qty;
        tracing::info!(gsn, sku = %sku, qty, "released");
    }
}

/// Backoff of a Finish tried again: short at first (sagad's restart takes a moment), never
/// longer than the cap, so the record is finished soon after sagad is back.
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(200);
const FINISH_RETRY_CAP: Duration = Duration::from_secs(10);

/// Tries a Finish that failed until sagad takes it. This task dies with the process, as does
/// this example's in-memory state; a node whose state outlives it must also finish, when it
/// starts, the records it left PROCESSING (docs/participant.md, section 4).
///
/// Each try first reads the record and goes on only while it is still PROCESSING under the
/// registration our Guard made (`registered`, its `attempts`). A Finish names no run: if an
/// earlier try got through and only its answer was lost, a FAILED lets a newer command's
/// Guard run the action again under the same record, and a late try of ours would then
/// finish that run's record with our answer.
async fn keep_finishing(
    mut barrier: IdempotencyClient<Channel>,
    request: pb::FinishRequest,
    registered: u32,
) {
    let mut delay = FINISH_RETRY_FIRST;
    for attempt in 2u32.. {
        // Jitter, so the Finishes that failed together do not all come back at once.
        tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..1.0))).await;
        delay = (delay * 2).min(FINISH_RETRY_CAP);
        let asked = pb::GetRecordRequest {
            scope: request.scope.clone(),
            request_id: request.request_id.clone(),
        };
        match barrier.get(asked).await {
            Ok(found) => {
                let record = found.into_inner().record.unwrap_or_default();
                if record.state != pb::RecordState::Processing as i32
                    || record.attempts != registered
                {
                    tracing::info!(record = %request.request_id, "finished already, or a newer run holds the record");
                    return;
                }
            }
            Err(e) if finish_is_refused(&e) => return finish_refused(&request, &e),
            Err(e) => {
                tracing::warn!(record = %request.request_id, attempt, error = %e, "could not read the record to finish; trying again");
                continue;
            }
        }
        match barrier.finish(request.clone()).await {
            Ok(_) => {
                tracing::info!(record = %request.request_id, attempt, "finished");
                return;
            }
            Err(e) if finish_is_refused(&e) => return finish_refused(&request, &e),
            Err(e) => {
                tracing::warn!(record = %request.request_id, attempt, error = %e, "could not finish; trying again");
            }
        }
    }
}

/// The answers to a Finish (or Get) that trying again cannot change: the record was already
/// finished with another answer (FAILED_PRECONDITION), is not there (NOT_FOUND: collected, or
/// never registered), cannot be read (DATA_LOSS), or the request itself is malformed
/// (INVALID_ARGUMENT). Anything else (sagad away or shutting down, a timeout, an internal
/// error) may pass later.
fn finish_is_refused(e: &Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::DataLoss
    )
}

/// Our state and the barrier's disagree, and no retry will mend it: say so loudly, for an
/// operator to look at this branch.
fn finish_refused(request: &pb::FinishRequest, e: &Status) {
    tracing::error!(
        scope = %request.scope,
        record = %request.request_id,
        result = %request.result,
        error = %e,
        "the barrier refused to finish this record; this branch needs an operator"
    );
}

struct Service(Arc<Inventory>);

#[tonic::async_trait]
impl Participant for Service {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.0.execute(request.get_ref()).await.map(Response::new)
    }
    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        self.0.reverse(request.get_ref()).await.map(Response::new)
    }
    async fn query_status(
        &self,
        request: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        self.0.query(request.get_ref()).await.map(Response::new)
    }
    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        self.0.signal(request.get_ref());
        Ok(Response::new(pb::SignalResponse {}))
    }
}

/// Pull mode: hold a Subscribe stream, and open a new one whenever it ends (sagad restarted), or
/// after a longer pause when another process subscribed with our node id and replaced it;
/// commands not answered yet are sent again on the next stream.
async fn subscribe_forever(inventory: Arc<Inventory>, mut coordinator: CoordinatorClient<Channel>) {
    loop {
        let mut pause = Duration::from_secs(1);
        match coordinator
            .subscribe(pb::SubscribeRequest {
                node_id: inventory.node_id.clone(),
            })
            .await
        {
            Ok(stream) => {
                tracing::info!(node = %inventory.node_id, "subscribed to sagad; ready");
                let mut stream = stream.into_inner();
                loop {
                    match stream.next().await {
                        Some(Ok(command)) => {
                            tokio::spawn(answer_command(
                                inventory.clone(),
                                coordinator.clone(),
                                command,
                            ));
                        }
                        // Another process subscribed with our node_id: taking the stream back
                        // at once would have the two of us replace each other without end.
                        Some(Err(status)) if status.code() == tonic::Code::Aborted => {
                            tracing::warn!(node = %inventory.node_id, message = status.message(), "our stream was replaced; is another process using this node id?");
                            pause = Duration::from_secs(10);
                            break;
                        }
                        Some(Err(status)) => {
                            tracing::info!(error = %status, "the stream ended; subscribing again");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe yet"),
        }
        tokio::time::sleep(pause).await;
    }
}

fn report(
    gsn: String,
    branch_id: String,
    outcome: i32,
    status: Option<pb::Status>,
    error_code: String,
) -> pb::ReportStateRequest {
    pb::ReportStateRequest {
        gsn,
        branch_id,
        outcome,
        status,
        error_code,
        ..Default::default()
    }
}

/// Runs a streamed command as the Participant service would, and reports the answer. If
/// anything fails the command stays unanswered, and sagad sends it again.
async fn answer_command(
    inventory: Arc<Inventory>,
    mut coordinator: CoordinatorClient<Channel>,
    command: pb::Command,
) {
    use pb::command::Kind;
    let answered = match command.kind {
        Some(Kind::Execute(r)) => (inventory.execute(&r).await)
            .map(|a| report(r.gsn, r.branch_id, a.outcome, a.status, a.error_code)),
        Some(Kind::Reverse(r)) => (inventory.reverse(&r).await)
            .map(|a| report(r.gsn, r.branch_id, a.outcome, None, a.error_code)),
        Some(Kind::QueryStatus(r)) => (inventory.query(&r).await)
            .map(|a| report(r.gsn, r.branch_id, a.outcome, a.status, a.error_code)),
        Some(Kind::Signal(r)) => {
            inventory.signal(&r);
            let ack = pb::AckRequest {
                request_id: format!("ack/{}", command.command_id),
                node_id: inventory.node_id.clone(),
                command_id: command.command_id,
            };
            if let Err(e) = coordinator.ack(ack).await {
                tracing::warn!(error = %e, "ack failed; the signal will come again");
            }
            return;
        }
        None => return,
    };
    let report = match answered {
        Ok(report) => pb::ReportStateRequest {
            // One id per distinct report: a repeat of the same answer is then a replay, while a
            // later, different answer (the outcome after PROCESSING) is not refused as an id
            // reused with another body.
            request_id: format!(
                "report/{}/{}",
                command.command_id,
                report.outcome().as_str_name()
            ),
            reporter_node_id: inventory.node_id.clone(),
            command_id: command.command_id,
            ..report
        },
        Err(e) => {
            tracing::warn!(command = %command.command_id, error = %e, "not answered; it will come again");
            return;
        }
    };
    if let Err(e) = coordinator.report_state(report).await {
        tracing::warn!(error = %e, "report failed; the command will come again");
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter("info")
        .init();
    let args = Args::parse();
    // Lazy: the node starts even if sagad is not up yet; until it is, Guard fails and every
    // command is answered with an error, which sagad retries.
    let sagad = Endpoint::from_shared(args.sagad.clone())?.connect_lazy();
    let inventory = Arc::new(Inventory {
        node_id: args.node_id.clone(),
        barrier: IdempotencyClient::new(sagad.clone()),
        state: Mutex::new(State {
            stock: args.stock.into_iter().collect(),
            ..State::default()
        }),
    });
    if args.subscribe {
        subscribe_forever(inventory, CoordinatorClient::new(sagad)).await;
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    if args.register {
        let endpoint = args.endpoint.unwrap_or_else(|| format!("http://{local}"));
        // A fresh request_id per start: re-registering an address used before must apply again.
        let request_id = format!("register/{}/{:016x}", args.node_id, rand::random::<u64>());
        let request = pb::RegisterNodeRequest {
            request_id,
            node_id: args.node_id.clone(),
            endpoint: endpoint.clone(),
        };
        CoordinatorClient::new(sagad).register_node(request).await?;
        tracing::info!(node = %args.node_id, %endpoint, "registered with sagad");
    }
    tracing::info!(%local, "serving the Participant service; ready");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(ParticipantServer::new(Service(inventory)))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
