//! The ledger's intent log: each group of writes, appended to one file and fdatasync'd before any
//! of its writes is answered, so a durable commit costs one append and one fdatasync instead of
//! a sled flush (which hops through sled's I/O threads and uses `sync_file_range`, which does not
//! survive a power loss). sled holds the same writes, applied but flushed only now and then; a
//! checkpoint (sled flush + fdatasync of its data file) makes the log's contents redundant and
//! empties it. On open, groups the log holds and sled lost are applied again, in order.
//!
//! Record: `[body length u32 LE][crc32 of body u32 LE][body]`, body = `[group number u64 LE]`
//! then per write `[table u8][key length u32 LE][key][0 = delete | 1 = put][value length u32 LE]
//! [value]`. Group numbers increase by one; replay stops at the first record that is torn, fails
//! its checksum or breaks the sequence (what follows it was never acknowledged).

use super::Error;
use super::tables::{Overlay, Table, Tables, storage_error};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// The file, in the ledger folder beside sled's.
pub(crate) const FILE_NAME: &str = "intent.log";

/// The meta key holding the number of the last group applied to sled, written in the same
/// transaction as the group, so after a crash sled itself says which groups it kept.
pub(crate) const APPLIED_GROUP: &[u8] = b"applied_group";

/// A checkpoint empties the log once it grows past this.
pub(crate) const CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;

const HEADER: usize = 8;

pub(crate) struct Wal {
    file: File,
    len: u64,
    buffer: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the log and returns it with the groups it holds, oldest first.
    pub(crate) fn open(folder: &Path) -> io::Result<(Wal, Vec<(u64, Overlay)>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(folder.join(FILE_NAME))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let groups = decode_groups(&bytes);
        let wal = Wal {
            len: bytes.len() as u64,
            file,
            buffer: Vec::new(),
        };
        Ok((wal, groups))
    }

    /// Adds a group to the pending buffer; `write` sends it to the file.
    pub(crate) fn push(&mut self, group: u64, writes: &Overlay) {
        let start = self.buffer.len();
        self.buffer.extend_from_slice(&[0; HEADER]);
        self.buffer.extend_from_slice(&group.to_le_bytes());
        writes.for_each(|table, key, value| {
            self.buffer.push(table as u8);
            put_bytes(&mut self.buffer, key);
            match value {
                None => self.buffer.push(0),
                Some(value) => {
                    self.buffer.push(1);
                    put_bytes(&mut self.buffer, value);
                }
            }
        });
        let body = &self.buffer[start + HEADER..];
        let crc = crc32fast::hash(body);
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        self.buffer[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buffer[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    }

    /// Writes what was pushed to the file (to the kernel: it survives a crash of sagad), and
    /// with `sync` makes it durable.
    pub(crate) fn write(&mut self, sync: bool) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.file.write_all(&self.buffer)?;
            self.len += self.buffer.len() as u64;
            self.buffer.clear();
        }
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Empties the log, once sled holds everything in it durably. The truncation need not be
    /// durable: records that reappear after a crash carry group numbers sled already has.
    pub(crate) fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

/// Applies the groups sled lost (those numbered past its `APPLIED_GROUP`), in order, and returns
/// the number of the last group sled now holds (0 for none).
pub(crate) fn replay(tables: &Tables, groups: Vec<(u64, Overlay)>) -> Result<u64, Error> {
    let mut applied = applied_group(tables)?;
    for (group, mut writes) in groups {
        if group <= applied {
            continue;
        }
        writes.put(
            Table::Meta,
            APPLIED_GROUP.to_vec(),
            group.to_be_bytes().to_vec(),
        );
        tables.apply(&writes)?;
        applied = group;
    }
    Ok(applied)
}

fn applied_group(tables: &Tables) -> Result<u64, Error> {
    match tables.get_raw(Table::Meta, APPLIED_GROUP)? {
        Some(bytes) => super::codec::decode_u64(Table::Meta.name(), &bytes),
        None => Ok(0),
    }
}

/// Makes everything applied to sled durable in sled's own files.
pub(crate) fn sled_flush(tables: &Tables) -> Result<(), Error> {
    tables.db.flush().map_err(storage_error).map(|_| ())
}

fn put_bytes(buffer: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    buffer.extend_from_slice(&len.to_le_bytes());
    buffer.extend_from_slice(bytes);
}

/// The groups of a log file, up to the first record that is torn, corrupt or out of sequence.
fn decode_groups(bytes: &[u8]) -> Vec<(u64, Overlay)> {
    let mut groups: Vec<(u64, Overlay)> = Vec::new();
    let mut rest = bytes;
    while rest.len() >= HEADER {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let Some(body) = rest.get(HEADER..HEADER + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Some((group, writes)) = decode_body(body) else {
            break;
        };
        if let Some((last, _)) = groups.last()
            && group != last + 1
        {
            break;
        }
        groups.push((group, writes));
        rest = &rest[HEADER + len..];
    }
    groups
}

fn decode_body(body: &[u8]) -> Option<(u64, Overlay)> {
    let mut reader = Reader(body);
    let group = u64::from_le_bytes(reader.take(8)?.try_into().ok()?);
    let mut writes = Overlay::default();
    while !reader.0.is_empty() {
        let table = Table::from_index(usize::from(reader.take(1)?[0]))?;
        let key = reader.bytes()?.to_vec();
        match reader.take(1)?[0] {
            0 => writes.delete(table, key),
            1 => {
                let value = reader.bytes()?.to_vec();
                writes.put(table, key, value);
            }
            _ => return None,
        }
    }
    Some((group, writes))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn group(n: u8) -> Overlay {
        let mut writes = Overlay::default();
        writes.put(Table::Sagas, vec![n], vec![n; 3]);
        writes.put(Table::Outbox, vec![n, 1], vec![]);
        writes.delete(Table::Due, vec![n]);
        writes
    }

    fn entries(writes: &Overlay) -> Vec<(u8, Vec<u8>, Option<Vec<u8>>)> {
        let mut all = Vec::new();
        writes.for_each(|table, key, value| {
            all.push((table as u8, key.to_vec(), value.map(<[u8]>::to_vec)))
        });
        all
    }

    #[test]
    fn groups_read_back_as_written_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, none) = Wal::open(dir.path()).unwrap();
        assert!(none.is_empty());
        for n in 1..=3 {
            wal.push(u64::from(n), &group(n));
        }
        wal.write(true).unwrap();
        // A fourth record cut short, as a crash in the middle of the append leaves it.
        wal.push(4, &group(4));
        let torn = wal.buffer.len() - 3;
        wal.file.write_all(&wal.buffer[..torn]).unwrap();
        drop(wal);

        let (_, groups) = Wal::open(dir.path()).unwrap();
        let numbers: Vec<u64> = groups.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [1, 2, 3]);
        for (n, writes) in &groups {
            assert_eq!(entries(writes), entries(&group(*n as u8)));
        }
    }

