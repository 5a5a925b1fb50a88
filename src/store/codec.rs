//! The byte formats of the ledger: versioned record values and big-endian keys. Only this file
//! knows how bytes on disk map to records; it never panics on what it reads.

use super::records::{
    BranchRecord, DueRecord, IdempotencyRecord, NodeRecord, OutboxRecord, PayloadRecord,
    RetryConfigRecord, RetryHistoryRecord, RetryLinkRecord, SagaRecord, StepStatusRecord,
    StrategyRecord, TimelineRecord,
};
use super::{DueKey, Error, IdempotencyKey, IdempotencyNamespace};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A stored record type: its table and the format version it writes.
///
/// A value on disk is `[version] ++ postcard(record)`. When a record's shape changes, its type
/// bumps `VERSION` and overrides `decode_older` to read (and upgrade) the bodies that older
/// sagad versions wrote, so a ledger never has to be migrated in one go.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// The table name used in error messages.
    const TABLE: &'static str;
    /// The version this sagad writes.
    const VERSION: u8;

    /// Decodes a body written with an older `version` than `VERSION`. Version 1 has no
    /// predecessor, so by default every older version is unknown.
    fn decode_older(version: u8, body: &[u8]) -> Result<Self, Error> {
        let _ = body;
        Err(Error::UnknownVersion {
            table: Self::TABLE,
            version,
        })
    }
}

/// Version 2 moved the payload out to `payloads` and added branches and run state; version 3
/// added each branch's `retry_at_ms`; version 4 each branch's `earlier_reversal_sends`.
impl Record for SagaRecord {
    const TABLE: &'static str = "sagas";
    const VERSION: u8 = 4;

    /// A version 1 saga reads as a saga with no branches and no run state yet. Its payload is
    /// not part of the new shape: `Store::open` moves it to `payloads` (see `upgrade`), so this
    /// path only serves a record that the upgrade could not move. A version 2 saga reads with
    /// no resend waiting on any branch (see `SagaRecordV2`), and a version 3 saga with every
    /// reversal in its first round (see `SagaRecordV3`).
    fn decode_older(version: u8, body: &[u8]) -> Result<Self, Error> {
        match version {
            1 => decode_saga_v1(body).map(|(saga, _payload)| saga),
            2 => decode_body::<SagaRecordV2>(Self::TABLE, body).map(SagaRecordV2::upgrade),
            3 => decode_body::<SagaRecordV3>(Self::TABLE, body).map(SagaRecordV3::upgrade),
            _ => Err(Error::UnknownVersion {
                table: Self::TABLE,
                version,
            }),
        }
    }
}

/// The shape of `SagaRecord` that version 3 wrote: branches without `earlier_reversal_sends`.
/// Field order is the format; never edit it. A version 3 build started every round of a
/// reversal at send 1, so its sends all belong to the current round: 0 earlier ones.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SagaRecordV3 {
    coordinator_id: String,
    sequence: u64,
    business_type: String,
    mode: u8,
    content_type: String,
    labels: BTreeMap<String, String>,
    deadline_ms: u64,
    state: u8,
    created_ms: u64,
    updated_ms: u64,
    request_id: String,
    strategy_version: u64,
    branches: Vec<BranchRecordV3>,
    reported: Vec<StepStatusRecord>,
    fired_rules: Vec<u32>,
    signal: u8,
    reason: String,
    reversal_serials: Vec<String>,
    reversal_type: u8,
    reversal_target: String,
}

/// A branch as saga record version 3 stored it. Field order is the format; never edit it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct BranchRecordV3 {
    branch_id: String,
    node_id: String,
    caller_node_id: String,
    forward_action: String,
    reversal_action: String,
    order: u32,
    state: u8,
    last_status: String,
    last_status_parameters: BTreeMap<String, String>,
    error_code: String,
    message: String,
    attempts: u32,
    retry_at_ms: u64,
    created_ms: u64,
    updated_ms: u64,
    last_poll_outcome: u8,
    last_poll_ms: u64,
    polls: u32,
    timeout_ms: u64,
    timeline: Vec<TimelineRecord>,
}

impl SagaRecordV3 {
    fn upgrade(self) -> SagaRecord {
        SagaRecord {
            coordinator_id: self.coordinator_id,
            sequence: self.sequence,
            business_type: self.business_type,
            mode: self.mode,
            content_type: self.content_type,
            labels: self.labels,
            deadline_ms: self.deadline_ms,
            state: self.state,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            request_id: self.request_id,
            strategy_version: self.strategy_version,
            branches: self
                .branches
                .into_iter()
                .map(BranchRecordV3::upgrade)
                .collect(),
            reported: self.reported,
            fired_rules: self.fired_rules,
            signal: self.signal,
            reason: self.reason,
            reversal_serials: self.reversal_serials,
            reversal_type: self.reversal_type,
            reversal_target: self.reversal_target,
        }
    }
}

impl BranchRecordV3 {
    fn upgrade(self) -> BranchRecord {
        BranchRecord {
            branch_id: self.branch_id,
            node_id: self.node_id,
            caller_node_id: self.caller_node_id,
            forward_action: self.forward_action,
            reversal_action: self.reversal_action,
            order: self.order,
            state: self.state,
            last_status: self.last_status,
            last_status_parameters: self.last_status_parameters,
            error_code: self.error_code,
            message: self.message,
            attempts: self.attempts,
            retry_at_ms: self.retry_at_ms,
            earlier_reversal_sends: 0,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            last_poll_outcome: self.last_poll_outcome,
            last_poll_ms: self.last_poll_ms,
            polls: self.polls,
            timeout_ms: self.timeout_ms,
            timeline: self.timeline,
        }
    }
}

