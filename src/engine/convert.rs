//! Conversions between domain values and the ledger's stored records. A record that does not
//! convert back is corrupt: that is reported, never unwrapped.

use crate::domain::branch::{Branch, BranchState, Outcome, Signal, Status, TimelineEntry};
use crate::domain::idempotency::{Lease, Record, RecordState};
use crate::domain::ids::{BusinessType, CoordinatorId, Gsn, RequestId};
use crate::domain::saga::{ReversalType, Saga, SagaMode, SagaState};
use crate::domain::strategy::StepStatus;
use crate::store::{
    self, BranchRecord, IdempotencyRecord, SagaRecord, StepStatusRecord, TimelineRecord,
};

fn corrupt(table: &'static str, detail: impl Into<String>) -> store::Error {
    store::Error::Corrupt {
        table,
        detail: detail.into(),
    }
}

pub fn saga_state_code(state: SagaState) -> u8 {
    match state {
        SagaState::Running => 1,
        SagaState::Completed => 2,
        SagaState::Reversing => 3,
        SagaState::Reversed => 4,
        SagaState::NeedsAttention => 5,
    }
}

pub fn saga_state_name(state: SagaState) -> &'static str {
    match state {
        SagaState::Running => "RUNNING",
        SagaState::Completed => "COMPLETED",
        SagaState::Reversing => "REVERSING",
        SagaState::Reversed => "REVERSED",
        SagaState::NeedsAttention => "NEEDS_ATTENTION",
    }
}

pub fn saga_state_from_code(code: u8) -> Option<SagaState> {
    match code {
        1 => Some(SagaState::Running),
        2 => Some(SagaState::Completed),
        3 => Some(SagaState::Reversing),
        4 => Some(SagaState::Reversed),
        5 => Some(SagaState::NeedsAttention),
        _ => None,
    }
}

fn mode_code(mode: SagaMode) -> u8 {
    match mode {
        SagaMode::Orchestrated => 1,
        SagaMode::RegisteredOutcalls => 2,
    }
}

fn branch_state_code(state: BranchState) -> u8 {
    match state {
        BranchState::Triggered => 1,
        BranchState::Succeeded => 2,
        BranchState::Failed => 3,
        BranchState::Unknown => 4,
        BranchState::Reversing => 5,
        BranchState::Reversed => 6,
        BranchState::ReversalFailed => 7,
        BranchState::NotOccurred => 8,
    }
}

fn branch_state_from_code(code: u8) -> Option<BranchState> {
    Some(match code {
        1 => BranchState::Triggered,
        2 => BranchState::Succeeded,
        3 => BranchState::Failed,
        4 => BranchState::Unknown,
        5 => BranchState::Reversing,
        6 => BranchState::Reversed,
        7 => BranchState::ReversalFailed,
        8 => BranchState::NotOccurred,
        _ => return None,
    })
}

pub fn outcome_code(outcome: Option<Outcome>) -> u8 {
    match outcome {
        None => 0,
        Some(Outcome::Succeeded) => 1,
        Some(Outcome::Failed) => 2,
        Some(Outcome::Processing) => 3,
        Some(Outcome::Unknown) => 4,
        Some(Outcome::NotFound) => 5,
        Some(Outcome::Reversed) => 6,
    }
}

pub fn outcome_from_code(code: u8) -> Option<Outcome> {
    Some(match code {
        1 => Outcome::Succeeded,
        2 => Outcome::Failed,
        3 => Outcome::Processing,
        4 => Outcome::Unknown,
        5 => Outcome::NotFound,
        6 => Outcome::Reversed,
        _ => return None,
    })
}

pub fn signal_code(signal: Option<Signal>) -> u8 {
    match signal {
        None => 0,
        Some(Signal::ReversalSuccess) => 1,
        Some(Signal::Reprocess) => 2,
        Some(Signal::ReversalFailure) => 3,
        Some(Signal::Completed) => 4,
    }
}

