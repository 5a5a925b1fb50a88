//! Delivery to participant nodes that can be dialled: one HTTP/2 connection per endpoint
//! (`connection`), reused across calls, with TCP_NODELAY and a per-call deadline, under tonic's
//! generated client. Nodes without an endpoint are reached through their Subscribe stream
//! instead (`engine::delivery`).

mod connection;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;

use crate::domain::branch::Report;
use crate::grpc::convert::{outcome_from_pb, signal_to_pb, status_from_pb};
use crate::grpc::pb;
use crate::grpc::pb::participant_client::ParticipantClient;

/// What a node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To Execute, Reverse or QueryStatus.
    Report(Report),
    /// To Signal.
    Acknowledged,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad endpoint {endpoint:?}: {detail}")]
    BadEndpoint { endpoint: String, detail: String },
    /// A gRPC status the node sent.
    #[error("the node answered with an error: {0}")]
    Status(#[from] tonic::Status),
    /// No connection to the node could be made: nothing reached it.
    #[error("could not reach the node: {0}")]
    Unreachable(String),
    /// The call broke below gRPC (the connection failed, the node reset the stream) before
    /// the node answered with a status.
    #[error("the call broke before the node answered: {0}")]
    Broken(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One command, as the transport sends it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub command_id: String,
    pub kind: crate::engine::commands::Kind,
    pub gsn: String,
    pub branch_id: String,
    pub action: String,
    pub reason: String,
    pub signal: u8,
    pub business_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub attempt: u32,
}

impl Outgoing {
    /// A COMPLETED signal about saga `gsn`, sent as `command_id`, for unit tests.
    #[cfg(test)]
    pub(crate) fn test_signal(command_id: &str, gsn: &str) -> Outgoing {
        Outgoing {
            command_id: command_id.to_owned(),
            kind: crate::engine::commands::Kind::Signal,
            gsn: gsn.to_owned(),
            branch_id: String::new(),
            action: String::new(),
            reason: String::new(),
            signal: 1,
            business_type: "order".to_owned(),
            payload: Vec::new(),
            content_type: String::new(),
            attempt: 0,
        }
    }

    /// The same command as the Subscribe stream carries it.
    pub fn into_pb(self, sent_at: Option<prost_types::Timestamp>) -> pb::Command {
        let attempt = self.attempt;
        let command_id = self.command_id.clone();
        pb::Command {
            command_id,
            kind: Some(self.into_kind()),
            attempt,
            sent_at,
        }
    }

    /// The request itself, moved out of the command rather than copied: a push delivery
    /// builds one per send, and the payload is the largest part of it.
    fn into_kind(self) -> pb::command::Kind {
        use crate::engine::commands::Kind;
        match self.kind {
            Kind::Execute => pb::command::Kind::Execute(pb::ExecuteRequest {
                command_id: self.command_id,
                gsn: self.gsn,
                branch_id: self.branch_id,
                action: self.action,
                payload: self.payload,
                content_type: self.content_type,
                business_type: self.business_type,
            }),
            Kind::Reverse => pb::command::Kind::Reverse(pb::ReverseRequest {
                command_id: self.command_id,
                gsn: self.gsn,
                branch_id: self.branch_id,
                action: self.action,
                payload: self.payload,
                content_type: self.content_type,
                reason: self.reason,
            }),
            Kind::QueryStatus => pb::command::Kind::QueryStatus(pb::QueryStatusRequest {
                command_id: self.command_id,
                gsn: self.gsn,
                branch_id: self.branch_id,
                action: self.action,
            }),
            Kind::Signal => pb::command::Kind::Signal(pb::SignalRequest {
                command_id: self.command_id,
                gsn: self.gsn,
                signal: signal_to_pb(self.signal) as i32,
                reason: self.reason,
            }),
        }
    }
}

/// Clients of the participants' Participant services.
pub struct Participants {
    peers: Mutex<HashMap<String, Arc<connection::Peer>>>,
    call_timeout: Duration,
    /// `call_timeout` as a grpc-timeout header, formatted once (tonic's `set_timeout` formats
    /// it anew for every call) and put on each request as tonic hands it over, rather than in
    /// its metadata, which tonic merges into the request again (callgrind: ≈ 1.3% of sagad's
    /// instructions per saga for both).
    deadline: Option<http::HeaderValue>,
}

/// The tower service tonic's generated client calls through: one endpoint's connection, and
/// the deadline each call carries to the node.
#[derive(Clone)]
struct Call {
    peer: Arc<connection::Peer>,
    deadline: Option<http::HeaderValue>,
    /// The number of the connection the last request went out on (0: none yet).
    sent_on: Arc<AtomicU64>,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Call {
    type Response = http::Response<connection::ResponseBody>;
    type Error = connection::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the connection's, awaited inside the call, where a broken
        // connection can be dialled again.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The node learns the call's deadline, so its gRPC stack can give up on work whose
        // answer sagad will no longer wait for.
        if let Some(deadline) = &self.deadline {
            request.headers_mut().insert(
                http::header::HeaderName::from_static(GRPC_TIMEOUT),
                deadline.clone(),
            );
        }
        let peer = self.peer.clone();
        let sent_on = self.sent_on.clone();
        Box::pin(async move { peer.call(request, &sent_on).await })
    }
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

fn report(outcome: i32, status: Option<pb::Status>, error_code: String, message: String) -> Report {
    Report {
        outcome: outcome_from_pb(outcome),
        status: status.map(status_from_pb),
        error_code,
        message,
        // The delivery knows which send it answered; it fills this in.
        attempt: None,
    }
}

/// Why an endpoint cannot be dialled, in words for whoever typed it; `None` if it can.
/// RegisterNode and `--node` check with this, so a stored endpoint always parses.
pub fn endpoint_problem(endpoint: &str) -> Option<String> {
    origin(endpoint).err()
}

/// `http://host[:port]`, the part of an endpoint a request's URI starts with.
fn origin(endpoint: &str) -> Result<Uri, String> {
    let example = "e.g. http://127.0.0.1:7001";
    let uri: Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| format!("is not a URL ({e}); {example}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "https is not supported: sagad speaks plain HTTP/2 to nodes; give the http:// \
                 URL (terminate TLS in a proxy beside the node if the network needs it), {example}"
            ));
        }
        _ => return Err(format!("must start with http://, {example}")),
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("names no host, {example}"));
    };
    if authority.host().is_empty() {
        return Err(format!("names no host, {example}"));
    }
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|e| format!("is not a URL ({e}); {example}"))
}

