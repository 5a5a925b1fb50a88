//! Watchers of sagas (WatchSaga): each stored transition publishes the saga to whoever
//! watches it, without a ledger read per change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::domain::saga::Saga;

/// The map is swept of unwatched sagas when it reaches this size.
const SWEEP_AT: usize = 1024;

#[derive(Default)]
pub(crate) struct Watchers {
    by_sequence: Mutex<HashMap<u64, watch::Sender<Option<Arc<Saga>>>>>,
}

impl Watchers {
    pub(crate) fn subscribe(&self, sequence: u64) -> watch::Receiver<Option<Arc<Saga>>> {
        let mut map = self.by_sequence.lock().unwrap_or_else(|p| p.into_inner());
        // Watchers of a saga that never changes again (it was already terminal, or the caller
        // went away) are swept here, so the map stays as small as what is being watched.
        if map.len() >= SWEEP_AT {
            map.retain(|_, sender| sender.receiver_count() > 0);
        }
        map.entry(sequence)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    pub(crate) fn publish(&self, saga: Saga) {
        let mut map = self.by_sequence.lock().unwrap_or_else(|p| p.into_inner());
        let sequence = saga.gsn.sequence();
        let Some(sender) = map.get(&sequence) else {
            return;
        };
        if sender.receiver_count() == 0 {
            map.remove(&sequence);
            return;
        }
        let terminal = saga.state.is_terminal();
        sender.send_replace(Some(Arc::new(saga)));
        if terminal {
            // Receivers keep the last value; nothing will change after a terminal state.
            map.remove(&sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwatched_sagas_are_swept() {
        let watchers = Watchers::default();
        for sequence in 0..(SWEEP_AT as u64 + 10) {
            drop(watchers.subscribe(sequence));
        }
        let size = watchers.by_sequence.lock().unwrap().len();
        assert!(
            size < SWEEP_AT,
            "{size} entries kept for sagas no one watches"
        );
        let kept = watchers.subscribe(7);
        for sequence in 0..(SWEEP_AT as u64 + 10) {
            drop(watchers.subscribe(10_000 + sequence));
        }
        assert!(
            watchers.by_sequence.lock().unwrap().contains_key(&7),
            "a watched saga stays"
        );
        drop(kept);
    }
}
