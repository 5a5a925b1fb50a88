//! The report: one markdown document (machine, command, results, floors) printed to stdout so
//! docs/benchmarks.md can be refreshed by pasting, and optionally every run as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::Build;
use crate::floors::{DiskRun, EchoRun};
use crate::machine::Machine;
use crate::scenario::Scenario;
use crate::stats::Spread;

/// One run of one configuration (scenario, durability, concurrency, build).
#[derive(Debug, Clone, Serialize)]
pub struct SagaRun {
    pub scenario: Scenario,
    /// "durable", "relaxed", or "target" for a running sagad named by --target.
    pub durability: String,
    pub build: Build,
    pub concurrency: usize,
    pub run: usize,
    pub sagas: usize,
    pub failures: usize,
    pub seconds: f64,
    pub sagas_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// None from fewer than 1,000 sagas, where it would only be the maximum.
    pub p999_ms: Option<f64>,
    pub max_ms: f64,
    /// The RPCs one saga takes by the scenario's design (see `Scenario::rpcs_explained`).
    pub rpcs_per_saga: u32,
    /// Calls the participant servers received per saga, counted.
    pub participant_rpcs_per_saga: f64,
    /// Participant calls of every saga started on this sagad (probe and warm-up too) that had
    /// not come when the last drain ended: a run that may overstate what sagad did.
    pub participant_rpcs_missing: u64,
    pub sagad_cpu_ms_per_saga: Option<f64>,
    /// Of it, user space: what a change to sagad's own code moves; the kernel's share (sockets,
    /// futexes, fdatasync) mostly does not.
    pub sagad_user_cpu_ms_per_saga: Option<f64>,
    /// The bench process's CPU (client and participants) per saga.
    pub bench_cpu_ms_per_saga: Option<f64>,
    /// VmHWM at the end of the measured phase: since this configuration's sagad started, or
    /// since the bench reset a `--target`'s peak; since the target started where it could not.
    pub sagad_peak_rss_mib: Option<f64>,
    /// The peak is the target's since it started, every earlier configuration's included.
    pub peak_rss_since_target_start: bool,
    pub ledger_bytes_per_saga: Option<f64>,
    /// Device cache flushes per saga, whole device (an upper bound; see `machine`).
    pub device_flushes_per_saga: Option<f64>,
    /// sagad's durable ledger flushes per saga (its `ledger_flushes` counter), exact.
    pub ledger_flushes_per_saga: Option<f64>,
    /// Cores used by processes other than sagad and the bench meanwhile (shared-machine noise).
    pub other_cores: Option<f64>,
    pub echo_rpcs_per_s: Option<f64>,
    /// sagas/s × RPCs per saga ÷ echo RPCs/s at the same concurrency, on the same sagad and
    /// connections, measured half just before the sagas and half just after.
    pub efficiency: Option<f64>,
    pub first_failure: Option<String>,
    /// Sagas of the warm-up that failed: not in `failures`, but they fail the bench too.
    pub warmup_failures: usize,
    pub warmup_first_failure: Option<String>,
}

impl SagaRun {
    /// Which configuration and run it was, for the lines that single one out.
    pub fn name(&self) -> String {
        format!(
            "{} / {} / C={} run {}",
            label(self.scenario, self.build),
            self.durability,
            self.concurrency,
            self.run
        )
    }

    /// What the tables do not show of this run and a reader must know to trust it.
    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.participant_rpcs_missing > 0 {
            notes.push(format!(
                "{} participant calls short of {} per saga started when the drain ended",
                self.participant_rpcs_missing,
                self.scenario.participant_rpcs()
            ));
        }
        if self.warmup_failures > 0 {
            notes.push(format!(
                "{} sagas failed in the warm-up (not in the failures column); first: {}",
                self.warmup_failures,
                self.warmup_first_failure.as_deref().unwrap_or("?")
            ));
        }
        notes
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub sagad: String,
    /// The `--baseline` binary, if one ran beside it.
    pub baseline: Option<String>,
    pub sagas: Vec<SagaRun>,
    pub echo: Vec<EchoRun>,
    pub disk: Vec<DiskRun>,
    /// Scenarios this sagad cannot run, with what it answered.
    pub unavailable: BTreeMap<String, String>,
}

/// A number with thousands separators and `decimals` decimals.
fn number(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    let text = format!("{:.*}", decimals, value.abs());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let mut grouped = String::new();
    for (i, digit) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    if fraction.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{fraction}")
    }
}

/// "median (min–max)" over the runs, or just the value for one run.
fn cell(values: impl IntoIterator<Item = f64>, decimals: usize) -> String {
    match Spread::of(values) {
        None => "n/a".into(),
        Some(s) if s.runs == 1 => number(s.median, decimals),
        Some(s) => format!(
            "{} ({}–{})",
            number(s.median, decimals),
            number(s.min, decimals),
            number(s.max, decimals)
        ),
    }
}

