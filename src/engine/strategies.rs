//! Storing and reading fulfillment strategies (S2): validated, versioned, idempotent puts.
//!
//! A put validates the whole strategy before touching the ledger, then, inside one idempotent
//! ledger write, reads the business type's latest version and stores the new one as latest + 1.
//! Writes run one at a time, so two puts of one business type can never get the same version.
//! Stored versions are never changed or removed: a running saga keeps reading the version it
//! started with.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::{Answered, DEFAULT_PAGE_SIZE, Engine, Error, MAX_PAGE_SIZE};
use crate::domain::Violation;
use crate::domain::ids::{BusinessType, RequestId};
use crate::domain::strategy::{Meaning, Rule, StatusMapping, Step, StepStatus, Strategy};
use crate::domain::strategy_validation::{self, StrategyInput};
use crate::store::{
    self, ExceptionScopeRecord, RuleRecord, StatusMappingRecord, StepRecord, StepStatusRecord,
    StrategyRecord, WriteTx,
};

/// One page of `list_strategies`: the latest version of each business type, by name.
#[derive(Debug, Clone)]
pub struct StrategyPage {
    pub strategies: Vec<Strategy>,
    /// Empty on the last page.
    pub next_page_token: String,
    /// Business types in the page's range whose latest strategy does not decode, passed over.
    pub unreadable_business_types: Vec<String>,
}

