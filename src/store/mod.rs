//! The ledger: the only module that names sled. It owns the trees, the versioned record
//! encoding, the writer thread and its flusher (group commit), and the reader thread; callers
//! talk to it through async methods and never touch sled from a tokio worker (TOOLING.md: that
//! deadlocks).
//!
//! Interface contract (the engine relies on every line):
//! - `write(f)` runs `f` on the writer thread, alone: no other write runs concurrently, so a
//!   closure may read, decide and write without races, and it sees every write acknowledged or
//!   run before it. If `f` returns `Ok`, all its writes are applied atomically across trees; if
//!   it returns `Err` (or panics), none are. The writes of a whole group of jobs reach sled
//!   behind one intent record (`intents.rs`), so a crash keeps a group entirely or not at all.
//! - The future returned by `write` resolves only after the group of writes that contains it has
//!   been made durable (per `Durability`), whether `f` returned `Ok` or `Err`: even a rejection
//!   may have read data that was applied but not yet flushed, and must not be answered before it.
//! - Many writes queued at once share one flush (group commit), and writes keep running while
//!   the previous group is being flushed: the group they form goes to the next flush.
//! - `write_unflushed(f)` is `write` for a write whose loss in a crash is harmless: it is
//!   answered once applied, and neither waits for nor causes a flush.
//! - `read(f)` runs `f` on the reader thread. It sees the groups already applied to sled, each
//!   whole, which may include one not yet flushed: for up to one flush, a read can show a write
//!   whose caller has not been answered yet and which a crash would lose (its caller is then
//!   never told it was durable).
//! - Each write job has a stamp (`WriteTx::stamp`), higher than every job run before it, and a
//!   read knows the stamp of the last write it sees (`ReadTx::stamp`).
//! - A closure that panics answers `Error::Panicked`, a bug that running it again only repeats.
//! - Once a group could not be made durable (a failed flush or sync), reached sled only in part,
//!   or the flusher thread died, the ledger is failed for good: that group's callers and every
//!   later `write` and `read` get `Error::Fatal`, and `fatal_fault` resolves. Only a restart
//!   brings it back, completing the ledger from what is on disk.

mod codec;
mod fault;
mod intents;
mod reader;
pub mod records;
mod strategies;
mod tables;
mod upgrade;
mod writer;

pub use records::{
    BranchRecord, ChannelRetryRecord, DueRecord, ExceptionScopeRecord, IdempotencyRecord,
    NodeRecord, OutboxRecord, PayloadRecord, RetryAttemptRecord, RetryConfigRecord,
    RetryHistoryRecord, RetryPolicyRecord, RuleRecord, SagaRecord, StatusMappingRecord, StepRecord,
    StepStatusRecord, StrategyRecord, TimelineRecord, TransactionRetryRecord,
};

use codec::Record;
pub(crate) use codec::encode_unversioned;
use records::RetryLinkRecord;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use tables::{Overlay, Table, Tables, read_error};
use tokio::sync::{mpsc, oneshot};

/// What "acknowledged" promises; chosen per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// sled's flush, then fdatasync of the data file (and of any blob file new or grown since
    /// its last sync): an acknowledged write survives a crash of sagad and a power loss of the
    /// machine.
    Durable,
    /// sled's flush only: the data reaches the kernel, so it survives a crash of sagad but may be
    /// lost, even though acknowledged, if the machine loses power.
    Relaxed,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The ledger folder; created if missing.
    pub path: PathBuf,
    pub durability: Durability,
    /// sled's page cache size; sled's default (1 GiB) is far more than a sidecar should take.
    pub cache_capacity_bytes: u64,
    /// At most this many writes share one flush.
    pub max_group: usize,
}

impl Options {
    pub fn new(path: impl Into<PathBuf>) -> Options {
        Options {
            path: path.into(),
            durability: Durability::Durable,
            cache_capacity_bytes: 64 * 1024 * 1024,
            max_group: 512,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the ledger folder {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error(
        "the ledger folder {path} is locked by another process (is another sagad running on it?)"
    )]
    Locked { path: PathBuf },
    #[error("ledger I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("ledger storage failed: {0}")]
    Storage(String),
    #[error("a record in table {table} has format version {version}, which this sagad cannot read")]
    UnknownVersion { table: &'static str, version: u8 },
    #[error("a record in table {table} is corrupt: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("the ledger is closed")]
    Closed,
    /// A caller's closure panicked: a bug, which running it again only repeats.
    #[error("{0}")]
    Panicked(String),
    /// A group of writes could not be made durable, or reached sled only in part. Nothing
    /// later can be trusted to be durable (Linux reports a failed writeback once, so the next
    /// flush may pass with the data lost), and what sled holds may not be what is on disk, so
    /// from then on every write and read is refused; a restart recovers from what is on disk
    /// (`Store::fatal_fault`).
    #[error(
        "the ledger could not be made durable ({0}); sagad refuses all work until it is \
         restarted, which recovers the ledger from what is on disk"
    )]
    Fatal(String),
}

/// Which namespace an idempotency key lives in, so participants can never collide with (or
/// forge) sagad's own request records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdempotencyNamespace {
    /// sagad's own mutating RPCs; `scope` is the method name.
    Coordinator = 0,
    /// The `Idempotency` service offered to participants; `scope` is theirs to choose.
    Participant = 1,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdempotencyKey {
    pub namespace: IdempotencyNamespace,
    pub scope: String,
    pub key: String,
}

/// Whether an expired idempotency record is still needed, and until when: `Some` keeps it.
pub type HoldUntil = dyn for<'t> Fn(&WriteTx<'t>, &IdempotencyKey) -> Result<Option<u64>, Error>;

