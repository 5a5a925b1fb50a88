//! `sagactl strategy …`: put a fulfillment strategy from a TOML, YAML or JSON file, get one, list them.
//!
//! The file mirrors the `Strategy` message field for field (snake_case, as in the proto; the
//! camelCase names grpcurl prints are accepted too, so its output can be saved and put back),
//! with durations written like "30s" or "1m30s" and meanings like "ABNORMAL". The file is only
//! parsed here: sagad validates it, and every problem it finds is printed with its field.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use crate::{emit, files, status_text};
use prost::Message;
use sagad::grpc::pb;
use sagad::grpc::pb::strategies_client::StrategiesClient;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic_types::StatusExt;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a strategy from a .toml, .yaml/.yml or .json file as the new version of its
    /// business type.
    Put {
        file: PathBuf,
        /// Idempotency key. Default: derived from the strategy's content, so putting the same
        /// strategy again is answered with the version already stored.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show a strategy: the latest version, or the one given.
    Get {
        business_type: String,
        /// The version to show; 0 (the default) is the latest.
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// Print it as a TOML strategy file instead, ready to edit and put again.
        #[arg(long)]
        toml: bool,
    },
    /// List the latest version of every strategy.
    List,
}

pub async fn run(channel: Channel, command: Command) -> Result<(), String> {
    let mut client = StrategiesClient::new(channel);
    match command {
        Command::Put { file, request_id } => put(&mut client, &file, request_id).await,
        Command::Get {
            business_type,
            version,
            toml,
        } => {
            let strategy = client
                .get_strategy(pb::GetStrategyRequest {
                    business_type,
                    version,
                })
                .await
                .map_err(status_text)?
                .into_inner()
                .strategy
                .ok_or("sagad answered without a strategy")?;
            if toml {
                let file = StrategyFile::from_pb(&strategy);
                let text = toml::to_string_pretty(&file)
                    .map_err(|e| format!("cannot write the strategy as TOML: {e}"))?;
                emit(&text);
            } else {
                emit(&describe(&strategy));
            }
            Ok(())
        }
        Command::List => list(&mut client).await,
    }
}

