//! The order strategy the engine tests run, and helpers to drive and watch its sagas.

use std::time::Duration;

use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::strategies_client::StrategiesClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::TestServer;
use super::participant::{Node, PushParticipant, Script};

fn step(id: &str, node: &str, forward: &str, reversal: &str, timeout: Duration) -> pb::Step {
    pb::Step {
        id: id.into(),
        node_id: node.into(),
        forward_action: forward.into(),
        reversal_action: reversal.into(),
        timeout: Some(prost_types::Duration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
    }
}

fn status(step_id: &str, status: &str) -> pb::StepStatus {
    pb::StepStatus {
        step_id: step_id.into(),
        status: status.into(),
    }
}

/// reserve (inventory) and charge (payment) at once; ship (shipping) once both RESERVED and
/// PAID; SHIPPED ends it; DECLINED from charge reverses reserve; result_code=E12 is abnormal.
pub fn order_strategy(step_timeout: Duration) -> pb::Strategy {
    pb::Strategy {
        business_type: "order".into(),
        description: "reserve and charge, then ship".into(),
        steps: vec![
            step("reserve", "inventory", "reserve", "release", step_timeout),
            step("charge", "payment", "charge", "refund", step_timeout),
            step("ship", "shipping", "ship", "recall", step_timeout),
        ],
        first_set: vec!["reserve".into(), "charge".into()],
        rules: vec![pb::Rule {
            when: vec![status("reserve", "RESERVED"), status("charge", "PAID")],
            trigger: vec!["ship".into()],
        }],
        end_statuses: vec![status("ship", "SHIPPED")],
        abnormal_statuses: vec![status("charge", "DECLINED")],
        status_mappings: vec![pb::StatusMapping {
            step_id: String::new(),
            parameter: "result_code".into(),
            value: "E12".into(),
            meaning: pb::StatusMeaning::Abnormal as i32,
        }],
        exception_scopes: vec![pb::ExceptionScope {
            step_id: "charge".into(),
            reverse: vec!["reserve".into()],
        }],
        ..Default::default()
    }
}

pub async fn put_strategy(channel: &Channel, strategy: pb::Strategy) {
    StrategiesClient::new(channel.clone())
        .put_strategy(pb::PutStrategyRequest {
            request_id: format!("put-{}", strategy.business_type),
            strategy: Some(strategy),
        })
        .await
        .expect("put strategy");
}

pub async fn register_node(channel: &Channel, node_id: &str, endpoint: &str) {
    CoordinatorClient::new(channel.clone())
        .register_node(pb::RegisterNodeRequest {
            request_id: format!("node-{node_id}-{endpoint}"),
            node_id: node_id.into(),
            endpoint: endpoint.into(),
        })
        .await
        .expect("register node");
}

pub async fn start_order(channel: &Channel, request_id: &str, payload: &str) -> String {
    CoordinatorClient::new(channel.clone())
        .start_saga(pb::StartSagaRequest {
            request_id: request_id.into(),
            business_type: "order".into(),
            mode: pb::SagaMode::Orchestrated as i32,
            payload: payload.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            ..Default::default()
        })
        .await
        .expect("start saga")
        .into_inner()
        .gsn
}

/// Watches the saga until it is terminal (or `limit` passes) and returns its last state.
pub async fn wait_terminal(channel: &Channel, gsn: &str, limit: Duration) -> pb::Saga {
    let mut client = CoordinatorClient::new(channel.clone());
    let watched = async {
        let mut stream = client
            .watch_saga(pb::WatchSagaRequest { gsn: gsn.into() })
            .await
            .expect("watch")
            .into_inner();
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = item.expect("watch item").saga;
        }
        last.expect("at least one state")
    };
    match tokio::time::timeout(limit, watched).await {
        Ok(saga) => saga,
        Err(_) => {
            let saga = get(channel, gsn).await;
            panic!("saga {gsn} not terminal after {limit:?}: {saga:#?}");
        }
    }
}