/// What one collection of expired idempotency records did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Records deleted.
    pub removed: usize,
    /// Expired index entries looked at: deleted, held for longer, or found stale. Equal to the
    /// limit, there may be more to look at now.
    pub examined: usize,
}

/// The key of one timer in the due index: ordered by instant, then by a unique id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueKey {
    pub at_ms: u64,
    pub id: u64,
}

/// A record a scan found but cannot decode (corrupt, or written by a newer sagad). Background
/// work must not stop on one bad record, so scans hand it over with its table and key for the
/// caller to log and go past, or to drop (`WriteTx::drop_undecodable`).
#[derive(Debug)]
pub struct Undecodable {
    table: Table,
    key: Vec<u8>,
    /// The bytes found, so a drop removes only what was seen to be undecodable.
    value: Vec<u8>,
    error: Error,
}

impl Undecodable {
    pub fn table(&self) -> &'static str {
        self.table.name()
    }
    pub fn key(&self) -> &[u8] {
        &self.key
    }
    /// The key in hexadecimal, for logs.
    pub fn key_hex(&self) -> String {
        self.key.iter().map(|byte| format!("{byte:02x}")).collect()
    }
    /// The key as a sequence or id, for tables keyed by one.
    pub fn key_u64(&self) -> Option<u64> {
        codec::decode_u64(self.table.name(), &self.key).ok()
    }
    pub fn error(&self) -> &Error {
        &self.error
    }
    /// For a strategy record: the business type its key names (or, for a key without one,
    /// the whole key), shown as text for an operator.
    pub fn strategy_business_type(&self) -> String {
        codec::strategy_business_type_of_key(&self.key)
    }
}

impl From<Undecodable> for Error {
    fn from(undecodable: Undecodable) -> Error {
        undecodable.error
    }
}

/// One entry of a scan that goes past records it cannot decode: `Err` when the ledger itself
/// could not be read, `Ok(Err(_))` for a record that does not decode.
pub type Scanned<T> = Result<Result<T, Undecodable>, Error>;

/// Scans `entries` of `table`, decoding each with `decode`; see `Scanned`.
fn scan<'t, T: 't>(
    entries: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 't,
    table: Table,
    decode: fn(&[u8], &[u8]) -> Result<T, Error>,
) -> Box<dyn Iterator<Item = Scanned<T>> + 't> {
    Box::new(entries.map(move |entry| {
        let (key, value) = entry.map_err(read_error(table))?;
        Ok(decode(&key, &value).map_err(|error| Undecodable {
            table,
            key: key.to_vec(),
            value: value.to_vec(),
            error,
        }))
    }))
}

/// Leaves the iterator at the first record that does not decode, as scans did before they
/// could go past one.
fn stop_at_undecodable<'t, T: 't>(
    scanned: Box<dyn Iterator<Item = Scanned<T>> + 't>,
) -> Box<dyn Iterator<Item = Result<T, Error>> + 't> {
    Box::new(scanned.map(|entry| entry?.map_err(Error::from)))
}

/// Handle to the ledger; cheap to clone.
///
/// Dropping the last handle without `close` closes the threads' inboxes and blocks until the
/// writer has flushed durably and both threads have released the folder.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<writer::Message>,
    reader: mpsc::Sender<reader::Message>,
    flushes: Arc<AtomicU64>,
    fault: Arc<fault::Fault>,
    /// Declared last so it drops last: by then the senders above are gone, so both threads see
    /// their inbox close, finish, and can be joined.
    _join_on_drop: Threads,
}

/// The view a `write` closure gets: reads see the ledger plus the writes of the jobs before it
/// in its group and its own.
pub struct WriteTx<'a> {
    tables: &'a Tables,
    /// The group's buffered writes, journaled while this closure runs: its own are kept only if
    /// it returns `Ok`, and the group reaches sled whole, behind one intent record.
    overlay: &'a mut Overlay,
    stamp: u64,
}

/// The view a `read` closure gets.
pub struct ReadTx<'a> {
    tables: &'a Tables,
    stamp: u64,
}

/// Meta keys of the counters; each is committed atomically with the write that used it, so a
/// number is never handed out twice, even across a crash.
const GSN_COUNTER: &[u8] = b"gsn_seq";
const OUTBOX_COUNTER: &[u8] = b"outbox_seq";
const DUE_COUNTER: &[u8] = b"due_seq";

/// Reads waiting for the reader thread before callers feel backpressure.
const READ_QUEUE: usize = 1024;

