//! The timer loop: reads the due index and fires what is due — step timeouts, polls, reversal
//! retries, deadlines — each as one ledger write that removes the timer and applies it. After a
//! restart it finds every timer that came due while sagad was down. It also fires the step
//! timeouts kept in memory (`SoftTimers`), which a restart re-arms from the outbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::Millis;
use crate::domain::orchestration::{self, Timer};
use crate::engine::commands::Command;
use crate::engine::{Engine, Error, convert};
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
            .read(move |tx| {
                tx.scan_due_until(now)
                    .take(BATCH)
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
        let due = match due {
            Ok(Ok(due)) => due,
            Err(store::Error::Closed) => return,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "reading the due index failed; retrying");
                Vec::new()
            }
        };
        let soft = engine.shared.soft_timers.take_due(now, BATCH);
        let full = due.len() == BATCH || soft.len() == BATCH;
        let mut readable = Vec::with_capacity(due.len());
        let mut undecodable = Vec::new();
        for entry in due {
            match entry {
                Ok(timer) => readable.push(timer),
                Err(entry) => undecodable.push(entry),
            }
        }
        // A timer that cannot be read can never fire; left in place it would come due again
        // every round and, were there a batch of them, hold back every timer behind it.
        drop_undecodable_timers(&engine, undecodable).await;
        // Fired together, so their writes share flushes.
        let stored = readable.into_iter().map(|(key, record)| {
            let engine = engine.clone();
            futures::future::Either::Left(async move {
                (record.gsn_sequence, engine.fire_timer(key, record).await)
            })
        });
        let kept = soft.into_iter().map(|(sequence, at_ms, timer)| {
            let engine = engine.clone();
            futures::future::Either::Right(async move {
                let fired = engine.fire_soft_timer(sequence, at_ms, timer.clone()).await;
                if let Err(e) = &fired
                    && !matches!(e, Error::Store(store::Error::Closed))
                {
                    // Kept for the next round, as a stored timer stays due.
                    engine.shared.soft_timers.arm(sequence, at_ms, timer);
                }
                (sequence, fired)
            })
        });
        let fired = futures::future::join_all(stored.chain(kept)).await;
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

/// Logs and removes due entries that do not decode. The removal needs no flush of its own:
/// lost in a crash, the entry is only found and removed again.
async fn drop_undecodable_timers(engine: &Engine, entries: Vec<store::Undecodable>) {
    if entries.is_empty() {
        return;
    }
    for entry in &entries {
        tracing::warn!(
            table = entry.table(),
            key = %entry.key_hex(),
            error = %entry.error(),
            "a timer does not decode; it is dropped"
        );
    }
    let dropped = engine
        .store
        .write_unflushed(move |tx| -> Result<(), store::Error> {
            for entry in &entries {
                tx.drop_undecodable(entry)?;
            }
            Ok(())
        })
        .await;
    match dropped {
        Ok(Ok(())) | Err(store::Error::Closed) => {}
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(error = %e, "dropping timers that do not decode failed; retrying")
        }
    }
}

/// Step timeouts kept in memory instead of in the due index. Each rides with the Execute
/// command it times: until the node answers, the command's outbox entry holds everything the
/// timeout needs (saga, step, send number, send time), so a restart re-arms it from there
/// (`rearm_step_timeouts`); once the node answers, any later timeout the step needs is stored
/// by the domain's transition. That spares the common saga, whose steps answer at once, two
/// keys written and deleted per step.
#[derive(Default)]
pub(crate) struct SoftTimers {
    inner: Mutex<SoftInner>,
}

#[derive(Default)]
struct SoftInner {
    /// (due time, arming number) -> (GSN sequence, timer).
    due: BTreeMap<(Millis, u64), (u64, Timer)>,
    /// The keys of `due` by saga, so a saga that stops running drops its timers at once.
    by_saga: HashMap<u64, Vec<(Millis, u64)>>,
    armed: u64,
}

