//! The Strategies service against a real sagad: strategies put, versioned, read and listed over
//! gRPC, every validation problem reaching the client as a field violation, idempotent puts,
//! and the two ways a person stores one: `sagactl strategy put FILE` and grpcurl with JSON.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;

use common::{TestServer, repo_path};
use sagad::grpc::pb;
use sagad::grpc::pb::strategies_client::StrategiesClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

// ---- Helpers ----

fn client(server: &TestServer) -> StrategiesClient<Channel> {
    StrategiesClient::new(server.channel.clone())
}

fn status(step_id: &str, status: &str) -> pb::StepStatus {
    pb::StepStatus {
        step_id: step_id.into(),
        status: status.into(),
    }
}

fn step(id: &str, node_id: &str, forward: &str, reverse: &str) -> pb::Step {
    pb::Step {
        id: id.into(),
        node_id: node_id.into(),
        forward_action: forward.into(),
        reversal_action: reverse.into(),
        timeout: None,
    }
}

/// The order flow: reserve and charge in parallel, ship once both succeeded.
fn order(business_type: &str) -> pb::Strategy {
    pb::Strategy {
        business_type: business_type.into(),
        version: 0,
        description: "reserve and charge, then ship".into(),
        steps: vec![
            step("reserve", "inventory", "reserve", "release"),
            step("charge", "payment", "charge", "refund"),
            pb::Step {
                timeout: Some(prost_types::Duration {
                    seconds: 120,
                    nanos: 0,
                }),
                ..step("ship", "shipping", "ship", "cancel_shipment")
            },
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
        saga_timeout: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        created_at: None,
    }
}

fn put_request(request_id: &str, strategy: pb::Strategy) -> pb::PutStrategyRequest {
    pb::PutStrategyRequest {
        request_id: request_id.into(),
        strategy: Some(strategy),
    }
}

async fn put(
    client: &mut StrategiesClient<Channel>,
    request_id: &str,
    strategy: pb::Strategy,
) -> pb::Strategy {
    client
        .put_strategy(put_request(request_id, strategy))
        .await
        .unwrap()
        .into_inner()
        .strategy
        .unwrap()
}

async fn get(
    client: &mut StrategiesClient<Channel>,
    business_type: &str,
    version: u64,
) -> Result<pb::Strategy, tonic::Status> {
    client
        .get_strategy(pb::GetStrategyRequest {
            business_type: business_type.into(),
            version,
        })
        .await
        .map(|r| r.into_inner().strategy.unwrap())
}

/// The field violations of an INVALID_ARGUMENT, as (field, description) pairs.
fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no google.rpc.BadRequest in {status:?}"));
    bad_request
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

fn sagactl(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(args)
        .current_dir(repo_path(""))
        .output()
        .unwrap()
}

fn sagactl_ok(addr: &str, args: &[&str]) -> String {
    let output = sagactl(addr, args);
    assert!(
        output.status.success(),
        "sagactl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The first use installs grpcurl into .tools/; do it once, before tests run it in parallel.
fn grpcurl(args: &[&str]) -> (bool, String, String) {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let output = Command::new(repo_path("scripts/grpcurl"))
            .arg("-version")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "scripts/grpcurl could not install grpcurl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
    let output = Command::new(repo_path("scripts/grpcurl"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// ---- Put, get, list ----

#[tokio::test(flavor = "multi_thread")]
async fn a_put_strategy_is_stored_as_version_1_and_read_back_as_stored() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let stored = put(&mut client, "put-1", order("order")).await;
    assert_eq!(stored.version, 1);
    assert!(stored.created_at.is_some_and(|t| t.seconds > 0));
    // The default step timeout is filled in, so a reader sees what a saga will wait.
    assert_eq!(
        stored.steps[0].timeout,
        Some(prost_types::Duration {
            seconds: 30,
            nanos: 0
        })
    );
    let sent = order("order");
    assert_eq!(stored.steps[2].timeout, sent.steps[2].timeout);
    assert_eq!(stored.rules, sent.rules);
    assert_eq!(stored.first_set, sent.first_set);
    assert_eq!(stored.status_mappings, sent.status_mappings);
    assert_eq!(stored.exception_scopes, sent.exception_scopes);
    assert_eq!(stored.saga_timeout, sent.saga_timeout);

    assert_eq!(get(&mut client, "order", 0).await.unwrap(), stored);
    assert_eq!(get(&mut client, "order", 1).await.unwrap(), stored);

    let listed = client
        .list_strategies(pb::ListStrategiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.strategies, vec![stored]);
    assert_eq!(listed.next_page_token, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_put_is_a_new_version_and_old_versions_stay_readable() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let first = put(&mut client, "v1", order("order")).await;
    let mut changed = order("order");
    changed.description = "now with a longer shipping window".into();
    changed.steps[2].timeout = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    let second = put(&mut client, "v2", changed.clone()).await;
    let third = put(&mut client, "v3", order("order")).await;
    assert_eq!((first.version, second.version, third.version), (1, 2, 3));

    // A saga started on version 1 keeps reading version 1.
    assert_eq!(get(&mut client, "order", 1).await.unwrap(), first);
    let old = get(&mut client, "order", 2).await.unwrap();
    assert_eq!(old.description, changed.description);
    assert_eq!(old.steps[2].timeout, changed.steps[2].timeout);
    assert_eq!(get(&mut client, "order", 0).await.unwrap().version, 3);

    // Versions count per business type.
    assert_eq!(
        put(&mut client, "other-1", order("refund")).await.version,
        1
    );
    let listed = client
        .list_strategies(pb::ListStrategiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let latest: Vec<(String, u64)> = listed
        .strategies
        .iter()
        .map(|s| (s.business_type.clone(), s.version))
        .collect();
    assert_eq!(latest, vec![("order".into(), 3), ("refund".into(), 1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_puts_of_one_business_type_get_distinct_versions() {
    let server = TestServer::start().await;
    let puts = (0..16).map(|i| {
        let mut client = client(&server);
        tokio::spawn(async move { put(&mut client, &format!("race-{i}"), order("order")).await })
    });
    let mut versions = BTreeSet::new();
    for handle in puts {
        versions.insert(handle.await.unwrap().version);
    }
    assert_eq!(versions, (1..=16).collect::<BTreeSet<u64>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_business_type_or_version_is_not_found_and_says_how_to_fix_it() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let missing = get(&mut client, "order", 0).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("\"order\"") && missing.message().contains("PutStrategy"),
        "{}",
        missing.message()
    );

    put(&mut client, "v1", order("order")).await;
    let missing = get(&mut client, "order", 7).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("no strategy version 7")
            && missing.message().contains("versions are 1 to 1"),
        "{}",
        missing.message()
    );

    let malformed = get(&mut client, "no spaces allowed", 0).await.unwrap_err();
    let fields = violations(&malformed);
    assert_eq!(fields[0].0, "business_type");
}

#[tokio::test(flavor = "multi_thread")]
async fn strategies_are_listed_by_business_type_in_pages() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    for name in ["e", "c", "a", "d", "b"] {
        put(&mut client, &format!("put-{name}"), order(name)).await;
    }
    put(&mut client, "put-c-2", order("c")).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_strategies(pb::ListStrategiesRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.strategies.len() <= 2);
        seen.extend(
            page.strategies
                .iter()
                .map(|s| (s.business_type.clone(), s.version)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3, "five types in pages of two; no empty last page");
    assert_eq!(
        seen,
        vec![
            ("a".into(), 1),
            ("b".into(), 1),
            ("c".into(), 2),
            ("d".into(), 1),
            ("e".into(), 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_page_token_or_an_oversized_page_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    for token in ["garbage", "s1.61.00000000", "p1n0000000000000001"] {
        let refused = client
            .list_strategies(pb::ListStrategiesRequest {
                page_size: 0,
                page_token: token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&refused)[0].0, "page_token", "{token}");
    }
    let refused = client
        .list_strategies(pb::ListStrategiesRequest {
            page_size: 501,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused)[0].0, "page_size");
}

// ---- Validation at the edge ----

/// One broken strategy and the field violation it must produce.
struct Broken {
    name: &'static str,
    breaks: fn(&mut pb::Strategy),
    field: &'static str,
}

fn broken() -> Vec<Broken> {
    vec![
        Broken {
            name: "empty business type",
            breaks: |s| s.business_type.clear(),
            field: "strategy.business_type",
        },
        Broken {
            name: "no steps",
            breaks: |s| s.steps.clear(),
            field: "strategy.steps",
        },
        Broken {
            name: "duplicate step id",
            breaks: |s| s.steps[1].id = "reserve".into(),
            field: "strategy.steps[1].id",
        },
        Broken {
            name: "bad node id",
            breaks: |s| s.steps[0].node_id = "inventory service".into(),
            field: "strategy.steps[0].node_id",
        },
        Broken {
            name: "empty forward action",
            breaks: |s| s.steps[2].forward_action.clear(),
            field: "strategy.steps[2].forward_action",
        },
        Broken {
            name: "negative step timeout",
            breaks: |s| {
                s.steps[0].timeout = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                })
            },
            field: "strategy.steps[0].timeout",
        },
        Broken {
            name: "zero saga timeout",
            breaks: |s| {
                s.saga_timeout = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                })
            },
            field: "strategy.saga_timeout",
        },
        Broken {
            name: "empty first set",
            breaks: |s| s.first_set.clear(),
            field: "strategy.first_set",
        },
        Broken {
            name: "unknown step in the first set",
            breaks: |s| s.first_set.push("audit".into()),
            field: "strategy.first_set[2]",
        },
        Broken {
            name: "unknown step in a rule",
            breaks: |s| s.rules[0].when[1].step_id = "pay".into(),
            field: "strategy.rules[0].when[1].step_id",
        },
        Broken {
            name: "empty status in a rule",
            breaks: |s| s.rules[0].when[0].status.clear(),
            field: "strategy.rules[0].when[0].status",
        },
        Broken {
            name: "rule with no conditions",
            breaks: |s| {
                s.rules.push(pb::Rule {
                    when: vec![],
                    trigger: vec!["ship".into()],
                })
            },
            field: "strategy.rules[1].when",
        },
        Broken {
            name: "rule that can never fire",
            breaks: |s| {
                s.steps.push(step("audit", "ledger", "audit", ""));
                s.steps.push(step("archive", "ledger", "archive", ""));
                s.rules.push(pb::Rule {
                    when: vec![status("audit", "DONE")],
                    trigger: vec!["archive".into()],
                });
            },
            field: "strategy.rules[1].when[0].step_id",
        },
        Broken {
            name: "step no rule can reach",
            breaks: |s| s.steps.push(step("audit", "ledger", "audit", "")),
            field: "strategy.steps[3].id",
        },
        Broken {
            name: "no way to end",
            breaks: |s| s.end_statuses.clear(),
            field: "strategy.end_statuses",
        },
        Broken {
            name: "unknown step in an end status",
            breaks: |s| s.end_statuses[0].step_id = "deliver".into(),
            field: "strategy.end_statuses[0].step_id",
        },
        Broken {
            name: "unknown step in an abnormal status",
            breaks: |s| s.abnormal_statuses[0].step_id = "pay".into(),
            field: "strategy.abnormal_statuses[0].step_id",
        },
        Broken {
            name: "mapping with an empty parameter",
            breaks: |s| s.status_mappings[0].parameter.clear(),
            field: "strategy.status_mappings[0].parameter",
        },
        Broken {
            name: "mapping with an unspecified meaning",
            breaks: |s| s.status_mappings[0].meaning = pb::StatusMeaning::Unspecified as i32,
            field: "strategy.status_mappings[0].meaning",
        },
        Broken {
            name: "mapping with an unknown meaning number",
            breaks: |s| s.status_mappings[0].meaning = 42,
            field: "strategy.status_mappings[0].meaning",
        },
        Broken {
            name: "unknown step in a mapping",
            breaks: |s| s.status_mappings[0].step_id = "pay".into(),
            field: "strategy.status_mappings[0].step_id",
        },
        Broken {
            name: "unknown step reversed by a scope",
            breaks: |s| s.exception_scopes[0].reverse.push("release".into()),
            field: "strategy.exception_scopes[0].reverse[1]",
        },
        Broken {
            name: "two scopes for one step",
            breaks: |s| {
                s.exception_scopes.push(pb::ExceptionScope {
                    step_id: "charge".into(),
                    reverse: vec![],
                })
            },
            field: "strategy.exception_scopes[1].step_id",
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_validation_error_reaches_the_client_as_a_bad_request_field_violation() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    for (i, case) in broken().into_iter().enumerate() {
        let mut strategy = order("order");
        (case.breaks)(&mut strategy);
        let refused = client
            .put_strategy(put_request(&format!("broken-{i}"), strategy))
            .await
            .unwrap_err();
        let fields = violations(&refused);
        assert!(
            fields.iter().any(|(field, _)| field == case.field),
            "{}: expected a violation of {}, got {fields:#?}",
            case.name,
            case.field
        );
        assert!(
            refused.message().contains(case.field),
            "{}: the message names the field too: {}",
            case.name,
            refused.message()
        );
    }
    // Nothing refused was stored.
    assert_eq!(
        get(&mut client, "order", 0).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_problem_of_one_strategy_is_reported_in_one_answer() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let mut strategy = order("order");
    for case in broken() {
        if matches!(
            case.name,
            "bad node id"
                | "empty forward action"
                | "unknown step in an abnormal status"
                | "mapping with an empty parameter"
                | "zero saga timeout"
        ) {
            (case.breaks)(&mut strategy);
        }
    }
    let refused = client
        .put_strategy(put_request("", strategy))
        .await
        .unwrap_err();
    let fields: BTreeSet<String> = violations(&refused).into_iter().map(|(f, _)| f).collect();
    let expected: BTreeSet<String> = [
        "request_id",
        "strategy.steps[0].node_id",
        "strategy.steps[2].forward_action",
        "strategy.abnormal_statuses[0].step_id",
        "strategy.status_mappings[0].parameter",
        "strategy.saga_timeout",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(fields, expected);
}

/// A Duration the protobuf spec calls invalid has no meaning to take: refused, naming its field,
/// as Retries refuses one, and reported together with every other problem.
#[tokio::test(flavor = "multi_thread")]
async fn a_duration_with_out_of_range_or_mixed_sign_nanos_is_refused_with_its_field() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let mut strategy = order("order");
    strategy.steps[0].timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: -500_000_000,
    });
    strategy.steps[1].timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1_000_000_000,
    });
    strategy.saga_timeout = Some(prost_types::Duration {
        seconds: -5,
        nanos: 1,
    });
    strategy.steps[2].node_id = "bad node".into();
    let refused = client
        .put_strategy(put_request("durations", strategy))
        .await
        .unwrap_err();
    let found = violations(&refused);
    let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "strategy.steps[0].timeout",
            "strategy.steps[1].timeout",
            "strategy.saga_timeout",
            "strategy.steps[2].node_id",
        ],
        "{found:?}"
    );
    assert!(found[0].1.contains("opposite signs"), "{found:?}");
    assert!(found[1].1.contains("999,999,999"), "{found:?}");

    let mut fixed = order("order");
    fixed.steps[0].timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 500_000_000,
    });
    let stored = put(&mut client, "durations", fixed).await;
    assert_eq!(
        stored.steps[0].timeout,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_without_a_strategy_says_it_is_required() {
    let server = TestServer::start().await;
    let refused = client(&server)
        .put_strategy(pb::PutStrategyRequest {
            request_id: "empty".into(),
            strategy: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused)[0].0, "strategy");
}

// ---- Idempotence ----

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_put_replays_the_stored_version_instead_of_storing_another() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let first = client
        .put_strategy(put_request("once", order("order")))
        .await
        .unwrap();
    assert!(!first.metadata().contains_key(sagad::grpc::REPLAYED_HEADER));
    let first = first.into_inner();

    // The same request again, even with the output-only fields filled in as GetStrategy
    // returns them: answered from the ledger, byte for byte.
    let mut again = order("order");
    again.version = 1;
    again.created_at = first.strategy.as_ref().unwrap().created_at;
    let replay = client
        .put_strategy(put_request("once", again))
        .await
        .unwrap();
    assert_eq!(
        replay
            .metadata()
            .get(sagad::grpc::REPLAYED_HEADER)
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(replay.into_inner(), first);
    assert_eq!(get(&mut client, "order", 0).await.unwrap().version, 1);

    let mut different = order("order");
    different.description = "something else".into();
    let reused = client
        .put_strategy(put_request("once", different))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert!(
        reused.message().contains("\"once\""),
        "{}",
        reused.message()
    );
    assert_eq!(get(&mut client, "order", 0).await.unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_put_leaves_its_request_id_free_to_use_once_fixed() {
    let server = TestServer::start().await;
    let mut client = client(&server);
    let mut broken = order("order");
    broken.first_set.clear();
    let refused = client
        .put_strategy(put_request("fix-me", broken))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let stored = put(&mut client, "fix-me", order("order")).await;
    assert_eq!(stored.version, 1);
}

// ---- sagactl ----

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_puts_the_example_order_strategy_once_and_shows_it() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let put = sagactl_ok(
        &addr,
        &["strategy", "put", "examples/strategies/order.toml"],
    );
    assert!(put.contains("stored strategy order version 1"), "{put}");
    assert!(
        put.contains("when reserve RESERVED and charge PAID -> trigger ship"),
        "{put}"
    );

    // Running the same file again is the same request: nothing new is stored.
    let again = sagactl_ok(
        &addr,
        &["strategy", "put", "examples/strategies/order.toml"],
    );
    assert!(
        again.contains("version 1") && again.contains("replayed"),
        "{again}"
    );

    let shown = sagactl_ok(&addr, &["strategy", "get", "order"]);
    for expected in [
        "business type:  order",
        "version:        1",
        "reserve          on inventory",
        "end statuses:   ship SHIPPED",
        "abnormal:       charge DECLINED",
        "result_code=E12 from any step -> ABNORMAL",
        "abnormal from charge reverses reserve",
    ] {
        assert!(
            shown.contains(expected),
            "{expected} missing from:\n{shown}"
        );
    }
    let listed = sagactl_ok(&addr, &["strategy", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("order") && l.contains(" 1 ")),
        "{listed}"
    );

    // What `get --toml` prints is a strategy file: saved and put again under a new request
    // id, it becomes version 2 with the same flow.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("order.toml");
    std::fs::write(
        &saved,
        sagactl_ok(&addr, &["strategy", "get", "order", "--toml"]),
    )
    .unwrap();
    let put = sagactl_ok(
        &addr,
        &[
            "strategy",
            "put",
            saved.to_str().unwrap(),
            "--request-id",
            "edit-1",
        ],
    );
    assert!(put.contains("stored strategy order version 2"), "{put}");
    let mut client = client(&server);
    let (v1, v2) = (
        get(&mut client, "order", 1).await.unwrap(),
        get(&mut client, "order", 2).await.unwrap(),
    );
    assert_eq!(
        pb::Strategy {
            version: 1,
            created_at: None,
            ..v2
        },
        pb::Strategy {
            created_at: None,
            ..v1
        }
    );
    let old = sagactl_ok(&addr, &["strategy", "get", "order", "--version", "1"]);
    assert!(old.contains("version:        1"), "{old}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_lists_every_problem_of_a_refused_file() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "business_type: order\n\
         first_set: [reserve, charge]\n\
         steps:\n\
         \x20 - {id: reserve, node_id: inventory, forward_action: reserve}\n\
         \x20 - {id: ship, node_id: shipping, forward_action: ship}\n",
    )
    .unwrap();
    let output = sagactl(
        &server.addr.to_string(),
        &["strategy", "put", file.to_str().unwrap()],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("sagactl: InvalidArgument"), "{stderr}");
    for expected in [
        "strategy.first_set[1]: names step \"charge\"",
        "strategy.steps[1].id: step \"ship\" can never be triggered",
        "strategy.end_statuses: is empty",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected} missing from:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_says_when_a_strategy_is_missing() {
    let server = TestServer::start().await;
    let output = sagactl(&server.addr.to_string(), &["strategy", "get", "refund"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("sagactl: NotFound") && stderr.contains("strategy put"),
        "{stderr}"
    );
}

// ---- grpcurl ----

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_puts_a_strategy_typed_as_json() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    // What a person types: proto field names, durations as "30s", enums by name.
    let body = r#"{
      "request_id": "grpcurl-order-1",
      "strategy": {
        "business_type": "order",
        "first_set": ["reserve", "charge"],
        "steps": [
          {"id": "reserve", "node_id": "inventory", "forward_action": "reserve", "reversal_action": "release", "timeout": "30s"},
          {"id": "charge", "node_id": "payment", "forward_action": "charge", "reversal_action": "refund"},
          {"id": "ship", "node_id": "shipping", "forward_action": "ship", "timeout": "120s"}
        ],
        "rules": [
          {"when": [{"step_id": "reserve", "status": "RESERVED"}, {"step_id": "charge", "status": "PAID"}], "trigger": ["ship"]}
        ],
        "end_statuses": [{"step_id": "ship", "status": "SHIPPED"}],
        "abnormal_statuses": [{"step_id": "charge", "status": "DECLINED"}],
        "status_mappings": [{"parameter": "result_code", "value": "E12", "meaning": "STATUS_MEANING_ABNORMAL"}],
        "exception_scopes": [{"step_id": "charge", "reverse": ["reserve"]}],
        "saga_timeout": "600s"
      }
    }"#;
    let (success, stdout, stderr) = grpcurl(&[
        "-plaintext",
        "-d",
        body,
        &addr,
        "sagad.v1.Strategies/PutStrategy",
    ]);
    assert!(success, "{stderr}");
    let stored = json(&stdout);
    assert_eq!(stored["strategy"]["version"], "1");
    assert_eq!(stored["strategy"]["steps"][1]["timeout"], "30s");
    assert_eq!(
        stored["strategy"]["statusMappings"][0]["meaning"],
        "STATUS_MEANING_ABNORMAL"
    );

    // Typed again, it is the same request.
    let (success, stdout, _) = grpcurl(&[
        "-plaintext",
        "-d",
        body,
        &addr,
        "sagad.v1.Strategies/PutStrategy",
    ]);
    assert!(success);
    assert_eq!(json(&stdout)["strategy"]["version"], "1");

    let (success, stdout, stderr) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"business_type":"order"}"#,
        &addr,
        "sagad.v1.Strategies/GetStrategy",
    ]);
    assert!(success, "{stderr}");
    assert_eq!(json(&stdout)["strategy"]["rules"][0]["trigger"][0], "ship");

    // A mistake comes back with its field, readable in the terminal.
    let (success, _, stderr) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"request_id":"grpcurl-bad","strategy":{"business_type":"order","steps":[{"id":"a","node_id":"n","forward_action":"go"}],"first_set":["b"]}}"#,
        &addr,
        "sagad.v1.Strategies/PutStrategy",
    ]);
    assert!(!success);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("strategy.first_set[0]"),
        "{stderr}"
    );
}