impl Store {
    /// Opens (or creates) the ledger and starts its threads. Blocking: call it before the
    /// runtime starts or from `spawn_blocking`.
    pub fn open(options: Options) -> Result<Store, Error> {
        let path = options.path.clone();
        let open_failed = |detail: String| Error::Open {
            path: path.clone(),
            detail,
        };
        std::fs::create_dir_all(&path).map_err(|e| open_failed(e.to_string()))?;
        let db = open_db(&options)?;
        upgrade::refuse_newer(&db).map_err(|e| open_failed(e.to_string()))?;
        let tables = Tables::open(db).map_err(|e| open_failed(e.to_string()))?;
        let completed = intents::recover(&tables).map_err(|e| open_failed(e.to_string()))?;
        if completed > 0 {
            tracing::info!(
                groups = completed,
                "completed the writes a stop had cut short"
            );
        }
        upgrade::run(&tables).map_err(|e| open_failed(e.to_string()))?;
        let data_file = File::open(path.join("db")).map_err(|e| open_failed(e.to_string()))?;
        if options.durability == Durability::Durable {
            sync_folder(&path).map_err(|e| open_failed(e.to_string()))?;
        }

        let flushes = Arc::new(AtomicU64::new(0));
        let fault = Arc::new(fault::Fault::default());
        let max_group = options.max_group.max(1);
        let (writer_inbox, writer_rx) = mpsc::channel(max_group.saturating_mul(2));
        let (reader_inbox, reader_rx) = mpsc::channel(READ_QUEUE);
        let (to_flusher, flusher_rx) = std::sync::mpsc::channel();
        let flusher = writer::Flusher {
            tables: tables.clone(),
            durability: options.durability,
            sync: writer::FileSync::new(data_file, path.join("blobs")),
            flushes: flushes.clone(),
            writer: writer_inbox.downgrade(),
            dirty: false,
            unflushed_intent: None,
            fault: fault.clone(),
        };
        let flusher = thread::Builder::new()
            .name("sagad-ledger-flusher".into())
            .spawn(move || flusher.run(flusher_rx))?;
        let writer = writer::Writer {
            tables: tables.clone(),
            max_group,
            intents: intents::Intents::new(fault.clone()),
            to_flusher,
            flusher,
            stamp: 0,
            fault: fault.clone(),
            #[cfg(test)]
            panic_on_apply: false,
        };
        let mut threads = Threads {
            handles: Vec::with_capacity(2),
        };
        threads.handles.push(
            thread::Builder::new()
                .name("sagad-ledger-writer".into())
                .spawn(move || writer.run(writer_rx))?,
        );
        let reader_fault = fault.clone();
        let reader = thread::Builder::new()
            .name("sagad-ledger-reader".into())
            .spawn(move || reader::run(tables, reader_fault, reader_rx));
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                // Close the writer's inbox before `threads` joins it.
                drop(writer_inbox);
                return Err(Error::Io(e));
            }
        };
        threads.handles.push(reader);
        Ok(Store {
            inner: Arc::new(Inner {
                writer: writer_inbox,
                reader: reader_inbox,
                flushes,
                fault,
                _join_on_drop: threads,
            }),
        })
    }

    pub async fn write<T, E, F>(&self, f: F) -> Result<Result<T, E>, Error>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.write_answered(f, writer::Answer::WhenDurable).await
    }

    /// Like `write`, for a write whose loss in a crash is harmless because it only forgets
    /// work already done, which is then done again (the acknowledgement of a signal, whose
    /// resending nodes de-duplicate): it is answered as soon as its group is applied, and it
    /// neither waits for a flush nor causes one. The next flush, sled's periodic one or
    /// `close` makes it durable; every `write` answered after it covers it too.
    pub async fn write_unflushed<T, E, F>(&self, f: F) -> Result<Result<T, E>, Error>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.write_answered(f, writer::Answer::WhenApplied).await
    }

    async fn write_answered<T, E, F>(
        &self,
        f: F,
        answer: writer::Answer,
    ) -> Result<Result<T, E>, Error>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (reply_to, reply) = oneshot::channel();
        let job = writer::Message::Job(writer::Job {
            run: writer::job(f, reply_to),
            answer,
        });
        let fault = &self.inner.fault;
        self.inner
            .writer
            .send(job)
            .await
            .map_err(|_| fault.gone())?;
        // A dropped reply means the writer stopped (closed, or died) before answering the job.
        reply.await.map_err(|_| fault.gone())?
    }

    pub async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&ReadTx<'_>) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply_to, reply) = oneshot::channel();
        let job = reader::Message::Job(reader::job(f, reply_to));
        let fault = &self.inner.fault;
        self.inner
            .reader
            .send(job)
            .await
            .map_err(|_| fault.gone())?;
        reply.await.map_err(|_| fault.gone())?
    }

    /// Finishes queued writes, makes everything durable and stops the threads. Later calls
    /// answer `Error::Closed`.
    pub async fn close(&self) -> Result<(), Error> {
        let (done_to, done) = oneshot::channel();
        let close = writer::Message::Close(done_to);
        let fault = &self.inner.fault;
        self.inner
            .writer
            .send(close)
            .await
            .map_err(|_| fault.gone())?;
        let flushed = done.await.map_err(|_| fault.gone())?;
        // The reader holds the other handle on the database: stopping it releases the folder.
        let (stopped_to, stopped) = oneshot::channel();
        let stop = reader::Message::Close(stopped_to);
        if self.inner.reader.send(stop).await.is_ok() {
            stopped.await.map_err(|_| Error::Closed)?;
        }
        flushed
    }

    /// Resolves, with its cause, once the ledger has had a fatal fault (`Error::Fatal`): a
    /// group that could not be made durable or was written only in part. From then on every
    /// write and read is refused, and only a restart, which completes the ledger from what is
    /// on disk, brings it back; whoever runs the ledger should stop.
    pub fn fatal_fault(&self) -> impl Future<Output = String> + Send + 'static {
        self.inner.fault.reported()
    }

    /// How many durable flushes the writer has made since open (for benchmarks and tests).
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }
}

