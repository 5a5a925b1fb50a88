//! The floors a saga's cost is compared with, measured in the same run at the same
//! concurrency: the smallest unary call sagad serves (grpc.health.v1.Health/Check), sent to the
//! sagad under test on the very connections the sagas use, and the ledger's durable commit rate
//! with group commit (`sagad::store::Store`, C concurrent writers of 200-byte payloads).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sagad::store::{self, PayloadRecord, Store};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::machine;
use crate::stats::percentile_ms;
use crate::stopwatch::now;
use crate::under_test::{CALL_DEADLINE, TempDir, within};
use crate::{Build, Durability, Error, fail};

#[derive(Debug, Clone, Serialize)]
pub struct EchoRun {
    /// The sagad it went to: each build serves its own floor.
    pub build: Build,
    /// As `SagaRun::durability`.
    pub durability: String,
    pub concurrency: usize,
    pub run: usize,
    pub calls: usize,
    pub rpcs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cores used by other processes meanwhile (noise on a shared machine).
    pub other_cores: Option<f64>,
}

/// Half of a run's gRPC floor: its call latencies, how long they took, and the cores other
/// processes used meanwhile.
pub struct EchoHalf {
    latencies_us: Vec<u64>,
    elapsed_s: f64,
    other_cores: Option<f64>,
}

/// `calls` Health/Check calls at `concurrency` over `channels` (to the sagad under test), so
/// the floor pays what a saga's RPCs pay: the same connections, the same server process and
/// its tonic stack, but no saga work. `measured` are the processes whose CPU is not "other",
/// `None` when sagad's is not known: its CPU would count as other load, so none is reported.
/// A run measures one half before its sagas and one after (`EchoRun::bracketing`).
pub async fn echo(
    channels: &[Channel],
    concurrency: usize,
    calls: usize,
    ticks: u64,
    measured: Option<&[String]>,
) -> Result<EchoHalf, Error> {
    let window = measured.map(|pids| machine::Window::open(pids, ticks));
    let next = Arc::new(AtomicUsize::new(0));
    let started = now();
    let mut workers = JoinSet::new();
    for w in 0..concurrency.max(1) {
        let channel = channels
            .get(w % channels.len().max(1))
            .ok_or_else(|| fail("no connection to sagad"))?;
        let mut client = HealthClient::new(channel.clone());
        let next = next.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let sent = now();
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            Ok::<_, Error>(latencies)
        });
    }
    let latencies_us = join_workers(workers, &next, CALL_DEADLINE, "Health/Check").await?;
    Ok(EchoHalf {
        latencies_us,
        elapsed_s: started.elapsed().as_secs_f64(),
        other_cores: window
            .zip(measured)
            .and_then(|(w, pids)| w.other_cores(pids)),
    })
}

/// Every worker's latencies. A worker's error, or `progress` (the calls started) standing
/// still for `deadline`, ends the floor with an error naming `what` and aborts the other
/// workers: left alone they would go on loading sagad or the disk under the next measurement.
async fn join_workers(
    mut workers: JoinSet<Result<Vec<u64>, Error>>,
    progress: &AtomicUsize,
    deadline: Duration,
    what: &str,
) -> Result<Vec<u64>, Error> {
    // In the order they end, so a failed worker is seen at once, not after those before it.
    let joined = async {
        let mut latencies_us = Vec::new();
        while let Some(worker) = workers.join_next().await {
            latencies_us.extend(worker??);
        }
        Ok::<_, Error>(latencies_us)
    };
    let outcome = match while_moving(progress, deadline, joined).await {
        Some(Ok(latencies_us)) => return Ok(latencies_us),
        Some(Err(e)) => fail(format!("{what}: {e}")),
        None => fail(format!("{what}: no answer within {deadline:?}")),
    };
    workers.abort_all();
    Err(outcome)
}

/// `work`, or `None` once `progress` has stood still for `deadline`: a call that never comes
/// back would hang the floor, and a timer armed for every call would add its cost to the floor
/// measured; one look every quarter second costs nothing.
async fn while_moving<T>(
    progress: &AtomicUsize,
    deadline: Duration,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    let mut seen = progress.load(Ordering::Relaxed);
    let mut moved = now();
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                let current = progress.load(Ordering::Relaxed);
                if current != seen {
                    seen = current;
                    moved = now();
                } else if moved.elapsed() > deadline {
                    return None;
                }
            }
        }
    }
}

