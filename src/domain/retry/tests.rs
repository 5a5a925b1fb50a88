//! Tests of the retry policy: table tests of the layering, of validation and of each CheckRetry
//! answer, and properties of the decisions and of the backoff.

use proptest::prelude::*;

use super::*;
use crate::domain::Violation;
use crate::domain::retry::validation::MAX_INTERVAL_LIMIT_MS;

fn codes(list: &[&str]) -> Vec<String> {
    list.iter().map(|c| (*c).to_owned()).collect()
}

/// Defaults: TIMEOUT retryable, 3 retries, 1 s floor, factor 2, 10 s cap. `payments.charge` has
/// its own codes, 2 retries and a 5 s floor; `mobile` narrows codes for every transaction, and
/// narrower still for `payments.charge`.
fn layered() -> Config {
    Config {
        version: 7,
        updated_ms: 1,
        rules: Rules {
            defaults: Policy {
                retryable_codes: codes(&["TIMEOUT"]),
                max_retries: 3,
                min_interval_ms: 1_000,
                backoff_factor_milli: 2_000,
                max_interval_ms: 10_000,
            },
            transactions: vec![
                TransactionRetry {
                    transaction_code: "payments.charge".into(),
                    overrides: Overrides {
                        retryable_codes: Some(codes(&["TIMEOUT", "INSUFFICIENT_LIQUIDITY"])),
                        max_retries: Some(2),
                        min_interval_ms: Some(5_000),
                        ..Overrides::default()
                    },
                },
                TransactionRetry {
                    transaction_code: "ledger.post".into(),
                    overrides: Overrides {
                        max_retries: Some(8),
                        ..Overrides::default()
                    },
                },
            ],
            channels: vec![
                ChannelRetry {
                    channel: "mobile".into(),
                    transaction_code: String::new(),
                    retryable_codes: codes(&["NETWORK_LOST"]),
                },
                ChannelRetry {
                    channel: "mobile".into(),
                    transaction_code: "payments.charge".into(),
                    retryable_codes: codes(&["CARD_BUSY"]),
                },
                ChannelRetry {
                    channel: "branch".into(),
                    transaction_code: String::new(),
                    retryable_codes: Vec::new(),
                },
            ],
        },
    }
}

#[test]
fn resolution_picks_the_most_specific_layer_for_codes() {
    let config = layered();
    // (transaction code, channel, retryable codes, codes layer)
    let table: [(&str, &str, &[&str], Layer); 8] = [
        ("other", "", &["TIMEOUT"], Layer::Defaults),
        ("other", "web", &["TIMEOUT"], Layer::Defaults),
        (
            "payments.charge",
            "",
            &["TIMEOUT", "INSUFFICIENT_LIQUIDITY"],
            Layer::Transaction,
        ),
        (
            "payments.charge",
            "web",
            &["TIMEOUT", "INSUFFICIENT_LIQUIDITY"],
            Layer::Transaction,
        ),
        // A transaction entry without codes inherits them from the defaults.
        ("ledger.post", "", &["TIMEOUT"], Layer::Defaults),
        ("other", "mobile", &["NETWORK_LOST"], Layer::Channel),
        (
            "payments.charge",
            "mobile",
            &["CARD_BUSY"],
            Layer::ChannelForTransaction,
        ),
        // An empty channel list means the channel retries nothing.
        ("payments.charge", "branch", &[], Layer::Channel),
    ];
    for (code, channel, expected, layer) in table {
        let resolved = resolve(&config, code, channel);
        assert_eq!(
            resolved.policy.retryable_codes,
            codes(expected),
            "{code} via {channel:?}"
        );
        assert_eq!(resolved.codes_layer, layer, "{code} via {channel:?}");
        assert_eq!(resolved.config_version, 7);
    }
}