/// How often, and how long apart, `open` retries a folder that looks locked.
///
/// sled's I/O pool threads can hold the data file (and so its lock) for a moment after the
/// database that used them is dropped, so a reopen right after `close` may briefly see the
/// lock; another process holding the folder still gets `Locked` after these ~100 ms.
const LOCK_RETRIES: u32 = 10;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Opens sled, telling a folder held by another process apart from other failures.
fn open_db(options: &Options) -> Result<sled::Db, Error> {
    let mut attempt = 0;
    loop {
        match open_db_once(options) {
            Err(Error::Locked { .. }) if attempt < LOCK_RETRIES => {
                attempt += 1;
                thread::sleep(LOCK_RETRY_PAUSE);
            }
            result => return result,
        }
    }
}

fn open_db_once(options: &Options) -> Result<sled::Db, Error> {
    let opened = sled::Config::new()
        .path(&options.path)
        .cache_capacity(options.cache_capacity_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(500))
        .open();
    opened.map_err(|error| match error {
        // sled 0.34.7 reports a failed `flock` as `Io(Other)` with this message (config.rs,
        // `try_lock`); the lock belongs to the open file, so a second open in this process
        // fails the same way.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => Error::Locked {
            path: options.path.clone(),
        },
        other => Error::Open {
            path: options.path.clone(),
            detail: other.to_string(),
        },
    })
}

/// sled fsyncs neither its `conf` file nor the folder entries it creates; do it once at open,
/// so that a ledger acknowledged as written is still found as a ledger after a power loss.
fn sync_folder(path: &Path) -> io::Result<()> {
    for file in ["conf", "db", "blobs"] {
        match File::open(path.join(file)) {
            Ok(file) => file.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    File::open(path)?.sync_all()?;
    // The parent may not be ours to read; its entry for the folder matters only on the first
    // open, so failing to sync it is not worth refusing to start.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|dir| dir.sync_all());
    }
    Ok(())
}

/// The text a caller's panic carried, for the error its caller gets.
fn panic_message(job: &str, panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    match text {
        Some(text) => format!("a ledger {job} job panicked: {text}"),
        None => format!("a ledger {job} job panicked"),
    }
}

/// The key of a timer in the per-saga index: `sequence BE ++ due key`.
fn saga_timer_key(sequence: u64, key: DueKey) -> Vec<u8> {
    let mut bytes = codec::u64_key(sequence).to_vec();
    bytes.extend_from_slice(&codec::due_key(key));
    bytes
}

/// Joins the ledger threads once their inboxes have closed.
struct Threads {
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        let current = thread::current().id();
        for handle in self.handles.drain(..) {
            // A closure that owned the last handle drops it on a ledger thread, which cannot
            // join itself; that thread sees its inbox closed and exits on its own.
            if handle.thread().id() != current {
                let _ = handle.join();
            }
        }
    }
}

