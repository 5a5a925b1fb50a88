//! What the bench reads from the machine and from /proc: the machine's description, a
//! process's CPU time and peak memory, a device's cache-flush count, and the size of a folder
//! on disk. Linux only; every reader returns `None` rather than failing where /proc says nothing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// The machine a run happened on, as the report prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
    /// The filesystem and device holding the ledgers (fsync cost depends on it).
    pub filesystem: String,
    /// `release` or `debug`: a debug build is several times slower and not worth quoting.
    pub build: &'static str,
}

pub fn describe(data_root: &Path) -> Machine {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| kib_field(&text, "MemTotal:"))
        .map_or(0, |kib| kib / 1024);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    Machine {
        cpus,
        cpu_model,
        memory_mib,
        kernel,
        filesystem: filesystem_of(data_root).unwrap_or_else(|| "unknown".to_owned()),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    }
}

/// The mount holding `path` (longest matching mount point), as "ext4 on /dev/vda".
fn filesystem_of(path: &Path) -> Option<String> {
    let path = fs::canonicalize(path).ok()?;
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let point = fields.next()?;
            let kind = fields.next()?;
            path.starts_with(point)
                .then(|| (point.len(), format!("{kind} on {device}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, described)| described)
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks per second of /proc's CPU times: `getconf CLK_TCK`, else Linux's usual 100.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A process's CPU time so far and its peak resident memory.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    /// utime + stime, all threads.
    pub cpu_seconds: f64,
    /// utime alone: the part an instruction count (callgrind) sees; the rest is the kernel's.
    pub user_seconds: f64,
    /// VmHWM: the peak resident set since the process started or `reset_peak_rss`.
    pub peak_rss_bytes: u64,
}

/// Resets a process's VmHWM to its current resident set (`5` to /proc/<pid>/clear_refs,
/// Linux 4.0+; it leaves the pages' referenced bits alone), so a later peak is of what came
/// after. Needs the right to write that file: the process's own user, or root.
pub fn reset_peak_rss(pid: u32) -> io::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` "self" for this process).
pub fn sample(pid: &str, ticks: u64) -> Option<ProcessSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kib = kib_field(&status, "VmHWM:")?;
    Some(ProcessSample {
        cpu_seconds: (utime + stime) as f64 / ticks as f64,
        user_seconds: utime as f64 / ticks as f64,
        peak_rss_bytes: peak_kib * 1024,
    })
}

/// Cache-flush requests the block device holding `path` has completed (/proc/diskstats field
/// 16, kernel 5.5+). Counts the whole device — sled's fdatasyncs and ext4's journal commits of
/// every process — so a delta over an otherwise idle interval is an upper bound on what one
/// process caused. `None` on tmpfs, overlay and other filesystems without a block device.
pub fn device_flushes(path: &Path) -> Option<u64> {
    let dev = fs::metadata(path).ok()?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stats = fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let matches = fields.first()?.parse::<u64>().ok()? == major
            && fields.get(1)?.parse::<u64>().ok()? == minor;
        // major, minor, name, then 17 counters; flush requests completed is the 16th of them.
        matches.then(|| fields.get(18)?.parse().ok()).flatten()
    })
}

/// Space allocated on disk to every file under `path` (what `du` counts), in bytes.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            total += allocated_bytes(&entry.path())?;
        } else {
            // st_blocks is in 512-byte units whatever the filesystem's block size.
            total += metadata.blocks() * 512;
        }
    }
    Ok(total)
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (/proc/stat).
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
}

pub fn machine_cpu() -> Option<MachineCpu> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some(MachineCpu {
        busy: total.saturating_sub(idle),
    })
}

impl MachineCpu {
    /// CPU seconds the whole machine spent busy between `self` and `later`.
    pub fn busy_seconds_until(self, later: MachineCpu, ticks: u64) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / ticks as f64
    }
}

/// Watches how much CPU processes other than the measured ones take during a measurement:
/// on a shared machine a compile next door can halve a result, and the report says so.
pub struct Window {
    machine: Option<MachineCpu>,
    measured: Option<f64>,
    started: std::time::Instant,
    ticks: u64,
}

impl Window {
    /// `measured_pids` are the processes whose CPU is the measurement's own ("self" for this).
    pub fn open(measured_pids: &[String], ticks: u64) -> Window {
        Window {
            machine: machine_cpu(),
            measured: measured_cpu(measured_pids, ticks),
            started: crate::stopwatch::now(),
            ticks,
        }
    }

    /// Average cores used by everything else since `open`.
    pub fn other_cores(&self, measured_pids: &[String]) -> Option<f64> {
        let machine = self.machine?.busy_seconds_until(machine_cpu()?, self.ticks);
        let measured = measured_cpu(measured_pids, self.ticks)? - self.measured?;
        let elapsed = self.started.elapsed().as_secs_f64();
        (elapsed > 0.0).then(|| ((machine - measured) / elapsed).max(0.0))
    }
}

fn measured_cpu(pids: &[String], ticks: u64) -> Option<f64> {
    pids.iter()
        .map(|pid| sample(pid, ticks).map(|s| s.cpu_seconds))
        .sum()
}

/// Busy cores below which the machine counts as idle: background daemons stay under it.
pub const QUIET_CORES: f64 = 0.15;

/// Waits, up to `limit`, until the machine is nearly idle (under 0.15 busy cores over half a
/// second), so a measurement does not start in the middle of someone else's build. Returns
/// the busy cores last seen.
pub async fn settle(limit: std::time::Duration, ticks: u64) -> Option<f64> {
    let started = crate::stopwatch::now();
    loop {
        let before = machine_cpu()?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let busy = before.busy_seconds_until(machine_cpu()?, ticks) / 0.5;
        if busy < QUIET_CORES || started.elapsed() >= limit {
            return Some(busy);
        }
    }
}
