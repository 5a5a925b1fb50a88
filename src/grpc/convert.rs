//! Conversions between generated `pb` messages and domain values, at the edge. Incoming
//! messages that cannot convert become field violations naming what to fix.

use prost_types::{Duration as PbDuration, Timestamp};

use crate::domain::branch::{Branch, BranchState, Outcome, Signal, Status};
use crate::domain::idempotency::{Lease, Record, RecordState};
use crate::domain::saga::{Deadline, Saga, SagaMode, SagaState, StartRequest};
use crate::domain::{Millis, Violation};
use crate::grpc::pb;

/// The last instant a protobuf Timestamp may hold, 9999-12-31T23:59:59.999Z, in milliseconds.
const MAX_TIMESTAMP_MS: Millis = 253_402_300_799_999;

/// Clamped to the Timestamp range: a later time (a deadline stored before deadlines were
/// bounded) would make the whole answer unprintable as JSON (grpcurl, sagactl).
pub fn timestamp(ms: Millis) -> Timestamp {
    let ms = ms.min(MAX_TIMESTAMP_MS);
    Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A whole number of milliseconds as a protobuf Duration.
pub fn duration_pb(ms: Millis) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(ms / 1_000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1_000) * 1_000_000).unwrap_or(0),
    }
}

/// A time as whole milliseconds, a part of one counting as a whole one: a deadline is then
/// never passed before the instant the caller named.
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
        .saturating_add(nanos.div_ceil(1_000_000)))
}

pub fn duration(field: &str, d: &PbDuration) -> Result<std::time::Duration, Violation> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Violation::new(field, "must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(Violation::new(
            field,
            format!(
                "has nanos {}; nanos must be 0 to 999,999,999 (whole seconds go in seconds)",
                d.nanos
            ),
        ));
    }
    let seconds = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Ok(std::time::Duration::new(seconds, nanos))
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

/// ListSagas' `states` filter as a set: the request may repeat a state any number of times
/// (a 4 MiB message holds millions), and every saga a page examines is checked against the
/// filter on the ledger's one reader, so it is kept to at most the five states. `Err` carries
/// the first value that is not a saga state.
pub fn saga_states_filter(values: &[i32]) -> Result<Vec<SagaState>, i32> {
    let mut states = Vec::new();
    for &value in values {
        let state = saga_state_from_pb(value).ok_or(value)?;
        if !states.contains(&state) {
            states.push(state);
        }
    }
    Ok(states)
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
        strategy_version: saga.strategy_version,
        branches: if full {
            saga.branches.iter().map(branch).collect()
        } else {
            Vec::new()
        },
        signal: signal_of(saga.signal) as i32,
        reason: saga.reason.clone(),
        // Up to 100 serials of 128 characters: left out with the branches, so a listing stays
        // small.
        reversal_serials: if full {
            saga.reversal_serials.clone()
        } else {
            Vec::new()
        },
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
            // Rounded up, as every duration a client gives: 0.5 ms is a short timeout, not
            // the zero that is refused.
            Ok(d) => Deadline::After(crate::domain::millis_rounded_up(d)),
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
    let lease_ms = match record.lease {
        Lease::After(lease_ms) => Some(lease_ms),
        Lease::Never | Lease::Unrecorded => None,
    };
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
        processing_timeout: lease_ms.map(duration_pb),
        takeover_at: lease_ms
            .filter(|_| record.state == RecordState::Processing)
            .map(|lease| timestamp(record.updated_ms.saturating_add(lease))),
    }
}

/// A node's outcome; UNSPECIFIED or a number this build does not know reads as UNKNOWN, which
/// makes sagad ask again rather than guess.
pub fn outcome_from_pb(value: i32) -> Outcome {
    match pb::Outcome::try_from(value) {
        Ok(pb::Outcome::Succeeded) => Outcome::Succeeded,
        Ok(pb::Outcome::Failed) => Outcome::Failed,
        Ok(pb::Outcome::Processing) => Outcome::Processing,
        Ok(pb::Outcome::NotFound) => Outcome::NotFound,
        Ok(pb::Outcome::Reversed) => Outcome::Reversed,
        Ok(pb::Outcome::Unknown | pb::Outcome::Unspecified) | Err(_) => Outcome::Unknown,
    }
}

pub fn outcome_to_pb(outcome: Outcome) -> pb::Outcome {
    match outcome {
        Outcome::Succeeded => pb::Outcome::Succeeded,
        Outcome::Failed => pb::Outcome::Failed,
        Outcome::Processing => pb::Outcome::Processing,
        Outcome::Unknown => pb::Outcome::Unknown,
        Outcome::NotFound => pb::Outcome::NotFound,
        Outcome::Reversed => pb::Outcome::Reversed,
    }
}

pub fn status_from_pb(status: pb::Status) -> Status {
    Status {
        name: status.name,
        parameters: status.parameters,
    }
}

