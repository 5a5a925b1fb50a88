//! The reader thread: runs read jobs against sled's current state, so callers never touch sled
//! from a tokio worker. It never writes.

use super::tables::Tables;
use super::{Error, ReadTx};
use std::panic::{self, AssertUnwindSafe};
use tokio::sync::{mpsc, oneshot};

/// Runs with the stamp of the last write the read sees (`ReadTx::stamp`).
pub(crate) type Job = Box<dyn FnOnce(&Tables, u64) + Send>;

pub(crate) enum Message {
    Job(Job),
    /// Release the database and answer; reads queued ahead still run.
    Close(oneshot::Sender<()>),
}

/// Wraps a caller closure into a job that answers on `reply_to`.
pub(crate) fn job<T, F>(f: F, reply_to: oneshot::Sender<Result<T, Error>>) -> Job
where
    F: FnOnce(&ReadTx<'_>) -> T + Send + 'static,
    T: Send + 'static,
{
    Box::new(move |tables: &Tables, stamp: u64| {
        let tx = ReadTx { tables, stamp };
        // A panicking closure answers its own caller with an error and leaves the thread alive.
        let answer = panic::catch_unwind(AssertUnwindSafe(|| f(&tx)))
            .map_err(|panic| Error::Panicked(super::panic_message("read", &*panic)));
        let _ = reply_to.send(answer);
    })
}

pub(crate) fn run(tables: Tables, mut inbox: mpsc::Receiver<Message>) {
    while let Some(message) = inbox.blocking_recv() {
        match message {
            Message::Job(job) => {
                let no_group_half_written = tables.shared();
                job(&tables, *no_group_half_written)
            }
            Message::Close(done) => {
                inbox.close();
                // Drop the handle first: when it is the last one, sled closes (and unlocks) the
                // folder here, before `close` returns to its caller.
                drop(tables);
                let _ = done.send(());
                return;
            }
        }
    }
}
