//! Saga retention: finished sagas (COMPLETED or REVERSED) older than the configured retention
//! are removed with their payloads, a bounded batch at a time, so the ledger of a long-running
//! coordinator stops growing. Sagas still running, reversing or needing attention are never
//! removed, whatever their age.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{Engine, Error, convert};
use crate::store;

/// Sagas examined per pass (one read, then one write of at most this many removals), so a pass
/// never holds the ledger writer for long.
const EXAMINED_PER_PASS: usize = 500;

/// Passes per collection at most: 20,000 sagas, so retention keeps pace with that many sagas
/// per tick, while a ledger full of old sagas that must be kept (still running, needing
/// attention) is read a bounded amount at a time; the next collection goes on from there.
const PASSES_PER_COLLECTION: usize = 40;

/// Where the next pass starts; sagas are examined oldest first, then the scan wraps around.
#[derive(Debug, Default)]
pub(crate) struct Cursor(Mutex<Option<u64>>);

/// Sagas a pass found undecodable and reported. Every collection (one a second) scans past
/// them again, so each is logged once, not once a second.
#[derive(Debug, Default)]
pub(crate) struct Reported(Mutex<HashSet<Vec<u8>>>);

impl Reported {
    fn report(&self, undecodable: &store::Undecodable) {
        let first = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(undecodable.key().to_vec());
        if first {
            tracing::warn!(
                table = undecodable.table(),
                key = %undecodable.key_hex(),
                error = %undecodable.error(),
                "a saga does not decode; retention passes over it"
            );
        }
    }
}

/// What one pass did.
struct Pass {
    removed: usize,
    /// The scan reached the end of the sagas, or a saga created too recently to be past the
    /// retention (GSNs follow creation, so every later saga is younger still).
    caught_up: bool,
}

impl Engine {
    /// Removes finished sagas last changed more than `retention` ago, pass after pass until
    /// the scan has caught up (or `PASSES_PER_COLLECTION` passes), so retention keeps pace with
    /// a sustained rate of sagas; returns how many it removed. Sagas created within the
    /// retention are never examined.
    pub async fn collect_finished_sagas(&self, retention: Duration) -> Result<usize, Error> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let now = self.clock.now_ms();
        let mut removed = 0;
        for _ in 0..PASSES_PER_COLLECTION {
            let pass = self.retention_pass(retention_ms, now).await?;
            removed += pass.removed;
            if pass.caught_up {
                break;
            }
        }
        Ok(removed)
    }

    async fn retention_pass(&self, retention_ms: u64, now: u64) -> Result<Pass, Error> {
        let after = *self
            .shared
            .retention_cursor
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let shared = self.shared.clone();
        let (candidates, last, caught_up) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut candidates = Vec::new();
                let mut last = None;
                let mut examined = 0;
                for record in tx.scan_sagas(after, false).take(EXAMINED_PER_PASS) {
                    // A saga that cannot be read cannot be judged finished, so it is kept; the
                    // cursor moves past it, or it would stop retention for good.
                    let record = match record? {
                        Ok(record) => record,
                        Err(undecodable) => {
                            shared.retention_reported.report(&undecodable);
                            examined += 1;
                            last = undecodable.key_u64().or(last);
                            continue;
                        }
                    };
                    if record.created_ms.saturating_add(retention_ms) > now {
                        return Ok((candidates, last, true));
                    }
                    examined += 1;
                    last = Some(record.sequence);
                    let finished = convert::saga_state_from_code(record.state)
                        .is_some_and(|s| s.is_terminal());
                    if finished && record.updated_ms.saturating_add(retention_ms) <= now {
                        candidates.push(record.sequence);
                    }
                }
                Ok((candidates, last, examined < EXAMINED_PER_PASS))
            })
            .await??;
        // Once caught up, the next pass starts from the oldest saga again: sagas kept because
        // they were still running get another look.
        *self
            .shared
            .retention_cursor
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = if caught_up { None } else { last };
        if candidates.is_empty() {
            return Ok(Pass {
                removed: 0,
                caught_up,
            });
        }
        let removed = self
            .store
            .write(move |tx| -> Result<usize, Error> {
                let mut removed = 0;
                for sequence in candidates {
                    // Checked again inside the write: nothing may have changed it, but the rule
                    // is decided where the ledger is consistent.
                    let Some(record) = tx.saga(sequence)? else {
                        continue;
                    };
                    let finished = convert::saga_state_from_code(record.state)
                        .is_some_and(|s| s.is_terminal());
                    if finished && record.updated_ms.saturating_add(retention_ms) <= now {
                        tx.delete_saga(sequence)?;
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await??;
        Ok(Pass { removed, caught_up })
    }
}