async fn put(
    client: &mut StrategiesClient<Channel>,
    file: &Path,
    request_id: Option<String>,
) -> Result<(), String> {
    let strategy = read_file(file)?;
    let request_id = request_id.unwrap_or_else(|| content_request_id(&strategy));
    let response = client
        .put_strategy(pb::PutStrategyRequest {
            request_id: request_id.clone(),
            strategy: Some(strategy),
        })
        .await
        .map_err(|status| refused(file, status))?;
    let replayed = response
        .metadata()
        .contains_key(sagad::grpc::REPLAYED_HEADER);
    let stored = response
        .into_inner()
        .strategy
        .ok_or("sagad answered without a strategy")?;
    if replayed {
        emit(&format!(
            "strategy {} version {} was already stored by request {request_id} (replayed; \
             nothing changed)\n",
            stored.business_type, stored.version
        ));
        // A file put, changed and put, then changed back has the first put's request id:
        // it is answered with the old version, which is then not the latest. Say so, rather
        // than let the operator believe it is live again. Only a note: the put itself has
        // succeeded, so a failure to look this up is no reason to fail the command.
        let latest = client
            .get_strategy(pb::GetStrategyRequest {
                business_type: stored.business_type.clone(),
                version: 0,
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().strategy)
            .map_or(0, |s| s.version);
        if latest > stored.version {
            eprintln!(
                "sagactl: note: the latest version of {} is {latest}, not this one; to make this \
                 content the latest again, put it with a new --request-id",
                stored.business_type
            );
        }
    } else {
        emit(&format!(
            "stored strategy {} version {} (request {request_id})\n",
            stored.business_type, stored.version
        ));
    }
    emit(&describe(&stored));
    Ok(())
}

async fn list(client: &mut StrategiesClient<Channel>) -> Result<(), String> {
    emit(&format!(
        "{:<32} {:>7} {:>5} {:<24} DESCRIPTION\n",
        "BUSINESS TYPE", "VERSION", "STEPS", "CREATED"
    ));
    let mut page_token = String::new();
    loop {
        let page = client
            .list_strategies(pb::ListStrategiesRequest {
                page_size: 500,
                page_token,
            })
            .await
            .map_err(status_text)?
            .into_inner();
        for s in &page.strategies {
            emit(&format!(
                "{:<32} {:>7} {:>5} {:<24} {}\n",
                s.business_type,
                s.version,
                s.steps.len(),
                time_text(s.created_at.as_ref()),
                s.description.lines().next().unwrap_or("")
            ));
        }
        for business_type in &page.unreadable_business_types {
            emit(&format!(
                "(the latest strategy of {business_type:?} cannot be read; see sagad's log)\n"
            ));
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

/// A refused put, with one line per field violation, so every problem in the file can be
/// fixed in one go.
fn refused(file: &Path, status: tonic::Status) -> String {
    let Some(bad_request) = status.get_details_bad_request() else {
        return status_text(status);
    };
    let mut text = format!(
        "{:?}: sagad refused the strategy in {}:",
        status.code(),
        file.display()
    );
    for v in &bad_request.field_violations {
        let _ = write!(text, "\n  {}: {}", v.field, v.description);
    }
    text
}

/// The default request id of a put: a digest of the strategy as it will be sent (not of the
/// file's bytes), so reformatting the file or switching it from TOML to YAML is still the
/// same request, while any change to the strategy itself is a new one.
fn content_request_id(strategy: &pb::Strategy) -> String {
    let digest = Sha256::digest(strategy.encode_to_vec());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("strategy-{hex}")
}

fn read_file(path: &Path) -> Result<pb::Strategy, String> {
    let file: StrategyFile = files::read(path)?;
    file.into_pb()
        .map_err(|problems| format!("{}:\n  {}", path.display(), problems.join("\n  ")))
}

// ---- The file format ----

/// A strategy file. Fields default to empty so that sagad, not the parser, says what is
/// missing (with every other problem at once); unknown fields are refused, so a misspelt one
/// is not silently ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrategyFile {
    #[serde(default, alias = "businessType")]
    business_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    description: String,
    /// A duration such as "10m"; absent: sagas of this type have no default deadline.
    #[serde(
        default,
        alias = "sagaTimeout",
        skip_serializing_if = "Option::is_none"
    )]
    saga_timeout: Option<String>,
    #[serde(default, alias = "firstSet")]
    first_set: Vec<String>,
    #[serde(default)]
    steps: Vec<StepFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<RuleFile>,
    #[serde(default, alias = "endStatuses", skip_serializing_if = "Vec::is_empty")]
    end_statuses: Vec<StepStatusFile>,
    #[serde(
        default,
        alias = "abnormalStatuses",
        skip_serializing_if = "Vec::is_empty"
    )]
    abnormal_statuses: Vec<StepStatusFile>,
    #[serde(
        default,
        alias = "statusMappings",
        skip_serializing_if = "Vec::is_empty"
    )]
    status_mappings: Vec<MappingFile>,
    #[serde(
        default,
        alias = "exceptionScopes",
        skip_serializing_if = "Vec::is_empty"
    )]
    exception_scopes: Vec<ScopeFile>,
    /// Assigned by sagad; accepted and ignored (as the contract does) so a strategy saved
    /// from `get` or grpcurl can be put back as it is.
    #[serde(default, rename = "version", skip_serializing)]
    _version: Option<IgnoredAny>,
    #[serde(default, rename = "created_at", alias = "createdAt", skip_serializing)]
    _created_at: Option<IgnoredAny>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    #[serde(default)]
    id: String,
    #[serde(default, alias = "nodeId")]
    node_id: String,
    #[serde(default, alias = "forwardAction")]
    forward_action: String,
    #[serde(
        default,
        alias = "reversalAction",
        skip_serializing_if = "String::is_empty"
    )]
    reversal_action: String,
    /// A duration such as "30s"; absent: sagad's default (30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    when: Vec<StepStatusFile>,
    #[serde(default)]
    trigger: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepStatusFile {
    #[serde(default, alias = "stepId")]
    step_id: String,
    #[serde(default)]
    status: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    /// Absent: any step.
    #[serde(default, alias = "stepId", skip_serializing_if = "String::is_empty")]
    step_id: String,
    #[serde(default)]
    parameter: String,
    #[serde(default)]
    value: String,
    /// NORMAL, ABNORMAL or END (any case; the proto's STATUS_MEANING_… names work too).
    #[serde(default)]
    meaning: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeFile {
    #[serde(default, alias = "stepId")]
    step_id: String,
    #[serde(default)]
    reverse: Vec<String>,
}

/// "30s", "1m30s", "500ms", "2h" (humantime), or the protobuf JSON form "1.5s"; a negative
/// duration is passed on for sagad to refuse with its field.
fn parse_duration(text: &str) -> Option<prost_types::Duration> {
    if let Ok(d) = humantime::parse_duration(text) {
        return Some(prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        });
    }
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    if !seconds.is_finite() || seconds.abs() > 1e15 {
        return None;
    }
    let mut whole = seconds.trunc();
    let mut nanos = ((seconds - whole) * 1e9).round();
    // Rounding can reach a whole second (0.9999999999s); carry it so nanos stay in range.
    if nanos.abs() >= 1e9 {
        whole += nanos.signum();
        nanos = 0.0;
    }
    // Both are in range by the checks above, so the casts cannot saturate.
    Some(prost_types::Duration {
        seconds: whole as i64,
        nanos: nanos as i32,
    })
}

