//! sagad-bench: runs real sagas against a real sagad (started here on a temp ledger, or named
//! by --target) with real participant gRPC servers on loopback, and measures sagas per second,
//! latency from the client's view and sagad's cost, next to the floors measured in the same
//! run: a plain tonic unary call and the ledger's durable group commit. See docs/benchmarks.md.
#![allow(clippy::print_stdout)] // A command-line tool: the report on stdout is its output.

mod floors;
mod machine;
mod participant;
mod report;
mod scenario;
mod stats;
mod stopwatch;
mod under_test;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use sagad::grpc::pb::operations_client::OperationsClient;
use sagad::grpc::pb::{GetCountersRequest, GetCountersResponse};
use serde::Serialize;

use crate::participant::Counters;
use crate::report::{Report, SagaRun};
use crate::scenario::{Amount, Failure, Saga, Scenario};
use crate::stats::percentile_ms;
use crate::stopwatch::now;
use crate::under_test::{Sagad, TempDir, within};

/// The bench is a tool: failures carry a message to print, nothing a caller matches on.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub fn fail(message: impl Into<String>) -> Error {
    message.into().into()
}

/// sagad's durability setting, as the bench varies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Answers after flush + fdatasync (survives power loss).
    Durable,
    /// Answers after the flush reaches the kernel (survives a sagad crash).
    Relaxed,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Durable => "durable",
            Durability::Relaxed => "relaxed",
        }
    }

    pub fn store(self) -> sagad::store::Durability {
        match self {
            Durability::Durable => sagad::store::Durability::Durable,
            Durability::Relaxed => sagad::store::Durability::Relaxed,
        }
    }
}

/// Sagas per second, latency and cost of sagad, against the gRPC and disk floors.
#[derive(Debug, Parser)]
#[command(name = "sagad-bench", version, about, long_about = None)]
struct Flags {
    /// Sagas per configuration and run (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    sagas: usize,
    /// Run each configuration for this long instead of a number of sagas, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Sagas in flight at once; a list runs each, e.g. 1,16,64.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// How often each configuration runs; the report quotes the median, min and max. With
    /// --baseline an odd number is raised to the next even one, so each build goes first in
    /// half the runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which paths to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "success,reversal,outcalls"
    )]
    scenarios: Vec<Scenario>,
    /// sagad's --durability; a list runs each (and the disk floor for each).
    #[arg(long, value_delimiter = ',', default_value = "durable")]
    durability: Vec<Durability>,
    /// The sagad binary [default: `sagad` next to this executable].
    #[arg(long, conflicts_with = "target")]
    sagad: Option<PathBuf>,
    /// Also run every configuration against this sagad binary (an earlier build), interleaved
    /// with the one under test in the same run, and report the ratios between the two.
    #[arg(long, conflicts_with = "target")]
    baseline: Option<PathBuf>,
    /// Extra flag for the sagad child, e.g. --sagad-arg=--log=warn; repeat for more.
    #[arg(
        long = "sagad-arg",
        allow_hyphen_values = true,
        conflicts_with = "target"
    )]
    sagad_args: Vec<String>,
    /// Bench a running sagad at this URL (e.g. http://127.0.0.1:50051) instead of starting
    /// one; it must be able to dial this machine's loopback participants.
    #[arg(long)]
    target: Option<String>,
    /// With --target: its process id, to report its CPU, its peak memory (reset before each
    /// configuration) and the other processes' load.
    #[arg(long, requires = "target")]
    target_pid: Option<u32>,
    /// Client connections to sagad, shared by the workers (the sagas' and the gRPC floor's).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Sagas run before each measurement and not counted (connections, caches).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Size of each saga's payload in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// A saga not terminal after this long counts as a failure.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    saga_timeout: Duration,
    /// Calls per run of the gRPC floor: half just before the run's sagas, half just after.
    #[arg(long, default_value_t = 20_000)]
    echo_calls: usize,
    /// Commits per run of the disk floor.
    #[arg(long, default_value_t = 3_000)]
    disk_writes: usize,
    /// Skip the floors (and the efficiency ratio).
    #[arg(long)]
    no_floors: bool,
    /// Where temp ledgers go [default: the system temp dir]; its filesystem sets fsync cost.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Before each measurement, wait up to this long for the machine to be idle (0s: don't).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    settle: Duration,
    /// Also write every run, unsummarised, as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sagad-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = flags.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    // The run's futures own the temp folders and sagad children, and their Drops remove and
    // kill them: dropping the run on SIGINT or SIGTERM cleans up where the default action
    // (exit at once) would leave a sagad running and hundreds of MB of ledgers behind.
    let ran = runtime.block_on(async {
        tokio::select! {
            ran = run(flags, root.clone()) => Ok(ran),
            signal = interrupted() => Err(signal),
        }
    });
    match ran {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("sagad-bench: {e}");
            // Dropping the runtime would wait for its blocking tasks without end, and one may
            // be the disk floor's Store::open stalled on the filesystem the error is about.
            runtime.shutdown_timeout(Duration::from_secs(5));
            ExitCode::FAILURE
        }
        Err((name, code)) => {
            // Tasks the run spawned (participants, load workers, the disk floor's writers)
            // hold no sagad, but may still hold files in the folders: stop them first.
            runtime.shutdown_timeout(Duration::from_secs(5));
            under_test::remove_leftovers(&root);
            eprintln!(
                "sagad-bench: stopped by {name}; its sagad processes and temp folders are gone"
            );
            ExitCode::from(code)
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM, with the signal's name and the exit code a shell
/// gives a process it ended (128 + its number); never if they cannot be caught.
async fn interrupted() -> (&'static str, u8) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!(
            "sagad-bench: cannot catch SIGINT and SIGTERM; if stopped by one, it leaves its temp folders and a sagad behind"
        );
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => ("SIGINT", 130),
        _ = term.recv() => ("SIGTERM", 143),
    }
}

