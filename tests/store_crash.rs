//! Crash safety of the ledger's write groups with the real sled underneath: a child process
//! keeps writing jobs of several keys that must always agree, and is killed with SIGKILL at
//! arbitrary moments; after each kill the ledger reopens with every job whole and nothing that
//! was acknowledged lost.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise; that is what unwrap is for here.

use sagad::store::{Durability, Options, PayloadRecord, Store};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Set (to the ledger folder) only in the child this test starts.
const CHILD_ENV: &str = "SAGAD_STORE_CRASH_CHILD";
/// Concurrent writers in the child, so that groups hold several jobs.
const WRITERS: u64 = 8;
/// Keys each job writes, all to the same round number.
const KEYS: u64 = 6;
/// Large enough that a job spans a good part of a log buffer, so a kill can cut one.
const VALUE_BYTES: usize = 3_000;
/// Kills, one per round: with the intent records switched off, about half the runs of this
/// test find a torn job.
const ROUNDS: u64 = 30;

/// How long round `round` lets the child write after its first acknowledgement: 5–300 ms.
fn kill_after(round: u64) -> Duration {
    Duration::from_millis(5 + (round * 137) % 296)
}

/// The ledger folder when this process is the child.
#[allow(
    clippy::disallowed_methods,
    reason = "the parent hands the child its folder through the environment, read once here"
)]
fn child_folder() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

fn options(path: &Path) -> Options {
    let mut options = Options::new(path);
    options.durability = Durability::Durable;
    options
}

/// Writer `w`'s key `k`: payload `(w * 100 + k, "")`.
fn sequence(writer: u64, key: u64) -> u64 {
    writer * 100 + key
}

fn record(round: u64) -> PayloadRecord {
    let mut data = round.to_be_bytes().to_vec();
    data.resize(VALUE_BYTES, (round % 251) as u8);
    PayloadRecord {
        data,
        content_type: String::new(),
    }
}

fn round_of(record: &PayloadRecord) -> u64 {
    u64::from_be_bytes(record.data[..8].try_into().unwrap())
}

/// `writer round` as the child prints it once a round is durable.
fn acknowledgement(line: &str) -> Option<(u64, u64)> {
    let (writer, round) = line.split_once(' ')?;
    Some((writer.parse().ok()?, round.parse().ok()?))
}

/// Each writer's keys as stored: the rounds they hold, key by key (`None` when absent).
async fn stored(store: &Store) -> BTreeMap<u64, Vec<Option<u64>>> {
    store
        .read(|tx| {
            (0..WRITERS)
                .map(|writer| {
                    let rounds = (0..KEYS)
                        .map(|key| {
                            let found = tx.payload(sequence(writer, key), "").unwrap();
                            found.as_ref().map(round_of)
                        })
                        .collect();
                    (writer, rounds)
                })
                .collect()
        })
        .await
        .unwrap()
}

/// The child: writes round after round until it is killed, printing `writer round` once a
/// round is durable.
#[test]
fn child_writes_until_killed() {
    let Some(path) = child_folder() else {
        return;
    };
    let store = Store::open(options(&path)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let start = stored(&store).await;
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..WRITERS {
            let store = store.clone();
            let mut round = start[&writer][0].unwrap_or(0);
            writers.spawn(async move {
                loop {
                    round += 1;
                    let value = record(round);
                    store
                        .write(move |tx| -> Result<(), sagad::store::Error> {
                            for key in 0..KEYS {
                                tx.put_payload(sequence(writer, key), "", &value)?;
                            }
                            Ok(())
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    println!("{writer} {round}");
                }
            });
        }
        // The writers only stop when the parent kills this process, or when one panics.
        if let Some(Err(panicked)) = writers.join_next().await {
            std::panic::resume_unwind(panicked.into_panic());
        }
    });
}

#[test]
fn sigkill_never_leaves_a_write_half_done_or_loses_an_acknowledged_one() {
    if child_folder().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_writes_until_killed", "--exact", "--nocapture"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_to, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_to.send(line).is_err() {
                    break;
                }
            }
        });
        // The kill is timed from the first acknowledged round (the test harness prints its own
        // lines first), so that every round really writes.
        let mut seen = Vec::new();
        while seen.is_empty() {
            let line = lines.recv_timeout(Duration::from_secs(30)).unwrap();
            seen.extend(acknowledgement(&line));
        }
        std::thread::sleep(kill_after(round));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        seen.extend(lines.try_iter().filter_map(|line| acknowledgement(&line)));
        for (writer, round) in seen {
            let best = acknowledged.entry(writer).or_default();
            *best = (*best).max(round);
        }

        let store = Store::open(options(&path)).unwrap();
        let after = runtime.block_on(stored(&store));
        for (writer, rounds) in &after {
            let first = rounds[0];
            assert!(
                rounds.iter().all(|round| *round == first),
                "writer {writer}'s job is half done after kill {round}: {rounds:?}"
            );
            let kept = first.unwrap_or(0);
            let answered = acknowledged.get(writer).copied().unwrap_or(0);
            assert!(
                kept >= answered,
                "writer {writer} was told round {answered} was durable, but the ledger holds {kept}"
            );
        }
        runtime.block_on(store.close()).unwrap();
    }
    assert!(
        acknowledged.values().all(|round| *round > 0),
        "every writer got writes acknowledged: {acknowledged:?}"
    );
}