fn duration_text(d: &prost_types::Duration) -> String {
    if d.seconds < 0 || d.nanos < 0 {
        return format!("{}s", d.seconds);
    }
    let d = Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    );
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn meaning_value(text: &str) -> Option<pb::StatusMeaning> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("STATUS_MEANING_") {
        upper
    } else {
        format!("STATUS_MEANING_{upper}")
    };
    pb::StatusMeaning::from_str_name(&name)
}

fn meaning_text(value: i32) -> String {
    pb::StatusMeaning::try_from(value)
        .map(|m| {
            m.as_str_name()
                .trim_start_matches("STATUS_MEANING_")
                .to_owned()
        })
        .unwrap_or_else(|_| value.to_string())
}

impl StepStatusFile {
    fn into_pb(self) -> pb::StepStatus {
        pb::StepStatus {
            step_id: self.step_id,
            status: self.status,
        }
    }

    fn from_pb(s: &pb::StepStatus) -> StepStatusFile {
        StepStatusFile {
            step_id: s.step_id.clone(),
            status: s.status.clone(),
        }
    }
}

impl StrategyFile {
    /// The message to send; the problems only the file format can have (a duration or a
    /// meaning that does not parse) are all reported together.
    fn into_pb(self) -> Result<pb::Strategy, Vec<String>> {
        let mut problems = Vec::new();
        let mut duration = |field: String, text: Option<String>| {
            let text = text?;
            let parsed = parse_duration(&text);
            if parsed.is_none() {
                problems.push(format!(
                    "{field}: {text:?} is not a duration; write it like \"30s\", \"1m30s\" or \
                     \"500ms\""
                ));
            }
            parsed
        };
        let saga_timeout = duration("saga_timeout".to_owned(), self.saga_timeout);
        let steps: Vec<pb::Step> = self
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| pb::Step {
                timeout: duration(format!("steps[{i}].timeout"), s.timeout),
                id: s.id,
                node_id: s.node_id,
                forward_action: s.forward_action,
                reversal_action: s.reversal_action,
            })
            .collect();
        let status_mappings = self
            .status_mappings
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let meaning = if m.meaning.is_empty() {
                    // Left unspecified: sagad says it is required, with the rest.
                    pb::StatusMeaning::Unspecified
                } else {
                    meaning_value(&m.meaning).unwrap_or_else(|| {
                        problems.push(format!(
                            "status_mappings[{i}].meaning: {:?} is not NORMAL, ABNORMAL or END",
                            m.meaning
                        ));
                        pb::StatusMeaning::Unspecified
                    })
                };
                pb::StatusMapping {
                    step_id: m.step_id,
                    parameter: m.parameter,
                    value: m.value,
                    meaning: meaning as i32,
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(pb::Strategy {
            business_type: self.business_type,
            version: 0,
            description: self.description,
            steps,
            first_set: self.first_set,
            rules: self
                .rules
                .into_iter()
                .map(|r| pb::Rule {
                    when: r.when.into_iter().map(StepStatusFile::into_pb).collect(),
                    trigger: r.trigger,
                })
                .collect(),
            end_statuses: self
                .end_statuses
                .into_iter()
                .map(StepStatusFile::into_pb)
                .collect(),
            abnormal_statuses: self
                .abnormal_statuses
                .into_iter()
                .map(StepStatusFile::into_pb)
                .collect(),
            status_mappings,
            exception_scopes: self
                .exception_scopes
                .into_iter()
                .map(|s| pb::ExceptionScope {
                    step_id: s.step_id,
                    reverse: s.reverse,
                })
                .collect(),
            saga_timeout,
            created_at: None,
        })
    }

