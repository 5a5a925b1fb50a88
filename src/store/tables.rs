//! The sled trees of the ledger, the per-job overlay of buffered writes, and the one place that
//! turns an overlay into an atomic sled transaction. Nothing here runs on a tokio worker.

use super::Error;
use super::codec::{self, Record};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::collections::BTreeMap;
use std::ops::Bound;

/// The named trees. The discriminant indexes `Tables::trees` and `Overlay::writes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    /// Counters: `gsn_seq`, `outbox_seq`, `due_seq` → u64 BE.
    Meta = 0,
    Sagas = 1,
    Idempotency = 2,
    /// `expires_ms BE ++ idempotency key` → empty; kept in step by `put_idempotency`.
    IdempotencyExpiry = 3,
    Outbox = 4,
    Due = 5,
}

const TABLE_COUNT: usize = 6;

impl Table {
    const ALL: [Table; TABLE_COUNT] = [
        Table::Meta,
        Table::Sagas,
        Table::Idempotency,
        Table::IdempotencyExpiry,
        Table::Outbox,
        Table::Due,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Sagas => "sagas",
            Table::Idempotency => "idempotency",
            Table::IdempotencyExpiry => "idempotency_expiry",
            Table::Outbox => "outbox",
            Table::Due => "due",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// sled errors become the store's own: I/O stays I/O, the rest is a storage fault.
pub(crate) fn storage_error(error: sled::Error) -> Error {
    match error {
        sled::Error::Io(io) => Error::Io(io),
        other => Error::Storage(other.to_string()),
    }
}

/// One handle on the database and its trees. The writer and the reader each hold a clone; the
/// folder's lock is released only when both have dropped theirs.
#[derive(Clone)]
pub(crate) struct Tables {
    pub(crate) db: sled::Db,
    trees: [sled::Tree; TABLE_COUNT],
}

impl Tables {
    pub(crate) fn open(db: sled::Db) -> Result<Tables, sled::Error> {
        let meta = db.open_tree(Table::Meta.name())?;
        let sagas = db.open_tree(Table::Sagas.name())?;
        let idempotency = db.open_tree(Table::Idempotency.name())?;
        let expiry = db.open_tree(Table::IdempotencyExpiry.name())?;
        let outbox = db.open_tree(Table::Outbox.name())?;
        let due = db.open_tree(Table::Due.name())?;
        Ok(Tables {
            db,
            trees: [meta, sagas, idempotency, expiry, outbox, due],
        })
    }

    pub(crate) fn tree(&self, table: Table) -> &sled::Tree {
        &self.trees[table.index()]
    }

    pub(crate) fn get_raw(&self, table: Table, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        self.tree(table).get(key).map_err(storage_error)
    }

    pub(crate) fn get<R: Record>(&self, table: Table, key: &[u8]) -> Result<Option<R>, Error> {
        match self.get_raw(table, key)? {
            Some(bytes) => codec::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Applies every buffered write of one job as one sled transaction over the trees it
    /// touched, so a crash leaves all of them or none.
    pub(crate) fn apply(&self, overlay: &Overlay) -> Result<(), Error> {
        let touched: Vec<(&sled::Tree, &Writes)> = Table::ALL
            .iter()
            .map(|&table| (self.tree(table), &overlay.writes[table.index()]))
            .filter(|(_, writes)| !writes.is_empty())
            .collect();
        if touched.is_empty() {
            return Ok(());
        }
        let trees: Vec<&sled::Tree> = touched.iter().map(|(tree, _)| *tree).collect();
        let result = trees[..].transaction(|views: &Vec<TransactionalTree>| {
            for (view, (_, writes)) in views.iter().zip(&touched) {
                for (key, value) in writes.iter() {
                    match value {
                        Some(value) => {
                            view.insert(key.as_slice(), value.as_slice())?;
                        }
                        None => {
                            view.remove(key.as_slice())?;
                        }
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(storage_error(e)),
            // The closure above never aborts; keep the arm so the match stays exhaustive.
            Err(TransactionError::Abort(())) => {
                Err(Error::Storage("ledger transaction aborted".into()))
            }
        }
    }
}

fn next_stored(stored: &mut sled::Iter) -> Result<Option<sled::IVec>, Error> {
    match stored.next() {
        Some(Ok((key, _))) => Ok(Some(key)),
        Some(Err(e)) => Err(storage_error(e)),
        None => Ok(None),
    }
}

/// Buffered writes of one table: `Some(value)` is a put, `None` a delete.
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The writes a job has made so far, not yet in sled. Reads consult it first, which gives a
/// job read-your-writes without touching sled until the job has succeeded.
#[derive(Default)]
pub(crate) struct Overlay {
    writes: [Writes; TABLE_COUNT],
}

impl Overlay {
    /// `Some(None)` when the job deleted the key, `None` when the job has not touched it.
    pub(crate) fn get(&self, table: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes[table.index()].get(key).map(Option::as_deref)
    }

    pub(crate) fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.writes[table.index()].insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.writes[table.index()].insert(key, None);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.writes.iter().all(BTreeMap::is_empty)
    }

    /// The first `limit` keys of `table` below `end` (exclusive; `None` = no end) as the tree
    /// and this overlay together show them: overlay puts are added, overlay deletes hidden.
    pub(crate) fn live_keys_below(
        &self,
        tables: &Tables,
        table: Table,
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let tree = tables.tree(table);
        let (mut stored, buffered) = match end {
            Some(end) => (
                tree.range(..end),
                self.writes[table.index()]
                    .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(end))),
            ),
            None => (tree.iter(), self.writes[table.index()].range::<[u8], _>(..)),
        };
        let mut buffered = buffered.peekable();
        let mut stored_key = next_stored(&mut stored)?;
        let mut keys = Vec::new();
        while keys.len() < limit {
            let buffered_key = buffered.peek().map(|&(key, _)| key.as_slice());
            match (stored_key.as_deref(), buffered_key) {
                (None, None) => break,
                (Some(from_tree), Some(from_overlay)) if from_tree < from_overlay => {
                    keys.push(from_tree.to_vec());
                    stored_key = next_stored(&mut stored)?;
                }
                (Some(from_tree), None) => {
                    keys.push(from_tree.to_vec());
                    stored_key = next_stored(&mut stored)?;
                }
                (from_tree, Some(from_overlay)) => {
                    // The overlay's entry wins over the tree's for the same key.
                    if from_tree == Some(from_overlay) {
                        stored_key = next_stored(&mut stored)?;
                    }
                    if let Some((key, Some(_))) = buffered.next() {
                        keys.push(key.clone());
                    }
                }
            }
        }
        Ok(keys)
    }
}
