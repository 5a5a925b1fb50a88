//! Ledger lifecycle: open, lock, close, drop without close, and the failures a caller can
//! provoke (a panicking closure, a closed store).
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking"
)]

use sagad::store::{
    BranchRecord, Durability, Error, Options, PayloadRecord, SagaRecord, Store, TimelineRecord,
};
use std::collections::BTreeMap;

fn branch(order: u32) -> BranchRecord {
    BranchRecord {
        branch_id: format!("b{order}"),
        node_id: "node-a".into(),
        caller_node_id: String::new(),
        forward_action: "pay".into(),
        reversal_action: "refund".into(),
        order,
        state: 1,
        last_status: String::new(),
        last_status_parameters: BTreeMap::new(),
        error_code: String::new(),
        message: String::new(),
        attempts: 1,
        retry_at_ms: 0,
        earlier_reversal_sends: 0,
        created_ms: 10,
        updated_ms: 10,
        last_poll_outcome: 0,
        last_poll_ms: 0,
        polls: 0,
        timeout_ms: 1_000,
        timeline: vec![TimelineRecord {
            at_ms: 10,
            what: "execute sent".into(),
        }],
    }
}

fn saga(sequence: u64, branches: u32) -> SagaRecord {
    SagaRecord {
        coordinator_id: "c1".into(),
        sequence,
        business_type: "order".into(),
        mode: 1,
        content_type: "application/octet-stream".into(),
        labels: BTreeMap::from([("tenant".into(), "t1".into())]),
        deadline_ms: 0,
        state: 1,
        created_ms: 10,
        updated_ms: 10,
        request_id: format!("r{sequence}"),
        strategy_version: 1,
        branches: (0..branches).map(branch).collect(),
        reported: Vec::new(),
        fired_rules: Vec::new(),
        signal: 0,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: 0,
        reversal_target: String::new(),
    }
}

fn payload(len: usize) -> PayloadRecord {
    PayloadRecord {
        data: vec![7; len],
        content_type: "application/octet-stream".into(),
    }
}

fn options(dir: &tempfile::TempDir) -> Options {
    let mut options = Options::new(dir.path().join("ledger"));
    options.cache_capacity_bytes = 8 * 1024 * 1024;
    options
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn put_saga(store: &Store, record: SagaRecord) {
    store
        .write(move |tx| tx.put_saga(&record))
        .await
        .unwrap()
        .unwrap();
}

async fn saga_count(store: &Store) -> usize {
    store
        .read(|tx| tx.sagas(None, false).count())
        .await
        .unwrap()
}

/// flock is per open file, so a second open in the same process is refused like another
/// process would be; once the first is closed the folder opens again.
#[test]
fn a_second_open_of_the_same_folder_is_locked_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(options(&dir)).unwrap();
    match Store::open(options(&dir)) {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path().join("ledger")),
        Err(other) => panic!("expected Locked, got {other:?}"),
        Ok(_) => panic!("a second open of a locked folder succeeded"),
    }
    runtime().block_on(first.close()).unwrap();
    let second = Store::open(options(&dir)).unwrap();
    drop(second);
}

#[test]
fn a_folder_that_cannot_be_created_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a folder").unwrap();
    match Store::open(Options::new(file.join("ledger"))) {
        Err(Error::Open { path, .. }) => assert_eq!(path, file.join("ledger")),
        Err(other) => panic!("expected Open, got {other:?}"),
        Ok(_) => panic!("opened a ledger inside a file"),
    }
}

/// The process-level half of "crash after acknowledgement": once `write` has returned, the
/// data is on disk even if the store is never closed.
#[test]
fn an_acknowledged_write_survives_dropping_the_store_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for durability in [Durability::Durable, Durability::Relaxed] {
        let mut options = options(&dir);
        options.durability = durability;
        let store = Store::open(options.clone()).unwrap();
        let before = rt.block_on(saga_count(&store));
        rt.block_on(put_saga(&store, saga(before as u64 + 1, 100)));
        drop(store);

        let store = Store::open(options).unwrap();
        let found = rt
            .block_on(store.read(move |tx| tx.saga(before as u64 + 1)))
            .unwrap()
            .unwrap();
        assert_eq!(found.unwrap(), saga(before as u64 + 1, 100));
        drop(store);
    }
}

/// Dropping the last handle inside a write closure runs on the writer thread itself, which
/// must not try to join itself.
#[test]
fn dropping_the_last_handle_on_the_writer_thread_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    let handle = store.clone();
    let write = store.write(move |tx| {
        drop(handle);
        tx.put_saga(&saga(1, 10))
    });
    rt.block_on(write).unwrap().unwrap();
    drop(store);
    let store = Store::open(options(&dir)).unwrap();
    assert!(
        rt.block_on(store.read(|tx| tx.saga(1)))
            .unwrap()
            .unwrap()
            .is_some()
    );
}

