//! Conversions between domain values and the ledger's stored records. A record that does not
//! convert back is corrupt: that is reported, never unwrapped.

use crate::domain::idempotency::{Record, RecordState};
use crate::domain::ids::{BusinessType, CoordinatorId, Gsn, RequestId};
use crate::domain::saga::{Saga, SagaMode, SagaState};
use crate::store::{self, IdempotencyRecord, SagaRecord};

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

pub fn saga_to_record(saga: &Saga) -> SagaRecord {
    SagaRecord {
        coordinator_id: saga.gsn.coordinator().as_str().to_owned(),
        sequence: saga.gsn.sequence(),
        business_type: saga.business_type.as_str().to_owned(),
        mode: mode_code(saga.mode),
        payload: saga.payload.clone(),
        content_type: saga.content_type.clone(),
        labels: saga.labels.clone(),
        deadline_ms: saga.deadline_ms.unwrap_or(0),
        state: saga_state_code(saga.state),
        created_ms: saga.created_ms,
        updated_ms: saga.updated_ms,
        request_id: saga.request_id.as_str().to_owned(),
    }
}

pub fn saga_from_record(record: SagaRecord) -> Result<Saga, store::Error> {
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
        payload: record.payload,
        content_type: record.content_type,
        labels: record.labels,
        deadline_ms: (record.deadline_ms != 0).then_some(record.deadline_ms),
        state,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        request_id: RequestId::parse(&record.request_id)
            .map_err(|e| corrupt(TABLE, format!("request id: {e}")))?,
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
    }
}

pub fn idempotency_from_record(record: IdempotencyRecord) -> Result<Record, store::Error> {
    let state = match record.state {
        1 => RecordState::Processing,
        2 => RecordState::Done,
        other => return Err(corrupt("idempotency", format!("state {other}"))),
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
    })
}
