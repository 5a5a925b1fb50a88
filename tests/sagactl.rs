//! sagactl, the operator CLI, against a real sagad: the README's sagactl lines.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::process::Command;

use common::TestServer;

fn sagactl(addr: &str, args: &[&str]) -> String {
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

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_starts_shows_and_lists_sagas() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let start = [
        "start",
        "--business-type",
        "order",
        "--request-id",
        "order-1002",
        "--payload",
        r#"{"order":1002}"#,
        "--label",
        "tenant=acme",
    ];
    let gsn = sagactl(&addr, &start).trim().to_owned();
    assert_eq!(gsn, "c1-0000000000000001");
    assert!(
        sagactl(&addr, &start).contains("replayed"),
        "a repeat says it was replayed"
    );

    let shown = sagactl(&addr, &["show", &gsn]);
    assert!(
        shown.contains("RUNNING") && shown.contains("tenant=acme") && shown.contains("order-1002"),
        "{shown}"
    );
    let listed = sagactl(&addr, &["list", "--state", "running"]);
    assert!(listed.contains(&gsn), "{listed}");
    assert!(sagactl(&addr, &["health"]).contains("Serving"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sagactl_reports_errors_in_one_line_and_fails() {
    let server = TestServer::start().await;
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args([
            "--addr",
            &format!("http://{}", server.addr),
            "show",
            "c1-0000000000000404",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("sagactl: NotFound"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_strategies_are_accepted_as_written() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    for file in [
        "examples/strategies/order.toml",
        "examples/strategies/stock.toml",
    ] {
        let path = common::repo_path(file);
        let out = sagactl(&addr, &["strategy", "put", path.to_str().unwrap()]);
        assert!(out.contains("version 1"), "{file}: {out}");
    }
}

/// ListSagas ends a page after examining 10,000 sagas, matches or not, and hands a token for
/// the next; sagactl follows the tokens, so an old match behind many newer sagas is shown.
#[tokio::test(flavor = "multi_thread")]
async fn sagactl_list_follows_pages_past_ten_thousand_newer_sagas_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = sagad::config::Config::with_data(dir.path().join("ledger"));
    config.durability = sagad::store::Durability::Relaxed;
    let server =
        TestServer::start_with(config, std::sync::Arc::new(sagad::clock::SystemClock)).await;
    let old = server
        .coordinator()
        .start_saga(common::start_request("rare-1", "rare"))
        .await
        .unwrap()
        .into_inner()
        .gsn;
    let newer: Vec<_> = (0..16)
        .map(|worker| {
            let mut coordinator = server.coordinator();
            tokio::spawn(async move {
                for n in (worker..10_050).step_by(16) {
                    coordinator
                        .start_saga(common::start_request(&format!("order-{n}"), "order"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for worker in newer {
        worker.await.unwrap();
    }
    let addr = server.addr.to_string();
    let listed = sagactl(&addr, &["list", "--business-type", "rare"]);
    assert!(listed.contains(&old), "{listed}");
    assert!(!listed.contains("more"), "the list ended: {listed}");

    let listed = sagactl(&addr, &["list", "--limit", "600"]);
    assert_eq!(
        listed.lines().filter(|l| l.contains("c1-")).count(),
        600,
        "more than one page of 500: {listed}"
    );
    assert!(listed.contains("stopped at --limit 600"), "{listed}");
}

/// `sagactl list | head -1`: the reader goes away, and sagactl stops quietly instead of
/// panicking on the closed pipe.
#[tokio::test(flavor = "multi_thread")]
async fn sagactl_stops_quietly_when_its_output_pipe_closes() {
    let server = TestServer::start().await;
    server
        .coordinator()
        .start_saga(common::start_request("piped-1", "order"))
        .await
        .unwrap();
    for args in [
        &["list"][..],
        &["stuck"],
        &["counters"],
        &["strategy", "list"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["--addr", &server.addr.to_string()])
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.stderr.is_empty(), "{args:?}");
    }
}
