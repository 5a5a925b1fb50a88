//! The writer and flusher threads: the writer runs write jobs one at a time into one in-memory
//! overlay per group and writes the group to sled behind one intent record; the flusher makes
//! written groups durable with one flush and only then answers their jobs. The two overlap, so
//! jobs run while the previous group is being flushed, and a group grows while the disk is
//! busy. They are the only code that writes to sled, and neither runs on a tokio worker.

use super::fault::Fault;
use super::intents::Intents;
use super::tables::{Overlay, Tables, storage_error};
use super::{Durability, Error, WriteTx};
use crate::clock::{Clock, SystemClock};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// Answers one job once its group's flush is known: `Ok` if it made the data durable.
pub(crate) type Reply = Box<dyn FnOnce(Result<(), &Error>) + Send>;

/// Where a job runs: the ledger, its group's overlay and the job's stamp (`WriteTx::stamp`).
pub(crate) struct Slot<'a> {
    pub(crate) tables: &'a Tables,
    pub(crate) overlay: &'a mut Overlay,
    pub(crate) stamp: u64,
}

/// Runs one caller closure in its slot, leaving its writes in the overlay only if it succeeded,
/// and returns how to answer it once its group's flush is known. Given an error instead, the
/// closure is not run and its caller gets that error at once (`None`).
pub(crate) type Run = Box<dyn FnOnce(Result<Slot<'_>, Error>) -> Option<Reply> + Send>;

/// When a job's caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// After a flush has made its group durable.
    WhenDurable,
    /// As soon as its group is applied, without waiting for (or causing) a flush: for writes
    /// whose loss in a crash only makes work be repeated.
    WhenApplied,
}

pub(crate) struct Job {
    pub(crate) run: Run,
    pub(crate) answer: Answer,
}

pub(crate) enum Message {
    Job(Job),
    /// The flusher is done with what it was given: the group built meanwhile can go to it. When
    /// it flushed, `through` is the newest intent that flush made durable, so it can go.
    Flushed {
        through: Option<u64>,
    },
    /// The flusher thread ended while the writer still needed it (it panicked): no write can
    /// be made durable any more.
    FlusherGone,
    /// Finish what is queued ahead, flush durably, release the database and answer.
    Close(oneshot::Sender<Result<(), Error>>),
}

/// Wraps a caller closure into a job that answers on `reply_to`.
pub(crate) fn job<T, E, F>(f: F, reply_to: oneshot::Sender<Result<Result<T, E>, Error>>) -> Run
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    Box::new(move |slot: Result<Slot<'_>, Error>| {
        let Slot {
            tables,
            overlay,
            stamp,
        } = match slot {
            Ok(slot) => slot,
            Err(refused) => {
                let _ = reply_to.send(Err(refused));
                return None;
            }
        };
        overlay.begin_job();
        let mut tx = WriteTx {
            tables,
            overlay,
            stamp,
        };
        // A panicking closure must not take the writer (and every later write) down with it;
        // its buffered writes are taken back, as if it had returned `Err`. It is a bug, not a
        // passing fault, so its caller is told so (`Error::Panicked`) and does not retry it.
        let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut tx)));
        let outcome = ran.map_err(|panic| Error::Panicked(super::panic_message("write", &*panic)));
        overlay.end_job(matches!(outcome, Ok(Ok(_))));
        let reply: Reply = Box::new(move |flushed: Result<(), &Error>| {
            let answer = match flushed {
                Ok(()) => outcome,
                Err(error) => Err(replicate(error)),
            };
            // The caller may have stopped waiting; the write stands either way.
            let _ = reply_to.send(answer);
        });
        Some(reply)
    })
}

/// Why no write can be made durable once a ledger thread is gone.
fn stopped(thread: &str) -> Error {
    Error::Storage(format!("the ledger {thread} thread stopped"))
}

