//! The intent record that makes one group's plain sled writes all-or-nothing across a crash:
//! its encoding, the writer's account of which intents a flush has covered, and the replay of
//! the ones a crash left behind.
//!
//! Why not a sled transaction per group: each one rolls sled's log buffer twice, two extra
//! writes on sled's I/O pool whose every hand-off wakes all of its threads; at low concurrency
//! that was a fifth of sagad's CPU per saga. sled recovers a prefix of its log, so one record
//! holding all of a group's writes, written before them, is enough: if any of the group's writes
//! survive a crash, so does its intent, and replaying the intent completes the group.
//!
//! Replaying an intent must never undo a later write. Two rules keep it so: intents are removed
//! oldest first and only after a flush covered them, and a group is written without an intent
//! only when it is a single write and no intent is left in the tree.

use super::Error;
use super::codec;
use super::fault::{Fault, PanicWatch};
use super::tables::{Overlay, Table, Tables, storage_error};
use std::collections::VecDeque;
use std::sync::Arc;

/// Format of an intent's value: this byte, then per write `table u8, kind u8 (0 delete, 1 put),
/// key length u32 LE, key`, and for a put `value length u32 LE, value`.
const FORMAT: u8 = 1;
const DELETE: u8 = 0;
const PUT: u8 = 1;
const TREE: &str = "intents";

/// One write of a group: the table, the key, and the value to put (`None` deletes).
pub(crate) type Write = (Table, Vec<u8>, Option<Vec<u8>>);

/// The writer's view of the intents tree; only the writer thread writes through it.
pub(crate) struct Intents {
    next_id: u64,
    /// Ids still in the tree, oldest first.
    live: VecDeque<u64>,
    /// The newest id a successful flush has covered.
    flushed_through: Option<u64>,
    /// Set when a group failed part-way (or could not be made durable): its intent must
    /// outlive this run, so that the next open completes it, and no later group may be written
    /// over its half (nor, once flushed, remove its intent). sled itself refuses all writes
    /// after most such failures.
    fault: Arc<Fault>,
}

impl Intents {
    /// Starts after `recover` emptied the tree, so ids can start from zero again.
    pub(crate) fn new(fault: Arc<Fault>) -> Intents {
        Intents {
            next_id: 0,
            live: VecDeque::new(),
            flushed_through: None,
            fault,
        }
    }

    /// A flush covered every intent up to `id` (its group's writes are durable).
    pub(crate) fn flushed(&mut self, id: u64) {
        self.flushed_through = Some(self.flushed_through.map_or(id, |done| done.max(id)));
    }

