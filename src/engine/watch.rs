//! Watchers of sagas (WatchSaga): each stored transition publishes the saga to whoever
//! watches it, without a ledger read per change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::domain::saga::Saga;

/// The map is swept of unwatched sagas once it reaches this size, and then each time it has
/// doubled since the last sweep.
const SWEEP_AT: usize = 1024;

/// A stored state of a saga, with the stamp of the write that stored it (`WriteTx::stamp`).
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub stamp: u64,
    pub saga: Arc<Saga>,
}

pub(crate) type Changes = watch::Receiver<Option<Published>>;

#[derive(Default)]
pub(crate) struct Watchers {
    by_sequence: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<u64, watch::Sender<Option<Published>>>,
    /// How many entries the last sweep kept.
    kept: usize,
}

impl Watchers {
    pub(crate) fn subscribe(&self, sequence: u64) -> Changes {
        let mut entries = self.by_sequence.lock().unwrap_or_else(|p| p.into_inner());
        // Watchers of a saga that never changes again (it was already terminal, or the caller
        // went away) are swept here, so the map stays as small as what is being watched. Only
        // once it has doubled since the last sweep: with many sagas watched, a sweep on every
        // subscribe would scan them all each time, under the lock every publish takes.
        if entries.map.len() >= SWEEP_AT.max(entries.kept.saturating_mul(2)) {
            entries.map.retain(|_, sender| sender.receiver_count() > 0);
            entries.kept = entries.map.len();
        }
        entries
            .map
            .entry(sequence)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Publishes the state a write with `stamp` stored. Writes of one group are answered
    /// together and their follow-ups run in any order, so an older state may come after a
    /// newer one: it is dropped, and watchers never go back to it.
    pub(crate) fn publish(&self, saga: Saga, stamp: u64) {
        let mut entries = self.by_sequence.lock().unwrap_or_else(|p| p.into_inner());
        let map = &mut entries.map;
        let sequence = saga.gsn.sequence();
        let Some(sender) = map.get(&sequence) else {
            return;
        };
        if sender.receiver_count() == 0 {
            map.remove(&sequence);
            return;
        }
        let terminal = saga.state.is_terminal();
        let published = sender.send_if_modified(|current| {
            if current.as_ref().is_some_and(|c| c.stamp >= stamp) {
                return false;
            }
            *current = Some(Published {
                stamp,
                saga: Arc::new(saga),
            });
            true
        });
        if published && terminal {
            // Receivers keep the last value; nothing will change after a terminal state.
            map.remove(&sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::saga::SagaState;

    fn saga(sequence: u64, state: SagaState) -> Saga {
        crate::domain::saga::test_saga(sequence, state)
    }

    fn shown(changes: &Changes) -> Option<(u64, SagaState)> {
        changes.borrow().as_ref().map(|p| (p.stamp, p.saga.state))
    }

    #[test]
    fn a_state_published_after_a_newer_one_is_dropped() {
        let watchers = Watchers::default();
        let changes = watchers.subscribe(7);
        watchers.publish(saga(7, SagaState::NeedsAttention), 12);
        // The follow-up of an earlier write of the same group, run late.
        watchers.publish(saga(7, SagaState::Reversing), 11);
        assert_eq!(shown(&changes), Some((12, SagaState::NeedsAttention)));
        watchers.publish(saga(7, SagaState::Reversing), 13);
        assert_eq!(shown(&changes), Some((13, SagaState::Reversing)));
    }

    #[test]
    fn a_terminal_state_ends_the_watch_even_if_an_older_one_follows() {
        let watchers = Watchers::default();
        let changes = watchers.subscribe(7);
        watchers.publish(saga(7, SagaState::Reversed), 20);
        assert!(
            !watchers.by_sequence.lock().unwrap().map.contains_key(&7),
            "nothing changes after a terminal state: the watch is over"
        );
        watchers.publish(saga(7, SagaState::Reversing), 19);
        assert_eq!(shown(&changes), Some((20, SagaState::Reversed)));
    }

    #[test]
    fn with_many_sagas_watched_the_map_is_swept_only_once_it_doubled() {
        let watchers = Watchers::default();
        let kept = |watchers: &Watchers| watchers.by_sequence.lock().unwrap().kept;
        let watched: Vec<Changes> = (0..(SWEEP_AT as u64 * 3 / 2))
            .map(|sequence| watchers.subscribe(sequence))
            .collect();
        assert_eq!(kept(&watchers), SWEEP_AT, "swept at the first threshold");
        // Up to twice what the sweep kept, no subscribe scans the map.
        for sequence in 0..(SWEEP_AT as u64 / 2) {
            drop(watchers.subscribe(100_000 + sequence));
        }
        assert_eq!(kept(&watchers), SWEEP_AT, "no sweep before the map doubled");
        drop(watchers.subscribe(200_000));
        assert_eq!(
            kept(&watchers),
            watched.len(),
            "swept once it doubled: only the watched sagas are kept"
        );
    }

    #[test]
    fn unwatched_sagas_are_swept() {
        let watchers = Watchers::default();
        for sequence in 0..(SWEEP_AT as u64 + 10) {
            drop(watchers.subscribe(sequence));
        }
        let size = watchers.by_sequence.lock().unwrap().map.len();
        assert!(
            size < SWEEP_AT,
            "{size} entries kept for sagas no one watches"
        );
        let kept = watchers.subscribe(7);
        for sequence in 0..(SWEEP_AT as u64 + 10) {
            drop(watchers.subscribe(10_000 + sequence));
        }
        assert!(
            watchers.by_sequence.lock().unwrap().map.contains_key(&7),
            "a watched saga stays"
        );
        drop(kept);
    }
}
