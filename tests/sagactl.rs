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

/// sagactl's own output and exit status, whatever they are.
fn run_sagactl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(args)
        .output()
        .unwrap()
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

/// `--addr 127.0.0.1:50051`, without a scheme, is how people write it: it works.
#[tokio::test(flavor = "multi_thread")]
async fn sagactl_takes_an_address_without_a_scheme() {
    let server = TestServer::start().await;
    let output = run_sagactl(&["--addr", &server.addr.to_string(), "health"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An unreachable sagad is named with the reason, not only "transport error".
#[test]
fn sagactl_says_why_it_cannot_reach_sagad() {
    let addr = format!("http://127.0.0.1:{}", common::free_port());
    let output = run_sagactl(&["--addr", &addr, "health"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&addr) && stderr.to_lowercase().contains("refused"),
        "{stderr}"
    );
}

/// Health is for scripts and probes: anything but SERVING is a failure.
#[tokio::test(flavor = "multi_thread")]
async fn sagactl_health_fails_unless_sagad_is_serving() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let output = tokio::task::spawn_blocking(move || {
        run_sagactl(&["--addr", &format!("http://{addr}"), "health"])
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("NotServing"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not serving"));
    server.abort();
}

/// A sagad that takes the connection but does not answer (it binds its port before it opens
/// its ledger) makes sagactl fail after --rpc-timeout instead of hanging.
#[allow(
    clippy::disallowed_methods,
    reason = "times a real process from outside; sagad's clock is not involved"
)]
#[test]
fn sagactl_gives_up_after_its_rpc_timeout_on_a_sagad_that_does_not_answer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let started = std::time::Instant::now();
    let output = run_sagactl(&[
        "--addr",
        &format!("http://{addr}"),
        "--rpc-timeout",
        "1s",
        "list",
    ]);
    assert!(!output.status.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    drop(listener);
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

/// `--limit 0` would read a page and show nothing; every listing refuses it before connecting.
#[test]
fn sagactl_listings_refuse_a_limit_of_zero() {
    for listing in ["list", "attention", "stuck"] {
        let output = run_sagactl(&["--addr", "127.0.0.1:1", listing, "--limit", "0"]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{listing}: clap's usage error"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--limit"), "{listing}: {stderr}");
    }
}