/// What every configuration shares.
struct Bench {
    flags: Flags,
    root: PathBuf,
    sagad: Option<PathBuf>,
    ticks: u64,
}

/// Which sagad a run measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// The sagad under test (`--sagad`, the sibling binary, or `--target`).
    Tested,
    /// `--baseline`.
    Baseline,
}

impl Bench {
    fn binary(&self, build: Build) -> Option<&PathBuf> {
        match build {
            Build::Tested => self.sagad.as_ref(),
            Build::Baseline => self.flags.baseline.as_ref(),
        }
    }

    fn builds(&self, run: usize, configuration: usize) -> Vec<Build> {
        builds_in_order(self.flags.baseline.is_some(), run, configuration)
    }
}

/// The builds of the `configuration`-th configuration (from 0) of `run` (from 1), in the
/// order they run, so a drift of the machine, or an advantage of going first or second,
/// favours neither build. Which goes first alternates from one configuration to the next and,
/// for each configuration, from one run to the next: with an even number of runs
/// (`balanced_runs`), each build goes first in half the runs of every configuration, so
/// neither the row's median nor the ratio between the builds leans on the order. A single
/// counter over every configuration of every run would not do: with an even number of
/// configurations per run, each configuration would keep its order in every run.
fn builds_in_order(baseline: bool, run: usize, configuration: usize) -> Vec<Build> {
    if !baseline {
        vec![Build::Tested]
    } else if (run + configuration) % 2 == 1 {
        vec![Build::Tested, Build::Baseline]
    } else {
        vec![Build::Baseline, Build::Tested]
    }
}

/// The runs to make of each configuration: `--runs`, raised to the next even number with
/// `--baseline`, so each build can go first in half of them (`builds_in_order`). Raised rather
/// than refused: the default of 3 would otherwise refuse every `--baseline` run left at it.
fn balanced_runs(runs: usize, baseline: bool) -> usize {
    if baseline && runs % 2 == 1 {
        runs + 1
    } else {
        runs
    }
}

