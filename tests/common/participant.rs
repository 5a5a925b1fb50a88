//! A participant node for tests: a real Participant gRPC server on 127.0.0.1 (push), or a task
//! holding a Subscribe stream (pull). It de-duplicates by command id as a real node must, keeps
//! its own truth about each branch (so QueryStatus answers honestly), and counts how often it
//! actually executed or reversed each branch: the tests' measure of "nothing done twice".

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// How the node answers one forward or reversal action.
#[derive(Debug, Clone)]
pub enum Script {
    /// Take effect, and answer SUCCEEDED with this status (and parameters).
    Succeed(&'static str, Vec<(&'static str, &'static str)>),
    /// Do nothing, and answer FAILED with this error code.
    Fail(&'static str),
    /// Take effect, but answer only after this long (past sagad's participant timeout).
    SucceedLate(&'static str, Duration),
    /// Take effect, answer PROCESSING, and never report: sagad must poll.
    SucceedSilently(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    Executed,
    Reversed,
    /// A reversal arrived first: the forward action must be refused if it comes.
    Tombstone,
}

#[derive(Default)]
pub struct Node {
    pub node_id: String,
    /// Scripts by action name, used in order; when empty, the default applies.
    scripts: Mutex<HashMap<String, VecDeque<Script>>>,
    /// (action, text the payload contains, script): checked before the scripts, so concurrent
    /// sagas can each choose their fate by their payload.
    payload_rules: Mutex<Vec<(String, String, Script)>>,
    /// Answers already given, by command id (the barrier).
    answered: Mutex<HashMap<String, pb::ExecuteResponse>>,
    truth: Mutex<BTreeMap<(String, String), (Truth, String)>>,
    /// Real executions and reversals per (gsn, branch).
    pub executions: Mutex<BTreeMap<(String, String), u32>>,
    pub reversals: Mutex<BTreeMap<(String, String), u32>>,
    pub signals: Mutex<Vec<(String, i32)>>,
    /// Every command received, duplicates included: (command id, kind).
    pub received: Mutex<Vec<(String, &'static str)>>,
    /// (gsn, branch, stamp) of each reversal that took effect; stamps are global across nodes,
    /// so tests can check the order in which several nodes reversed.
    pub reversal_order: Mutex<Vec<(String, String, u64)>>,
    /// While set, QueryStatus answers PROCESSING whatever the truth (an outcome not yet known).
    pub queries_answer_processing: std::sync::atomic::AtomicBool,
    /// The payload each Reverse carried, by (gsn, branch), the latest one.
    pub reversal_payloads: Mutex<BTreeMap<(String, String), Vec<u8>>>,
    /// The grpc-timeout header of every call received as a push participant: (rpc, header).
    pub deadlines: Mutex<Vec<(&'static str, Option<String>)>>,
}

static REVERSAL_STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn status(name: &str, params: &[(&str, &str)]) -> Option<pb::Status> {
    Some(pb::Status {
        name: name.to_owned(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

impl Node {
    pub fn new(node_id: &str) -> Arc<Node> {
        Arc::new(Node {
            node_id: node_id.to_owned(),
            ..Default::default()
        })
    }

    pub fn script(&self, action: &str, scripts: Vec<Script>) {
        lock(&self.scripts).insert(action.to_owned(), scripts.into());
    }

    pub fn when_payload_contains(&self, action: &str, needle: &str, script: Script) {
        lock(&self.payload_rules).push((action.to_owned(), needle.to_owned(), script));
    }

    fn payload_script(&self, action: &str, payload: &[u8]) -> Option<Script> {
        let text = String::from_utf8_lossy(payload);
        lock(&self.payload_rules)
            .iter()
            .find(|(a, needle, _)| a == action && text.contains(needle.as_str()))
            .map(|(_, _, script)| script.clone())
    }

    fn next_script(&self, action: &str, default: Script) -> Script {
        lock(&self.scripts)
            .get_mut(action)
            .and_then(|q| q.pop_front())
            .unwrap_or(default)
    }

    pub fn executions_of(&self, gsn: &str, branch: &str) -> u32 {
        lock(&self.executions)
            .get(&(gsn.to_owned(), branch.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn reversal_payload(&self, gsn: &str, branch: &str) -> Option<Vec<u8>> {
        lock(&self.reversal_payloads)
            .get(&(gsn.to_owned(), branch.to_owned()))
            .cloned()
    }

    pub fn reversals_of(&self, gsn: &str, branch: &str) -> u32 {
        lock(&self.reversals)
            .get(&(gsn.to_owned(), branch.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn signals_for(&self, gsn: &str) -> Vec<i32> {
        lock(&self.signals)
            .iter()
            .filter(|(g, _)| g == gsn)
            .map(|(_, s)| *s)
            .collect()
    }

    pub fn max_executions(&self) -> u32 {
        lock(&self.executions).values().copied().max().unwrap_or(0)
    }

    /// When this node reversed the branch (a global stamp), if it did.
    pub fn reversed_at(&self, gsn: &str, branch: &str) -> Option<u64> {
        lock(&self.reversal_order)
            .iter()
            .find(|(g, b, _)| g == gsn && b == branch)
            .map(|(_, _, s)| *s)
    }

    /// Carries out a forward action as the caller's own outcall would reach it.
    pub async fn execute_directly(
        &self,
        gsn: &str,
        branch_id: &str,
        action: &str,
    ) -> pb::ExecuteResponse {
        self.execute(&pb::ExecuteRequest {
            command_id: format!("caller:{gsn}:{branch_id}"),
            gsn: gsn.to_owned(),
            branch_id: branch_id.to_owned(),
            action: action.to_owned(),
            ..Default::default()
        })
        .await
    }

    pub fn max_reversals(&self) -> u32 {
        lock(&self.reversals).values().copied().max().unwrap_or(0)
    }

    fn note(&self, command_id: &str, kind: &'static str) {
        lock(&self.received).push((command_id.to_owned(), kind));
    }

    /// Returns the answer and how long to wait before giving it.
    async fn execute(&self, request: &pb::ExecuteRequest) -> pb::ExecuteResponse {
        self.note(&request.command_id, "execute");
        if let Some(done) = lock(&self.answered).get(&request.command_id) {
            return done.clone();
        }
        let key = (request.gsn.clone(), request.branch_id.clone());
        if matches!(
            lock(&self.truth).get(&key),
            Some((Truth::Tombstone | Truth::Reversed, _))
        ) {
            // Hanging: the reversal came first; the forward action must never run now.
            return pb::ExecuteResponse {
                outcome: pb::Outcome::Failed as i32,
                status: None,
                error_code: "ALREADY_REVERSED".into(),
                message: "refused: this branch was reversed before its forward action arrived"
                    .into(),
            };
        }
        let script = match self.payload_script(&request.action, &request.payload) {
            Some(script) => script,
            None => self.next_script(&request.action, Script::Succeed("DONE", vec![])),
        };
        let (response, delay) = match script {
            Script::Fail(code) => (
                pb::ExecuteResponse {
                    outcome: pb::Outcome::Failed as i32,
                    status: None,
                    error_code: code.into(),
                    message: String::new(),
                },
                Duration::ZERO,
            ),
            Script::Succeed(name, params) => {
                (self.take_effect(&key, name, &params), Duration::ZERO)
            }
            Script::SucceedLate(name, delay) => (self.take_effect(&key, name, &[]), delay),
            Script::SucceedSilently(name) => {
                self.take_effect(&key, name, &[]);
                (
                    pb::ExecuteResponse {
                        outcome: pb::Outcome::Processing as i32,
                        status: None,
                        error_code: String::new(),
                        message: String::new(),
                    },
                    Duration::ZERO,
                )
            }
        };
        lock(&self.answered).insert(request.command_id.clone(), response.clone());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        response
    }

    fn take_effect(
        &self,
        key: &(String, String),
        name: &str,
        params: &[(&str, &str)],
    ) -> pb::ExecuteResponse {
        *lock(&self.executions).entry(key.clone()).or_default() += 1;
        lock(&self.truth).insert(key.clone(), (Truth::Executed, name.to_owned()));
        pb::ExecuteResponse {
            outcome: pb::Outcome::Succeeded as i32,
            status: status(name, params),
            error_code: String::new(),
            message: String::new(),
        }
    }

    /// Reverse; a `SucceedLate` script for the reversal action answers only after its delay
    /// (the effect is immediate).
    pub async fn reverse(&self, request: &pb::ReverseRequest) -> pb::ReverseResponse {
        let (response, delay) = self.reverse_now(request);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        response
    }

    fn reverse_now(&self, request: &pb::ReverseRequest) -> (pb::ReverseResponse, Duration) {
        self.note(&request.command_id, "reverse");
        lock(&self.reversal_payloads).insert(
            (request.gsn.clone(), request.branch_id.clone()),
            request.payload.clone(),
        );
        if let Some(done) = lock(&self.answered).get(&request.command_id) {
            let response = pb::ReverseResponse {
                outcome: done.outcome,
                error_code: done.error_code.clone(),
                message: String::new(),
            };
            return (response, Duration::ZERO);
        }
        let key = (request.gsn.clone(), request.branch_id.clone());
        let script = self.next_script(&request.action, Script::Succeed("UNDONE", vec![]));
        let delay = match &script {
            Script::SucceedLate(_, delay) => *delay,
            _ => Duration::ZERO,
        };
        // Read the truth first: holding its lock across the match would deadlock the arms.
        let truth = lock(&self.truth).get(&key).map(|t| t.0);
        let response = match (script, truth) {
            (Script::Fail(code), _) => pb::ReverseResponse {
                outcome: pb::Outcome::Failed as i32,
                error_code: code.into(),
                message: String::new(),
            },
            (_, Some(Truth::Executed)) => {
                *lock(&self.reversals).entry(key.clone()).or_default() += 1;
                let stamp = REVERSAL_STAMP.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                lock(&self.reversal_order).push((key.0.clone(), key.1.clone(), stamp));
                lock(&self.truth).insert(key, (Truth::Reversed, String::new()));
                pb::ReverseResponse {
                    outcome: pb::Outcome::Succeeded as i32,
                    error_code: String::new(),
                    message: String::new(),
                }
            }
            (_, Some(Truth::Reversed | Truth::Tombstone)) => pb::ReverseResponse {
                outcome: pb::Outcome::Succeeded as i32,
                error_code: String::new(),
                message: "already reversed".into(),
            },
            // Null compensation: nothing ran, so nothing is undone; remember it.
            (_, None) => {
                lock(&self.truth).insert(key, (Truth::Tombstone, String::new()));
                pb::ReverseResponse {
                    outcome: pb::Outcome::NotFound as i32,
                    error_code: String::new(),
                    message: "nothing to reverse".into(),
                }
            }
        };
        lock(&self.answered).insert(
            request.command_id.clone(),
            pb::ExecuteResponse {
                outcome: response.outcome,
                status: None,
                error_code: response.error_code.clone(),
                message: String::new(),
            },
        );
        (response, delay)
    }

    fn query(&self, request: &pb::QueryStatusRequest) -> pb::QueryStatusResponse {
        self.note(&request.command_id, "query");
        let key = (request.gsn.clone(), request.branch_id.clone());
        if self
            .queries_answer_processing
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return pb::QueryStatusResponse {
                outcome: pb::Outcome::Processing as i32,
                status: None,
                error_code: String::new(),
                message: String::new(),
            };
        }
        let (outcome, name) = match lock(&self.truth).get(&key) {
            Some((Truth::Executed, name)) => (pb::Outcome::Succeeded, name.clone()),
            Some((Truth::Reversed, _)) => (pb::Outcome::Reversed, String::new()),
            Some((Truth::Tombstone, _)) | None => (pb::Outcome::NotFound, String::new()),
        };
        pb::QueryStatusResponse {
            outcome: outcome as i32,
            status: (!name.is_empty()).then(|| pb::Status {
                name,
                parameters: Default::default(),
            }),
            error_code: String::new(),
            message: String::new(),
        }
    }

    fn signal(&self, request: &pb::SignalRequest) {
        self.note(&request.command_id, "signal");
        let mut answered = lock(&self.answered);
        if answered.contains_key(&request.command_id) {
            return;
        }
        answered.insert(request.command_id.clone(), pb::ExecuteResponse::default());
        lock(&self.signals).push((request.gsn.clone(), request.signal));
    }
}

struct Service(Arc<Node>);

impl Service {
    fn note_deadline<T>(&self, rpc: &'static str, request: &Request<T>) {
        let header = request
            .metadata()
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap_or("not ASCII").to_owned());
        lock(&self.0.deadlines).push((rpc, header));
    }
}

#[tonic::async_trait]
impl Participant for Service {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.note_deadline("execute", &request);
        Ok(Response::new(self.0.execute(request.get_ref()).await))
    }
    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        self.note_deadline("reverse", &request);
        Ok(Response::new(self.0.reverse(request.get_ref()).await))
    }
    async fn query_status(
        &self,
        request: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        self.note_deadline("query_status", &request);
        Ok(Response::new(self.0.query(request.get_ref())))
    }
    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        self.note_deadline("signal", &request);
        self.0.signal(request.get_ref());
        Ok(Response::new(pb::SignalResponse {}))
    }
}

/// A running push participant; stopping it keeps its `Node` (its memory) for a restart.
pub struct PushParticipant {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PushParticipant {
    pub async fn start(node: Arc<Node>) -> PushParticipant {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        PushParticipant::serve(node, listener).await
    }

    /// On a given address, e.g. the one it had before it went down.
    pub async fn start_on(node: Arc<Node>, addr: SocketAddr) -> PushParticipant {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        PushParticipant::serve(node, listener).await
    }

    /// Serving at most `streams` calls at once on a connection, as a busy node might.
    pub async fn start_with_stream_limit(node: Arc<Node>, streams: u32) -> PushParticipant {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        PushParticipant::serve_limited(node, listener, Some(streams)).await
    }

    async fn serve(node: Arc<Node>, listener: TcpListener) -> PushParticipant {
        PushParticipant::serve_limited(node, listener, None).await
    }

    async fn serve_limited(
        node: Arc<Node>,
        listener: TcpListener,
        streams: Option<u32>,
    ) -> PushParticipant {
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = ParticipantServer::new(Service(node.clone()));
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .max_concurrent_streams(streams)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        PushParticipant {
            addr,
            node,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) -> (Arc<Node>, SocketAddr) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        (self.node.clone(), self.addr)
    }
}

/// A pull participant: holds a Subscribe stream and answers each command with ReportState or
/// Ack, as a node that cannot be dialled would.
pub fn subscribe(node: Arc<Node>, channel: Channel) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = CoordinatorClient::new(channel);
        let Ok(response) = client
            .subscribe(pb::SubscribeRequest {
                node_id: node.node_id.clone(),
            })
            .await
        else {
            return;
        };
        let mut stream = response.into_inner();
        while let Some(Ok(command)) = stream.next().await {
            let node = node.clone();
            let mut client = client.clone();
            tokio::spawn(async move {
                let (gsn, branch_id, outcome, status, error_code) = match command.kind {
                    Some(pb::command::Kind::Execute(r)) => {
                        let a = node.execute(&r).await;
                        (r.gsn, r.branch_id, a.outcome, a.status, a.error_code)
                    }
                    Some(pb::command::Kind::Reverse(r)) => {
                        let a = node.reverse(&r).await;
                        (r.gsn, r.branch_id, a.outcome, None, a.error_code)
                    }
                    Some(pb::command::Kind::QueryStatus(r)) => {
                        let a = node.query(&r);
                        (r.gsn, r.branch_id, a.outcome, a.status, a.error_code)
                    }
                    Some(pb::command::Kind::Signal(r)) => {
                        node.signal(&r);
                        let _ = client
                            .ack(pb::AckRequest {
                                request_id: format!("ack-{}", command.command_id),
                                node_id: node.node_id.clone(),
                                command_id: command.command_id.clone(),
                            })
                            .await;
                        return;
                    }
                    None => return,
                };
                let _ = client
                    .report_state(pb::ReportStateRequest {
                        request_id: format!("report-{}", command.command_id),
                        gsn,
                        branch_id,
                        reporter_node_id: node.node_id.clone(),
                        outcome,
                        status,
                        error_code,
                        message: String::new(),
                        command_id: command.command_id.clone(),
                    })
                    .await;
            });
        }
    })
}
