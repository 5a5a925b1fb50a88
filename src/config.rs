//! Configuration: command-line flags, then `SAGAD_*` environment variables, then defaults,
//! turned into one validated `Config` before any port is bound. The environment is read through
//! `Environment`, so tests inject it instead of setting process variables.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::domain::ids::{CoordinatorId, NodeId};
use crate::store::Durability;

/// Where environment variables come from.
pub trait Environment {
    /// The variable's value as the OS holds it, which need not be Unicode.
    fn get_os(&self, name: &str) -> Option<OsString>;

    /// The variable's text. A value that is not Unicode is refused rather than taken as unset:
    /// ignoring it would silently start sagad with the default instead of what was meant.
    fn get(&self, name: &'static str) -> Result<Option<String>, Error> {
        match self.get_os(name) {
            None => Ok(None),
            Some(value) => value
                .into_string()
                .map(Some)
                .map_err(|value| Error::Invalid {
                    setting: name,
                    value: value.to_string_lossy().into_owned(),
                    reason: "is not valid UTF-8".to_owned(),
                }),
        }
    }
}

/// The real process environment: the one home of `std::env::var_os`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    #[allow(clippy::disallowed_methods)] // This is the one place allowed to read the environment.
    fn get_os(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

impl Environment for BTreeMap<String, String> {
    fn get_os(&self, name: &str) -> Option<OsString> {
        BTreeMap::get(self, name).map(OsString::from)
    }
}

impl Environment for BTreeMap<String, OsString> {
    fn get_os(&self, name: &str) -> Option<OsString> {
        BTreeMap::get(self, name).cloned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether text logs carry terminal colours: only when stderr is a terminal, and not when
/// `NO_COLOR` is set to anything (no-color.org). Escape codes in a log file or the journal
/// only get in the way of grep.
pub fn log_colours(stderr_is_terminal: bool, env: &dyn Environment) -> bool {
    stderr_is_terminal && env.get_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Everything sagad needs to start, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub coordinator_id: CoordinatorId,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub durability: Durability,
    pub max_payload_bytes: usize,
    pub idempotency_retention: Duration,
    pub shutdown_grace: Duration,
    pub cache_capacity_bytes: u64,
    /// Participant endpoints known from the start: (node id, URL).
    pub nodes: Vec<(String, String)>,
    pub participant_timeout: Duration,
    /// QueryStatus polls of a branch whose outcome is unknown before the saga is escalated.
    pub max_polls: u32,
    /// Finished sagas are removed this long after their last change; zero keeps them.
    pub saga_retention: Duration,
    /// The deadline of a registered-outcall saga started without one; zero gives none.
    pub outcall_saga_timeout: Duration,
    /// How long a connection may stay silent before sagad checks it is still there (an HTTP/2
    /// PING, answered within the same time, and TCP keepalive probes); zero never checks.
    pub keepalive: Duration,
}

impl Config {
    /// The embedded defaults, with the ledger in `data`: what tests start from.
    pub fn with_data(data: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data: data.into(),
            coordinator_id: CoordinatorId::parse(DEFAULT_COORDINATOR_ID)
                .unwrap_or_else(|_| unreachable!("the default coordinator id is valid")),
            log_format: LogFormat::Text,
            log_filter: "info".to_owned(),
            durability: Durability::Durable,
            max_payload_bytes: 1024 * 1024,
            idempotency_retention: Duration::from_secs(7 * 24 * 3600),
            shutdown_grace: Duration::from_secs(10),
            cache_capacity_bytes: 64 * 1024 * 1024,
            nodes: Vec::new(),
            participant_timeout: Duration::from_secs(10),
            max_polls: 10,
            saga_retention: Duration::ZERO,
            outcall_saga_timeout: Duration::from_millis(
                crate::engine::DEFAULT_OUTCALL_SAGA_TIMEOUT_MS,
            ),
            keepalive: Duration::from_secs(30),
        }
    }
}

const DEFAULT_COORDINATOR_ID: &str = "c1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Includes `--help` and `--version`, which clap reports as errors to be printed.
    #[error("{0}")]
    Usage(#[from] clap::Error),
    #[error("{setting} {value:?}: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
}

/// sagad: a saga coordinator. Every flag can also be set by the environment variable named
/// in its help; a flag wins over its variable.
#[derive(Debug, Parser)]
#[command(name = "sagad", version, about, long_about = None)]
struct Flags {
    /// Address to listen on [env: SAGAD_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long)]
    listen: Option<String>,
    /// Ledger folder, created if missing [env: SAGAD_DATA] [default: ./sagad-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Id of this coordinator, carried in every GSN it issues (letters, digits, - and _; at most
    /// 32) [env: SAGAD_COORDINATOR_ID] [default: c1]
    #[arg(long)]
    coordinator_id: Option<String>,
    /// Log format: text or json [env: SAGAD_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
    /// Log filter, e.g. info or sagad=debug [env: SAGAD_LOG] [default: info]
    #[arg(long)]
    log: Option<String>,
    /// durable: answer only after the write survives power loss (flush + fdatasync); relaxed:
    /// answer after it reaches the kernel (survives a sagad crash, not power loss)
    /// [env: SAGAD_DURABILITY] [default: durable]
    #[arg(long)]
    durability: Option<String>,
    /// Largest payload accepted, in bytes [env: SAGAD_MAX_PAYLOAD_BYTES] [default: 1048576]
    #[arg(long)]
    max_payload_bytes: Option<String>,
    /// How long idempotency records are kept after their last change, e.g. 7d, 12h (at least
    /// 1s); 0 keeps them forever [env: SAGAD_IDEMPOTENCY_RETENTION] [default: 7d]
    #[arg(long)]
    idempotency_retention: Option<String>,
    /// How long shutdown waits for in-flight requests [env: SAGAD_SHUTDOWN_GRACE] [default: 10s]
    #[arg(long)]
    shutdown_grace: Option<String>,
    /// Ledger page cache, in MiB [env: SAGAD_CACHE_MB] [default: 64]
    #[arg(long)]
    cache_mb: Option<String>,
    /// A participant's endpoint as NODE=URL, e.g. inventory=http://127.0.0.1:7001; repeat for
    /// more [env: SAGAD_NODES, comma-separated]
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// How long a call to a participant may take before it is retried (at most 24h) [env:
    /// SAGAD_PARTICIPANT_TIMEOUT] [default: 10s]
    #[arg(long)]
    participant_timeout: Option<String>,
    /// QueryStatus polls of a branch whose outcome stays unknown before sagad gives up on its
    /// node and escalates (reverses the saga per its strategy) [env: SAGAD_MAX_POLLS]
    /// [default: 10]
    #[arg(long)]
    max_polls: Option<String>,
    /// Remove finished (COMPLETED or REVERSED) sagas this long after their last change, e.g.
    /// 30d (at least 1s); 0 keeps them forever. Must be longer than the idempotency retention
    /// (which must then not be 0), so a replayed StartSaga never names a removed saga
    /// [env: SAGAD_SAGA_RETENTION] [default: 0]
    #[arg(long)]
    saga_retention: Option<String>,
    /// The deadline a registered-outcall saga gets when StartSaga gives neither deadline nor
    /// timeout, e.g. 2h (at least 1s, at most 366d); 0 gives none. Past it a saga still RUNNING
    /// is reversed: its caller has not completed it and sagad has no steps of its own to time
    /// out [env: SAGAD_OUTCALL_SAGA_TIMEOUT] [default: 24h]
    #[arg(long)]
    outcall_saga_timeout: Option<String>,
    /// How long a client connection may stay silent before sagad checks that its peer is still
    /// there: an HTTP/2 PING, which must be answered within the same time or the connection is
    /// closed and its streams end (so a Subscribe stream whose node vanished without closing it
    /// is not taken for a live one), and TCP keepalive probes. From 1s to 32767s (Linux's
    /// limit for TCP keepalive), or 0 for never [env: SAGAD_KEEPALIVE] [default: 30s]
    #[arg(long)]
    keepalive: Option<String>,
}

/// The longest `--keepalive`: Linux's limit on TCP_KEEPIDLE (MAX_TCP_KEEPIDLE).
const MAX_KEEPALIVE: Duration = Duration::from_secs(32_767);

/// The longest `--participant-timeout`.
const MAX_PARTICIPANT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn node(setting: &'static str, text: &str) -> Result<(String, String), Error> {
    let (id, url) = text.split_once('=').ok_or_else(|| {
        invalid(
            setting,
            text,
            "expected NODE=URL, e.g. inventory=http://127.0.0.1:7001",
        )
    })?;
    let id = id.trim();
    let url = url.trim();
    NodeId::parse(id).map_err(|e| invalid(setting, text, format!("the node id {e}")))?;
    if let Some(problem) = crate::transport::endpoint_problem(url) {
        return Err(invalid(setting, text, format!("the URL {problem}")));
    }
    Ok((id.to_owned(), url.to_owned()))
}

fn pick(
    flag: Option<String>,
    env: &dyn Environment,
    name: &'static str,
) -> Result<Option<(String, &'static str)>, Error> {
    match flag {
        Some(value) => Ok(Some((value, "flag"))),
        None => Ok(env.get(name)?.map(|value| (value, "env"))),
    }
}

fn invalid(setting: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        setting,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn duration(setting: &'static str, value: &str) -> Result<Duration, Error> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            setting,
            value,
            format!("{e} (write it like 30s, 5m, 12h or 7d)"),
        )
    })
}