/// A copy of a flush failure for each job of the group (`io::Error` is not `Clone`).
fn replicate(error: &Error) -> Error {
    match error {
        Error::Open { path, detail } => Error::Open {
            path: path.clone(),
            detail: detail.clone(),
        },
        Error::Locked { path } => Error::Locked { path: path.clone() },
        Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
        Error::Storage(detail) => Error::Storage(detail.clone()),
        Error::UnknownVersion { table, version } => Error::UnknownVersion {
            table,
            version: *version,
        },
        Error::Corrupt { table, detail } => Error::Corrupt {
            table,
            detail: detail.clone(),
        },
        Error::Closed => Error::Closed,
        Error::Panicked(detail) => Error::Panicked(detail.clone()),
        Error::Fatal(detail) => Error::Fatal(detail.clone()),
    }
}

/// A group the writer applied (or failed to apply), waiting for a flush.
pub(crate) struct Applied {
    replies: Vec<Reply>,
    /// Whether sled may have been written to.
    wrote: bool,
    /// The group's intent record, which may go once a flush has covered it.
    intent: Option<u64>,
    /// Whether some job of the group waits for a flush (`Answer::WhenDurable`).
    wants_flush: bool,
    applied: Result<(), Error>,
    /// The last group: flush durably and stop.
    close: bool,
}

impl Drop for Applied {
    /// A group dropped unanswered (the flusher died with it, or could not be handed it) can
    /// never be made durable: its callers are told at once, not left waiting.
    fn drop(&mut self) {
        if self.replies.is_empty() {
            return;
        }
        let lost = Error::Fatal("the ledger flusher stopped before this write was flushed".into());
        for reply in self.replies.drain(..) {
            reply(Err(&lost));
        }
    }
}

pub(crate) struct Writer {
    pub(crate) tables: Tables,
    pub(crate) max_group: usize,
    pub(crate) intents: Intents,
    pub(crate) to_flusher: std_mpsc::Sender<Applied>,
    /// Joined on close; it returns the result of the last, durable flush.
    pub(crate) flusher: JoinHandle<Result<(), Error>>,
    /// The stamp of the last job run; jobs run one at a time, so stamps follow their order.
    pub(crate) stamp: u64,
    /// Once set, every job is refused unrun.
    pub(crate) fault: Arc<Fault>,
    /// Makes the next group's write to sled panic, as a bug in sled would.
    #[cfg(test)]
    pub(crate) panic_on_apply: bool,
}

