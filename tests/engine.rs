//! The saga engine end to end (S2): a real sagad and real participant gRPC servers on loopback
//! running an order strategy — inventory, payment and shipping.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use common::orders::{
    Shop, branch, eventually, get, one_more_order, order_strategy, put_retry_config, put_strategy,
    register_node, shop, shop_without_shipping_endpoint, shop_without_shipping_endpoint_on,
    start_order, wait_terminal,
};
use common::participant::{Node, PushParticipant, Script, subscribe};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::operations_client::OperationsClient;
use sagad::grpc::pb::strategies_client::StrategiesClient;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_success_path_fans_out_joins_and_completes_with_every_node_told() {
    let shop = shop(Duration::from_secs(10)).await;
    let gsn = start_order(&shop.server.channel, "o-1", "order 1").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(saga.strategy_version, 1);

    let saga = get(&shop.server.channel, &gsn).await;
    for id in ["reserve", "charge", "ship"] {
        assert_eq!(
            branch(&saga, id).state,
            pb::BranchState::Succeeded as i32,
            "{id}"
        );
    }
    assert_eq!(shop.inventory.node.executions_of(&gsn, "reserve"), 1);
    assert_eq!(shop.payment.node.executions_of(&gsn, "charge"), 1);
    assert_eq!(shop.shipping.node.executions_of(&gsn, "ship"), 1);
    assert!(
        every_node_told_completed(&shop, &gsn).await,
        "every node is told the saga completed, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_runs_with_the_strategy_version_latest_when_it_started() {
    let shop = shop(Duration::from_secs(10)).await;
    // Each script answers one saga; this test runs two.
    for (node, action, status) in [
        (&shop.inventory, "reserve", "RESERVED"),
        (&shop.payment, "charge", "PAID"),
        (&shop.shipping, "ship", "SHIPPED"),
    ] {
        node.node.script(
            action,
            vec![
                Script::Succeed(status, vec![]),
                Script::Succeed(status, vec![]),
            ],
        );
    }
    let before = start_order(&shop.server.channel, "o-v1", "order 1").await;
    let mut second_version = order_strategy(Duration::from_secs(10));
    second_version.description = "the same steps, stored again".into();
    StrategiesClient::new(shop.server.channel.clone())
        .put_strategy(pb::PutStrategyRequest {
            request_id: "put-order-again".into(),
            strategy: Some(second_version),
        })
        .await
        .expect("put the second version");
    let after = start_order(&shop.server.channel, "o-v2", "order 2").await;

    let before = wait_terminal(&shop.server.channel, &before, LIMIT).await;
    let after = wait_terminal(&shop.server.channel, &after, LIMIT).await;
    assert_eq!(before.strategy_version, 1, "started before the new version");
    assert_eq!(after.strategy_version, 2, "started after it");
    assert_eq!(before.state, pb::SagaState::Completed as i32);
    assert_eq!(after.state, pb::SagaState::Completed as i32);
}

/// Waits until each node has been told, once, that the saga completed.
async fn every_node_told_completed(shop: &Shop, gsn: &str) -> bool {
    let completed = pb::Signal::Completed as i32;
    eventually(LIMIT, || {
        [&shop.inventory, &shop.payment, &shop.shipping]
            .iter()
            .all(|p| p.node.signals_for(gsn) == vec![completed])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abnormal_status_reverses_exactly_the_associated_triggered_steps() {
    let shop = shop(Duration::from_secs(10)).await;
    shop.payment
        .node
        .script("charge", vec![Script::Succeed("DECLINED", vec![])]);
    let gsn = start_order(&shop.server.channel, "o-2", "order 2").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    assert!(saga.reason.contains("DECLINED"), "{}", saga.reason);

    let saga = get(&shop.server.channel, &gsn).await;
    assert_eq!(saga.signal, pb::Signal::ReversalSuccess as i32);
    let reserve = branch(&saga, "reserve");
    assert!(
        [
            pb::BranchState::Reversed as i32,
            pb::BranchState::NotOccurred as i32
        ]
        .contains(&reserve.state),
        "reserve was reversed: {reserve:?}"
    );
    assert_eq!(
        branch(&saga, "charge").state,
        pb::BranchState::Succeeded as i32,
        "charge is outside its own exception scope"
    );
    assert!(
        saga.branches.iter().all(|b| b.branch_id != "ship"),
        "ship was never triggered"
    );
    assert_eq!(shop.payment.node.reversals_of(&gsn, "charge"), 0);
    assert!(shop.inventory.node.reversals_of(&gsn, "reserve") <= 1);
    assert_eq!(shop.shipping.node.executions_of(&gsn, "ship"), 0);
    let success = pb::Signal::ReversalSuccess as i32;
    let told = eventually(LIMIT, || {
        shop.inventory.node.signals_for(&gsn) == vec![success]
            && shop.payment.node.signals_for(&gsn) == vec![success]
    })
    .await;
    assert!(told, "inventory and payment are told REVERSAL_SUCCESS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_status_completes_the_join_when_the_other_arrives() {
    let shop = shop(Duration::from_secs(30)).await;
    // reserve answers PROCESSING and reports RESERVED by itself later.
    shop.inventory
        .node
        .script("reserve", vec![Script::SucceedSilently("RESERVED")]);
    let gsn = start_order(&shop.server.channel, "o-3", "order 3").await;
    let channel = shop.server.channel.clone();
    assert!(
        eventually(LIMIT, || shop.payment.node.executions_of(&gsn, "charge")
            == 1)
        .await,
        "charge ran"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let saga = get(&channel, &gsn).await;
    assert_eq!(
        branch(&saga, "charge").state,
        pb::BranchState::Succeeded as i32
    );
    assert!(
        saga.branches.iter().all(|b| b.branch_id != "ship"),
        "PAID alone is stored; the join waits"
    );

    CoordinatorClient::new(channel.clone())
        .report_state(pb::ReportStateRequest {
            request_id: "late-reserve".into(),
            gsn: gsn.clone(),
            branch_id: "reserve".into(),
            reporter_node_id: "inventory".into(),
            outcome: pb::Outcome::Succeeded as i32,
            status: Some(pb::Status {
                name: "RESERVED".into(),
                parameters: Default::default(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let saga = wait_terminal(&channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(shop.shipping.node.executions_of(&gsn, "ship"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_on_a_subscribe_stream_gets_the_same_commands() {
    let (server, _inventory, _payment) =
        shop_without_shipping_endpoint(Duration::from_secs(10)).await;
    let shipping = Node::new("shipping");
    shipping.script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    let stream = subscribe(shipping.clone(), server.channel.clone());

    let gsn = start_order(&server.channel, "o-4", "order 4").await;
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(shipping.executions_of(&gsn, "ship"), 1);
    let completed = pb::Signal::Completed as i32;
    assert!(
        eventually(LIMIT, || shipping.signals_for(&gsn) == vec![completed]).await,
        "the signal arrives on the stream too"
    );
    stream.abort();
}

/// A node whose Subscribe stream went silent without closing (its host lost, a NAT entry on
/// the way dropped) is not taken for a live one: sagad's PING goes unanswered, it closes the
/// connection, and the node's commands are listed as having no stream until it subscribes
/// again, when they are sent on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_whose_connection_went_silent_is_dropped_and_its_commands_wait_for_a_new_stream()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = sagad::config::Config::with_data(dir.path().join("ledger"));
    config.keepalive = Duration::from_millis(300);
    let server = TestServer::start_with(config, Arc::new(sagad::clock::SystemClock)).await;
    let (server, inventory, payment) =
        shop_without_shipping_endpoint_on(server, Duration::from_secs(10)).await;
    let proxy = common::SilenceableProxy::start(server.addr).await;
    let through_proxy = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connected through the proxy");
    let shipping = Node::new("shipping");
    shipping.script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    let first = subscribe(shipping.clone(), through_proxy);
    let gsn = start_order(&server.channel, "o-silent-1", "order").await;
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(
        saga.state,
        pb::SagaState::Completed as i32,
        "the stream works"
    );

    proxy.go_silent();
    one_more_order(&inventory.node, &payment.node);
    shipping.script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    let gsn = start_order(&server.channel, "o-silent-2", "order").await;
    let mut operations = OperationsClient::new(server.channel.clone());
    let waits_for_a_stream = |items: &[pb::StuckItem]| {
        items.iter().any(|item| {
            item.kind == pb::StuckKind::DeliveryFailing as i32
                && item.node_id == "shipping"
                && item.last_error.contains("no Subscribe stream")
        })
    };
    let step = Duration::from_millis(50);
    for round in 0.. {
        let stuck = operations
            .list_stuck(pb::ListStuckRequest::default())
            .await
            .expect("ListStuck")
            .into_inner();
        if waits_for_a_stream(&stuck.items) {
            break;
        }
        assert!(
            step * round < LIMIT,
            "the silent stream was not dropped: {:?}",
            stuck.items
        );
        tokio::time::sleep(step).await;
    }
    let second = subscribe(shipping.clone(), server.channel.clone());
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(shipping.executions_of(&gsn, "ship"), 1);
    first.abort();
    second.abort();
    // The ledger's folder outlives the server's last flush.
    server.stop().await.expect("a clean stop");
    drop(dir);
}

/// The next command on a Subscribe stream, within the test's limit.
async fn next_command(stream: &mut tonic::Streaming<pb::Command>) -> pb::Command {
    common::next_command(stream, LIMIT).await
}

/// A Subscribe stream held for `node`, as a node that cannot be dialled holds one.
async fn hold_stream(server: &TestServer, node: &str) -> tonic::Streaming<pb::Command> {
    common::hold_stream(&server.channel, node).await
}

/// The next Signal command on a stream, skipping any other command sent again meanwhile.
async fn next_signal(stream: &mut tonic::Streaming<pb::Command>) -> pb::Command {
    loop {
        let command = next_command(stream).await;
        if matches!(command.kind, Some(pb::command::Kind::Signal(_))) {
            return command;
        }
    }
}

/// `command` is still pending: `node` opens a new stream in place of `stream` and is sent it
/// again first; returns the new stream.
async fn sent_again_on_a_new_stream(
    server: &TestServer,
    node: &str,
    stream: tonic::Streaming<pb::Command>,
    command: &pb::Command,
) -> tonic::Streaming<pb::Command> {
    drop(stream);
    let mut stream = hold_stream(server, node).await;
    assert_eq!(
        next_command(&mut stream).await.command_id,
        command.command_id
    );
    stream
}

/// The call failed with FAILED_PRECONDITION, its message naming `what`.
fn assert_precondition<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let refused = result.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains(what), "{}", refused.message());
}

/// A SUCCEEDED report with `status` about `branch` of saga `gsn`, by `node`, answering
/// `command_id`.
fn succeeded(
    gsn: &str,
    branch: &str,
    node: &str,
    status: &str,
    command_id: &str,
) -> pb::ReportStateRequest {
    pb::ReportStateRequest {
        request_id: format!("report-{branch}-{command_id}-{node}"),
        gsn: gsn.into(),
        branch_id: branch.into(),
        reporter_node_id: node.into(),
        outcome: pb::Outcome::Succeeded as i32,
        status: Some(pb::Status {
            name: status.into(),
            parameters: Default::default(),
        }),
        command_id: command_id.into(),
        ..Default::default()
    }
}

/// Two replicas subscribing as one node_id keep replacing each other's stream; the replaced
/// one ends ABORTED, saying why and what to do, not with a plain OK that reads as "open
/// another", and the newer stream stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_replaced_by_a_newer_subscribe_ends_with_a_status_saying_so() {
    let server = TestServer::start().await;
    let mut replaced = hold_stream(&server, "shipping").await;
    let mut newer = hold_stream(&server, "shipping").await;
    let ended = tokio::time::timeout(LIMIT, replaced.message())
        .await
        .expect("the replaced stream ends");
    let status = ended.expect_err("it ends with a status");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    for says in [
        "newer Subscribe",
        "\"shipping\"",
        "one subscriber per node_id",
    ] {
        assert!(status.message().contains(says), "{}", status.message());
    }
    let still_open = tokio::time::timeout(Duration::from_millis(200), newer.message()).await;
    assert!(still_open.is_err(), "{still_open:?}");
}

/// A send is counted when something is sent: a node that could not be reached for a while (no
/// endpoint, no stream) gets its first command as attempt 1 when it shows up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_shows_up_late_gets_its_first_command_as_attempt_one() {
    let (server, _inventory, _payment) =
        shop_without_shipping_endpoint(Duration::from_secs(30)).await;
    let gsn = start_order(&server.channel, "o-late", "order late").await;
    // ship is triggered once reserve and charge are done; its command finds no way to the node.
    for _ in 0..500 {
        let saga = get(&server.channel, &gsn).await;
        if saga.branches.iter().any(|b| b.branch_id == "ship") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stream = hold_stream(&server, "shipping").await;
    let command = next_command(&mut stream).await;
    assert!(matches!(command.kind, Some(pb::command::Kind::Execute(_))));
    assert_eq!(command.attempt, 1);
}

/// Ack is for commands that need no outcome (signals), from the node that received them. An
/// Ack of an Execute, or of another node's signal, is refused and takes nothing out of the
/// outbox: the Execute is still delivered, the signal still counts as unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ack_of_a_command_that_needs_an_outcome_or_of_another_nodes_command_is_refused() {
    let (server, _inventory, _payment) =
        shop_without_shipping_endpoint(Duration::from_secs(30)).await;
    let mut coordinator = server.coordinator();
    let ack = |node: &str, command_id: &str, n: u32| pb::AckRequest {
        request_id: format!("ack-{n}"),
        node_id: node.into(),
        command_id: command_id.into(),
    };
    let mut stream = hold_stream(&server, "shipping").await;
    let gsn = start_order(&server.channel, "o-acks", "order acks").await;
    let execute = next_command(&mut stream).await;
    assert!(matches!(execute.kind, Some(pb::command::Kind::Execute(_))));

    let refused = coordinator
        .ack(ack("shipping", &execute.command_id, 1))
        .await;
    assert_precondition(refused, "ReportState");
    let mut stream = sent_again_on_a_new_stream(&server, "shipping", stream, &execute).await;
    let shipped = succeeded(&gsn, "ship", "shipping", "SHIPPED", &execute.command_id);
    coordinator.report_state(shipped).await.unwrap();
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);

    let signal = next_signal(&mut stream).await;
    let refused = coordinator
        .ack(ack("inventory", &signal.command_id, 2))
        .await;
    assert_precondition(refused, "\"shipping\"");
    coordinator
        .ack(ack("shipping", &signal.command_id, 3))
        .await
        .unwrap();
    // Acknowledged again under a new request id: nothing left to take out, and no error.
    coordinator
        .ack(ack("shipping", &signal.command_id, 4))
        .await
        .unwrap();
}

/// A ReportState answers a command about its own branch. One naming another branch's command
/// (a node's mix-up) is refused and changes nothing: that command is still delivered, and the
/// saga completes once each branch is answered for itself. A signal's id is refused too: a
/// signal is acknowledged with Ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_naming_another_branchs_command_is_refused_and_that_command_stays_pending() {
    let server = TestServer::start().await;
    let payment = PushParticipant::start(Node::new("payment")).await;
    let shipping = PushParticipant::start(Node::new("shipping")).await;
    // PROCESSING, and the outcome only by ReportState below.
    payment
        .node
        .script("charge", vec![Script::SucceedSilently("PAID")]);
    shipping
        .node
        .script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    register_node(&server.channel, "payment", &payment.endpoint()).await;
    register_node(&server.channel, "shipping", &shipping.endpoint()).await;
    let mut coordinator = server.coordinator();
    let mut stream = hold_stream(&server, "inventory").await;
    let gsn = start_order(&server.channel, "o-mixed", "order mixed").await;
    let reserve = next_command(&mut stream).await;

    let mixed_up = succeeded(&gsn, "charge", "payment", "PAID", &reserve.command_id);
    let refused = coordinator.report_state(mixed_up).await;
    assert_precondition(refused, "branch \"charge\"");
    let mut stream = sent_again_on_a_new_stream(&server, "inventory", stream, &reserve).await;

    // charge goes out beside reserve; under load it may reach the node a moment later.
    let mut charge = None;
    for _ in 0..(LIMIT.as_millis() / 20) {
        charge = payment
            .node
            .received
            .lock()
            .unwrap()
            .first()
            .map(|r| r.0.clone());
        if charge.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let charge = charge.expect("charge reached the payment node");
    let reserved = succeeded(
        &gsn,
        "reserve",
        "inventory",
        "RESERVED",
        &reserve.command_id,
    );
    coordinator.report_state(reserved).await.unwrap();
    let paid = succeeded(&gsn, "charge", "payment", "PAID", &charge);
    coordinator.report_state(paid).await.unwrap();
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);

    let signal = next_signal(&mut stream).await;
    let as_report = succeeded(&gsn, "reserve", "inventory", "RESERVED", &signal.command_id);
    assert_precondition(coordinator.report_state(as_report).await, "Ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_to_a_participant_that_is_down_are_redelivered_when_it_returns() {
    let shop = shop(Duration::from_secs(30)).await;
    let (payment, addr) = shop.payment.stop().await;
    let gsn = start_order(&shop.server.channel, "o-5", "order 5").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(payment.executions_of(&gsn, "charge"), 0);
    let saga = get(&shop.server.channel, &gsn).await;
    assert_eq!(
        saga.state,
        pb::SagaState::Running as i32,
        "the saga waits for the node"
    );

    let payment = PushParticipant::start_on(payment, addr).await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(payment.node.executions_of(&gsn, "charge"), 1);
}

/// A node that serves only a few calls at once on a connection makes the rest wait for a
/// free stream on sagad's one connection to it. Every order completes with each step done
/// once, and no send fails: streams opened before the node's limit reached sagad, at the
/// connection's start, are refused unprocessed by the node and sent again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_beyond_a_nodes_stream_limit_wait_for_a_free_stream() {
    let server = TestServer::start().await;
    let inventory = PushParticipant::start_with_stream_limit(Node::new("inventory"), 2).await;
    let payment = PushParticipant::start_with_stream_limit(Node::new("payment"), 2).await;
    let shipping = PushParticipant::start_with_stream_limit(Node::new("shipping"), 2).await;
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    for (id, node) in [
        ("inventory", &inventory),
        ("payment", &payment),
        ("shipping", &shipping),
    ] {
        register_node(&server.channel, id, &node.endpoint()).await;
    }
    const ORDERS: usize = 24;
    // Each answer takes a while, so the orders' commands overlap well past two per node.
    let answers =
        |status: &'static str| vec![Script::SucceedLate(status, Duration::from_millis(50)); ORDERS];
    inventory.node.script("reserve", answers("RESERVED"));
    payment.node.script("charge", answers("PAID"));
    shipping.node.script("ship", answers("SHIPPED"));
    let orders = (0..ORDERS).map(|i| {
        let channel = server.channel.clone();
        tokio::spawn(async move {
            let gsn = start_order(&channel, &format!("o-busy-{i}"), &format!("busy {i}")).await;
            wait_terminal(&channel, &gsn, LIMIT).await
        })
    });
    for saga in futures::future::join_all(orders).await {
        let saga = saga.unwrap();
        assert_eq!(saga.state, pb::SagaState::Completed as i32);
        assert_eq!(inventory.node.executions_of(&saga.gsn, "reserve"), 1);
        assert_eq!(payment.node.executions_of(&saga.gsn, "charge"), 1);
        assert_eq!(shipping.node.executions_of(&saga.gsn, "ship"), 1);
    }
    assert_eq!(counter(&server.channel, "delivery_failures").await, 0);
}

/// Every call sagad makes to a node carries sagad's participant timeout as its gRPC deadline
/// (the grpc-timeout header), so the node's gRPC stack can give up on work whose answer sagad
/// no longer waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_to_nodes_carry_the_participant_timeout_as_their_grpc_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = sagad::config::Config::with_data(dir.path().join("ledger"));
    config.participant_timeout = Duration::from_secs(7);
    let server =
        TestServer::start_with(config, std::sync::Arc::new(sagad::clock::SystemClock)).await;
    let mut nodes = Vec::new();
    for id in ["inventory", "payment", "shipping"] {
        let node = PushParticipant::start(Node::new(id)).await;
        register_node(&server.channel, id, &node.endpoint()).await;
        nodes.push(node);
    }
    put_strategy(&server.channel, order_strategy(Duration::from_secs(30))).await;
    // Declined: reserve is reversed, and both nodes are told by a signal.
    nodes[1]
        .node
        .script("charge", vec![Script::Succeed("DECLINED", vec![])]);
    let gsn = start_order(&server.channel, "o-deadline", "order deadline").await;
    let saga = wait_terminal(&server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    let calls = || {
        nodes
            .iter()
            .flat_map(|n| n.node.deadlines.lock().unwrap().clone())
            .collect::<Vec<_>>()
    };
    let told = || calls().iter().filter(|(rpc, _)| *rpc == "signal").count() == 2;
    assert!(eventually(LIMIT, told).await, "{:?}", calls());
    let calls = calls();
    for rpc in ["execute", "reverse", "signal"] {
        assert!(
            calls.iter().any(|(r, _)| *r == rpc),
            "no {rpc} in {calls:?}"
        );
    }
    for (rpc, header) in &calls {
        let header = header
            .as_deref()
            .unwrap_or_else(|| panic!("{rpc} had no deadline"));
        assert_eq!(
            grpc_timeout(header),
            Duration::from_secs(7),
            "{rpc}: {header}"
        );
    }
}

/// A grpc-timeout header's value: digits and a unit (gRPC over HTTP/2's Timeout).
fn grpc_timeout(header: &str) -> Duration {
    let (digits, unit) = header.split_at(header.len() - 1);
    let value: u64 = digits.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => panic!("unit {unit:?} in grpc-timeout {header:?}"),
    }
}

async fn counter(channel: &tonic::transport::Channel, name: &str) -> u64 {
    let counters = OperationsClient::new(channel.clone())
        .get_counters(pb::GetCountersRequest {})
        .await
        .unwrap()
        .into_inner()
        .counters;
    counters
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.value)
        .unwrap()
}

/// sagad keeps one connection per node endpoint. A node that restarted between two commands
/// closed it; the next command finds it closed before anything was sent and dials again at
/// once, instead of failing that send and waiting out a backoff (`delivery_failures` counts
/// failed sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_between_commands_is_dialled_again_without_a_failed_send() {
    let shop = shop(Duration::from_secs(30)).await;
    let channel = &shop.server.channel;
    let first = start_order(channel, "o-redial-1", "order redial 1").await;
    let saga = wait_terminal(channel, &first, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert!(every_node_told_completed(&shop, &first).await);

    let (payment, addr) = shop.payment.stop().await;
    let payment = PushParticipant::start_on(payment, addr).await;
    // Each script answers once; the second order needs its own.
    shop.inventory
        .node
        .script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    payment
        .node
        .script("charge", vec![Script::Succeed("PAID", vec![])]);
    shop.shipping
        .node
        .script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    let failures = counter(channel, "delivery_failures").await;
    let second = start_order(channel, "o-redial-2", "order redial 2").await;
    let saga = wait_terminal(channel, &second, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert_eq!(payment.node.executions_of(&second, "charge"), 1);
    assert_eq!(
        counter(channel, "delivery_failures").await,
        failures,
        "a send to the restarted node failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_silent_past_its_timeout_is_asked_with_query_status() {
    let shop = shop(Duration::from_millis(300)).await;
    shop.inventory
        .node
        .script("reserve", vec![Script::SucceedSilently("RESERVED")]);
    let gsn = start_order(&shop.server.channel, "o-6", "order 6").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(
        saga.state,
        pb::SagaState::Completed as i32,
        "the poll's answer (RESERVED) completed the join"
    );
    let saga = get(&shop.server.channel, &gsn).await;
    let reserve = branch(&saga, "reserve");
    assert_eq!(reserve.last_poll_outcome, pb::Outcome::Succeeded as i32);
    assert!(reserve.last_poll_at.is_some());
    let queried = shop
        .inventory
        .node
        .received
        .lock()
        .unwrap()
        .iter()
        .any(|(_, kind)| *kind == "query");
    assert!(queried, "inventory was sent QueryStatus");
    assert_eq!(shop.inventory.node.executions_of(&gsn, "reserve"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_for_unknown_sagas_or_untriggered_steps_are_refused() {
    let shop = shop(Duration::from_secs(30)).await;
    shop.inventory
        .node
        .script("reserve", vec![Script::SucceedSilently("RESERVED")]);
    let gsn = start_order(&shop.server.channel, "o-7", "order 7").await;
    let mut client = CoordinatorClient::new(shop.server.channel.clone());
    let report = |request_id: &str, gsn: &str, branch: &str, node: &str| pb::ReportStateRequest {
        request_id: request_id.into(),
        gsn: gsn.into(),
        branch_id: branch.into(),
        reporter_node_id: node.into(),
        outcome: pb::Outcome::Succeeded as i32,
        ..Default::default()
    };
    let err = client
        .report_state(report("a", "c1-0000000000000999", "reserve", "inventory"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .report_state(report("b", &gsn, "ship", "shipping"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("not been triggered"),
        "{}",
        err.message()
    );
    let err = client
        .report_state(report("c", &gsn, "nope", "shipping"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .report_state(report("d", &gsn, "reserve", "payment"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "payment cannot report inventory's step"
    );
    // A step has no caller, so the refusal names its node alone.
    assert!(
        err.message().contains("it belongs to node \"inventory\"")
            && !err.message().contains("caller"),
        "{}",
        err.message()
    );
    let mut missing_outcome = report("e", &gsn, "reserve", "inventory");
    missing_outcome.outcome = 0;
    assert_eq!(
        client
            .report_state(missing_outcome)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_past_its_deadline_is_reversed() {
    let shop = shop(Duration::from_secs(30)).await;
    shop.payment
        .node
        .script("charge", vec![Script::SucceedSilently("PAID")]);
    let gsn = CoordinatorClient::new(shop.server.channel.clone())
        .start_saga(pb::StartSagaRequest {
            request_id: "o-8".into(),
            business_type: "order".into(),
            mode: pb::SagaMode::Orchestrated as i32,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gsn;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    assert_eq!(saga.reason, "the saga's deadline passed");
    assert_eq!(shop.inventory.node.reversals_of(&gsn, "reserve"), 1);
    assert_eq!(shop.payment.node.reversals_of(&gsn, "charge"), 1);
}

fn millis(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_failing_with_a_retryable_code_twice_then_succeeding_completes_the_saga() {
    let shop = shop(Duration::from_secs(10)).await;
    put_retry_config(&shop.server.channel, "retry-1", &["UNAVAILABLE"]).await;
    shop.payment.node.script(
        "charge",
        vec![
            Script::Fail("UNAVAILABLE"),
            Script::Fail("UNAVAILABLE"),
            Script::Succeed("PAID", vec![]),
        ],
    );
    let gsn = start_order(&shop.server.channel, "o-9", "order 9").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    let executes = shop
        .payment
        .node
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k)| *k == "execute")
        .count();
    assert_eq!(
        executes, 3,
        "two failed attempts and the one that took effect, each its own command"
    );
    assert_eq!(shop.payment.node.executions_of(&gsn, "charge"), 1);
    let saga = get(&shop.server.channel, &gsn).await;
    assert_eq!(branch(&saga, "charge").attempts, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_failing_with_a_code_that_is_not_retryable_is_reversed_at_once_until_the_config_changes()
 {
    let shop = shop(Duration::from_secs(10)).await;
    put_retry_config(&shop.server.channel, "retry-1", &["UNAVAILABLE"]).await;
    shop.payment
        .node
        .script("charge", vec![Script::Fail("INSUFFICIENT_FUNDS")]);
    let gsn = start_order(&shop.server.channel, "o-10", "order 10").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    let saga = get(&shop.server.channel, &gsn).await;
    assert_eq!(branch(&saga, "charge").attempts, 1, "not retried");
    assert_eq!(branch(&saga, "charge").error_code, "INSUFFICIENT_FUNDS");

    // The next decision follows the new configuration, without a restart.
    put_retry_config(
        &shop.server.channel,
        "retry-2",
        &["UNAVAILABLE", "INSUFFICIENT_FUNDS"],
    )
    .await;
    shop.payment.node.script(
        "charge",
        vec![
            Script::Fail("INSUFFICIENT_FUNDS"),
            Script::Succeed("PAID", vec![]),
        ],
    );
    shop.inventory
        .node
        .script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    let gsn = start_order(&shop.server.channel, "o-11", "order 11").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
}

/// A node that answers a failure inline and also reports it with ReportState (with and without
/// the command id, under new request ids), and a late repeat of an earlier send's failure:
/// each failure counts once, so the retry policy's whole budget is sent before the step is
/// given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_failure_reports_do_not_spend_the_retry_budget_early() {
    let shop = shop(Duration::from_secs(10)).await;
    let max_retries = 3u32;
    pb::retries_client::RetriesClient::new(shop.server.channel.clone())
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: "retry-dup".into(),
            config: Some(pb::RetryConfig {
                defaults: Some(pb::RetryPolicy {
                    retryable_codes: vec!["UNAVAILABLE".into()],
                    max_retries: Some(max_retries),
                    // Long enough that the repeats below land while the retry waits.
                    min_interval: millis(500),
                    backoff_factor: Some(1.0),
                    max_interval: millis(500),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    shop.payment
        .node
        .script("charge", vec![Script::Fail("UNAVAILABLE"); 10]);
    let gsn = start_order(&shop.server.channel, "o-dup", "order dup").await;
    let mut coordinator = CoordinatorClient::new(shop.server.channel.clone());
    let executes = || -> Vec<String> {
        shop.payment
            .node
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, kind)| *kind == "execute")
            .map(|(id, _)| id.clone())
            .collect()
    };
    let failed = |request_id: String, command_id: String| pb::ReportStateRequest {
        request_id,
        gsn: gsn.clone(),
        branch_id: "charge".into(),
        reporter_node_id: "payment".into(),
        outcome: pb::Outcome::Failed as i32,
        error_code: "UNAVAILABLE".into(),
        command_id,
        ..Default::default()
    };
    for send in 1..=max_retries {
        let seen = eventually(LIMIT, || executes().len() >= send as usize).await;
        assert!(seen, "send {send} of charge arrived");
        let ids = executes();
        let latest = ids[send as usize - 1].clone();
        coordinator
            .report_state(failed(format!("dup-{send}-a"), latest.clone()))
            .await
            .unwrap();
        coordinator
            .report_state(failed(format!("dup-{send}-b"), String::new()))
            .await
            .unwrap();
        if send > 1 {
            // The first send's failure, once more, while a later send is out or waits.
            coordinator
                .report_state(failed(format!("dup-{send}-c"), ids[0].clone()))
                .await
                .unwrap();
        }
    }
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Reversed as i32);
    assert_eq!(
        executes().len(),
        1 + max_retries as usize,
        "the original send and every retry the policy allows, no fewer"
    );
    let saga = get(&shop.server.channel, &gsn).await;
    let charge = branch(&saga, "charge");
    assert_eq!(charge.attempts, 1 + max_retries);
    assert_eq!(charge.next_attempt_at, None);
    assert!(
        charge
            .timeline
            .iter()
            .any(|t| t.what.contains("late or repeated report FAILED")),
        "the repeats are on the timeline: {:?}",
        charge.timeline
    );
}

/// The write that ends a saga removes its pending step timeouts, so they never come due: a
/// finished saga costs no ledger write when its steps' timeouts pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_timeouts_of_a_finished_saga_never_come_due() {
    let timeout = Duration::from_millis(300);
    let shop = shop(timeout).await;
    let gsn = start_order(&shop.server.channel, "o-timers", "order timers").await;
    let saga = wait_terminal(&shop.server.channel, &gsn, LIMIT).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32);
    assert!(
        every_node_told_completed(&shop, &gsn).await,
        "every node is told the saga completed"
    );

    let flushes = || async {
        let channel = &shop.server.channel;
        (
            counter(channel, "ledger_flushes").await,
            counter(channel, "timers_fired").await,
        )
    };
    let before = flushes().await;
    // Well past every step's timeout, and several rounds of the timer loop.
    tokio::time::sleep(timeout * 4).await;
    assert_eq!(
        flushes().await,
        before,
        "a timer of the finished saga came due and was written"
    );
}