#[test]
fn resolution_takes_limits_from_the_transaction_over_the_defaults() {
    let config = layered();
    // (transaction code, channel, max retries, its layer, min interval, interval layer)
    let table = [
        ("other", "", 3, Layer::Defaults, 1_000, Layer::Defaults),
        (
            "payments.charge",
            "",
            2,
            Layer::Transaction,
            5_000,
            Layer::Transaction,
        ),
        // Channels configure codes only: the limits stay the transaction's.
        (
            "payments.charge",
            "mobile",
            2,
            Layer::Transaction,
            5_000,
            Layer::Transaction,
        ),
        (
            "ledger.post",
            "",
            8,
            Layer::Transaction,
            1_000,
            Layer::Defaults,
        ),
    ];
    for (code, channel, max, max_layer, min, interval_layer) in table {
        let resolved = resolve(&config, code, channel);
        assert_eq!(resolved.policy.max_retries, max, "{code}");
        assert_eq!(resolved.max_retries_layer, max_layer, "{code}");
        assert_eq!(resolved.policy.min_interval_ms, min, "{code}");
        assert_eq!(resolved.interval_layer, interval_layer, "{code}");
        // Factor and cap were never overridden.
        assert_eq!(resolved.policy.backoff_factor_milli, 2_000);
        assert_eq!(resolved.policy.max_interval_ms, 10_000);
    }
}

#[test]
fn builtin_configuration_is_version_zero_with_documented_defaults() {
    let config = Config::builtin();
    assert_eq!(config.version, 0);
    let resolved = resolve(&config, "anything", "any-channel");
    assert_eq!(
        resolved.policy.retryable_codes,
        codes(&[
            "UNAVAILABLE",
            "TIMEOUT",
            "DEADLINE_EXCEEDED",
            "RESOURCE_EXHAUSTED"
        ])
    );
    assert_eq!(resolved.policy.max_retries, 5);
    assert_eq!(resolved.policy.min_interval_ms, 1_000);
    assert_eq!(resolved.policy.backoff_factor_milli, 2_000);
    assert_eq!(resolved.policy.max_interval_ms, 60_000);
}

#[test]
fn versions_count_up_from_one() {
    let rules = Config::builtin().rules;
    assert_eq!(Config::next(rules.clone(), None, 5).version, 1);
    let third = Config::next(rules, Some(2), 9);
    assert_eq!((third.version, third.updated_ms), (3, 9));
}

#[test]
fn backoff_grows_by_the_factor_up_to_the_cap() {
    let policy = layered().rules.defaults;
    let waits: Vec<Millis> = (1..=6).map(|n| backoff_ms(&policy, n)).collect();
    assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
    assert_eq!(backoff_ms(&policy, 0), 1_000);
    assert_eq!(backoff_ms(&policy, u32::MAX), 10_000);
    let constant = Policy {
        backoff_factor_milli: 1_000,
        ..policy
    };
    assert_eq!(backoff_ms(&constant, 9), 1_000);
}

#[test]
fn jitter_spreads_within_half_a_backoff_and_respects_floor_and_cap() {
    let policy = layered().rules.defaults;
    // First retry: [1 s, 1.5 s].
    assert_eq!(jittered_backoff_ms(&policy, 1, 0.0), 1_000);
    assert_eq!(jittered_backoff_ms(&policy, 1, 0.5), 1_250);
    // At the cap the window moves down: [5 s, 10 s].
    assert_eq!(jittered_backoff_ms(&policy, 6, 0.0), 5_000);
    assert_eq!(jittered_backoff_ms(&policy, 6, 0.999_999), 9_999);
    // Nonsense jitter is read as the window's edge, never outside it.
    assert_eq!(jittered_backoff_ms(&policy, 1, f64::NAN), 1_000);
    assert_eq!(jittered_backoff_ms(&policy, 1, 7.0), 1_500);
    assert_eq!(jittered_backoff_ms(&policy, 1, -1.0), 1_000);
}

#[test]
fn redelivery_retries_a_retryable_code_after_the_jittered_backoff() {
    let resolved = resolve(&layered(), "other", "");
    assert_eq!(
        redelivery(&resolved, "TIMEOUT", 0, 100_000, 0.0),
        Redelivery::RetryAt(101_000)
    );
    assert_eq!(
        redelivery(&resolved, "TIMEOUT", 2, 100_000, 0.0),
        Redelivery::RetryAt(104_000)
    );
}

#[test]
fn redelivery_gives_up_on_a_code_that_is_not_retryable() {
    let resolved = resolve(&layered(), "payments.charge", "branch");
    let given_up = redelivery(&resolved, "TIMEOUT", 0, 0, 0.5);
    assert_eq!(
        given_up,
        Redelivery::GiveUp(GiveUp::NotRetryable {
            error_code: "TIMEOUT".into(),
            layer: Layer::Channel
        })
    );
    if let Redelivery::GiveUp(reason) = given_up {
        assert!(reason.reason().contains("TIMEOUT"));
    }
}