impl Participants {
    pub fn new(call_timeout: Duration) -> Participants {
        // Formatted by tonic, as the gRPC protocol spells it.
        let mut formatted = tonic::Request::new(());
        formatted.set_timeout(call_timeout);
        let (metadata, _, ()) = formatted.into_parts();
        Participants {
            peers: Mutex::new(HashMap::new()),
            call_timeout,
            deadline: metadata.into_headers().get(GRPC_TIMEOUT).cloned(),
        }
    }

    /// A client for one call, and the `Call` under it (to learn its connection afterwards).
    fn client(&self, endpoint: &str) -> Result<(ParticipantClient<Call>, Call), Error> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = match peers.get(endpoint) {
            Some(peer) => peer.clone(),
            None => {
                let origin = origin(endpoint).map_err(|detail| Error::BadEndpoint {
                    endpoint: endpoint.to_owned(),
                    detail,
                })?;
                // Lazy: a node that is down now is dialled on the first call, and again on
                // the next one after that failed.
                let peer = Arc::new(connection::Peer::new(
                    endpoint,
                    origin,
                    Duration::from_secs(2),
                ));
                peers.insert(endpoint.to_owned(), peer.clone());
                peer
            }
        };
        drop(peers);
        let origin = peer.origin().clone();
        let call = Call {
            peer,
            deadline: self.deadline.clone(),
            sent_on: Arc::new(AtomicU64::new(0)),
        };
        Ok((ParticipantClient::with_origin(call.clone(), origin), call))
    }

    /// Lets the next call to `endpoint` dial at once: its node registered again, so it is most
    /// likely back, and a back-off earned while it was down would hold its backlog for
    /// nothing.
    pub fn dial_now(&self, endpoint: &str) {
        let peer = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint)
            .cloned();
        if let Some(peer) = peer {
            peer.end_backoff();
        }
    }

    /// Forgets the connection of an endpoint that changed or misbehaves.
    pub fn forget(&self, endpoint: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(endpoint);
    }

    pub async fn send(&self, endpoint: &str, outgoing: Outgoing) -> Result<Answer, Error> {
        let (mut client, sent) = self.client(endpoint)?;
        let call = async move {
            Ok(match outgoing.into_kind() {
                pb::command::Kind::Execute(request) => {
                    let r = client.execute(request).await?.into_inner();
                    Answer::Report(report(r.outcome, r.status, r.error_code, r.message))
                }
                pb::command::Kind::Reverse(request) => {
                    let r = client.reverse(request).await?.into_inner();
                    Answer::Report(report(r.outcome, None, r.error_code, r.message))
                }
                pb::command::Kind::QueryStatus(request) => {
                    let r = client.query_status(request).await?.into_inner();
                    Answer::Report(report(r.outcome, r.status, r.error_code, r.message))
                }
                pb::command::Kind::Signal(request) => {
                    client.signal(request).await?;
                    Answer::Acknowledged
                }
            })
        };
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(answered) => answered.map_err(ours),
            Err(_) => {
                // The connection may be dead without a word (no RST, no FIN): drop it so the
                // next call dials again rather than wait out its timeout on it too. Calls
                // still on it keep it; a node that is merely slow costs one new connection.
                let dial = sent.sent_on.load(Ordering::Relaxed);
                if dial != 0 {
                    sent.peer.drop_connection(dial);
                }
                Err(Error::Timeout(self.call_timeout))
            }
        }
    }
}

