//! The example participant (examples/participant.rs), run as the real compiled program against
//! a real sagad: what a user copies must work, pushed to and on a Subscribe stream, forward and
//! reversal both going through the barrier.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use common::orders::{branch, get, put_strategy, wait_terminal};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use sagad::grpc::pb::idempotency_server::{Idempotency, IdempotencyServer};
use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic::{Request, Response, Status};

const LIMIT: Duration = Duration::from_secs(30);

/// The example as `cargo test` builds it: tests run from `<target>/<profile>/deps/`, examples
/// land in `<target>/<profile>/examples/` (whatever CARGO_TARGET_DIR says).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("participant{}", std::env::consts::EXE_SUFFIX));
    // `cargo test` builds examples, but `cargo test --test example_participant` does not:
    // refuse to test a missing or stale binary rather than pass on an old one.
    let built = std::fs::metadata(&path).and_then(|m| m.modified());
    let source = std::fs::metadata(common::repo_path("examples/participant.rs"))
        .and_then(|m| m.modified())
        .unwrap();
    assert!(
        built.is_ok_and(|built| built >= source),
        "{} is missing or older than examples/participant.rs: run `cargo build --examples` \
         (plain `cargo test` builds it)",
        path.display()
    );
    path
}

/// A running example node; killed when dropped. Its log is kept to explain a failure.
struct Example {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Example {
    /// Starts the example and waits until it says it is ready (registered and serving, or
    /// subscribed).
    async fn start(sagad: SocketAddr, node_id: &str, stock: &str, mode: &[&str]) -> Example {
        let mut child = Command::new(example_binary())
            .args(["--sagad", &format!("http://{sagad}"), "--node-id", node_id])
            .args(["--listen", "127.0.0.1:0", "--stock", stock])
            .args(mode)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let example = Example { child, log };
        let ready = common::orders::eventually(LIMIT, || example.log().contains("ready")).await;
        assert!(ready, "the example never got ready:\n{}", example.log());
        example
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Registers a node started without `--register` (its `--sagad` is not sagad itself) with
    /// sagad, at the address its ready line gives.
    async fn register_with(&self, sagad: &Channel, node_id: &str) {
        let log = self.log();
        let local = log
            .split_whitespace()
            .find_map(|word| word.strip_prefix("local="))
            .unwrap_or_else(|| panic!("no local address in the example's log:\n{log}"));
        CoordinatorClient::new(sagad.clone())
            .register_node(pb::RegisterNodeRequest {
                request_id: format!("register/{node_id}"),
                node_id: node_id.into(),
                endpoint: format!("http://{local}"),
            })
            .await
            .unwrap();
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn step(id: &str, node: &str) -> pb::Step {
    pb::Step {
        id: id.into(),
        node_id: node.into(),
        forward_action: "reserve".into(),
        reversal_action: "release".into(),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    }
}

fn reserved(step_id: &str) -> pb::StepStatus {
    pb::StepStatus {
        step_id: step_id.into(),
        status: "RESERVED".into(),
    }
}

/// One step at one node: RESERVED completes the saga; a refusal (FAILED) reverses it.
fn one_step(business_type: &str, node: &str) -> pb::Strategy {
    pb::Strategy {
        business_type: business_type.into(),
        description: "reserve stock at the example inventory".into(),
        steps: vec![step("reserve", node)],
        first_set: vec!["reserve".into()],
        end_statuses: vec![reserved("reserve")],
        ..Default::default()
    }
}

/// Reserve at `main`, then at `backup`; RESERVED at both completes it. If `backup` refuses,
/// `main`'s reservation is reversed: its Reverse goes through the barrier.
fn two_steps(business_type: &str, main: &str, backup: &str) -> pb::Strategy {
    pb::Strategy {
        business_type: business_type.into(),
        description: "reserve at main, then at backup".into(),
        steps: vec![step("main", main), step("backup", backup)],
        first_set: vec!["main".into()],
        rules: vec![pb::Rule {
            when: vec![reserved("main")],
            trigger: vec!["backup".into()],
        }],
        end_statuses: vec![reserved("backup")],
        ..Default::default()
    }
}

async fn run_saga(channel: &Channel, business_type: &str, request_id: &str, qty: u32) -> pb::Saga {
    let gsn = CoordinatorClient::new(channel.clone())
        .start_saga(pb::StartSagaRequest {
            request_id: request_id.into(),
            business_type: business_type.into(),
            mode: pb::SagaMode::Orchestrated as i32,
            payload: format!(r#"{{"sku":"widget","qty":{qty}}}"#).into_bytes(),
            content_type: "application/json".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gsn;
    wait_terminal(channel, &gsn, LIMIT).await;
    // The full saga, branches included.
    get(channel, &gsn).await
}

/// The barrier record the example finished for one action of one branch.
async fn barrier_record(
    channel: &Channel,
    node: &str,
    gsn: &str,
    key: &str,
) -> pb::IdempotencyRecord {
    sagad::grpc::pb::idempotency_client::IdempotencyClient::new(channel.clone())
        .get(pb::GetRecordRequest {
            scope: format!("guard/{node}/{gsn}"),
            request_id: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_completes_a_saga_it_can_serve_and_refuses_one_it_cannot_which_ends_reversed() {
    let server = TestServer::start().await;
    put_strategy(&server.channel, one_step("stock", "inventory")).await;
    let example = Example::start(server.addr, "inventory", "widget=5", &["--register"]).await;

    let served = run_saga(&server.channel, "stock", "saga-1", 3).await;
    assert_eq!(
        served.state,
        pb::SagaState::Completed as i32,
        "{}",
        example.log()
    );
    let record = barrier_record(&server.channel, "inventory", &served.gsn, "reserve/forward").await;
    assert_eq!(
        (record.state, record.result.as_str()),
        (pb::RecordState::Done as i32, "SUCCEEDED"),
        "the example finished its forward action through the barrier"
    );

    // Two widgets are left: reserving three more is refused.
    let refused = run_saga(&server.channel, "stock", "saga-2", 3).await;
    assert_eq!(
        refused.state,
        pb::SagaState::Reversed as i32,
        "{}",
        example.log()
    );
    let reserve = branch(&refused, "reserve");
    assert_eq!(reserve.state, pb::BranchState::Failed as i32);
    assert_eq!(reserve.error_code, "OUT_OF_STOCK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_reverses_a_reservation_when_a_later_step_fails_pushed_or_subscribed() {
    let server = TestServer::start().await;
    put_strategy(
        &server.channel,
        two_steps("transfer", "warehouse-a", "warehouse-b"),
    )
    .await;
    let main = Example::start(server.addr, "warehouse-a", "widget=10", &["--register"]).await;
    let backup = Example::start(server.addr, "warehouse-b", "widget=4", &["--subscribe"]).await;
    let logs = || format!("{}\n{}", main.log(), backup.log());

    let done = run_saga(&server.channel, "transfer", "transfer-1", 4).await;
    assert_eq!(done.state, pb::SagaState::Completed as i32, "{}", logs());

    // warehouse-b has nothing left: main's reservation of 6 (all it had left) is released.
    let reversed = run_saga(&server.channel, "transfer", "transfer-2", 6).await;
    assert_eq!(reversed.state, pb::SagaState::Reversed as i32, "{}", logs());
    assert_eq!(
        branch(&reversed, "main").state,
        pb::BranchState::Reversed as i32
    );
    let reversal = barrier_record(
        &server.channel,
        "warehouse-a",
        &reversed.gsn,
        "main/reversal",
    )
    .await;
    assert_eq!(reversal.result, "SUCCEEDED");

    // The released stock is back: warehouse-a can reserve all 6 again (and b refuses again).
    let again = run_saga(&server.channel, "transfer", "transfer-3", 6).await;
    assert_eq!(
        branch(&again, "main").state,
        pb::BranchState::Reversed as i32,
        "main reserved (then was reversed), so the first release gave the stock back: {}",
        logs()
    );
}

/// A barrier in front of sagad's, for an example to use as its `--sagad`: it passes every call
/// on, but refuses the first Finishes of chosen records with UNAVAILABLE, as a sagad that is
/// restarting does, and can answer a reversal's Guard as a barrier that lost the branch's
/// forward record does (NULL_COMPENSATION).
#[derive(Clone)]
struct Barrier {
    sagad: IdempotencyClient<Channel>,
    /// Finishes still to refuse, by record request_id.
    to_refuse: Arc<Mutex<HashMap<String, u32>>>,
    lost_forward: bool,
}

impl Barrier {
    async fn start(sagad: &Channel, refuse: &[(&str, u32)], lost_forward: bool) -> SocketAddr {
        let barrier = Barrier {
            sagad: IdempotencyClient::new(sagad.clone()),
            to_refuse: Arc::new(Mutex::new(
                refuse.iter().map(|(id, n)| (id.to_string(), *n)).collect(),
            )),
            lost_forward,
        };
        Barrier::serve(barrier).await
    }

    async fn serve(barrier: Barrier) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(IdempotencyServer::new(barrier))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        addr
    }
}

#[tonic::async_trait]
impl Idempotency for Barrier {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        self.sagad.clone().begin(request.into_inner()).await
    }

    async fn finish(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let request = request.into_inner();
        if let Some(left @ 1..) = self.to_refuse.lock().unwrap().get_mut(&request.request_id) {
            *left -= 1;
            return Err(Status::unavailable("sagad is restarting"));
        }
        self.sagad.clone().finish(request).await
    }

    async fn get(
        &self,
        request: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        self.sagad.clone().get(request.into_inner()).await
    }

    async fn guard(
        &self,
        request: Request<pb::GuardRequest>,
    ) -> Result<Response<pb::GuardResponse>, Status> {
        let request = request.into_inner();
        if self.lost_forward && request.action == pb::BranchAction::Reversal as i32 {
            return Ok(Response::new(pb::GuardResponse {
                verdict: pb::GuardVerdict::NullCompensation as i32,
                record: Some(pb::IdempotencyRecord {
                    scope: format!("guard/{}/{}", request.node_id, request.gsn),
                    request_id: format!("{}/reversal", request.branch_id),
                    state: pb::RecordState::Done as i32,
                    result: "NULL_COMPENSATION".into(),
                    ..Default::default()
                }),
            }));
        }
        self.sagad.clone().guard(request).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_keeps_trying_a_finish_that_failed_so_its_branch_can_still_be_reversed() {
    let server = TestServer::start().await;
    put_strategy(
        &server.channel,
        two_steps("transfer", "warehouse-a", "warehouse-b"),
    )
    .await;
    // sagad is away for warehouse-a's first Finishes of each action, as when it restarts while
    // reserve or release runs: a record left PROCESSING would make every Reverse IN_PROGRESS.
    let refused = [("main/forward", 3), ("main/reversal", 2)];
    let barrier = Barrier::start(&server.channel, &refused, false).await;
    let main = Example::start(barrier, "warehouse-a", "widget=10", &[]).await;
    main.register_with(&server.channel, "warehouse-a").await;
    let backup = Example::start(server.addr, "warehouse-b", "widget=0", &["--subscribe"]).await;
    let logs = || format!("{}\n{}", main.log(), backup.log());

    // warehouse-b has nothing: main's reservation must be undone.
    let saga = run_saga(&server.channel, "transfer", "transfer-1", 6).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{}", logs());
    assert_eq!(
        branch(&saga, "main").state,
        pb::BranchState::Reversed as i32
    );
    for key in ["main/forward", "main/reversal"] {
        let mut record = pb::IdempotencyRecord::default();
        for _ in 0..(LIMIT.as_millis() / 50) {
            record = barrier_record(&server.channel, "warehouse-a", &saga.gsn, key).await;
            if record.state == pb::RecordState::Done as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            (record.state, record.result.as_str()),
            (pb::RecordState::Done as i32, "SUCCEEDED"),
            "{key} was finished in the end: {}",
            logs()
        );
    }
    assert!(
        main.log().contains("could not finish; trying again"),
        "the Finishes were refused as planned: {}",
        logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_gives_back_a_reservation_its_barrier_lost_and_answers_it_reversed() {
    let server = TestServer::start().await;
    put_strategy(
        &server.channel,
        two_steps("transfer", "warehouse-a", "warehouse-b"),
    )
    .await;
    // Every reversal Guard at warehouse-a is answered as if the forward record were gone.
    let barrier = Barrier::start(&server.channel, &[], true).await;
    let main = Example::start(barrier, "warehouse-a", "widget=6", &[]).await;
    main.register_with(&server.channel, "warehouse-a").await;
    let backup = Example::start(server.addr, "warehouse-b", "widget=0", &["--subscribe"]).await;
    let logs = || format!("{}\n{}", main.log(), backup.log());

    let saga = run_saga(&server.channel, "transfer", "transfer-1", 6).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{}", logs());
    assert_eq!(
        branch(&saga, "main").state,
        pb::BranchState::Reversed as i32,
        "the reservation was held, so it was undone, not NOT_OCCURRED: {}",
        logs()
    );

    // All 6 widgets are back: main reserves them again (and is reversed again).
    let again = run_saga(&server.channel, "transfer", "transfer-2", 6).await;
    assert_eq!(
        branch(&again, "main").state,
        pb::BranchState::Reversed as i32,
        "the stock came back: {}",
        logs()
    );
}