pub async fn get(channel: &Channel, gsn: &str) -> pb::Saga {
    CoordinatorClient::new(channel.clone())
        .get_saga(pb::GetSagaRequest { gsn: gsn.into() })
        .await
        .expect("get saga")
        .into_inner()
        .saga
        .expect("saga")
}

/// Polls `check` until it holds, for at most `limit`.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut check: F) -> bool {
    let step = Duration::from_millis(20);
    let rounds = (limit.as_millis() / step.as_millis()).max(1);
    for _ in 0..rounds {
        if check() {
            return true;
        }
        tokio::time::sleep(step).await;
    }
    check()
}

pub fn branch<'a>(saga: &'a pb::Saga, id: &str) -> &'a pb::Branch {
    saga.branches
        .iter()
        .find(|b| b.branch_id == id)
        .unwrap_or_else(|| panic!("no branch {id} in {saga:#?}"))
}

/// A sagad with the order strategy and its three nodes as push participants that answer
/// every action at once: inventory RESERVED, payment PAID, shipping SHIPPED. Tests script a
/// node again for the path they need.
pub struct Shop {
    pub server: TestServer,
    pub inventory: PushParticipant,
    pub payment: PushParticipant,
    pub shipping: PushParticipant,
}

pub async fn shop(step_timeout: Duration) -> Shop {
    let (server, inventory, payment) = shop_without_shipping_endpoint(step_timeout).await;
    let shipping = PushParticipant::start(Node::new("shipping")).await;
    shipping
        .node
        .script("ship", vec![Script::Succeed("SHIPPED", vec![])]);
    register_node(&server.channel, "shipping", &shipping.endpoint()).await;
    Shop {
        server,
        inventory,
        payment,
        shipping,
    }
}

/// The shop with inventory (RESERVED) and payment (PAID) as push participants, and no
/// endpoint for shipping: the test serves it on a Subscribe stream.
pub async fn shop_without_shipping_endpoint(
    step_timeout: Duration,
) -> (TestServer, PushParticipant, PushParticipant) {
    shop_without_shipping_endpoint_on(TestServer::start().await, step_timeout).await
}

/// Scripts one more successful reserve and charge: each scripted answer serves one order.
pub fn one_more_order(inventory: &Node, payment: &Node) {
    inventory.script("reserve", vec![Script::Succeed("RESERVED", vec![])]);
    payment.script("charge", vec![Script::Succeed("PAID", vec![])]);
}

/// `shop_without_shipping_endpoint` on a server started as the test needs.
pub async fn shop_without_shipping_endpoint_on(
    server: TestServer,
    step_timeout: Duration,
) -> (TestServer, PushParticipant, PushParticipant) {
    let inventory = PushParticipant::start(Node::new("inventory")).await;
    let payment = PushParticipant::start(Node::new("payment")).await;
    one_more_order(&inventory.node, &payment.node);
    put_strategy(&server.channel, order_strategy(step_timeout)).await;
    register_node(&server.channel, "inventory", &inventory.endpoint()).await;
    register_node(&server.channel, "payment", &payment.endpoint()).await;
    (server, inventory, payment)
}

/// Makes `codes` retryable for every step, with fast resends (50 ms, then doubling to 200 ms)
/// and at most 3 retries, so retry paths run in test time.
pub async fn put_retry_config(channel: &Channel, request_id: &str, codes: &[&str]) {
    let millis = |ms: i32| {
        Some(prost_types::Duration {
            seconds: 0,
            nanos: ms * 1_000_000,
        })
    };
    pb::retries_client::RetriesClient::new(channel.clone())
        .put_retry_config(pb::PutRetryConfigRequest {
            request_id: request_id.into(),
            config: Some(pb::RetryConfig {
                defaults: Some(pb::RetryPolicy {
                    retryable_codes: codes.iter().map(|c| c.to_string()).collect(),
                    max_retries: Some(3),
                    min_interval: millis(50),
                    backoff_factor: Some(2.0),
                    max_interval: millis(200),
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("put retry config");
}