pub fn signal_from_code(code: u8) -> Option<Signal> {
    Some(match code {
        1 => Signal::ReversalSuccess,
        2 => Signal::Reprocess,
        3 => Signal::ReversalFailure,
        4 => Signal::Completed,
        _ => return None,
    })
}

fn branch_to_record(branch: &Branch) -> BranchRecord {
    let (last_status, last_status_parameters) = match &branch.last_status {
        Some(status) => (status.name.clone(), status.parameters.clone()),
        None => (String::new(), Default::default()),
    };
    BranchRecord {
        branch_id: branch.branch_id.clone(),
        node_id: branch.node_id.clone(),
        caller_node_id: branch.caller_node_id.clone(),
        forward_action: branch.forward_action.clone(),
        reversal_action: branch.reversal_action.clone(),
        order: branch.order,
        state: branch_state_code(branch.state),
        last_status,
        last_status_parameters,
        error_code: branch.error_code.clone(),
        message: branch.message.clone(),
        attempts: branch.attempts,
        retry_at_ms: branch.retry_at_ms.unwrap_or(0),
        earlier_reversal_sends: branch.earlier_reversal_sends,
        created_ms: branch.created_ms,
        updated_ms: branch.updated_ms,
        last_poll_outcome: outcome_code(branch.last_poll_outcome),
        last_poll_ms: branch.last_poll_ms,
        polls: branch.polls,
        timeout_ms: branch.timeout_ms,
        timeline: branch
            .timeline
            .iter()
            .map(|t| TimelineRecord {
                at_ms: t.at_ms,
                what: t.what.clone(),
            })
            .collect(),
    }
}

fn branch_from_record(record: BranchRecord) -> Result<Branch, store::Error> {
    const TABLE: &str = "sagas";
    let state = branch_state_from_code(record.state).ok_or_else(|| {
        corrupt(
            TABLE,
            format!("branch {} state {}", record.branch_id, record.state),
        )
    })?;
    let last_status = (!record.last_status.is_empty()).then_some(Status {
        name: record.last_status,
        parameters: record.last_status_parameters,
    });
    Ok(Branch {
        branch_id: record.branch_id,
        node_id: record.node_id,
        caller_node_id: record.caller_node_id,
        forward_action: record.forward_action,
        reversal_action: record.reversal_action,
        order: record.order,
        state,
        last_status,
        error_code: record.error_code,
        message: record.message,
        attempts: record.attempts,
        retry_at_ms: (record.retry_at_ms > 0).then_some(record.retry_at_ms),
        earlier_reversal_sends: record.earlier_reversal_sends,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        last_poll_outcome: outcome_from_code(record.last_poll_outcome),
        last_poll_ms: record.last_poll_ms,
        polls: record.polls,
        timeout_ms: record.timeout_ms,
        timeline: record
            .timeline
            .into_iter()
            .map(|t| TimelineEntry {
                at_ms: t.at_ms,
                what: t.what,
            })
            .collect(),
    })
}

/// The saga without its payload, which is stored once in `payloads`.
pub fn saga_to_record(saga: &Saga) -> SagaRecord {
    SagaRecord {
        coordinator_id: saga.gsn.coordinator().as_str().to_owned(),
        sequence: saga.gsn.sequence(),
        business_type: saga.business_type.as_str().to_owned(),
        mode: mode_code(saga.mode),
        content_type: saga.content_type.clone(),
        labels: saga.labels.clone(),
        deadline_ms: saga.deadline_ms.unwrap_or(0),
        state: saga_state_code(saga.state),
        created_ms: saga.created_ms,
        updated_ms: saga.updated_ms,
        request_id: saga.request_id.as_str().to_owned(),
        strategy_version: saga.strategy_version,
        branches: saga.branches.iter().map(branch_to_record).collect(),
        reported: saga
            .reported
            .iter()
            .map(|s| StepStatusRecord {
                step_id: s.step_id.clone(),
                status: s.status.clone(),
            })
            .collect(),
        fired_rules: saga.fired_rules.iter().copied().collect(),
        signal: signal_code(saga.signal),
        reason: saga.reason.clone(),
        reversal_serials: saga.reversal_serials.clone(),
        reversal_type: match saga.reversal_type {
            None => 0,
            Some(ReversalType::External) => 1,
            Some(ReversalType::Internal) => 2,
        },
        reversal_target: saga.reversal_target.clone(),
    }
}