/// Refuses the flags that would measure nothing yet print a report that looks like a result.
fn check(flags: &Flags) -> Result<(), Error> {
    if flags.runs == 0 || flags.concurrency.contains(&0) {
        return Err(fail("--runs and every --concurrency must be at least 1"));
    }
    if flags.duration.is_none() && flags.sagas == 0 {
        return Err(fail(
            "--sagas must be at least 1 (or give --duration instead)",
        ));
    }
    if flags.duration.is_some_and(|d| d.is_zero()) {
        return Err(fail("--duration must be longer than 0s"));
    }
    // Half the calls go before the sagas and half after: with fewer than 2 one half has no
    // rate, and with none the efficiency would be divided by a floor of 0.
    if !flags.no_floors && flags.echo_calls < 2 {
        return Err(fail(
            "--echo-calls must be at least 2 (half before the sagas, half after), or give --no-floors",
        ));
    }
    if !flags.no_floors && flags.disk_writes == 0 {
        return Err(fail(
            "--disk-writes must be at least 1, or give --no-floors",
        ));
    }
    Ok(())
}

/// Runs the matrix, prints the report; `Ok(false)` if any saga failed.
async fn run(mut flags: Flags, root: PathBuf) -> Result<bool, Error> {
    check(&flags)?;
    let runs = balanced_runs(flags.runs, flags.baseline.is_some());
    if runs != flags.runs {
        eprintln!(
            "sagad-bench: --runs {} raised to {runs}: with --baseline each build must go first in \
             as many runs of each configuration as the other, or the order would lean its medians",
            flags.runs
        );
        flags.runs = runs;
    }
    let sagad = match (&flags.target, &flags.sagad) {
        (Some(_), _) => None,
        (None, Some(path)) => Some(path.clone()),
        (None, None) => Some(under_test::sibling_binary()?),
    };
    let machine = machine::describe(&root);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let bench = Bench {
        root,
        sagad,
        ticks: machine::clock_ticks(),
        flags,
    };
    let flags = &bench.flags;
    let mut report = Report {
        machine,
        command,
        sagad: match (&bench.sagad, &flags.target) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(url)) => format!("running at {url}"),
            (None, None) => String::new(),
        },
        baseline: flags
            .baseline
            .as_ref()
            .map(|path| path.display().to_string()),
        sagas: Vec::new(),
        echo: Vec::new(),
        disk: Vec::new(),
        unavailable: BTreeMap::new(),
    };
    let modes: Vec<Option<Durability>> = match flags.target {
        Some(_) => vec![None],
        None => flags.durability.iter().copied().map(Some).collect(),
    };
    // Runs are the outer loop, so a slow drift of the machine (or a neighbour's build) spreads
    // over every configuration instead of landing on one.
    for run in 1..=flags.runs {
        let mut configuration = 0;
        for &concurrency in &flags.concurrency {
            if !flags.no_floors {
                for &durability in &flags.durability {
                    eprintln!(
                        "sagad-bench: run {run}: disk floor, {} at C={concurrency}",
                        durability.name()
                    );
                    settle(&bench).await;
                    report.disk.push(
                        floors::disk(
                            &bench.root,
                            durability,
                            concurrency,
                            flags.disk_writes,
                            run,
                            bench.ticks,
                        )
                        .await?,
                    );
                }
            }
            for &mode in &modes {
                for &scenario in &flags.scenarios {
                    let builds = bench.builds(run, configuration);
                    configuration += 1;
                    for build in builds {
                        let which = report::label(scenario, build);
                        if report.unavailable.contains_key(&which) {
                            continue;
                        }
                        let label = mode.map_or("target", Durability::name);
                        eprintln!("sagad-bench: run {run}: {which} / {label} / C={concurrency}");
                        settle(&bench).await;
                        match point(&bench, scenario, mode, concurrency, run, build).await? {
                            Point::Measured(mut measured, echo) => {
                                if let Some(echo) = echo {
                                    measured.echo_rpcs_per_s = Some(echo.rpcs_per_s);
                                    measured.efficiency = Some(
                                        measured.sagas_per_s * f64::from(scenario.rpcs_per_saga())
                                            / echo.rpcs_per_s,
                                    );
                                    report.echo.push(echo);
                                }
                                report.sagas.push(*measured);
                            }
                            Point::Unavailable(why) => {
                                eprintln!(
                                    "sagad-bench: {which} is not available in this build: {why}"
                                );
                                report.unavailable.insert(which, why);
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{}", report.markdown());
    if let Some(path) = &flags.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    let mut failed = false;
    for run in &report.sagas {
        for (phase, failures, first) in [
            ("", run.failures, &run.first_failure),
            (
                " in the warm-up",
                run.warmup_failures,
                &run.warmup_first_failure,
            ),
        ] {
            if failures > 0 {
                failed = true;
                eprintln!(
                    "sagad-bench: {}: {failures} sagas failed{phase}; first: {}",
                    run.name(),
                    first.as_deref().unwrap_or("?")
                );
            }
        }
    }
    Ok(!failed)
}

/// Waits for an idle machine before a measurement (see `--settle`), saying so if it is not.
async fn settle(bench: &Bench) {
    if bench.flags.settle.is_zero() {
        return;
    }
    if let Some(busy) = machine::settle(bench.flags.settle, bench.ticks).await
        && busy >= machine::QUIET_CORES
    {
        eprintln!(
            "sagad-bench: the machine is still busy ({busy:.2} cores used by other processes); measuring anyway"
        );
    }
}

enum Point {
    /// The run, and the gRPC floor measured on its connections just before it.
    Measured(Box<SagaRun>, Option<floors::EchoRun>),
    Unavailable(String),
}

/// A snapshot of everything measured from outside the saga loop.
struct Sample {
    sagad: Option<machine::ProcessSample>,
    bench: Option<machine::ProcessSample>,
    device_flushes: Option<u64>,
    participant_calls: u64,
}

/// `ledger` is where sagad keeps its ledger, `None` for a `--target` (the bench does not know
/// it): then no device flushes are counted, since those of the `--work-dir` disk would be
/// another disk's, or this one's without sagad's writes.
fn sample(
    bench: &Bench,
    pid: Option<u32>,
    ledger: Option<&std::path::Path>,
    nodes: &[&Counters],
) -> Sample {
    Sample {
        sagad: pid.and_then(|pid| machine::sample(&pid.to_string(), bench.ticks)),
        bench: machine::sample("self", bench.ticks),
        device_flushes: ledger.and_then(machine::device_flushes),
        participant_calls: nodes.iter().map(|n| n.total()).sum(),
    }
}

/// Waits until the participants have received `expected` calls (the signals of the last
/// sagas go out after they are terminal), or until the count stops moving.
async fn drain(nodes: &[&Counters], expected: u64) {
    const STILL_FOR: Duration = Duration::from_millis(1500);
    const AT_MOST: Duration = Duration::from_secs(15);
    let started = now();
    let mut last = 0;
    let mut last_change = now();
    loop {
        let total: u64 = nodes.iter().map(|n| n.total()).sum();
        if total >= expected || started.elapsed() > AT_MOST {
            return;
        }
        if total != last {
            last = total;
            last_change = now();
        } else if last_change.elapsed() > STILL_FOR {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Participant calls still missing once the last drain is over, of the `per_saga` sagad makes
/// for each of `sagas`. Calls beyond that (redeliveries) are no shortfall.
fn missing_calls(per_saga: u64, sagas: usize, received: u64) -> u64 {
    (per_saga * sagas as u64).saturating_sub(received)
}

/// One run of one configuration on a fresh sagad (or the target).
async fn point(
    bench: &Bench,
    scenario: Scenario,
    mode: Option<Durability>,
    concurrency: usize,
    run: usize,
    build: Build,
) -> Result<Point, Error> {
    let flags = &bench.flags;
    let dir = TempDir::new(&bench.root, "sagad")?;
    let (mut child, url, pid) = match (bench.binary(build), mode, &flags.target) {
        (Some(binary), Some(durability), _) => {
            let mut child = Sagad::spawn(binary, &dir.path, durability.name(), &flags.sagad_args)?;
            child.wait_serving().await?;
            let url = child.url.clone();
            let pid = child.pid();
            (Some(child), url, Some(pid))
        }
        (_, _, Some(url)) => (None, url.clone(), flags.target_pid),
        _ => return Err(fail("neither a sagad binary nor a --target")),
    };
    let ledger = child.as_ref().map(|c| c.data.clone());
    let ledger_before = ledger
        .as_deref()
        .and_then(|l| machine::allocated_bytes(l).ok());

    let inventory = participant::Running::start().await?;
    let payment = participant::Running::start().await?;
    let orders = participant::Running::start().await?;
    let counters = [
        inventory.counters.as_ref(),
        payment.counters.as_ref(),
        orders.counters.as_ref(),
    ];
    let channels = under_test::connect_many(&url, flags.connections).await?;
    let first = channels
        .first()
        .ok_or_else(|| fail("no connection to sagad"))?;
    let label = mode.map_or("target", Durability::name);
    let nonce = format!(
        "{}-{}-{label}-c{concurrency}-r{run}",
        std::process::id(),
        scenario.name()
    );
    scenario::set_up(
        first,
        &nonce,
        &[
            (scenario::INVENTORY, inventory.endpoint()),
            (scenario::PAYMENT, payment.endpoint()),
            (scenario::ORDERS, orders.endpoint()),
        ],
    )
    .await?;
    let saga = |phase: &str| {
        Arc::new(Saga {
            scenario,
            payload: scenario::payload(scenario, flags.payload_bytes),
            timeout: flags.saga_timeout,
            prefix: format!("bench-{nonce}-{phase}"),
        })
    };

    // A running target's VmHWM is its peak since it started, every earlier configuration's
    // included; reset, it is this configuration's, as a fresh child's is.
    let peak_rss_since_target_start = match (&child, pid) {
        (None, Some(pid)) => match machine::reset_peak_rss(pid) {
            Ok(()) => false,
            Err(e) => {
                eprintln!(
                    "sagad-bench: cannot reset the target's peak RSS (/proc/{pid}/clear_refs: {e}); \
                     the report gives its peak since it started"
                );
                true
            }
        },
        _ => false,
    };
    // One saga alone first: it tells a scenario this build cannot run apart from a failure.
    match saga("probe")
        .run(&mut CoordinatorClient::new(first.clone()), 0)
        .await
    {
        Ok(_) => {}
        Err(Failure::Unimplemented(why)) => {
            if let Some(child) = child.take() {
                child.stop().await?;
            }
            return Ok(Point::Unavailable(why));
        }
        Err(Failure::Other(why)) => {
            let log = child.as_ref().map(|c| c.log_tail()).unwrap_or_default();
            return Err(fail(format!(
                "the first {} saga failed: {why}\nsagad's log ends with:\n{log}",
                scenario.name()
            )));
        }
    }
    let mut started_sagas = 1;
    // A saga that fails in the warm-up fails the bench like a measured one: it is the same
    // path on the same sagad, and a wrong ending there says the results are of a broken run.
    let mut warm = match flags.warmup {
        0 => scenario::Load::default(),
        sagas => {
            let amount = Amount::Sagas(sagas);
            scenario::drive(&channels, saga("warmup"), concurrency, amount).await?
        }
    };
    unimplemented_midway(&mut warm, "warm-up")?;
    started_sagas += warm.latencies_us.len() + warm.failures;
    let per_saga = scenario.participant_rpcs();
    drain(&counters, started_sagas as u64 * per_saga).await;

    let measured_pids: Vec<String> = pid
        .map(|p| p.to_string())
        .into_iter()
        .chain(["self".to_owned()])
        .collect();
    // Without sagad's pid its CPU would count as "other": report nothing rather than that.
    let known_pids = pid.map(|_| measured_pids.as_slice());
    // Half of the floor's calls before the sagas and half after (`EchoRun::bracketing`).
    let echo_before = if flags.no_floors {
        None
    } else {
        settle(bench).await;
        Some(
            floors::echo(
                &channels,
                concurrency,
                flags.echo_calls / 2,
                bench.ticks,
                known_pids,
            )
            .await?,
        )
    };
    let mut operations = OperationsClient::new(first.clone());
    let flushes_before = ledger_flushes(&mut operations).await?;
    let window = known_pids.map(|pids| machine::Window::open(pids, bench.ticks));
    let before = sample(bench, pid, ledger.as_deref(), &counters);
    let amount = match flags.duration {
        Some(limit) => Amount::For(limit),
        None => Amount::Sagas(flags.sagas),
    };
    let mut load = scenario::drive(&channels, saga("run"), concurrency, amount).await?;
    unimplemented_midway(&mut load, "run")?;
    let measured = load.latencies_us.len() + load.failures;
    started_sagas += measured;
    drain(&counters, started_sagas as u64 * per_saga).await;
    let after = sample(bench, pid, ledger.as_deref(), &counters);
    let participant_rpcs_missing = missing_calls(per_saga, started_sagas, after.participant_calls);
    let flushes_after = ledger_flushes(&mut operations).await?;
    let other_cores = window
        .zip(known_pids)
        .and_then(|(w, pids)| w.other_cores(pids));
    let echo = match echo_before {
        None => None,
        Some(before) => {
            let after = floors::echo(
                &channels,
                concurrency,
                flags.echo_calls - flags.echo_calls / 2,
                bench.ticks,
                known_pids,
            )
            .await?;
            Some(floors::EchoRun::bracketing(
                build,
                label,
                concurrency,
                run,
                before,
                after,
            ))
        }
    };

    if let Some(child) = child.take() {
        child.stop().await?;
    }
    let ledger_after = ledger
        .as_deref()
        .and_then(|l| machine::allocated_bytes(l).ok());

    let n = measured.max(1) as f64;
    let cpu_ms = |b: Option<machine::ProcessSample>, a: Option<machine::ProcessSample>| {
        Some((a?.cpu_seconds - b?.cpu_seconds) * 1000.0 / n)
    };
    let user_ms = |b: Option<machine::ProcessSample>, a: Option<machine::ProcessSample>| {
        Some((a?.user_seconds - b?.user_seconds) * 1000.0 / n)
    };
    load.latencies_us.sort_unstable();
    let latencies = &load.latencies_us;
    let seconds = load.elapsed.as_secs_f64();
    let measured_run = SagaRun {
        scenario,
        durability: label.to_owned(),
        build,
        concurrency,
        run,
        sagas: latencies.len(),
        failures: load.failures,
        seconds,
        sagas_per_s: latencies.len() as f64 / seconds,
        p50_ms: percentile_ms(latencies, 0.50),
        p99_ms: percentile_ms(latencies, 0.99),
        p999_ms: p999_ms(latencies),
        max_ms: percentile_ms(latencies, 1.0),
        rpcs_per_saga: scenario.rpcs_per_saga(),
        participant_rpcs_per_saga: (after.participant_calls - before.participant_calls) as f64 / n,
        participant_rpcs_missing,
        sagad_cpu_ms_per_saga: cpu_ms(before.sagad, after.sagad),
        sagad_user_cpu_ms_per_saga: user_ms(before.sagad, after.sagad),
        bench_cpu_ms_per_saga: cpu_ms(before.bench, after.bench),
        sagad_peak_rss_mib: after
            .sagad
            .map(|s| s.peak_rss_bytes as f64 / (1024.0 * 1024.0)),
        peak_rss_since_target_start,
        ledger_bytes_per_saga: match (ledger_before, ledger_after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / started_sagas as f64),
            _ => None,
        },
        device_flushes_per_saga: match (before.device_flushes, after.device_flushes) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / n),
            _ => None,
        },
        ledger_flushes_per_saga: match (flushes_before, flushes_after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / n),
            _ => None,
        },
        other_cores,
        echo_rpcs_per_s: None,
        efficiency: None,
        first_failure: load.first_failure,
        warmup_failures: warm.failures,
        warmup_first_failure: warm.first_failure,
    };
    // A warning, not a failure: every saga was seen to end right, and the calls most likely
    // missing are Signals, sent after the end and possibly still on their way when the drain
    // gave up on a loaded machine. But the report's calls per saga, and the efficiency
    // counted from the design's, then overstate what sagad did: say so.
    if participant_rpcs_missing > 0 {
        eprintln!(
            "sagad-bench: warning: {}: {participant_rpcs_missing} of {} participant calls had not come when the drain ended",
            measured_run.name(),
            per_saga * started_sagas as u64,
        );
    }
    Ok(Point::Measured(Box::new(measured_run), echo))
}

/// The 99.9th percentile of sorted latencies, none from fewer than 1,000: it would be the
/// maximum under another name.
fn p999_ms(sorted_us: &[u64]) -> Option<f64> {
    (sorted_us.len() >= 1000).then(|| percentile_ms(sorted_us, 0.999))
}

/// The probe saga ran, so an UNIMPLEMENTED later in `phase` is sagad failing, not a scenario
/// this build lacks.
fn unimplemented_midway(load: &mut scenario::Load, phase: &str) -> Result<(), Error> {
    match load.unimplemented.take() {
        Some(why) => Err(fail(format!(
            "sagad answered UNIMPLEMENTED in the middle of the {phase}: {why}"
        ))),
        None => Ok(()),
    }
}

/// sagad's count of durable ledger flushes (Operations.GetCounters), if it exports one.
async fn ledger_flushes(
    operations: &mut OperationsClient<tonic::transport::Channel>,
) -> Result<Option<u64>, Error> {
    let counters = operations.get_counters(GetCountersRequest {});
    flush_count(
        within("GetCounters", counters)
            .await?
            .map(|a| a.into_inner()),
    )
}

/// The `ledger_flushes` counter of a GetCounters answer. Only UNIMPLEMENTED (an older baseline,
/// without the call) means there is no figure; any other error is this run failing, and taking
/// it for a build without counters would hide it behind an n/a.
fn flush_count(answer: Result<GetCountersResponse, tonic::Status>) -> Result<Option<u64>, Error> {
    match answer {
        Ok(counters) => Ok(counters
            .counters
            .into_iter()
            .find(|counter| counter.name == "ledger_flushes")
            .map(|counter| counter.value)),
        Err(status) if status.code() == tonic::Code::Unimplemented => Ok(None),
        Err(status) => Err(fail(format!("GetCounters failed: {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tested_first(run: usize, configuration: usize) -> bool {
        builds_in_order(true, run, configuration).first() == Some(&Build::Tested)
    }

    #[test]
    fn each_configuration_alternates_which_build_goes_first_from_run_to_run() {
        // Two configurations per run: an even count, where one counter over all would not.
        for configuration in 0..2 {
            let firsts: Vec<bool> = (1..=4)
                .map(|run| tested_first(run, configuration))
                .collect();
            assert_eq!(firsts.iter().filter(|&&t| t).count(), 2, "{firsts:?}");
            assert!(firsts.windows(2).all(|w| w[0] != w[1]), "{firsts:?}");
        }
    }

    #[test]
    fn within_one_run_consecutive_configurations_alternate_which_build_goes_first() {
        for run in 1..=3 {
            for configuration in 0..3 {
                assert_ne!(
                    tested_first(run, configuration),
                    tested_first(run, configuration + 1)
                );
            }
        }
    }

    #[test]
    fn with_a_baseline_each_build_goes_first_in_half_the_runs_of_every_configuration() {
        for asked in 1..=5 {
            let runs = balanced_runs(asked, true);
            assert!(runs >= asked, "--runs {asked}");
            for configuration in 0..5 {
                let tested = (1..=runs)
                    .filter(|&run| tested_first(run, configuration))
                    .count();
                assert_eq!(
                    tested * 2,
                    runs,
                    "--runs {asked}, configuration {configuration}"
                );
            }
        }
    }

    #[test]
    fn an_odd_number_of_runs_is_raised_to_the_next_even_one_only_with_a_baseline() {
        assert_eq!(balanced_runs(1, true), 2);
        assert_eq!(balanced_runs(3, true), 4);
        assert_eq!(balanced_runs(4, true), 4);
        assert_eq!(balanced_runs(3, false), 3);
    }

    #[test]
    fn a_run_short_of_participant_calls_counts_the_missing_ones() {
        assert_eq!(missing_calls(4, 101, 400), 4);
        assert_eq!(missing_calls(3, 10, 0), 30);
    }

    #[test]
    fn every_call_or_more_than_expected_is_no_shortfall() {
        assert_eq!(missing_calls(4, 101, 404), 0);
        // Redeliveries: more calls than the design's.
        assert_eq!(missing_calls(5, 10, 57), 0);
    }

    #[test]
    fn a_build_without_get_counters_has_no_ledger_flush_figure() {
        let answer = Err(tonic::Status::unimplemented("no Operations service"));
        assert_eq!(flush_count(answer).ok(), Some(None));
    }

    #[test]
    fn any_other_get_counters_error_fails_the_run() {
        let answer = Err(tonic::Status::unavailable("ledger fault"));
        let error = flush_count(answer).err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("ledger fault")),
            "{error:?}"
        );
    }

    #[test]
    fn a_build_with_counters_gives_its_ledger_flushes() {
        let answer = Ok(GetCountersResponse {
            counters: vec![sagad::grpc::pb::Counter {
                name: "ledger_flushes".to_owned(),
                value: 42,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(flush_count(answer).ok(), Some(Some(42)));
    }

    fn checked(args: &[&str]) -> Result<(), String> {
        let flags =
            Flags::try_parse_from(["sagad-bench"].iter().chain(args)).map_err(|e| e.to_string())?;
        check(&flags).map_err(|e| e.to_string())
    }

    #[test]
    fn no_sagas_is_refused_rather_than_reported_as_a_row_of_zeros() {
        let refused = checked(&["--sagas", "0"]);
        assert!(refused.is_err_and(|e| e.contains("--sagas must be at least 1")));
        assert_eq!(checked(&["--sagas", "0", "--duration", "2s"]), Ok(()));
        assert!(checked(&["--duration", "0s"]).is_err());
    }

    #[test]
    fn fewer_than_two_echo_calls_are_refused_unless_the_floors_are_off() {
        for calls in ["0", "1"] {
            let refused = checked(&["--echo-calls", calls]);
            assert!(refused.is_err_and(|e| e.contains("--echo-calls must be at least 2")));
            assert_eq!(checked(&["--echo-calls", calls, "--no-floors"]), Ok(()));
        }
        assert_eq!(checked(&["--echo-calls", "2"]), Ok(()));
        assert!(checked(&["--disk-writes", "0"]).is_err());
    }

    #[test]
    fn p99_9_is_not_quoted_from_fewer_than_1000_sagas() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(p999_ms(&samples[..999]), None);
        assert_eq!(p999_ms(&samples), Some(999.0));
    }

    #[test]
    fn without_a_baseline_only_the_tested_build_runs() {
        assert_eq!(builds_in_order(false, 1, 0), vec![Build::Tested]);
        assert_eq!(builds_in_order(false, 2, 1), vec![Build::Tested]);
    }
}
