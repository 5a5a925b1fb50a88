//! Brings a ledger written by an older sagad up to the current shapes when it is opened, for
//! the changes a record's `decode_older` cannot make alone because they move data between
//! tables. Runs in `Store::open`, before the ledger threads start; every record is moved in one
//! transaction with its new shape, so a crash midway leaves a ledger the next open finishes.

use super::Error;
use super::codec;
use super::tables::{Overlay, Table, Tables, storage_error};

/// Meta key of the ledger format the tables are known to be in. Absent before format 2.
const FORMAT: &[u8] = b"format";

/// Format 2: saga payloads live in `payloads`, not inside the saga (saga record version 2).
/// Format 3: groups of writes go to sled behind intent records (`intents.rs`); a sagad that
/// does not replay them could see a group a crash cut short in part, so it must not open the
/// ledger (this build and later ones refuse formats newer than their own).
/// Format 4: saga records may be version 3 (branches with `retry_at_ms`), which a format 3
/// build cannot read; it refuses the ledger instead of failing on every saga.
/// Format 5: idempotency records may be version 2 (the processing lease they hold), which a
/// format 4 build cannot read; it refuses the ledger instead of failing on every Begin.
/// Format 6: saga records may be version 4 (branches with `earlier_reversal_sends`), which a
/// format 5 build cannot read; it refuses the ledger instead of failing on every saga.
const CURRENT_FORMAT: u64 = 6;
/// The first format whose sagas keep their payloads apart.
const PAYLOADS_APART: u64 = 2;

/// The ledger's format mark, if it has one.
fn stored_format(tables: &Tables) -> Result<Option<u64>, Error> {
    tables
        .get_raw(Table::Meta, FORMAT)?
        .map(|bytes| codec::decode_u64(Table::Meta.name(), &bytes))
        .transpose()
}

/// Refuses a ledger written by a newer sagad, before anything reads or replays it: its records
/// or intents may mean what this build cannot know. It reads the format mark straight from
/// sled, before the tables are opened, so a refused ledger is left without trees it lacked.
pub(crate) fn refuse_newer(db: &sled::Db) -> Result<(), Error> {
    let stored = db
        .open_tree(Table::Meta.name())
        .and_then(|meta| meta.get(FORMAT))
        .map_err(storage_error)?
        .map(|bytes| codec::decode_u64(Table::Meta.name(), &bytes))
        .transpose()?;
    match stored {
        Some(format) if format > CURRENT_FORMAT => Err(Error::Storage(format!(
            "the ledger is in format {format}, written by a newer sagad; this one reads formats \
             up to {CURRENT_FORMAT}: run the newer sagad on it"
        ))),
        _ => Ok(()),
    }
}

/// Sagas moved per transaction: bounded, so a large ledger is never one huge transaction.
const BATCH: usize = 256;

/// Upgrades the ledger to `CURRENT_FORMAT` unless it is known to be there already.
pub(crate) fn run(tables: &Tables) -> Result<(), Error> {
    let format = stored_format(tables)?;
    if format.is_some_and(|format| format >= CURRENT_FORMAT) {
        return Ok(());
    }
    // Formats 2 to 6 move nothing: the `intents` tree is opened (created) with the others,
    // and saga and idempotency records are read in any older version and rewritten as they
    // change.
    let moved = if format.is_some_and(|format| format >= PAYLOADS_APART) {
        0
    } else {
        move_saga_payloads(tables)?
    };
    let mut done = Overlay::default();
    done.put(
        Table::Meta,
        FORMAT.to_vec(),
        codec::u64_key(CURRENT_FORMAT).to_vec(),
    );
    tables.apply_in_transaction(&done)?;
    tables.db.flush().map_err(storage_error)?;
    if moved > 0 {
        tracing::info!(
            sagas = moved,
            "moved the payloads of sagas written by an older sagad to the payloads table"
        );
    }
    Ok(())
}