#[test]
fn redelivery_gives_up_when_retries_are_used() {
    let resolved = resolve(&layered(), "payments.charge", "");
    assert_eq!(
        redelivery(&resolved, "TIMEOUT", 2, 0, 0.5),
        Redelivery::GiveUp(GiveUp::Exhausted {
            attempts: 2,
            layer: Layer::Transaction
        })
    );
}

// ---- CheckRetry ----

fn check(original: &str, code: &str, channel: &str, error: &str) -> Check {
    Check {
        original_serial: original.into(),
        transaction_code: code.into(),
        channel: channel.into(),
        error_code: error.into(),
        idempotency_scope: String::new(),
    }
}

/// Runs `on_check` and threads the history along, as the engine does.
struct Ledger {
    config: Config,
    history: Option<History>,
}

impl Ledger {
    fn new(config: Config) -> Ledger {
        Ledger {
            config,
            history: None,
        }
    }

    fn ask(&mut self, request: &Check, recorded: &[(String, Recorded)], now: Millis) -> Decision {
        let checked = on_check(&self.config, self.history.take(), request, recorded, now)
            .expect("same transaction code");
        self.history = Some(checked.history);
        checked.decision
    }
}

#[test]
fn first_check_allows_retry_one_under_a_linked_serial() {
    let mut ledger = Ledger::new(layered());
    let decision = ledger.ask(&check("T-1", "other", "", "TIMEOUT"), &[], 1_000);
    assert_eq!(
        decision,
        Decision::Allow {
            attempt: 1,
            retry_serial: "T-1.r1".into(),
            layer: Layer::Defaults
        }
    );
    let history = ledger.history.expect("history");
    assert_eq!(history.retry_serials(), ["T-1.r1"]);
    assert_eq!(history.attempts[0].config_version, 7);
    assert_eq!(history.attempts[0].decided_ms, 1_000);
}

#[test]
fn each_refusal_names_its_reason_and_layer() {
    let ok = Recorded::Succeeded {
        response: b"paid".to_vec(),
    };
    // (error code, channel, what the table holds for the original, expected decision)
    let table = [
        (
            "CARD_DECLINED",
            "",
            Recorded::Unknown,
            Decision::NotRetryable {
                error_code: "CARD_DECLINED".into(),
                layer: Layer::Transaction,
            },
        ),
        (
            "TIMEOUT",
            "mobile",
            Recorded::Unknown,
            Decision::NotRetryable {
                error_code: "TIMEOUT".into(),
                layer: Layer::ChannelForTransaction,
            },
        ),
        (
            "TIMEOUT",
            "",
            ok.clone(),
            Decision::AlreadySucceeded {
                serial: "T-2".into(),
                response: b"paid".to_vec(),
            },
        ),
        (
            // Success beats "not retryable": the caller must learn it already went through.
            "CARD_DECLINED",
            "",
            ok,
            Decision::AlreadySucceeded {
                serial: "T-2".into(),
                response: b"paid".to_vec(),
            },
        ),
        (
            "TIMEOUT",
            "",
            Recorded::Processing,
            Decision::InProgress {
                serial: "T-2".into(),
            },
        ),
        (
            "TIMEOUT",
            "",
            Recorded::Failed,
            Decision::Allow {
                attempt: 1,
                retry_serial: "T-2.r1".into(),
                layer: Layer::Transaction,
            },
        ),
    ];
    for (error, channel, recorded, expected) in table {
        let mut ledger = Ledger::new(layered());
        let decision = ledger.ask(
            &check("T-2", "payments.charge", channel, error),
            &[("T-2".into(), recorded)],
            0,
        );
        assert_eq!(decision, expected, "{error} via {channel:?}");
        assert!(!decision.reason().is_empty());
        assert_eq!(
            ledger.history.expect("history").attempts[0].decision,
            expected.kind()
        );
    }
}

