//! The stored record types of every table: the ledger's own versioned shapes, converted to and
//! from domain types by the engine, never shared with the wire contract.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A saga as the ledger stores it (table `sagas`, key: the GSN's sequence number, big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The coordinator id that issued the GSN (a GSN is `coordinator_id` + sequence).
    pub coordinator_id: String,
    pub sequence: u64,
    pub business_type: String,
    /// How the saga is driven: 1 = orchestrated by a strategy, 2 = registered outcalls.
    pub mode: u8,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch; 0 means no deadline.
    pub deadline_ms: u64,
    /// The saga state as the domain numbers it (see `domain::saga::SagaState`).
    pub state: u8,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The `request_id` of the StartSaga that created it.
    pub request_id: String,
}

/// One row of the idempotence detection table (S3), table `idempotency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Digest of the request body (without its request id); a reuse with another body is refused.
    pub fingerprint: Vec<u8>,
    /// 1 = processing, 2 = done.
    pub state: u8,
    /// Free-form outcome label for participants ("SUCCEEDED", "FAILED", ...); empty while processing.
    pub result: String,
    /// The stored response message, replayed to every repeat of the request.
    pub response: Vec<u8>,
    /// MIME type of `response`, if the participant gave one.
    pub content_type: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// After this instant the record may be collected; 0 = never.
    pub expires_ms: u64,
    /// How many times processing was (re)started: a lease takeover increments it.
    pub attempts: u32,
}

/// A command waiting for delivery to a node (table `outbox`, key: outbox id, big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub gsn_sequence: u64,
    pub node_id: String,
    /// Encoded command, opaque to the store.
    pub command: Vec<u8>,
    pub created_ms: u64,
    pub attempts: u32,
}

/// A timer (table `due`, key: due instant in ms big-endian, then a unique id big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueRecord {
    pub gsn_sequence: u64,
    /// Encoded timer kind, opaque to the store.
    pub timer: Vec<u8>,
}
