//! The sagad under test: the real binary started as a child process on a temp ledger and an
//! ephemeral loopback port, or a running one named by `--target`. Also temp folders and the
//! bench's client connections.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::stopwatch::now;
use crate::{Error, fail};

/// A folder of our own under the chosen root, removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

static TEMP_DIRS: AtomicU64 = AtomicU64::new(0);

/// What every temp folder of this process is named with.
fn prefix() -> String {
    format!("sagad-bench-{}-", std::process::id())
}

impl TempDir {
    pub fn new(root: &Path, what: &str) -> Result<TempDir, Error> {
        let n = TEMP_DIRS.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{}{what}-{n}", prefix()));
        // A leftover of an earlier run with the same pid is ours to replace.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes this process's temp folders under `root` that are still there: after an
/// interruption, a task stopped late may have written into one after its Drop removed it.
pub fn remove_leftovers(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let ours = prefix();
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&ours) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// How long sagad may take to answer health SERVING, and to exit after SIGTERM.
const START_LIMIT: Duration = Duration::from_secs(20);
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// A sagad child process; killed if dropped while running.
pub struct Sagad {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    log: PathBuf,
}

impl Sagad {
    /// Starts `binary` on `dir/ledger`, logging to `dir/sagad.log`.
    pub fn spawn(
        binary: &Path,
        dir: &Path,
        durability: &str,
        extra: &[String],
    ) -> Result<Sagad, Error> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let data = dir.join("ledger");
        let log = dir.join("sagad.log");
        let child = Command::new(binary)
            .arg("--listen")
            .arg(&listen)
            .arg("--data")
            .arg(&data)
            .arg("--durability")
            .arg(durability)
            .args(extra)
            // SAGAD_* variables in the bench's environment must not change what is measured.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", binary.display())))?;
        Ok(Sagad {
            child,
            url: format!("http://{listen}"),
            data,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until sagad answers health SERVING; fails early, with its log, if it exits.
    pub async fn wait_serving(&mut self) -> Result<(), Error> {
        let started = now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(fail(format!(
                    "sagad exited before serving ({status}); its log ends with:\n{}",
                    self.log_tail()
                )));
            }
            if serving(&self.url).await {
                return Ok(());
            }
            if started.elapsed() > START_LIMIT {
                return Err(fail(format!(
                    "sagad did not answer SERVING within {START_LIMIT:?}; its log ends with:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (sagad drains and closes its ledger), then SIGKILL if it takes too long.
    pub async fn stop(mut self) -> Result<(), Error> {
        // std can only SIGKILL; kill(1) sends the graceful signal without unsafe code.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let started = now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(fail(format!(
                        "sagad exited with {status} on SIGTERM; its log ends with:\n{}",
                        self.log_tail()
                    )))
                };
            }
            if started.elapsed() > STOP_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(fail(format!(
                    "sagad did not stop within {STOP_LIMIT:?} of SIGTERM"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last few KiB of sagad's log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map_or(0, |m| m.len());
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Sagad {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The sagad binary next to this executable (where cargo builds both).
pub fn sibling_binary() -> Result<PathBuf, Error> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| fail("the bench's own executable has no folder"))?;
    let sagad = dir.join("sagad");
    if sagad.is_file() {
        Ok(sagad)
    } else {
        Err(fail(format!(
            "no sagad binary next to sagad-bench (looked for {}); build it with \
             `cargo build --release --bins`, or pass --sagad PATH or --target URL",
            sagad.display()
        )))
    }
}

/// A port free right now; sagad binds it a moment later (a race no other process here runs).
fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How long one call of the bench's own (setup, counters, a connection) may go unanswered:
/// on loopback an answer takes milliseconds, so one missing after this is a wedged sagad, and
/// a bench that waited on it would wait forever. Saga calls have `--saga-timeout` instead.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// `answer`, or an error naming `call` if it has not come within `CALL_DEADLINE`.
pub async fn within<T>(call: &str, answer: impl Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(CALL_DEADLINE, answer)
        .await
        .map_err(|_| fail(format!("{call}: no answer within {CALL_DEADLINE:?}")))
}

async fn serving(url: &str) -> bool {
    let Ok(channel) = connect(url).await else {
        return false;
    };
    let mut health = HealthClient::new(channel);
    let check = health.check(HealthCheckRequest {
        service: String::new(),
    });
    // Short, so a sagad that accepts but never answers still meets START_LIMIT.
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .is_ok_and(|answer| {
            answer.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        })
}

/// One HTTP/2 connection with TCP_NODELAY, as sagad's own clients use.
pub async fn connect(url: &str) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    // connect_timeout bounds the TCP connect; this bounds the HTTP/2 handshake after it.
    Ok(within(&format!("connecting to {url}"), endpoint.connect()).await??)
}

/// `count` separate connections to `url`.
pub async fn connect_many(url: &str, count: usize) -> Result<Vec<Channel>, Error> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        channels.push(connect(url).await?);
    }
    Ok(channels)
}