#[test]
fn after_close_every_call_answers_closed() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let store = Store::open(options(&dir)).unwrap();
        put_saga(&store, saga(1, 10)).await;
        store.close().await.unwrap();
        let write = store.write(|tx| tx.put_saga(&saga(2, 10))).await;
        assert!(matches!(write, Err(Error::Closed)), "{write:?}");
        assert!(matches!(
            store.read(|tx| tx.saga(1)).await,
            Err(Error::Closed)
        ));
        assert!(matches!(store.close().await, Err(Error::Closed)));
    });
    let store = Store::open(options(&dir)).unwrap();
    let rt = runtime();
    assert_eq!(rt.block_on(saga_count(&store)), 1);
}

#[test]
fn close_finishes_writes_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let store = Store::open(options(&dir)).unwrap();
        let writes: Vec<_> = (1..=50)
            .map(|sequence| {
                let store = store.clone();
                tokio::spawn(async move { put_saga(&store, saga(sequence, 10)).await })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
        store.close().await.unwrap();
    });
    let store = Store::open(options(&dir)).unwrap();
    assert_eq!(runtime().block_on(saga_count(&store)), 50);
}

#[test]
fn a_panicking_closure_fails_alone_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let store = Store::open(options(&dir)).unwrap();
        let panicked = store
            .write(|tx| -> Result<(), Error> {
                tx.put_saga(&saga(1, 10))?;
                panic!("a bug in the caller");
            })
            .await;
        // A bug, which running the job again would only repeat: not a passing storage fault.
        assert!(
            matches!(panicked, Err(Error::Panicked(ref m)) if m.contains("a bug in the caller")),
            "{panicked:?}"
        );
        let read_panicked = store.read(|_| -> u8 { panic!("a bug in a reader") }).await;
        assert!(
            matches!(read_panicked, Err(Error::Panicked(ref m)) if m.contains("a bug in a reader")),
            "{read_panicked:?}"
        );

        // Both threads are still serving, and the panicking write left nothing.
        put_saga(&store, saga(2, 10)).await;
        let sequences: Vec<u64> = store
            .read(|tx| tx.sagas(None, false).map(|s| s.unwrap().sequence).collect())
            .await
            .unwrap();
        assert_eq!(sequences, vec![2]);
        store.close().await.unwrap();
    });
}

/// Values past sled's ~128 KiB blob threshold live in their own files, which the durable
/// flush syncs separately; they must come back after a restart like any other value.
#[test]
fn large_values_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    for (sequence, len) in [(1, 600 * 1024), (2, 0)] {
        let write = store.write(move |tx| {
            tx.put_saga(&saga(sequence, 3))?;
            tx.put_payload(sequence, "", &payload(len))
        });
        rt.block_on(write).unwrap().unwrap();
    }
    rt.block_on(store.close()).unwrap();
    drop(store);

    let store = Store::open(options(&dir)).unwrap();
    let (big, empty, first) = rt
        .block_on(store.read(|tx| (tx.payload(1, ""), tx.payload(2, ""), tx.saga(1))))
        .unwrap();
    assert_eq!(first.unwrap().unwrap(), saga(1, 3));
    assert_eq!(big.unwrap().unwrap(), payload(600 * 1024));
    assert_eq!(empty.unwrap().unwrap(), payload(0));
    rt.block_on(store.close()).unwrap();
}

#[test]
fn sagas_iterate_strictly_after_the_cursor_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let store = Store::open(options(&dir)).unwrap();
        for sequence in [1, 2, 3, 5, 8, u64::MAX] {
            put_saga(&store, saga(sequence, 1)).await;
        }
        let page = |after: Option<u64>, descending: bool| {
            let store = store.clone();
            async move {
                store
                    .read(move |tx| {
                        tx.sagas(after, descending)
                            .map(|s| s.unwrap().sequence)
                            .collect::<Vec<_>>()
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(page(None, false).await, vec![1, 2, 3, 5, 8, u64::MAX]);
        assert_eq!(page(None, true).await, vec![u64::MAX, 8, 5, 3, 2, 1]);
        assert_eq!(page(Some(3), false).await, vec![5, 8, u64::MAX]);
        assert_eq!(page(Some(4), false).await, vec![5, 8, u64::MAX]);
        assert_eq!(page(Some(u64::MAX), false).await, Vec::<u64>::new());
        assert_eq!(page(Some(5), true).await, vec![3, 2, 1]);
        assert_eq!(page(Some(1), true).await, Vec::<u64>::new());
        assert_eq!(page(Some(0), false).await, vec![1, 2, 3, 5, 8, u64::MAX]);
        store.close().await.unwrap();
    });
}