impl Engine {
    /// Validates `input` and stores it as the next version of its business type, idempotent on
    /// `request_id`: a repeat with the same `fingerprint` gets the stored answer (the same
    /// version), another body under the same id is refused. `encode` turns the stored strategy
    /// into the response bytes kept for replay.
    pub async fn put_strategy<F>(
        &self,
        request_id: &str,
        input: StrategyInput,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Strategy) -> Vec<u8> + Send + 'static,
    {
        let mut violations = Vec::new();
        let request_id = RequestId::parse(request_id)
            .map_err(|e| violations.push(Violation::new("request_id", e.to_string())))
            .ok();
        // Validated before the write with a placeholder version and time; both are set inside
        // the write, where the latest version is known. Every problem is reported at once.
        let validated = strategy_validation::validate(input, 0, 0)
            .map_err(|found| violations.extend(found))
            .ok();
        let (Some(request_id), Some(mut strategy)) = (request_id, validated) else {
            return Err(Error::Invalid(violations));
        };
        let shared = self.shared.clone();
        self.idempotent_write("PutStrategy", &request_id, fingerprint, move |tx, now| {
            let latest = tx.latest_strategy_version(&strategy.business_type)?;
            strategy.version = match latest {
                None => 1,
                Some(latest) => latest.checked_add(1).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "business type {:?} has used every version number; store the strategy \
                         under a new business type",
                        strategy.business_type
                    ))
                })?,
            };
            strategy.created_ms = now;
            tx.put_strategy(&strategy_to_record(&strategy))?;
            shared.forget_latest_strategy(&strategy.business_type);
            Ok(encode(&strategy))
        })
        .await
    }

    /// One version of a business type's strategy; `version` 0 asks for the latest.
    pub async fn get_strategy(&self, business_type: &str, version: u64) -> Result<Strategy, Error> {
        let business_type = BusinessType::parse(business_type)
            .map_err(|e| Error::invalid("business_type", e.to_string()))?;
        let key = business_type.as_str().to_owned();
        let (found, latest) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let found = tx.strategy(&key, version)?;
                // Only to say, when a version is missing, which ones exist.
                let latest = match (&found, version) {
                    (None, 1..) => tx.strategy(&key, 0)?.map(|r| r.version),
                    _ => None,
                };
                Ok((found, latest))
            })
            .await??;
        if let Some(record) = found {
            return Ok(strategy_from_record(record)?);
        }
        let name = business_type.as_str();
        Err(Error::NotFound(match latest {
            Some(latest) => format!(
                "business type {name:?} has no strategy version {version}; its versions are 1 to \
                 {latest} (version 0 asks for the latest)"
            ),
            None => format!(
                "no fulfillment strategy is stored for business type {name:?}; store one with \
                 Strategies.PutStrategy (sagactl strategy put FILE), or check the name with \
                 Strategies.ListStrategies"
            ),
        }))
    }

    /// The latest version of every business type's strategy, by business type, one page at a
    /// time. `page_token` is the previous page's `next_page_token` (empty for the first page).
    pub async fn list_strategies(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<StrategyPage, Error> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("is {n}; at most {MAX_PAGE_SIZE} are allowed"),
                ));
            }
            n => n,
        } as usize;
        let after = if page_token.is_empty() {
            None
        } else {
            Some(page_token::decode(page_token).ok_or_else(|| {
                Error::invalid(
                    "page_token",
                    "is not a token this sagad issued for ListStrategies; pass next_page_token \
                     from the previous page unchanged, or leave it empty for the first page",
                )
            })?)
        };
        // One more than a page tells whether another page follows, so the last page never
        // hands out a token that leads to an empty page.
        let (mut strategies, mut unreadable) = self
            .store
            .read(
                move |tx| -> Result<(Vec<Strategy>, Vec<Passed>), store::Error> {
                    let mut readable = Vec::new();
                    // Each with how many readable strategies came before it.
                    let mut unreadable = Vec::new();
                    for scanned in tx.scan_latest_strategies(after.as_deref()) {
                        // One strategy this build cannot read (damaged, or written by a newer
                        // sagad) must not fail every page that reaches it; it is named in the
                        // answer, and StartSaga and GetStrategy on its business type still say
                        // what is wrong.
                        let read = match scanned? {
                            Ok(record) => {
                                let business_type = record.business_type.clone();
                                strategy_from_record(record).map_err(|e| (business_type, e))
                            }
                            Err(undecodable) => Err((
                                undecodable.strategy_business_type(),
                                store::Error::from(undecodable),
                            )),
                        };
                        match read {
                            Ok(strategy) => readable.push(strategy),
                            Err((
                                business_type,
                                e @ (store::Error::Corrupt { .. }
                                | store::Error::UnknownVersion { .. }),
                            )) => {
                                tracing::warn!(
                                    business_type,
                                    error = %e,
                                    "a strategy does not decode; the listing passes over it"
                                );
                                unreadable.push((readable.len(), business_type));
                            }
                            Err((_, e)) => return Err(e),
                        }
                        if readable.len() > page_size {
                            break;
                        }
                    }
                    Ok((readable, unreadable))
                },
            )
            .await??;
        let more = strategies.len() > page_size;
        strategies.truncate(page_size);
        // One met after the page's last strategy is met again by the next page.
        if more {
            unreadable.retain(|(before, _)| *before < page_size);
        }
        let next_page_token = match strategies.last() {
            Some(last) if more => page_token::encode(&last.business_type),
            _ => String::new(),
        };
        Ok(StrategyPage {
            strategies,
            next_page_token,
            unreadable_business_types: unreadable.into_iter().map(|(_, name)| name).collect(),
        })
    }
}

/// A business type whose latest strategy a listing passed over, with how many readable
/// strategies the listing had met before it.
type Passed = (usize, String);

/// One version of a business type's strategy (`version` 0: the latest), read inside a ledger
/// write; `None` if there is none. StartSaga calls it to pin the version a saga runs with.
pub(crate) fn load_strategy(
    tx: &WriteTx<'_>,
    business_type: &str,
    version: u64,
) -> Result<Option<Strategy>, Error> {
    Ok(tx
        .strategy(business_type, version)?
        .map(strategy_from_record)
        .transpose()?)
}

const TABLE: &str = "strategies";

fn corrupt(detail: impl Into<String>) -> store::Error {
    store::Error::Corrupt {
        table: TABLE,
        detail: detail.into(),
    }
}

fn meaning_code(meaning: Meaning) -> u8 {
    match meaning {
        Meaning::Normal => 1,
        Meaning::Abnormal => 2,
        Meaning::End => 3,
    }
}

fn meaning_from_code(code: u8) -> Option<Meaning> {
    match code {
        1 => Some(Meaning::Normal),
        2 => Some(Meaning::Abnormal),
        3 => Some(Meaning::End),
        _ => None,
    }
}

