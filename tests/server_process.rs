//! The sagad binary as an operator meets it: exit codes and one-line reasons when it cannot
//! start or its ledger fails, and a graceful drain on SIGTERM.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SagadProcess, sagad_command, start_request, wait_until_serving};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;

fn run_to_exit(command: &mut Command) -> (i32, Vec<String>) {
    let output = command.stderr(Stdio::piped()).output().expect("run sagad");
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code().unwrap_or(-1),
        stderr.lines().map(str::to_owned).collect(),
    )
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (code, lines) = run_to_exit(&mut sagad_command(
        dir.path(),
        "127.0.0.1:0",
        &["--durability", "fast"],
    ));
    assert_eq!(code, 64);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("durability") && lines[0].contains("durable or relaxed"),
        "{lines:?}"
    );
}

#[cfg(unix)]
#[test]
fn a_variable_that_is_not_utf8_exits_64_with_one_line_naming_it() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, lines) = run_to_exit(
        sagad_command(dir.path(), "127.0.0.1:0", &[])
            .env("SAGAD_LOG_FORMAT", std::ffi::OsStr::from_bytes(b"js\xffon")),
    );
    assert_eq!(code, 64);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("SAGAD_LOG_FORMAT") && lines[0].contains("UTF-8"),
        "{lines:?}"
    );
}

#[test]
fn a_saga_retention_not_longer_than_the_idempotency_retention_exits_64_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let (code, lines) = run_to_exit(&mut sagad_command(
        dir.path(),
        "127.0.0.1:0",
        &["--saga-retention", "30d", "--idempotency-retention", "0"],
    ));
    assert_eq!(code, 64);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("saga-retention") && lines[0].contains("idempotency-retention"),
        "{lines:?}"
    );
}

#[test]
fn a_port_in_use_exits_non_zero_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, lines) = run_to_exit(&mut sagad_command(dir.path(), &addr, &[]));
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&addr), "{lines:?}");
}

#[tokio::test]
async fn a_data_folder_in_use_by_another_sagad_exits_non_zero_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let first = SagadProcess::spawn(&data, &[]);
    wait_until_serving(first.addr).await;
    let (code, lines) = run_to_exit(&mut sagad_command(&data, "127.0.0.1:0", &[]));
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("locked") && lines[0].contains(&data.display().to_string()),
        "{lines:?}"
    );
}

#[test]
fn a_data_folder_that_cannot_be_created_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let (code, lines) = run_to_exit(&mut sagad_command(&file.join("ledger"), "127.0.0.1:0", &[]));
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("a-file"), "{lines:?}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_the_ledger_keeps_what_was_answered() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let mut process = SagadProcess::spawn(&data, &["--shutdown-grace", "5s"]);
    let channel = wait_until_serving(process.addr).await;
    let gsn = CoordinatorClient::new(channel)
        .start_saga(start_request("before-term", "order"))
        .await
        .unwrap()
        .into_inner()
        .gsn;

    let pid = process.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut exit = None;
    for _ in 0..100 {
        if let Some(status) = process.child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        exit.expect("sagad exited within 5 s of SIGTERM").code(),
        Some(0)
    );

    let restarted = SagadProcess::spawn(&data, &[]);
    let channel = wait_until_serving(restarted.addr).await;
    let saga = CoordinatorClient::new(channel)
        .get_saga(pb::GetSagaRequest { gsn })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.request_id, "before-term");
}

