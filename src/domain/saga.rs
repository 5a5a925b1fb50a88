//! A saga's record and the rules for starting one: what a valid start request is, and the saga
//! it creates. Driving a saga's branches belongs to the engine issues that follow.

use std::collections::{BTreeMap, BTreeSet};

use crate::domain::branch::{Branch, Signal};
use crate::domain::ids::{BusinessType, Gsn, RequestId};
use crate::domain::strategy::StepStatus;
use crate::domain::strategy_validation::MAX_TIMEOUT_MS;
use crate::domain::{Millis, Violation};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SagaState {
    Running,
    Completed,
    Reversing,
    Reversed,
    NeedsAttention,
}

impl SagaState {
    /// A terminal saga never changes again.
    pub fn is_terminal(self) -> bool {
        match self {
            SagaState::Completed | SagaState::Reversed => true,
            SagaState::Running | SagaState::Reversing | SagaState::NeedsAttention => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaMode {
    /// Driven by the fulfillment strategy of its business type (S2).
    Orchestrated,
    /// Driven by the calling service's registered outcalls (S1).
    RegisteredOutcalls,
}

/// When a saga still running must be reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    None,
    At(Millis),
    After(Millis),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    pub gsn: Gsn,
    pub business_type: BusinessType,
    pub mode: SagaMode,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    pub deadline_ms: Option<Millis>,
    pub state: SagaState,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub request_id: RequestId,
    /// The strategy version an orchestrated saga runs with; 0 otherwise.
    pub strategy_version: u64,
    /// In the order they were created.
    pub branches: Vec<Branch>,
    /// Statuses reported so far, which rules wait for (S2 item 7).
    pub reported: BTreeSet<StepStatus>,
    /// Strategy rules that already fired; a rule fires at most once.
    pub fired_rules: BTreeSet<u32>,
    pub signal: Option<Signal>,
    pub reason: String,
    pub reversal_serials: Vec<String>,
    pub reversal_type: Option<ReversalType>,
    /// The branch an external reversal was asked for; empty for the whole saga.
    pub reversal_target: String,
}

impl Saga {
    pub fn branch(&self, branch_id: &str) -> Option<&Branch> {
        self.branches.iter().find(|b| b.branch_id == branch_id)
    }

    pub fn branch_mut(&mut self, branch_id: &str) -> Option<&mut Branch> {
        self.branches.iter_mut().find(|b| b.branch_id == branch_id)
    }

    /// Every node that took part — callees and the callers of outcalls — each once, in branch
    /// order: who a signal goes to.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = Vec::new();
        for branch in &self.branches {
            for node in [&branch.caller_node_id, &branch.node_id] {
                if !node.is_empty() && !nodes.contains(node) {
                    nodes.push(node.clone());
                }
            }
        }
        nodes
    }
}

/// Who asked for a reversal (S1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReversalType {
    External,
    Internal,
}

/// Limits a deployment puts on what a saga may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_payload_bytes: usize,
}

impl Limits {
    pub const MAX_CONTENT_TYPE: usize = 128;
    pub const MAX_LABELS: usize = 32;
    pub const MAX_LABEL_KEY: usize = 64;
    pub const MAX_LABEL_VALUE: usize = 256;
    /// Idempotency.Begin's fingerprint is kept for the whole retention period. A digest is 16
    /// to 64 bytes; this leaves room for any encoding of one and refuses a body sent instead.
    pub const MAX_FINGERPRINT_BYTES: usize = 512;
    /// A reversal serial is another system's request id: as long as sagad's own may be.
    pub const MAX_REVERSAL_SERIAL: usize = 128;
    /// Free text kept for operators (a reversal's reason, a report's message): a paragraph.
    pub const MAX_REASON: usize = 1024;
    pub const MAX_MESSAGE: usize = 1024;
    /// Reported error codes are matched against retryable codes, which are this long at most.
    pub const MAX_ERROR_CODE: usize = crate::domain::retry::MAX_NAME_LEN;
    /// A reported status is matched against a strategy's names and values, so it may be as
    /// long as they may be and no longer.
    pub const MAX_STATUS_NAME: usize = crate::domain::strategy_validation::MAX_NAME_LEN;
    pub const MAX_STATUS_PARAMETERS: usize = 32;
    pub const MAX_STATUS_PARAMETER_KEY: usize = crate::domain::strategy_validation::MAX_NAME_LEN;
    pub const MAX_STATUS_PARAMETER_VALUE: usize = crate::domain::strategy_validation::MAX_VALUE_LEN;
    /// Every write of a saga re-encodes all its branches; real sagas make a handful of
    /// outcalls, so this only stops a runaway caller.
    pub const MAX_OUTCALLS: usize = 1_000;
    /// Distinct serials RequestReversal records on one saga. Each new serial rewrites the saga
    /// even once it is REVERSED, so a retry loop minting fresh serials must hit a wall.
    pub const MAX_REVERSAL_SERIALS: usize = 100;
    /// Distinct step statuses an orchestrated saga stores for its rules. Rules wait for a
    /// handful; a node reporting ever new status names must not grow the saga for ever.
    pub const MAX_REPORTED_STATUSES: usize = 1_024;
    /// A node's endpoint URL, stored and parsed on every connection.
    pub const MAX_ENDPOINT: usize = 1_024;
}

