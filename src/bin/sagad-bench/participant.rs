//! The bench's participant nodes: real Participant gRPC servers on loopback, in this process.
//! Their answers are a pure function of the request (so redeliveries get the same answer
//! without a de-duplication table), and they count every call, so the report can show the
//! RPCs sagad actually made per saga rather than the ones the design says it makes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sagad::grpc::pb;
use sagad::grpc::pb::participant_server::{Participant, ParticipantServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Error;

/// A saga whose payload starts with this is declined by the payment node (the reversal path).
pub const DECLINE_MARKER: &[u8] = b"{\"scenario\":\"reversal\"";

/// Calls received, by method.
#[derive(Debug, Default)]
pub struct Counters {
    pub execute: AtomicU64,
    pub reverse: AtomicU64,
    pub query_status: AtomicU64,
    pub signal: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.execute.load(Ordering::Relaxed)
            + self.reverse.load(Ordering::Relaxed)
            + self.query_status.load(Ordering::Relaxed)
            + self.signal.load(Ordering::Relaxed)
    }
}

struct Service {
    counters: Arc<Counters>,
}

fn succeeded(status: &str) -> pb::ExecuteResponse {
    pb::ExecuteResponse {
        outcome: pb::Outcome::Succeeded as i32,
        status: Some(pb::Status {
            name: status.to_owned(),
            parameters: Default::default(),
        }),
        error_code: String::new(),
        message: String::new(),
    }
}

/// The status a forward action ends with; QueryStatus answers the same, as the action always
/// takes effect here.
fn status_of(action: &str, payload: &[u8]) -> &'static str {
    match action {
        "reserve" => "RESERVED",
        "charge" if payload.starts_with(DECLINE_MARKER) => "DECLINED",
        "charge" => "PAID",
        _ => "DONE",
    }
}

#[tonic::async_trait]
impl Participant for Service {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.counters.execute.fetch_add(1, Ordering::Relaxed);
        let request = request.get_ref();
        Ok(Response::new(succeeded(status_of(
            &request.action,
            &request.payload,
        ))))
    }

    async fn reverse(
        &self,
        _: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        self.counters.reverse.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::ReverseResponse {
            outcome: pb::Outcome::Succeeded as i32,
            error_code: String::new(),
            message: String::new(),
        }))
    }

    async fn query_status(
        &self,
        request: Request<pb::QueryStatusRequest>,
    ) -> Result<Response<pb::QueryStatusResponse>, Status> {
        self.counters.query_status.fetch_add(1, Ordering::Relaxed);
        // The payload is not in a query; a declined charge is reported as the
        // reversal it caused, which only a timeout (never in a healthy run) asks about.
        let status = status_of(&request.get_ref().action, &[]);
        Ok(Response::new(pb::QueryStatusResponse {
            outcome: pb::Outcome::Succeeded as i32,
            status: Some(pb::Status {
                name: status.to_owned(),
                parameters: Default::default(),
            }),
            error_code: String::new(),
            message: String::new(),
        }))
    }

    async fn signal(
        &self,
        _: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        self.counters.signal.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::SignalResponse {}))
    }
}

/// A Participant server running on a loopback port until dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
}

impl Running {
    pub async fn start() -> Result<Running, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel::<()>();
        // Nagle stays on unless asked (TOOLING.md): without this, p99 at 64 in flight is ~7x.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = ParticipantServer::new(Service {
            counters: counters.clone(),
        });
        tokio::spawn(async move {
            let served = Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("sagad-bench: a participant server on {addr} failed: {e}");
            }
        });
        Ok(Running {
            addr,
            counters,
            stop: Some(stop),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