fn optional(values: impl IntoIterator<Item = Option<f64>>, decimals: usize) -> String {
    cell(values.into_iter().flatten(), decimals)
}

/// Enough decimals to show a latency in ms without noise.
const MS: usize = 2;

/// Marks a peak RSS that is a `--target`'s since it started.
const LIFETIME: &str = "†";

fn peak_rss(runs: &[&SagaRun]) -> String {
    let peak = optional(runs.iter().map(|r| r.sagad_peak_rss_mib), 1);
    if runs.iter().any(|r| r.peak_rss_since_target_start) {
        format!("{peak} {LIFETIME}")
    } else {
        peak
    }
}

/// How a scenario's rows are named: the baseline's carry "(baseline)".
pub fn label(scenario: Scenario, build: Build) -> String {
    match build {
        Build::Tested => scenario.name().to_owned(),
        Build::Baseline => format!("{} (baseline)", scenario.name()),
    }
}

/// How the gRPC floor table names the sagad a row measured.
fn build_name(build: Build) -> &'static str {
    match build {
        Build::Tested => "this build",
        Build::Baseline => "baseline",
    }
}

type Key = (Scenario, String, usize, Build);

/// The gRPC floor's runs by (durability, C, build): each build serves its own floor, so one
/// row over both would quote a median and a spread of neither; the build comes last so the
/// two builds' rows of a configuration stand together.
fn echo_groups(runs: &[EchoRun]) -> BTreeMap<(String, usize, Build), Vec<&EchoRun>> {
    let mut groups: BTreeMap<_, Vec<&EchoRun>> = BTreeMap::new();
    for run in runs {
        groups
            .entry((run.durability.clone(), run.concurrency, run.build))
            .or_default()
            .push(run);
    }
    groups
}

impl Report {
    fn groups(&self) -> BTreeMap<Key, Vec<&SagaRun>> {
        let mut groups: BTreeMap<_, Vec<&SagaRun>> = BTreeMap::new();
        for run in &self.sagas {
            groups
                .entry((
                    run.scenario,
                    run.durability.clone(),
                    run.concurrency,
                    run.build,
                ))
                .or_default()
                .push(run);
        }
        groups
    }

