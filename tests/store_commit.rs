//! Group commit and the GSN counter under concurrency: many tokio tasks writing at once share
//! flushes, and sequence numbers stay unique and increasing across a reopen.
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking"
)]

use sagad::store::{Error, Options, SagaRecord, Store};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

fn saga(sequence: u64) -> SagaRecord {
    SagaRecord {
        coordinator_id: "c1".into(),
        sequence,
        business_type: "order".into(),
        mode: 2,
        content_type: String::new(),
        labels: BTreeMap::new(),
        deadline_ms: 0,
        state: 1,
        created_ms: 1,
        updated_ms: 1,
        request_id: format!("r{sequence}"),
        strategy_version: 0,
        branches: Vec::new(),
        reported: Vec::new(),
        fired_rules: Vec::new(),
        signal: 0,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: 0,
        reversal_target: String::new(),
    }
}

fn options(dir: &tempfile::TempDir) -> Options {
    let mut options = Options::new(dir.path().join("ledger"));
    options.cache_capacity_bytes = 8 * 1024 * 1024;
    options
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Stores saga `sequence` with a durable `write`.
async fn put_saga(store: &Store, sequence: u64) {
    store
        .write(move |tx| tx.put_saga(&saga(sequence)))
        .await
        .unwrap()
        .unwrap();
}

/// Allocates `per_write` sequences in each of `writes` jobs spread over `tasks` tasks; every
/// third job is rejected after allocating. Returns the committed sequences in allocation
/// order (recorded on the writer thread, which runs jobs one at a time).
async fn allocate(store: &Store, tasks: u64, writes: u64, per_write: usize) -> Vec<u64> {
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = store.clone();
        let order = order.clone();
        handles.push(tokio::spawn(async move {
            for write in 0..writes {
                let order = order.clone();
                let reject = (task + write) % 3 == 0;
                // `Err(None)` is a deliberate rejection, `Err(Some(_))` a ledger failure.
                let answer = store
                    .write(move |tx| {
                        let mut sequences = Vec::new();
                        for _ in 0..per_write {
                            let sequence = tx.allocate_gsn_sequence().map_err(Some)?;
                            tx.put_saga(&saga(sequence)).map_err(Some)?;
                            sequences.push(sequence);
                        }
                        if reject {
                            return Err(None::<Error>);
                        }
                        order.lock().unwrap().extend(&sequences);
                        Ok(sequences)
                    })
                    .await
                    .unwrap();
                match answer {
                    Ok(sequences) => assert_eq!(sequences.len(), per_write),
                    Err(None) => assert!(reject),
                    Err(Some(error)) => panic!("ledger failure: {error}"),
                }
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    Arc::try_unwrap(order).unwrap().into_inner().unwrap()
}

#[test]
fn gsn_sequences_are_unique_and_increasing_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();

    let store = Store::open(options(&dir)).unwrap();
    let first = rt.block_on(allocate(&store, 12, 6, 3));
    // Rejected jobs consume nothing, so the committed numbers are exactly 1..=n in order.
    assert_eq!(first, (1..=first.len() as u64).collect::<Vec<_>>());
    // Reopen without close: the counter must come from what was acknowledged.
    drop(store);

    let store = Store::open(options(&dir)).unwrap();
    let second = rt.block_on(allocate(&store, 12, 6, 3));
    assert!(!second.is_empty());
    assert!(second.windows(2).all(|w| w[0] < w[1]), "{second:?}");
    assert!(
        second[0] > *first.last().unwrap(),
        "a sequence was reused after reopen"
    );
    rt.block_on(store.close()).unwrap();

    let store = Store::open(options(&dir)).unwrap();
    let stored: Vec<u64> = rt
        .block_on(store.read(|tx| tx.sagas(None, false).map(|s| s.unwrap().sequence).collect()))
        .unwrap();
    let committed: Vec<u64> = first.iter().chain(&second).copied().collect();
    assert_eq!(stored, committed, "only committed jobs left sagas behind");
    rt.block_on(store.close()).unwrap();
}

#[test]
fn concurrent_writes_share_flushes_and_are_all_readable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    rt.block_on(async {
        let writes: Vec<_> = (1..=200u64)
            .map(|sequence| {
                let store = store.clone();
                tokio::spawn(async move { put_saga(&store, sequence).await })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
    });
    let flushes = store.flush_count();
    eprintln!("200 concurrent writes took {flushes} flushes");
    assert!(flushes > 0, "acknowledged writes were never flushed");
    assert!(
        flushes < 200,
        "200 concurrent writes took {flushes} flushes: no group commit"
    );

    let stored = rt
        .block_on(store.read(|tx| tx.sagas(None, false).collect::<Result<Vec<_>, _>>()))
        .unwrap()
        .unwrap();
    assert_eq!(stored, (1..=200).map(saga).collect::<Vec<_>>());
    rt.block_on(store.close()).unwrap();
}

/// A group whose jobs changed nothing has nothing to make durable, so it costs no flush; a
/// rejected job still waits for the flush of the group that holds it.
#[test]
fn groups_that_write_nothing_skip_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    rt.block_on(async {
        put_saga(&store, 1).await;
        let after_write = store.flush_count();
        assert_eq!(after_write, 1);
        let found = store.write(|tx| tx.saga(1)).await.unwrap().unwrap();
        assert_eq!(found, Some(saga(1)));
        let rejected = store
            .write(|tx| {
                tx.put_saga(&saga(2))?;
                Err::<(), _>(Error::Closed)
            })
            .await
            .unwrap();
        assert!(rejected.is_err());
        assert_eq!(store.flush_count(), after_write);
        store.close().await.unwrap();
    });
}

/// A write whose loss is harmless is answered once applied, visible to later writes at once,
/// and costs no flush of its own; the next write that waits for durability is flushed, and
/// that flush covers it.
#[test]
fn unflushed_writes_cost_no_flush_and_the_next_durable_write_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    rt.block_on(async {
        put_saga(&store, 1).await;
        let before = store.flush_count();
        for sequence in 2..=5 {
            store
                .write_unflushed(move |tx| tx.put_saga(&saga(sequence)))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            store.flush_count(),
            before,
            "an unflushed write caused a flush"
        );
        // A write that saw it may act on it, so it is answered only after a flush covers it.
        let seen = store.write(|tx| tx.saga(5)).await.unwrap().unwrap();
        assert_eq!(seen, Some(saga(5)), "a later write did not see it");
        assert_eq!(store.flush_count(), before + 1);
        put_saga(&store, 6).await;
        assert_eq!(store.flush_count(), before + 2);
    });
    // Reopen without close: only what the last flush covered is promised, and it covers all.
    drop(store);
    let store = Store::open(options(&dir)).unwrap();
    let stored: Vec<u64> = rt
        .block_on(store.read(|tx| tx.sagas(None, false).map(|s| s.unwrap().sequence).collect()))
        .unwrap();
    assert_eq!(stored, (1..=6).collect::<Vec<_>>());
    rt.block_on(store.close()).unwrap();
}

/// A rejected unflushed write leaves nothing behind, and its caller gets its own error back.
#[test]
fn a_rejected_unflushed_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = Store::open(options(&dir)).unwrap();
    rt.block_on(async {
        let rejected = store
            .write_unflushed(|tx| {
                tx.put_saga(&saga(1))?;
                Err::<(), _>(Error::Closed)
            })
            .await
            .unwrap();
        assert!(matches!(rejected, Err(Error::Closed)));
        let found = store.write(|tx| tx.saga(1)).await.unwrap().unwrap();
        assert_eq!(found, None);
        store.close().await.unwrap();
    });
}

/// Writes are stamped in the order they ran, concurrent ones included, and a read knows the
/// stamp of the last write it sees: every write stamped up to it is visible, so work told
/// about writes by stamp can tell which are newer than what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_are_stamped_in_order_and_a_read_knows_the_last_write_it_sees() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(options(&dir)).unwrap();
    let writes = (1..=64u64).map(|sequence| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |tx| {
                    tx.put_saga(&saga(sequence))?;
                    Ok::<_, Error>((tx.stamp(), sequence))
                })
                .await
                .unwrap()
                .unwrap()
        })
    });
    let mut stamped = Vec::new();
    for write in writes {
        stamped.push(write.await.unwrap());
    }
    let mut stamps: Vec<u64> = stamped.iter().map(|(stamp, _)| *stamp).collect();
    stamps.sort_unstable();
    stamps.dedup();
    assert_eq!(stamps.len(), stamped.len(), "no two writes share a stamp");

    let (seen_through, seen) = store
        .read(|tx| {
            let sagas = tx.sagas(None, false).map(|saga| saga.unwrap().sequence);
            (tx.stamp(), sagas.collect::<Vec<_>>())
        })
        .await
        .unwrap();
    let newest = stamped.iter().map(|(stamp, _)| *stamp).max().unwrap();
    assert!(seen_through >= newest, "{seen_through} < {newest}");
    assert_eq!(seen.len(), stamped.len(), "the read sees every write");

    let later = store
        .write(|tx| Ok::<_, Error>(tx.stamp()))
        .await
        .unwrap()
        .unwrap();
    assert!(later > seen_through, "a later write is stamped higher");
    store.close().await.unwrap();
}