    /// How many intents are still in the tree.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.live.len()
    }

    /// Writes the overlay to sled: first removes the intents a flush has covered, then writes
    /// the group's intent (unless it is not needed, see the module comment), then each write.
    /// Returns the id of the group's intent, which a later flush must report before the intent
    /// goes. Readers are kept out meanwhile, so none sees half a group.
    #[cfg(test)]
    pub(crate) fn apply(
        &mut self,
        tables: &Tables,
        overlay: &Overlay,
    ) -> Result<Option<u64>, Error> {
        self.apply_through(tables, overlay, 0)
    }

    /// `apply` for a group whose last job has stamp `through`: once the group is in sled,
    /// reads see that stamp with it (`Tables::shared`).
    pub(crate) fn apply_through(
        &mut self,
        tables: &Tables,
        overlay: &Overlay,
        through: u64,
    ) -> Result<Option<u64>, Error> {
        // Checked even for a group that writes nothing: its jobs may have read the half of a
        // failed group, and must not be answered from it.
        self.fault.check()?;
        let writes = overlay.write_count();
        if writes == 0 {
            return Ok(None);
        }
        // Encoded before anything is written, so a write that cannot be encoded is refused
        // with nothing half done.
        let record = if self.needs_intent(writes) {
            Some(encode(overlay)?)
        } else {
            None
        };
        let mut readers_out = tables.exclusive();
        // Dropped before `readers_out`: a panic inside sled is recorded before readers get in.
        let panic_watch = PanicWatch {
            fault: &self.fault.clone(),
            doing: "writing a group to the ledger",
        };
        let written = self.write_group(tables, overlay, record);
        drop(panic_watch);
        match written {
            Ok(id) => {
                *readers_out = (*readers_out).max(through);
                Ok(id)
            }
            // Recorded while readers are still kept out, so none sees the half written.
            Err(error) => Err(self.fault.fail(&error)),
        }
    }

    /// A group needs an intent unless it is a lone write and no intent will be left once the
    /// ones a flush covered are removed (removal goes oldest first, up to `flushed_through`).
    fn needs_intent(&self, writes: usize) -> bool {
        writes > 1
            || self
                .live
                .iter()
                .any(|&id| self.flushed_through.is_none_or(|done| id > done))
    }

    fn write_group(
        &mut self,
        tables: &Tables,
        overlay: &Overlay,
        record: Option<Vec<u8>>,
    ) -> Result<Option<u64>, Error> {
        self.remove_flushed(tables)?;
        let id = match record {
            Some(record) => {
                let id = self.next_id;
                tables
                    .intents()
                    .insert(codec::u64_key(id), record)
                    .map_err(storage_error)?;
                self.next_id += 1;
                self.live.push_back(id);
                Some(id)
            }
            None => None,
        };
        for (table, key, value) in overlay.writes() {
            write(tables, table, key, value)?;
        }
        Ok(id)
    }

    /// After the last flush, at close: every intent is durable, so none needs to outlive this
    /// run (the next open would only replay writes that are already there).
    pub(crate) fn close(&mut self, tables: &Tables) -> Result<(), Error> {
        if self.fault.check().is_err() {
            // The failed group's intent is for the next open to complete.
            return Ok(());
        }
        if let Some(&newest) = self.live.back() {
            self.flushed(newest);
        }
        self.remove_flushed(tables)?;
        tables.db.flush().map(drop).map_err(storage_error)
    }

    /// Removes, oldest first, the intents a flush has covered.
    fn remove_flushed(&mut self, tables: &Tables) -> Result<(), Error> {
        while let Some(&oldest) = self.live.front() {
            if self.flushed_through.is_none_or(|done| oldest > done) {
                break;
            }
            tables
                .intents()
                .remove(codec::u64_key(oldest))
                .map_err(storage_error)?;
            self.live.pop_front();
        }
        Ok(())
    }
}

fn write(tables: &Tables, table: Table, key: &[u8], value: Option<&[u8]>) -> Result<(), Error> {
    let tree = tables.tree(table);
    match value {
        Some(value) => tree.insert(key, value).map(drop),
        None => tree.remove(key).map(drop),
    }
    .map_err(storage_error)
}

/// Completes the groups a crash cut short: replays every intent left in the tree, oldest
/// first, then removes them. Runs at open, before anything else reads or writes. Returns how
/// many intents it replayed.
pub(crate) fn recover(tables: &Tables) -> Result<usize, Error> {
    let intents = tables.intents();
    // All are read first, so a damaged one stops the open before anything is written.
    let mut left = Vec::new();
    for entry in intents.iter() {
        let (key, value) = entry.map_err(storage_error)?;
        left.push((key, decode(&value)?));
    }
    for (_, writes) in &left {
        for (table, key, value) in writes {
            write(tables, *table, key, value.as_deref())?;
        }
    }
    // Removed only after every replayed write, so a crash in here replays them all again.
    for (key, _) in &left {
        intents.remove(key).map_err(storage_error)?;
    }
    Ok(left.len())
}

pub(crate) fn tree_name() -> &'static str {
    TREE
}

fn encode(overlay: &Overlay) -> Result<Vec<u8>, Error> {
    // Sized exactly up front: a group's intent is its largest encoded value, and growing it
    // write by write regrew it several times per group.
    let size = 1 + overlay
        .writes()
        .map(|(_, key, value)| 2 + 4 + key.len() + value.map_or(0, |v| 4 + v.len()))
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.push(FORMAT);
    for (table, key, value) in overlay.writes() {
        bytes.push(table.code());
        bytes.push(if value.is_some() { PUT } else { DELETE });
        push_slice(&mut bytes, key)?;
        if let Some(value) = value {
            push_slice(&mut bytes, value)?;
        }
    }
    Ok(bytes)
}