#[test]
fn too_soon_until_the_backoff_since_the_last_allow_passed() {
    let mut ledger = Ledger::new(layered());
    let request = check("T-3", "other", "", "TIMEOUT");
    assert_eq!(
        ledger.ask(&request, &[], 10_000).kind(),
        DecisionKind::Allow
    );
    // Retry 2 waits backoff(2) = 2 s after retry 1 was allowed.
    assert_eq!(
        ledger.ask(&request, &[], 11_500),
        Decision::TooSoon {
            retry_after_ms: 500,
            layer: Layer::Defaults
        }
    );
    assert_eq!(
        ledger.ask(&request, &[], 12_000),
        Decision::Allow {
            attempt: 2,
            retry_serial: "T-3.r2".into(),
            layer: Layer::Defaults
        }
    );
    // A refusal does not move the clock: retry 3 is due 4 s after retry 2.
    assert_eq!(
        ledger.ask(&request, &[], 13_000),
        Decision::TooSoon {
            retry_after_ms: 3_000,
            layer: Layer::Defaults
        }
    );
    let history = ledger.history.expect("history");
    let kinds: Vec<_> = history.attempts.iter().map(|a| a.decision).collect();
    assert_eq!(
        kinds,
        [
            DecisionKind::Allow,
            DecisionKind::TooSoon,
            DecisionKind::Allow,
            DecisionKind::TooSoon
        ]
    );
    // A refusal records the retry number it would have had.
    assert_eq!(history.attempts[3].attempt, 3);
    assert!(history.attempts[3].retry_serial.is_empty());
}

#[test]
fn exhausted_after_max_retries_with_attempts_made() {
    let mut ledger = Ledger::new(layered());
    let request = check("T-4", "payments.charge", "", "TIMEOUT");
    assert_eq!(ledger.ask(&request, &[], 0).kind(), DecisionKind::Allow);
    assert_eq!(
        ledger.ask(&request, &[], 60_000).kind(),
        DecisionKind::Allow
    );
    assert_eq!(
        ledger.ask(&request, &[], 600_000),
        Decision::Exhausted {
            attempts: 2,
            layer: Layer::Transaction
        }
    );
}

#[test]
fn a_retry_that_succeeded_or_is_running_answers_for_the_original() {
    let mut ledger = Ledger::new(layered());
    let request = check("T-5", "other", "", "TIMEOUT");
    assert_eq!(ledger.ask(&request, &[], 0).kind(), DecisionKind::Allow);
    let running = [
        ("T-5".to_owned(), Recorded::Failed),
        ("T-5.r1".to_owned(), Recorded::Processing),
    ];
    assert_eq!(
        ledger.ask(&request, &running, 60_000),
        Decision::InProgress {
            serial: "T-5.r1".into()
        }
    );
    let done = [
        ("T-5".to_owned(), Recorded::Failed),
        (
            "T-5.r1".to_owned(),
            Recorded::Succeeded {
                response: b"ok".to_vec(),
            },
        ),
    ];
    assert_eq!(
        ledger.ask(&request, &done, 60_000),
        Decision::AlreadySucceeded {
            serial: "T-5.r1".into(),
            response: b"ok".to_vec()
        }
    );
}

#[test]
fn a_config_change_applies_to_the_next_decision_and_is_recorded() {
    let mut ledger = Ledger::new(layered());
    let request = check("T-6", "other", "", "CONN_RESET");
    assert_eq!(
        ledger.ask(&request, &[], 0).kind(),
        DecisionKind::NotRetryable
    );
    let mut changed = layered();
    changed.version = 8;
    changed
        .rules
        .defaults
        .retryable_codes
        .push("CONN_RESET".into());
    ledger.config = changed;
    assert_eq!(ledger.ask(&request, &[], 1).kind(), DecisionKind::Allow);
    let versions: Vec<u64> = ledger
        .history
        .expect("history")
        .attempts
        .iter()
        .map(|a| a.config_version)
        .collect();
    assert_eq!(versions, [7, 8]);
}

#[test]
fn one_original_keeps_one_transaction_code() {
    let config = layered();
    let first = on_check(&config, None, &check("T-7", "other", "", "TIMEOUT"), &[], 0)
        .expect("first check");
    let refused = on_check(
        &config,
        Some(first.history),
        &check("T-7", "ledger.post", "", "TIMEOUT"),
        &[],
        1,
    );
    assert_eq!(
        refused,
        Err(CodeChanged {
            original_serial: "T-7".into(),
            stored: "other".into()
        })
    );
}