fn step_status_record(s: &StepStatus) -> StepStatusRecord {
    StepStatusRecord {
        step_id: s.step_id.clone(),
        status: s.status.clone(),
    }
}

fn step_status(r: StepStatusRecord) -> StepStatus {
    StepStatus {
        step_id: r.step_id,
        status: r.status,
    }
}

pub(crate) fn strategy_to_record(strategy: &Strategy) -> StrategyRecord {
    StrategyRecord {
        business_type: strategy.business_type.clone(),
        version: strategy.version,
        description: strategy.description.clone(),
        steps: strategy
            .steps
            .iter()
            .map(|s| StepRecord {
                id: s.id.clone(),
                node_id: s.node_id.clone(),
                forward_action: s.forward_action.clone(),
                reversal_action: s.reversal_action.clone(),
                timeout_ms: s.timeout_ms,
            })
            .collect(),
        first_set: strategy.first_set.clone(),
        rules: strategy
            .rules
            .iter()
            .map(|r| RuleRecord {
                when: r.when.iter().map(step_status_record).collect(),
                trigger: r.trigger.clone(),
            })
            .collect(),
        end_statuses: strategy
            .end_statuses
            .iter()
            .map(step_status_record)
            .collect(),
        abnormal_statuses: strategy
            .abnormal_statuses
            .iter()
            .map(step_status_record)
            .collect(),
        status_mappings: strategy
            .status_mappings
            .iter()
            .map(|m| StatusMappingRecord {
                step_id: m.step_id.clone().unwrap_or_default(),
                parameter: m.parameter.clone(),
                value: m.value.clone(),
                meaning: meaning_code(m.meaning),
            })
            .collect(),
        exception_scopes: strategy
            .exception_scopes
            .iter()
            .map(|(step_id, reverse)| ExceptionScopeRecord {
                step_id: step_id.clone(),
                reverse: reverse.clone(),
            })
            .collect(),
        saga_timeout_ms: strategy.saga_timeout_ms,
        created_ms: strategy.created_ms,
    }
}

/// A stored strategy back as the domain model. It was validated when stored, so only what
/// the engine relies on to run a saga safely is checked again: every step id it names exists,
/// every code is known, no step has a zero timeout. The finer rules (reachability, text
/// limits) are deliberately not re-run: they may tighten in a later sagad, and a strategy
/// stored under the old rules must stay readable for the sagas that run with it.
pub(crate) fn strategy_from_record(record: StrategyRecord) -> Result<Strategy, store::Error> {
    let at = |what: String| {
        corrupt(format!(
            "strategy {:?} version {}: {what}",
            record.business_type, record.version
        ))
    };
    BusinessType::parse(&record.business_type).map_err(|e| at(format!("business type {e}")))?;
    if record.version == 0 {
        return Err(at("version 0 is never assigned".to_owned()));
    }
    let known: BTreeSet<&str> = record.steps.iter().map(|s| s.id.as_str()).collect();
    if known.len() != record.steps.len() {
        return Err(at("two steps share an id".to_owned()));
    }
    if let Some(step) = record.steps.iter().find(|s| s.timeout_ms == 0) {
        return Err(at(format!("step {:?} has a zero timeout", step.id)));
    }
    let names = record
        .first_set
        .iter()
        .chain(
            record
                .rules
                .iter()
                .flat_map(|r| r.when.iter().map(|c| &c.step_id).chain(r.trigger.iter())),
        )
        .chain(record.end_statuses.iter().map(|s| &s.step_id))
        .chain(record.abnormal_statuses.iter().map(|s| &s.step_id))
        .chain(
            record
                .status_mappings
                .iter()
                .map(|m| &m.step_id)
                .filter(|id| !id.is_empty()),
        )
        .chain(
            record
                .exception_scopes
                .iter()
                .flat_map(|s| std::iter::once(&s.step_id).chain(s.reverse.iter())),
        );
    for name in names {
        if !known.contains(name.as_str()) {
            return Err(at(format!(
                "it names step {name:?}, which it does not have"
            )));
        }
    }
    let mut status_mappings = Vec::with_capacity(record.status_mappings.len());
    for m in &record.status_mappings {
        let meaning = meaning_from_code(m.meaning)
            .ok_or_else(|| at(format!("status meaning code {}", m.meaning)))?;
        status_mappings.push(StatusMapping {
            step_id: (!m.step_id.is_empty()).then(|| m.step_id.clone()),
            parameter: m.parameter.clone(),
            value: m.value.clone(),
            meaning,
        });
    }
    let mut exception_scopes = BTreeMap::new();
    for scope in &record.exception_scopes {
        if exception_scopes
            .insert(scope.step_id.clone(), scope.reverse.clone())
            .is_some()
        {
            return Err(at(format!(
                "step {:?} has two exception scopes",
                scope.step_id
            )));
        }
    }
    Ok(Strategy {
        business_type: record.business_type,
        version: record.version,
        description: record.description,
        steps: record
            .steps
            .into_iter()
            .map(|s| Step {
                id: s.id,
                node_id: s.node_id,
                forward_action: s.forward_action,
                reversal_action: s.reversal_action,
                timeout_ms: s.timeout_ms,
            })
            .collect(),
        first_set: record.first_set,
        rules: record
            .rules
            .into_iter()
            .map(|r| Rule {
                when: r.when.into_iter().map(step_status).collect(),
                trigger: r.trigger,
            })
            .collect(),
        end_statuses: record.end_statuses.into_iter().map(step_status).collect(),
        abnormal_statuses: record
            .abnormal_statuses
            .into_iter()
            .map(step_status)
            .collect(),
        status_mappings,
        exception_scopes,
        saga_timeout_ms: record.saga_timeout_ms,
        created_ms: record.created_ms,
    })
}

