//! The stored record types of every table: the ledger's own versioned shapes, converted to and
//! from domain types by the engine, never shared with the wire contract.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A saga as the ledger stores it (table `sagas`, key: the GSN's sequence number, big-endian).
/// Rewritten on every transition, so it holds no payload: payloads live in `payloads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The coordinator id that issued the GSN (a GSN is `coordinator_id` + sequence).
    pub coordinator_id: String,
    pub sequence: u64,
    pub business_type: String,
    /// How the saga is driven: 1 = orchestrated by a strategy, 2 = registered outcalls.
    pub mode: u8,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch; 0 means no deadline.
    pub deadline_ms: u64,
    /// The saga state as the domain numbers it (see `engine::convert`).
    pub state: u8,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The `request_id` of the StartSaga that created it.
    pub request_id: String,
    /// The strategy version an orchestrated saga runs with; 0 otherwise.
    pub strategy_version: u64,
    pub branches: Vec<BranchRecord>,
    /// Statuses reported so far that rules may wait for (S2 item 7: stored statuses).
    pub reported: Vec<StepStatusRecord>,
    /// Indexes of the strategy rules that already fired (each fires at most once).
    pub fired_rules: Vec<u32>,
    /// The last signal sent to the saga's nodes (0 = none).
    pub signal: u8,
    /// Why the saga is reversing or needs attention.
    pub reason: String,
    /// Reversal serial numbers received for this saga (S1 external reversal).
    pub reversal_serials: Vec<String>,
    /// 0 = no reversal, 1 = external, 2 = internal.
    pub reversal_type: u8,
    /// The branch an external reversal was asked for; empty for the whole saga.
    pub reversal_target: String,
}

/// One branch of a saga (an outcall or a strategy step), stored inside its `SagaRecord`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub branch_id: String,
    pub node_id: String,
    pub caller_node_id: String,
    pub forward_action: String,
    pub reversal_action: String,
    pub order: u32,
    /// The branch state as the domain numbers it.
    pub state: u8,
    pub last_status: String,
    pub last_status_parameters: BTreeMap<String, String>,
    pub error_code: String,
    pub message: String,
    /// Sends of the current action (forward or reversal).
    pub attempts: u32,
    /// When the latest send failed and the retry policy resends it: the time it is resent
    /// (milliseconds since the Unix epoch); 0 when no resend waits. (Saga record version 3.)
    pub retry_at_ms: u64,
    /// Of `attempts`, the reversal's sends in rounds before an operator's ReprocessSaga. (Saga
    /// record version 4.)
    pub earlier_reversal_sends: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Last QueryStatus poll: its outcome (0 = none) and when.
    pub last_poll_outcome: u8,
    pub last_poll_ms: u64,
    pub polls: u32,
    pub timeout_ms: u64,
    /// Operator-facing timeline of what happened to the branch (S4 processing details).
    pub timeline: Vec<TimelineRecord>,
}

/// One entry of a branch's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRecord {
    pub at_ms: u64,
    /// What happened, e.g. "execute sent", "reported SUCCEEDED PAID".
    pub what: String,
}

/// A payload (table `payloads`, key: GSN sequence big-endian ++ branch id; the saga's own
/// payload has an empty branch id). Written once, so transitions never rewrite it. The default
/// is no payload: empty data, no content type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRecord {
    pub data: Vec<u8>,
    pub content_type: String,
}

/// "Step X reported status S".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StepStatusRecord {
    pub step_id: String,
    pub status: String,
}

/// One version of a fulfillment strategy (table `strategies`, key: business type bytes ++ 0x00
/// ++ version big-endian, so the versions of a type are adjacent and ordered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrategyRecord {
    pub business_type: String,
    pub version: u64,
    pub description: String,
    pub steps: Vec<StepRecord>,
    pub first_set: Vec<String>,
    pub rules: Vec<RuleRecord>,
    pub end_statuses: Vec<StepStatusRecord>,
    pub abnormal_statuses: Vec<StepStatusRecord>,
    pub status_mappings: Vec<StatusMappingRecord>,
    pub exception_scopes: Vec<ExceptionScopeRecord>,
    pub saga_timeout_ms: u64,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: String,
    pub node_id: String,
    pub forward_action: String,
    pub reversal_action: String,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub when: Vec<StepStatusRecord>,
    pub trigger: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMappingRecord {
    /// Empty: any step.
    pub step_id: String,
    pub parameter: String,
    pub value: String,
    /// 1 = normal, 2 = abnormal, 3 = end.
    pub meaning: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionScopeRecord {
    pub step_id: String,
    pub reverse: Vec<String>,
}

/// A participant node's push endpoint (table `nodes`, key: node id bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    /// Empty: the node has no endpoint and is reached by Subscribe.
    pub endpoint: String,
    pub updated_ms: u64,
}

/// One version of the retry configuration (table `retry_config`, key: version big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryConfigRecord {
    pub version: u64,
    pub defaults: RetryPolicyRecord,
    pub transactions: Vec<TransactionRetryRecord>,
    pub channels: Vec<ChannelRetryRecord>,
    pub updated_ms: u64,
}

/// A retry policy; `None` fields fall back to the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicyRecord {
    /// `None`: inherit; `Some(empty)`: nothing is retryable.
    pub retryable_codes: Option<Vec<String>>,
    pub max_retries: Option<u32>,
    pub min_interval_ms: Option<u64>,
    /// The backoff factor times 1000 (integers keep records comparable and exact).
    pub backoff_factor_milli: Option<u32>,
    pub max_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRetryRecord {
    pub transaction_code: String,
    pub policy: RetryPolicyRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRetryRecord {
    pub channel: String,
    /// Empty: every transaction code of the channel.
    pub transaction_code: String,
    pub retryable_codes: Vec<String>,
}

/// Every retry decision about one original transaction (table `retry_history`, key: the
/// original serial's bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryHistoryRecord {
    pub original_serial: String,
    pub transaction_code: String,
    pub attempts: Vec<RetryAttemptRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryAttemptRecord {
    /// Empty for a refusal.
    pub retry_serial: String,
    pub attempt: u32,
    pub error_code: String,
    pub channel: String,
    /// The decision as the domain numbers it.
    pub decision: u8,
    pub decided_ms: u64,
    pub config_version: u64,
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
    /// Which processing lease the record holds: 0 = none recorded (a version 1 record, written
    /// before sagad kept it: judged by each asker's lease, as then), 1 = never taken over,
    /// 2 = taken over once PROCESSING `processing_lease_ms` since `updated_ms`.
    pub lease_kind: u8,
    /// The lease given at registration or at the last takeover when `lease_kind` is 2, else 0.
    pub processing_lease_ms: u64,
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

/// Which original transaction a retry serial was issued for (table `retry_links`, key: the
/// retry serial's bytes). Private to the ledger: callers see only the original serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RetryLinkRecord {
    pub(crate) original_serial: String,
}