impl WriteTx<'_> {
    /// This write's place in the ledger's order: write jobs run one at a time, each stamped
    /// higher than the one before it (since the ledger was opened). Work that follows writes
    /// and may run out of their order (publishing a saga, routing a node) keeps the newest.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }
    /// Next GSN sequence number: 1, 2, 3, ... unique and increasing across restarts (the
    /// counter is committed with the write that used it; a rejected write consumes nothing).
    pub fn allocate_gsn_sequence(&mut self) -> Result<u64, Error> {
        self.next_counter(GSN_COUNTER)
    }
    pub fn saga(&self, sequence: u64) -> Result<Option<SagaRecord>, Error> {
        self.get(Table::Sagas, &codec::u64_key(sequence))
    }
    /// Removes a saga, every payload stored under it and its pending timers, buffered ones
    /// included.
    pub fn delete_saga(&mut self, sequence: u64) -> Result<(), Error> {
        self.cancel_saga_timers(sequence)?;
        for key in self.keys_of_saga(Table::Payloads, sequence)? {
            self.overlay.delete(Table::Payloads, key);
        }
        self.overlay
            .delete(Table::Sagas, codec::u64_key(sequence).to_vec());
        Ok(())
    }
    /// Keyed by `record.sequence`.
    pub fn put_saga(&mut self, record: &SagaRecord) -> Result<(), Error> {
        self.put(
            Table::Sagas,
            codec::u64_key(record.sequence).to_vec(),
            record,
        )
    }
    pub fn idempotency(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, Error> {
        self.get(Table::Idempotency, &codec::idempotency_key(key)?)
    }
    /// Also keeps the expiry index in step with `record.expires_ms`.
    pub fn put_idempotency(
        &mut self,
        key: &IdempotencyKey,
        record: &IdempotencyRecord,
    ) -> Result<(), Error> {
        let raw = codec::idempotency_key(key)?;
        let previous_expiry = self.readable_idempotency_expiry(&raw)?;
        if let Some(previous) = previous_expiry.filter(|&e| e != 0 && e != record.expires_ms) {
            self.overlay
                .delete(Table::IdempotencyExpiry, codec::expiry_key(previous, &raw));
        }
        if record.expires_ms != 0 {
            self.overlay.put(
                Table::IdempotencyExpiry,
                codec::expiry_key(record.expires_ms, &raw),
                Vec::new(),
            );
        }
        self.put(Table::Idempotency, raw, record)
    }
    pub fn delete_idempotency(&mut self, key: &IdempotencyKey) -> Result<(), Error> {
        let raw = codec::idempotency_key(key)?;
        if let Some(previous) = self.readable_idempotency_expiry(&raw)?.filter(|&e| e != 0) {
            self.overlay
                .delete(Table::IdempotencyExpiry, codec::expiry_key(previous, &raw));
        }
        self.overlay.delete(Table::Idempotency, raw);
        Ok(())
    }
    /// Looks at most `limit` records whose `expires_ms` is in (0, now_ms] and deletes them. A
    /// record `held` gives a later time for is kept instead, its expiry moved to that time.
    pub fn collect_expired_idempotency(
        &mut self,
        now_ms: u64,
        limit: usize,
        held: &HoldUntil,
    ) -> Result<Collected, Error> {
        let bound = codec::expiry_bound(now_ms);
        let index_keys = self.overlay.live_keys_in(
            self.tables,
            Table::IdempotencyExpiry,
            &[],
            bound.as_ref().map(|b| b.as_slice()),
            limit,
        )?;
        let mut collected = Collected {
            removed: 0,
            examined: index_keys.len(),
        };
        for index_key in index_keys {
            let (expires_ms, raw) = codec::split_expiry_key(&index_key)?;
            let raw = raw.to_vec();
            // Only a record that still carries this expiry is collected; an index entry that
            // outlived its record (or points at one this sagad cannot read) is just dropped, so
            // collection never deletes data it has not seen expire.
            let record = self
                .readable_idempotency(&raw)?
                .filter(|r| r.expires_ms == expires_ms);
            self.overlay.delete(Table::IdempotencyExpiry, index_key);
            let Some(mut record) = record else {
                continue;
            };
            if let Some(key) = codec::split_idempotency_key(&raw)
                && let Some(held_until) = held(self, &key)?
                && held_until > expires_ms
            {
                record.expires_ms = held_until;
                self.put_idempotency(&key, &record)?;
                continue;
            }
            self.overlay.delete(Table::Idempotency, raw);
            collected.removed += 1;
        }
        Ok(collected)
    }
    /// Returns the new entry's id (unique, increasing).
    pub fn push_outbox(&mut self, record: &OutboxRecord) -> Result<u64, Error> {
        let id = self.next_counter(OUTBOX_COUNTER)?;
        self.put_outbox(id, record)?;
        Ok(id)
    }
    pub fn put_outbox(&mut self, id: u64, record: &OutboxRecord) -> Result<(), Error> {
        self.put(Table::Outbox, codec::u64_key(id).to_vec(), record)
    }
    pub fn outbox_entry(&self, id: u64) -> Result<Option<OutboxRecord>, Error> {
        self.get(Table::Outbox, &codec::u64_key(id))
    }
    /// Returns whether there was an entry to remove.
    pub fn delete_outbox(&mut self, id: u64) -> Result<bool, Error> {
        let key = codec::u64_key(id).to_vec();
        let present = match self.overlay.get(Table::Outbox, &key) {
            Some(value) => value.is_some(),
            None => self.tables.get_raw(Table::Outbox, &key)?.is_some(),
        };
        self.overlay.delete(Table::Outbox, key);
        Ok(present)
    }
    /// The live keys of `table` that start with saga `sequence` (as `sequence BE ++ ...`),
    /// buffered ones included; the next sequence bounds them.
    fn keys_of_saga(&self, table: Table, sequence: u64) -> Result<Vec<Vec<u8>>, Error> {
        let end = sequence.checked_add(1).map(codec::u64_key);
        self.overlay.live_keys_in(
            self.tables,
            table,
            &codec::u64_key(sequence),
            end.as_ref().map(|end| end.as_slice()),
            usize::MAX,
        )
    }
    /// Adds a timer of saga `record.gsn_sequence`.
    pub fn schedule(&mut self, at_ms: u64, record: &DueRecord) -> Result<DueKey, Error> {
        let key = DueKey {
            at_ms,
            id: self.next_counter(DUE_COUNTER)?,
        };
        self.put(Table::Due, codec::due_key(key).to_vec(), record)?;
        self.overlay.put(
            Table::DueBySaga,
            saga_timer_key(record.gsn_sequence, key),
            Vec::new(),
        );
        Ok(key)
    }
    /// Removes one timer (it fired), and its entry in its saga's index. The saga is read from
    /// the timer's own record, so the index can never keep an entry for a removed timer; a
    /// record that does not decode has no index entry to find and is removed alone.
    pub fn cancel(&mut self, key: DueKey) -> Result<(), Error> {
        let raw = codec::due_key(key).to_vec();
        match self.get::<DueRecord>(Table::Due, &raw) {
            Ok(Some(record)) => self
                .overlay
                .delete(Table::DueBySaga, saga_timer_key(record.gsn_sequence, key)),
            Ok(None) | Err(Error::Corrupt { .. } | Error::UnknownVersion { .. }) => {}
            Err(other) => return Err(other),
        }
        self.overlay.delete(Table::Due, raw);
        Ok(())
    }
    /// Removes every pending timer of saga `sequence` (it ended: they could only come due for
    /// nothing); returns how many. Timers scheduled by a sagad older than this index are not
    /// found here; they come due and are dropped as before.
    pub fn cancel_saga_timers(&mut self, sequence: u64) -> Result<usize, Error> {
        let keys = self.keys_of_saga(Table::DueBySaga, sequence)?;
        for key in &keys {
            // Every key in the saga's range starts with its 8-byte sequence.
            let due = codec::decode_due_key(key.get(8..).unwrap_or_default())?;
            self.overlay
                .delete(Table::Due, codec::due_key(due).to_vec());
            self.overlay.delete(Table::DueBySaga, key.clone());
        }
        Ok(keys.len())
    }
    /// Removes a record a scan could not decode, if it is still the one the scan found (a
    /// write since may have replaced it); returns whether it did. Nothing else refers to a
    /// record nobody can read, except a due entry's line in its saga's index, which cannot
    /// be found without the record and is dropped with the saga.
    pub fn drop_undecodable(&mut self, entry: &Undecodable) -> Result<bool, Error> {
        let unchanged = match self.overlay.get(entry.table, &entry.key) {
            Some(current) => current == Some(entry.value.as_slice()),
            None => self
                .tables
                .get_raw(entry.table, &entry.key)?
                .is_some_and(|current| current == entry.value.as_slice()),
        };
        if unchanged {
            self.overlay.delete(entry.table, entry.key.clone());
        }
        Ok(unchanged)
    }

    /// Reads through the overlay: the job's own puts and deletes win over the trees.
    fn get<R: Record>(&self, table: Table, key: &[u8]) -> Result<Option<R>, Error> {
        match self.overlay.get(table, key) {
            Some(Some(bytes)) => codec::decode(bytes).map(Some),
            Some(None) => Ok(None),
            None => self.tables.get(table, key),
        }
    }

    fn put<R: Record>(&mut self, table: Table, key: Vec<u8>, record: &R) -> Result<(), Error> {
        let value = codec::encode(record)?;
        self.overlay.put(table, key, value);
        Ok(())
    }

    /// The stored record's `expires_ms`, or `None` if there is no record or it cannot be
    /// decoded: overwriting or deleting an unreadable record must still work, and the expiry
    /// index entry it may leave behind is dropped harmlessly by collection.
    fn readable_idempotency_expiry(&self, raw: &[u8]) -> Result<Option<u64>, Error> {
        Ok(self.readable_idempotency(raw)?.map(|r| r.expires_ms))
    }

    /// The record under `raw`, or `None` if there is none or this sagad cannot read it.
    fn readable_idempotency(&self, raw: &[u8]) -> Result<Option<IdempotencyRecord>, Error> {
        match self.get::<IdempotencyRecord>(Table::Idempotency, raw) {
            Ok(record) => Ok(record),
            Err(Error::Corrupt { .. } | Error::UnknownVersion { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    fn next_counter(&mut self, name: &'static [u8]) -> Result<u64, Error> {
        let current = match self.overlay.get(Table::Meta, name) {
            Some(Some(bytes)) => codec::decode_u64(Table::Meta.name(), bytes)?,
            Some(None) => 0,
            None => match self.tables.get_raw(Table::Meta, name)? {
                Some(bytes) => codec::decode_u64(Table::Meta.name(), &bytes)?,
                None => 0,
            },
        };
        let next = current.checked_add(1).ok_or_else(|| {
            Error::Storage(format!(
                "counter {} is exhausted",
                String::from_utf8_lossy(name)
            ))
        })?;
        self.overlay
            .put(Table::Meta, name.to_vec(), codec::u64_key(next).to_vec());
        Ok(next)
    }
}

impl ReadTx<'_> {
    /// The stamp of the last write this read sees (`WriteTx::stamp`): it sees every write with
    /// a stamp up to this one and none after, so whoever is told about writes by stamp can
    /// tell which of them are newer than what it read.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }
    pub fn saga(&self, sequence: u64) -> Result<Option<SagaRecord>, Error> {
        self.tables.get(Table::Sagas, &codec::u64_key(sequence))
    }
    /// Whether the ledger holds a saga record under `sequence`, readable or not, without
    /// decoding it.
    pub fn has_saga(&self, sequence: u64) -> Result<bool, Error> {
        Ok(self
            .tables
            .get_raw(Table::Sagas, &codec::u64_key(sequence))?
            .is_some())
    }
    /// Sagas in sequence order (or reverse), starting strictly after `after` when given.
    pub fn scan_sagas(
        &self,
        after: Option<u64>,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Scanned<SagaRecord>> + '_> {
        let tree = self.tables.tree(Table::Sagas);
        let entries: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match (after, descending) {
                (None, false) => Box::new(tree.iter()),
                (None, true) => Box::new(tree.iter().rev()),
                (Some(after), false) => match after.checked_add(1) {
                    Some(first) => Box::new(tree.range(codec::u64_key(first)..)),
                    None => Box::new(std::iter::empty()),
                },
                (Some(after), true) => Box::new(tree.range(..codec::u64_key(after)).rev()),
            };
        scan(entries, Table::Sagas, |_, value| codec::decode(value))
    }
    /// `scan_sagas`, stopping at the first saga that does not decode.
    pub fn sagas(
        &self,
        after: Option<u64>,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Result<SagaRecord, Error>> + '_> {
        stop_at_undecodable(self.scan_sagas(after, descending))
    }
    pub fn idempotency(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>, Error> {
        self.tables
            .get(Table::Idempotency, &codec::idempotency_key(key)?)
    }
    /// Every outbox entry, oldest first.
    pub fn scan_outbox(&self) -> Box<dyn Iterator<Item = Scanned<(u64, OutboxRecord)>> + '_> {
        scan(
            self.tables.tree(Table::Outbox).iter(),
            Table::Outbox,
            |key, value| {
                Ok((
                    codec::decode_u64(Table::Outbox.name(), key)?,
                    codec::decode(value)?,
                ))
            },
        )
    }
    /// `scan_outbox`, stopping at the first entry that does not decode.
    pub fn outbox(&self) -> Box<dyn Iterator<Item = Result<(u64, OutboxRecord), Error>> + '_> {
        stop_at_undecodable(self.scan_outbox())
    }
    /// Timers due at or before `now_ms`, earliest first.
    pub fn scan_due_until(
        &self,
        now_ms: u64,
    ) -> Box<dyn Iterator<Item = Scanned<(DueKey, DueRecord)>> + '_> {
        let last = codec::due_key(DueKey {
            at_ms: now_ms,
            id: u64::MAX,
        });
        scan(
            self.tables.tree(Table::Due).range(..=last),
            Table::Due,
            |key, value| Ok((codec::decode_due_key(key)?, codec::decode(value)?)),
        )
    }
    /// `scan_due_until`, stopping at the first timer that does not decode.
    pub fn due_until(
        &self,
        now_ms: u64,
    ) -> Box<dyn Iterator<Item = Result<(DueKey, DueRecord), Error>> + '_> {
        stop_at_undecodable(self.scan_due_until(now_ms))
    }
}

