//! Watchers of sagas (WatchSaga): each stored transition publishes the saga to whoever
//! watches it, without a ledger read per change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::domain::saga::Saga;

#[derive(Default)]
pub(crate) struct Watchers {
    by_sequence: Mutex<HashMap<u64, watch::Sender<Option<Arc<Saga>>>>>,
}

impl Watchers {
    pub(crate) fn subscribe(&self, sequence: u64) -> watch::Receiver<Option<Arc<Saga>>> {
        let mut map = self.by_sequence.lock().unwrap_or_else(|p| p.into_inner());
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