    fn from_pb(s: &pb::Strategy) -> StrategyFile {
        StrategyFile {
            business_type: s.business_type.clone(),
            description: s.description.clone(),
            saga_timeout: s.saga_timeout.as_ref().map(duration_text),
            first_set: s.first_set.clone(),
            steps: s
                .steps
                .iter()
                .map(|step| StepFile {
                    id: step.id.clone(),
                    node_id: step.node_id.clone(),
                    forward_action: step.forward_action.clone(),
                    reversal_action: step.reversal_action.clone(),
                    timeout: step.timeout.as_ref().map(duration_text),
                })
                .collect(),
            rules: s
                .rules
                .iter()
                .map(|r| RuleFile {
                    when: r.when.iter().map(StepStatusFile::from_pb).collect(),
                    trigger: r.trigger.clone(),
                })
                .collect(),
            end_statuses: s.end_statuses.iter().map(StepStatusFile::from_pb).collect(),
            abnormal_statuses: s
                .abnormal_statuses
                .iter()
                .map(StepStatusFile::from_pb)
                .collect(),
            status_mappings: s
                .status_mappings
                .iter()
                .map(|m| MappingFile {
                    step_id: m.step_id.clone(),
                    parameter: m.parameter.clone(),
                    value: m.value.clone(),
                    meaning: meaning_text(m.meaning),
                })
                .collect(),
            exception_scopes: s
                .exception_scopes
                .iter()
                .map(|e| ScopeFile {
                    step_id: e.step_id.clone(),
                    reverse: e.reverse.clone(),
                })
                .collect(),
            _version: None,
            _created_at: None,
        }
    }
}

// ---- Human-readable output ----

fn time_text(ts: Option<&prost_types::Timestamp>) -> String {
    crate::time_text(&ts.cloned())
}

fn statuses_text(list: &[pb::StepStatus]) -> String {
    list.iter()
        .map(|s| format!("{} {}", s.step_id, s.status))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A strategy as an operator reads it: the flow first, then how statuses are recognised.
fn describe(s: &pb::Strategy) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "business type:  {}", s.business_type);
    let _ = writeln!(out, "version:        {}", s.version);
    let _ = writeln!(out, "created:        {}", time_text(s.created_at.as_ref()));
    if !s.description.is_empty() {
        let _ = writeln!(out, "description:    {}", s.description);
    }
    let _ = writeln!(
        out,
        "saga timeout:   {}",
        s.saga_timeout
            .as_ref()
            .map_or_else(|| "none".to_owned(), duration_text)
    );
    let _ = writeln!(out, "steps:");
    for step in &s.steps {
        let reversal = if step.reversal_action.is_empty() {
            "(not reversible)".to_owned()
        } else {
            format!("reversed by {}", step.reversal_action)
        };
        let _ = writeln!(
            out,
            "  {:<16} on {:<16} {} {reversal}, timeout {}",
            step.id,
            step.node_id,
            step.forward_action,
            step.timeout
                .as_ref()
                .map_or_else(|| "default".to_owned(), duration_text)
        );
    }
    let _ = writeln!(out, "first set:      {}", s.first_set.join(", "));
    if !s.rules.is_empty() {
        let _ = writeln!(out, "rules:");
    }
    for rule in &s.rules {
        let when = rule
            .when
            .iter()
            .map(|c| format!("{} {}", c.step_id, c.status))
            .collect::<Vec<_>>()
            .join(" and ");
        let then = if rule.trigger.is_empty() {
            "record the status".to_owned()
        } else {
            format!("trigger {}", rule.trigger.join(", "))
        };
        let _ = writeln!(out, "  when {when} -> {then}");
    }
    if !s.end_statuses.is_empty() {
        let _ = writeln!(out, "end statuses:   {}", statuses_text(&s.end_statuses));
    }
    if !s.abnormal_statuses.is_empty() {
        let _ = writeln!(
            out,
            "abnormal:       {}",
            statuses_text(&s.abnormal_statuses)
        );
    }
    if !s.status_mappings.is_empty() {
        let _ = writeln!(out, "status mappings (first match wins):");
    }
    for m in &s.status_mappings {
        let from = if m.step_id.is_empty() {
            "any step".to_owned()
        } else {
            m.step_id.clone()
        };
        let _ = writeln!(
            out,
            "  {}={} from {from} -> {}",
            m.parameter,
            m.value,
            meaning_text(m.meaning)
        );
    }
    let _ = writeln!(out, "exception scopes:");
    for scope in &s.exception_scopes {
        let reverse = if scope.reverse.is_empty() {
            "nothing".to_owned()
        } else {
            scope.reverse.join(", ")
        };
        let _ = writeln!(out, "  abnormal from {} reverses {reverse}", scope.step_id);
    }
    let _ = writeln!(
        out,
        "  any other abnormal status reverses every triggered step"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/strategies")
            .join(name)
    }

    #[test]
    fn the_order_example_reads_as_the_order_flow() {
        let s = read_file(&example("order.toml")).unwrap();
        assert_eq!(s.business_type, "order");
        assert_eq!(s.first_set, vec!["reserve", "charge"]);
        assert_eq!(s.rules[0].trigger, vec!["ship"]);
        assert_eq!(s.rules[0].when.len(), 2);
        assert_eq!(s.end_statuses[0].status, "SHIPPED");
        assert_eq!(s.abnormal_statuses[0].status, "DECLINED");
        assert_eq!(s.exception_scopes[0].reverse, vec!["reserve"]);
        assert_eq!(
            s.status_mappings[0].meaning,
            pb::StatusMeaning::Abnormal as i32
        );
        assert_eq!(
            s.steps[0].timeout,
            Some(prost_types::Duration {
                seconds: 30,
                nanos: 0
            })
        );
    }

    #[test]
    fn toml_yaml_and_json_of_one_strategy_are_the_same_request() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = example("order.toml");
        let from_toml = read_file(&toml_path).unwrap();
        let file = StrategyFile::from_pb(&from_toml);
        let yaml_path = dir.path().join("order.yaml");
        std::fs::write(&yaml_path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
        let json_path = dir.path().join("order.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
        for path in [&yaml_path, &json_path] {
            let parsed = read_file(path).unwrap();
            assert_eq!(parsed, from_toml, "{}", path.display());
            assert_eq!(content_request_id(&parsed), content_request_id(&from_toml));
        }
    }

    #[test]
    fn grpcurl_output_with_camel_case_names_can_be_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("saved.json");
        std::fs::write(
            &path,
            r#"{"businessType":"order","version":"3","createdAt":"2025-01-01T00:00:00Z",
                "firstSet":["a"],"steps":[{"id":"a","nodeId":"n","forwardAction":"go","timeout":"1.500s"}],
                "endStatuses":[{"stepId":"a","status":"DONE"}],
                "statusMappings":[{"parameter":"p","value":"v","meaning":"STATUS_MEANING_END"}]}"#,
        )
        .unwrap();
        let s = read_file(&path).unwrap();
        assert_eq!(s.version, 0, "the version is sagad's to assign");
        assert_eq!(s.steps[0].node_id, "n");
        assert_eq!(
            s.steps[0].timeout,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(s.status_mappings[0].meaning, pb::StatusMeaning::End as i32);
    }

    #[test]
    fn file_format_problems_are_all_reported_with_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            r#"