fn push_slice(bytes: &mut Vec<u8>, slice: &[u8]) -> Result<(), Error> {
    bytes.extend_from_slice(&encoded_length(slice.len())?.to_le_bytes());
    bytes.extend_from_slice(slice);
    Ok(())
}

/// A key's or value's length as the intent stores it; longer ones are refused, so the group is
/// refused before anything of it is written.
fn encoded_length(length: usize) -> Result<u32, Error> {
    u32::try_from(length).map_err(|_| {
        Error::Storage(format!(
            "a key or value of {length} bytes is over the ledger's 4 GiB limit"
        ))
    })
}

fn decode(bytes: &[u8]) -> Result<Vec<Write>, Error> {
    let corrupt = |detail: &str| Error::Corrupt {
        table: TREE,
        detail: detail.to_string(),
    };
    let mut rest = match bytes.split_first() {
        Some((&FORMAT, rest)) => rest,
        Some((format, _)) => return Err(corrupt(&format!("unknown intent format {format}"))),
        None => return Err(corrupt("empty intent")),
    };
    let mut writes = Vec::new();
    while let Some((&code, after)) = rest.split_first() {
        let table = Table::from_code(code)
            .ok_or_else(|| corrupt(&format!("intent names unknown table {code}")))?;
        let (&kind, after) = after
            .split_first()
            .ok_or_else(|| corrupt("intent ends before a write's kind"))?;
        let (key, after) = take_slice(after).ok_or_else(|| corrupt("intent cuts a key short"))?;
        let (value, after) = match kind {
            PUT => {
                let (value, after) =
                    take_slice(after).ok_or_else(|| corrupt("intent cuts a value short"))?;
                (Some(value.to_vec()), after)
            }
            DELETE => (None, after),
            other => return Err(corrupt(&format!("intent has unknown write kind {other}"))),
        };
        writes.push((table, key.to_vec(), value));
        rest = after;
    }
    Ok(writes)
}

