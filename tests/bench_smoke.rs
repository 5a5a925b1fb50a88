//! Smoke test of the benchmark: a short run of the real `sagad-bench` binary against the real
//! `sagad` must finish and print its report. It asserts nothing about speed; speed is checked
//! by running the benchmark itself (docs/benchmarks.md).

use std::process::Command;

#[test]
fn a_short_benchmark_run_completes_and_prints_its_tables() {
    let work = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_sagad-bench"))
        .args([
            "--sagad",
            env!("CARGO_BIN_EXE_sagad"),
            // The same binary as its own baseline: only the side-by-side report is checked.
            "--baseline",
            env!("CARGO_BIN_EXE_sagad"),
            "--sagas",
            "50",
            "--concurrency",
            "4",
            // Two: with --baseline each build goes first once (an odd count is raised).
            "--runs",
            "2",
            "--warmup",
            "5",
            "--scenarios",
            "success,reversal,outcalls",
            "--echo-calls",
            "500",
            "--disk-writes",
            "200",
            // Other tests run alongside: waiting for an idle machine would only slow this down.
            "--settle",
            "0s",
        ])
        .arg("--work-dir")
        .arg(work.path())
        .output()
        .expect("run sagad-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sagad-bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for header in [
        "| scenario | durability | C | sagas/s | p50 ms | p99 ms | p99.9 ms | RPCs/saga | echo RPC/s | efficiency | failures |",
        "| scenario | durability | C | sagad CPU ms/saga | of it user space | bench CPU ms/saga | sagad peak RSS MiB | ledger bytes/saga | ledger flushes/saga |",
        "| C | echo RPC/s | echo p50 ms | echo p99 ms |",
        "| durability | C | commits/s | commits per flush |",
        "| scenario | durability | C | sagas/s | p50 | p99 | sagad CPU/saga | of it user space |",
    ] {
        assert!(stdout.contains(header), "no {header:?} in:\n{stdout}");
    }
    for row in [
        "| success | durable | 4 |",
        "| reversal | durable | 4 |",
        "| outcalls | durable | 4 |",
        "| success (baseline) | durable | 4 |",
        "| outcalls (baseline) | durable | 4 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    // The calls the participants counted, against the design's (`Scenario::participant_rpcs`):
    // Execute ×2 + Signal ×2; + Reverse; Signal ×3.
    for (scenario, calls) in [
        ("success", "4.00"),
        ("reversal", "5.00"),
        ("outcalls", "3.00"),
    ] {
        for row in [scenario.to_owned(), format!("{scenario} (baseline)")] {
            let cell = cost_cell(&stdout, &row, "participant RPCs/saga");
            let numbers: Vec<&str> = cell
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter(|n| !n.is_empty())
                .collect();
            assert!(
                !numbers.is_empty() && numbers.iter().all(|n| *n == calls),
                "{row}: participant RPCs/saga {cell:?}, not {calls}, in:\n{stdout}"
            );
        }
    }
}

/// The cell of `column` in the row of `label` (durable, C=4) of the cost table.
fn cost_cell(report: &str, label: &str, column: &str) -> String {
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_owned())
            .collect()
    };
    let table = report
        .split_once("### Cost per saga")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no cost table in:\n{report}"));
    let mut lines = table.lines().filter(|line| line.starts_with('|'));
    let header = cells(
        lines
            .next()
            .unwrap_or_else(|| panic!("no header in:\n{table}")),
    );
    let at = header
        .iter()
        .position(|h| h == column)
        .unwrap_or_else(|| panic!("no column {column:?} in {header:?}"));
    let row = lines
        .map(cells)
        .find(|row| {
            row.first().map(String::as_str) == Some(label)
                && row.get(2).map(String::as_str) == Some("4")
        })
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"));
    row[at].clone()
}
