//! Test harness: a real sagad on 127.0.0.1:0 over a temp dir, in this process (`TestServer`)
//! or as the real binary (`SagadProcess`), and clients connected to it.
#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod orders;
pub mod participant;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sagad::clock::{ManualClock, SharedClock, SystemClock};
use sagad::config::Config;
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::idempotency_client::IdempotencyClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// The fields an INVALID_ARGUMENT names in its BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// An INVALID_ARGUMENT that names `field` alone and says the limit.
pub fn assert_refused(err: &tonic::Status, field: &str, limit: &str) {
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{field}: {}",
        err.message()
    );
    assert_eq!(violated_fields(err), vec![field.to_owned()]);
    assert!(err.message().contains(limit), "{field}: {}", err.message());
}

/// An engine over `store`, driven by the test's clock, with coordinator id "c1", a fixed
/// jitter, and the idempotency retention given (sagad's default when `None`).
pub fn engine_on(
    store: &sagad::store::Store,
    clock: Arc<ManualClock>,
    idempotency_retention: Option<Duration>,
) -> sagad::engine::Engine {
    let defaults = sagad::engine::Settings::new(
        sagad::domain::ids::CoordinatorId::parse("c1").expect("coordinator id"),
    );
    sagad::engine::Engine::new(
        store.clone(),
        clock,
        Arc::new(sagad::random::FixedRandom(0.5)),
        sagad::engine::Settings {
            idempotency_retention: idempotency_retention.unwrap_or(defaults.idempotency_retention),
            ..defaults
        },
    )
}

/// Starts `start` (a registered-outcall saga) on `engine`, registers one outcall from `shop` to
/// `payment` (charge, reversed by refund) carrying `payload`, and reports it SUCCEEDED; returns
/// the GSN and the outcall's branch id. Request ids follow `start.request_id`.
pub async fn outcall_saga_on(
    engine: &sagad::engine::Engine,
    start: sagad::domain::saga::StartRequest,
    payload: Vec<u8>,
) -> (String, String) {
    let request_id = start.request_id.clone();
    let (_, gsn) = engine
        .start_saga(start, Vec::new(), |saga| (Vec::new(), saga.gsn.to_string()))
        .await
        .expect("saga started");
    let gsn = gsn.expect("a new saga");
    engine
        .register_outcall(
            sagad::engine::OutcallInput {
                request_id: format!("{request_id}-outcall"),
                gsn: gsn.clone(),
                caller_node_id: "shop".into(),
                callee_node_id: "payment".into(),
                forward_action: "charge".into(),
                reversal_action: "refund".into(),
                order: 1,
                payload,
                content_type: String::new(),
            },
            Vec::new(),
            |_, _| Vec::new(),
        )
        .await
        .expect("outcall registered");
    let branch_id = "1.payment".to_owned();
    engine
        .report_state(
            sagad::engine::ReportInput {
                request_id: format!("{request_id}-report"),
                gsn: gsn.clone(),
                branch_id: branch_id.clone(),
                reporter_node_id: "shop".into(),
                report: sagad::domain::branch::Report {
                    outcome: sagad::domain::branch::Outcome::Succeeded,
                    status: None,
                    error_code: String::new(),
                    message: String::new(),
                    attempt: None,
                },
                command_id: String::new(),
            },
            Vec::new(),
            |_, _| Vec::new(),
        )
        .await
        .expect("outcall reported");
    (gsn, branch_id)
}