impl EchoRun {
    /// The floor of a run from its two halves, measured just before and just after its
    /// sagas: this machine's speed drifts between phases minutes apart, and a floor taken on
    /// one side only of a 20-second run was often taken in another phase than the sagas. The
    /// rate is the mean of the halves' rates, so each side weighs the same whatever its length.
    pub fn bracketing(
        build: Build,
        durability: &str,
        concurrency: usize,
        run: usize,
        before: EchoHalf,
        after: EchoHalf,
    ) -> EchoRun {
        // A half with no calls (`--echo-calls 1`) has no rate, rather than a rate of zero.
        let rates: Vec<f64> = [&before, &after]
            .into_iter()
            .filter(|half| !half.latencies_us.is_empty())
            .map(|half| half.latencies_us.len() as f64 / half.elapsed_s.max(1e-9))
            .collect();
        let rpcs_per_s = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        let other_cores = match (before.other_cores, after.other_cores) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            (one, other) => one.or(other),
        };
        let mut latencies = before.latencies_us;
        latencies.extend(after.latencies_us);
        latencies.sort_unstable();
        EchoRun {
            build,
            durability: durability.to_owned(),
            concurrency,
            run,
            calls: latencies.len(),
            rpcs_per_s,
            p50_ms: percentile_ms(&latencies, 0.50),
            p99_ms: percentile_ms(&latencies, 0.99),
            other_cores,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskRun {
    pub durability: Durability,
    pub concurrency: usize,
    pub run: usize,
    pub writes: usize,
    pub commits_per_s: f64,
    /// The store's own count of group flushes (`Store::flush_count`).
    pub flushes: u64,
    pub commits_per_flush: f64,
    /// Device cache flushes per store flush (/proc/diskstats): how many the kernel turns one
    /// fdatasync into, used to read sagad's device flushes as store flushes.
    pub device_flushes_per_flush: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cores used by other processes meanwhile (noise on a shared machine).
    pub other_cores: Option<f64>,
}

/// `writes` one-payload transactions of 200 bytes by `concurrency` writers on a fresh ledger.
pub async fn disk(
    root: &Path,
    durability: Durability,
    concurrency: usize,
    writes: usize,
    run: usize,
    ticks: u64,
) -> Result<DiskRun, Error> {
    let dir = TempDir::new(root, "store")?;
    let mut options = store::Options::new(dir.path.join("ledger"));
    options.durability = durability.store();
    // Store::open blocks (it opens sled and fsyncs the folder): off the async workers, and
    // bounded, as every step of the floor is, so a stalled filesystem fails the bench instead
    // of hanging it.
    let opening = tokio::task::spawn_blocking(move || Store::open(options));
    let store = within("opening the disk floor's ledger", opening).await???;
    let record = PayloadRecord {
        data: vec![b'x'; 200],
        content_type: "application/json".into(),
    };
    let measured = ["self".to_owned()];
    let window = machine::Window::open(&measured, ticks);
    let device_before = machine::device_flushes(&dir.path);
    let flushes_before = store.flush_count();
    let next = Arc::new(AtomicUsize::new(0));
    let started = now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let store = store.clone();
        let next = next.clone();
        let record = record.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= writes {
                    break;
                }
                let record = record.clone();
                let sent = now();
                store
                    .write(move |tx| tx.put_payload(i as u64 + 1, "", &record))
                    .await??;
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            Ok::<_, Error>(latencies)
        });
    }
    let mut latencies =
        join_workers(workers, &next, CALL_DEADLINE, "the disk floor's commits").await?;
    let elapsed = started.elapsed().as_secs_f64();
    let flushes = store.flush_count() - flushes_before;
    let device_after = machine::device_flushes(&dir.path);
    let other_cores = window.other_cores(&measured);
    within("closing the disk floor's ledger", store.close())
        .await?
        .map_err(|e| fail(format!("closing the floor's ledger: {e}")))?;
    latencies.sort_unstable();
    let device = match (device_before, device_after) {
        (Some(before), Some(after)) if flushes > 0 => {
            Some(after.saturating_sub(before) as f64 / flushes as f64)
        }
        _ => None,
    };
    Ok(DiskRun {
        durability,
        concurrency,
        run,
        writes,
        commits_per_s: writes as f64 / elapsed,
        flushes,
        commits_per_flush: writes as f64 / flushes.max(1) as f64,
        device_flushes_per_flush: device,
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        other_cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that never ends unless aborted.
    fn stuck(workers: &mut JoinSet<Result<Vec<u64>, Error>>) -> tokio::task::AbortHandle {
        workers.spawn(std::future::pending())
    }

    /// An abort takes effect at the task's next poll: give it a bounded number of chances.
    async fn ended(task: &tokio::task::AbortHandle) -> bool {
        for _ in 0..100 {
            if task.is_finished() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        task.is_finished()
    }

    #[tokio::test]
    async fn a_floor_worker_that_fails_ends_the_floor_at_once_and_stops_the_others() {
        let mut workers = JoinSet::new();
        let other = stuck(&mut workers);
        workers.spawn(async { Err(fail("disk full")) });
        // A deadline no test waits for: the error must end the floor, not the stall after it.
        let progress = AtomicUsize::new(0);
        let joined = join_workers(workers, &progress, Duration::from_secs(3600), "writes").await;
        let error = joined.err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("writes: disk full"));
        assert!(ended(&other).await);
    }

    #[tokio::test]
    async fn a_floor_whose_workers_stand_still_fails_and_stops_them() {
        let mut workers = JoinSet::new();
        let other = stuck(&mut workers);
        let progress = AtomicUsize::new(0);
        let joined = join_workers(workers, &progress, Duration::from_millis(300), "writes").await;
        let error = joined.err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.starts_with("writes: no answer within")),
            "{error:?}"
        );
        assert!(ended(&other).await);
    }
}