/// A status tonic made of our own connection's error (code Unknown, with the error as its
/// source) is told apart from one the node sent, so an operator does not read that the node
/// answered when sagad never reached it.
fn ours(error: Error) -> Error {
    let Error::Status(status) = error else {
        return error;
    };
    let Some(connection) = std::error::Error::source(&status)
        .and_then(|source| source.downcast_ref::<connection::Error>())
    else {
        return Error::Status(status);
    };
    match connection {
        connection::Error::Connect { .. } => Error::Unreachable(connection.to_string()),
        connection::Error::Http2 { .. }
        | connection::Error::Body(_)
        | connection::Error::Answer(_) => Error::Broken(connection.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_endpoint_is_dialled_at_its_host_and_port() {
        for endpoint in [
            "http://127.0.0.1:7001",
            "http://[::1]:7001",
            "http://inventory.internal",
            "http://inventory.internal:7001/",
        ] {
            assert_eq!(endpoint_problem(endpoint), None, "{endpoint}");
        }
        let uri = origin("http://[::1]:7001/some/path").unwrap();
        assert_eq!(uri.to_string(), "http://[::1]:7001/");
        let peer = connection::Peer::new("http://[::1]:7001", uri, Duration::from_secs(1));
        assert_eq!(peer.address(), ("::1", 7001));
        let uri = origin("http://inventory.internal").unwrap();
        let peer = connection::Peer::new("http://inventory.internal", uri, Duration::from_secs(1));
        assert_eq!(peer.address(), ("inventory.internal", 80), "http's port");
    }

    /// A node's connection that stopped answering (here: a peer that took the TCP connection
    /// and never speaks) is given up when a call to it times out: the next call dials again
    /// and reaches the node, which now answers on a new connection.
    #[tokio::test]
    async fn a_call_that_times_out_makes_the_next_call_dial_a_new_connection() {
        #![allow(clippy::unwrap_used)]
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let node = tokio::spawn(async move {
            // The first connection is taken and never answered.
            let (silent, _) = listener.accept().await.unwrap();
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                // An empty SignalResponse: no compression, length 0.
                send.send_data(bytes::Bytes::from_static(&[0; 5]), false)
                    .unwrap();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(trailers).unwrap();
            }
            drop(silent);
        });
        let participants = Participants::new(Duration::from_millis(300));
        let signal = || Outgoing {
            attempt: 1,
            ..Outgoing::test_signal("c1-0000000000000001:s1.1", "c1-0000000000000001")
        };
        let first = participants.send(&endpoint, signal()).await;
        assert!(matches!(first, Err(Error::Timeout(_))), "{first:?}");
        let second = participants.send(&endpoint, signal()).await;
        assert_eq!(second.unwrap(), Answer::Acknowledged);
        drop(participants);
        node.abort();
    }

    #[test]
    fn an_endpoint_that_cannot_be_dialled_is_refused_with_what_to_give_instead() {
        let problem = |e: &str| endpoint_problem(e).unwrap_or_else(|| panic!("{e} was accepted"));
        assert!(problem("https://127.0.0.1:7001").contains("https is not supported"));
        for endpoint in ["127.0.0.1:7001", "ftp://host:21", "inventory"] {
            assert!(
                problem(endpoint).contains("must start with http://"),
                "{endpoint}"
            );
        }
        assert!(problem("http://").contains("http://127.0.0.1:7001"));
        assert!(problem("http://exa mple:1").contains("is not a URL"));
    }

    /// The error of sending one signal to `endpoint`, which must fail.
    async fn failed_signal(endpoint: &str) -> Error {
        #![allow(clippy::unwrap_used)]
        let signal = Outgoing {
            attempt: 1,
            ..Outgoing::test_signal("c1-0000000000000001:s1.1", "c1-0000000000000001")
        };
        Participants::new(Duration::from_secs(5))
            .send(endpoint, signal)
            .await
            .unwrap_err()
    }

    /// A node whose endpoint refuses connections was not reached, and the error says so
    /// rather than that the node answered with an error.
    #[tokio::test]
    async fn a_node_whose_endpoint_refuses_connections_could_not_be_reached() {
        #![allow(clippy::unwrap_used)]
        let endpoint = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let error = failed_signal(&endpoint).await;
        assert!(matches!(error, Error::Unreachable(_)), "{error:?}");
        let text = error.to_string();
        assert!(
            text.starts_with("could not reach the node: connecting to ")
                && text.contains(&endpoint),
            "{text}"
        );
    }

    /// A status the node sends is still its answer.
    #[tokio::test]
    async fn a_status_the_node_sent_is_its_answer() {
        #![allow(clippy::unwrap_used)]
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let node = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "7")
                    .header("grpc-message", "no")
                    .body(())
                    .unwrap();
                respond.send_response(response, true).unwrap();
            }
        });
        let error = failed_signal(&endpoint).await;
        assert!(
            matches!(&error, Error::Status(s) if s.code() == tonic::Code::PermissionDenied),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the node answered with an error")
        );
        node.abort();
    }

    /// A stream that breaks after the node began to answer is no answer of the node's: the
    /// operator reads that the call broke, not that the node answered with an error.
    #[tokio::test]
    async fn an_answer_that_breaks_off_midway_is_a_broken_call_not_the_nodes_error() {
        #![allow(clippy::unwrap_used)]
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let node = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            let (_request, mut respond) = connection.accept().await.unwrap().unwrap();
            // The connection is driven on its own, so what is sent goes out as it is sent.
            let driven = tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut body = respond.send_response(response, false).unwrap();
            // Part of a message (a length prefix of 10 bytes, then 2 of them), then the reset.
            body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 10, 1, 2]), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            body.send_reset(h2::Reason::INTERNAL_ERROR);
            let _ = driven.await;
        });
        let error = failed_signal(&endpoint).await;
        assert!(matches!(&error, Error::Broken(_)), "{error:?}");
        assert!(
            error.to_string().contains("the answer broke off"),
            "{error}"
        );
        node.abort();
    }
}
