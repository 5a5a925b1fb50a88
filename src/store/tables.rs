//! The sled trees of the ledger, the overlay of writes buffered for one group of jobs (with the
//! undo journal that takes back a failed job's share), and the lock that keeps readers from
//! seeing half of a group. Nothing here runs on a tokio worker.

use super::codec::{self, Record};
use super::{Error, intents};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The named trees. The discriminant indexes `Tables::trees` and `Overlay::writes`, and is
/// stored in intent records (`Table::code`): never renumber a table.
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
    /// `sequence BE ++ branch id` → `PayloadRecord`.
    Payloads = 6,
    /// `business type ++ 0x00 ++ version BE` → `StrategyRecord`.
    Strategies = 7,
    /// Node id → `NodeRecord`.
    Nodes = 8,
    /// `version BE` → `RetryConfigRecord`; the last key is the configuration in force.
    RetryConfig = 9,
    /// Original serial → `RetryHistoryRecord`.
    RetryHistory = 10,
    /// Retry serial → `RetryLinkRecord`.
    RetryLinks = 11,
    /// `saga sequence BE ++ due key` → empty: the timers of each saga, so the write that ends
    /// a saga removes the ones still pending instead of letting each come due for nothing.
    DueBySaga = 12,
}

const TABLE_COUNT: usize = 13;

impl Table {
    pub(crate) const ALL: [Table; TABLE_COUNT] = [
        Table::Meta,
        Table::Sagas,
        Table::Idempotency,
        Table::IdempotencyExpiry,
        Table::Outbox,
        Table::Due,
        Table::Payloads,
        Table::Strategies,
        Table::Nodes,
        Table::RetryConfig,
        Table::RetryHistory,
        Table::RetryLinks,
        Table::DueBySaga,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Sagas => "sagas",
            Table::Idempotency => "idempotency",
            Table::IdempotencyExpiry => "idempotency_expiry",
            Table::Outbox => "outbox",
            Table::Due => "due",
            Table::Payloads => "payloads",
            Table::Strategies => "strategies",
            Table::Nodes => "nodes",
            Table::RetryConfig => "retry_config",
            Table::RetryHistory => "retry_history",
            Table::RetryLinks => "retry_links",
            Table::DueBySaga => "due_by_saga",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The table's number in an intent record (`intents.rs`); stable across versions.
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(code: u8) -> Option<Table> {
        Table::ALL.get(usize::from(code)).copied()
    }
}

/// sled errors become the store's own: I/O stays I/O, the rest is a storage fault.
pub(crate) fn storage_error(error: sled::Error) -> Error {
    match error {
        sled::Error::Io(io) => Error::Io(io),
        other => Error::Storage(other.to_string()),
    }
}

/// `storage_error` for a read of `table`, where damaged data is that table's corrupt record:
/// a request that needs it is answered DATA_LOSS, and background work drops it, where a
/// storage fault would be answered INTERNAL and retried for ever.
pub(crate) fn read_error(table: Table) -> impl Fn(sled::Error) -> Error {
    move |error| match error {
        corrupt @ sled::Error::Corruption { .. } => Error::Corrupt {
            table: table.name(),
            detail: corrupt.to_string(),
        },
        other => storage_error(other),
    }
}

/// One handle on the database and its trees. The writer and the reader each hold a clone; the
/// folder's lock is released only when both have dropped theirs.
#[derive(Clone)]
pub(crate) struct Tables {
    pub(crate) db: sled::Db,
    trees: [sled::Tree; TABLE_COUNT],
    /// Intent records of groups being written (`intents.rs`).
    intents: sled::Tree,
    /// Held exclusively while a group's writes go into sled one by one, and shared by each
    /// read job, so a read sees every write of a group or none. It holds the stamp of the last
    /// write job whose group is in sled (`WriteTx::stamp`), changed under the same lock, so a
    /// read knows exactly which writes it sees.
    groups: Arc<RwLock<u64>>,
}

impl Tables {
    pub(crate) fn open(db: sled::Db) -> Result<Tables, sled::Error> {
        // In discriminant order: `tree` indexes this array by `Table::index`.
        let open = |table: Table| db.open_tree(table.name());
        let trees = [
            open(Table::Meta)?,
            open(Table::Sagas)?,
            open(Table::Idempotency)?,
            open(Table::IdempotencyExpiry)?,
            open(Table::Outbox)?,
            open(Table::Due)?,
            open(Table::Payloads)?,
            open(Table::Strategies)?,
            open(Table::Nodes)?,
            open(Table::RetryConfig)?,
            open(Table::RetryHistory)?,
            open(Table::RetryLinks)?,
            open(Table::DueBySaga)?,
        ];
        let intents = db.open_tree(intents::tree_name())?;
        Ok(Tables {
            db,
            trees,
            intents,
            groups: Arc::default(),
        })
    }