/// The violation of a text field longer than `max` characters, if it is.
pub fn too_long(field: &str, text: &str, max: usize) -> Option<Violation> {
    let len = text.chars().count();
    (len > max).then(|| {
        Violation::new(
            field,
            format!("is {len} characters long; at most {max} are allowed"),
        )
    })
}

/// A start request as it arrives, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    pub request_id: String,
    pub business_type: String,
    pub mode: Option<SagaMode>,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    pub deadline: Deadline,
}

/// A start request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub request_id: RequestId,
    pub business_type: BusinessType,
    pub mode: SagaMode,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    pub deadline_ms: Option<Millis>,
}

/// Checks every field and reports every problem at once.
pub fn validate_start(
    request: StartRequest,
    limits: Limits,
    now: Millis,
) -> Result<Start, Vec<Violation>> {
    let mut violations = Vec::new();
    let request_id = RequestId::parse(&request.request_id)
        .map_err(|e| violations.push(Violation::new("request_id", e.to_string())))
        .ok();
    let business_type = BusinessType::parse(&request.business_type)
        .map_err(|e| violations.push(Violation::new("business_type", e.to_string())))
        .ok();
    if request.mode.is_none() {
        violations.push(Violation::new(
            "mode",
            "is required: SAGA_MODE_ORCHESTRATED (driven by the business type's strategy) or \
             SAGA_MODE_REGISTERED_OUTCALLS (driven by your registered outcalls)",
        ));
    }
    if request.payload.len() > limits.max_payload_bytes {
        violations.push(Violation::new(
            "payload",
            format!(
                "is {} bytes; at most {} are allowed (sagad --max-payload-bytes)",
                request.payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    if request.content_type.chars().count() > Limits::MAX_CONTENT_TYPE {
        violations.push(Violation::new(
            "content_type",
            format!("is longer than {} characters", Limits::MAX_CONTENT_TYPE),
        ));
    }
    if request.labels.len() > Limits::MAX_LABELS {
        violations.push(Violation::new(
            "labels",
            format!(
                "has {} entries; at most {} are allowed",
                request.labels.len(),
                Limits::MAX_LABELS
            ),
        ));
    }
    for (key, value) in &request.labels {
        let key_len = key.chars().count();
        if key_len == 0 || key_len > Limits::MAX_LABEL_KEY {
            violations.push(Violation::new(
                "labels",
                format!(
                    "key {key:?} must be 1 to {} characters",
                    Limits::MAX_LABEL_KEY
                ),
            ));
        }
        if value.chars().count() > Limits::MAX_LABEL_VALUE {
            violations.push(Violation::new(
                format!("labels[{key}]"),
                format!("is longer than {} characters", Limits::MAX_LABEL_VALUE),
            ));
        }
    }
    // Bounded as a strategy's saga_timeout is: a typo of a few zeros is caught instead of
    // parking a saga for centuries, and every deadline stays a time a Timestamp can show.
    let days = MAX_TIMEOUT_MS / 86_400_000;
    let deadline_ms = match request.deadline {
        Deadline::None => None,
        Deadline::At(at) if at <= now => {
            violations.push(Violation::new("deadline", "is not in the future"));
            None
        }
        Deadline::At(at) if at - now > MAX_TIMEOUT_MS => {
            violations.push(Violation::new(
                "deadline",
                format!(
                    "is more than {days} days from now; a saga's deadline is at most {days} days \
                     after its start"
                ),
            ));
            None
        }
        Deadline::At(at) => Some(at),
        Deadline::After(0) => {
            violations.push(Violation::new("timeout", "must be longer than zero"));
            None
        }
        Deadline::After(after) if after > MAX_TIMEOUT_MS => {
            violations.push(Violation::new(
                "timeout",
                format!("is {after} ms; at most {MAX_TIMEOUT_MS} ms ({days} days) are allowed"),
            ));
            None
        }
        Deadline::After(after) => Some(now.saturating_add(after)),
    };
    match (request_id, business_type, request.mode) {
        (Some(request_id), Some(business_type), Some(mode)) if violations.is_empty() => Ok(Start {
            request_id,
            business_type,
            mode,
            payload: request.payload,
            content_type: request.content_type,
            labels: request.labels,
            deadline_ms,
        }),
        _ => Err(violations),
    }
}

/// The saga a valid start request creates under its GSN.
pub fn on_started(start: Start, gsn: Gsn, now: Millis) -> Saga {
    Saga {
        gsn,
        business_type: start.business_type,
        mode: start.mode,
        payload: start.payload,
        content_type: start.content_type,
        labels: start.labels,
        deadline_ms: start.deadline_ms,
        state: SagaState::Running,
        created_ms: now,
        updated_ms: now,
        request_id: start.request_id,
        strategy_version: 0,
        branches: Vec::new(),
        reported: BTreeSet::new(),
        fired_rules: BTreeSet::new(),
        signal: None,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: None,
        reversal_target: String::new(),
    }
}

/// An orchestrated "order" saga `c1-<sequence>` in `state`, built through the start rules
/// above so that new saga fields need no change in the unit tests of other modules.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_saga(sequence: u64, state: SagaState) -> Saga {
    let start = validate_start(
        StartRequest {
            request_id: "r-1".into(),
            business_type: "order".into(),
            mode: Some(SagaMode::Orchestrated),
            payload: Vec::new(),
            content_type: String::new(),
            labels: Default::default(),
            deadline: Deadline::None,
        },
        Limits {
            max_payload_bytes: 1024,
        },
        1,
    )
    .unwrap();
    let gsn = Gsn::new(
        crate::domain::ids::CoordinatorId::parse("c1").unwrap(),
        sequence,
    );
    let mut saga = on_started(start, gsn, 1);
    saga.state = state;
    saga
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::CoordinatorId;

    const LIMITS: Limits = Limits {
        max_payload_bytes: 16,
    };

    fn request() -> StartRequest {
        StartRequest {
            request_id: "r-1".into(),
            business_type: "order".into(),
            mode: Some(SagaMode::RegisteredOutcalls),
            payload: b"{}".to_vec(),
            content_type: "application/json".into(),
            labels: BTreeMap::from([("tenant".into(), "acme".into())]),
            deadline: Deadline::After(30_000),
        }
    }

    #[test]
    fn a_valid_start_creates_a_running_saga_with_its_deadline() {
        let start = validate_start(request(), LIMITS, 1_000).unwrap();
        let gsn = Gsn::new(CoordinatorId::parse("c1").unwrap(), 7);
        let saga = on_started(start, gsn.clone(), 1_000);
        assert_eq!(saga.state, SagaState::Running);
        assert_eq!(saga.deadline_ms, Some(31_000));
        assert_eq!(saga.gsn, gsn);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let bad = StartRequest {
            request_id: String::new(),
            business_type: "x".repeat(200),
            mode: None,
            payload: vec![0; 17],
            deadline: Deadline::At(500),
            ..request()
        };
        let violations = validate_start(bad, LIMITS, 1_000).unwrap_err();
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["request_id", "business_type", "mode", "payload", "deadline"]
        );
        assert!(violations[3].description.contains("at most 16"));
    }

    #[test]
    fn a_deadline_or_timeout_past_366_days_is_refused() {
        let now = 1_000;
        let at = |deadline| StartRequest {
            deadline,
            ..request()
        };
        for ok in [
            Deadline::After(1),
            Deadline::After(MAX_TIMEOUT_MS),
            Deadline::At(now + 1),
            Deadline::At(now + MAX_TIMEOUT_MS),
        ] {
            assert!(validate_start(at(ok), LIMITS, now).is_ok(), "{ok:?}");
        }
        for (bad, field) in [
            (Deadline::After(MAX_TIMEOUT_MS + 1), "timeout"),
            (Deadline::After(Millis::MAX), "timeout"),
            (Deadline::At(now + MAX_TIMEOUT_MS + 1), "deadline"),
            (Deadline::At(Millis::MAX), "deadline"),
        ] {
            let violations = validate_start(at(bad), LIMITS, now).unwrap_err();
            assert_eq!(violations.len(), 1, "{bad:?}");
            assert_eq!(violations[0].field, field, "{bad:?}");
            assert!(
                violations[0].description.contains("366 days"),
                "{}",
                violations[0].description
            );
        }
    }

    #[test]
    fn oversized_labels_are_refused() {
        let bad = StartRequest {
            labels: BTreeMap::from([("k".into(), "v".repeat(300))]),
            ..request()
        };
        let violations = validate_start(bad, LIMITS, 0).unwrap_err();
        assert_eq!(violations[0].field, "labels[k]");
    }

    #[test]
    fn only_completed_and_reversed_are_terminal() {
        assert!(SagaState::Completed.is_terminal());
        assert!(SagaState::Reversed.is_terminal());
        assert!(!SagaState::NeedsAttention.is_terminal());
    }
}