// ---- Tables added for the engine, strategies and retries (issues 3-5). ----

impl WriteTx<'_> {
    /// The payload stored under (saga sequence, branch id); the saga's own payload has
    /// `branch_id` "".
    pub fn payload(&self, sequence: u64, branch_id: &str) -> Result<Option<PayloadRecord>, Error> {
        self.get(Table::Payloads, &codec::payload_key(sequence, branch_id))
    }
    pub fn put_payload(
        &mut self,
        sequence: u64,
        branch_id: &str,
        record: &PayloadRecord,
    ) -> Result<(), Error> {
        let key = codec::payload_key(sequence, branch_id);
        self.put(Table::Payloads, key, record)
    }
    /// One version of a business type's strategy; `version` 0 means the latest.
    pub fn strategy(
        &self,
        business_type: &str,
        version: u64,
    ) -> Result<Option<StrategyRecord>, Error> {
        if version != 0 {
            return match codec::strategy_key(business_type, version) {
                Some(key) => self.get(Table::Strategies, &key),
                // No stored business type contains 0x00.
                None => Ok(None),
            };
        }
        let latest = self.last_strategy_entry(business_type)?;
        latest.map(|(_, value)| codec::decode(&value)).transpose()
    }
    /// The latest version stored for a business type, read from its key alone: the record
    /// itself may not decode (damaged, or written by a newer sagad), and storing a new version
    /// over it is how an operator repairs that.
    pub fn latest_strategy_version(&self, business_type: &str) -> Result<Option<u64>, Error> {
        let latest = self.last_strategy_entry(business_type)?;
        latest
            .map(|(version, _)| codec::decode_u64(Table::Strategies.name(), &version))
            .transpose()
    }
    /// The latest stored version of a business type's strategy: its key past the business
    /// type's prefix (the version's bytes) and its value; none for a business type that cannot
    /// be stored (one containing 0x00).
    fn last_strategy_entry(&self, business_type: &str) -> Result<Option<tables::Entry>, Error> {
        let Some(prefix) = codec::strategy_prefix(business_type) else {
            return Ok(None);
        };
        let end = codec::strategy_prefix_end(&prefix);
        let latest =
            self.overlay
                .last_live_in(self.tables, Table::Strategies, &prefix, Some(&end))?;
        Ok(latest.map(|(key, value)| {
            let version = key.get(prefix.len()..).unwrap_or_default().to_vec();
            (version, value)
        }))
    }
    /// Keyed by (`record.business_type`, `record.version`).
    pub fn put_strategy(&mut self, record: &StrategyRecord) -> Result<(), Error> {
        let key = codec::strategy_key_to_write(record)?;
        self.put(Table::Strategies, key, record)
    }
    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>, Error> {
        self.get(Table::Nodes, node_id.as_bytes())
    }
    pub fn put_node(&mut self, record: &NodeRecord) -> Result<(), Error> {
        self.put(Table::Nodes, record.node_id.as_bytes().to_vec(), record)
    }
    /// The latest retry configuration, if any was ever stored.
    pub fn retry_config(&self) -> Result<Option<RetryConfigRecord>, Error> {
        let latest = self
            .overlay
            .last_live_in(self.tables, Table::RetryConfig, &[], None)?;
        latest.map(|(_, value)| codec::decode(&value)).transpose()
    }
    /// The latest configuration's version, read from its key alone, so that a record that does
    /// not decode (damaged, or written by a newer sagad) can still be replaced.
    pub fn latest_retry_config_version(&self) -> Result<Option<u64>, Error> {
        let latest = self
            .overlay
            .last_live_in(self.tables, Table::RetryConfig, &[], None)?;
        latest
            .map(|(key, _)| codec::decode_u64(Table::RetryConfig.name(), &key))
            .transpose()
    }
    /// Keyed by `record.version`; the highest version is the latest.
    pub fn put_retry_config(&mut self, record: &RetryConfigRecord) -> Result<(), Error> {
        let key = codec::u64_key(record.version).to_vec();
        self.put(Table::RetryConfig, key, record)
    }
    pub fn retry_history(
        &self,
        original_serial: &str,
    ) -> Result<Option<RetryHistoryRecord>, Error> {
        self.get(Table::RetryHistory, original_serial.as_bytes())
    }
    /// Keyed by `record.original_serial`.
    pub fn put_retry_history(&mut self, record: &RetryHistoryRecord) -> Result<(), Error> {
        let key = record.original_serial.as_bytes().to_vec();
        self.put(Table::RetryHistory, key, record)
    }
    /// The original serial a retry serial was issued for.
    pub fn retry_original(&self, retry_serial: &str) -> Result<Option<String>, Error> {
        let link: Option<RetryLinkRecord> = self.get(Table::RetryLinks, retry_serial.as_bytes())?;
        Ok(link.map(|link| link.original_serial))
    }
    pub fn put_retry_link(
        &mut self,
        retry_serial: &str,
        original_serial: &str,
    ) -> Result<(), Error> {
        let link = RetryLinkRecord {
            original_serial: original_serial.to_owned(),
        };
        self.put(Table::RetryLinks, retry_serial.as_bytes().to_vec(), &link)
    }
}