/// Page tokens of `list_strategies`: the last business type of the previous page, in hex,
/// with a short digest so a token that was edited, cut short or made up is refused instead of
/// silently listing from the wrong place. Not a secret: it hides nothing, it only checks.
mod page_token {
    use super::*;

    const PREFIX: &str = "s1.";
    /// Separates the digest from the business type; never a hex digit.
    const SEPARATOR: char = '.';
    const DIGEST_BYTES: usize = 4;

    fn digest(business_type: &str) -> [u8; DIGEST_BYTES] {
        let full = Sha256::new()
            .chain_update(b"sagad ListStrategies page token\0")
            .chain_update(business_type.as_bytes())
            .finalize();
        let mut out = [0u8; DIGEST_BYTES];
        out.copy_from_slice(&full[..DIGEST_BYTES]);
        out
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Option<Vec<u8>> {
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return None;
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
            .collect()
    }

    pub fn encode(after: &str) -> String {
        format!(
            "{PREFIX}{}{SEPARATOR}{}",
            hex(after.as_bytes()),
            hex(&digest(after))
        )
    }

    /// The business type the next page starts after; `None` for anything `encode` did not
    /// produce.
    pub fn decode(token: &str) -> Option<String> {
        let rest = token.strip_prefix(PREFIX)?;
        let (name, check) = rest.split_once(SEPARATOR)?;
        let name = String::from_utf8(unhex(name)?).ok()?;
        if unhex(check)? != digest(&name) {
            return None;
        }
        BusinessType::parse(&name).ok()?;
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::strategy_validation::{
        ExceptionScopeInput, RuleInput, StatusMappingInput, StepInput,
    };
    use proptest::prelude::{prop_assert_eq, proptest};

    fn status(step_id: &str, status: &str) -> StepStatus {
        StepStatus {
            step_id: step_id.into(),
            status: status.into(),
        }
    }

    fn order() -> Strategy {
        let step = |id: &str, node_id: &str, timeout_ms| StepInput {
            id: id.into(),
            node_id: node_id.into(),
            forward_action: id.into(),
            reversal_action: format!("undo-{id}"),
            timeout_ms,
        };
        strategy_validation::validate(
            StrategyInput {
                business_type: "order".into(),
                description: "reserve and charge, then ship".into(),
                steps: vec![
                    step("reserve", "inventory", None),
                    step("charge", "payment", Some(5_000)),
                    step("ship", "shipping", None),
                ],
                first_set: vec!["reserve".into(), "charge".into()],
                rules: vec![RuleInput {
                    when: vec![status("reserve", "RESERVED"), status("charge", "PAID")],
                    trigger: vec!["ship".into()],
                }],
                end_statuses: vec![status("ship", "SHIPPED")],
                abnormal_statuses: vec![status("charge", "DECLINED")],
                status_mappings: vec![
                    StatusMappingInput {
                        step_id: String::new(),
                        parameter: "result_code".into(),
                        value: "E12".into(),
                        meaning: Some(Meaning::Abnormal),
                    },
                    StatusMappingInput {
                        step_id: "ship".into(),
                        parameter: "state".into(),
                        value: "delivered".into(),
                        meaning: Some(Meaning::End),
                    },
                ],
                exception_scopes: vec![ExceptionScopeInput {
                    step_id: "charge".into(),
                    reverse: vec!["reserve".into()],
                }],
                saga_timeout_ms: Some(600_000),
            },
            3,
            1_700_000_000_000,
        )
        .unwrap()
    }

    #[test]
    fn a_strategy_survives_the_round_trip_through_its_record() {
        let strategy = order();
        assert_eq!(
            strategy_from_record(strategy_to_record(&strategy)).unwrap(),
            strategy
        );
    }

    #[test]
    fn a_record_that_cannot_be_a_strategy_is_reported_corrupt() {
        type Case = (&'static str, fn(&mut StrategyRecord));
        let cases: Vec<Case> = vec![
            ("unknown meaning code", |r| r.status_mappings[0].meaning = 9),
            ("unknown step in a rule", |r| {
                r.rules[0].trigger.push("gone".into())
            }),
            ("unknown step in the first set", |r| {
                r.first_set.push("gone".into())
            }),
            ("unknown step in a scope", |r| {
                r.exception_scopes[0].reverse.push("gone".into())
            }),
            ("two scopes for one step", |r| {
                let again = r.exception_scopes[0].clone();
                r.exception_scopes.push(again);
            }),
            ("duplicate step id", |r| r.steps[1].id = "reserve".into()),
            ("zero timeout", |r| r.steps[0].timeout_ms = 0),
            ("version zero", |r| r.version = 0),
            ("bad business type", |r| r.business_type = "a b".into()),
        ];
        for (name, mutate) in cases {
            let mut record = strategy_to_record(&order());
            mutate(&mut record);
            match strategy_from_record(record) {
                Err(store::Error::Corrupt { table, detail }) => {
                    assert_eq!(table, "strategies", "{name}");
                    assert!(
                        detail.contains("\"order\"") || name == "bad business type",
                        "{name}: {detail}"
                    );
                }
                other => panic!("{name}: expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn page_tokens_carry_the_last_business_type() {
        for name in ["order", "payments/charge:v2", "a"] {
            assert_eq!(
                page_token::decode(&page_token::encode(name)).as_deref(),
                Some(name)
            );
        }
    }

    #[test]
    fn forged_page_tokens_are_refused() {
        let good = page_token::encode("order");
        let mut edited = good.clone();
        // Change one hex digit of the business type: the digest no longer matches.
        edited.replace_range(3..4, if &good[3..4] == "7" { "6" } else { "7" });
        for token in [
            "",
            "order",
            "s1.",
            "s1.6f72646572",
            "s2.6f72646572.00000000",
            "s1.6f72646572.00000000",
            "s1.zz.00000000",
            &good[..good.len() - 1],
            &edited,
            // A saga page token is not a strategy page token.
            "p1n0000000000000001",
        ] {
            assert_eq!(page_token::decode(token), None, "{token:?}");
        }
    }

    proptest! {
        #[test]
        fn page_tokens_round_trip_any_business_type(name in "[a-zA-Z0-9._:/-]{1,128}") {
            prop_assert_eq!(page_token::decode(&page_token::encode(&name)), Some(name));
        }

        #[test]
        fn arbitrary_page_tokens_never_panic(token in ".{0,64}") {
            let _ = page_token::decode(&token);
        }
    }
}