#[test]
fn refusals_beyond_the_kept_number_drop_the_oldest_but_never_an_allow() {
    let mut ledger = Ledger::new(layered());
    let request = check("T-8", "other", "", "TIMEOUT");
    assert_eq!(ledger.ask(&request, &[], 0).kind(), DecisionKind::Allow);
    for i in 0..(MAX_REFUSALS_KEPT as u64 + 10) {
        assert_eq!(
            ledger.ask(&request, &[], 1 + i).kind(),
            DecisionKind::TooSoon
        );
    }
    let history = ledger.history.expect("history");
    assert_eq!(history.attempts.len(), MAX_REFUSALS_KEPT + 1);
    assert_eq!(history.attempts[0].decision, DecisionKind::Allow);
    assert_eq!(history.attempts[1].decided_ms, 11);
}

#[test]
fn decision_codes_match_the_contract_numbers() {
    for kind in [
        DecisionKind::Allow,
        DecisionKind::NotRetryable,
        DecisionKind::Exhausted,
        DecisionKind::TooSoon,
        DecisionKind::AlreadySucceeded,
        DecisionKind::InProgress,
    ] {
        assert_eq!(DecisionKind::from_code(kind.code()), Some(kind));
    }
    assert_eq!(DecisionKind::Allow.code(), 1);
    assert_eq!(DecisionKind::InProgress.code(), 6);
    assert_eq!(DecisionKind::from_code(0), None);
    assert_eq!(DecisionKind::from_code(7), None);
}

// ---- Validation ----

fn fields(violations: &[Violation]) -> Vec<&str> {
    violations.iter().map(|v| v.field.as_str()).collect()
}

#[test]
fn an_empty_draft_validates_to_the_builtin_defaults() {
    let rules = validate(&Draft::default()).expect("valid");
    assert_eq!(rules, Config::builtin().rules);
}

#[test]
fn a_valid_draft_keeps_overrides_and_completes_the_defaults() {
    let draft = Draft {
        defaults: DraftPolicy {
            retryable_codes: codes(&["TIMEOUT"]),
            max_retries: Some(3),
            backoff_factor: Some(1.5),
            ..DraftPolicy::default()
        },
        transactions: vec![DraftTransaction {
            transaction_code: "payments.charge".into(),
            policy: DraftPolicy {
                min_interval_ms: Some(2_000),
                ..DraftPolicy::default()
            },
        }],
        channels: vec![ChannelRetry {
            channel: "mobile".into(),
            transaction_code: String::new(),
            retryable_codes: Vec::new(),
        }],
    };
    let rules = validate(&draft).expect("valid");
    assert_eq!(
        rules.defaults,
        Policy {
            retryable_codes: codes(&["TIMEOUT"]),
            max_retries: 3,
            min_interval_ms: 1_000,
            backoff_factor_milli: 1_500,
            max_interval_ms: 60_000,
        }
    );
    assert_eq!(
        rules.transactions[0].overrides,
        Overrides {
            min_interval_ms: Some(2_000),
            ..Overrides::default()
        }
    );
    assert_eq!(rules.channels, draft.channels);
}

#[test]
fn validation_reports_every_problem_with_its_field_path() {
    let draft = Draft {
        defaults: DraftPolicy {
            retryable_codes: codes(&["TIMEOUT", "", "TIMEOUT", " bad code"]),
            max_retries: Some(MAX_RETRIES_LIMIT + 1),
            min_interval_ms: Some(5_000),
            backoff_factor: Some(0.5),
            max_interval_ms: Some(1_000),
        },
        transactions: vec![
            DraftTransaction {
                transaction_code: "payments.charge".into(),
                policy: DraftPolicy::default(),
            },
            DraftTransaction {
                transaction_code: "refunds".into(),
                policy: DraftPolicy {
                    backoff_factor: Some(f64::NAN),
                    min_interval_ms: Some(MAX_INTERVAL_LIMIT_MS + 1),
                    ..DraftPolicy::default()
                },
            },
            DraftTransaction {
                transaction_code: "payments.charge".into(),
                policy: DraftPolicy::default(),
            },
            DraftTransaction {
                transaction_code: String::new(),
                policy: DraftPolicy::default(),
            },
        ],
        channels: vec![
            ChannelRetry {
                channel: "mobile".into(),
                transaction_code: String::new(),
                retryable_codes: codes(&["X"]),
            },
            ChannelRetry {
                channel: String::new(),
                transaction_code: "a\tb".into(),
                retryable_codes: Vec::new(),
            },
            ChannelRetry {
                channel: "mobile".into(),
                transaction_code: String::new(),
                retryable_codes: codes(&["Y"]),
            },
        ],
    };
    let violations = validate(&draft).expect_err("invalid");
    assert_eq!(
        fields(&violations),
        [
            "config.defaults.retryable_codes[1]",
            "config.defaults.retryable_codes[2]",
            "config.defaults.retryable_codes[3]",
            "config.defaults.max_retries",
            "config.defaults.backoff_factor",
            "config.defaults.max_interval",
            "config.transactions[1].policy.min_interval",
            "config.transactions[1].policy.backoff_factor",
            "config.transactions[1].policy.min_interval",
            "config.transactions[2].transaction_code",
            "config.transactions[3].transaction_code",
            "config.channels[1].channel",
            "config.channels[1].transaction_code",
            "config.channels[2]",
        ]
    );
    assert!(violations[1].description.contains("duplicates"));
    assert!(violations[9].description.contains("config.transactions[0]"));
}