/// The saga from its record; `payload` comes from the `payloads` table (empty when a listing
/// leaves it out).
pub fn saga_from_record(record: SagaRecord, payload: Vec<u8>) -> Result<Saga, store::Error> {
    const TABLE: &str = "sagas";
    let coordinator = CoordinatorId::parse(&record.coordinator_id)
        .map_err(|e| corrupt(TABLE, format!("coordinator id: {e}")))?;
    let mode = match record.mode {
        1 => SagaMode::Orchestrated,
        2 => SagaMode::RegisteredOutcalls,
        other => return Err(corrupt(TABLE, format!("mode {other}"))),
    };
    let state = saga_state_from_code(record.state)
        .ok_or_else(|| corrupt(TABLE, format!("state {}", record.state)))?;
    Ok(Saga {
        gsn: Gsn::new(coordinator, record.sequence),
        business_type: BusinessType::parse(&record.business_type)
            .map_err(|e| corrupt(TABLE, format!("business type: {e}")))?,
        mode,
        payload,
        content_type: record.content_type,
        labels: record.labels,
        deadline_ms: (record.deadline_ms != 0).then_some(record.deadline_ms),
        state,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        request_id: RequestId::parse(&record.request_id)
            .map_err(|e| corrupt(TABLE, format!("request id: {e}")))?,
        strategy_version: record.strategy_version,
        branches: record
            .branches
            .into_iter()
            .map(branch_from_record)
            .collect::<Result<_, _>>()?,
        reported: record
            .reported
            .into_iter()
            .map(|s| StepStatus {
                step_id: s.step_id,
                status: s.status,
            })
            .collect(),
        fired_rules: record.fired_rules.into_iter().collect(),
        signal: signal_from_code(record.signal),
        reason: record.reason,
        reversal_serials: record.reversal_serials,
        reversal_type: match record.reversal_type {
            1 => Some(ReversalType::External),
            2 => Some(ReversalType::Internal),
            _ => None,
        },
        reversal_target: record.reversal_target,
    })
}

pub fn idempotency_to_record(record: &Record) -> IdempotencyRecord {
    IdempotencyRecord {
        fingerprint: record.fingerprint.clone(),
        state: match record.state {
            RecordState::Processing => 1,
            RecordState::Done => 2,
        },
        result: record.result.clone(),
        response: record.response.clone(),
        content_type: record.content_type.clone(),
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        expires_ms: record.expires_ms,
        attempts: record.attempts,
        lease_kind: match record.lease {
            Lease::Unrecorded => 0,
            Lease::Never => 1,
            Lease::After(_) => 2,
        },
        processing_lease_ms: match record.lease {
            Lease::After(lease_ms) => lease_ms,
            Lease::Unrecorded | Lease::Never => 0,
        },
    }
}

pub fn idempotency_from_record(record: IdempotencyRecord) -> Result<Record, store::Error> {
    let state = match record.state {
        1 => RecordState::Processing,
        2 => RecordState::Done,
        other => return Err(corrupt("idempotency", format!("state {other}"))),
    };
    let lease = match record.lease_kind {
        0 => Lease::Unrecorded,
        1 => Lease::Never,
        2 => Lease::After(record.processing_lease_ms),
        other => return Err(corrupt("idempotency", format!("lease kind {other}"))),
    };
    Ok(Record {
        fingerprint: record.fingerprint,
        state,
        result: record.result,
        response: record.response,
        content_type: record.content_type,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        expires_ms: record.expires_ms,
        attempts: record.attempts,
        lease,
    })
}