/// The shape of `SagaRecord` that version 2 wrote: branches without `retry_at_ms`. Field order
/// is the format; never edit it. A branch of that version whose retry waited had already
/// counted the resend in `attempts`; the engine's retry timer knows that shape by its missing
/// `retry_at_ms` and does not count the resend twice.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SagaRecordV2 {
    coordinator_id: String,
    sequence: u64,
    business_type: String,
    mode: u8,
    content_type: String,
    labels: BTreeMap<String, String>,
    deadline_ms: u64,
    state: u8,
    created_ms: u64,
    updated_ms: u64,
    request_id: String,
    strategy_version: u64,
    branches: Vec<BranchRecordV2>,
    reported: Vec<StepStatusRecord>,
    fired_rules: Vec<u32>,
    signal: u8,
    reason: String,
    reversal_serials: Vec<String>,
    reversal_type: u8,
    reversal_target: String,
}

/// A branch as saga record version 2 stored it. Field order is the format; never edit it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct BranchRecordV2 {
    branch_id: String,
    node_id: String,
    caller_node_id: String,
    forward_action: String,
    reversal_action: String,
    order: u32,
    state: u8,
    last_status: String,
    last_status_parameters: BTreeMap<String, String>,
    error_code: String,
    message: String,
    attempts: u32,
    created_ms: u64,
    updated_ms: u64,
    last_poll_outcome: u8,
    last_poll_ms: u64,
    polls: u32,
    timeout_ms: u64,
    timeline: Vec<TimelineRecord>,
}

impl SagaRecordV2 {
    fn upgrade(self) -> SagaRecord {
        SagaRecord {
            coordinator_id: self.coordinator_id,
            sequence: self.sequence,
            business_type: self.business_type,
            mode: self.mode,
            content_type: self.content_type,
            labels: self.labels,
            deadline_ms: self.deadline_ms,
            state: self.state,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            request_id: self.request_id,
            strategy_version: self.strategy_version,
            branches: self
                .branches
                .into_iter()
                .map(BranchRecordV2::upgrade)
                .collect(),
            reported: self.reported,
            fired_rules: self.fired_rules,
            signal: self.signal,
            reason: self.reason,
            reversal_serials: self.reversal_serials,
            reversal_type: self.reversal_type,
            reversal_target: self.reversal_target,
        }
    }
}

impl BranchRecordV2 {
    fn upgrade(self) -> BranchRecord {
        BranchRecord {
            branch_id: self.branch_id,
            node_id: self.node_id,
            caller_node_id: self.caller_node_id,
            forward_action: self.forward_action,
            reversal_action: self.reversal_action,
            order: self.order,
            state: self.state,
            last_status: self.last_status,
            last_status_parameters: self.last_status_parameters,
            error_code: self.error_code,
            message: self.message,
            attempts: self.attempts,
            retry_at_ms: 0,
            earlier_reversal_sends: 0,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            last_poll_outcome: self.last_poll_outcome,
            last_poll_ms: self.last_poll_ms,
            polls: self.polls,
            timeout_ms: self.timeout_ms,
            timeline: self.timeline,
        }
    }
}

/// The shape of `SagaRecord` that version 1 wrote (sagad 0.1 before the engine): the payload
/// lived inside the saga and there were no branches. Field order is the format; never edit it.
#[derive(Deserialize)]
struct SagaRecordV1 {
    coordinator_id: String,
    sequence: u64,
    business_type: String,
    mode: u8,
    payload: Vec<u8>,
    content_type: String,
    labels: BTreeMap<String, String>,
    deadline_ms: u64,
    state: u8,
    created_ms: u64,
    updated_ms: u64,
    request_id: String,
}

/// Splits a version 1 saga body into the current saga shape and the payload it carried.
pub(crate) fn decode_saga_v1(body: &[u8]) -> Result<(SagaRecord, PayloadRecord), Error> {
    let old: SagaRecordV1 = decode_body(SagaRecord::TABLE, body)?;
    let payload = PayloadRecord {
        data: old.payload,
        content_type: old.content_type.clone(),
    };
    let saga = SagaRecord {
        coordinator_id: old.coordinator_id,
        sequence: old.sequence,
        business_type: old.business_type,
        mode: old.mode,
        content_type: old.content_type,
        labels: old.labels,
        deadline_ms: old.deadline_ms,
        state: old.state,
        created_ms: old.created_ms,
        updated_ms: old.updated_ms,
        request_id: old.request_id,
        strategy_version: 0,
        branches: Vec::new(),
        reported: Vec::new(),
        fired_rules: Vec::new(),
        signal: 0,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: 0,
        reversal_target: String::new(),
    };
    Ok((saga, payload))
}

/// A value as sagad 0.1 wrote it: `record` (whose newer fields it drops) with `payload` inside.
#[cfg(test)]
pub(crate) fn encode_saga_v1(record: &SagaRecord, payload: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Written<'a> {
        coordinator_id: &'a str,
        sequence: u64,
        business_type: &'a str,
        mode: u8,
        payload: &'a [u8],
        content_type: &'a str,
        labels: &'a BTreeMap<String, String>,
        deadline_ms: u64,
        state: u8,
        created_ms: u64,
        updated_ms: u64,
        request_id: &'a str,
    }
    let written = Written {
        coordinator_id: &record.coordinator_id,
        sequence: record.sequence,
        business_type: &record.business_type,
        mode: record.mode,
        payload,
        content_type: &record.content_type,
        labels: &record.labels,
        deadline_ms: record.deadline_ms,
        state: record.state,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        request_id: &record.request_id,
    };
    let mut bytes = vec![1];
    bytes.extend(postcard::to_stdvec(&written).unwrap_or_default());
    bytes
}

impl Record for PayloadRecord {
    const TABLE: &'static str = "payloads";
    const VERSION: u8 = 1;
}

impl Record for StrategyRecord {
    const TABLE: &'static str = "strategies";
    const VERSION: u8 = 1;
}

impl Record for NodeRecord {
    const TABLE: &'static str = "nodes";
    const VERSION: u8 = 1;
}

impl Record for RetryConfigRecord {
    const TABLE: &'static str = "retry_config";
    const VERSION: u8 = 1;
}

impl Record for RetryHistoryRecord {
    const TABLE: &'static str = "retry_history";
    const VERSION: u8 = 1;
}

