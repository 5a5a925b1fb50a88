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
            "success,reversal",
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
        "| success (baseline) | durable | 4 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}
