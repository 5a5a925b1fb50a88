//! The operators' view of recovery (S4) against a real sagad and real participants: what
//! `Operations.ListStuck` and `sagactl stuck` say recovery waits on (a silent node's unknown
//! outcome with its polls, a down node's failing command, a step or a reversal waiting for its
//! retry, a saga needing attention), `sagactl show`'s branch timelines, and the counters moving.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use common::orders::{
    branch, get, order_strategy, put_strategy, register_node, shop as order_shop, start_order,
    wait_terminal,
};
use common::participant::{Node, PushParticipant, Script};
use sagad::clock::SystemClock;
use sagad::config::Config;
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::operations_client::OperationsClient;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

const LIMIT: Duration = Duration::from_secs(20);

// ---- A node that never says what happened ----

/// Answers every Execute and every QueryStatus with PROCESSING and never reports: sagad can
/// only keep polling it, until its poll budget is spent.
#[derive(Default)]
struct Silent {
    queries: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct SilentService(Arc<Silent>);

fn processing() -> i32 {
    pb::Outcome::Processing as i32
}

#[tonic::async_trait]
impl Participant for SilentService {
    async fn execute(
        &self,
        _: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        Ok(Response::new(pb::ExecuteResponse {
            outcome: processing(),
            ..Default::default()
        }))
    }
    async fn reverse(
        &self,
        _: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        // Nothing ever took effect here, so there is nothing to undo.
        Ok(Response::new(pb::ReverseResponse {
            outcome: pb::Outcome::NotFound as i32,
            ..Default::default()
        }))
    }
    async fn query_status(
        &self,
        request: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        self.0
            .queries
            .lock()
            .unwrap()
            .push(request.into_inner().command_id);
        Ok(Response::new(pb::QueryStatusResponse {
            outcome: processing(),
            ..Default::default()
        }))
    }
    async fn signal(
        &self,
        _: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        Ok(Response::new(pb::SignalResponse {}))
    }
}

async fn start_silent() -> (Arc<Silent>, SocketAddr) {
    let silent = Arc::new(Silent::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ParticipantServer::new(SilentService(silent.clone()));
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (silent, addr)
}

// ---- The shop: sagad, the order strategy, and its three nodes ----

struct Shop {
    server: TestServer,
    payment: PushParticipant,
    shipping: PushParticipant,
    silent: Arc<Silent>,
    _dir: tempfile::TempDir,
}

/// Inventory is silent; payment and shipping answer at once.
async fn shop(step_timeout: Duration, max_polls: u32) -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data(dir.path().join("ledger"));
    config.max_polls = max_polls;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let (silent, silent_addr) = start_silent().await;
    let payment = PushParticipant::start(Node::new("payment")).await;
    let shipping = PushParticipant::start(Node::new("shipping")).await;
    payment
        .node
        .script("charge", vec![Script::Succeed("PAID", vec![])]);
    shipping
        .node
        .script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    put_strategy(&server.channel, order_strategy(step_timeout)).await;
    register_node(
        &server.channel,
        "inventory",
        &format!("http://{silent_addr}"),
    )
    .await;
    register_node(&server.channel, "payment", &payment.endpoint()).await;
    register_node(&server.channel, "shipping", &shipping.endpoint()).await;
    Shop {
        server,
        payment,
        shipping,
        silent,
        _dir: dir,
    }
}

fn operations(channel: &Channel) -> OperationsClient<Channel> {
    OperationsClient::new(channel.clone())
}

async fn stuck_items(channel: &Channel) -> Vec<pb::StuckItem> {
    operations(channel)
        .list_stuck(pb::ListStuckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items
}

async fn counters(channel: &Channel) -> BTreeMap<String, u64> {
    operations(channel)
        .get_counters(pb::GetCountersRequest {})
        .await
        .unwrap()
        .into_inner()
        .counters
        .into_iter()
        .map(|c| (c.name, c.value))
        .collect()
}

/// Asks `ask` every 50 ms until it returns something, for at most `LIMIT`.
async fn wait_for<T, F, Fut>(what: &str, mut ask: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..(LIMIT.as_millis() / 50) {
        if let Some(found) = ask().await {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("waited {LIMIT:?} for {what}");
}

fn sagactl(addr: SocketAddr, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "sagactl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn kind(item: &pb::StuckItem) -> pb::StuckKind {
    pb::StuckKind::try_from(item.kind).unwrap()
}

/// Waits until ListStuck lists an item of `want` for saga `gsn`, and returns it.
async fn listed(channel: &Channel, gsn: &str, want: pb::StuckKind, what: &str) -> pb::StuckItem {
    wait_for(what, || {
        let channel = channel.clone();
        let gsn = gsn.to_owned();
        async move {
            stuck_items(&channel)
                .await
                .into_iter()
                .find(|i| i.gsn == gsn && kind(i) == want)
        }
    })
    .await
}

// ---- Tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_step_is_listed_as_unknown_with_its_polls_and_shown_with_its_timeline() {
    let shop = shop(Duration::from_millis(200), 1_000).await;
    let channel = shop.server.channel.clone();
    let gsn = start_order(&channel, "o-silent", "order silent").await;

    let item = wait_for("the unknown reserve step to be listed after a poll", || {
        let channel = channel.clone();
        let gsn = gsn.clone();
        async move {
            stuck_items(&channel).await.into_iter().find(|i| {
                i.gsn == gsn
                    && i.kind == pb::StuckKind::UnknownOutcome as i32
                    && i.last_poll_outcome == pb::Outcome::Processing as i32
                    && i.polls >= 1
            })
        }
    })
    .await;
    assert_eq!(
        (item.branch_id.as_str(), item.node_id.as_str()),
        ("reserve", "inventory")
    );
    assert_eq!(item.saga_state, pb::SagaState::Running as i32);
    assert_eq!(item.branch_state, pb::BranchState::Unknown as i32);
    assert!(item.last_poll_at.is_some() && item.since.is_some());
    assert!(
        item.reason.contains("outcome unknown") && item.reason.contains("PROCESSING"),
        "{}",
        item.reason
    );
    assert!(
        !shop.silent.queries.lock().unwrap().is_empty(),
        "the node was really asked"
    );
    let saga = get(&channel, &gsn).await;
    assert!(
        branch(&saga, "reserve").polls >= 1,
        "GetSaga shows the polls too"
    );

    let table = sagactl(shop.server.addr, &["stuck"]);
    let row = table
        .lines()
        .find(|l| l.contains(&gsn))
        .unwrap_or_else(|| panic!("no row for {gsn}:\n{table}"));
    for expected in [
        "UNKNOWN_OUTCOME",
        "reserve",
        "inventory",
        "PROCESSING",
        "outcome unknown",
    ] {
        assert!(row.contains(expected), "{expected:?} missing from {row:?}");
    }

    let shown = sagactl(shop.server.addr, &["show", &gsn]);
    for expected in [
        "state:         RUNNING",
        "reserve on inventory",
        "state:      UNKNOWN",
        "last poll:  PROCESSING at",
        "timeline:",
        "triggered: execute reserve on inventory",
        "no report within the step's timeout: asking the node",
        "charge on payment",
        "reported SUCCEEDED PAID",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from:\n{shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_stuck_reads_a_bounded_number_of_sagas_per_page_and_refuses_forged_tokens() {
    let shop = shop(Duration::from_millis(200), 1_000).await;
    let channel = shop.server.channel.clone();
    let mut gsns = Vec::new();
    for i in 0..3 {
        gsns.push(start_order(&channel, &format!("o-page-{i}"), "order").await);
    }
    wait_for("every reserve step to be unknown", || {
        let channel = channel.clone();
        async move {
            let unknown = stuck_items(&channel)
                .await
                .iter()
                .filter(|i| kind(i) == pb::StuckKind::UnknownOutcome)
                .count();
            (unknown == 3).then_some(())
        }
    })
    .await;

    let mut client = operations(&channel);
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_stuck(pb::ListStuckRequest {
                page_size: 0,
                page_token: token.clone(),
                max_examined: 1,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.sagas_examined <= 1, "{page:?}");
        seen.extend(page.items.into_iter().map(|i| i.gsn));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages <= 10, "the scan ends");
    }
    assert!(pages >= 3, "one saga per page: {pages} pages");
    assert_eq!(seen, gsns, "each stuck saga once, in GSN order");

    let forged = client
        .list_stuck(pb::ListStuckRequest {
            page_token: "p1o00000000zzzzzzzz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::InvalidArgument);
    assert!(
        forged.message().contains("page_token"),
        "{}",
        forged.message()
    );
    let too_big = client
        .list_stuck(pb::ListStuckRequest {
            page_size: 501,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_to_a_node_that_is_down_is_listed_with_its_attempts_and_last_error() {
    let shop = shop(Duration::from_secs(30), 1_000).await;
    let channel = shop.server.channel.clone();
    // Nothing listens there: every send of payment's command fails at once.
    let nowhere = format!("http://127.0.0.1:{}", common::free_port());
    register_node(&channel, "payment", &nowhere).await;
    let gsn = start_order(&channel, "o-down", "order down").await;

    let item = wait_for("payment's command to be listed as failing", || {
        let channel = channel.clone();
        let gsn = gsn.clone();
        async move {
            stuck_items(&channel).await.into_iter().find(|i| {
                i.gsn == gsn
                    && kind(i) == pb::StuckKind::DeliveryFailing
                    && i.attempts >= 2
                    && !i.last_error.is_empty()
            })
        }
    })
    .await;
    assert_eq!(item.node_id, "payment");
    assert_eq!(item.command_kind, "execute");
    assert!(item.outbox_id > 0);
    assert!(
        item.reason.contains("execute not delivered after"),
        "{}",
        item.reason
    );

    let table = sagactl(shop.server.addr, &["stuck"]);
    let row = table
        .lines()
        .find(|l| l.contains("DELIVERY_FAILING") && l.contains(&gsn))
        .unwrap_or_else(|| panic!("no failing delivery for {gsn}:\n{table}"));
    assert!(
        row.contains("payment") && row.contains(&format!("execute #{}", item.outbox_id)),
        "{row}"
    );
    assert_eq!(
        shop.payment.node.executions_of(&gsn, "charge"),
        0,
        "the registered endpoint, not the old one, is used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_count_polls_their_answers_and_the_escalation_after_the_poll_budget() {
    let shop = shop(Duration::from_millis(200), 2).await;
    let channel = shop.server.channel.clone();
    let before = counters(&channel).await;
    for name in ["polls_sent", "poll_answers", "escalations"] {
        assert_eq!(before.get(name), Some(&0), "{name} starts at 0: {before:?}");
    }

    let gsn = start_order(&channel, "o-escalate", "order escalate").await;
    let saga = wait_terminal(&channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32, "{saga:?}");
    assert_eq!(
        saga.reason,
        "node inventory never said what happened to step reserve"
    );
    let saga = get(&channel, &gsn).await;
    assert_eq!(
        branch(&saga, "reserve").state,
        pb::BranchState::NotOccurred as i32,
        "the silent step was reversed too, and had never happened"
    );
    assert_eq!(shop.payment.node.reversals_of(&gsn, "charge"), 1);
    assert_eq!(shop.shipping.node.executions_of(&gsn, "ship"), 0);

    let after = counters(&channel).await;
    assert!(after["polls_sent"] >= 2, "{after:?}");
    assert!(after["poll_answers"] >= 1, "{after:?}");
    assert!(
        after["poll_answers"] <= after["polls_sent"],
        "no more answers than polls: {after:?}"
    );
    assert_eq!(after["escalations"], 1, "{after:?}");
    assert_eq!(after["sagas_reversed"], 1, "{after:?}");
    assert!(
        after["ledger_flushes"] > before["ledger_flushes"],
        "the saga's ledger writes were flushed: {after:?}"
    );

    let table = sagactl(shop.server.addr, &["counters"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("escalations "))
        .unwrap_or_else(|| panic!("no escalations row:\n{table}"));
    assert_eq!(row.split_whitespace().nth(1), Some("1"), "{row}");
    assert!(table.contains("polls_sent") && table.contains("poll_answers"));
}

/// A step that failed with a retryable code waits for its resend (S5, the default policy's 1 s
/// floor): ListStuck shows it with the error and when it goes out, and the saga then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_waiting_for_its_retry_is_listed_with_when_it_is_sent_again() {
    let shop = order_shop(Duration::from_secs(30)).await;
    let channel = shop.server.channel.clone();
    shop.payment.node.script(
        "charge",
        vec![Script::Fail("UNAVAILABLE"), Script::Succeed("PAID", vec![])],
    );
    let gsn = start_order(&channel, "o-retrying", "order").await;

    let retrying = listed(
        &channel,
        &gsn,
        pb::StuckKind::StepRetrying,
        "charge to be listed as waiting for its retry",
    )
    .await;
    assert_eq!(retrying.branch_id, "charge");
    assert_eq!(retrying.node_id, "payment");
    assert_eq!(retrying.branch_state, pb::BranchState::Triggered as i32);
    assert_eq!(retrying.attempts, 1);
    assert_eq!(retrying.last_error, "UNAVAILABLE");
    let next = retrying.next_attempt_at.expect("when the retry goes out");
    let since = retrying.since.expect("when charge last changed");
    assert!(
        next.seconds >= since.seconds,
        "the retry is after the failure"
    );

    let saga = wait_terminal(&channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert!(
        !stuck_items(&channel).await.iter().any(|i| i.gsn == gsn),
        "nothing is waited on once the saga completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_reversal_is_listed_while_retried_then_as_needing_attention() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        Config::with_data(dir.path().join("ledger")),
        Arc::new(SystemClock),
    )
    .await;
    let channel = server.channel.clone();
    let inventory = PushParticipant::start(Node::new("inventory")).await;
    let payment = PushParticipant::start(Node::new("payment")).await;
    inventory
        .node
        .script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    // UNAVAILABLE is retryable by the default retry policy; LOCKED is not.
    inventory.node.script(
        "release",
        vec![Script::Fail("UNAVAILABLE"), Script::Fail("LOCKED")],
    );
    payment
        .node
        .script("charge", vec![Script::Succeed("DECLINED", vec![])]);
    put_strategy(&channel, order_strategy(Duration::from_secs(30))).await;
    register_node(&channel, "inventory", &inventory.endpoint()).await;
    register_node(&channel, "payment", &payment.endpoint()).await;
    let gsn = start_order(&channel, "o-unreversible", "order").await;

    let retrying = listed(
        &channel,
        &gsn,
        pb::StuckKind::ReversalRetrying,
        "reserve's reversal to be listed as retrying",
    )
    .await;
    assert_eq!(retrying.branch_id, "reserve");
    assert_eq!(retrying.branch_state, pb::BranchState::Reversing as i32);
    assert_eq!(retrying.last_error, "UNAVAILABLE");
    assert!(retrying.attempts >= 1);

    let attention = listed(
        &channel,
        &gsn,
        pb::StuckKind::NeedsAttention,
        "the saga to be listed as needing attention",
    )
    .await;
    assert_eq!(attention.saga_state, pb::SagaState::NeedsAttention as i32);
    assert!(
        attention.reason.contains("reserve on inventory (LOCKED)")
            && attention.reason.contains("DECLINED"),
        "{}",
        attention.reason
    );
    let table = sagactl(server.addr, &["stuck"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("NEEDS_ATTENTION") && l.contains(&gsn) && l.contains("LOCKED")),
        "{table}"
    );
    let shown = sagactl(server.addr, &["show", &gsn]);
    assert!(
        shown.contains("state:      REVERSAL_FAILED") && shown.contains("reason:"),
        "{shown}"
    );
}

/// Runs the repository's grpcurl (installed into .tools/ on first use); returns its stdout.
fn grpcurl(args: &[&str]) -> String {
    let output = Command::new(common::repo_path("scripts/grpcurl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_reach_list_stuck_and_get_counters_with_grpcurl() {
    let shop = shop(Duration::from_millis(200), 1_000).await;
    let gsn = start_order(&shop.server.channel, "o-grpcurl", "order").await;
    let addr = shop.server.addr.to_string();
    let described = grpcurl(&["-plaintext", &addr, "describe", "sagad.v1.Operations"]);
    assert!(
        described.contains("rpc ListStuck") && described.contains("rpc GetCounters"),
        "{described}"
    );
    let stuck = wait_for("ListStuck through grpcurl to show the silent step", || {
        let addr = addr.clone();
        let gsn = gsn.clone();
        async move {
            let text = grpcurl(&[
                "-plaintext",
                "-d",
                r#"{"page_size": 10}"#,
                &addr,
                "sagad.v1.Operations/ListStuck",
            ]);
            (text.contains(&gsn) && text.contains("STUCK_KIND_UNKNOWN_OUTCOME")).then_some(text)
        }
    })
    .await;
    let stuck: serde_json::Value = serde_json::from_str(&stuck).unwrap();
    assert_eq!(stuck["items"][0]["branchId"], "reserve", "{stuck}");
    let counters: serde_json::Value = serde_json::from_str(&grpcurl(&[
        "-plaintext",
        &addr,
        "sagad.v1.Operations/GetCounters",
    ]))
    .unwrap();
    let names: Vec<&str> = counters["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for name in [
        "polls_sent",
        "poll_answers",
        "escalations",
        "ledger_flushes",
    ] {
        assert!(names.contains(&name), "{name} missing: {counters}");
    }
}

/// An outcall saga from `shop` with one outcall to `callee` per item of `callees`, reported as
/// `outcome`.
async fn outcall_saga(
    channel: &Channel,
    request_id: &str,
    callees: &[&str],
    outcome: pb::Outcome,
) -> String {
    let mut coordinator = CoordinatorClient::new(channel.clone());
    let gsn = coordinator
        .start_saga(common::start_request(request_id, "transfer"))
        .await
        .unwrap()
        .into_inner()
        .gsn;
    for (order, callee) in (1..).zip(callees) {
        let branch_id = coordinator
            .register_outcall(pb::RegisterOutcallRequest {
                request_id: format!("{request_id}-outcall-{order}"),
                gsn: gsn.clone(),
                caller_node_id: "shop".into(),
                callee_node_id: (*callee).into(),
                forward_action: "charge".into(),
                reversal_action: "refund".into(),
                order,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .branch_id;
        coordinator
            .report_state(pb::ReportStateRequest {
                request_id: format!("{request_id}-report-{order}"),
                gsn: gsn.clone(),
                branch_id,
                reporter_node_id: "shop".into(),
                outcome: outcome as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    gsn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_count_each_saga_outcome_and_each_delivered_command_once() {
    let server = TestServer::start().await;
    let channel = server.channel.clone();
    let mut coordinator = CoordinatorClient::new(channel.clone());
    let mut payment = coordinator
        .subscribe(pb::SubscribeRequest {
            node_id: "payment".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // One saga has no outcall, so no node to tell it completed; the other tells payment.
    let alone = outcall_saga(&channel, "t-alone", &[], pb::Outcome::Succeeded).await;
    let told = outcall_saga(&channel, "t-told", &["payment"], pb::Outcome::Succeeded).await;
    for (request_id, gsn) in [("done-alone", &alone), ("done-told", &told)] {
        coordinator
            .complete_saga(pb::CompleteSagaRequest {
                request_id: request_id.into(),
                gsn: gsn.clone(),
            })
            .await
            .unwrap();
    }
    let signal = tokio::time::timeout(LIMIT, payment.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(signal.kind, Some(pb::command::Kind::Signal(_))));
    // The Ack, its retry, and another Ack of the command already acknowledged.
    for request_id in ["ack-1", "ack-1", "ack-2"] {
        coordinator
            .ack(pb::AckRequest {
                request_id: request_id.into(),
                node_id: "payment".into(),
                command_id: signal.command_id.clone(),
            })
            .await
            .unwrap();
    }

    let counted = counters(&channel).await;
    assert_eq!(counted["sagas_completed"], 2, "{counted:?}");
    assert_eq!(
        counted["commands_delivered"], 1,
        "one command was acknowledged, three times: {counted:?}"
    );
    server.stop().await.unwrap();
}

/// An outcall saga that runs out of polls for an outcall no one reports escalates, as an
/// orchestrated one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcall_saga_that_runs_out_of_polls_counts_as_an_escalation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data(dir.path().join("ledger"));
    config.max_polls = 1;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let channel = server.channel.clone();
    // payment has no endpoint: its outcome stays unknown.
    let gsn = outcall_saga(&channel, "t-unknown", &["payment"], pb::Outcome::Unknown).await;
    let saga = wait_for("the saga to give up on payment", || {
        let channel = channel.clone();
        let gsn = gsn.clone();
        async move {
            let saga = get(&channel, &gsn).await;
            (saga.state != pb::SagaState::Running as i32).then_some(saga)
        }
    })
    .await;
    assert_eq!(saga.state, pb::SagaState::Reversing as i32, "{saga:?}");
    let counted = counters(&channel).await;
    assert_eq!(counted["escalations"], 1, "{counted:?}");
    server.stop().await.unwrap();
}