impl Record for RetryLinkRecord {
    const TABLE: &'static str = "retry_links";
    const VERSION: u8 = 1;
}

/// Version 2 added the processing lease the record holds (`lease_kind`,
/// `processing_lease_ms`).
impl Record for IdempotencyRecord {
    const TABLE: &'static str = "idempotency";
    const VERSION: u8 = 2;

    /// A version 1 record reads as one that kept no lease (`lease_kind` 0): it is judged by
    /// each asker's lease, as the sagad that wrote it judged it.
    fn decode_older(version: u8, body: &[u8]) -> Result<Self, Error> {
        match version {
            1 => decode_body::<IdempotencyRecordV1>(Self::TABLE, body)
                .map(IdempotencyRecordV1::upgrade),
            _ => Err(Error::UnknownVersion {
                table: Self::TABLE,
                version,
            }),
        }
    }
}

/// The shape of `IdempotencyRecord` that version 1 wrote: no lease. Field order is the format;
/// never edit it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct IdempotencyRecordV1 {
    fingerprint: Vec<u8>,
    state: u8,
    result: String,
    response: Vec<u8>,
    content_type: String,
    created_ms: u64,
    updated_ms: u64,
    expires_ms: u64,
    attempts: u32,
}

impl IdempotencyRecordV1 {
    fn upgrade(self) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: self.fingerprint,
            state: self.state,
            result: self.result,
            response: self.response,
            content_type: self.content_type,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            expires_ms: self.expires_ms,
            attempts: self.attempts,
            lease_kind: 0,
            processing_lease_ms: 0,
        }
    }
}

/// A value as a sagad before idempotency record version 2 wrote it: `record` without its lease.
#[cfg(test)]
pub(crate) fn encode_idempotency_v1(record: &IdempotencyRecord) -> Vec<u8> {
    let written = IdempotencyRecordV1 {
        fingerprint: record.fingerprint.clone(),
        state: record.state,
        result: record.result.clone(),
        response: record.response.clone(),
        content_type: record.content_type.clone(),
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        expires_ms: record.expires_ms,
        attempts: record.attempts,
    };
    let mut bytes = vec![1];
    bytes.extend(postcard::to_stdvec(&written).unwrap_or_default());
    bytes
}

impl Record for OutboxRecord {
    const TABLE: &'static str = "outbox";
    const VERSION: u8 = 1;
}

impl Record for DueRecord {
    const TABLE: &'static str = "due";
    const VERSION: u8 = 1;
}

/// Room reserved before encoding: a saga record with a few branches, a command or an outbox
/// entry fits. postcard appends to its buffer a field at a time, so a buffer that starts small
/// is regrown six or seven times per record; those regrowths were about 4% of sagad's
/// instructions per saga (docs/benchmarks.md). A larger value still grows as it needs to.
pub(crate) const ENCODE_CAPACITY: usize = 512;

/// Encodes `record` as its table's current version.
pub(crate) fn encode<R: Record>(record: &R) -> Result<Vec<u8>, Error> {
    let mut buffer = Vec::with_capacity(ENCODE_CAPACITY);
    buffer.push(R::VERSION);
    postcard::to_extend(record, buffer)
        .map_err(|e| Error::Storage(format!("cannot encode a record of table {}: {e}", R::TABLE)))
}

/// postcard's encoding of `value` without a version byte (a command or timer held inside a
/// record), into a buffer with room reserved like `encode`'s.
pub(crate) fn encode_unversioned<T: Serialize>(value: &T) -> postcard::Result<Vec<u8>> {
    postcard::to_extend(value, Vec::with_capacity(ENCODE_CAPACITY))
}

/// Decodes a stored value, whatever version of this sagad (or an older one) wrote it.
pub(crate) fn decode<R: Record>(bytes: &[u8]) -> Result<R, Error> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(corrupt(R::TABLE, "empty value"));
    };
    if version == R::VERSION {
        decode_body(R::TABLE, body)
    } else if version < R::VERSION {
        R::decode_older(version, body)
    } else {
        Err(Error::UnknownVersion {
            table: R::TABLE,
            version,
        })
    }
}

/// Decodes one postcard body that must fill `body` exactly: trailing bytes mean the value is
/// not what we think it is, so they are corruption rather than something to ignore.
pub(crate) fn decode_body<T: DeserializeOwned>(
    table: &'static str,
    body: &[u8],
) -> Result<T, Error> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(corrupt(table, &format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(corrupt(table, &e.to_string())),
    }
}

pub(crate) fn corrupt(table: &'static str, detail: &str) -> Error {
    Error::Corrupt {
        table,
        detail: detail.to_owned(),
    }
}

/// A `u64` key (sequence, outbox id, counter value): big-endian so byte order is number order.
pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(crate) fn decode_u64(table: &'static str, bytes: &[u8]) -> Result<u64, Error> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(table, &format!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

/// `namespace ++ u32 BE len(scope) ++ scope ++ key`: the length prefix keeps `("ab", "c")` and
/// `("a", "bc")` apart, and the namespace byte first keeps participants out of sagad's records.
pub(crate) fn idempotency_key(key: &IdempotencyKey) -> Result<Vec<u8>, Error> {
    let scope_len = u32::try_from(key.scope.len()).map_err(|_| {
        Error::Storage("an idempotency scope longer than 4 GiB cannot be stored".into())
    })?;
    let mut bytes = Vec::with_capacity(1 + 4 + key.scope.len() + key.key.len());
    bytes.push(key.namespace as u8);
    bytes.extend_from_slice(&scope_len.to_be_bytes());
    bytes.extend_from_slice(key.scope.as_bytes());
    bytes.extend_from_slice(key.key.as_bytes());
    Ok(bytes)
}

/// The key `idempotency_key` encoded, read back; `None` for bytes it cannot have written.
pub(crate) fn split_idempotency_key(bytes: &[u8]) -> Option<IdempotencyKey> {
    let (&namespace, rest) = bytes.split_first()?;
    let namespace = match namespace {
        0 => IdempotencyNamespace::Coordinator,
        1 => IdempotencyNamespace::Participant,
        _ => return None,
    };
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (scope, key) = rest.split_at(len);
    Some(IdempotencyKey {
        namespace,
        scope: String::from_utf8(scope.to_vec()).ok()?,
        key: String::from_utf8(key.to_vec()).ok()?,
    })
}

/// `expires_ms BE ++ idempotency key bytes`: the expiry index sorts by instant, so collection
/// scans from the start and stops at the first entry still alive.
pub(crate) fn expiry_key(expires_ms: u64, idempotency_key: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + idempotency_key.len());
    bytes.extend_from_slice(&expires_ms.to_be_bytes());
    bytes.extend_from_slice(idempotency_key);
    bytes
}