/// Sends SIGTERM and waits up to `within` for the exit; returns the exit code and how long
/// it took.
#[allow(
    clippy::disallowed_methods,
    reason = "times a real process from outside; sagad's clock is not involved"
)]
async fn terminate(process: &mut SagadProcess, within: Duration) -> (Option<i32>, Duration) {
    let pid = process.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let sent = Instant::now();
    while sent.elapsed() < within {
        if let Some(status) = process.child.try_wait().unwrap() {
            return (status.code(), sent.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("sagad did not exit within {within:?} of SIGTERM");
}

/// A subscribed participant and a watcher of a running saga hold streams that end only when
/// they go away or the saga ends; the graceful drain waits for every open stream, so without
/// ending them first every shutdown took the whole grace period.
#[tokio::test]
async fn sigterm_with_open_subscribe_and_watch_streams_exits_promptly_ending_them_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let mut process = SagadProcess::spawn(&data, &["--shutdown-grace", "20s"]);
    let channel = wait_until_serving(process.addr).await;
    let mut coordinator = CoordinatorClient::new(channel);
    let gsn = coordinator
        .start_saga(start_request("watched", "order"))
        .await
        .unwrap()
        .into_inner()
        .gsn;
    let mut commands = coordinator
        .subscribe(pb::SubscribeRequest {
            node_id: "inventory".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut changes = coordinator
        .watch_saga(pb::WatchSagaRequest { gsn })
        .await
        .unwrap()
        .into_inner();
    let first = changes.message().await.unwrap().unwrap();
    assert_eq!(first.saga.unwrap().state, pb::SagaState::Running as i32);

    let (code, took) = terminate(&mut process, Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM with a 20 s grace"
    );
    for (name, ended) in [
        ("Subscribe", commands.message().await.map(|_| ())),
        ("WatchSaga", changes.message().await.map(|_| ())),
    ] {
        let status = ended.expect_err(name);
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{name}: {status:?}"
        );
    }
}

/// A ledger that cannot be made durable stops sagad with exit 74 and a line naming the cause, so
/// that a supervisor restarts it and recovery works from what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_cannot_be_made_durable_exits_74_with_a_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = sagad_command(&data, &addr.to_string(), &["--shutdown-grace", "1s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let channel = wait_until_serving(addr).await;
    // Every durable flush lists the blob folder: without it, the next one fails.
    std::fs::remove_dir_all(data.join("blobs")).unwrap();
    let refused = CoordinatorClient::new(channel)
        .start_saga(start_request("after-fault", "order"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let mut exit = None;
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(exit) = exit else {
        let _ = child.kill();
        panic!("sagad did not exit within 10 s of the fault");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(exit.code(), Some(74), "{stderr}");
    assert!(
        stderr.lines().any(|line| {
            line.starts_with("sagad: the ledger could not be made durable")
                && line.contains("restart")
        }),
        "{stderr}"
    );
}

/// The write that stores the `--node` endpoints is the first of a start, so the first to meet
/// a ledger that cannot be made durable; it exited 1, which a supervisor reads as a bug rather
/// than "restart me".
#[test]
fn a_fatal_fault_while_registering_configured_nodes_exits_74() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    std::fs::create_dir(&data).unwrap();
    // sled opens the ledger with a file where its blob folder goes, and every durable flush
    // lists that folder: the first write's flush fails.
    std::fs::write(data.join("blobs"), b"not a folder").unwrap();
    let (code, lines) = run_to_exit(&mut sagad_command(
        &data,
        "127.0.0.1:0",
        &["--node", "inventory=http://127.0.0.1:1"],
    ));
    assert_eq!(code, 74, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("sagad: the ledger could not be made durable")),
        "{lines:?}"
    );
}

/// A drain waits up to --shutdown-grace for calls still in flight; an operator who signals
/// again wants sagad stopped now, not after the grace. The second SIGTERM was ignored.
#[tokio::test]
async fn a_second_sigterm_during_the_drain_stops_sagad_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ledger");
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = sagad_command(&data, &addr.to_string(), &["--shutdown-grace", "1h"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (line_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let _ = wait_until_serving(addr).await;

    // A call whose request never ends holds the drain for the whole grace.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping_pong = connection.ping_pong().unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/sagad.v1.Coordinator/GetSaga"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (_response, _unfinished_body) = client.send_request(request, false).unwrap();
    // Frames are handled in order: once the PING is answered, sagad holds the call.
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();

    let signal = |child: &std::process::Child| {
        assert!(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let seen = |needle: &str, lines: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>| {
        for _ in 0..100 {
            if seen.iter().any(|l| l.contains(needle)) {
                return;
            }
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(50)) {
                seen.push(line);
            }
        }
        panic!("no line with {needle:?} in {seen:?}");
    };
    let mut logged = Vec::new();
    signal(&child);
    seen("draining in-flight requests", &lines, &mut logged);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the call in flight holds the drain"
    );

    signal(&child);
    let mut exit = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(exit) = exit else {
        let _ = child.kill();
        panic!("sagad did not exit within 2 s of a second SIGTERM, with a 1 h grace");
    };
    assert_eq!(exit.code(), Some(143), "128 + SIGTERM");
    seen("second signal: stopping now", &lines, &mut logged);
}
