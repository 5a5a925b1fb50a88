//! sagactl: the operator's command line over sagad's own gRPC contracts.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// `println!` through `emit`: every line sagactl prints goes this way.
macro_rules! outln {
    () => {
        $crate::emit("\n")
    };
    ($($arg:tt)*) => {
        $crate::emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

mod files;
mod ops;
mod retry;
mod strategy;

use clap::{Parser, Subcommand};
use sagad::grpc::pb;
use sagad::grpc::pb::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "sagactl", version, about = "Operate a sagad saga coordinator")]
struct Cli {
    /// sagad's address; http:// is assumed when no scheme is given
    #[arg(long, env = "SAGAD_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// How long to wait for each answer from sagad, e.g. 30s (sagad takes connections while it
    /// still opens its ledger, and answers only once that is done)
    #[arg(long, env = "SAGACTL_RPC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    rpc_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a saga.
    Start {
        /// Business type, e.g. order
        #[arg(long)]
        business_type: String,
        /// Idempotency key; repeat it to retry safely
        #[arg(long)]
        request_id: String,
        /// orchestrated or outcalls
        #[arg(long, default_value = "outcalls")]
        mode: String,
        /// Payload text (sent as bytes)
        #[arg(long, default_value = "")]
        payload: String,
        /// Payload MIME type
        #[arg(long, default_value = "")]
        content_type: String,
        /// Label as key=value; repeat for more
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Reverse the saga if still running after this long, e.g. 30s
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Show one saga, each branch's processing details and its timeline.
    Show { gsn: String },
    /// List sagas, newest first.
    List {
        /// running, completed, reversing, reversed or needs_attention; repeat for more
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value = "")]
        business_type: String,
        /// Show at most this many sagas
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// List what recovery is waiting on, and why: unknown outcomes being polled, reversals
    /// being retried, sagas needing attention, commands whose delivery fails.
    Stuck {
        /// Show at most this many rows
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Show the engine's counters (polls, answers, escalations, deliveries, ...).
    Counters,
    /// List the sagas that need an operator, and why: under each, the reversals that failed
    /// past their retry budget (branch, node, error), then the saga's original reason for
    /// reversing; or, for a completed saga whose step was undone by its node, that reason.
    Attention {
        /// Show at most this many sagas
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Re-drive a saga that needs attention: its failed reversals are sent again (a saga whose
    /// completed step a node undid has its other steps reversed).
    Reprocess {
        gsn: String,
        /// Idempotency key. By default it is made from the saga's last change, which
        /// reprocessing changes: a second run is refused (the saga no longer needs attention),
        /// never applied twice, but is not answered from the first. To have a repeat after a
        /// timeout replay the first answer, repeat the id printed with the failure
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Ask sagad's health service.
    Health,
    /// Fulfillment strategies: put from a file, get, list.
    #[command(subcommand)]
    Strategy(strategy::Command),
    /// Retry configuration and decisions.
    #[command(subcommand)]
    Retry(retry::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sagactl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sagactl: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `addr` with `http://` in front when it names no scheme: `--addr 127.0.0.1:50051` is the
/// common way to write it, and without a scheme it would not parse as a URL.
fn address_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// An error with every cause under it: a transport error's own text is only "transport
/// error", and the reason (connection refused, a bad address, ...) is in its sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn connect(addr: &str, rpc_timeout: Duration) -> Result<Channel, String> {
    let url = address_url(addr);
    Endpoint::from_shared(url.clone())
        .map_err(|e| format!("bad --addr {addr:?}: {}", error_chain(&e)))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(rpc_timeout)
        .connect()
        .await
        .map_err(|e| format!("cannot reach sagad at {url}: {}", error_chain(&e)))
}

/// The most rows asked for in one ListSagas page; sagad refuses more.
const MAX_PAGE_SIZE: u32 = 500;

/// Sagas, newest first, page after page until `limit` are shown or the list ends; `attention`
/// adds, under each saga, what an operator must look at. A page can come back short, even
/// empty, with a token for the next: sagad ends a page after examining a bounded number of
/// sagas, so an old match behind many newer non-matches is found only by following the tokens.
async fn list(
    channel: Channel,
    states: Vec<i32>,
    business_type: String,
    limit: u32,
    attention: bool,
) -> Result<(), String> {
    let mut client = CoordinatorClient::new(channel);
    outln!(
        "{:<28} {:<16} {:<24} CREATED",
        "GSN",
        "STATE",
        "BUSINESS TYPE"
    );
    let mut shown = 0u32;
    let mut page_token = String::new();
    let more = loop {
        let page = client
            .list_sagas(pb::ListSagasRequest {
                states: states.clone(),
                business_type: business_type.clone(),
                page_size: (limit - shown).min(MAX_PAGE_SIZE),
                page_token,
                newest_first: true,
                // The branches say which reversals failed; the saga's reason alone names what
                // started the reversal, not what stopped it.
                full: attention,
            })
            .await
            .map_err(status_text)?
            .into_inner();
        for saga in &page.sagas {
            outln!(
                "{:<28} {:<16} {:<24} {}",
                saga.gsn,
                state_name(saga.state),
                saga.business_type,
                time_text(&saga.created_at)
            );
            if attention {
                for line in ops::attention_lines(saga) {
                    outln!("    {line}");
                }
            }
        }
        shown = shown.saturating_add(u32::try_from(page.sagas.len()).unwrap_or(u32::MAX));
        for sequence in &page.unreadable_sequences {
            outln!(
                "(the saga record at ledger sequence {sequence:016} cannot be read; see sagad's log)"
            );
        }
        if page.next_page_token.is_empty() {
            break false;
        }
        if shown >= limit {
            break true;
        }
        page_token = page.next_page_token;
    };
    if more {
        // The list stopped at the limit, so what lies past it was not read.
        outln!("(stopped at --limit {limit}; there may be more: raise it)");
    }
    Ok(())
}

/// Writes to stdout. A reader that closed the pipe has seen enough (`sagactl stuck | head -3`):
/// sagactl stops there quietly, with success, instead of panicking in `println!` or paging on
/// for nobody. Any other failure to write ends it with the reason.
pub(crate) fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("sagactl: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

pub(crate) fn status_text(status: tonic::Status) -> String {
    // tonic's own text for the channel's --rpc-timeout firing, which names neither.
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        return "no answer from sagad within --rpc-timeout (it may still be starting: opening \
                its ledger and recovering)"
            .to_owned();
    }
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(&status) {
        text.push_str(" (");
        text.push_str(&error_chain(source));
        text.push(')');
    }
    text
}

/// A failed call's text with its request id: after a timeout or a lost connection the request
/// may have been carried out, and only a repeat with the same id is answered from that record
/// instead of being decided again.
pub(crate) fn failed_request(status: tonic::Status, request_id: &str) -> String {
    format!(
        "{} (request id {request_id}: repeat with --request-id {request_id} to get the answer \
         sagad recorded, if any)",
        status_text(status)
    )
}

/// What a reprocess did, read from the saga it returned: which reversals are now out, or how
/// the saga ended. An outcall saga whose completed outcall a node undid has its other outcalls
/// reversed, not "failed reversals sent again".
fn reprocessed_text(saga: &pb::Saga) -> String {
    let state = state_name(saga.state);
    if saga.state != pb::SagaState::Reversing as i32 {
        return format!("{} is {state}", saga.gsn);
    }
    let out: Vec<String> = saga
        .branches
        .iter()
        .filter(|b| b.state == pb::BranchState::Reversing as i32)
        .map(|b| format!("{} on node {}", b.branch_id, b.node_id))
        .collect();
    if out.is_empty() {
        format!("{} is {state}", saga.gsn)
    } else {
        format!(
            "{} is {state}; reversal sent for {}",
            saga.gsn,
            out.join(", ")
        )
    }
}

/// ReprocessSaga's FAILED_PRECONDITION, with what the saga's state suggests: one REVERSING has
/// most likely been reprocessed already, by an earlier run whose answer did not arrive or by
/// another operator, since only a reprocess moves a saga out of NEEDS_ATTENTION.
async fn not_reprocessed(
    client: &mut CoordinatorClient<Channel>,
    gsn: &str,
    status: tonic::Status,
) -> String {
    let text = status_text(status);
    let state = client
        .get_saga(pb::GetSagaRequest {
            gsn: gsn.to_owned(),
        })
        .await
        .ok()
        .and_then(|answer| answer.into_inner().saga)
        .map(|saga| saga.state);
    if state == Some(pb::SagaState::Reversing as i32) {
        format!(
            "{text} (it was probably reprocessed already, by an earlier run whose answer did not \
             arrive or by another operator: `sagactl show {gsn}` shows its reversals)"
        )
    } else {
        text
    }
}

fn state_name(value: i32) -> String {
    pb::SagaState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("SAGA_STATE_").to_owned())
        .unwrap_or_else(|_| value.to_string())
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z); humantime panics past it.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

fn time_text(ts: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = ts else {
        return "-".to_owned();
    };
    match (u64::try_from(t.seconds), u32::try_from(t.nanos)) {
        (Ok(seconds), Ok(nanos)) if t.seconds <= LAST_RFC3339_SECOND && nanos < 1_000_000_000 => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::new(seconds, nanos))
                .to_string()
        }
        // Out of RFC 3339's range (a deadline set centuries ahead, or garbage): the raw
        // value, rather than a panic or a made-up date.
        _ => format!("{}.{:09}s since 1970 (Unix time)", t.seconds, t.nanos),
    }
}

fn print_saga(saga: &pb::Saga) {
    outln!("gsn:           {}", saga.gsn);
    outln!("state:         {}", state_name(saga.state));
    outln!("business type: {}", saga.business_type);
    outln!(
        "mode:          {}",
        pb::SagaMode::try_from(saga.mode)
            .map(|m| m.as_str_name())
            .unwrap_or("?")
    );
    outln!("request id:    {}", saga.request_id);
    outln!("created:       {}", time_text(&saga.created_at));
    outln!("updated:       {}", time_text(&saga.updated_at));
    outln!("deadline:      {}", time_text(&saga.deadline));
    for (key, value) in &saga.labels {
        outln!("label:         {key}={value}");
    }
    if !saga.payload.is_empty() {
        outln!(
            "payload:       {} bytes ({})",
            saga.payload.len(),
            saga.content_type
        );
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let channel = connect(&cli.addr, cli.rpc_timeout).await?;
    match cli.command {
        Command::Start {
            business_type,
            request_id,
            mode,
            payload,
            content_type,
            labels,
            timeout,
        } => {
            let mode = match mode.as_str() {
                "orchestrated" => pb::SagaMode::Orchestrated,
                "outcalls" => pb::SagaMode::RegisteredOutcalls,
                other => {
                    return Err(format!(
                        "--mode {other:?}: expected orchestrated or outcalls"
                    ));
                }
            };
            let mut label_map = BTreeMap::new();
            for label in labels {
                let (k, v) = label
                    .split_once('=')
                    .ok_or_else(|| format!("--label {label:?}: expected key=value"))?;
                label_map.insert(k.to_owned(), v.to_owned());
            }
            let timeout = timeout
                .map(|t| humantime::parse_duration(&t).map_err(|e| format!("--timeout {t:?}: {e}")))
                .transpose()?
                .map(|d| prost_types::Duration {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                });
            let response = CoordinatorClient::new(channel)
                .start_saga(pb::StartSagaRequest {
                    request_id,
                    business_type,
                    mode: mode as i32,
                    payload: payload.into_bytes(),
                    content_type,
                    labels: label_map,
                    deadline: None,
                    timeout,
                })
                .await
                .map_err(status_text)?;
            let replayed = response
                .metadata()
                .contains_key(sagad::grpc::REPLAYED_HEADER);
            let response = response.into_inner();
            outln!(
                "{}{}",
                response.gsn,
                if replayed {
                    "  (replayed: this request_id was already answered)"
                } else {
                    ""
                }
            );
        }
        Command::Show { gsn } => {
            let saga = CoordinatorClient::new(channel)
                .get_saga(pb::GetSagaRequest { gsn })
                .await
                .map_err(status_text)?
                .into_inner()
                .saga
                .ok_or("sagad answered without a saga")?;
            print_saga(&saga);
            ops::print_progress(&saga);
        }
        Command::List {
            states,
            business_type,
            limit,
        } => {
            let mut state_values = Vec::new();
            for state in states {
                let name = format!("SAGA_STATE_{}", state.to_uppercase());
                let value = pb::SagaState::from_str_name(&name)
                    .ok_or_else(|| format!("--state {state:?} is not a saga state"))?;
                state_values.push(value as i32);
            }
            list(channel, state_values, business_type, limit, false).await?;
        }
        Command::Attention { limit } => {
            let states = vec![pb::SagaState::NeedsAttention as i32];
            list(channel, states, String::new(), limit, true).await?;
        }
        Command::Reprocess { gsn, request_id } => {
            let mut client = CoordinatorClient::new(channel);
            let request_id = match request_id {
                Some(id) => id,
                None => {
                    // One key per episode: the saga's last change names it, so a repeated
                    // command replays, and the next episode gets a new key.
                    let saga = client
                        .get_saga(pb::GetSagaRequest { gsn: gsn.clone() })
                        .await
                        .map_err(status_text)?
                        .into_inner()
                        .saga
                        .ok_or("sagad answered without a saga")?;
                    let at = saga.updated_at.unwrap_or_default();
                    format!("reprocess-{gsn}-{}.{:09}", at.seconds, at.nanos)
                }
            };
            let answer = client
                .reprocess_saga(pb::ReprocessSagaRequest {
                    request_id: request_id.clone(),
                    gsn: gsn.clone(),
                })
                .await;
            let saga = match answer {
                Ok(answer) => answer
                    .into_inner()
                    .saga
                    .ok_or("sagad answered without a saga")?,
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    return Err(not_reprocessed(&mut client, &gsn, status).await);
                }
                Err(status) => return Err(failed_request(status, &request_id)),
            };
            outln!("{}", reprocessed_text(&saga));
        }
        Command::Stuck { limit } => ops::stuck(channel, limit).await?,
        Command::Counters => ops::counters(channel).await?,
        Command::Strategy(command) => strategy::run(channel, command).await?,
        Command::Retry(command) => retry::run(channel, command).await?,
        Command::Health => {
            let response = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(status_text)?
                .into_inner();
            let status =
                tonic_health::pb::health_check_response::ServingStatus::try_from(response.status)
                    .unwrap_or_default();
            outln!("{status:?}");
            // Scripts and probes go by the exit code: only SERVING is healthy.
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
                return Err(format!("sagad is not serving ({status:?})"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn a_time_past_year_9999_is_shown_as_raw_seconds_instead_of_panicking() {
        assert_eq!(
            time_text(&at(LAST_RFC3339_SECOND, 0)),
            "9999-12-31T23:59:59.000Z"
        );
        let far = time_text(&at(LAST_RFC3339_SECOND + 1, 5));
        assert_eq!(far, "253402300800.000000005s since 1970 (Unix time)");
        assert!(time_text(&at(-1, 0)).contains("since 1970"), "before 1970");
        assert!(time_text(&at(0, -1)).contains("since 1970"), "bad nanos");
        assert_eq!(time_text(&None), "-");
    }

    #[test]
    fn reprocess_says_which_reversals_it_sent_or_how_the_saga_ended() {
        let branch = |id: &str, state: pb::BranchState| pb::Branch {
            branch_id: id.to_owned(),
            node_id: format!("{id}-node"),
            state: state as i32,
            ..Default::default()
        };
        let mut saga = pb::Saga {
            gsn: "c1-0000000000000007".to_owned(),
            state: pb::SagaState::Reversing as i32,
            branches: vec![
                branch("1.a", pb::BranchState::Reversed),
                branch("2.b", pb::BranchState::Reversing),
            ],
            ..Default::default()
        };
        assert_eq!(
            reprocessed_text(&saga),
            "c1-0000000000000007 is REVERSING; reversal sent for 2.b on node 2.b-node"
        );
        saga.state = pb::SagaState::Reversed as i32;
        assert_eq!(reprocessed_text(&saga), "c1-0000000000000007 is REVERSED");
    }

    #[test]
    fn an_address_without_a_scheme_is_taken_as_http() {
        assert_eq!(address_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(address_url("http://h:1"), "http://h:1");
        assert_eq!(address_url("https://h:1"), "https://h:1");
    }
}