impl ReadTx<'_> {
    pub fn payload(&self, sequence: u64, branch_id: &str) -> Result<Option<PayloadRecord>, Error> {
        self.tables
            .get(Table::Payloads, &codec::payload_key(sequence, branch_id))
    }
    /// `version` 0 means the latest.
    pub fn strategy(
        &self,
        business_type: &str,
        version: u64,
    ) -> Result<Option<StrategyRecord>, Error> {
        if version != 0 {
            return match codec::strategy_key(business_type, version) {
                Some(key) => self.tables.get(Table::Strategies, &key),
                None => Ok(None),
            };
        }
        let Some(prefix) = codec::strategy_prefix(business_type) else {
            return Ok(None);
        };
        let end = codec::strategy_prefix_end(&prefix);
        let tree = self.tables.tree(Table::Strategies);
        match tree.range(prefix..end).next_back() {
            Some(entry) => {
                codec::decode(&entry.map_err(read_error(Table::Strategies))?.1).map(Some)
            }
            None => Ok(None),
        }
    }
    /// The latest version of each business type's strategy, ordered by business type,
    /// starting strictly after `after` when given.
    pub fn scan_latest_strategies(
        &self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = Scanned<StrategyRecord>> + '_> {
        Box::new(strategies::LatestStrategies::new(
            self.tables.tree(Table::Strategies),
            after,
        ))
    }
    /// `scan_latest_strategies`, a record that does not decode given as its error.
    pub fn latest_strategies(
        &self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = Result<StrategyRecord, Error>> + '_> {
        stop_at_undecodable(self.scan_latest_strategies(after))
    }
    pub fn node(&self, node_id: &str) -> Result<Option<NodeRecord>, Error> {
        self.tables.get(Table::Nodes, node_id.as_bytes())
    }
    /// Every node, ordered by id.
    pub fn scan_nodes(&self) -> Box<dyn Iterator<Item = Scanned<NodeRecord>> + '_> {
        scan(
            self.tables.tree(Table::Nodes).iter(),
            Table::Nodes,
            |_, value| codec::decode(value),
        )
    }
    /// `scan_nodes`, stopping at the first node that does not decode.
    pub fn nodes(&self) -> Box<dyn Iterator<Item = Result<NodeRecord, Error>> + '_> {
        stop_at_undecodable(self.scan_nodes())
    }
    pub fn retry_config(&self) -> Result<Option<RetryConfigRecord>, Error> {
        match self.tables.tree(Table::RetryConfig).last() {
            Ok(Some((_, value))) => codec::decode(&value).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(Table::RetryConfig)(e)),
        }
    }
    pub fn retry_history(
        &self,
        original_serial: &str,
    ) -> Result<Option<RetryHistoryRecord>, Error> {
        self.tables
            .get(Table::RetryHistory, original_serial.as_bytes())
    }
    pub fn retry_original(&self, retry_serial: &str) -> Result<Option<String>, Error> {
        let link: Option<RetryLinkRecord> = self
            .tables
            .get(Table::RetryLinks, retry_serial.as_bytes())?;
        Ok(link.map(|link| link.original_serial))
    }
}