/// Rewrites every version 1 saga as the current version and stores the payload it carried as
/// the saga's own payload (branch id ""). Returns how many sagas it moved.
fn move_saga_payloads(tables: &Tables) -> Result<usize, Error> {
    let mut moved = 0;
    let mut batch = Overlay::default();
    let mut in_batch = 0;
    for entry in tables.tree(Table::Sagas).iter() {
        let (key, value) = entry.map_err(storage_error)?;
        let Some((&1, body)) = value.split_first() else {
            continue;
        };
        let split = codec::decode_u64(Table::Sagas.name(), &key)
            .and_then(|sequence| Ok((sequence, codec::decode_saga_v1(body)?)));
        // A value that does not read as version 1 stays as it is: reading it reports the
        // corruption, exactly as before the upgrade.
        let Ok((sequence, (saga, payload))) = split else {
            continue;
        };
        batch.put(Table::Sagas, key.to_vec(), codec::encode(&saga)?);
        batch.put(
            Table::Payloads,
            codec::payload_key(sequence, ""),
            codec::encode(&payload)?,
        );
        moved += 1;
        in_batch += 1;
        if in_batch == BATCH {
            tables.apply_in_transaction(&batch)?;
            batch = Overlay::default();
            in_batch = 0;
        }
    }
    tables.apply_in_transaction(&batch)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Options, PayloadRecord, SagaRecord, Store};
    use std::collections::BTreeMap;

    /// The ledger's folder opened with sled alone, to look at what a closed Store left. sled's
    /// I/O threads may hold the folder's lock a moment after close (see `open_db`).
    fn reopened_raw(path: &std::path::Path) -> sled::Db {
        (0..100)
            .find_map(|_| {
                let opened = sled::Config::new().path(path).open().ok();
                if opened.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened
            })
            .expect("the folder's lock is released")
    }

    fn saga(sequence: u64) -> SagaRecord {
        SagaRecord {
            coordinator_id: "c1".into(),
            sequence,
            business_type: "order".into(),
            mode: 2,
            content_type: "application/json".into(),
            labels: BTreeMap::from([("tenant".into(), "t1".into())]),
            deadline_ms: 0,
            state: 1,
            created_ms: 10,
            updated_ms: 11,
            request_id: format!("r{sequence}"),
            strategy_version: 0,
            branches: Vec::new(),
            reported: Vec::new(),
            fired_rules: Vec::new(),
            signal: 0,
            reason: String::new(),
            reversal_serials: Vec::new(),
            reversal_type: 0,
            reversal_target: String::new(),
        }
    }

    fn payload_of(sequence: u64) -> Vec<u8> {
        // One large enough to be one of sled's separate blob files.
        let len = if sequence == 2 {
            200_000
        } else {
            sequence as usize
        };
        vec![sequence as u8; len]
    }

    /// A ledger as sagad 0.1 left it: more sagas than one batch holds, version 1 values with
    /// their payload inside, one of them unreadable, and no format mark.
    fn write_version_1_ledger(path: &std::path::Path, sagas: u64) {
        let db = sled::Config::new().path(path).open().unwrap();
        let tree = db.open_tree("sagas").unwrap();
        for sequence in 1..=sagas {
            let value = codec::encode_saga_v1(&saga(sequence), &payload_of(sequence));
            tree.insert(sequence.to_be_bytes(), value).unwrap();
        }
        tree.insert((sagas + 1).to_be_bytes(), &[1, 0xff][..])
            .unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn opening_a_version_1_ledger_moves_saga_payloads_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let sagas = BATCH as u64 + 3;
        write_version_1_ledger(&path, sagas);

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for _ in 0..2 {
            // The second open finds the format mark and changes nothing.
            let store = Store::open(Options::new(&path)).unwrap();
            let (read, unreadable) = rt
                .block_on(store.read(move |tx| {
                    let read: Vec<(Option<SagaRecord>, Option<PayloadRecord>)> = (1..=sagas)
                        .map(|s| (tx.saga(s).unwrap(), tx.payload(s, "").unwrap()))
                        .collect();
                    (read, tx.saga(sagas + 1))
                }))
                .unwrap();
            for (sequence, found) in (1..=sagas).zip(read) {
                let payload = PayloadRecord {
                    data: payload_of(sequence),
                    content_type: "application/json".into(),
                };
                assert_eq!(found, (Some(saga(sequence)), Some(payload)));
            }
            assert!(matches!(
                unreadable,
                Err(Error::Corrupt { table: "sagas", .. })
            ));
            rt.block_on(store.close()).unwrap();
        }

        let db = reopened_raw(&path);
        let stored = db.open_tree("sagas").unwrap().get(1u64.to_be_bytes());
        assert_eq!(
            stored.unwrap().unwrap()[0],
            <SagaRecord as codec::Record>::VERSION,
            "the saga was not rewritten in the current version"
        );
        let format = db.open_tree("meta").unwrap().get(FORMAT).unwrap().unwrap();
        assert_eq!(format.as_ref(), CURRENT_FORMAT.to_be_bytes());
    }

    #[test]
    fn a_ledger_from_a_newer_sagad_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        {
            let db = sled::Config::new().path(&path).open().unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.insert(FORMAT, &(CURRENT_FORMAT + 1).to_be_bytes())
                .unwrap();
            db.open_tree("intents")
                .unwrap()
                .insert(0u64.to_be_bytes(), &[9, 9, 9][..])
                .unwrap();
            db.flush().unwrap();
        }
        let refused = (0..100)
            .find_map(|_| match Store::open(Options::new(&path)) {
                Err(Error::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                }
                other => Some(other),
            })
            .unwrap();
        let Err(error) = refused else {
            panic!("a ledger in a newer format was opened");
        };
        let message = error.to_string();
        assert!(
            message.contains(&format!("format {}", CURRENT_FORMAT + 1))
                && message.contains("newer sagad"),
            "{message}"
        );
        let db = reopened_raw(&path);
        let names = db.tree_names();
        assert!(
            !names.iter().any(|name| name.as_ref() == b"sagas"),
            "the refused open created no table"
        );
    }

    #[test]
    fn a_format_2_ledger_is_marked_current_without_moving_anything() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tables = Tables::open(db).unwrap();
        tables
            .tree(Table::Meta)
            .insert(FORMAT, &PAYLOADS_APART.to_be_bytes())
            .unwrap();
        // A version 1 saga would be moved by the format 1 upgrade; format 2 has none, so this
        // one is left exactly as it is.
        let v1 = codec::encode_saga_v1(&saga(1), b"inside");
        tables
            .tree(Table::Sagas)
            .insert(1u64.to_be_bytes(), v1.clone())
            .unwrap();
        run(&tables).unwrap();
        assert_eq!(stored_format(&tables).unwrap(), Some(CURRENT_FORMAT));
        let stored = tables.tree(Table::Sagas).get(1u64.to_be_bytes()).unwrap();
        assert_eq!(stored.unwrap().as_ref(), v1.as_slice());
    }

    #[test]
    fn a_format_4_ledger_is_marked_current_and_its_idempotency_records_read_as_keeping_no_lease() {
        use crate::store::{IdempotencyKey, IdempotencyNamespace, IdempotencyRecord};
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tables = Tables::open(db).unwrap();
        tables
            .tree(Table::Meta)
            .insert(FORMAT, &4u64.to_be_bytes())
            .unwrap();
        let record = IdempotencyRecord {
            fingerprint: b"digest".to_vec(),
            state: 1,
            result: String::new(),
            response: Vec::new(),
            content_type: String::new(),
            created_ms: 10,
            updated_ms: 10,
            expires_ms: 1_010,
            attempts: 1,
            lease_kind: 2,
            processing_lease_ms: 60_000,
        };
        let key = codec::idempotency_key(&IdempotencyKey {
            namespace: IdempotencyNamespace::Participant,
            scope: "payments".into(),
            key: "tx-1".into(),
        })
        .unwrap();
        let v1 = codec::encode_idempotency_v1(&record);
        tables
            .tree(Table::Idempotency)
            .insert(key.as_slice(), v1.clone())
            .unwrap();
        run(&tables).unwrap();
        assert_eq!(stored_format(&tables).unwrap(), Some(CURRENT_FORMAT));
        // Nothing is rewritten: the record is read in its old version whenever it is asked for.
        let stored = tables.get_raw(Table::Idempotency, &key).unwrap().unwrap();
        assert_eq!(stored.as_ref(), v1.as_slice());
        let read: IdempotencyRecord = codec::decode(&stored).unwrap();
        assert_eq!(
            read,
            IdempotencyRecord {
                lease_kind: 0,
                processing_lease_ms: 0,
                ..record
            }
        );
    }
}