impl Writer {
    pub(crate) fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        let max_group = self.max_group.max(1);
        let mut group = Group::default();
        // A panic (inside sled, say) ends this thread: recorded as a fatal fault, reads are
        // refused too and sagad stops for a restart, rather than serve with no writer.
        // Declared after `group` so that it is dropped first: the fault is recorded before the
        // group's callers find their answers gone, and they are told the fault, not `Closed`.
        let _farewell = Farewell {
            thread: "writer",
            fault: self.fault.clone(),
            writer: None,
        };
        // While the flusher works on a group, the next one is built; it is handed over when
        // the flusher says it is done (or the group is full), so one flush covers all of it.
        let mut flusher_busy = false;
        loop {
            let Some(message) = inbox.blocking_recv() else {
                // Every handle is gone without `close`: still leave nothing unflushed.
                let flushed = self.finish(&mut group);
                if let Err(error) = flushed {
                    tracing::error!(%error, "final ledger flush failed");
                }
                return;
            };
            match message {
                Message::Job(job) => match self.fault.check() {
                    // After a fatal fault nothing is run, not even a job that only reads: it
                    // would answer from writes that may never become durable.
                    Err(refused) => {
                        let _ = (job.run)(Err(refused));
                    }
                    Ok(()) => {
                        self.stamp += 1;
                        group.through = self.stamp;
                        let slot = Slot {
                            tables: &self.tables,
                            overlay: &mut group.overlay,
                            stamp: self.stamp,
                        };
                        if let Some(reply) = (job.run)(Ok(slot)) {
                            match job.answer {
                                Answer::WhenDurable => group.durable.push(reply),
                                Answer::WhenApplied => group.applied.push(reply),
                            }
                        }
                    }
                },
                Message::Flushed { through } => {
                    if let Some(intent) = through {
                        self.intents.flushed(intent);
                    }
                    flusher_busy = false;
                }
                Message::FlusherGone => {
                    self.fault.fail(&stopped("flusher"));
                    // Nothing will say it is done any more: the group waiting for it goes now,
                    // and is answered with the fault.
                    flusher_busy = false;
                }
                Message::Close(done) => {
                    // Later messages are dropped with the inbox; their callers see `Closed`.
                    inbox.close();
                    let flushed = self.finish(&mut group);
                    let _ = done.send(flushed);
                    return;
                }
            }
            if group.jobs() > 0 && (!flusher_busy || group.jobs() >= max_group) {
                let batch = self.apply(&mut group, false);
                if self.to_flusher.send(batch).is_err() {
                    // The flusher is gone, so no flush can be promised: the batch, dropped,
                    // answered its callers, and every later job is refused.
                    self.fault.fail(&stopped("flusher"));
                }
                flusher_busy = true;
            }
        }
    }

    /// Writes the group to sled behind its intent, answers the jobs that wait for no flush,
    /// and empties the group.
    fn apply(&mut self, group: &mut Group, close: bool) -> Applied {
        // Jobs that only read or were rejected may still have read earlier groups' writes, so
        // they too are answered only after a flush.
        let wrote = !group.overlay.is_empty();
        #[cfg(test)]
        assert!(!self.panic_on_apply, "injected: the write to sled panicked");
        let applied = self
            .intents
            .apply_through(&self.tables, &group.overlay, group.through);
        let (applied, intent) = match applied {
            Ok(intent) => (Ok(()), intent),
            // The jobs get the error. A group that failed part-way is a fatal fault
            // (`Intents::apply_through`): it is completed from its intent at the next open, so
            // its jobs' outcome is not known, as after a failed flush.
            Err(error) => (Err(error), None),
        };
        group.overlay.clear();
        for reply in group.applied.drain(..) {
            reply(applied.as_ref().map(|_| ()));
        }
        let replies = std::mem::take(&mut group.durable);
        Applied {
            wants_flush: !replies.is_empty(),
            replies,
            wrote,
            intent,
            applied,
            close,
        }
    }

    /// Hands the last group over, waits for the final durable flush, and releases this
    /// thread's handle on the database before returning, so a caller can reopen the folder
    /// as soon as `close` answers. After a fatal fault it answers that fault, and leaves every
    /// intent for the next open to replay.
    fn finish(mut self, group: &mut Group) -> Result<(), Error> {
        let batch = self.apply(group, true);
        let Writer {
            tables,
            to_flusher,
            flusher,
            mut intents,
            fault,
            ..
        } = self;
        let sent = to_flusher.send(batch);
        drop(to_flusher);
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err(Error::Storage("the ledger flusher panicked".into())));
        if sent.is_err() {
            return Err(fault.fail(&stopped("flusher")));
        }
        flushed.map_err(|error| fault.fail(&error))?;
        intents.close(&tables)
    }
}

/// The group the writer is building: its buffered writes and its jobs' replies.
#[derive(Default)]
struct Group {
    overlay: Overlay,
    /// Answered after the flush that covers the group.
    durable: Vec<Reply>,
    /// Answered once the group is applied.
    applied: Vec<Reply>,
    /// The stamp of the group's last job.
    through: u64,
}

impl Group {
    fn jobs(&self) -> usize {
        self.durable.len() + self.applied.len()
    }
}

pub(crate) struct Flusher {
    pub(crate) tables: Tables,
    pub(crate) durability: Durability,
    pub(crate) sync: FileSync,
    pub(crate) flushes: Arc<AtomicU64>,
    /// Tells the writer a flush is done; weak, so it never keeps the writer's inbox open.
    pub(crate) writer: mpsc::WeakSender<Message>,
    /// True while some applied write may not be flushed yet. Groups that wrote nothing and
    /// follow a successful flush have nothing to make durable, so they skip the flush.
    pub(crate) dirty: bool,
    /// The newest intent of the groups received and not yet flushed.
    pub(crate) unflushed_intent: Option<u64>,
    /// Set by a failed flush; once set, nothing is flushed or answered `Ok` again.
    pub(crate) fault: Arc<Fault>,
}

/// Reports the death of a ledger thread (a panic in sled or in a sync) as a fatal fault, and
/// tells the writer when it is the flusher: the writer would otherwise wait for its word, and
/// every caller with it.
struct Farewell {
    thread: &'static str,
    fault: Arc<Fault>,
    writer: Option<mpsc::WeakSender<Message>>,
}