fn take_slice(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_le_bytes(*length)).ok()?;
    (rest.len() >= length).then(|| rest.split_at(length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;

    fn open(dir: &std::path::Path) -> Tables {
        // sled's I/O threads may hold the folder's lock for a moment after a close (see
        // `LOCK_RETRIES` in mod.rs), so a reopen waits for it.
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Err(sled::Error::Io(e)) if attempts < 100 && e.to_string().contains("lock") => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened => break opened.unwrap(),
            }
        };
        Tables::open(db).unwrap()
    }

    fn stored(tables: &Tables, table: Table, key: &[u8]) -> Option<Vec<u8>> {
        tables.tree(table).get(key).unwrap().map(|v| v.to_vec())
    }

    /// A group of two writes, saga `s` and counter `n`, both set to `value`.
    fn group(value: &[u8]) -> Overlay {
        overlay_of(&[
            (Table::Sagas, b"s", Some(value)),
            (Table::Meta, b"n", Some(value)),
        ])
    }

    /// A fresh ledger and the writer's view of its (empty) intents.
    fn fresh() -> (tempfile::TempDir, Tables, Intents) {
        let dir = tempfile::tempdir().unwrap();
        let tables = open(dir.path());
        (dir, tables, Intents::new(Arc::default()))
    }

    fn assert_saga(tables: &Tables, expected: &[u8]) {
        assert_eq!(
            stored(tables, Table::Sagas, b"s").as_deref(),
            Some(expected)
        );
    }

    /// A write as a test spells it: table, key, value to put or `None` to delete.
    type Given<'a> = (Table, &'a [u8], Option<&'a [u8]>);

    fn overlay_of(writes: &[Given<'_>]) -> Overlay {
        let mut overlay = Overlay::default();
        for (table, key, value) in writes {
            match value {
                Some(value) => overlay.put(*table, key.to_vec(), value.to_vec()),
                None => overlay.delete(*table, key.to_vec()),
            }
        }
        overlay
    }

    proptest! {
        #[test]
        fn an_intent_decodes_to_the_writes_it_was_made_of(
            writes in vec(
                (0..Table::ALL.len(), btree_map(vec(any::<u8>(), 0..8), option::of(vec(any::<u8>(), 0..16)), 0..6)),
                0..5,
            ),
        ) {
            let mut overlay = Overlay::default();
            for (index, entries) in &writes {
                for (key, value) in entries {
                    match value {
                        Some(value) => overlay.put(Table::ALL[*index], key.clone(), value.clone()),
                        None => overlay.delete(Table::ALL[*index], key.clone()),
                    }
                }
            }
            let expected: Vec<Write> = overlay
                .writes()
                .map(|(table, key, value)| (table, key.to_vec(), value.map(<[u8]>::to_vec)))
                .collect();
            prop_assert_eq!(decode(&encode(&overlay).unwrap()).unwrap(), expected);
        }

        #[test]
        fn a_damaged_intent_is_reported_not_panicked_on(bytes in vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn a_key_or_value_over_4_gib_is_refused_not_truncated() {
        assert_eq!(encoded_length(0).unwrap(), 0);
        assert_eq!(encoded_length(u32::MAX as usize).unwrap(), u32::MAX);
        let over = u32::MAX as usize + 1;
        assert!(
            matches!(encoded_length(over), Err(Error::Storage(message)) if message.contains("4 GiB"))
        );
    }

    #[test]
    fn a_cut_intent_is_reported_as_corrupt() {
        let overlay = overlay_of(&[(Table::Sagas, b"k", Some(b"value"))]);
        let bytes = encode(&overlay).unwrap();
        for cut in 0..bytes.len() - 1 {
            if cut == 1 {
                // The format byte alone is a valid empty intent.
                continue;
            }
            assert!(
                matches!(
                    decode(&bytes[..cut]),
                    Err(Error::Corrupt { table: TREE, .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_group_cut_short_by_a_crash_is_completed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let tables = open(dir.path());
            tables.tree(Table::Outbox).insert(b"old", b"1").unwrap();
            let overlay = overlay_of(&[
                (Table::Sagas, b"s1", Some(b"started")),
                (Table::Payloads, b"p1", Some(b"payload")),
                (Table::Outbox, b"old", None),
            ]);
            // The intent and the first of its three writes reached the log; the crash took
            // the rest.
            tables
                .intents()
                .insert(codec::u64_key(7), encode(&overlay).unwrap())
                .unwrap();
            tables.tree(Table::Sagas).insert(b"s1", b"started").unwrap();
            tables.db.flush().unwrap();
        }
        let tables = open(dir.path());
        assert_eq!(recover(&tables).unwrap(), 1);
        assert_eq!(
            stored(&tables, Table::Sagas, b"s1").as_deref(),
            Some(&b"started"[..])
        );
        assert_eq!(
            stored(&tables, Table::Payloads, b"p1").as_deref(),
            Some(&b"payload"[..])
        );
        assert_eq!(stored(&tables, Table::Outbox, b"old"), None);
        assert!(tables.intents().is_empty());
        assert_eq!(recover(&tables).unwrap(), 0);
    }

    #[test]
    fn intents_are_replayed_oldest_first_so_the_newest_write_of_a_key_stands() {
        let (_dir, tables, mut intents) = fresh();
        assert_eq!(intents.apply(&tables, &group(b"1")).unwrap(), Some(0));
        assert_eq!(intents.apply(&tables, &group(b"2")).unwrap(), Some(1));
        assert_eq!(recover(&tables).unwrap(), 2);
        assert_saga(&tables, b"2");
        assert_eq!(
            stored(&tables, Table::Meta, b"n").as_deref(),
            Some(&b"2"[..])
        );
    }

    #[test]
    fn an_intent_goes_only_after_a_flush_covered_it() {
        let (_dir, tables, mut intents) = fresh();
        assert_eq!(intents.apply(&tables, &group(b"1")).unwrap(), Some(0));
        assert_eq!(intents.apply(&tables, &group(b"2")).unwrap(), Some(1));
        assert_eq!(intents.live(), 2);
        intents.flushed(0);
        assert_eq!(intents.apply(&tables, &group(b"3")).unwrap(), Some(2));
        assert_eq!(intents.live(), 2, "intent 0 went, 1 and 2 stay");
        assert_eq!(tables.intents().len(), 2);
        intents.flushed(2);
        let single = overlay_of(&[(Table::Outbox, b"o", None)]);
        assert_eq!(
            intents.apply(&tables, &single).unwrap(),
            None,
            "a single write after every intent went needs none"
        );
        assert!(tables.intents().is_empty());
    }

    #[test]
    fn a_single_write_gets_an_intent_while_older_intents_could_be_replayed_over_it() {
        let (_dir, tables, mut intents) = fresh();
        assert_eq!(intents.apply(&tables, &group(b"old")).unwrap(), Some(0));
        // No flush yet: intent 0 stays, and a replay of it after a crash would put "old"
        // back over this write unless this write is replayed after it.
        let single = overlay_of(&[(Table::Sagas, b"s", Some(b"new"))]);
        assert_eq!(intents.apply(&tables, &single).unwrap(), Some(1));
        assert_eq!(recover(&tables).unwrap(), 2);
        assert_saga(&tables, b"new");
    }

    #[test]
    fn closing_leaves_no_intent_to_replay() {
        let (_dir, tables, mut intents) = fresh();
        for value in [b"1", b"2", b"3"] {
            intents.apply(&tables, &group(value)).unwrap();
        }
        assert_eq!(tables.intents().len(), 3);
        intents.close(&tables).unwrap();
        assert!(tables.intents().is_empty());
        assert_saga(&tables, b"3");
    }

    #[test]
    fn a_read_never_sees_half_of_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let tables = open(dir.path());
        let reader = {
            let tables = tables.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let _whole_groups = tables.shared();
                    let first = stored(&tables, Table::Sagas, b"a");
                    let second = stored(&tables, Table::Payloads, b"b");
                    assert_eq!(
                        first, second,
                        "a read saw one write of a group without the other"
                    );
                }
            })
        };
        let mut intents = Intents::new(Arc::default());
        for round in 0..500u32 {
            let value = round.to_be_bytes();
            let group = overlay_of(&[
                (Table::Sagas, b"a", Some(&value)),
                (Table::Payloads, b"b", Some(&value)),
            ]);
            let id = intents.apply(&tables, &group).unwrap();
            if let Some(id) = id {
                intents.flushed(id);
            }
        }
        reader.join().unwrap();
    }

    #[test]
    fn after_a_group_fails_part_way_no_later_group_is_written() {
        let (_dir, tables, mut intents) = fresh();
        intents.apply(&tables, &group(b"1")).unwrap();
        intents.fault.fail(&Error::Storage("disk gone".into()));
        let refused = intents.apply(&tables, &group(b"2"));
        assert!(
            matches!(&refused, Err(Error::Fatal(detail)) if detail.contains("disk gone")),
            "{refused:?}"
        );
        assert_saga(&tables, b"1");
        assert_eq!(
            tables.intents().len(),
            1,
            "the intent stays for the next open"
        );
    }

    #[test]
    fn a_damaged_intent_stops_the_open_before_anything_is_replayed() {
        let (_dir, tables, _) = fresh();
        let good = encode(&group(b"1")).unwrap();
        tables.intents().insert(codec::u64_key(0), good).unwrap();
        tables
            .intents()
            .insert(codec::u64_key(1), vec![FORMAT, 200])
            .unwrap();
        let refused = recover(&tables);
        assert!(
            matches!(&refused, Err(Error::Corrupt { table: TREE, .. })),
            "{refused:?}"
        );
        assert_eq!(stored(&tables, Table::Sagas, b"s"), None);
        assert_eq!(tables.intents().len(), 2, "both stay for a look");
    }
}