fn status_to_pb(status: &Status) -> pb::Status {
    pb::Status {
        name: status.name.clone(),
        parameters: status.parameters.clone(),
    }
}

pub fn signal_of(signal: Option<Signal>) -> pb::Signal {
    match signal {
        None => pb::Signal::Unspecified,
        Some(Signal::ReversalSuccess) => pb::Signal::ReversalSuccess,
        Some(Signal::Reprocess) => pb::Signal::Reprocess,
        Some(Signal::ReversalFailure) => pb::Signal::ReversalFailure,
        Some(Signal::Completed) => pb::Signal::Completed,
    }
}

/// From the engine's stored signal code.
pub fn signal_to_pb(code: u8) -> pb::Signal {
    signal_of(crate::engine::signal_from_code(code))
}

pub fn branch_state(state: BranchState) -> pb::BranchState {
    match state {
        BranchState::Triggered => pb::BranchState::Triggered,
        BranchState::Succeeded => pb::BranchState::Succeeded,
        BranchState::Failed => pb::BranchState::Failed,
        BranchState::Unknown => pb::BranchState::Unknown,
        BranchState::Reversing => pb::BranchState::Reversing,
        BranchState::Reversed => pb::BranchState::Reversed,
        BranchState::ReversalFailed => pb::BranchState::ReversalFailed,
        BranchState::NotOccurred => pb::BranchState::NotOccurred,
    }
}

pub fn branch(branch: &Branch) -> pb::Branch {
    pb::Branch {
        branch_id: branch.branch_id.clone(),
        node_id: branch.node_id.clone(),
        caller_node_id: branch.caller_node_id.clone(),
        forward_action: branch.forward_action.clone(),
        reversal_action: branch.reversal_action.clone(),
        order: branch.order,
        state: branch_state(branch.state) as i32,
        last_status: branch.last_status.as_ref().map(status_to_pb),
        error_code: branch.error_code.clone(),
        attempts: branch.attempts,
        created_at: Some(timestamp(branch.created_ms)),
        updated_at: Some(timestamp(branch.updated_ms)),
        last_poll_outcome: branch
            .last_poll_outcome
            .map(outcome_to_pb)
            .unwrap_or(pb::Outcome::Unspecified) as i32,
        last_poll_at: (branch.last_poll_ms != 0).then(|| timestamp(branch.last_poll_ms)),
        polls: branch.polls,
        next_attempt_at: branch.retry_at_ms.map(timestamp),
        timeline: branch
            .timeline
            .iter()
            .map(|t| pb::TimelineEntry {
                at: Some(timestamp(t.at_ms)),
                what: t.what.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_states_filter_repeating_states_millions_of_times_is_kept_as_the_states_it_names() {
        let mut values = vec![pb::SagaState::NeedsAttention as i32; 4_000_000];
        values.push(pb::SagaState::Running as i32);
        values.push(pb::SagaState::NeedsAttention as i32);
        assert_eq!(
            saga_states_filter(&values).unwrap(),
            [SagaState::NeedsAttention, SagaState::Running]
        );
        assert_eq!(saga_states_filter(&[]).unwrap(), []);
        assert_eq!(
            saga_states_filter(&[pb::SagaState::Completed as i32, 0, 99]),
            Err(0),
            "UNSPECIFIED is not a state to filter by"
        );
    }

    #[test]
    fn a_time_past_the_timestamp_range_is_shown_as_its_last_instant() {
        let last = timestamp(MAX_TIMESTAMP_MS);
        assert_eq!((last.seconds, last.nanos), (253_402_300_799, 999_000_000));
        assert_eq!(timestamp(Millis::MAX), last);
        assert_eq!(timestamp(1_500).seconds, 1);
    }

    #[test]
    fn a_timestamp_between_milliseconds_is_kept_as_the_next_one() {
        let at = |seconds, nanos| timestamp_ms("t", &Timestamp { seconds, nanos });
        assert_eq!(at(2, 0).unwrap(), 2_000);
        assert_eq!(at(2, 1).unwrap(), 2_001);
        assert_eq!(at(2, 1_000_000).unwrap(), 2_001);
        assert_eq!(at(2, 999_999_999).unwrap(), 3_000);
        assert!(at(-1, 0).is_err() && at(0, 1_000_000_000).is_err());
    }

    #[test]
    fn a_duration_out_of_range_is_refused_saying_which_part_to_fix() {
        let of = |seconds, nanos| duration("d", &PbDuration { seconds, nanos });
        assert!(of(-1, 0).unwrap_err().description.contains("negative"));
        assert!(of(0, -1).unwrap_err().description.contains("negative"));
        let too_many = of(0, 1_500_000_000).unwrap_err().description;
        assert!(too_many.contains("0 to 999,999,999"), "{too_many}");
        assert_eq!(
            of(1, 999_999_999).unwrap(),
            std::time::Duration::new(1, 999_999_999)
        );
    }
}