impl Drop for Farewell {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.fault.fail(&stopped(self.thread));
        if let Some(writer) = self.writer.as_ref().and_then(mpsc::WeakSender::upgrade) {
            // Refused at once when the writer has closed its inbox or is gone.
            let _ = writer.blocking_send(Message::FlusherGone);
        }
    }
}

impl Flusher {
    /// Flushes what the writer applied, in order, answering each group after the flush that
    /// covers it; returns the result of the final flush.
    pub(crate) fn run(mut self, inbox: std_mpsc::Receiver<Applied>) -> Result<(), Error> {
        let _farewell = Farewell {
            thread: "flusher",
            fault: self.fault.clone(),
            writer: Some(self.writer.clone()),
        };
        loop {
            let Ok(first) = inbox.recv() else {
                // The writer went away without a last group: still leave nothing unflushed.
                return self.checked_flush(Durability::Durable);
            };
            // Groups that queued up during the last flush share the next one.
            let mut batches = vec![first];
            batches.extend(inbox.try_iter());
            let close = batches.iter().any(|batch| batch.close);
            self.dirty |= batches.iter().any(|batch| batch.wrote);
            if let Some(newest) = batches.iter().filter_map(|batch| batch.intent).max() {
                self.unflushed_intent = Some(newest);
            }
            // Writes answered when applied stay unflushed until a job waits for a flush (or
            // sled's own periodic flush, or close, makes them durable).
            let wanted = batches.iter().any(|batch| batch.wants_flush);
            let mut through = None;
            let flushed = if close {
                self.checked_flush(Durability::Durable)
            } else if self.dirty && wanted {
                let flushed = self.checked_flush(self.durability);
                if flushed.is_ok() {
                    through = self.unflushed_intent.take();
                }
                flushed
            } else {
                // Even a group that needs no flush is not answered `Ok` after a fault: it may
                // have read writes that will never be durable.
                self.fault.check()
            };
            for mut batch in batches {
                let outcome = match (&batch.applied, &flushed) {
                    (Err(error), _) | (Ok(()), Err(error)) => Err(error),
                    (Ok(()), Ok(())) => Ok(()),
                };
                for reply in std::mem::take(&mut batch.replies) {
                    reply(outcome);
                }
            }
            if close {
                return flushed;
            }
            if let Some(writer) = self.writer.upgrade() {
                // A full inbox only delays this until the writer takes a job; a closed one
                // means the writer is finishing and needs no word.
                let _ = writer.blocking_send(Message::Flushed { through });
            }
        }
    }

    /// Flushes unless a fault came first. A flush that fails is a fatal fault: Linux reports a
    /// failed writeback once, so a later flush could pass with this one's data lost.
    fn checked_flush(&mut self, durability: Durability) -> Result<(), Error> {
        self.fault.check()?;
        let result = self.flush_inner(durability);
        self.dirty = result.is_err();
        match result {
            Ok(()) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => Err(self.fault.fail(&error)),
        }
    }

    fn flush_inner(&mut self, durability: Durability) -> Result<(), Error> {
        self.tables.db.flush().map_err(storage_error)?;
        match durability {
            Durability::Durable => {
                self.sync.sync()?;
                Ok(())
            }
            Durability::Relaxed => Ok(()),
        }
    }
}

/// What sled's flush leaves undone for power-loss safety: sled writes the data file with
/// `sync_file_range`, which persists neither the file's metadata nor the disk's cache, and it
/// never fsyncs the blob files it writes for pages over ~128 KiB.
pub(crate) struct FileSync {
    /// A descriptor of `<path>/db`: fdatasync acts on the file, whichever descriptor asks.
    data_file: File,
    blobs_dir: PathBuf,
    /// Blob files (named by LSN) already synced, with the length each had when it was. Per
    /// file rather than a high-water mark, because sled's background page rewrites may create
    /// a blob with a lower LSN after a higher one; with the length, because sled writes a blob
    /// in several calls after creating it, so a listing can find one part-way and its tail
    /// needs a sync of its own.
    synced_blobs: HashMap<u64, u64>,
    /// The last complete listing of the blob folder; `None` until there is one.
    listed: Option<Listing>,
    /// How often each blob was synced, so tests can tell a sync that was skipped.
    #[cfg(test)]
    blob_syncs: HashMap<u64, u32>,
    /// Makes the next sync panic, as a bug in it or in what it calls would.
    #[cfg(test)]
    panic_on_sync: bool,
}

