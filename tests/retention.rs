//! Saga retention: finished sagas past the retention are removed with their payloads; sagas
//! still running are kept whatever their age.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sagad::clock::ManualClock;
use sagad::domain::saga::{Deadline, SagaMode, StartRequest};
use sagad::engine::{Engine, Error};
use sagad::store::{Options, Store};

const DAY_MS: u64 = 24 * 3600 * 1000;

fn start(request_id: &str) -> StartRequest {
    StartRequest {
        request_id: request_id.into(),
        business_type: "transfer".into(),
        mode: Some(SagaMode::RegisteredOutcalls),
        payload: b"a payload to remove".to_vec(),
        content_type: String::new(),
        labels: BTreeMap::new(),
        deadline: Deadline::None,
    }
}

/// A ledger in `dir` and an engine on it, with a clock the test moves.
fn engine_on(dir: &tempfile::TempDir) -> (Store, Arc<ManualClock>, Engine) {
    let store = Store::open(Options::new(dir.path())).unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let engine = common::engine_on(&store, clock.clone(), None);
    (store, clock, engine)
}

#[tokio::test]
async fn finished_sagas_past_the_retention_are_removed_and_running_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock, engine) = engine_on(&dir);
    let mut gsns = Vec::new();
    for i in 0..5 {
        let request_id = format!("s-{i}");
        engine
            .start_saga(start(&request_id), Vec::new(), |_| (Vec::new(), ()))
            .await
            .unwrap();
        gsns.push(format!("c1-{:016}", i + 1));
    }
    // Sagas 1-3 complete (no outcalls to wait for); 4 and 5 keep running.
    for gsn in &gsns[..3] {
        engine
            .complete_saga(&format!("done-{gsn}"), gsn, Vec::new(), |_| Vec::new())
            .await
            .unwrap();
    }

    clock.advance_ms(2 * DAY_MS);
    assert_eq!(
        engine
            .collect_finished_sagas(Duration::from_secs(3 * 24 * 3600))
            .await
            .unwrap(),
        0,
        "not old enough yet"
    );
    clock.advance_ms(2 * DAY_MS);
    let mut removed = 0;
    for _ in 0..3 {
        removed += engine
            .collect_finished_sagas(Duration::from_secs(3 * 24 * 3600))
            .await
            .unwrap();
    }
    assert_eq!(removed, 3);
    for gsn in &gsns[..3] {
        assert!(
            matches!(engine.get_saga(gsn).await, Err(Error::NotFound(_))),
            "{gsn} was removed"
        );
    }
    for gsn in &gsns[3..] {
        assert!(
            !engine.get_saga(gsn).await.unwrap().payload.is_empty(),
            "{gsn} is still running and kept whole"
        );
    }
    let leftover = store
        .read(|tx| {
            (1..=3)
                .filter_map(|s| tx.payload(s, "").ok().flatten())
                .count()
        })
        .await
        .unwrap();
    assert_eq!(leftover, 0, "the removed sagas' payloads went with them");
    store.close().await.unwrap();
}

/// One collection removes every finished saga past the retention, however many there are, so
/// retention keeps pace with a sustained load instead of a fixed number per pass.
#[tokio::test]
async fn one_collection_catches_up_with_many_finished_sagas() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock, engine) = engine_on(&dir);
    const SAGAS: usize = 1_200;
    for i in 0..SAGAS {
        engine
            .start_saga(start(&format!("many-{i}")), Vec::new(), |_| {
                (Vec::new(), ())
            })
            .await
            .unwrap();
        let gsn = format!("c1-{:016}", i + 1);
        engine
            .complete_saga(&format!("done-{i}"), &gsn, Vec::new(), |_| Vec::new())
            .await
            .unwrap();
    }
    // Sagas started after the others, within the retention, stay.
    clock.advance_ms(2 * DAY_MS);
    engine
        .start_saga(start("young"), Vec::new(), |_| (Vec::new(), ()))
        .await
        .unwrap();
    clock.advance_ms(2 * DAY_MS);
    let removed = engine
        .collect_finished_sagas(Duration::from_secs(3 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(removed, SAGAS);
    let left = store
        .read(|tx| tx.sagas(None, false).count())
        .await
        .unwrap();
    assert_eq!(left, 1, "only the young saga is left");
    store.close().await.unwrap();
}
