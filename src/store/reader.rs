//! The reader thread: runs read jobs against sled's current state, so callers never touch sled
//! from a tokio worker. It never writes.

use super::fault::Fault;
use super::tables::Tables;
use super::{Error, ReadTx};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Runs with the ledger and the stamp of the last write the read sees (`ReadTx::stamp`), or,
/// given an error, answers its caller with it unrun.
pub(crate) type Job = Box<dyn FnOnce(Result<(&Tables, u64), Error>) + Send>;

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
    Box::new(move |ledger: Result<(&Tables, u64), Error>| {
        let answer = ledger.and_then(|(tables, stamp)| {
            let tx = ReadTx { tables, stamp };
            // A panicking closure answers its own caller with an error and leaves the thread
            // alive.
            panic::catch_unwind(AssertUnwindSafe(|| f(&tx)))
                .map_err(|panic| Error::Panicked(super::panic_message("read", &*panic)))
        });
        let _ = reply_to.send(answer);
    })
}

pub(crate) fn run(tables: Tables, fault: Arc<Fault>, mut inbox: mpsc::Receiver<Message>) {
    while let Some(message) = inbox.blocking_recv() {
        match message {
            Message::Job(job) => {
                let no_group_half_written = tables.shared();
                // Checked under the lock: a group that fails part-way records its fault before
                // it lets readers in, so no read sees its half. After a fault nothing is read,
                // as what sled holds may never become durable.
                match fault.check() {
                    Ok(()) => job(Ok((&tables, *no_group_half_written))),
                    Err(refused) => job(Err(refused)),
                }
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