/// When the blob folder was last listed, and its modification time just before.
#[derive(Debug, Clone, Copy)]
struct Listing {
    folder_mtime: SystemTime,
    at: SystemTime,
}

/// How long the blob folder must have been left alone before an unchanged modification time
/// is trusted to mean no blob was added. File systems stamp folders from a coarse clock (some
/// keep only whole seconds, FAT two), so a blob created soon after another change can leave
/// the time as it was; one created after a listing that ran this long after the last change
/// cannot.
const BLOB_FOLDER_SETTLED: Duration = Duration::from_secs(10);

/// Whether the blob folder must be listed again to find blobs not yet synced. Almost no ledger
/// has blobs (only pages over ~128 KiB become one), so a settled folder turns the listing
/// (open, read, close on every durable flush, on the path of every acknowledged write) into
/// one stat.
fn must_list_blobs(last: Option<&Listing>, folder_mtime: SystemTime) -> bool {
    let Some(last) = last else {
        return true;
    };
    let settled = last
        .at
        .duration_since(last.folder_mtime)
        .is_ok_and(|quiet| quiet >= BLOB_FOLDER_SETTLED);
    last.folder_mtime != folder_mtime || !settled
}

impl FileSync {
    pub(crate) fn new(data_file: File, blobs_dir: PathBuf) -> FileSync {
        FileSync {
            data_file,
            blobs_dir,
            synced_blobs: HashMap::new(),
            listed: None,
            #[cfg(test)]
            blob_syncs: HashMap::new(),
            #[cfg(test)]
            panic_on_sync: false,
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        assert!(!self.panic_on_sync, "injected: the sync panicked");
        self.data_file.sync_data()?;
        // The folder's time and `at` are both taken before the listing, so a blob created
        // while it runs changes the folder after `folder_mtime` and is found by the next one.
        let folder_mtime = std::fs::metadata(&self.blobs_dir)
            .and_then(|meta| meta.modified())
            .ok();
        if let Some(mtime) = folder_mtime
            && !must_list_blobs(self.listed.as_ref(), mtime)
        {
            return Ok(());
        }
        // The real wall clock, never an injected one: it is compared with the file system's
        // stamps. Milliseconds round it down, which only makes the folder look less settled.
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(SystemClock.now_ms());
        let mut present = HashSet::new();
        let mut named_any = false;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok())
            else {
                continue;
            };
            // sled garbage-collects blobs it no longer needs; a vanished one needs no sync.
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            present.insert(lsn);
            if self.synced_blobs.get(&lsn) == Some(&len) {
                continue;
            }
            let blob = match File::open(entry.path()) {
                Ok(blob) => blob,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Taken before the sync, so every byte it counts is on disk once the sync returns;
            // anything written after makes the file longer than recorded, and a later listing
            // syncs it.
            let synced_len = blob.metadata()?.len();
            blob.sync_data()?;
            named_any |= self.synced_blobs.insert(lsn, synced_len).is_none();
            #[cfg(test)]
            {
                *self.blob_syncs.entry(lsn).or_default() += 1;
            }
        }
        if named_any {
            // The new names must survive too, not only the contents.
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs.retain(|lsn, _| present.contains(lsn));
        self.listed = folder_mtime.map(|folder_mtime| Listing { folder_mtime, at });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tables::Table;
    use super::*;

    fn secs(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(n)
    }

    #[test]
    fn blob_folder_is_listed_until_a_listing_has_seen_it_settled() {
        let settled = Listing {
            folder_mtime: secs(1_000),
            at: secs(1_010),
        };
        assert!(must_list_blobs(None, secs(1_000)), "never listed");
        assert!(
            !must_list_blobs(Some(&settled), secs(1_000)),
            "settled and unchanged"
        );
        assert!(
            must_list_blobs(Some(&settled), secs(1_020)),
            "changed since"
        );
        let recent = Listing {
            folder_mtime: secs(1_000),
            at: secs(1_009),
        };
        assert!(
            must_list_blobs(Some(&recent), secs(1_000)),
            "a blob created in the same clock tick as the last change would not move the time"
        );
        let ahead = Listing {
            folder_mtime: secs(1_000),
            at: secs(900),
        };
        assert!(
            must_list_blobs(Some(&ahead), secs(1_000)),
            "a folder time after the listing (a clock step) proves nothing"
        );
    }

    #[test]
    fn blob_created_after_a_sync_is_synced_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let data = File::create(dir.path().join("db")).unwrap();
        let mut sync = FileSync::new(data, blobs.clone());
        sync.sync().unwrap();
        assert!(sync.synced_blobs.is_empty());
        std::fs::write(blobs.join("42"), b"blob").unwrap();
        sync.sync().unwrap();
        assert!(sync.synced_blobs.contains_key(&42));
        std::fs::remove_file(blobs.join("42")).unwrap();
        sync.sync().unwrap();
        assert!(
            sync.synced_blobs.is_empty(),
            "a collected blob is forgotten"
        );
    }

    #[test]
    fn blob_that_grew_after_its_sync_is_synced_again() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let data = File::create(dir.path().join("db")).unwrap();
        let mut sync = FileSync::new(data, blobs.clone());
        // sled's write_blob: create_new, then the crc, the kind byte and the body, each its own
        // write; a flush between them sees the file short.
        let mut blob = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(blobs.join("7"))
            .unwrap();
        blob.write_all(b"crc!").unwrap();
        sync.sync().unwrap();
        assert_eq!(sync.blob_syncs.get(&7), Some(&1));
        blob.write_all(b"k").unwrap();
        blob.write_all(&[0xAB; 4096]).unwrap();
        drop(blob);
        sync.sync().unwrap();
        assert_eq!(
            sync.blob_syncs.get(&7),
            Some(&2),
            "the tail written after the first sync must be synced too"
        );
        sync.sync().unwrap();
        assert_eq!(
            sync.blob_syncs.get(&7),
            Some(&2),
            "an unchanged blob is not synced again"
        );
    }