#[test]
fn a_transaction_whose_interval_range_breaks_with_inherited_settings_is_refused() {
    let defaults = DraftPolicy {
        min_interval_ms: Some(1_000),
        max_interval_ms: Some(10_000),
        ..DraftPolicy::default()
    };
    // (own min, own max, the field reported)
    let table = [
        (
            Some(20_000),
            None,
            "config.transactions[0].policy.min_interval",
        ),
        (
            None,
            Some(500),
            "config.transactions[0].policy.max_interval",
        ),
        (
            Some(3_000),
            Some(2_000),
            "config.transactions[0].policy.max_interval",
        ),
    ];
    for (min, max, field) in table {
        let draft = Draft {
            defaults: defaults.clone(),
            transactions: vec![DraftTransaction {
                transaction_code: "t".into(),
                policy: DraftPolicy {
                    min_interval_ms: min,
                    max_interval_ms: max,
                    ..DraftPolicy::default()
                },
            }],
            channels: Vec::new(),
        };
        let violations = validate(&draft).expect_err("invalid");
        assert_eq!(fields(&violations), [field], "{min:?} {max:?}");
    }
}

#[test]
fn a_defaults_floor_above_the_builtin_cap_asks_for_a_cap() {
    let draft = Draft {
        defaults: DraftPolicy {
            min_interval_ms: Some(120_000),
            ..DraftPolicy::default()
        },
        ..Draft::default()
    };
    let violations = validate(&draft).expect_err("invalid");
    assert_eq!(fields(&violations), ["config.defaults.min_interval"]);
    assert!(violations[0].description.contains("set max_interval"));
}

#[test]
fn only_a_serial_that_fits_and_is_not_shaped_like_a_retry_serial_starts_a_history() {
    assert!(check_new_original(&"a".repeat(MAX_SERIAL_LEN)).is_ok());
    let long = check_new_original(&"a".repeat(MAX_SERIAL_LEN + 1)).unwrap_err();
    assert_eq!(long.field, "original_serial");
    for shaped in ["T-42.r1", "T-42.r100", "a.b.r12"] {
        let refused = check_new_original(shaped).unwrap_err();
        assert!(refused.description.contains("retry serial"), "{shaped}");
    }
    for plain in [
        "x.r0",
        "x.r01",
        "T-42",
        "T-42.r",
        "T-42.rx",
        "T-42.r1x",
        "T-42.r1.x",
        "r1",
        ".R1",
    ] {
        assert!(check_new_original(plain).is_ok(), "{plain}");
    }
}

#[test]
fn check_validation_reports_every_field() {
    let bad = Check {
        original_serial: "a".repeat(crate::domain::ids::RequestId::MAX_LEN + 1),
        transaction_code: String::new(),
        channel: "no trailing spaces ".into(),
        error_code: String::new(),
        idempotency_scope: "\u{7}".into(),
    };
    let violations = validate_check(bad).expect_err("invalid");
    assert_eq!(
        fields(&violations),
        [
            "original_serial",
            "transaction_code",
            "channel",
            "error_code",
            "idempotency_scope"
        ]
    );
    let good = check("T-9", "payments.charge", "", "TIMEOUT");
    assert_eq!(validate_check(good.clone()), Ok(good));
}

