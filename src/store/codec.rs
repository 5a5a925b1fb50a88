//! The byte formats of the ledger: versioned record values and big-endian keys. Only this file
//! knows how bytes on disk map to records; it never panics on what it reads.

use super::records::{DueRecord, IdempotencyRecord, OutboxRecord, SagaRecord};
use super::{DueKey, Error, IdempotencyKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

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

impl Record for SagaRecord {
    const TABLE: &'static str = "sagas";
    const VERSION: u8 = 1;
}

impl Record for IdempotencyRecord {
    const TABLE: &'static str = "idempotency";
    const VERSION: u8 = 1;
}

impl Record for OutboxRecord {
    const TABLE: &'static str = "outbox";
    const VERSION: u8 = 1;
}

impl Record for DueRecord {
    const TABLE: &'static str = "due";
    const VERSION: u8 = 1;
}

/// Encodes `record` as its table's current version.
pub(crate) fn encode<R: Record>(record: &R) -> Result<Vec<u8>, Error> {
    postcard::to_extend(record, vec![R::VERSION])
        .map_err(|e| Error::Storage(format!("cannot encode a record of table {}: {e}", R::TABLE)))
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
    use crate::store::IdempotencyNamespace;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// Payloads from empty to well past sled's 128 KiB blob threshold, mostly small.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => vec(any::<u8>(), 0..64),
            1 => vec(any::<u8>(), 0..200_000),
        ]
    }

    fn saga() -> impl Strategy<Value = SagaRecord> {
        (
            (".*", any::<u64>(), ".*", any::<u8>(), payload(), ".*"),
            (btree_map(".*", ".*", 0..4), any::<u64>(), any::<u8>()),
            (any::<u64>(), any::<u64>(), ".*"),
        )
            .prop_map(
                |(
                    (coordinator_id, sequence, business_type, mode, payload, content_type),
                    (labels, deadline_ms, state),
                    (created_ms, updated_ms, request_id),
                )| SagaRecord {
                    coordinator_id,
                    sequence,
                    business_type,
                    mode,
                    payload,
                    content_type,
                    labels,
                    deadline_ms,
                    state,
                    created_ms,
                    updated_ms,
                    request_id,
                },
            )
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

        /// Random bytes either decode to some record or give a typed error; never a panic.
        #[test]
        fn garbage_never_panics(bytes in vec(any::<u8>(), 0..256)) {
            let _ = decode::<SagaRecord>(&bytes);
            let _ = decode::<IdempotencyRecord>(&bytes);
            let _ = decode::<OutboxRecord>(&bytes);
            let _ = decode::<DueRecord>(&bytes);
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
