//! Ledger faults that no retry can mend. A flush or sync that fails is fatal: later writes
//! and reads are refused, health says NOT_SERVING and sagad stops, so that a restart recovers
//! from what is on disk. A write whose closure panics is a bug: background work drops it
//! instead of retrying it for ever. The flush is made to fail by taking away the ledger's blob
//! folder, which every durable flush lists.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::TestServer;
use sagad::clock::{Clock, ManualClock, SystemClock};
use sagad::config::Config;
use sagad::domain::Millis;
use sagad::domain::saga::{Deadline, SagaMode, SagaState, StartRequest};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::store::{Error, Options, Store};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LIMIT: Duration = Duration::from_secs(20);

/// Makes every later durable flush of the ledger at `ledger` fail, as a failing disk would.
fn break_syncs(ledger: &Path) {
    std::fs::remove_dir_all(ledger.join("blobs")).unwrap();
}

/// Lets syncs pass again, as Linux does after it has reported a failed writeback once.
fn mend_syncs(ledger: &Path) {
    std::fs::create_dir(ledger.join("blobs")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_fails_every_later_write_and_read_even_once_syncs_pass_again() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let store = Store::open(Options::new(&ledger)).unwrap();
    let first = store
        .write(|tx| tx.allocate_gsn_sequence())
        .await
        .unwrap()
        .unwrap();

    break_syncs(&ledger);
    let failed = store.write(|tx| tx.allocate_gsn_sequence()).await;
    assert!(matches!(failed, Err(Error::Fatal(_))), "{failed:?}");
    let fault = tokio::time::timeout(LIMIT, store.fatal_fault())
        .await
        .unwrap();
    assert!(!fault.is_empty());

    mend_syncs(&ledger);
    let later = store.write(|tx| tx.allocate_gsn_sequence()).await;
    assert!(
        matches!(&later, Err(Error::Fatal(m)) if m == &fault),
        "a later write is refused, not told durable by a sync that passes again: {later:?}"
    );
    let writes_nothing = store.write(move |tx| tx.saga(first)).await;
    assert!(
        matches!(writes_nothing, Err(Error::Fatal(_))),
        "a job that only reads (an idempotent replay) is refused too: {writes_nothing:?}"
    );
    let read = store.read(move |tx| tx.saga(first)).await;
    assert!(
        matches!(read, Err(Error::Fatal(_))),
        "a read could show writes never made durable: {read:?}"
    );
    let closed = store.close().await;
    assert!(matches!(closed, Err(Error::Fatal(_))), "{closed:?}");
    drop(store);

    // A restart recovers from what is on disk: the counter is where a durable write left it.
    let store = tokio::task::spawn_blocking(move || Store::open(Options::new(&ledger)))
        .await
        .unwrap()
        .unwrap();
    let next = store
        .write(|tx| tx.allocate_gsn_sequence())
        .await
        .unwrap()
        .unwrap();
    assert!(next > first, "{next} after {first}");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_flush_stops_every_later_write_and_reports_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let mut config = Config::with_data(&ledger);
    config.shutdown_grace = Duration::from_secs(1);
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let mut coordinator = CoordinatorClient::new(server.channel.clone());
    let before = coordinator
        .start_saga(common::start_request("before", "transfer"))
        .await
        .unwrap()
        .into_inner()
        .gsn;
    let mut health = HealthClient::new(server.channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = health.message().await.unwrap().unwrap();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    break_syncs(&ledger);
    let refused = coordinator
        .start_saga(common::start_request("after", "transfer"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("restarted"),
        "the caller is told sagad must be restarted: {}",
        refused.message()
    );
    let status = tokio::time::timeout(LIMIT, health.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status.status, ServingStatus::NotServing as i32);
    mend_syncs(&ledger);
    let stopped = tokio::time::timeout(LIMIT, server.stop()).await.unwrap();
    assert!(
        matches!(stopped, Err(sagad::app::Error::LedgerFault(_))),
        "serve ends with the fault, for main to exit non-zero: {stopped:?}"
    );

    // Restarted, sagad keeps what was answered, and the refused request can be sent again.
    let server = TestServer::start_with(Config::with_data(&ledger), Arc::new(SystemClock)).await;
    let mut coordinator = CoordinatorClient::new(server.channel.clone());
    let saga = coordinator
        .get_saga(pb::GetSagaRequest { gsn: before })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(saga.request_id, "before");
    coordinator
        .start_saga(common::start_request("after", "transfer"))
        .await
        .unwrap();
    server.stop().await.unwrap();
}

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