/// Splits an expiry index key into its instant and the idempotency key it points at.
pub(crate) fn split_expiry_key(bytes: &[u8]) -> Result<(u64, &[u8]), Error> {
    if bytes.len() < 8 {
        return Err(corrupt("idempotency_expiry", "key shorter than 8 bytes"));
    }
    let (instant, key) = bytes.split_at(8);
    Ok((decode_u64("idempotency_expiry", instant)?, key))
}

/// The first key strictly after every expiry index entry with `expires_ms <= now_ms`, or
/// `None` when no such key exists (every entry is due).
pub(crate) fn expiry_bound(now_ms: u64) -> Option<[u8; 8]> {
    now_ms.checked_add(1).map(u64::to_be_bytes)
}

/// `sequence BE ++ branch id`: the fixed-width sequence keeps every branch id apart, and a
/// saga's payloads (its own, with branch id "", first) are adjacent.
pub(crate) fn payload_key(sequence: u64, branch_id: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + branch_id.len());
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.extend_from_slice(branch_id.as_bytes());
    bytes
}

/// Ends the business type in a strategy key. Business types never contain it, and it is the
/// smallest byte, so keys sort by business type first, then by version.
const STRATEGY_SEPARATOR: u8 = 0x00;

/// `business type ++ 0x00`: every version of one business type, and nothing else, starts with
/// it. `None` when the business type contains 0x00, which no stored strategy can have.
pub(crate) fn strategy_prefix(business_type: &str) -> Option<Vec<u8>> {
    if business_type.as_bytes().contains(&STRATEGY_SEPARATOR) {
        return None;
    }
    let mut bytes = Vec::with_capacity(business_type.len() + 9);
    bytes.extend_from_slice(business_type.as_bytes());
    bytes.push(STRATEGY_SEPARATOR);
    Some(bytes)
}

/// The first key after every version of `prefix`'s business type (the separator plus one).
pub(crate) fn strategy_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = STRATEGY_SEPARATOR + 1;
    }
    end
}

/// `business type ++ 0x00 ++ version BE`; `None` when the business type contains 0x00.
pub(crate) fn strategy_key(business_type: &str, version: u64) -> Option<Vec<u8>> {
    let mut bytes = strategy_prefix(business_type)?;
    bytes.extend_from_slice(&version.to_be_bytes());
    Some(bytes)
}

/// The key of a strategy about to be written: a business type with 0x00 would make keys
/// ambiguous, and version 0 is how readers ask for "the latest", so neither is stored.
pub(crate) fn strategy_key_to_write(record: &StrategyRecord) -> Result<Vec<u8>, Error> {
    if record.version == 0 {
        return Err(Error::Storage(format!(
            "strategy version 0 of business type {:?} cannot be stored: version 0 means \
             \"the latest\" to readers",
            record.business_type
        )));
    }
    strategy_key(&record.business_type, record.version).ok_or_else(|| {
        Error::Storage(format!(
            "business type {:?} contains a 0x00 byte, which strategy keys use as a separator",
            record.business_type
        ))
    })
}

/// The prefix (`business type ++ 0x00`) of a stored strategy key, which names its group of
/// versions.
pub(crate) fn strategy_group_prefix(bytes: &[u8]) -> Result<&[u8], Error> {
    match bytes.iter().position(|&b| b == STRATEGY_SEPARATOR) {
        Some(separator) => Ok(&bytes[..=separator]),
        None => Err(corrupt("strategies", "key without a separator")),
    }
}

/// The business type a strategy key names, as text (lossy: the key may be damaged); the whole
/// key when it has no separator.
pub(crate) fn strategy_business_type_of_key(key: &[u8]) -> String {
    let name = match key.iter().position(|&b| b == STRATEGY_SEPARATOR) {
        Some(separator) => &key[..separator],
        None => key,
    };
    String::from_utf8_lossy(name).into_owned()
}

/// The first strategy key of any business type strictly after `after`. No business type has
/// 0x00, so one that follows `after` also follows `after` cut at its first 0x00 and is not
/// that cut itself; the cut plus 0x01 is therefore the bound in both cases.
pub(crate) fn strategies_after(after: &str) -> Vec<u8> {
    let bytes = after.as_bytes();
    let cut = bytes
        .iter()
        .position(|&b| b == STRATEGY_SEPARATOR)
        .unwrap_or(bytes.len());
    let mut bound = bytes[..cut].to_vec();
    bound.push(STRATEGY_SEPARATOR + 1);
    bound
}

/// `at_ms BE ++ id BE`.
pub(crate) fn due_key(key: DueKey) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.at_ms.to_be_bytes());
    bytes[8..].copy_from_slice(&key.id.to_be_bytes());
    bytes
}

