//! Conversions between generated `pb` messages and domain values, at the edge. Incoming
//! messages that cannot convert become field violations naming what to fix.

use prost_types::{Duration as PbDuration, Timestamp};

use crate::domain::idempotency::{Record, RecordState};
use crate::domain::saga::{Deadline, Saga, SagaMode, SagaState, StartRequest};
use crate::domain::{Millis, Violation};
use crate::grpc::pb;

pub fn timestamp(ms: Millis) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn timestamp_ms(field: &str, ts: &Timestamp) -> Result<Millis, Violation> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Violation::new(
            field,
            "must be a valid time after 1970-01-01T00:00:00Z",
        ));
    }
    let seconds = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u64::try_from(ts.nanos).unwrap_or(0);
    Ok(seconds
        .saturating_mul(1000)
        .saturating_add(nanos / 1_000_000))
}

pub fn duration(field: &str, d: &PbDuration) -> Result<std::time::Duration, Violation> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return Err(Violation::new(field, "must not be negative"));
    }
    let seconds = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Ok(std::time::Duration::new(seconds, nanos))
}

fn millis(duration: std::time::Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub fn saga_state(state: SagaState) -> pb::SagaState {
    match state {
        SagaState::Running => pb::SagaState::Running,
        SagaState::Completed => pb::SagaState::Completed,
        SagaState::Reversing => pb::SagaState::Reversing,
        SagaState::Reversed => pb::SagaState::Reversed,
        SagaState::NeedsAttention => pb::SagaState::NeedsAttention,
    }
}

/// `None` for UNSPECIFIED or an unknown number.
pub fn saga_state_from_pb(value: i32) -> Option<SagaState> {
    match pb::SagaState::try_from(value).ok()? {
        pb::SagaState::Unspecified => None,
        pb::SagaState::Running => Some(SagaState::Running),
        pb::SagaState::Completed => Some(SagaState::Completed),
        pb::SagaState::Reversing => Some(SagaState::Reversing),
        pb::SagaState::Reversed => Some(SagaState::Reversed),
        pb::SagaState::NeedsAttention => Some(SagaState::NeedsAttention),
    }
}

fn saga_mode(mode: SagaMode) -> pb::SagaMode {
    match mode {
        SagaMode::Orchestrated => pb::SagaMode::Orchestrated,
        SagaMode::RegisteredOutcalls => pb::SagaMode::RegisteredOutcalls,
    }
}

/// `full` includes the payload; listings leave it out unless asked.
pub fn saga(saga: &Saga, full: bool) -> pb::Saga {
    pb::Saga {
        gsn: saga.gsn.to_string(),
        business_type: saga.business_type.as_str().to_owned(),
        mode: saga_mode(saga.mode) as i32,
        state: saga_state(saga.state) as i32,
        payload: if full {
            saga.payload.clone()
        } else {
            Vec::new()
        },
        content_type: saga.content_type.clone(),
        labels: saga.labels.clone(),
        deadline: saga.deadline_ms.map(timestamp),
        created_at: Some(timestamp(saga.created_ms)),
        updated_at: Some(timestamp(saga.updated_ms)),
        request_id: saga.request_id.as_str().to_owned(),
        strategy_version: 0,
        branches: Vec::new(),
        signal: pb::Signal::Unspecified as i32,
        reason: String::new(),
    }
}

pub fn start_request(request: pb::StartSagaRequest) -> Result<StartRequest, Vec<Violation>> {
    let mut violations = Vec::new();
    let mode = match pb::SagaMode::try_from(request.mode) {
        Ok(pb::SagaMode::Orchestrated) => Some(SagaMode::Orchestrated),
        Ok(pb::SagaMode::RegisteredOutcalls) => Some(SagaMode::RegisteredOutcalls),
        // The domain explains what a missing mode should be.
        Ok(pb::SagaMode::Unspecified) => None,
        Err(_) => {
            violations.push(Violation::new(
                "mode",
                format!("{} is not a SagaMode", request.mode),
            ));
            None
        }
    };
    let deadline = match (&request.deadline, &request.timeout) {
        (Some(_), Some(_)) => {
            violations.push(Violation::new(
                "timeout",
                "give either deadline or timeout, not both",
            ));
            Deadline::None
        }
        (Some(at), None) => match timestamp_ms("deadline", at) {
            Ok(ms) => Deadline::At(ms),
            Err(v) => {
                violations.push(v);
                Deadline::None
            }
        },
        (None, Some(after)) => match duration("timeout", after) {
            Ok(d) => Deadline::After(millis(d)),
            Err(v) => {
                violations.push(v);
                Deadline::None
            }
        },
        (None, None) => Deadline::None,
    };
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(StartRequest {
        request_id: request.request_id,
        business_type: request.business_type,
        mode,
        payload: request.payload,
        content_type: request.content_type,
        labels: request.labels,
        deadline,
    })
}

pub fn idempotency_record(scope: &str, request_id: &str, record: &Record) -> pb::IdempotencyRecord {
    pb::IdempotencyRecord {
        scope: scope.to_owned(),
        request_id: request_id.to_owned(),
        state: match record.state {
            RecordState::Processing => pb::RecordState::Processing,
            RecordState::Done => pb::RecordState::Done,
        } as i32,
        result: record.result.clone(),
        response: record.response.clone(),
        content_type: record.content_type.clone(),
        created_at: Some(timestamp(record.created_ms)),
        updated_at: Some(timestamp(record.updated_ms)),
        expires_at: (record.expires_ms != 0).then(|| timestamp(record.expires_ms)),
        attempts: record.attempts,
    }
}