impl SoftTimers {
    fn lock(&self) -> std::sync::MutexGuard<'_, SoftInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn arm(&self, gsn_sequence: u64, at_ms: Millis, timer: Timer) {
        let mut inner = self.lock();
        inner.armed += 1;
        let key = (at_ms, inner.armed);
        inner.due.insert(key, (gsn_sequence, timer));
        inner.by_saga.entry(gsn_sequence).or_default().push(key);
    }

    pub(crate) fn forget_saga(&self, gsn_sequence: u64) {
        let mut inner = self.lock();
        if let Some(keys) = inner.by_saga.remove(&gsn_sequence) {
            for key in keys {
                inner.due.remove(&key);
            }
        }
    }

    /// Removes and returns up to `max` timers due at `now`, earliest first.
    pub(crate) fn take_due(&self, now: Millis, max: usize) -> Vec<(u64, Millis, Timer)> {
        let mut inner = self.lock();
        let mut taken = Vec::new();
        while taken.len() < max {
            let Some(entry) = inner.due.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let (key, (sequence, timer)) = entry.remove_entry();
            if let Some(keys) = inner.by_saga.get_mut(&sequence) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    inner.by_saga.remove(&sequence);
                }
            }
            taken.push((sequence, key.0, timer));
        }
        taken
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().due.len()
    }
}

/// At start: every Execute still in the outbox was not answered, so its step may still be
/// waiting; its timeout is armed again for the time it had (the send time the entry keeps plus
/// the step's timeout), which may be past already, and then fires at once.
pub(crate) async fn rearm_step_timeouts(
    engine: &Engine,
    unanswered: Vec<(u64, Millis, Command)>,
) -> Result<(), Error> {
    if unanswered.is_empty() {
        return Ok(());
    }
    let armed = engine
        .store
        .read(move |tx| -> Result<Vec<(u64, Millis, Timer)>, Error> {
            let mut armed = Vec::new();
            for (sequence, sent_ms, command) in unanswered {
                let stored = match tx.saga(sequence) {
                    Ok(Some(stored)) => stored,
                    Ok(None) => continue,
                    // One saga that cannot be read must not keep sagad from starting; its
                    // command is still delivered, and only its step timeout is lost.
                    Err(e @ (store::Error::Corrupt { .. } | store::Error::UnknownVersion { .. })) => {
                        tracing::warn!(table = "sagas", sequence, error = %e, "a saga does not decode; its step timeout is not armed");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let saga = match convert::saga_from_record(stored, Vec::new()) {
                    Ok(saga) => saga,
                    Err(e) => {
                        tracing::error!(sequence, error = %e, "a saga does not decode; its step timeout is not armed");
                        continue;
                    }
                };
                let Some(branch) = saga.branch(&command.branch_id) else {
                    continue;
                };
                // Commands stored before they carried their send number are the latest send.
                let attempt = command.send().unwrap_or(branch.attempts);
                if orchestration::step_timeout_is_live(&saga, &command.branch_id, attempt) {
                    let timer = Timer::StepTimeout {
                        branch_id: command.branch_id.clone(),
                        attempt,
                    };
                    armed.push((sequence, sent_ms.saturating_add(branch.timeout_ms), timer));
                }
            }
            Ok(armed)
        })
        .await??;
    for (sequence, at_ms, timer) in armed {
        engine.shared.soft_timers.arm(sequence, at_ms, timer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(branch: &str) -> Timer {
        Timer::StepTimeout {
            branch_id: branch.into(),
            attempt: 1,
        }
    }

    #[test]
    fn soft_timers_come_due_in_order_and_leave_with_their_saga() {
        let soft = SoftTimers::default();
        soft.arm(1, 300, timeout("a"));
        soft.arm(2, 100, timeout("b"));
        soft.arm(1, 200, timeout("c"));
        soft.arm(3, 100, timeout("d"));
        assert!(soft.take_due(99, 10).is_empty());
        assert_eq!(
            soft.take_due(200, 2),
            [(2, 100, timeout("b")), (3, 100, timeout("d"))],
            "earliest first, at most the batch"
        );
        soft.forget_saga(1);
        assert_eq!(soft.len(), 0, "saga 1 stopped running: its timers are gone");
        assert!(soft.take_due(u64::MAX, 10).is_empty());
        // Forgetting after some came due leaves the index consistent.
        soft.arm(4, 10, timeout("e"));
        soft.arm(4, 20, timeout("f"));
        assert_eq!(soft.take_due(10, 10), [(4, 10, timeout("e"))]);
        soft.forget_saga(4);
        assert_eq!(soft.len(), 0);
        assert!(soft.lock().by_saga.is_empty());
    }
}