    #[tokio::test]
    async fn a_writer_whose_flusher_is_gone_refuses_the_next_job_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (to_flusher, flusher_inbox) = std_mpsc::channel();
        drop(flusher_inbox);
        let fault = Arc::new(Fault::default());
        let writer = Writer {
            tables: Tables::open(db).unwrap(),
            max_group: 512,
            intents: Intents::new(fault.clone()),
            to_flusher,
            flusher: std::thread::spawn(|| Ok(())),
            stamp: 0,
            fault,
            panic_on_apply: false,
        };
        let (inbox, writer_inbox) = mpsc::channel(16);
        let running = std::thread::spawn(move || writer.run(writer_inbox));
        let send_job = |inbox: mpsc::Sender<Message>| async move {
            let (reply_to, reply) = oneshot::channel::<Result<Result<(), Error>, Error>>();
            let run = job(|_tx: &mut WriteTx<'_>| Ok(()), reply_to);
            // A refused send drops the job, which answers it too.
            let _ = inbox
                .send(Message::Job(Job {
                    run,
                    answer: Answer::WhenDurable,
                }))
                .await;
            tokio::time::timeout(Duration::from_secs(5), reply).await
        };
        let first = send_job(inbox.clone()).await;
        assert!(
            matches!(first, Ok(Err(_) | Ok(Err(_)))),
            "the job whose group the flusher could not take is not answered Ok: {first:?}"
        );
        let second = send_job(inbox.clone()).await;
        assert!(
            matches!(second, Ok(Err(_) | Ok(Err(_)))),
            "a later job is refused at once, not left waiting for a flush that never comes: {second:?}"
        );
        drop(inbox);
        running.join().unwrap();
    }