/// A strategy of one step with this action, on node `inventory`, as PutStrategy validates it.
fn strategy_accepts_action(action: &str) -> bool {
    use crate::domain::strategy::StepStatus;
    use crate::domain::strategy_validation::{StepInput, StrategyInput};
    let input = StrategyInput {
        business_type: "order".into(),
        steps: vec![StepInput {
            id: "reserve".into(),
            node_id: "inventory".into(),
            forward_action: action.into(),
            ..StepInput::default()
        }],
        first_set: vec!["reserve".into()],
        end_statuses: vec![StepStatus {
            step_id: "reserve".into(),
            status: "RESERVED".into(),
        }],
        ..StrategyInput::default()
    };
    crate::domain::strategy_validation::validate(input, 1, 0).is_ok()
}

/// ReportState's rule for a node's error code.
fn saga_accepts_error_code(code: &str) -> bool {
    crate::domain::branch::Report {
        outcome: crate::domain::branch::Outcome::Failed,
        status: None,
        error_code: code.into(),
        message: String::new(),
        attempt: None,
    }
    .violations()
    .is_empty()
}

/// Configures `action` on `node` to retry `error_code`, then asks sagad's redelivery and
/// CheckRetry about that code, as they would be asked after the step failed with it.
fn assert_a_policy_retries(action: &str, node: &str, error_code: &str) {
    let draft = Draft {
        defaults: DraftPolicy::default(),
        transactions: vec![DraftTransaction {
            transaction_code: action.into(),
            policy: DraftPolicy {
                retryable_codes: codes(&[error_code]),
                ..DraftPolicy::default()
            },
        }],
        channels: vec![ChannelRetry {
            channel: node.into(),
            transaction_code: action.into(),
            retryable_codes: codes(&[error_code]),
        }],
    };
    let rules =
        validate(&draft).unwrap_or_else(|v| panic!("{action:?} / {error_code:?} refused: {v:?}"));
    let config = Config::next(rules, None, 0);
    let resolved = resolve(&config, action, node);
    assert_eq!(resolved.codes_layer, Layer::ChannelForTransaction);
    assert!(matches!(
        redelivery(&resolved, error_code, 0, 0, 0.5),
        Redelivery::RetryAt(_)
    ));
    let asked = check("T-1", action, node, error_code);
    assert_eq!(validate_check(asked.clone()), Ok(asked.clone()));
    let mut ledger = Ledger::new(config);
    assert_eq!(
        ledger.ask(&asked, &[], 1_000).kind(),
        DecisionKind::Allow,
        "{action:?} / {error_code:?}"
    );
}

#[test]
fn a_retry_policy_can_be_configured_for_every_action_name_and_printable_error_code_a_saga_accepts()
{
    for (action, error_code) in [
        ("reserve stock", "HTTP 503"),
        ("Zahlung prüfen", "délai dépassé"),
        ("charge \"card\" (v2)", "ERR#42; try again"),
        ("予約", "在庫不足"),
        (&*"a".repeat(MAX_NAME_LEN), &*"E".repeat(MAX_NAME_LEN)),
    ] {
        assert!(strategy_accepts_action(action), "{action:?}");
        assert!(saga_accepts_error_code(error_code), "{error_code:?}");
        assert_a_policy_retries(action, "inventory", error_code);
    }
}

#[test]
fn a_retryable_code_shaped_like_a_cut_error_code_is_refused() {
    let cut = format!("{}…", "E".repeat(MAX_NAME_LEN - 1));
    let draft = Draft {
        defaults: DraftPolicy {
            retryable_codes: vec![cut.clone(), format!("{}…", "E".repeat(10))],
            ..DraftPolicy::default()
        },
        ..Draft::default()
    };
    let violations = validate(&draft).expect_err("a cut code");
    assert_eq!(fields(&violations), ["config.defaults.retryable_codes[0]"]);
    assert!(violations[0].description.contains("cut"), "{violations:?}");
    // CheckRetry still takes the code, as a node may have reported it: no policy retries it.
    let asked = check("T-1", "payments.charge", "", &cut);
    assert_eq!(validate_check(asked.clone()), Ok(asked));
}

// ---- Properties ----

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        0u32..=12,
        0u64..=5_000,
        1_000u32..=5_000,
        0u64..=120_000,
        any::<bool>(),
    )
        .prop_map(|(max_retries, min, factor, extra, constant)| Policy {
            retryable_codes: codes(&["TIMEOUT"]),
            max_retries,
            min_interval_ms: min,
            backoff_factor_milli: if constant { 1_000 } else { factor },
            max_interval_ms: min + extra,
        })
}