pub(crate) fn decode_due_key(bytes: &[u8]) -> Result<DueKey, Error> {
    if bytes.len() != 16 {
        return Err(corrupt(
            "due",
            &format!("expected a 16-byte key, found {}", bytes.len()),
        ));
    }
    let (at, id) = bytes.split_at(8);
    Ok(DueKey {
        at_ms: decode_u64("due", at)?,
        id: decode_u64("due", id)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{
        BranchRecord, ChannelRetryRecord, ExceptionScopeRecord, RetryAttemptRecord,
        RetryPolicyRecord, RuleRecord, StatusMappingRecord, StepRecord, StepStatusRecord,
        TimelineRecord, TransactionRetryRecord,
    };
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// Payloads from empty to well past sled's 128 KiB blob threshold, mostly small.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => vec(any::<u8>(), 0..64),
            1 => vec(any::<u8>(), 0..200_000),
        ]
    }

    /// Short text, including the empty string and non-ASCII characters.
    fn text() -> impl Strategy<Value = String> {
        ".{0,12}"
    }

    fn texts() -> impl Strategy<Value = Vec<String>> {
        vec(text(), 0..4)
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        btree_map(text(), text(), 0..4)
    }

    fn step_status() -> impl Strategy<Value = StepStatusRecord> {
        (text(), text()).prop_map(|(step_id, status)| StepStatusRecord { step_id, status })
    }

    fn timeline() -> impl Strategy<Value = TimelineRecord> {
        (any::<u64>(), ".*").prop_map(|(at_ms, what)| TimelineRecord { at_ms, what })
    }

    fn branch() -> impl Strategy<Value = BranchRecord> {
        (
            (text(), text(), text(), text(), text(), any::<u32>()),
            (any::<u8>(), text(), labels(), text(), ".*", any::<u32>()),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u8>(),
                any::<u64>(),
                any::<u32>(),
            ),
            (
                any::<u64>(),
                vec(timeline(), 0..4),
                any::<u64>(),
                any::<u32>(),
            ),
        )
            .prop_map(
                |(
                    (branch_id, node_id, caller_node_id, forward_action, reversal_action, order),
                    (state, last_status, last_status_parameters, error_code, message, attempts),
                    (created_ms, updated_ms, last_poll_outcome, last_poll_ms, polls),
                    (timeout_ms, timeline, retry_at_ms, earlier_reversal_sends),
                )| BranchRecord {
                    branch_id,
                    node_id,
                    caller_node_id,
                    forward_action,
                    reversal_action,
                    order,
                    state,
                    last_status,
                    last_status_parameters,
                    error_code,
                    message,
                    attempts,
                    retry_at_ms,
                    earlier_reversal_sends,
                    created_ms,
                    updated_ms,
                    last_poll_outcome,
                    last_poll_ms,
                    polls,
                    timeout_ms,
                    timeline,
                },
            )
    }

    fn saga() -> impl Strategy<Value = SagaRecord> {
        (
            (".*", any::<u64>(), ".*", any::<u8>(), ".*"),
            (labels(), any::<u64>(), any::<u8>()),
            (any::<u64>(), any::<u64>(), ".*", any::<u64>()),
            (
                vec(branch(), 0..4),
                vec(step_status(), 0..4),
                vec(any::<u32>(), 0..4),
            ),
            (any::<u8>(), ".*", texts(), any::<u8>()),
        )
            .prop_map(
                |(
                    (coordinator_id, sequence, business_type, mode, content_type),
                    (labels, deadline_ms, state),
                    (created_ms, updated_ms, request_id, strategy_version),
                    (branches, reported, fired_rules),
                    (signal, reason, reversal_serials, reversal_type),
                )| SagaRecord {
                    coordinator_id,
                    sequence,
                    business_type,
                    mode,
                    content_type,
                    labels,
                    deadline_ms,
                    state,
                    created_ms,
                    updated_ms,
                    request_id,
                    strategy_version,
                    branches,
                    reported,
                    fired_rules,
                    signal,
                    reason,
                    reversal_serials,
                    reversal_type,
                    reversal_target: String::new(),
                },
            )
    }

    /// `record` in the shape version 2 wrote, which drops each branch's `retry_at_ms`.
    fn as_version_2(record: SagaRecord) -> SagaRecordV2 {
        SagaRecordV2 {
            coordinator_id: record.coordinator_id,
            sequence: record.sequence,
            business_type: record.business_type,
            mode: record.mode,
            content_type: record.content_type,
            labels: record.labels,
            deadline_ms: record.deadline_ms,
            state: record.state,
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
            request_id: record.request_id,
            strategy_version: record.strategy_version,
            branches: record
                .branches
                .into_iter()
                .map(|b| BranchRecordV2 {
                    branch_id: b.branch_id,
                    node_id: b.node_id,
                    caller_node_id: b.caller_node_id,
                    forward_action: b.forward_action,
                    reversal_action: b.reversal_action,
                    order: b.order,
                    state: b.state,
                    last_status: b.last_status,
                    last_status_parameters: b.last_status_parameters,
                    error_code: b.error_code,
                    message: b.message,
                    attempts: b.attempts,
                    created_ms: b.created_ms,
                    updated_ms: b.updated_ms,
                    last_poll_outcome: b.last_poll_outcome,
                    last_poll_ms: b.last_poll_ms,
                    polls: b.polls,
                    timeout_ms: b.timeout_ms,
                    timeline: b.timeline,
                })
                .collect(),
            reported: record.reported,
            fired_rules: record.fired_rules,
            signal: record.signal,
            reason: record.reason,
            reversal_serials: record.reversal_serials,
            reversal_type: record.reversal_type,
            reversal_target: record.reversal_target,
        }
    }

    /// `record` in the shape version 3 wrote, which drops each branch's
    /// `earlier_reversal_sends`.
    fn as_version_3(record: SagaRecord) -> SagaRecordV3 {
        SagaRecordV3 {
            coordinator_id: record.coordinator_id,
            sequence: record.sequence,
            business_type: record.business_type,
            mode: record.mode,
            content_type: record.content_type,
            labels: record.labels,
            deadline_ms: record.deadline_ms,
            state: record.state,
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
            request_id: record.request_id,
            strategy_version: record.strategy_version,
            branches: record
                .branches
                .into_iter()
                .map(|b| BranchRecordV3 {
                    branch_id: b.branch_id,
                    node_id: b.node_id,
                    caller_node_id: b.caller_node_id,
                    forward_action: b.forward_action,
                    reversal_action: b.reversal_action,
                    order: b.order,
                    state: b.state,
                    last_status: b.last_status,
                    last_status_parameters: b.last_status_parameters,
                    error_code: b.error_code,
                    message: b.message,
                    attempts: b.attempts,
                    retry_at_ms: b.retry_at_ms,
                    created_ms: b.created_ms,
                    updated_ms: b.updated_ms,
                    last_poll_outcome: b.last_poll_outcome,
                    last_poll_ms: b.last_poll_ms,
                    polls: b.polls,
                    timeout_ms: b.timeout_ms,
                    timeline: b.timeline,
                })
                .collect(),
            reported: record.reported,
            fired_rules: record.fired_rules,
            signal: record.signal,
            reason: record.reason,
            reversal_serials: record.reversal_serials,
            reversal_type: record.reversal_type,
            reversal_target: record.reversal_target,
        }
    }

    fn payload_record() -> impl Strategy<Value = PayloadRecord> {
        (payload(), ".*").prop_map(|(data, content_type)| PayloadRecord { data, content_type })
    }

    fn strategy_record() -> impl Strategy<Value = StrategyRecord> {
        let step = (text(), text(), text(), text(), any::<u64>()).prop_map(
            |(id, node_id, forward_action, reversal_action, timeout_ms)| StepRecord {
                id,
                node_id,
                forward_action,
                reversal_action,
                timeout_ms,
            },
        );
        let rule = (vec(step_status(), 0..3), texts())
            .prop_map(|(when, trigger)| RuleRecord { when, trigger });
        let mapping = (text(), text(), text(), any::<u8>()).prop_map(
            |(step_id, parameter, value, meaning)| StatusMappingRecord {
                step_id,
                parameter,
                value,
                meaning,
            },
        );
        let scope = (text(), texts())
            .prop_map(|(step_id, reverse)| ExceptionScopeRecord { step_id, reverse });
        (
            (text(), any::<u64>(), ".*", vec(step, 0..4), texts()),
            (
                vec(rule, 0..3),
                vec(step_status(), 0..3),
                vec(step_status(), 0..3),
            ),
            (
                vec(mapping, 0..3),
                vec(scope, 0..3),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (business_type, version, description, steps, first_set),
                    (rules, end_statuses, abnormal_statuses),
                    (status_mappings, exception_scopes, saga_timeout_ms, created_ms),
                )| StrategyRecord {
                    business_type,
                    version,
                    description,
                    steps,
                    first_set,
                    rules,
                    end_statuses,
                    abnormal_statuses,
                    status_mappings,
                    exception_scopes,
                    saga_timeout_ms,
                    created_ms,
                },
            )
    }

    fn node_record() -> impl Strategy<Value = NodeRecord> {
        (text(), ".*", any::<u64>()).prop_map(|(node_id, endpoint, updated_ms)| NodeRecord {
            node_id,
            endpoint,
            updated_ms,
        })
    }

    fn retry_policy() -> impl Strategy<Value = RetryPolicyRecord> {
        (
            proptest::option::of(texts()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(
                    retryable_codes,
                    max_retries,
                    min_interval_ms,
                    backoff_factor_milli,
                    max_interval_ms,
                )| RetryPolicyRecord {
                    retryable_codes,
                    max_retries,
                    min_interval_ms,
                    backoff_factor_milli,
                    max_interval_ms,
                },
            )
    }

    fn retry_config_record() -> impl Strategy<Value = RetryConfigRecord> {
        let transaction = (text(), retry_policy()).prop_map(|(transaction_code, policy)| {
            TransactionRetryRecord {
                transaction_code,
                policy,
            }
        });
        let channel =
            (text(), text(), texts()).prop_map(|(channel, transaction_code, retryable_codes)| {
                ChannelRetryRecord {
                    channel,
                    transaction_code,
                    retryable_codes,
                }
            });
        (
            any::<u64>(),
            retry_policy(),
            vec(transaction, 0..3),
            vec(channel, 0..3),
            any::<u64>(),
        )
            .prop_map(|(version, defaults, transactions, channels, updated_ms)| {
                RetryConfigRecord {
                    version,
                    defaults,
                    transactions,
                    channels,
                    updated_ms,
                }
            })
    }

    fn retry_history_record() -> impl Strategy<Value = RetryHistoryRecord> {
        let attempt = (
            text(),
            any::<u32>(),
            text(),
            text(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    retry_serial,
                    attempt,
                    error_code,
                    channel,
                    decision,
                    decided_ms,
                    config_version,
                )| RetryAttemptRecord {
                    retry_serial,
                    attempt,
                    error_code,
                    channel,
                    decision,
                    decided_ms,
                    config_version,
                },
            );
        (text(), text(), vec(attempt, 0..4)).prop_map(
            |(original_serial, transaction_code, attempts)| RetryHistoryRecord {
                original_serial,
                transaction_code,
                attempts,
            },
        )
    }

    fn retry_link_record() -> impl Strategy<Value = RetryLinkRecord> {
        ".*".prop_map(|original_serial| RetryLinkRecord { original_serial })
    }

    fn idempotency() -> impl Strategy<Value = IdempotencyRecord> {
        (
            payload(),
            any::<u8>(),
            ".*",
            payload(),
            ".*",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u8>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    fingerprint,
                    state,
                    result,
                    response,
                    content_type,
                    created_ms,
                    updated_ms,
                    expires_ms,
                    attempts,
                    lease_kind,
                    processing_lease_ms,
                )| {
                    IdempotencyRecord {
                        fingerprint,
                        state,
                        result,
                        response,
                        content_type,
                        created_ms,
                        updated_ms,
                        expires_ms,
                        attempts,
                        lease_kind,
                        processing_lease_ms,
                    }
                },
            )
    }

    fn outbox() -> impl Strategy<Value = OutboxRecord> {
        (any::<u64>(), ".*", payload(), any::<u64>(), any::<u32>()).prop_map(
            |(gsn_sequence, node_id, command, created_ms, attempts)| OutboxRecord {
                gsn_sequence,
                node_id,
                command,
                created_ms,
                attempts,
            },
        )
    }

    fn due() -> impl Strategy<Value = DueRecord> {
        (any::<u64>(), payload()).prop_map(|(gsn_sequence, timer)| DueRecord {
            gsn_sequence,
            timer,
        })
    }

    /// Round trip, then the failure modes every stored value must handle without panicking.
    fn check_record<R: Record + PartialEq + std::fmt::Debug>(record: &R, cut: prop::sample::Index) {
        let bytes = encode(record).unwrap();
        assert_eq!(bytes[0], R::VERSION);
        assert_eq!(&decode::<R>(&bytes).unwrap(), record);

        // Every strict prefix is missing data that postcard must read, so it is corrupt.
        let prefix = &bytes[..cut.index(bytes.len())];
        assert!(
            matches!(decode::<R>(prefix), Err(Error::Corrupt { table, .. }) if table == R::TABLE),
            "a {}-byte prefix of {} bytes decoded",
            prefix.len(),
            bytes.len()
        );

        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode::<R>(&longer), Err(Error::Corrupt { .. })));

        let mut future = bytes;
        future[0] = R::VERSION + 1;
        assert!(matches!(
            decode::<R>(&future),
            Err(Error::UnknownVersion { table, version }) if table == R::TABLE && version == R::VERSION + 1
        ));
        future[0] = 0;
        assert!(matches!(
            decode::<R>(&future),
            Err(Error::UnknownVersion { version: 0, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn saga_records_round_trip(record in saga(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn idempotency_records_round_trip(record in idempotency(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn outbox_records_round_trip(record in outbox(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn due_records_round_trip(record in due(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn payload_records_round_trip(record in payload_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn strategy_records_round_trip(record in strategy_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn node_records_round_trip(record in node_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn retry_config_records_round_trip(record in retry_config_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn retry_history_records_round_trip(record in retry_history_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        #[test]
        fn retry_link_records_round_trip(record in retry_link_record(), cut: prop::sample::Index) {
            check_record(&record, cut);
        }

        /// A saga written by sagad 0.1 (version 1, payload inside) reads as the current shape,
        /// and the upgrade gets its payload back out of it.
        #[test]
        fn version_1_sagas_read_as_the_current_shape(record in saga(), data in payload()) {
            let bytes = encode_saga_v1(&record, &data);
            let expected = SagaRecord {
                strategy_version: 0,
                branches: Vec::new(),
                reported: Vec::new(),
                fired_rules: Vec::new(),
                signal: 0,
                reason: String::new(),
                reversal_serials: Vec::new(),
                reversal_type: 0,
                reversal_target: String::new(),
                ..record.clone()
            };
            prop_assert_eq!(decode::<SagaRecord>(&bytes).unwrap(), expected.clone());
            let (saga, payload) = decode_saga_v1(&bytes[1..]).unwrap();
            prop_assert_eq!(saga, expected);
            prop_assert_eq!(payload, PayloadRecord { data, content_type: record.content_type });
        }

        /// A saga written before branches had `retry_at_ms` (version 2) reads as the current
        /// shape with no resend waiting.
        #[test]
        fn version_2_sagas_read_with_no_resend_waiting(record in saga()) {
            let mut expected = record.clone();
            for branch in &mut expected.branches {
                branch.retry_at_ms = 0;
                branch.earlier_reversal_sends = 0;
            }
            let mut bytes = vec![2];
            bytes.extend(postcard::to_stdvec(&as_version_2(record)).unwrap());
            prop_assert_eq!(decode::<SagaRecord>(&bytes).unwrap(), expected);
        }

        /// A saga written before branches had `earlier_reversal_sends` (version 3) reads as
        /// the current shape with every reversal in its first round.
        #[test]
        fn version_3_sagas_read_with_every_reversal_in_its_first_round(record in saga()) {
            let mut expected = record.clone();
            for branch in &mut expected.branches {
                branch.earlier_reversal_sends = 0;
            }
            let mut bytes = vec![3];
            bytes.extend(postcard::to_stdvec(&as_version_3(record)).unwrap());
            prop_assert_eq!(decode::<SagaRecord>(&bytes).unwrap(), expected);
        }

        /// An idempotency record written before records kept their lease (version 1) reads as
        /// one that kept none, so it is judged by each asker's lease as before.
        #[test]
        fn version_1_idempotency_records_read_as_keeping_no_lease(record in idempotency()) {
            let expected = IdempotencyRecord {
                lease_kind: 0,
                processing_lease_ms: 0,
                ..record.clone()
            };
            let bytes = encode_idempotency_v1(&record);
            prop_assert_eq!(decode::<IdempotencyRecord>(&bytes).unwrap(), expected);
            // A version 1 body cut short is corrupt, not misread as something else.
            let cut_short = decode::<IdempotencyRecord>(&bytes[..bytes.len() - 1]);
            let corrupt = matches!(cut_short, Err(Error::Corrupt { table: "idempotency", .. }));
            prop_assert!(corrupt);
        }

        #[test]
        fn strategy_keys_sort_by_business_type_then_version(
            a in "[^\\x00]{0,4}", a_version: u64, b in "[^\\x00]{0,4}", b_version: u64,
        ) {
            let key_a = strategy_key(&a, a_version).unwrap();
            let key_b = strategy_key(&b, b_version).unwrap();
            prop_assert_eq!(key_a.cmp(&key_b), (&a, a_version).cmp(&(&b, b_version)));
            let prefix = strategy_prefix(&a).unwrap();
            prop_assert_eq!(strategy_group_prefix(&key_a).unwrap(), prefix.as_slice());
            let end = strategy_prefix_end(&prefix);
            prop_assert_eq!(prefix <= key_b && key_b < end, b == a);
            prop_assert_eq!(key_b.as_slice() >= strategies_after(&a).as_slice(), b > a);
        }

        #[test]
        fn payload_keys_are_injective_and_group_by_saga(
            a: u64, branch_a in ".{0,4}", b: u64, branch_b in ".{0,4}",
        ) {
            let key_a = payload_key(a, &branch_a);
            let key_b = payload_key(b, &branch_b);
            prop_assert_eq!(key_a == key_b, (a, &branch_a) == (b, &branch_b));
            prop_assert_eq!(key_a.cmp(&key_b), (a, branch_a.as_bytes()).cmp(&(b, branch_b.as_bytes())));
        }

        /// A page cursor holding 0x00 (never a stored business type) still splits the business
        /// types exactly into those up to it and those strictly after it.
        #[test]
        fn strategies_after_a_cursor_with_nul(cursor in "[a\\x00b]{0,4}", b in "[ab]{0,4}", version: u64) {
            let key = strategy_key(&b, version).unwrap();
            prop_assert_eq!(key.as_slice() >= strategies_after(&cursor).as_slice(), b > cursor);
        }

        /// Random bytes either decode to some record or give a typed error; never a panic.
        #[test]
        fn garbage_never_panics(bytes in vec(any::<u8>(), 0..256)) {
            let _ = decode::<SagaRecord>(&bytes);
            let _ = decode::<IdempotencyRecord>(&bytes);
            let _ = decode::<OutboxRecord>(&bytes);
            let _ = decode::<DueRecord>(&bytes);
            let _ = decode::<PayloadRecord>(&bytes);
            let _ = decode::<StrategyRecord>(&bytes);
            let _ = decode::<NodeRecord>(&bytes);
            let _ = decode::<RetryConfigRecord>(&bytes);
            let _ = decode::<RetryHistoryRecord>(&bytes);
            let _ = decode::<RetryLinkRecord>(&bytes);
            let _ = decode_saga_v1(&bytes);
            let _ = strategy_group_prefix(&bytes);
            let _ = decode_due_key(&bytes);
            let _ = split_expiry_key(&bytes);
        }

        #[test]
        fn due_keys_round_trip_and_sort_like_numbers(a_at: u64, a_id: u64, b_at: u64, b_id: u64) {
            let a = DueKey { at_ms: a_at, id: a_id };
            let b = DueKey { at_ms: b_at, id: b_id };
            prop_assert_eq!(decode_due_key(&due_key(a)).unwrap(), a);
            prop_assert_eq!(due_key(a).cmp(&due_key(b)), a.cmp(&b));
        }

        #[test]
        fn idempotency_keys_are_injective(scope_a in ".{0,4}", key_a in ".{0,4}", scope_b in ".{0,4}", key_b in ".{0,4}") {
            let a = IdempotencyKey { namespace: IdempotencyNamespace::Participant, scope: scope_a, key: key_a };
            let b = IdempotencyKey { namespace: IdempotencyNamespace::Participant, scope: scope_b, key: key_b };
            prop_assert_eq!(idempotency_key(&a).unwrap() == idempotency_key(&b).unwrap(), a == b);
        }

        #[test]
        fn idempotency_keys_read_back_as_written(coordinator in any::<bool>(), scope in ".{0,6}", key in ".{0,6}") {
            let namespace = if coordinator { IdempotencyNamespace::Coordinator } else { IdempotencyNamespace::Participant };
            let written = IdempotencyKey { namespace, scope, key };
            prop_assert_eq!(split_idempotency_key(&idempotency_key(&written).unwrap()), Some(written));
        }
    }

    #[test]
    fn strategy_keys_refuse_nul_and_version_0() {
        assert_eq!(strategy_key("a\0b", 1), None);
        assert_eq!(strategy_prefix("a\0"), None);
        let mut record = StrategyRecord {
            business_type: "a\0b".into(),
            version: 1,
            description: String::new(),
            steps: Vec::new(),
            first_set: Vec::new(),
            rules: Vec::new(),
            end_statuses: Vec::new(),
            abnormal_statuses: Vec::new(),
            status_mappings: Vec::new(),
            exception_scopes: Vec::new(),
            saga_timeout_ms: 0,
            created_ms: 0,
        };
        assert!(
            matches!(strategy_key_to_write(&record), Err(Error::Storage(ref m)) if m.contains("0x00"))
        );
        record.business_type = "order".into();
        record.version = 0;
        assert!(
            matches!(strategy_key_to_write(&record), Err(Error::Storage(ref m)) if m.contains("version 0"))
        );
        record.version = 258;
        assert_eq!(
            strategy_key_to_write(&record).unwrap(),
            b"order\0\0\0\0\0\0\0\x01\x02".to_vec()
        );
    }

    #[test]
    fn empty_value_is_corrupt() {
        assert!(matches!(
            decode::<SagaRecord>(&[]),
            Err(Error::Corrupt { table: "sagas", .. })
        ));
    }

    #[test]
    fn namespaces_never_share_keys() {
        let coordinator = IdempotencyKey {
            namespace: IdempotencyNamespace::Coordinator,
            scope: "s".into(),
            key: "k".into(),
        };
        let participant = IdempotencyKey {
            namespace: IdempotencyNamespace::Participant,
            ..coordinator.clone()
        };
        assert_ne!(
            idempotency_key(&coordinator).unwrap(),
            idempotency_key(&participant).unwrap()
        );
        assert_eq!(idempotency_key(&coordinator).unwrap()[0], 0);
    }

    #[test]
    fn expiry_bound_covers_due_entries_only() {
        let raw = b"\x00\x00\x00\x00\x01sk";
        let bound = expiry_bound(10).unwrap();
        assert!(expiry_key(10, raw).as_slice() < bound.as_slice());
        assert!(expiry_key(11, raw).as_slice() >= bound.as_slice());
        assert_eq!(expiry_bound(u64::MAX), None);
        assert_eq!(
            split_expiry_key(&expiry_key(7, raw)).unwrap(),
            (7, raw.as_slice())
        );
    }
}
