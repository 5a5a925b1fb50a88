//! `sagactl retry …`: the retry configuration (S5) from a TOML, YAML or JSON file, the
//! configuration in force, a retry check, and an original's history of retries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use crate::files;
use sagad::grpc::pb;
use sagad::grpc::pb::retries_client::RetriesClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::{failed_request, status_text, time_text};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a new configuration version from a .toml, .yaml/.yml or .json file
    /// (see examples/retry.toml); it replaces the whole configuration.
    Put {
        file: PathBuf,
        /// Idempotency key; repeat it to retry safely (default: a fresh one)
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show the configuration in force, as TOML that `retry put` accepts.
    Get,
    /// Ask sagad whether a failed transaction may be retried now, and record the decision: an
    /// ALLOW issues a retry serial and uses one of the original's retries, so repeat a check
    /// with the same --request-id (printed, also on failure) rather than running a new one.
    Check {
        /// The original transaction's serial number
        #[arg(long)]
        original: String,
        /// The transaction code, e.g. payments.charge
        #[arg(long = "code")]
        transaction_code: String,
        /// The error code the last attempt failed with, e.g. TIMEOUT
        #[arg(long)]
        error: String,
        /// The channel (peripheral system) the transaction came from
        #[arg(long, default_value = "")]
        channel: String,
        /// The Idempotency scope the participant records the transaction under
        #[arg(long, default_value = "")]
        scope: String,
        /// Idempotency key; repeat it to retry safely (default: a fresh one)
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show every retry of an original, given the original or any of its retry serials.
    History { serial: String },
}

pub async fn run(channel: Channel, command: Command) -> Result<(), String> {
    let mut client = RetriesClient::new(channel);
    match command {
        Command::Put { file, request_id } => {
            let config = read_file(&file)?;
            let request_id = request_id.unwrap_or_else(|| fresh_request_id("retry-put"));
            let response = client
                .put_retry_config(pb::PutRetryConfigRequest {
                    request_id: request_id.clone(),
                    config: Some(config),
                })
                .await
                .map_err(|status| failed_request(status, &request_id))?;
            let replayed = response
                .metadata()
                .contains_key(sagad::grpc::REPLAYED_HEADER);
            let version = response.into_inner().config.map_or(0, |c| c.version);
            outln!(
                "stored retry configuration version {version}{}",
                if replayed {
                    "  (replayed: this request_id was already answered)"
                } else {
                    ""
                }
            );
        }
        Command::Get => {
            let config = client
                .get_retry_config(pb::GetRetryConfigRequest {})
                .await
                .map_err(status_text)?
                .into_inner()
                .config
                .ok_or("sagad answered without a configuration")?;
            if config.version == 0 {
                outln!("# version 0: the built-in defaults (no configuration was stored)");
            } else {
                outln!(
                    "# version {}, stored {}",
                    config.version,
                    time_text(&config.updated_at)
                );
            }
            let text = toml::to_string(&FileConfig::from_pb(&config))
                .map_err(|e| format!("cannot show the configuration as TOML: {e}"))?;
            crate::emit(&text);
        }
        Command::Check {
            original,
            transaction_code,
            error,
            channel,
            scope,
            request_id,
        } => {
            let request_id = request_id.unwrap_or_else(|| fresh_request_id("retry-check"));
            let response = client
                .check_retry(pb::CheckRetryRequest {
                    request_id: request_id.clone(),
                    original_serial: original,
                    transaction_code,
                    channel,
                    error_code: error,
                    idempotency_scope: scope,
                })
                .await
                .map_err(|status| failed_request(status, &request_id))?;
            let replayed = response
                .metadata()
                .contains_key(sagad::grpc::REPLAYED_HEADER);
            print_check(&response.into_inner(), &request_id, replayed);
        }
        Command::History { serial } => {
            let history = client
                .get_retry_history(pb::GetRetryHistoryRequest { serial })
                .await
                .map_err(status_text)?
                .into_inner();
            print_history(&history);
        }
    }
    Ok(())
}

/// A request id nobody used before; printed, so the operator can repeat the request safely.
fn fresh_request_id(prefix: &str) -> String {
    format!("sagactl-{prefix}-{:016x}", rand::random::<u64>())
}

fn decision_name(value: i32) -> String {
    pb::RetryDecision::try_from(value)
        .map(|d| {
            d.as_str_name()
                .trim_start_matches("RETRY_DECISION_")
                .to_owned()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn layer_name(value: i32) -> String {
    pb::RetryLayer::try_from(value)
        .map(|l| {
            l.as_str_name()
                .trim_start_matches("RETRY_LAYER_")
                .to_owned()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn print_check(response: &pb::CheckRetryResponse, request_id: &str, replayed: bool) {
    outln!("decision:       {}", decision_name(response.decision));
    if !response.retry_serial.is_empty() {
        outln!("retry serial:   {}", response.retry_serial);
    }
    if response.attempt != 0 {
        outln!("attempt:        {}", response.attempt);
    }
    if let Some(after) = &response.retry_after {
        outln!("retry after:    {}", duration_text(after));
    }
    if response.layer != pb::RetryLayer::Unspecified as i32 {
        outln!("layer:          {}", layer_name(response.layer));
    }
    if !response.stored_response.is_empty() {
        match std::str::from_utf8(&response.stored_response) {
            Ok(text) => outln!("stored response: {text}"),
            Err(_) => outln!("stored response: {} bytes", response.stored_response.len()),
        }
    }
    outln!("config version: {}", response.config_version);
    outln!("reason:         {}", response.reason);
    outln!(
        "request id:     {request_id}{}",
        if replayed {
            "  (replayed: this request_id was already answered)"
        } else {
            ""
        }
    );
}

fn print_history(history: &pb::GetRetryHistoryResponse) {
    outln!("original:    {}", history.original_serial);
    outln!("transaction: {}", history.transaction_code);
    outln!(
        "{:<8} {:<18} {:<32} {:<24} {:<8} DECIDED",
        "ATTEMPT",
        "DECISION",
        "RETRY SERIAL",
        "ERROR",
        "CONFIG"
    );
    for attempt in &history.attempts {
        outln!(
            "{:<8} {:<18} {:<32} {:<24} {:<8} {}",
            attempt.attempt,
            decision_name(attempt.decision),
            if attempt.retry_serial.is_empty() {
                "-"
            } else {
                &attempt.retry_serial
            },
            attempt.error_code,
            attempt.config_version,
            time_text(&attempt.decided_at)
        );
    }
}

// ---- The file format ----

/// A retry configuration as an operator writes it: durations as text ("1s", "500ms", "2m").
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    defaults: FilePolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    transactions: Vec<FileTransaction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    channels: Vec<FileChannel>,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retryable_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backoff_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_interval: Option<String>,
}

/// One transaction registry entry: its code and, beside it, the settings it overrides.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTransaction {
    transaction_code: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retryable_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backoff_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_interval: Option<String>,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChannel {
    channel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    transaction_code: String,
    /// Empty: nothing from this channel is retried. Always written, so that meaning is visible.
    #[serde(default)]
    retryable_codes: Vec<String>,
}

fn read_file(path: &Path) -> Result<pb::RetryConfig, String> {
    let file: FileConfig = files::read(path)?;
    file.to_pb()
        .map_err(|errors| format!("{}: {}", path.display(), errors.join("; ")))
}

/// The tests parse text in each format without a file.
#[cfg(test)]
fn parse(extension: &str, text: &str) -> Result<FileConfig, String> {
    files::parse(extension, text)
}

fn duration(
    field: &str,
    text: Option<&str>,
    errors: &mut Vec<String>,
) -> Option<prost_types::Duration> {
    let text = text?;
    match humantime::parse_duration(text) {
        Ok(d) => Some(prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
        Err(e) => {
            errors.push(format!(
                "{field}: {text:?} is not a duration ({e}); write e.g. \"500ms\", \"1s\" or \"2m\""
            ));
            None
        }
    }
}

fn duration_text(d: &prost_types::Duration) -> String {
    let d = Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    );
    humantime::format_duration(d).to_string()
}

fn policy_pb(
    prefix: &str,
    retryable_codes: &[String],
    max_retries: Option<u32>,
    min_interval: Option<&str>,
    backoff_factor: Option<f64>,
    max_interval: Option<&str>,
    errors: &mut Vec<String>,
) -> pb::RetryPolicy {
    pb::RetryPolicy {
        retryable_codes: retryable_codes.to_vec(),
        max_retries,
        min_interval: duration(&format!("{prefix}.min_interval"), min_interval, errors),
        backoff_factor,
        max_interval: duration(&format!("{prefix}.max_interval"), max_interval, errors),
    }
}

impl FileConfig {
    /// The contract's message; every unreadable duration is reported, with where it is.
    fn to_pb(&self) -> Result<pb::RetryConfig, Vec<String>> {
        let mut errors = Vec::new();
        let d = &self.defaults;
        let defaults = policy_pb(
            "defaults",
            &d.retryable_codes,
            d.max_retries,
            d.min_interval.as_deref(),
            d.backoff_factor,
            d.max_interval.as_deref(),
            &mut errors,
        );
        let transactions = self
            .transactions
            .iter()
            .enumerate()
            .map(|(i, t)| pb::TransactionRetry {
                transaction_code: t.transaction_code.clone(),
                policy: Some(policy_pb(
                    &format!("transactions[{i}]"),
                    &t.retryable_codes,
                    t.max_retries,
                    t.min_interval.as_deref(),
                    t.backoff_factor,
                    t.max_interval.as_deref(),
                    &mut errors,
                )),
            })
            .collect();
        let channels = self
            .channels
            .iter()
            .map(|c| pb::ChannelRetry {
                channel: c.channel.clone(),
                transaction_code: c.transaction_code.clone(),
                retryable_codes: c.retryable_codes.clone(),
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(pb::RetryConfig {
            version: 0,
            defaults: Some(defaults),
            transactions,
            channels,
            updated_at: None,
        })
    }

    fn from_pb(config: &pb::RetryConfig) -> FileConfig {
        let shown = |d: &Option<prost_types::Duration>| d.as_ref().map(duration_text);
        let defaults = config.defaults.clone().unwrap_or_default();
        FileConfig {
            defaults: FilePolicy {
                retryable_codes: defaults.retryable_codes,
                max_retries: defaults.max_retries,
                min_interval: shown(&defaults.min_interval),
                backoff_factor: defaults.backoff_factor,
                max_interval: shown(&defaults.max_interval),
            },
            transactions: config
                .transactions
                .iter()
                .map(|t| {
                    let policy = t.policy.clone().unwrap_or_default();
                    FileTransaction {
                        transaction_code: t.transaction_code.clone(),
                        retryable_codes: policy.retryable_codes,
                        max_retries: policy.max_retries,
                        min_interval: shown(&policy.min_interval),
                        backoff_factor: policy.backoff_factor,
                        max_interval: shown(&policy.max_interval),
                    }
                })
                .collect(),
            channels: config
                .channels
                .iter()
                .map(|c| FileChannel {
                    channel: c.channel.clone(),
                    transaction_code: c.transaction_code.clone(),
                    retryable_codes: c.retryable_codes.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/retry.toml");

    #[test]
    fn the_example_file_reads_with_every_layer() {
        let config = parse("toml", EXAMPLE)
            .expect("the example parses")
            .to_pb()
            .expect("its durations read");
        let defaults = config.defaults.clone().unwrap_or_default();
        assert!(defaults.retryable_codes.contains(&"TIMEOUT".to_owned()));
        assert_eq!(
            defaults.min_interval,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 0
            })
        );
        assert!(!config.transactions.is_empty());
        assert!(
            config
                .channels
                .iter()
                .any(|c| c.transaction_code.is_empty())
        );
        assert!(
            config
                .channels
                .iter()
                .any(|c| !c.transaction_code.is_empty())
        );
    }

    #[test]
    fn toml_yaml_and_json_read_the_same_configuration() {
        let toml_text = r#"
            [defaults]
            retryable_codes = ["TIMEOUT"]
            max_retries = 3
            min_interval = "500ms"
            backoff_factor = 2

            [[transactions]]
            transaction_code = "payments.charge"
            max_interval = "1m"

            [[channels]]
            channel = "mobile"
            retryable_codes = []
        "#;
        let yaml_text = "
defaults:
  retryable_codes: [TIMEOUT]
  max_retries: 3
  min_interval: 500ms
  backoff_factor: 2
transactions:
  - transaction_code: payments.charge
    max_interval: 1m
channels:
  - channel: mobile
    retryable_codes: []
";
        let json_text = r#"{
            "defaults": {"retryable_codes": ["TIMEOUT"], "max_retries": 3,
                         "min_interval": "500ms", "backoff_factor": 2.0},
            "transactions": [{"transaction_code": "payments.charge", "max_interval": "1m"}],
            "channels": [{"channel": "mobile", "retryable_codes": []}]
        }"#;
        let from_toml = parse("toml", toml_text).expect("toml");
        assert_eq!(parse("yaml", yaml_text).expect("yaml"), from_toml);
        assert_eq!(parse("json", json_text).expect("json"), from_toml);
    }

    #[test]
    fn a_bad_duration_and_an_unknown_field_are_reported_with_their_place() {
        let file = parse(
            "toml",
            "[defaults]\nmin_interval = \"soon\"\n[[transactions]]\ntransaction_code = \"t\"\nmax_interval = \"5 parsecs\"\n",
        )
        .expect("parses");
        let errors = file.to_pb().expect_err("durations are bad");
        assert_eq!(errors.len(), 2);
        assert!(errors[0].starts_with("defaults.min_interval"), "{errors:?}");
        assert!(
            errors[1].starts_with("transactions[0].max_interval"),
            "{errors:?}"
        );
        let typo = parse("toml", "[defaults]\nmax_retry = 3\n").expect_err("unknown field");
        assert!(typo.contains("max_retry"), "{typo}");
        assert!(parse("ini", "").is_err());
    }

    #[test]
    fn names_with_spaces_quotes_and_other_scripts_survive_get_and_put() {
        let names = [
            "reserve stock",
            "HTTP 503",
            "charge \"card\" [v2] = 'x' # not a comment",
            "back\\slash",
            "Zahlung prüfen",
            "予約",
        ];
        let policy = pb::RetryPolicy {
            retryable_codes: names.iter().map(|n| (*n).to_owned()).collect(),
            ..pb::RetryPolicy::default()
        };
        let config = pb::RetryConfig {
            version: 0,
            defaults: Some(policy.clone()),
            transactions: names
                .iter()
                .map(|n| pb::TransactionRetry {
                    transaction_code: (*n).to_owned(),
                    policy: Some(policy.clone()),
                })
                .collect(),
            channels: names
                .iter()
                .map(|n| pb::ChannelRetry {
                    channel: (*n).to_owned(),
                    transaction_code: (*n).to_owned(),
                    retryable_codes: policy.retryable_codes.clone(),
                })
                .collect(),
            updated_at: None,
        };
        let shown = toml::to_string(&FileConfig::from_pb(&config)).expect("shows");
        let again = parse("toml", &shown)
            .expect("reparses")
            .to_pb()
            .expect("rereads");
        assert_eq!(again, config, "{shown}");
    }

    #[test]
    fn what_get_shows_is_what_put_reads() {
        let config = parse("toml", EXAMPLE)
            .expect("parses")
            .to_pb()
            .expect("reads");
        let shown = toml::to_string(&FileConfig::from_pb(&config)).expect("shows");
        let again = parse("toml", &shown)
            .expect("reparses")
            .to_pb()
            .expect("rereads");
        assert_eq!(again, config);
    }
}