    /// A writer and its flusher over a fresh ledger in `dir`, syncing with `sync`, as
    /// `Store::open` starts them; the writer panics on its first group if `panic_on_apply`.
    fn start(
        dir: &std::path::Path,
        sync: impl FnOnce(&std::path::Path) -> FileSync,
        panic_on_apply: bool,
    ) -> (mpsc::Sender<Message>, JoinHandle<()>, Arc<Fault>) {
        let db = sled::Config::new().path(dir).open().unwrap();
        let tables = Tables::open(db).unwrap();
        let fault = Arc::new(Fault::default());
        let (inbox, writer_inbox) = mpsc::channel(16);
        let (to_flusher, flusher_inbox) = std_mpsc::channel();
        let flusher = Flusher {
            tables: tables.clone(),
            durability: Durability::Durable,
            sync: sync(dir),
            flushes: Arc::default(),
            writer: inbox.downgrade(),
            dirty: false,
            unflushed_intent: None,
            fault: fault.clone(),
        };
        let flusher = std::thread::spawn(move || flusher.run(flusher_inbox));
        let writer = Writer {
            tables,
            max_group: 512,
            intents: Intents::new(fault.clone()),
            to_flusher,
            flusher,
            stamp: 0,
            fault: fault.clone(),
            panic_on_apply,
        };
        let running = std::thread::spawn(move || writer.run(writer_inbox));
        (inbox, running, fault)
    }

    /// Sends a job that writes one key, and waits at most 5 s for its answer.
    async fn put(
        inbox: &mpsc::Sender<Message>,
        key: &'static [u8],
    ) -> Result<Result<Result<(), Error>, Error>, tokio::time::error::Elapsed> {
        let (reply_to, reply) = oneshot::channel();
        let run = job(
            move |tx: &mut WriteTx<'_>| -> Result<(), Error> {
                tx.overlay.put(Table::Meta, key.to_vec(), b"1".to_vec());
                Ok(())
            },
            reply_to,
        );
        let sent = inbox.send(Message::Job(Job {
            run,
            answer: Answer::WhenDurable,
        }));
        let _ = sent.await;
        tokio::time::timeout(Duration::from_secs(5), async {
            reply.await.unwrap_or(Err(Error::Closed))
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flusher_that_dies_mid_flush_fails_its_waiting_writers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, writer, _) = start(
            dir.path(),
            |dir| {
                let mut sync =
                    FileSync::new(File::open(dir.join("db")).unwrap(), dir.join("blobs"));
                sync.panic_on_sync = true;
                sync
            },
            false,
        );
        let first = put(&inbox, b"a").await;
        assert!(
            matches!(first, Ok(Err(_) | Ok(Err(_)))),
            "the write whose flush panicked is not answered Ok: {first:?}"
        );
        // The writer heard nothing more from the flusher; it must not wait for it.
        let second = put(&inbox, b"b").await;
        assert!(
            matches!(second, Ok(Err(Error::Fatal(_)))),
            "a later write is refused at once as a fatal fault: {second:?}"
        );
        drop(inbox);
        writer.join().unwrap();
    }

    /// Dropped with the answer of a job the writer never answered; records whether the fault
    /// was known by then.
    struct Witness {
        fault: Arc<Fault>,
        saw_fault: Arc<std::sync::Mutex<Option<bool>>>,
    }

    impl Drop for Witness {
        fn drop(&mut self) {
            *self.saw_fault.lock().unwrap() = Some(self.fault.check().is_err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_dies_mid_group_records_the_fatal_fault_before_its_callers_hear() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, writer, fault) = start(
            dir.path(),
            |dir| FileSync::new(File::open(dir.join("db")).unwrap(), dir.join("blobs")),
            true,
        );
        let saw_fault = Arc::default();
        let witness = Witness {
            fault: fault.clone(),
            saw_fault: Arc::clone(&saw_fault),
        };
        let run: Run = Box::new(move |_slot| {
            let reply: Reply = Box::new(move |_flushed| drop(witness));
            Some(reply)
        });
        inbox
            .send(Message::Job(Job {
                run,
                answer: Answer::WhenDurable,
            }))
            .await
            .unwrap();
        let joined = tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
        assert!(joined.is_err(), "the writer thread panicked");
        // The caller's answer went with the dying thread; by then the fault must be recorded,
        // so that `Store` tells the caller to stop (UNAVAILABLE, restart), not `Closed`.
        assert_eq!(*saw_fault.lock().unwrap(), Some(true));
        assert!(
            matches!(fault.gone(), Error::Fatal(m) if m.contains("writer")),
            "{:?}",
            fault.gone()
        );
        let later = put(&inbox, b"b").await;
        assert!(
            matches!(later, Ok(Err(Error::Closed))),
            "no writer is left to answer: {later:?}"
        );
    }
}