/// A retention: 0 keeps forever, anything else is at least a second. Retentions are kept in
/// whole milliseconds, where a shorter one such as 500us would become 0, which means forever.
fn retention(setting: &'static str, value: &str) -> Result<Duration, Error> {
    let retention = duration(setting, value)?;
    if !retention.is_zero() && retention < Duration::from_secs(1) {
        return Err(invalid(
            setting,
            value,
            "must be 0 (keep forever) or at least 1s",
        ));
    }
    Ok(retention)
}

impl Config {
    /// Parses flags (`args` includes the program name) with `env` as the fallback.
    pub fn load<I, T>(args: I, env: &dyn Environment) -> Result<Config, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let flags = Flags::try_parse_from(args)?;
        let mut config = Config::with_data("./sagad-data");

        if let Some((value, _)) = pick(flags.listen, env, "SAGAD_LISTEN")? {
            config.listen = value.parse().map_err(|_| {
                invalid(
                    "listen (SAGAD_LISTEN)",
                    &value,
                    "expected IP:PORT, e.g. 127.0.0.1:50051",
                )
            })?;
        }
        if let Some(data) = flags
            .data
            // A path need not be Unicode, so it is taken as the OS gives it.
            .or_else(|| env.get_os("SAGAD_DATA").map(PathBuf::from))
        {
            if data.as_os_str().is_empty() {
                return Err(invalid("data (SAGAD_DATA)", "", "must name a folder"));
            }
            config.data = data;
        }
        if let Some((value, _)) = pick(flags.coordinator_id, env, "SAGAD_COORDINATOR_ID")? {
            config.coordinator_id = CoordinatorId::parse(&value).map_err(|e| {
                invalid(
                    "coordinator-id (SAGAD_COORDINATOR_ID)",
                    &value,
                    e.to_string(),
                )
            })?;
        }
        if let Some((value, _)) = pick(flags.log_format, env, "SAGAD_LOG_FORMAT")? {
            config.log_format = match value.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(invalid(
                        "log-format (SAGAD_LOG_FORMAT)",
                        &value,
                        "expected text or json",
                    ));
                }
            };
        }
        if let Some((value, _)) = pick(flags.log, env, "SAGAD_LOG")? {
            // A filter of no directives parses, and turns every log off without a word: a
            // variable left empty by a template must not silence sagad.
            if value
                .split(',')
                .all(|directive| directive.trim().is_empty())
            {
                return Err(invalid(
                    "log (SAGAD_LOG)",
                    &value,
                    "names no directive (write it like info, or sagad=debug,warn; off to turn logs off)",
                ));
            }
            tracing_subscriber::EnvFilter::try_new(&value).map_err(|e| {
                invalid(
                    "log (SAGAD_LOG)",
                    &value,
                    format!("{e} (write it like info, or sagad=debug,warn)"),
                )
            })?;
            config.log_filter = value;
        }
        if let Some((value, _)) = pick(flags.durability, env, "SAGAD_DURABILITY")? {
            config.durability = match value.as_str() {
                "durable" => Durability::Durable,
                "relaxed" => Durability::Relaxed,
                _ => {
                    return Err(invalid(
                        "durability (SAGAD_DURABILITY)",
                        &value,
                        "expected durable or relaxed",
                    ));
                }
            };
        }
        if let Some((value, _)) = pick(flags.max_payload_bytes, env, "SAGAD_MAX_PAYLOAD_BYTES")? {
            let bytes: usize = value.parse().map_err(|_| {
                invalid(
                    "max-payload-bytes (SAGAD_MAX_PAYLOAD_BYTES)",
                    &value,
                    "expected a whole number of bytes",
                )
            })?;
            // gRPC's own message limit is 4 MiB by default; a payload must fit with its envelope.
            if bytes == 0 || bytes > 3 * 1024 * 1024 {
                return Err(invalid(
                    "max-payload-bytes (SAGAD_MAX_PAYLOAD_BYTES)",
                    &value,
                    "must be between 1 and 3145728 (3 MiB)",
                ));
            }
            config.max_payload_bytes = bytes;
        }
        if let Some((value, _)) = pick(
            flags.idempotency_retention,
            env,
            "SAGAD_IDEMPOTENCY_RETENTION",
        )? {
            config.idempotency_retention = retention(
                "idempotency-retention (SAGAD_IDEMPOTENCY_RETENTION)",
                &value,
            )?;
        }
        if let Some((value, _)) = pick(flags.shutdown_grace, env, "SAGAD_SHUTDOWN_GRACE")? {
            config.shutdown_grace = duration("shutdown-grace (SAGAD_SHUTDOWN_GRACE)", &value)?;
        }
        if let Some((value, _)) = pick(flags.cache_mb, env, "SAGAD_CACHE_MB")? {
            let mb: u64 = value
                .parse()
                .ok()
                .filter(|mb| (1..=65_536).contains(mb))
                .ok_or_else(|| {
                    invalid("cache-mb (SAGAD_CACHE_MB)", &value, "expected 1 to 65536")
                })?;
            config.cache_capacity_bytes = mb * 1024 * 1024;
        }
        let node_texts: Vec<String> = if flags.nodes.is_empty() {
            env.get("SAGAD_NODES")?
                .map(|v| {
                    v.split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            flags.nodes
        };
        for text in node_texts {
            config.nodes.push(node("node (SAGAD_NODES)", &text)?);
        }
        if let Some((value, _)) = pick(flags.participant_timeout, env, "SAGAD_PARTICIPANT_TIMEOUT")?
        {
            const SETTING: &str = "participant-timeout (SAGAD_PARTICIPANT_TIMEOUT)";
            let timeout = duration(SETTING, &value)?;
            // Every call sends it as grpc-timeout, which tonic cannot write for a value of
            // centuries (it panics); and a call still unanswered after a day is lost, not slow:
            // step timeouts and polls are for work that takes longer.
            if timeout.is_zero() || timeout > MAX_PARTICIPANT_TIMEOUT {
                return Err(invalid(
                    SETTING,
                    &value,
                    "must be longer than zero and at most 24h",
                ));
            }
            config.participant_timeout = timeout;
        }
        if let Some((value, _)) = pick(flags.max_polls, env, "SAGAD_MAX_POLLS")? {
            config.max_polls = value
                .parse()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    invalid("max-polls (SAGAD_MAX_POLLS)", &value, "expected 1 to 10000")
                })?;
        }
        if let Some((value, _)) = pick(flags.saga_retention, env, "SAGAD_SAGA_RETENTION")? {
            config.saga_retention = retention("saga-retention (SAGAD_SAGA_RETENTION)", &value)?;
        }
        if let Some((value, _)) = pick(
            flags.outcall_saga_timeout,
            env,
            "SAGAD_OUTCALL_SAGA_TIMEOUT",
        )? {
            const SETTING: &str = "outcall-saga-timeout (SAGAD_OUTCALL_SAGA_TIMEOUT)";
            let timeout = duration(SETTING, &value)?;
            // As StartSaga bounds a client's timeout, and whole seconds at least, since a
            // shorter default would reverse sagas whose callers are still at work.
            if !timeout.is_zero()
                && !(Duration::from_secs(1)..=Duration::from_secs(366 * 24 * 3600))
                    .contains(&timeout)
            {
                return Err(invalid(
                    SETTING,
                    &value,
                    "must be 0 (no default deadline) or from 1s to 366d",
                ));
            }
            config.outcall_saga_timeout = timeout;
        }
        if let Some((value, _)) = pick(flags.keepalive, env, "SAGAD_KEEPALIVE")? {
            const SETTING: &str = "keepalive (SAGAD_KEEPALIVE)";
            let keepalive = duration(SETTING, &value)?;
            // Shorter checks would close connections of healthy clients that are only busy.
            if !keepalive.is_zero() && keepalive < Duration::from_secs(1) {
                return Err(invalid(SETTING, &value, "must be 0 (never) or at least 1s"));
            }
            // It is also the TCP keepalive idle time, which Linux refuses past 32767 s; tonic
            // then only warns, on every connection, and runs it without TCP keepalive.
            if keepalive > MAX_KEEPALIVE {
                return Err(invalid(
                    SETTING,
                    &value,
                    "must be at most 32767s (9h 6m 7s), the longest TCP keepalive idle time \
                     Linux accepts",
                ));
            }
            config.keepalive = keepalive;
        }
        // A replayed StartSaga answers with the GSN its idempotency record keeps; if the saga
        // were removed first, that GSN would name nothing.
        if !config.saga_retention.is_zero()
            && (config.idempotency_retention.is_zero()
                || config.idempotency_retention >= config.saga_retention)
        {
            let kept = if config.idempotency_retention.is_zero() {
                "0 (kept forever)".to_owned()
            } else {
                humantime::format_duration(config.idempotency_retention).to_string()
            };
            return Err(invalid(
                "saga-retention (SAGAD_SAGA_RETENTION)",
                &humantime::format_duration(config.saga_retention).to_string(),
                format!(
                    "must be longer than idempotency-retention (SAGAD_IDEMPOTENCY_RETENTION), \
                     which is {kept}, so a replayed StartSaga never names a removed saga"
                ),
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, &env(&[])));
        assert!(
            !log_colours(false, &env(&[])),
            "a file or the journal gets plain text"
        );
        assert!(!log_colours(true, &env(&[("NO_COLOR", "1")])));
        assert!(
            log_colours(true, &env(&[("NO_COLOR", "")])),
            "empty means unset"
        );
    }

    #[test]
    fn defaults_suit_a_sidecar() {
        let config = Config::load(["sagad"], &env(&[])).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.data, PathBuf::from("./sagad-data"));
        assert_eq!(config.durability, Durability::Durable);
        assert_eq!(config.max_payload_bytes, 1024 * 1024);
    }

    #[test]
    fn environment_fills_in_and_flags_win() {
        let vars = env(&[
            ("SAGAD_LISTEN", "127.0.0.1:7000"),
            ("SAGAD_DATA", "/tmp/x"),
            ("SAGAD_DURABILITY", "relaxed"),
            ("SAGAD_IDEMPOTENCY_RETENTION", "12h"),
        ]);
        let config = Config::load(["sagad", "--listen", "127.0.0.1:7001"], &vars).unwrap();
        assert_eq!(config.listen.port(), 7001);
        assert_eq!(config.data, PathBuf::from("/tmp/x"));
        assert_eq!(config.durability, Durability::Relaxed);
        assert_eq!(config.idempotency_retention, Duration::from_secs(12 * 3600));
    }

    #[test]
    fn bad_values_name_the_setting_and_the_fix() {
        let err = Config::load(["sagad", "--durability", "fast"], &env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("expected durable or relaxed"),
            "{err}"
        );
        let err = Config::load(["sagad"], &env(&[("SAGAD_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("SAGAD_LISTEN"), "{err}");
        let err = Config::load(["sagad", "--coordinator-id", "a b"], &env(&[])).unwrap_err();
        assert!(err.to_string().contains("coordinator-id"), "{err}");
        let err = Config::load(["sagad", "--shutdown-grace", "soon"], &env(&[])).unwrap_err();
        assert!(err.to_string().contains("30s"), "{err}");
        let err = Config::load(["sagad", "--node", "inventory"], &env(&[])).unwrap_err();
        assert!(err.to_string().contains("NODE=URL"), "{err}");
        let err =
            Config::load(["sagad", "--node", "inventory=https://h:1"], &env(&[])).unwrap_err();
        assert!(err.to_string().contains("https is not supported"), "{err}");
    }

    #[test]
    fn an_empty_log_filter_is_refused_naming_sagad_log_instead_of_silencing_every_log() {
        for (args, vars) in [
            (&["sagad"][..], env(&[("SAGAD_LOG", "")])),
            (&["sagad"][..], env(&[("SAGAD_LOG", " , ")])),
            (&["sagad", "--log", ""][..], env(&[])),
            (&["sagad", "--log", ","][..], env(&[("SAGAD_LOG", "info")])),
        ] {
            let err = Config::load(args, &vars).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Invalid {
                        setting: "log (SAGAD_LOG)",
                        ..
                    }
                ),
                "{args:?} {vars:?}: {err}"
            );
            assert!(err.to_string().contains("names no directive"), "{err}");
        }
        let config = Config::load(["sagad", "--log", "off"], &env(&[])).unwrap();
        assert_eq!(
            config.log_filter, "off",
            "turning logs off is said outright"
        );
    }

    #[test]
    fn a_saga_retention_not_longer_than_the_idempotency_retention_is_refused_naming_both() {
        for (args, idempotency) in [
            (&["sagad", "--saga-retention", "1d"][..], "7days"),
            (
                &[
                    "sagad",
                    "--saga-retention",
                    "30d",
                    "--idempotency-retention",
                    "0",
                ][..],
                "0 (kept forever)",
            ),
            (
                &[
                    "sagad",
                    "--saga-retention",
                    "2h",
                    "--idempotency-retention",
                    "2h",
                ][..],
                "2h",
            ),
        ] {
            let err = Config::load(args, &env(&[])).unwrap_err().to_string();
            assert!(
                err.contains("saga-retention")
                    && err.contains("idempotency-retention")
                    && err.contains(idempotency),
                "{args:?}: {err}"
            );
        }
        let config = Config::load(
            ["sagad"],
            &env(&[
                ("SAGAD_SAGA_RETENTION", "30d"),
                ("SAGAD_IDEMPOTENCY_RETENTION", "7d"),
            ]),
        )
        .unwrap();
        assert_eq!(config.saga_retention, Duration::from_secs(30 * 24 * 3600));
        let config = Config::load(["sagad", "--idempotency-retention", "0"], &env(&[])).unwrap();
        assert!(
            config.idempotency_retention.is_zero(),
            "no saga retention: nothing to be longer than"
        );
    }

    #[test]
    fn outcall_sagas_get_a_default_deadline_of_a_day_which_can_be_changed_or_turned_off() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(
            Config::load(["sagad"], &env(&[]))
                .unwrap()
                .outcall_saga_timeout,
            day
        );
        let set = Config::load(["sagad"], &env(&[("SAGAD_OUTCALL_SAGA_TIMEOUT", "2h")])).unwrap();
        assert_eq!(set.outcall_saga_timeout, Duration::from_secs(7200));
        let off = Config::load(["sagad", "--outcall-saga-timeout", "0"], &env(&[])).unwrap();
        assert!(off.outcall_saga_timeout.is_zero());
        for bad in ["500ms", "367d", "soon"] {
            let err = Config::load(["sagad", "--outcall-saga-timeout", bad], &env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("outcall-saga-timeout"), "{bad}: {err}");
        }
    }

    #[test]
    fn connections_are_checked_after_30s_of_silence_unless_configured_otherwise() {
        let load = |args: &[&str]| Config::load(args.iter().copied(), &env(&[]));
        assert_eq!(load(&["sagad"]).unwrap().keepalive, Duration::from_secs(30));
        assert_eq!(
            load(&["sagad", "--keepalive", "2m"]).unwrap().keepalive,
            Duration::from_secs(120)
        );
        assert!(
            load(&["sagad", "--keepalive", "0"])
                .unwrap()
                .keepalive
                .is_zero()
        );
        let err = load(&["sagad", "--keepalive", "10ms"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keepalive") && err.contains("at least 1s"),
            "{err}"
        );
    }

    #[test]
    fn a_keepalive_longer_than_linux_takes_for_tcp_keepalive_is_refused_naming_the_limit() {
        let load = |args: &[&str]| Config::load(args.iter().copied(), &env(&[]));
        assert_eq!(
            load(&["sagad", "--keepalive", "32767s"]).unwrap().keepalive,
            Duration::from_secs(32_767)
        );
        for bad in ["32768s", "10h", "20000y"] {
            let err = load(&["sagad", "--keepalive", bad]).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{bad}: exit 64");
            let err = err.to_string();
            assert!(
                err.contains("keepalive") && err.contains("32767s"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_participant_timeout_over_a_day_is_refused_instead_of_panicking_at_the_first_call() {
        let load = |args: &[&str]| Config::load(args.iter().copied(), &env(&[]));
        assert_eq!(
            load(&["sagad", "--participant-timeout", "24h"])
                .unwrap()
                .participant_timeout,
            Duration::from_secs(24 * 3600)
        );
        for bad in ["0", "25h", "20000y"] {
            let err = load(&["sagad", "--participant-timeout", bad]).unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{bad}: exit 64");
            let err = err.to_string();
            assert!(
                err.contains("participant-timeout") && err.contains("at most 24h"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_retention_under_a_second_is_refused_rather_than_kept_forever() {
        for flag in ["--idempotency-retention", "--saga-retention"] {
            let err = Config::load(["sagad", flag, "500us"], &env(&[]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&flag[2..]) && err.contains("at least 1s"),
                "{err}"
            );
        }
        let config = Config::load(["sagad", "--idempotency-retention", "1s"], &env(&[])).unwrap();
        assert_eq!(config.idempotency_retention, Duration::from_secs(1));
    }

    #[cfg(unix)]
    #[test]
    fn a_variable_that_is_not_utf8_is_refused_naming_it_except_the_data_path() {
        use std::os::unix::ffi::OsStringExt;
        let not_utf8 = || OsString::from_vec(vec![b'd', 0xff, b'x']);
        let vars: BTreeMap<String, OsString> = [("SAGAD_LOG_FORMAT".to_owned(), not_utf8())].into();
        let err = Config::load(["sagad"], &vars).unwrap_err().to_string();
        assert!(
            err.contains("SAGAD_LOG_FORMAT") && err.contains("not valid UTF-8"),
            "{err}"
        );
        let vars: BTreeMap<String, OsString> = [("SAGAD_NODES".to_owned(), not_utf8())].into();
        let err = Config::load(["sagad"], &vars).unwrap_err().to_string();
        assert!(err.contains("SAGAD_NODES"), "{err}");
        let vars: BTreeMap<String, OsString> = [("SAGAD_DATA".to_owned(), not_utf8())].into();
        let config = Config::load(["sagad"], &vars).unwrap();
        assert_eq!(
            config.data.as_os_str(),
            not_utf8(),
            "a path is the OS's bytes"
        );
    }

    #[test]
    fn nodes_come_from_flags_or_the_environment() {
        let config = Config::load(
            ["sagad"],
            &env(&[("SAGAD_NODES", "a=http://127.0.0.1:1, b=http://127.0.0.1:2")]),
        )
        .unwrap();
        assert_eq!(
            config.nodes,
            vec![
                ("a".into(), "http://127.0.0.1:1".into()),
                ("b".into(), "http://127.0.0.1:2".into())
            ]
        );
        let config = Config::load(
            ["sagad", "--node", "c=http://h:3"],
            &env(&[("SAGAD_NODES", "a=http://127.0.0.1:1")]),
        )
        .unwrap();
        assert_eq!(config.nodes, vec![("c".into(), "http://h:3".into())]);
    }
}
