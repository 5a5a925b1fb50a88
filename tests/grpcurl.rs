//! The operator's view: the real grpcurl (v1.8.6, reflection v1alpha only) against a real sagad,
//! and the README's quick start run exactly as written there.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;

use common::{TestServer, repo_path};

/// The first use installs grpcurl into .tools/; do it once, before tests run it in parallel.
fn grpcurl_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let status = Command::new(repo_path("scripts/grpcurl"))
            .arg("-version")
            .output()
            .expect("run scripts/grpcurl");
        assert!(
            status.status.success(),
            "scripts/grpcurl could not install grpcurl: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    });
}

/// Runs grpcurl; returns (success, stdout, stderr).
fn grpcurl(args: &[&str]) -> (bool, String, String) {
    grpcurl_ready();
    let output = Command::new(repo_path("scripts/grpcurl"))
        .args(args)
        .output()
        .expect("run grpcurl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = grpcurl(args);
    assert!(success, "grpcurl {args:?} failed: {stderr}");
    stdout
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_and_describes_every_service() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let listed = ok(&["-plaintext", &addr, "list"]);
    for service in [
        "sagad.v1.Coordinator",
        "sagad.v1.Idempotency",
        "sagad.v1.Retries",
        "sagad.v1.Strategies",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} missing from:\n{listed}"
        );
    }
    let described = ok(&["-plaintext", &addr, "describe", "sagad.v1.Coordinator"]);
    assert!(described.contains("rpc StartSaga"), "{described}");
    let message = ok(&["-plaintext", &addr, "describe", "sagad.v1.StartSagaRequest"]);
    assert!(
        message.contains("request_id") && message.contains(".sagad.v1.SagaMode mode"),
        "{message}"
    );
    let health = ok(&["-plaintext", &addr, "describe", "grpc.health.v1.Health"]);
    assert!(health.contains("rpc Check"), "{health}");
    // Reflection serves the participant contract too, so nodes can be written from it.
    let participant = ok(&["-plaintext", &addr, "describe", "sagad.v1.Participant"]);
    assert!(participant.contains("rpc Execute"), "{participant}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_starts_a_saga_from_a_json_body_once_per_request_id() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let body = r#"{"request_id":"grpcurl-1","business_type":"order","mode":"SAGA_MODE_REGISTERED_OUTCALLS","payload":"eyJvcmRlciI6NDJ9","content_type":"application/json","labels":{"tenant":"acme"},"timeout":"300s"}"#;
    let first = json(&ok(&[
        "-plaintext",
        "-d",
        body,
        &addr,
        "sagad.v1.Coordinator/StartSaga",
    ]));
    let second = json(&ok(&[
        "-plaintext",
        "-d",
        body,
        &addr,
        "sagad.v1.Coordinator/StartSaga",
    ]));
    assert_eq!(first["gsn"], second["gsn"]);
    assert_eq!(first["saga"]["state"], "SAGA_STATE_RUNNING");
    assert_eq!(first["saga"]["payload"], "eyJvcmRlciI6NDJ9");

    let gsn = first["gsn"].as_str().unwrap();
    let got = json(&ok(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"gsn":"{gsn}"}}"#),
        &addr,
        "sagad.v1.Coordinator/GetSaga",
    ]));
    assert_eq!(got["saga"]["labels"]["tenant"], "acme");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_health_check_says_serving() {
    let server = TestServer::start().await;
    let out = json(&ok(&[
        "-plaintext",
        &server.addr.to_string(),
        "grpc.health.v1.Health/Check",
    ]));
    assert_eq!(out["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_shows_the_error_code_and_what_to_fix() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let (success, _, stderr) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"gsn":"c1-0000000000000042"}"#,
        &addr,
        "sagad.v1.Coordinator/GetSaga",
    ]);
    assert!(!success);
    assert!(
        stderr.contains("NotFound") && stderr.contains("c1-0000000000000042"),
        "{stderr}"
    );
    let (success, _, stderr) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"request_id":"x","business_type":"order"}"#,
        &addr,
        "sagad.v1.Coordinator/StartSaga",
    ]);
    assert!(!success);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("SAGA_MODE_REGISTERED_OUTCALLS"),
        "{stderr}"
    );
}

/// The quick start block of README.md, each `scripts/grpcurl` line run as written (only the
/// address is swapped for the test server's). A README that drifts from the product fails here.
#[tokio::test(flavor = "multi_thread")]
async fn readme_quick_start_works_as_pasted() {
    let server = TestServer::start().await;
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let block = readme
        .split("<!-- quick-start -->")
        .nth(1)
        .expect("README.md has a <!-- quick-start --> section");
    let commands: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("scripts/grpcurl "))
        .collect();
    assert!(
        commands.len() >= 4,
        "the quick start has its grpcurl commands: {commands:?}"
    );
    for line in commands {
        let line = line.replace("127.0.0.1:50051", &server.addr.to_string());
        let output = Command::new("bash")
            .arg("-c")
            .arg(&line)
            .current_dir(repo_path(""))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "README line failed: {line}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let _: SocketAddr = server.addr;
}