    /// Each configuration measured on both builds: the tested build's median over the
    /// baseline's, for throughput, latency and sagad's CPU per saga.
    fn against_baseline(&self, out: &mut String, groups: &BTreeMap<Key, Vec<&SagaRun>>) {
        let median = |runs: &[&SagaRun], f: &dyn Fn(&SagaRun) -> Option<f64>| {
            Spread::of(runs.iter().filter_map(|r| f(r))).map(|s| s.median)
        };
        let mut rows = Vec::new();
        for ((scenario, durability, c, build), tested) in groups {
            if *build != Build::Tested {
                continue;
            }
            let key = (*scenario, durability.clone(), *c, Build::Baseline);
            let Some(baseline) = groups.get(&key) else {
                continue;
            };
            let ratio = |f: &dyn Fn(&SagaRun) -> Option<f64>| match (
                median(tested, f),
                median(baseline, f),
            ) {
                (Some(t), Some(b)) if b > 0.0 => format!("{}×", number(t / b, 2)),
                _ => "n/a".into(),
            };
            rows.push(format!(
                "| {} | {durability} | {c} | {} | {} | {} | {} | {} |",
                scenario.name(),
                ratio(&|r| Some(r.sagas_per_s)),
                ratio(&|r| Some(r.p50_ms)),
                ratio(&|r| Some(r.p99_ms)),
                ratio(&|r| r.sagad_cpu_ms_per_saga),
                ratio(&|r| r.sagad_user_cpu_ms_per_saga),
            ));
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### Against the baseline: this build ÷ baseline, medians of the same run\n"
        );
        let _ = writeln!(
            out,
            "| scenario | durability | C | sagas/s | p50 | p99 | sagad CPU/saga | of it user space |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "### Machine\n");
        let _ = writeln!(
            out,
            "- {} CPUs ({}), {} MiB memory, Linux {}",
            m.cpus,
            m.cpu_model,
            number(m.memory_mib as f64, 0),
            m.kernel
        );
        let _ = writeln!(out, "- ledgers on {}", m.filesystem);
        let _ = writeln!(out, "- {} build; sagad: {}", m.build, self.sagad);
        if let Some(baseline) = &self.baseline {
            let _ = writeln!(out, "- baseline: {baseline}, run beside it");
        }
        let _ = writeln!(out, "- command: `{}`\n", self.command);

        let groups = self.groups();
        let runs = groups.values().map(Vec::len).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "### Sagas (client view){}\n",
            if runs > 1 {
                format!("; median (min–max) of {runs} runs")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "| scenario | durability | C | sagas/s | p50 ms | p99 ms | p99.9 ms | RPCs/saga | echo RPC/s | efficiency | failures |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for ((scenario, durability, c, build), runs) in &groups {
            let _ = writeln!(
                out,
                "| {} | {durability} | {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
                label(*scenario, *build),
                cell(runs.iter().map(|r| r.sagas_per_s), 0),
                cell(runs.iter().map(|r| r.p50_ms), MS),
                cell(runs.iter().map(|r| r.p99_ms), MS),
                optional(runs.iter().map(|r| r.p999_ms), MS),
                scenario.rpcs_per_saga(),
                optional(runs.iter().map(|r| r.echo_rpcs_per_s), 0),
                optional(runs.iter().map(|r| r.efficiency), 2),
                runs.iter().map(|r| r.failures).sum::<usize>(),
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "### Cost per saga\n");
        let _ = writeln!(
            out,
            "| scenario | durability | C | sagad CPU ms/saga | of it user space | bench CPU ms/saga | sagad peak RSS MiB | ledger bytes/saga | ledger flushes/saga | device flushes/saga | participant RPCs/saga | other load (cores) |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for ((scenario, durability, c, build), runs) in &groups {
            let _ = writeln!(
                out,
                "| {} | {durability} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                label(*scenario, *build),
                optional(runs.iter().map(|r| r.sagad_cpu_ms_per_saga), 3),
                optional(runs.iter().map(|r| r.sagad_user_cpu_ms_per_saga), 3),
                optional(runs.iter().map(|r| r.bench_cpu_ms_per_saga), 3),
                peak_rss(runs),
                optional(runs.iter().map(|r| r.ledger_bytes_per_saga), 0),
                optional(runs.iter().map(|r| r.ledger_flushes_per_saga), 3),
                optional(runs.iter().map(|r| r.device_flushes_per_saga), 2),
                cell(runs.iter().map(|r| r.participant_rpcs_per_saga), 2),
                optional(runs.iter().map(|r| r.other_cores), 2),
            );
        }
        let _ = writeln!(out);
        let mut rpcs: Vec<Scenario> = groups.keys().map(|k| k.0).collect();
        rpcs.dedup();
        for scenario in rpcs {
            let _ = writeln!(
                out,
                "- RPCs/saga for {}: {}",
                scenario.name(),
                scenario.rpcs_explained()
            );
        }
        if self.sagas.iter().any(|r| r.peak_rss_since_target_start) {
            let _ = writeln!(
                out,
                "- {LIFETIME}: the target's peak RSS since it started, not this configuration's (the bench could not reset it through /proc/PID/clear_refs)"
            );
        }
        for (scenario, why) in &self.unavailable {
            let _ = writeln!(out, "- {scenario}: not available in this build ({why})");
        }
        for run in &self.sagas {
            for note in run.notes() {
                let _ = writeln!(out, "- {}: {note}", run.name());
            }
        }
        let _ = writeln!(out);
        self.against_baseline(&mut out, &groups);
        self.floors(&mut out);
        out
    }

    fn floors(&self, out: &mut String) {
        if !self.echo.is_empty() {
            let _ = writeln!(
                out,
                "### gRPC floor: grpc.health.v1.Health/Check to the sagad under test, on the sagas' connections\n"
            );
            let _ = writeln!(
                out,
                "| sagad | durability | C | echo RPC/s | echo p50 ms | echo p99 ms | other load (cores) |"
            );
            let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
            for ((durability, c, build), runs) in &echo_groups(&self.echo) {
                let _ = writeln!(
                    out,
                    "| {} | {durability} | {c} | {} | {} | {} | {} |",
                    build_name(*build),
                    cell(runs.iter().map(|r| r.rpcs_per_s), 0),
                    cell(runs.iter().map(|r| r.p50_ms), 3),
                    cell(runs.iter().map(|r| r.p99_ms), 3),
                    optional(runs.iter().map(|r| r.other_cores), 2),
                );
            }
            let _ = writeln!(
                out,
                "\n- a row: every run of every scenario on that sagad, durability and C\n"
            );
        }
        if !self.disk.is_empty() {
            let mut disk: BTreeMap<(String, usize), Vec<&DiskRun>> = BTreeMap::new();
            for run in &self.disk {
                disk.entry((run.durability.name().to_owned(), run.concurrency))
                    .or_default()
                    .push(run);
            }
            let _ = writeln!(
                out,
                "### Disk floor: ledger commits with group commit (200-byte payload, C writers)\n"
            );
            let _ = writeln!(
                out,
                "| durability | C | commits/s | commits per flush | commit p50 ms | commit p99 ms | device flushes per store flush | other load (cores) |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for ((durability, c), runs) in &disk {
                let _ = writeln!(
                    out,
                    "| {durability} | {c} | {} | {} | {} | {} | {} | {} |",
                    cell(runs.iter().map(|r| r.commits_per_s), 0),
                    cell(runs.iter().map(|r| r.commits_per_flush), 1),
                    cell(runs.iter().map(|r| r.p50_ms), 3),
                    cell(runs.iter().map(|r| r.p99_ms), 3),
                    optional(runs.iter().map(|r| r.device_flushes_per_flush), 2),
                    optional(runs.iter().map(|r| r.other_cores), 2),
                );
            }
            let _ = writeln!(
                out,
                "\n- the floor's ledgers are on the `--work-dir` disk (the system temp folder's without it), which need not be a `--target`'s\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(number(1234567.0, 0), "1,234,567");
        assert_eq!(number(999.0, 0), "999");
        assert_eq!(number(1234.5678, 2), "1,234.57");
        assert_eq!(number(-1234.0, 0), "-1,234");
        assert_eq!(cell([3.0, 1.0, 2.0], 0), "2 (1–3)");
        assert_eq!(cell([3.0], 1), "3.0");
    }

    fn echo(build: Build, durability: &str, concurrency: usize, rpcs_per_s: f64) -> EchoRun {
        EchoRun {
            build,
            durability: durability.to_owned(),
            concurrency,
            run: 1,
            calls: 100,
            rpcs_per_s,
            p50_ms: 0.1,
            p99_ms: 0.2,
            other_cores: None,
        }
    }

    fn clean_run() -> SagaRun {
        SagaRun {
            scenario: Scenario::Success,
            durability: "durable".to_owned(),
            build: Build::Baseline,
            concurrency: 4,
            run: 2,
            sagas: 100,
            failures: 0,
            seconds: 1.0,
            sagas_per_s: 100.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            p999_ms: Some(3.0),
            max_ms: 4.0,
            rpcs_per_saga: 6,
            participant_rpcs_per_saga: 4.0,
            participant_rpcs_missing: 0,
            sagad_cpu_ms_per_saga: None,
            sagad_user_cpu_ms_per_saga: None,
            bench_cpu_ms_per_saga: None,
            sagad_peak_rss_mib: None,
            peak_rss_since_target_start: false,
            ledger_bytes_per_saga: None,
            device_flushes_per_saga: None,
            ledger_flushes_per_saga: None,
            other_cores: None,
            echo_rpcs_per_s: None,
            efficiency: None,
            first_failure: None,
            warmup_failures: 0,
            warmup_first_failure: None,
        }
    }

    #[test]
    fn a_clean_run_has_no_note() {
        assert!(clean_run().notes().is_empty());
    }

    #[test]
    fn missing_participant_calls_and_warm_up_failures_are_noted_under_the_table() {
        let run = SagaRun {
            participant_rpcs_missing: 3,
            warmup_failures: 2,
            warmup_first_failure: Some("saga 7 ended Reversed".to_owned()),
            ..clean_run()
        };
        assert_eq!(run.name(), "success (baseline) / durable / C=4 run 2");
        assert_eq!(
            run.notes(),
            vec![
                "3 participant calls short of 4 per saga started when the drain ended",
                "2 sagas failed in the warm-up (not in the failures column); first: saga 7 ended Reversed",
            ]
        );
    }

    #[test]
    fn echo_floor_rows_keep_builds_and_durabilities_apart() {
        let runs = [
            echo(Build::Tested, "durable", 4, 1.0),
            echo(Build::Baseline, "durable", 4, 10.0),
            echo(Build::Tested, "relaxed", 4, 100.0),
            echo(Build::Tested, "durable", 4, 2.0),
            echo(Build::Tested, "durable", 16, 1000.0),
        ];
        let rates: Vec<_> = echo_groups(&runs)
            .into_iter()
            .map(|((durability, c, build), rows)| {
                let rates: Vec<f64> = rows.iter().map(|r| r.rpcs_per_s).collect();
                (durability, c, build, rates)
            })
            .collect();
        assert_eq!(
            rates,
            vec![
                ("durable".to_owned(), 4, Build::Tested, vec![1.0, 2.0]),
                ("durable".to_owned(), 4, Build::Baseline, vec![10.0]),
                ("durable".to_owned(), 16, Build::Tested, vec![1000.0]),
                ("relaxed".to_owned(), 4, Build::Tested, vec![100.0]),
            ]
        );
    }
}
