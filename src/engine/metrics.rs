//! Counters of what the engine did, cheap enough to bump on every event and ready to be
//! exported (the Operations service reads them): deliveries, polls, answers, escalations.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub commands_delivered: AtomicU64,
    pub delivery_failures: AtomicU64,
    pub polls_sent: AtomicU64,
    pub poll_answers: AtomicU64,
    pub escalations: AtomicU64,
    pub timers_fired: AtomicU64,
    pub reversals_started: AtomicU64,
    pub sagas_completed: AtomicU64,
    pub sagas_reversed: AtomicU64,
    pub sagas_needing_attention: AtomicU64,
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter by name, for export.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("commands_delivered", read(&self.commands_delivered)),
            ("delivery_failures", read(&self.delivery_failures)),
            ("polls_sent", read(&self.polls_sent)),
            ("poll_answers", read(&self.poll_answers)),
            ("escalations", read(&self.escalations)),
            ("timers_fired", read(&self.timers_fired)),
            ("reversals_started", read(&self.reversals_started)),
            ("sagas_completed", read(&self.sagas_completed)),
            ("sagas_reversed", read(&self.sagas_reversed)),
            (
                "sagas_needing_attention",
                read(&self.sagas_needing_attention),
            ),
        ]
    }
}