    pub(crate) fn intents(&self) -> &sled::Tree {
        &self.intents
    }

    /// Keeps readers out while a group is written. A panic while it is held (inside sled, in a
    /// group write) stops the writer, which records a fatal fault as it unwinds, so reads are
    /// refused rather than shown that group in part; the next open completes it from its intent.
    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, u64> {
        self.groups.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps groups from being written while one read job runs.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, u64> {
        self.groups.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn tree(&self, table: Table) -> &sled::Tree {
        &self.trees[table.index()]
    }

    pub(crate) fn get_raw(&self, table: Table, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        self.tree(table).get(key).map_err(read_error(table))
    }

    pub(crate) fn get<R: Record>(&self, table: Table, key: &[u8]) -> Result<Option<R>, Error> {
        match self.get_raw(table, key)? {
            Some(bytes) => codec::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Applies every buffered write of one upgrade batch as one sled transaction over the trees
    /// it touched, so a crash leaves all of them or none. The writer's groups go through
    /// `Intents::apply` instead, which is cheaper per group; the upgrade runs once, at open.
    pub(crate) fn apply_in_transaction(&self, overlay: &Overlay) -> Result<(), Error> {
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

fn next_stored(stored: &mut sled::Iter, table: Table) -> Result<Option<sled::IVec>, Error> {
    match stored.next() {
        Some(Ok((key, _))) => Ok(Some(key)),
        Some(Err(e)) => Err(read_error(table)(e)),
        None => Ok(None),
    }
}

fn next_stored_entry(
    stored: &mut impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    table: Table,
) -> Result<Option<(sled::IVec, sled::IVec)>, Error> {
    stored.next().transpose().map_err(read_error(table))
}

/// A key and its value, copied out of the tree or the overlay.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// Buffered writes of one table: `Some(value)` is a put, `None` a delete.
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What one buffered write replaced, so a failed job can be taken back: the table, the key and
/// the overlay's entry for it before (`None` when the overlay had not touched the key).
type Undo = (Table, Vec<u8>, Option<Option<Vec<u8>>>);

/// Writes buffered in memory, not yet in sled. Reads consult it first, which gives read-your-
/// writes without touching sled. The writer keeps one overlay per group of jobs, so each job
/// also sees the jobs before it in its group, and the whole group reaches sled at once, behind
/// one intent record; while a job runs, the journal records what it replaced, so a job that fails
/// leaves the overlay exactly as it found it.
#[derive(Default)]
pub(crate) struct Overlay {
    writes: [Writes; TABLE_COUNT],
    /// `Some` while a job runs.
    journal: Option<Vec<Undo>>,
}

impl Overlay {
    /// `Some(None)` when the key was deleted, `None` when the overlay has not touched it.
    pub(crate) fn get(&self, table: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes[table.index()].get(key).map(Option::as_deref)
    }

    pub(crate) fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.write(table, key, Some(value));
    }

    pub(crate) fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.write(table, key, None);
    }

    fn write(&mut self, table: Table, key: Vec<u8>, value: Option<Vec<u8>>) {
        match &mut self.journal {
            Some(journal) => {
                let before = self.writes[table.index()].insert(key.clone(), value);
                journal.push((table, key, before));
            }
            None => {
                self.writes[table.index()].insert(key, value);
            }
        }
    }

    /// Starts recording what a job writes, so `end_job` can take it back.
    pub(crate) fn begin_job(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Ends the job begun last: keeps its writes, or takes every one of them back. Returns
    /// whether the job wrote anything that stays.
    pub(crate) fn end_job(&mut self, keep: bool) -> bool {
        let journal = self.journal.take().unwrap_or_default();
        if keep {
            return !journal.is_empty();
        }
        // Newest first, so a key written twice gets back its value from before the job.
        for (table, key, before) in journal.into_iter().rev() {
            let writes = &mut self.writes[table.index()];
            match before {
                Some(value) => {
                    writes.insert(key, value);
                }
                None => {
                    writes.remove(&key);
                }
            }
        }
        false
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.writes.iter().all(BTreeMap::is_empty)
    }

    pub(crate) fn write_count(&self) -> usize {
        self.writes.iter().map(BTreeMap::len).sum()
    }

    /// Every buffered write, by table then key: the value to put, or `None` to delete.
    pub(crate) fn writes(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        Table::ALL.iter().flat_map(move |&table| {
            self.writes[table.index()]
                .iter()
                .map(move |(key, value)| (table, key.as_slice(), value.as_deref()))
        })
    }

    /// Forgets every buffered write (after they reached sled, or failed to).
    pub(crate) fn clear(&mut self) {
        for writes in &mut self.writes {
            writes.clear();
        }
        self.journal = None;
    }

    /// The first `limit` keys of `table` in `start..end` (`None` = no end) as the tree and this
    /// overlay together show them: overlay puts are added, overlay deletes hidden.
    pub(crate) fn live_keys_in(
        &self,
        tables: &Tables,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let mut stored = tables
            .tree(table)
            .range::<&[u8], _>((Bound::Included(start), upper));
        let buffered = self.writes[table.index()].range::<[u8], _>((Bound::Included(start), upper));
        let mut buffered = buffered.peekable();
        let mut stored_key = next_stored(&mut stored, table)?;
        let mut keys = Vec::new();
        while keys.len() < limit {
            let buffered_key = buffered.peek().map(|&(key, _)| key.as_slice());
            match (stored_key.as_deref(), buffered_key) {
                (None, None) => break,
                (Some(from_tree), Some(from_overlay)) if from_tree < from_overlay => {
                    keys.push(from_tree.to_vec());
                    stored_key = next_stored(&mut stored, table)?;
                }
                (Some(from_tree), None) => {
                    keys.push(from_tree.to_vec());
                    stored_key = next_stored(&mut stored, table)?;
                }
                (from_tree, Some(from_overlay)) => {
                    // The overlay's entry wins over the tree's for the same key.
                    if from_tree == Some(from_overlay) {
                        stored_key = next_stored(&mut stored, table)?;
                    }
                    if let Some((key, Some(_))) = buffered.next() {
                        keys.push(key.clone());
                    }
                }
            }
        }
        Ok(keys)
    }

    /// The last entry of `table` in `start..end` (`None` = no end) as the tree and this
    /// overlay together show it: the job's own puts count, its deletes hide stored entries.
    pub(crate) fn last_live_in(
        &self,
        tables: &Tables,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Option<Entry>, Error> {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let mut stored = tables
            .tree(table)
            .range::<&[u8], _>((Bound::Included(start), upper))
            .rev();
        let mut buffered = self.writes[table.index()]
            .range::<[u8], _>((Bound::Included(start), upper))
            .rev()
            .peekable();
        let mut stored_entry = next_stored_entry(&mut stored, table)?;
        loop {
            let buffered_key = buffered.peek().map(|&(key, _)| key.as_slice());
            let stored_key = stored_entry.as_ref().map(|(key, _)| key.as_ref());
            match (stored_key, buffered_key) {
                (None, None) => return Ok(None),
                (Some(from_tree), from_overlay) if from_overlay.is_none_or(|o| from_tree > o) => {
                    return Ok(stored_entry.map(|(key, value)| (key.to_vec(), value.to_vec())));
                }
                (from_tree, _) => {
                    // The overlay's entry is the larger key, or the same key, whose stored
                    // value it replaces.
                    let replaced = from_tree.is_some() && from_tree == buffered_key;
                    if replaced {
                        stored_entry = next_stored_entry(&mut stored, table)?;
                    }
                    if let Some((key, Some(value))) = buffered.next() {
                        return Ok(Some((key.clone(), value.clone())));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;

    #[test]
    fn damaged_data_read_from_a_table_is_a_corrupt_record_of_that_table() {
        let damaged = read_error(Table::Payloads)(sled::Error::Corruption { at: None, bt: () });
        assert!(
            matches!(
                &damaged,
                Error::Corrupt {
                    table: "payloads",
                    ..
                }
            ),
            "{damaged:?}"
        );
        let io = read_error(Table::Payloads)(sled::Error::Io(std::io::ErrorKind::Other.into()));
        assert!(matches!(io, Error::Io(_)), "{io:?}");
    }

    #[test]
    fn every_table_has_its_own_tree_at_its_index() {
        let names: std::collections::HashSet<&str> = Table::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), TABLE_COUNT);
        for (index, table) in Table::ALL.iter().enumerate() {
            assert_eq!(table.index(), index, "{table:?}");
        }
    }

    /// Short keys from a tiny alphabet, so the tree and the overlay often share keys.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        vec(0..3u8, 0..3)
    }

    /// `stored` in `table` of a fresh ledger and `buffered` in an overlay over it, with the
    /// model of what the two show together.
    fn laid_over(
        table: Table,
        stored: &BTreeMap<Vec<u8>, u8>,
        buffered: &BTreeMap<Vec<u8>, Option<u8>>,
    ) -> (
        tempfile::TempDir,
        Tables,
        Overlay,
        BTreeMap<Vec<u8>, Vec<u8>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tables = Tables::open(db).unwrap();
        let mut overlay = Overlay::default();
        let mut merged = BTreeMap::new();
        for (key, value) in stored {
            tables
                .tree(table)
                .insert(key.as_slice(), vec![*value])
                .unwrap();
            merged.insert(key.clone(), vec![*value]);
        }
        for (key, value) in buffered {
            match value {
                Some(value) => {
                    overlay.put(table, key.clone(), vec![*value]);
                    merged.insert(key.clone(), vec![*value]);
                }
                None => {
                    overlay.delete(table, key.clone());
                    merged.remove(key);
                }
            }
        }
        (dir, tables, overlay, merged)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The last live entry is the last entry of the tree with the overlay's puts laid over
        /// it and its deletes taken out.
        #[test]
        fn last_live_in_lays_the_overlay_over_the_tree(
            stored in btree_map(key(), any::<u8>(), 0..8),
            buffered in btree_map(key(), option::of(any::<u8>()), 0..8),
            start in key(),
            end in option::of(key()),
        ) {
            prop_assume!(end.as_ref().is_none_or(|end| &start <= end));
            let (_dir, tables, overlay, merged) = laid_over(Table::RetryConfig, &stored, &buffered);
            let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let expected = merged
                .range::<[u8], _>((Bound::Included(start.as_slice()), upper))
                .next_back()
                .map(|(key, value)| (key.clone(), value.clone()));
            let found = overlay
                .last_live_in(&tables, Table::RetryConfig, &start, end.as_deref())
                .unwrap();
            prop_assert_eq!(found, expected);
        }

        /// The live keys in a range are the tree's keys with the overlay's puts added and its
        /// deletes taken out, in order, and at most `limit` of them.
        #[test]
        fn live_keys_in_lays_the_overlay_over_the_tree(
            stored in btree_map(key(), any::<u8>(), 0..8),
            buffered in btree_map(key(), option::of(any::<u8>()), 0..8),
            start in key(),
            end in option::of(key()),
            limit in 0..10usize,
        ) {
            prop_assume!(end.as_ref().is_none_or(|end| &start <= end));
            let (_dir, tables, overlay, merged) = laid_over(Table::Payloads, &stored, &buffered);
            let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let expected: Vec<Vec<u8>> = merged
                .range::<[u8], _>((Bound::Included(start.as_slice()), upper))
                .take(limit)
                .map(|(key, _)| key.clone())
                .collect();
            let found = overlay
                .live_keys_in(&tables, Table::Payloads, &start, end.as_deref(), limit)
                .unwrap();
            prop_assert_eq!(found, expected);
        }

        /// A job taken back leaves the group's overlay exactly as it was before the job, even
        /// when the job wrote the same keys as earlier jobs, or one key several times.
        #[test]
        fn a_job_taken_back_leaves_the_overlay_as_it_found_it(
            before in vec((0..3usize, key(), option::of(any::<u8>())), 0..8),
            job in vec((0..3usize, key(), option::of(any::<u8>())), 0..8),
            keep in any::<bool>(),
        ) {
            let table = |i: usize| [Table::Sagas, Table::Outbox, Table::Payloads][i];
            let write = |overlay: &mut Overlay, (i, key, value): &(usize, Vec<u8>, Option<u8>)| {
                match value {
                    Some(value) => overlay.put(table(*i), key.clone(), vec![*value]),
                    None => overlay.delete(table(*i), key.clone()),
                }
            };
            let mut overlay = Overlay::default();
            for entry in &before {
                write(&mut overlay, entry);
            }
            let untouched = overlay.writes.clone();
            let mut expected = Overlay::default();
            for entry in before.iter().chain(&job) {
                write(&mut expected, entry);
            }
            overlay.begin_job();
            for entry in &job {
                write(&mut overlay, entry);
            }
            let kept = overlay.end_job(keep);
            if keep {
                prop_assert_eq!(kept, !job.is_empty());
                prop_assert_eq!(&overlay.writes, &expected.writes);
            } else {
                prop_assert!(!kept);
                prop_assert_eq!(&overlay.writes, &untouched);
            }
        }
    }
}