/// A client asking again and again, at random gaps, sometimes with a code that is not retryable.
fn any_asks() -> impl Strategy<Value = Vec<(Millis, bool)>> {
    prop::collection::vec((0u64..20_000, prop::bool::weighted(0.9)), 0..60)
}

proptest! {
    #[test]
    fn allows_for_one_original_never_exceed_the_maximum(
        policy in any_policy(),
        asks in any_asks(),
    ) {
        let max = policy.max_retries;
        let config = Config {
            version: 1,
            updated_ms: 0,
            rules: Rules { defaults: policy, transactions: Vec::new(), channels: Vec::new() },
        };
        let mut ledger = Ledger::new(config);
        let mut now = 0;
        let mut allows = 0u32;
        let mut serials = std::collections::HashSet::new();
        for (gap, retryable) in asks {
            now += gap;
            let error = if retryable { "TIMEOUT" } else { "CARD_DECLINED" };
            if let Decision::Allow { retry_serial, .. } =
                ledger.ask(&check("P-1", "t", "", error), &[], now)
            {
                allows += 1;
                prop_assert!(serials.insert(retry_serial));
            }
        }
        prop_assert!(allows <= max);
    }

    #[test]
    fn consecutive_allows_are_never_closer_than_the_minimum_interval(
        policy in any_policy(),
        asks in any_asks(),
    ) {
        let min = policy.min_interval_ms;
        let config = Config {
            version: 1,
            updated_ms: 0,
            rules: Rules { defaults: policy, transactions: Vec::new(), channels: Vec::new() },
        };
        let mut ledger = Ledger::new(config);
        let mut now = 0;
        let mut last_allow: Option<Millis> = None;
        for (gap, _) in asks {
            now += gap;
            if ledger.ask(&check("P-2", "t", "", "TIMEOUT"), &[], now).kind()
                == DecisionKind::Allow
            {
                if let Some(last) = last_allow {
                    prop_assert!(now - last >= min, "{} < {}", now - last, min);
                }
                last_allow = Some(now);
            }
        }
    }

    #[test]
    fn backoff_stays_between_the_minimum_interval_and_the_cap(
        policy in any_policy(),
        retry in 0u32..200,
        jitter in 0.0f64..1.0,
    ) {
        let plain = backoff_ms(&policy, retry);
        let jittered = jittered_backoff_ms(&policy, retry, jitter);
        for wait in [plain, jittered] {
            prop_assert!(wait >= policy.min_interval_ms);
            prop_assert!(wait <= policy.max_interval_ms);
        }
    }

    #[test]
    fn backoff_never_shrinks_from_one_retry_to_the_next(
        policy in any_policy(),
        retry in 1u32..200,
    ) {
        prop_assert!(backoff_ms(&policy, retry + 1) >= backoff_ms(&policy, retry));
    }

    #[test]
    fn redelivery_waits_between_the_minimum_interval_and_the_cap(
        policy in any_policy(),
        made in 0u32..20,
        now in 0u64..1_000_000_000,
        jitter in 0.0f64..1.0,
    ) {
        let config = Config {
            version: 1,
            updated_ms: 0,
            rules: Rules { defaults: policy.clone(), transactions: Vec::new(), channels: Vec::new() },
        };
        let resolved = resolve(&config, "t", "");
        match redelivery(&resolved, "TIMEOUT", made, now, jitter) {
            Redelivery::RetryAt(at) => {
                prop_assert!(made < policy.max_retries);
                prop_assert!(at >= now + policy.min_interval_ms);
                prop_assert!(at <= now + policy.max_interval_ms);
            }
            Redelivery::GiveUp(reason) => {
                prop_assert_eq!(reason, GiveUp::Exhausted { attempts: made, layer: Layer::Defaults });
                prop_assert!(made >= policy.max_retries);
            }
        }
    }
}

proptest! {
    /// Any text, spaces and control characters included, up to just past the bound.
    #[test]
    fn every_action_name_a_strategy_accepts_can_have_a_retry_policy(
        action in "[\\PC\t\n]{1,130}",
    ) {
        prop_assume!(strategy_accepts_action(&action));
        let code = if action.ends_with('…') { "TIMEOUT" } else { action.as_str() };
        assert_a_policy_retries(&action, "inventory", code);
    }
}
