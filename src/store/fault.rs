//! The ledger's fatal fault: once a group could not be made durable (a failed flush or
//! fdatasync), reached sled only in part, or the flusher died, no later answer can be trusted,
//! so every write and read is refused from then on, and whoever runs sagad is told
//! (`Store::fatal_fault`) so that it stops and a restart recovers from what is on disk.
//!
//! Why fail-stop rather than carry on: Linux reports a failed writeback to one fsync only, so
//! the next flush may pass while the data it was to cover is lost; a group that failed may still
//! reach the disk with none of its follow-ups run (delivery, timers, watchers); and reads would
//! show writes that were never made durable.

use super::Error;
use tokio::sync::watch;

/// Shared by the writer, the flusher, the reader and the store's handle.
pub(crate) struct Fault {
    /// `None` while healthy; the first fault's detail once there was one. It never goes back.
    state: watch::Sender<Option<String>>,
}

impl Default for Fault {
    fn default() -> Fault {
        Fault {
            state: watch::channel(None).0,
        }
    }
}

impl Fault {
    /// Records `error` as the fault unless one is recorded already, and returns the error every
    /// caller gets from now on.
    pub(crate) fn fail(&self, error: &Error) -> Error {
        let detail = match error {
            Error::Fatal(detail) => detail.clone(),
            other => other.to_string(),
        };
        let first = self.state.send_if_modified(|state| match state {
            Some(_) => false,
            None => {
                *state = Some(detail.clone());
                true
            }
        });
        if first {
            tracing::error!(
                error = %detail,
                "the ledger could not be made durable; every write and read is refused until \
                 sagad is restarted"
            );
        }
        self.refusal().unwrap_or(Error::Fatal(detail))
    }

    /// `Err` once there was a fault.
    pub(crate) fn check(&self) -> Result<(), Error> {
        self.refusal().map_or(Ok(()), Err)
    }

    /// What a caller is told when a ledger thread dropped its job unanswered: the fault if
    /// the thread died of one (so the caller stops, as for any fault), else `Closed` (the
    /// ledger was closed).
    pub(crate) fn gone(&self) -> Error {
        self.refusal().unwrap_or(Error::Closed)
    }

    fn refusal(&self) -> Option<Error> {
        self.state
            .borrow()
            .as_ref()
            .map(|detail| Error::Fatal(detail.clone()))
    }

    /// Resolves with the fault's detail once there is one.
    pub(crate) fn reported(&self) -> impl Future<Output = String> + Send + 'static {
        let mut state = self.state.subscribe();
        async move {
            let detail = state
                .wait_for(Option::is_some)
                .await
                .ok()
                .map(|detail| detail.clone().unwrap_or_default());
            match detail {
                Some(detail) => detail,
                // The sender lives as long as any part of the ledger; once every part is gone
                // there is no fault left to report.
                None => std::future::pending().await,
            }
        }
    }
}

/// Records a fault when dropped by a panic unwinding past it.
pub(crate) struct PanicWatch<'a> {
    pub(crate) fault: &'a Fault,
    /// What was under way, for the fault's detail.
    pub(crate) doing: &'static str,
}

impl Drop for PanicWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fault
                .fail(&Error::Storage(format!("a panic while {}", self.doing)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fault_stands_and_every_later_refusal_names_it() {
        let fault = Fault::default();
        assert!(fault.check().is_ok());
        let first = fault.fail(&Error::Storage("fdatasync: EIO".into()));
        assert!(
            matches!(&first, Error::Fatal(detail) if detail.contains("EIO")),
            "{first:?}"
        );
        let later = fault.fail(&Error::Storage("something else".into()));
        assert!(
            matches!(&later, Error::Fatal(detail) if detail.contains("EIO")),
            "{later:?}"
        );
        assert!(matches!(fault.check(), Err(Error::Fatal(detail)) if detail.contains("EIO")));
    }
}
