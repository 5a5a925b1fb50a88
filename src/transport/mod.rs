//! Delivery to participant nodes that can be dialled: one tonic client channel per endpoint,
//! reused across calls, with TCP_NODELAY and a per-call deadline. Nodes without an endpoint are
//! reached through their Subscribe stream instead (`engine::delivery`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

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
    #[error("the node answered with an error: {0}")]
    Status(#[from] tonic::Status),
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
    channels: Mutex<HashMap<String, Channel>>,
    call_timeout: Duration,
}

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

impl Participants {
    pub fn new(call_timeout: Duration) -> Participants {
        Participants {
            channels: Mutex::new(HashMap::new()),
            call_timeout,
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        // Lazy: a node that is down now is dialled again on the next call, not here.
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| Error::BadEndpoint {
                endpoint: endpoint.to_owned(),
                detail: e.to_string(),
            })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.call_timeout)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets the channel of an endpoint that changed or misbehaves.
    pub fn forget(&self, endpoint: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(endpoint);
    }

    pub async fn send(&self, endpoint: &str, outgoing: Outgoing) -> Result<Answer, Error> {
        let mut client = ParticipantClient::new(self.channel(endpoint)?);
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
    }
}