    #[test]
    fn replay_stops_at_a_corrupt_record_or_a_gap_in_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.push(1, &group(1));
        wal.push(2, &group(2));
        wal.push(4, &group(4));
        wal.write(true).unwrap();
        let (_, groups) = Wal::open(dir.path()).unwrap();
        assert_eq!(groups.len(), 2, "the gap before 4 ends the log");

        let mut bytes = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let (_, groups) = Wal::open(dir.path()).unwrap();
        assert_eq!(groups.len(), 2);
        // A flipped byte in the first record ends the log there.
        bytes[HEADER + 9] ^= 0xff;
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let (_, groups) = Wal::open(dir.path()).unwrap();
        assert!(groups.is_empty());
    }

    /// sled lost the groups after its last flush; the log gives them back, and groups sled
    /// kept are not applied a second time.
    #[test]
    fn replay_applies_only_the_groups_sled_lost() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let tables = Tables::open(db).unwrap();
        // sled kept group 1, then a later group it also kept deleted key 1 again.
        let mut kept = group(1);
        kept.delete(Table::Sagas, vec![1]);
        kept.put(
            Table::Meta,
            APPLIED_GROUP.to_vec(),
            1u64.to_be_bytes().to_vec(),
        );
        tables.apply(&kept).unwrap();
        let mut newer = Overlay::default();
        newer.put(Table::Sagas, vec![9], b"from group 3".to_vec());
        let groups = vec![(1, group(1)), (2, group(2)), (3, newer)];
        assert_eq!(replay(&tables, groups).unwrap(), 3);
        assert!(
            tables.get_raw(Table::Sagas, &[1]).unwrap().is_none(),
            "group 1, which sled had, was applied again over what came after it"
        );
        assert_eq!(
            tables
                .get_raw(Table::Sagas, &[9])
                .unwrap()
                .unwrap()
                .as_ref(),
            b"from group 3"
        );
        assert!(tables.get_raw(Table::Sagas, &[2]).unwrap().is_some());
        assert_eq!(applied_group(&tables).unwrap(), 3);
        assert_eq!(
            replay(&tables, vec![(2, group(5))]).unwrap(),
            3,
            "old groups are skipped"
        );
        assert!(tables.get_raw(Table::Sagas, &[5]).unwrap().is_none());
    }
}
