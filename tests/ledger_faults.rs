//! Ledger faults that no retry can mend. A write whose closure panics is a bug: background work
//! drops it instead of retrying it for ever.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sagad::clock::{Clock, ManualClock};
use sagad::domain::Millis;
use sagad::domain::saga::{Deadline, SagaMode, SagaState, StartRequest};
use sagad::store::{Options, Store};

const LIMIT: Duration = Duration::from_secs(20);

/// The test's clock, which panics when read by a ledger write once `armed`, as a bug in a
/// transition would.
struct PanicsInWrites {
    clock: ManualClock,
    armed: AtomicBool,
}

impl Clock for PanicsInWrites {
    fn now_ms(&self) -> Millis {
        let in_a_write = std::thread::current().name() == Some("sagad-ledger-writer");
        if in_a_write && self.armed.load(Ordering::SeqCst) {
            panic!("injected: a transition panicked");
        }
        self.clock.now_ms()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_whose_transition_panics_is_dropped_not_retried_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Options::new(dir.path())).unwrap();
    let clock = Arc::new(PanicsInWrites {
        clock: ManualClock::new(1_800_000_000_000),
        armed: AtomicBool::new(false),
    });
    let engine = sagad::engine::Engine::new(
        store.clone(),
        clock.clone(),
        Arc::new(sagad::random::FixedRandom(0.5)),
        sagad::engine::Settings::new(sagad::domain::ids::CoordinatorId::parse("c1").unwrap()),
    );
    let (gsn, _) = common::outcall_saga_on(
        &engine,
        StartRequest {
            request_id: "t-1".into(),
            business_type: "transfer".into(),
            mode: Some(SagaMode::RegisteredOutcalls),
            payload: b"a payload".to_vec(),
            content_type: String::new(),
            labels: BTreeMap::new(),
            deadline: Deadline::After(60_000),
        },
        b"the charge".to_vec(),
    )
    .await;
    engine.start().await.unwrap();
    clock.armed.store(true, Ordering::SeqCst);
    clock.clock.advance_ms(61_000);
    assert_eq!(
        common::timers_due_after(&store, LIMIT).await,
        0,
        "the deadline came due and was dropped, not retried every round"
    );
    clock.armed.store(false, Ordering::SeqCst);
    let saga = engine.get_saga(&gsn).await.unwrap();
    assert_eq!(
        saga.state,
        SagaState::Running,
        "the panicked transition was taken back whole: {saga:#?}"
    );
    engine.stop();
    store.close().await.unwrap();
}