business_type = "order"
saga_timeout = "soon"
[[steps]]
id = "a"
timeout = "30 parsecs"
[[status_mappings]]
parameter = "p"
meaning = "FATAL"
"#,
        )
        .unwrap();
        let error = read_file(&path).unwrap_err();
        for expected in [
            "saga_timeout: \"soon\" is not a duration",
            "steps[0].timeout: \"30 parsecs\"",
            "status_mappings[0].meaning: \"FATAL\" is not NORMAL, ABNORMAL or END",
        ] {
            assert!(error.contains(expected), "{expected} missing from {error}");
        }
    }

    #[test]
    fn a_misspelt_field_is_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.yaml");
        std::fs::write(&path, "business_type: order\nfirst_steps: [a]\n").unwrap();
        let error = read_file(&path).unwrap_err();
        assert!(error.contains("first_steps"), "{error}");
    }

    #[test]
    fn an_unknown_extension_is_refused_with_the_ones_that_work() {
        let error = read_file(Path::new("strategy.txt")).unwrap_err();
        assert!(error.contains(".toml, .yaml, .yml or .json"), "{error}");
    }

    #[test]
    fn durations_are_read_as_people_write_them() {
        for (text, seconds, nanos) in [
            ("30s", 30, 0),
            ("1m30s", 90, 0),
            ("500ms", 0, 500_000_000),
            ("2h", 7200, 0),
            ("1.5s", 1, 500_000_000),
            ("-1s", -1, 0),
            ("-1.5s", -1, -500_000_000),
            ("0.9999999999s", 1, 0),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(prost_types::Duration { seconds, nanos }),
                "{text}"
            );
        }
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("NaNs"), None);
    }

    #[test]
    fn the_default_request_id_follows_the_strategy_not_the_file() {
        let a = read_file(&example("order.toml")).unwrap();
        let mut b = a.clone();
        assert_eq!(content_request_id(&a), content_request_id(&b));
        b.steps[0].timeout = None;
        assert_ne!(content_request_id(&a), content_request_id(&b));
        assert!(content_request_id(&a).starts_with("strategy-"));
    }

    #[test]
    fn the_description_shows_the_flow() {
        let s = read_file(&example("order.toml")).unwrap();
        let text = describe(&s);
        for expected in [
            "business type:  order",
            "when reserve RESERVED and charge PAID -> trigger ship",
            "end statuses:   ship SHIPPED",
            "result_code=E12 from any step -> ABNORMAL",
            "abnormal from charge reverses reserve",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}
