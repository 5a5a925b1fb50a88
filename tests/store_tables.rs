//! The tables added for the engine, strategies and retries: paging through the latest
//! strategies, "latest" reads that honour a job's own writes, and the keys the ledger refuses.
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking"
)]

use sagad::store::{
    Error, Options, RetryConfigRecord, RetryPolicyRecord, Store, StrategyRecord, WriteTx,
};

fn strategy(business_type: &str, version: u64) -> StrategyRecord {
    StrategyRecord {
        business_type: business_type.into(),
        version,
        description: format!("{business_type} v{version}"),
        steps: Vec::new(),
        first_set: Vec::new(),
        rules: Vec::new(),
        end_statuses: Vec::new(),
        abnormal_statuses: Vec::new(),
        status_mappings: Vec::new(),
        exception_scopes: Vec::new(),
        saga_timeout_ms: 0,
        created_ms: version,
    }
}

fn retry_config(version: u64) -> RetryConfigRecord {
    RetryConfigRecord {
        version,
        defaults: RetryPolicyRecord {
            retryable_codes: None,
            max_retries: Some(3),
            min_interval_ms: Some(100),
            backoff_factor_milli: Some(2_000),
            max_interval_ms: None,
        },
        transactions: Vec::new(),
        channels: Vec::new(),
        updated_ms: version,
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    let mut options = Options::new(dir.path().join("ledger"));
    options.cache_capacity_bytes = 4 * 1024 * 1024;
    Store::open(options).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (business type, version) of the latest strategies strictly after `after`, at most `limit`.
async fn page(store: &Store, after: Option<&str>, limit: usize) -> Vec<(String, u64)> {
    let after = after.map(str::to_owned);
    store
        .read(move |tx| {
            tx.latest_strategies(after.as_deref())
                .take(limit)
                .map(|s| s.map(|s| (s.business_type, s.version)))
                .collect::<Result<Vec<_>, Error>>()
        })
        .await
        .unwrap()
        .unwrap()
}

fn latest_strategy(tx: &WriteTx<'_>, business_type: &str) -> Option<u64> {
    tx.strategy(business_type, 0).unwrap().map(|s| s.version)
}

fn latest_config(tx: &WriteTx<'_>) -> Option<u64> {
    tx.retry_config().unwrap().map(|c| c.version)
}

/// Business types page in byte order — which puts "a" before "a\u{1}", "a b" and "ab" even
/// though their keys share a prefix — each with its highest version, whatever the order of
/// the puts, and a page starts strictly after the last business type of the one before.
#[test]
fn latest_strategies_page_in_business_type_order() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = open(&dir);
    let versions: &[(&str, &[u64])] = &[
        ("b", &[1]),
        ("ab", &[2, 1, 3]),
        ("a", &[7, 300, 2]),
        ("a b", &[1, 256]),
        ("a\u{1}", &[4]),
        ("", &[5, 1]),
        ("\u{e9}t\u{e9}", &[1, 2]),
    ];
    for (business_type, list) in versions {
        for &version in *list {
            let record = strategy(business_type, version);
            rt.block_on(store.write(move |tx| tx.put_strategy(&record)))
                .unwrap()
                .unwrap();
        }
    }
    let expected: Vec<(String, u64)> = [
        ("", 5),
        ("a", 300),
        ("a\u{1}", 4),
        ("a b", 256),
        ("ab", 3),
        ("b", 1),
        ("\u{e9}t\u{e9}", 2),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v))
    .collect();

    assert_eq!(rt.block_on(page(&store, None, usize::MAX)), expected);
    for limit in [1, 2, 3] {
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let next = rt.block_on(page(&store, after.as_deref(), limit));
            assert!(next.len() <= limit);
            let Some((last, _)) = next.last().cloned() else {
                break;
            };
            paged.extend(next);
            after = Some(last);
        }
        assert_eq!(paged, expected, "pages of {limit}");
    }

    // Cursors that name no stored business type, including one no business type can be.
    let types_after = |after: &str| {
        let types: Vec<String> = rt
            .block_on(page(&store, Some(after), usize::MAX))
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        types
    };
    assert_eq!(types_after("aa"), ["ab", "b", "\u{e9}t\u{e9}"]);
    assert_eq!(
        types_after("a\0zz"),
        ["a\u{1}", "a b", "ab", "b", "\u{e9}t\u{e9}"]
    );
    assert_eq!(types_after("\0"), types_after(""));
    assert_eq!(types_after("\u{e9}t\u{e9}"), Vec::<String>::new());
    assert_eq!(types_after("\u{10ffff}"), Vec::<String>::new());

    // Specific versions and "latest" through the reader agree with the pages.
    let reads = rt
        .block_on(store.read(|tx| {
            (
                tx.strategy("a", 0).unwrap().map(|s| s.version),
                tx.strategy("a", 7).unwrap().map(|s| s.version),
                tx.strategy("a", 8).unwrap(),
                tx.strategy("a\u{1}", 0).unwrap().map(|s| s.version),
                tx.strategy("missing", 0).unwrap(),
            )
        }))
        .unwrap();
    assert_eq!(reads, (Some(300), Some(7), None, Some(4), None));
    rt.block_on(store.close()).unwrap();
}

