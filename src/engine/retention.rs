//! Saga retention: finished sagas (COMPLETED or REVERSED) older than the configured retention
//! are removed with their payloads, a bounded batch at a time, so the ledger of a long-running
//! coordinator stops growing. Sagas still running, reversing or needing attention are never
//! removed, whatever their age.

use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{Engine, Error, convert};
use crate::store;

/// Sagas examined per pass; the next pass continues after the last one examined.
const EXAMINED_PER_PASS: usize = 2_000;

/// Where the next pass starts; sagas are examined oldest first, then the scan wraps around.
#[derive(Debug, Default)]
pub(crate) struct Cursor(Mutex<Option<u64>>);

impl Engine {
    /// One pass: removes finished sagas last changed more than `retention` ago; returns how many.
    pub async fn collect_finished_sagas(&self, retention: Duration) -> Result<usize, Error> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let now = self.clock.now_ms();
        let after = *self
            .shared
            .retention_cursor
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (candidates, last) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut candidates = Vec::new();
                let mut last = None;
                for record in tx.sagas(after, false).take(EXAMINED_PER_PASS) {
                    let record = record?;
                    last = Some(record.sequence);
                    let finished = convert::saga_state_from_code(record.state)
                        .is_some_and(|s| s.is_terminal());
                    if finished && record.updated_ms.saturating_add(retention_ms) <= now {
                        candidates.push(record.sequence);
                    }
                }
                Ok((candidates, last))
            })
            .await??;
        *self
            .shared
            .retention_cursor
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = last;
        if candidates.is_empty() {
            return Ok(0);
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
        Ok(removed)
    }
}
