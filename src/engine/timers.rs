//! The timer loop: reads the due index and fires what is due — step timeouts, polls, reversal
//! retries, deadlines — each as one ledger write that removes the timer and applies it. After a
//! restart it finds every timer that came due while sagad was down.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::{Engine, Error};
use crate::store;

/// How often the due index is read when nothing is due.
const TICK: Duration = Duration::from_millis(50);
/// Timers fired per read; more wait for the next round, which starts at once.
const BATCH: usize = 256;

pub(crate) async fn run(engine: Engine, mut stopping: watch::Receiver<bool>) {
    loop {
        if *stopping.borrow() {
            return;
        }
        let now = engine.clock.now_ms();
        let due = engine
            .store
            .read(move |tx| tx.due_until(now).take(BATCH).collect::<Result<Vec<_>, _>>())
            .await;
        let due = match due {
            Ok(Ok(due)) => due,
            Err(store::Error::Closed) => return,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "reading the due index failed; retrying");
                Vec::new()
            }
        };
        let full = due.len() == BATCH;
        // Fired together, so their writes share flushes.
        let fired = futures::future::join_all(due.into_iter().map(|(key, record)| {
            let engine = engine.clone();
            async move { (record.gsn_sequence, engine.fire_timer(key, record).await) }
        }))
        .await;
        for (sequence, result) in fired {
            match result {
                Ok(()) | Err(Error::Store(store::Error::Closed)) => {}
                Err(e) => {
                    tracing::warn!(sequence, error = %e, "a timer failed to fire; it stays due")
                }
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = stopping.changed() => return,
        }
    }
}