/// A job that puts strategy version 3 and then asks for the latest gets version 3, before
/// anything is committed; the same holds for the retry configuration. A rejected job's
/// versions never become the latest for anyone.
#[test]
fn latest_reads_in_a_job_honour_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = open(&dir);
    rt.block_on(store.write(|tx| {
        tx.put_strategy(&strategy("order", 1))?;
        tx.put_strategy(&strategy("order", 2))?;
        // Neighbours on both sides of "order" in key order.
        tx.put_strategy(&strategy("orde", 9))?;
        tx.put_strategy(&strategy("order2", 9))?;
        tx.put_retry_config(&retry_config(2))
    }))
    .unwrap()
    .unwrap();

    let seen = rt
        .block_on(store.write(|tx| {
            let mut seen = vec![(latest_strategy(tx, "order"), latest_config(tx))];
            tx.put_strategy(&strategy("order", 3)).unwrap();
            tx.put_retry_config(&retry_config(3)).unwrap();
            seen.push((latest_strategy(tx, "order"), latest_config(tx)));
            // Rewriting an older version keeps the latest where it is.
            tx.put_strategy(&strategy("order", 1)).unwrap();
            tx.put_retry_config(&retry_config(1)).unwrap();
            seen.push((latest_strategy(tx, "order"), latest_config(tx)));
            Err::<(), _>(seen)
        }))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        seen,
        [(Some(2), Some(2)), (Some(3), Some(3)), (Some(3), Some(3))]
    );

    // Rewriting the stored latest version: the job reads its own value, not the tree's.
    let rewritten = rt
        .block_on(store.write(|tx| {
            let mut record = strategy("order", 2);
            record.description = "rewritten".into();
            tx.put_strategy(&record).unwrap();
            let mut config = retry_config(2);
            config.updated_ms = 99;
            tx.put_retry_config(&config).unwrap();
            Err::<(), _>((
                tx.strategy("order", 0).unwrap().map(|s| s.description),
                tx.retry_config().unwrap().map(|c| c.updated_ms),
            ))
        }))
        .unwrap()
        .unwrap_err();
    assert_eq!(rewritten, (Some("rewritten".to_owned()), Some(99)));

    // The rejected job left nothing: every reader, and the next job, sees version 2.
    let read = rt
        .block_on(store.read(|tx| {
            (
                tx.strategy("order", 0).unwrap().map(|s| s.version),
                tx.strategy("order", 3).unwrap(),
                tx.retry_config().unwrap().map(|c| c.version),
            )
        }))
        .unwrap();
    assert_eq!(read, (Some(2), None, Some(2)));
    let next_job = rt
        .block_on(store.write(|tx| {
            let before = (latest_strategy(tx, "order"), latest_config(tx));
            tx.put_strategy(&strategy("order", 3))?;
            tx.put_retry_config(&retry_config(3))?;
            Ok::<_, Error>((before, latest_strategy(tx, "order"), latest_config(tx)))
        }))
        .unwrap()
        .unwrap();
    assert_eq!(next_job, ((Some(2), Some(2)), Some(3), Some(3)));

    // A business type with no stored version has none in a job either, until the job puts one.
    let fresh = rt
        .block_on(store.write(|tx| {
            let before = latest_strategy(tx, "refund");
            tx.put_strategy(&strategy("refund", 4))?;
            Ok::<_, Error>((before, latest_strategy(tx, "refund")))
        }))
        .unwrap()
        .unwrap();
    assert_eq!(fresh, (None, Some(4)));
    rt.block_on(store.close()).unwrap();
}

/// A business type with 0x00 would make strategy keys ambiguous, and version 0 is how readers
/// ask for the latest: both are refused with a storage error and write nothing, and reading
/// such a business type finds nothing rather than another type's strategy.
#[test]
fn strategies_with_nul_or_version_0_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = open(&dir);
    rt.block_on(store.write(|tx| tx.put_strategy(&strategy("a", 1))))
        .unwrap()
        .unwrap();

    let refused = rt
        .block_on(store.write(|tx| {
            let nul = tx.put_strategy(&strategy("a\0", 2));
            let zero = tx.put_strategy(&strategy("b", 0));
            let reads = (
                tx.strategy("a\0", 0).unwrap(),
                tx.strategy("a\0", 2).unwrap(),
                latest_strategy(tx, "a"),
                latest_strategy(tx, "b"),
            );
            Ok::<_, Error>((nul, zero, reads))
        }))
        .unwrap()
        .unwrap();
    let (nul, zero, reads) = refused;
    assert!(
        matches!(&nul, Err(Error::Storage(m)) if m.contains("0x00")),
        "{nul:?}"
    );
    assert!(
        matches!(&zero, Err(Error::Storage(m)) if m.contains("version 0")),
        "{zero:?}"
    );
    assert_eq!(reads, (None, None, Some(1), None));

    let stored = rt
        .block_on(store.read(|tx| {
            (
                tx.latest_strategies(None)
                    .map(|s| s.map(|s| (s.business_type, s.version)))
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                tx.strategy("a\0", 0).unwrap(),
            )
        }))
        .unwrap();
    assert_eq!(stored, (vec![("a".to_owned(), 1)], None));
    rt.block_on(store.close()).unwrap();
}