/// How many timers of `store` are still due after waiting up to `limit` for none to be.
pub async fn timers_due_after(store: &sagad::store::Store, limit: Duration) -> usize {
    let due = || store.read(|tx| tx.scan_due_until(u64::MAX).count());
    for _ in 0..(limit.as_millis() / 20) {
        if due().await.expect("read the due index") == 0 {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    due().await.expect("read the due index")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), sagad::app::Error>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::with_data(dir.path().join("ledger"));
        let mut server = TestServer::start_with(config, Arc::new(SystemClock)).await;
        server._dir = Some(dir);
        server
    }

    pub async fn start_with_clock(clock: Arc<ManualClock>) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::with_data(dir.path().join("ledger"));
        let mut server = TestServer::start_with(config, clock).await;
        server._dir = Some(dir);
        server
    }

    pub async fn start_with(config: Config, clock: SharedClock) -> TestServer {
        // Logs show in a failing test's output only (SAGAD_TEST_LOG=debug for more).
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new("sagad=debug"))
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let random = Arc::new(sagad::random::SeededRandom::new(7));
        let task = tokio::spawn(sagad::app::serve_with(
            listener,
            config,
            clock,
            random,
            async {
                let _ = stopped.await;
            },
        ));
        let channel = connect(addr).await;
        TestServer {
            addr,
            channel,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    pub fn coordinator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel.clone())
    }

    pub fn idempotency(&self) -> IdempotencyClient<Channel> {
        IdempotencyClient::new(self.channel.clone())
    }

    /// Graceful shutdown, as SIGTERM does it; returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), sagad::app::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    for _ in 0..100 {
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sagad did not accept connections on {addr}");
}

/// The retry configuration GetRetryConfig shows now.
pub async fn shown_retry_config(channel: &tonic::transport::Channel) -> pb::RetryConfig {
    pb::retries_client::RetriesClient::new(channel.clone())
        .get_retry_config(pb::GetRetryConfigRequest {})
        .await
        .expect("GetRetryConfig")
        .into_inner()
        .config
        .expect("a configuration")
}

pub fn start_request(request_id: &str, business_type: &str) -> pb::StartSagaRequest {
    pb::StartSagaRequest {
        request_id: request_id.to_owned(),
        business_type: business_type.to_owned(),
        mode: pb::SagaMode::RegisteredOutcalls as i32,
        payload: br#"{"order":42}"#.to_vec(),
        content_type: "application/json".to_owned(),
        labels: [("tenant".to_owned(), "acme".to_owned())].into(),
        deadline: None,
        timeout: None,
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real sagad binary, started on its own port and data folder.
pub struct SagadProcess {
    pub addr: SocketAddr,
    pub child: Child,
}

impl SagadProcess {
    pub fn spawn(data: &Path, extra: &[&str]) -> SagadProcess {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = sagad_command(data, &addr.to_string(), extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sagad");
        SagadProcess { addr, child }
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SagadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sagad_command(data: &Path, listen: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sagad"));
    command
        .arg("--listen")
        .arg(listen)
        .arg("--data")
        .arg(data)
        .args(extra)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// Waits until sagad's health service says SERVING.
pub async fn wait_until_serving(addr: SocketAddr) -> Channel {
    let channel = connect(addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for _ in 0..100 {
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| {
                r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            });
        if serving {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sagad on {addr} never became SERVING");
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A TCP proxy in front of a server that can go silent without closing anything, as a
/// connection does when its peer's host is lost or a NAT entry on the way is dropped.
pub struct SilenceableProxy {
    pub addr: SocketAddr,
    silent: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl SilenceableProxy {
    pub async fn start(target: SocketAddr) -> SilenceableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = silent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, flag.clone()));
                tokio::spawn(forward(server_read, client_write, flag.clone()));
            }
        });
        SilenceableProxy { addr, silent, task }
    }

    /// From now on no byte passes either way, and no connection is closed.
    pub fn go_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SilenceableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either closes; once `silent`, holds both open and passes
/// nothing more.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(std::sync::atomic::Ordering::SeqCst) {
            let _held = (from, to);
            return std::future::pending().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A Subscribe stream held for `node` on `channel`, as a node that cannot be dialled holds one.
pub async fn hold_stream(channel: &Channel, node: &str) -> tonic::Streaming<pb::Command> {
    CoordinatorClient::new(channel.clone())
        .subscribe(pb::SubscribeRequest {
            node_id: node.into(),
        })
        .await
        .expect("Subscribe")
        .into_inner()
}

/// The next command sagad sends on `stream`, within `limit`.
pub async fn next_command(
    stream: &mut tonic::Streaming<pb::Command>,
    limit: Duration,
) -> pb::Command {
    tokio::time::timeout(limit, stream.message())
        .await
        .expect("a command within the limit")
        .expect("a command, not an error")
        .expect("the stream is open")
}
