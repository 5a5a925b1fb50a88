//! The writer thread: runs write jobs one at a time, applies each as one sled transaction, and
//! makes a whole group of them durable with one flush before answering any of them.
//! It is the only code that writes to sled, and it never runs on a tokio worker.

use super::tables::{Overlay, Tables, storage_error};
use super::{Durability, Error, WriteTx};
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Answers one job once its group's flush is known: `Ok` if it made the data durable.
pub(crate) type Reply = Box<dyn FnOnce(Result<(), &Error>) + Send>;

/// Runs one caller closure and applies its writes; says whether sled was written to.
pub(crate) type Job = Box<dyn FnOnce(&Tables) -> (Reply, bool) + Send>;

pub(crate) enum Message {
    Job(Job),
    /// Finish what is queued ahead, flush durably, release the database and answer.
    Close(oneshot::Sender<Result<(), Error>>),
}

/// Wraps a caller closure into a job that answers on `reply_to`.
pub(crate) fn job<T, E, F>(f: F, reply_to: oneshot::Sender<Result<Result<T, E>, Error>>) -> Job
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    Box::new(move |tables: &Tables| {
        let mut tx = WriteTx {
            tables,
            overlay: Overlay::default(),
        };
        // A panicking closure must not take the writer (and every later write) down with it;
        // its buffered writes are simply dropped, as if it had returned `Err`.
        let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut tx)));
        let overlay = tx.overlay;
        let (outcome, wrote) = match ran {
            Err(_panic) => (Err(Error::Storage("write job panicked".into())), false),
            Ok(Err(rejected)) => (Ok(Err(rejected)), false),
            Ok(Ok(value)) if overlay.is_empty() => (Ok(Ok(value)), false),
            Ok(Ok(value)) => (tables.apply(&overlay).map(|()| Ok(value)), true),
        };
        let reply: Reply = Box::new(move |flushed: Result<(), &Error>| {
            let answer = match flushed {
                Ok(()) => outcome,
                Err(error) => Err(replicate(error)),
            };
            // The caller may have stopped waiting; the write stands either way.
            let _ = reply_to.send(answer);
        });
        (reply, wrote)
    })
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
    }
}

pub(crate) struct Writer {
    pub(crate) tables: Tables,
    pub(crate) durability: Durability,
    pub(crate) max_group: usize,
    pub(crate) sync: FileSync,
    pub(crate) flushes: Arc<AtomicU64>,
    /// True while some applied write may not be flushed yet. A group that wrote nothing and
    /// follows a successful flush has nothing to make durable, so it skips the flush.
    pub(crate) dirty: bool,
}

impl Writer {
    pub(crate) fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        let max_group = self.max_group.max(1);
        loop {
            let Some(first) = inbox.blocking_recv() else {
                // Every handle is gone without `close`: still leave nothing unflushed.
                if let Err(error) = self.flush(Durability::Durable) {
                    tracing::error!(%error, "final ledger flush failed");
                }
                return;
            };
            let mut replies = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Job(job) => {
                        let (reply, wrote) = job(&self.tables);
                        self.dirty |= wrote;
                        replies.push(reply);
                    }
                    Message::Close(done) => close = Some(done),
                }
                if close.is_none() && replies.len() < max_group {
                    next = inbox.try_recv().ok();
                }
            }
            let flushed = match close {
                Some(_) => self.flush(Durability::Durable),
                None if self.dirty => self.flush(self.durability),
                None => Ok(()),
            };
            for reply in replies {
                reply(flushed.as_ref().map(|_| ()));
            }
            if let Some(done) = close {
                // Later messages are dropped with the inbox; their callers see `Closed`.
                inbox.close();
                // Release this thread's handle on the database before answering, so a caller
                // can reopen the folder as soon as `close` returns.
                drop(self);
                let _ = done.send(flushed);
                return;
            }
        }
    }

    fn flush(&mut self, durability: Durability) -> Result<(), Error> {
        let result = self.flush_inner(durability);
        self.dirty = result.is_err();
        if result.is_ok() {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        result
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
/// never fsyncs the blob files it writes for values over ~128 KiB.
pub(crate) struct FileSync {
    /// A descriptor of `<path>/db`: fdatasync acts on the file, whichever descriptor asks.
    pub(crate) data_file: File,
    pub(crate) blobs_dir: PathBuf,
    /// Blob files (named by LSN) already synced. A set rather than a high-water mark, because
    /// sled's background page rewrites may create a blob with a lower LSN after a higher one.
    pub(crate) synced_blobs: HashSet<u64>,
}

impl FileSync {
    fn sync(&mut self) -> io::Result<()> {
        self.data_file.sync_data()?;
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok())
            else {
                continue;
            };
            present.insert(lsn);
            if self.synced_blobs.contains(&lsn) {
                continue;
            }
            match File::open(entry.path()) {
                Ok(blob) => blob.sync_data()?,
                // sled garbage-collects blobs it no longer needs; a vanished one needs no sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            self.synced_blobs.insert(lsn);
            synced_any = true;
        }
        if synced_any {
            // The new names must survive too, not only the contents.
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs.retain(|lsn| present.contains(lsn));
        Ok(())
    }
}
