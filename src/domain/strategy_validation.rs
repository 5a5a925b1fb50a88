//! Validation of a strategy as submitted: every problem found at once, each naming its field.
//!
//! The input is plain data (strings, an optional meaning, durations in signed milliseconds) so
//! that every edge — gRPC, the CLI's files, tests — can build it without this module knowing
//! any wire type. `validate` is pure: the version and the creation time are handed in.
//!
//! Besides the shape of each field, it checks the flow as a whole: a rule fires only once all
//! its `when` steps have been triggered, so the steps a saga can ever trigger are a fixpoint
//! from the first set through the rules that can fire. A rule waiting on a step outside that
//! fixpoint can never fire, and a step outside it can never run; both are refused, so a stored
//! strategy has no dead parts.

use std::collections::{BTreeMap, BTreeSet};

use crate::domain::ids::{self, BusinessType};
use crate::domain::strategy::{Meaning, Rule, StatusMapping, Step, StepStatus, Strategy};
use crate::domain::{Millis, Violation};

/// A step that does not say how long to wait for its report gets this long.
pub const DEFAULT_STEP_TIMEOUT_MS: Millis = 30_000;
/// Step and saga timeouts are bounded so that `now + timeout` can never overflow and a typo
/// of a few zeros is caught instead of parking a saga for centuries.
pub const MAX_TIMEOUT_MS: Millis = 366 * 24 * 60 * 60 * 1000;
/// Step ids and node ids: 1 to this many letters, digits and `ID_ALLOWED`.
pub const MAX_ID_LEN: usize = 64;
pub const ID_ALLOWED: &str = "._-";
/// Action names, status names and parameter names.
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_VALUE_LEN: usize = 256;
pub const MAX_DESCRIPTION_LEN: usize = 2048;
/// Bounds on list lengths keep one strategy (stored whole, read by every saga of its type)
/// small; real flows are far below them.
pub const MAX_STEPS: usize = 256;
pub const MAX_RULES: usize = 1024;
pub const MAX_LIST: usize = 1024;

/// A strategy as a client submitted it, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrategyInput {
    pub business_type: String,
    pub description: String,
    pub steps: Vec<StepInput>,
    pub first_set: Vec<String>,
    pub rules: Vec<RuleInput>,
    pub end_statuses: Vec<StepStatus>,
    pub abnormal_statuses: Vec<StepStatus>,
    pub status_mappings: Vec<StatusMappingInput>,
    pub exception_scopes: Vec<ExceptionScopeInput>,
    /// `None`: sagas of this type have no default deadline.
    pub saga_timeout_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepInput {
    pub id: String,
    pub node_id: String,
    pub forward_action: String,
    /// Empty: the step has nothing to undo.
    pub reversal_action: String,
    /// `None`: `DEFAULT_STEP_TIMEOUT_MS`. Signed, so a negative duration from the wire reaches
    /// validation and is explained rather than wrapped around.
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleInput {
    pub when: Vec<StepStatus>,
    pub trigger: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusMappingInput {
    /// Empty: any step.
    pub step_id: String,
    pub parameter: String,
    pub value: String,
    /// `None`: the client left it unspecified (or sent a value this sagad does not know).
    pub meaning: Option<Meaning>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExceptionScopeInput {
    pub step_id: String,
    pub reverse: Vec<String>,
}

/// Validates `input` and, if nothing is wrong, returns it as a `Strategy` with `version` and
/// `created_ms`. Otherwise returns every violation found, in field order.
pub fn validate(
    input: StrategyInput,
    version: u64,
    created_ms: Millis,
) -> Result<Strategy, Vec<Violation>> {
    let mut check = Check {
        violations: Vec::new(),
    };
    let known: BTreeSet<&str> = input.steps.iter().map(|s| s.id.as_str()).collect();
    let known_list = known_list(&known);

    if let Err(e) = BusinessType::parse(&input.business_type) {
        check.add("strategy.business_type", e.to_string());
    }
    // Free text for operators, never matched against anything, so only its size is bounded:
    // lines, tabs and surrounding spaces are the operator's to choose.
    if let Some(long) = crate::domain::saga::too_long(
        "strategy.description",
        &input.description,
        MAX_DESCRIPTION_LEN,
    ) {
        check.violations.push(long);
    }

    let steps = check_steps(&mut check, &input.steps);
    check_first_set(&mut check, &input.first_set, &known, &known_list);
    let terminal = check_statuses(
        &mut check,
        &input.end_statuses,
        &input.abnormal_statuses,
        &known,
        &known_list,
    );
    check_rules(&mut check, &input.rules, &terminal, &known, &known_list);
    check_mappings(&mut check, &input.status_mappings, &known, &known_list);
    let scopes = check_scopes(&mut check, &input.exception_scopes, &known, &known_list);
    let saga_timeout_ms = match input.saga_timeout_ms {
        None => 0,
        Some(ms) => check
            .timeout("strategy.saga_timeout", ms, "or unset for no deadline")
            .unwrap_or(0),
    };
    check_flow(&mut check, &input, &terminal, &known);
    check_way_to_end(&mut check, &input);

    if !check.violations.is_empty() {
        return Err(check.violations);
    }
    Ok(Strategy {
        business_type: input.business_type,
        version,
        description: input.description,
        steps,
        first_set: input.first_set,
        rules: input
            .rules
            .into_iter()
            .map(|r| Rule {
                when: r.when,
                trigger: r.trigger,
            })
            .collect(),
        end_statuses: input.end_statuses,
        abnormal_statuses: input.abnormal_statuses,
        status_mappings: input
            .status_mappings
            .into_iter()
            .filter_map(|m| {
                // Every meaning is known here: a missing one was a violation above.
                Some(StatusMapping {
                    step_id: (!m.step_id.is_empty()).then_some(m.step_id),
                    parameter: m.parameter,
                    value: m.value,
                    meaning: m.meaning?,
                })
            })
            .collect(),
        exception_scopes: scopes,
        saga_timeout_ms,
        created_ms,
    })
}

/// Collects violations; each helper reports and carries on, so one pass finds everything.
struct Check {
    violations: Vec<Violation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Required {
    Yes(&'static str),
    No,
}

impl Check {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(Violation::new(field, description));
    }

    fn count(&mut self, field: &str, len: usize, max: usize) {
        if len > max {
            self.add(
                field,
                format!("has {len} entries; at most {max} are allowed"),
            );
        }
    }

    /// Step ids and node ids: short, and safe to show and match anywhere.
    fn id(&mut self, field: &str, text: &str) {
        let error = if text.is_empty() {
            Some(ids::Error::Empty)
        } else if text.chars().count() > MAX_ID_LEN {
            Some(ids::Error::TooLong {
                len: text.chars().count(),
                max: MAX_ID_LEN,
            })
        } else {
            text.chars()
                .find(|c| !(c.is_ascii_alphanumeric() || ID_ALLOWED.contains(*c)))
                .map(|found| ids::Error::BadCharacter {
                    found,
                    allowed: ID_ALLOWED,
                })
        };
        if let Some(e) = error {
            self.add(field, e.to_string());
        }
    }

    /// Free text that is matched exactly later (actions, statuses, parameters): printable,
    /// and without surrounding spaces, which would make a match silently fail.
    fn text(&mut self, field: &str, text: &str, max: usize, required: Required) {
        if text.is_empty() {
            if let Required::Yes(what) = required {
                self.add(field, format!("is required: {what}"));
            }
            return;
        }
        if let Some(problem) = crate::domain::name_problem(text, max) {
            self.add(field, problem);
        }
    }

    fn step_ref(&mut self, field: &str, id: &str, known: &BTreeSet<&str>, known_list: &str) {
        if id.is_empty() {
            self.add(field, format!("is required: a step id ({known_list})"));
        } else if !known.contains(id) {
            self.add(
                field,
                format!(
                    "names step {id:?}, which is not among strategy.steps ({known_list}); add the \
                     step or fix the name"
                ),
            );
        }
    }

    fn status_name(&mut self, field: &str, status: &str) {
        self.text(
            field,
            status,
            MAX_NAME_LEN,
            Required::Yes("the status name the step reports, e.g. PAID"),
        );
    }

    /// Refuses a repeated entry; `describe` gets the index where it first appeared.
    fn unique<T: Ord>(
        &mut self,
        seen: &mut BTreeMap<T, usize>,
        value: T,
        index: usize,
        field: &str,
        describe: impl FnOnce(usize) -> String,
    ) {
        match seen.get(&value) {
            Some(&first) => self.add(field, describe(first)),
            None => {
                seen.insert(value, index);
            }
        }
    }

    /// A positive duration below `MAX_TIMEOUT_MS`; `None` (after reporting) otherwise.
    fn timeout(&mut self, field: &str, ms: i64, unset: &str) -> Option<Millis> {
        if ms <= 0 {
            self.add(field, format!("must be longer than zero, {unset}"));
            return None;
        }
        let ms = Millis::try_from(ms).unwrap_or(Millis::MAX);
        if ms > MAX_TIMEOUT_MS {
            self.add(
                field,
                format!(
                    "is {ms} ms; at most {MAX_TIMEOUT_MS} ms ({} days) are allowed",
                    MAX_TIMEOUT_MS / 86_400_000
                ),
            );
            return None;
        }
        Some(ms)
    }
}

fn known_list(known: &BTreeSet<&str>) -> String {
    if known.is_empty() {
        return "there are none".to_owned();
    }
    let names: Vec<String> = known.iter().map(|id| format!("{id:?}")).collect();
    format!("known: {}", names.join(", "))
}

fn check_steps(check: &mut Check, steps: &[StepInput]) -> Vec<Step> {
    if steps.is_empty() {
        check.add(
            "strategy.steps",
            "has no steps; a strategy needs at least one step (id, node_id, forward_action)",
        );
    }
    check.count("strategy.steps", steps.len(), MAX_STEPS);
    let mut seen = BTreeMap::new();
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let field = |name: &str| format!("strategy.steps[{i}].{name}");
        check.id(&field("id"), &step.id);
        if !step.id.is_empty() {
            check.unique(&mut seen, step.id.as_str(), i, &field("id"), |first| {
                format!(
                    "repeats the id {:?} of strategy.steps[{first}]; step ids must be unique",
                    step.id
                )
            });
        }
        check.id(&field("node_id"), &step.node_id);
        check.text(
            &field("forward_action"),
            &step.forward_action,
            MAX_NAME_LEN,
            Required::Yes("the action name the node is sent in Participant.Execute"),
        );
        check.text(
            &field("reversal_action"),
            &step.reversal_action,
            MAX_NAME_LEN,
            Required::No,
        );
        let timeout_ms = match step.timeout_ms {
            None => DEFAULT_STEP_TIMEOUT_MS,
            Some(ms) => check
                .timeout(&field("timeout"), ms, "or unset for the default 30s")
                .unwrap_or(DEFAULT_STEP_TIMEOUT_MS),
        };
        out.push(Step {
            id: step.id.clone(),
            node_id: step.node_id.clone(),
            forward_action: step.forward_action.clone(),
            reversal_action: step.reversal_action.clone(),
            timeout_ms,
        });
    }
    out
}

fn check_first_set(check: &mut Check, first_set: &[String], known: &BTreeSet<&str>, list: &str) {
    if first_set.is_empty() {
        check.add(
            "strategy.first_set",
            format!("is empty; name the steps to trigger when a saga starts ({list})"),
        );
    }
    let mut seen = BTreeMap::new();
    for (i, id) in first_set.iter().enumerate() {
        let field = format!("strategy.first_set[{i}]");
        check.step_ref(&field, id, known, list);
        check.unique(&mut seen, id.as_str(), i, &field, |first| {
            format!("repeats {id:?} of strategy.first_set[{first}]; list it once")
        });
    }
}

/// What a named status does to the saga: either way, the saga stops running rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    End,
    Abnormal,
}

/// Checks the named end and abnormal statuses; returns them (valid or not) with what they do
/// and where they were named, since a rule waiting for either can never fire.
fn check_statuses<'a>(
    check: &mut Check,
    end: &'a [StepStatus],
    abnormal: &'a [StepStatus],
    known: &BTreeSet<&str>,
    list: &str,
) -> BTreeMap<&'a StepStatus, (Terminal, String)> {
    let mut terminal = BTreeMap::new();
    for (list_name, statuses, meaning) in [
        ("end_statuses", end, Terminal::End),
        ("abnormal_statuses", abnormal, Terminal::Abnormal),
    ] {
        check.count(&format!("strategy.{list_name}"), statuses.len(), MAX_LIST);
        for (i, status) in statuses.iter().enumerate() {
            let at = format!("strategy.{list_name}[{i}]");
            check.step_ref(&format!("{at}.step_id"), &status.step_id, known, list);
            check.status_name(&format!("{at}.status"), &status.status);
            match terminal.get(status) {
                Some((Terminal::End, first)) if meaning == Terminal::Abnormal => check.add(
                    format!("{at}.status"),
                    format!(
                        "{} {:?} is also an end status ({first}); a status cannot both finish \
                         and reverse the saga",
                        status.step_id, status.status
                    ),
                ),
                Some((_, first)) => check.add(
                    format!("{at}.status"),
                    format!("repeats {first}; list it once"),
                ),
                None => {
                    terminal.insert(status, (meaning, at));
                }
            }
        }
    }
    terminal
}

fn check_rules(
    check: &mut Check,
    rules: &[RuleInput],
    terminal: &BTreeMap<&StepStatus, (Terminal, String)>,
    known: &BTreeSet<&str>,
    list: &str,
) {
    check.count("strategy.rules", rules.len(), MAX_RULES);
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("strategy.rules[{i}]");
        if rule.when.is_empty() {
            check.add(
                format!("{at}.when"),
                "is empty; a rule fires once every (step_id, status) in `when` has been \
                 reported, so it needs at least one",
            );
        }
        check.count(&format!("{at}.when"), rule.when.len(), MAX_LIST);
        check.count(&format!("{at}.trigger"), rule.trigger.len(), MAX_LIST);
        let mut seen = BTreeMap::new();
        for (j, condition) in rule.when.iter().enumerate() {
            let field = format!("{at}.when[{j}]");
            check.step_ref(&format!("{field}.step_id"), &condition.step_id, known, list);
            check.status_name(&format!("{field}.status"), &condition.status);
            check.unique(
                &mut seen,
                condition,
                j,
                &format!("{field}.status"),
                |first| format!("repeats the condition of {at}.when[{first}]; list it once"),
            );
            if let Some((meaning, named_at)) = terminal.get(condition) {
                let consequence = match meaning {
                    Terminal::End => "is an end status: the saga completes when it is reported",
                    Terminal::Abnormal => {
                        "is an abnormal status: the saga reverses when it is reported"
                    }
                };
                check.add(
                    format!("{field}.status"),
                    format!(
                        "{} {:?} {consequence} ({named_at}), so this rule can never fire",
                        condition.step_id, condition.status
                    ),
                );
            }
        }
        let mut seen = BTreeMap::new();
        for (k, id) in rule.trigger.iter().enumerate() {
            let field = format!("{at}.trigger[{k}]");
            check.step_ref(&field, id, known, list);
            check.unique(&mut seen, id.as_str(), k, &field, |first| {
                format!("repeats {id:?} of {at}.trigger[{first}]; list it once")
            });
        }
    }
}

fn check_mappings(
    check: &mut Check,
    mappings: &[StatusMappingInput],
    known: &BTreeSet<&str>,
    list: &str,
) {
    check.count("strategy.status_mappings", mappings.len(), MAX_LIST);
    for (i, mapping) in mappings.iter().enumerate() {
        let at = format!("strategy.status_mappings[{i}]");
        if !mapping.step_id.is_empty() {
            check.step_ref(&format!("{at}.step_id"), &mapping.step_id, known, list);
        }
        check.text(
            &format!("{at}.parameter"),
            &mapping.parameter,
            MAX_NAME_LEN,
            Required::Yes("the name of the status parameter to read, e.g. result_code"),
        );
        check.text(
            &format!("{at}.value"),
            &mapping.value,
            MAX_VALUE_LEN,
            Required::No,
        );
        if mapping.meaning.is_none() {
            check.add(
                format!("{at}.meaning"),
                "is required: NORMAL, ABNORMAL or END (what a status with this parameter value \
                 means)",
            );
        }
        // Mappings are tried in order and the first match wins: a later mapping that an
        // earlier one always matches first would silently never apply.
        let shadowed_by = mappings[..i].iter().position(|earlier| {
            earlier.parameter == mapping.parameter
                && earlier.value == mapping.value
                && (earlier.step_id.is_empty() || earlier.step_id == mapping.step_id)
        });
        if let Some(first) = shadowed_by {
            check.add(
                at,
                format!(
                    "can never apply: strategy.status_mappings[{first}] matches the same \
                     parameter value first (the first match wins); remove one or reorder them"
                ),
            );
        }
    }
}

fn check_scopes(
    check: &mut Check,
    scopes: &[ExceptionScopeInput],
    known: &BTreeSet<&str>,
    list: &str,
) -> BTreeMap<String, Vec<String>> {
    check.count("strategy.exception_scopes", scopes.len(), MAX_LIST);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut first_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, scope) in scopes.iter().enumerate() {
        let at = format!("strategy.exception_scopes[{i}]");
        check.step_ref(&format!("{at}.step_id"), &scope.step_id, known, list);
        if !scope.step_id.is_empty() {
            if let Some(first) = first_of.get(scope.step_id.as_str()) {
                check.add(
                    format!("{at}.step_id"),
                    format!(
                        "repeats the exception scope of step {:?} (strategy.exception_scopes[{first}]); \
                         give each step one scope listing every step it reverses",
                        scope.step_id
                    ),
                );
            } else {
                first_of.insert(&scope.step_id, i);
                out.insert(scope.step_id.clone(), scope.reverse.clone());
            }
        }
        check.count(&format!("{at}.reverse"), scope.reverse.len(), MAX_STEPS);
        let mut seen = BTreeMap::new();
        for (k, id) in scope.reverse.iter().enumerate() {
            let field = format!("{at}.reverse[{k}]");
            check.step_ref(&field, id, known, list);
            check.unique(&mut seen, id.as_str(), k, &field, |first| {
                format!("repeats {id:?} of {at}.reverse[{first}]; list it once")
            });
        }
    }
    out
}

/// The steps a saga can ever trigger, and which rules can ever fire: a fixpoint from the first
/// set through rules whose `when` steps are all triggerable. A rule that waits for a named
/// end or abnormal status never fires (the saga finishes or reverses first), and a rule with
/// an empty `when` is invalid, so neither counts.
fn reachability(
    first_set: &[String],
    rules: &[RuleInput],
    terminal: impl Fn(&StepStatus) -> bool,
) -> (BTreeSet<String>, Vec<bool>) {
    let mut reachable: BTreeSet<String> = first_set.iter().cloned().collect();
    let mut fires = vec![false; rules.len()];
    loop {
        let mut changed = false;
        for (i, rule) in rules.iter().enumerate() {
            if fires[i]
                || rule.when.is_empty()
                || rule.when.iter().any(&terminal)
                || !rule.when.iter().all(|c| reachable.contains(&c.step_id))
            {
                continue;
            }
            fires[i] = true;
            changed = true;
            reachable.extend(rule.trigger.iter().cloned());
        }
        if !changed {
            return (reachable, fires);
        }
    }
}

fn check_flow(
    check: &mut Check,
    input: &StrategyInput,
    terminal: &BTreeMap<&StepStatus, (Terminal, String)>,
    known: &BTreeSet<&str>,
) {
    let (reachable, fires) =
        reachability(&input.first_set, &input.rules, |c| terminal.contains_key(c));
    for (i, rule) in input.rules.iter().enumerate() {
        if fires[i] {
            continue;
        }
        for (j, condition) in rule.when.iter().enumerate() {
            // Unknown steps were reported already; only name the real blockers here.
            if known.contains(condition.step_id.as_str()) && !reachable.contains(&condition.step_id)
            {
                check.add(
                    format!("strategy.rules[{i}].when[{j}].step_id"),
                    format!(
                        "waits for step {:?}, which can never be triggered (it is not in \
                         first_set and no rule that can fire triggers it), so this rule can \
                         never fire",
                        condition.step_id
                    ),
                );
            }
        }
    }
    let mut reported = BTreeSet::new();
    for (i, step) in input.steps.iter().enumerate() {
        if step.id.is_empty() || reachable.contains(&step.id) || !reported.insert(&step.id) {
            continue;
        }
        let dead_triggers: Vec<String> = input
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.trigger.contains(&step.id))
            .map(|(r, _)| format!("strategy.rules[{r}]"))
            .collect();
        let why = if dead_triggers.is_empty() {
            "it is not in first_set and no rule triggers it".to_owned()
        } else {
            format!(
                "it is not in first_set and only {}, which can never fire, trigger it",
                dead_triggers.join(", ")
            )
        };
        check.add(
            format!("strategy.steps[{i}].id"),
            format!("step {:?} can never be triggered: {why}", step.id),
        );
    }
}

fn check_way_to_end(check: &mut Check, input: &StrategyInput) {
    let end_mapping = input
        .status_mappings
        .iter()
        .any(|m| m.meaning == Some(Meaning::End));
    if input.end_statuses.is_empty() && !end_mapping {
        check.add(
            "strategy.end_statuses",
            "is empty and no status mapping means END, so a saga of this type could never \
             complete; add an end status, e.g. {step_id: \"ship\", status: \"SHIPPED\"}",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, ProptestConfig, any, prop_assert, prop_assert_eq, proptest};
    // Explicit, so it wins over the domain's `Strategy` brought in by `super::*` only by name.
    use proptest::strategy::Strategy as Generator;

    fn status(step_id: &str, status: &str) -> StepStatus {
        StepStatus {
            step_id: step_id.into(),
            status: status.into(),
        }
    }

    fn step(id: &str, node_id: &str) -> StepInput {
        StepInput {
            id: id.into(),
            node_id: node_id.into(),
            forward_action: id.into(),
            reversal_action: format!("undo-{id}"),
            timeout_ms: None,
        }
    }

    /// The order flow of the README: reserve and charge in parallel, ship once both report.
    fn order() -> StrategyInput {
        StrategyInput {
            business_type: "order".into(),
            description: "reserve and charge, then ship".into(),
            steps: vec![
                step("reserve", "inventory"),
                step("charge", "payment"),
                step("ship", "shipping"),
            ],
            first_set: vec!["reserve".into(), "charge".into()],
            rules: vec![RuleInput {
                when: vec![status("reserve", "RESERVED"), status("charge", "PAID")],
                trigger: vec!["ship".into()],
            }],
            end_statuses: vec![status("ship", "SHIPPED")],
            abnormal_statuses: vec![status("charge", "DECLINED")],
            status_mappings: vec![StatusMappingInput {
                step_id: String::new(),
                parameter: "result_code".into(),
                value: "E12".into(),
                meaning: Some(Meaning::Abnormal),
            }],
            exception_scopes: vec![ExceptionScopeInput {
                step_id: "charge".into(),
                reverse: vec!["reserve".into()],
            }],
            saga_timeout_ms: Some(600_000),
        }
    }

    fn fields(violations: &[Violation]) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn a_multi_line_description_is_accepted() {
        let mut input = order();
        input.description =
            "  Reserve and charge, then ship.\n\n\tRefunds: see the runbook.\r\n".into();
        let strategy = validate(input.clone(), 1, 0).expect("free text");
        assert_eq!(strategy.description, input.description);
    }

    #[test]
    fn a_valid_strategy_becomes_the_domain_model_with_its_version_and_time() {
        let strategy = validate(order(), 7, 1_700_000_000_000).unwrap();
        assert_eq!(strategy.version, 7);
        assert_eq!(strategy.created_ms, 1_700_000_000_000);
        assert_eq!(strategy.business_type, "order");
        assert_eq!(strategy.steps.len(), 3);
        assert_eq!(strategy.first_set, vec!["reserve", "charge"]);
        assert_eq!(strategy.rules[0].trigger, vec!["ship"]);
        assert_eq!(strategy.saga_timeout_ms, 600_000);
        assert_eq!(strategy.status_mappings[0].step_id, None);
        assert_eq!(strategy.status_mappings[0].meaning, Meaning::Abnormal);
        assert_eq!(strategy.exception_scope("charge"), vec!["reserve"]);
        assert_eq!(strategy.exception_scope("ship").len(), 3);
    }

    #[test]
    fn an_unset_step_timeout_defaults_to_thirty_seconds() {
        let mut input = order();
        input.steps[2].timeout_ms = Some(90_000);
        let strategy = validate(input, 1, 0).unwrap();
        assert_eq!(strategy.steps[0].timeout_ms, DEFAULT_STEP_TIMEOUT_MS);
        assert_eq!(strategy.steps[0].timeout_ms, 30_000);
        assert_eq!(strategy.steps[2].timeout_ms, 90_000);
    }

    #[test]
    fn an_unset_saga_timeout_means_no_deadline() {
        let mut input = order();
        input.saga_timeout_ms = None;
        assert_eq!(validate(input, 1, 0).unwrap().saga_timeout_ms, 0);
    }

    #[test]
    fn a_mapping_for_one_step_keeps_its_step_id() {
        let mut input = order();
        input.status_mappings[0].step_id = "charge".into();
        let strategy = validate(input, 1, 0).unwrap();
        assert_eq!(
            strategy.status_mappings[0].step_id.as_deref(),
            Some("charge")
        );
    }

    #[test]
    fn an_end_mapping_is_a_way_to_end_without_end_statuses() {
        let mut input = order();
        input.end_statuses.clear();
        input.status_mappings.push(StatusMappingInput {
            step_id: "ship".into(),
            parameter: "state".into(),
            value: "delivered".into(),
            meaning: Some(Meaning::End),
        });
        assert!(validate(input, 1, 0).is_ok());
    }

    #[test]
    fn a_rule_that_triggers_nothing_only_records_its_statuses() {
        let mut input = order();
        input.rules.push(RuleInput {
            when: vec![status("ship", "PACKED")],
            trigger: vec![],
        });
        assert!(validate(input, 1, 0).is_ok());
    }

    #[test]
    fn a_chain_of_rules_reaches_steps_several_stages_deep() {
        let mut input = order();
        input.steps.push(step("notify", "mailer"));
        input.rules.push(RuleInput {
            when: vec![status("ship", "PACKED")],
            trigger: vec!["notify".into()],
        });
        // Listed before the rule that makes "ship" reachable: order does not matter.
        input.rules.swap(0, 1);
        assert!(validate(input, 1, 0).is_ok());
    }

    /// One mutation of the valid order strategy and the violation it must cause.
    struct Case {
        name: &'static str,
        mutate: fn(&mut StrategyInput),
        field: &'static str,
        says: &'static str,
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "empty business type",
                mutate: |s| s.business_type.clear(),
                field: "strategy.business_type",
                says: "is required",
            },
            Case {
                name: "over-long business type",
                mutate: |s| s.business_type = "o".repeat(129),
                field: "strategy.business_type",
                says: "at most 128",
            },
            Case {
                name: "business type with a space",
                mutate: |s| s.business_type = "my order".into(),
                field: "strategy.business_type",
                says: "contains ' '",
            },
            Case {
                name: "over-long description",
                mutate: |s| s.description = "d".repeat(MAX_DESCRIPTION_LEN + 1),
                field: "strategy.description",
                says: "at most 2048",
            },
            Case {
                name: "no steps",
                mutate: |s| {
                    s.steps.clear();
                    s.first_set.clear();
                    s.rules.clear();
                    s.end_statuses.clear();
                    s.abnormal_statuses.clear();
                    s.exception_scopes.clear();
                },
                field: "strategy.steps",
                says: "has no steps",
            },
            Case {
                name: "too many steps",
                mutate: |s| {
                    for i in 0..MAX_STEPS {
                        s.steps.push(step(&format!("extra{i}"), "n"));
                        s.first_set.push(format!("extra{i}"));
                    }
                },
                field: "strategy.steps",
                says: "at most 256",
            },
            Case {
                name: "duplicate step id",
                mutate: |s| s.steps[1].id = "reserve".into(),
                field: "strategy.steps[1].id",
                says: "repeats the id \"reserve\" of strategy.steps[0]",
            },
            Case {
                name: "empty step id",
                mutate: |s| s.steps[1].id.clear(),
                field: "strategy.steps[1].id",
                says: "is required",
            },
            Case {
                name: "step id with a bad character",
                mutate: |s| {
                    s.steps[0].id = "re serve".into();
                    s.first_set[0] = "re serve".into();
                    s.rules[0].when[0].step_id = "re serve".into();
                    s.exception_scopes[0].reverse[0] = "re serve".into();
                },
                field: "strategy.steps[0].id",
                says: "contains ' '; only letters, digits and ._-",
            },
            Case {
                name: "over-long step id",
                mutate: |s| {
                    let id = "s".repeat(65);
                    s.steps[2].id = id.clone();
                    s.rules[0].trigger[0] = id.clone();
                    s.end_statuses[0].step_id = id;
                },
                field: "strategy.steps[2].id",
                says: "at most 64",
            },
            Case {
                name: "empty node id",
                mutate: |s| s.steps[0].node_id.clear(),
                field: "strategy.steps[0].node_id",
                says: "is required",
            },
            Case {
                name: "node id with a bad character",
                mutate: |s| s.steps[0].node_id = "inventory:8080".into(),
                field: "strategy.steps[0].node_id",
                says: "contains ':'",
            },
            Case {
                name: "empty forward action",
                mutate: |s| s.steps[1].forward_action.clear(),
                field: "strategy.steps[1].forward_action",
                says: "is required: the action name",
            },
            Case {
                name: "forward action with surrounding spaces",
                mutate: |s| s.steps[1].forward_action = " charge".into(),
                field: "strategy.steps[1].forward_action",
                says: "leading or trailing spaces",
            },
            Case {
                name: "reversal action with a control character",
                mutate: |s| s.steps[1].reversal_action = "refund\n".into(),
                field: "strategy.steps[1].reversal_action",
                says: "control character",
            },
            Case {
                name: "zero step timeout",
                mutate: |s| s.steps[0].timeout_ms = Some(0),
                field: "strategy.steps[0].timeout",
                says: "must be longer than zero, or unset for the default 30s",
            },
            Case {
                name: "negative step timeout",
                mutate: |s| s.steps[0].timeout_ms = Some(-1_000),
                field: "strategy.steps[0].timeout",
                says: "must be longer than zero",
            },
            Case {
                name: "absurdly long step timeout",
                mutate: |s| s.steps[0].timeout_ms = Some(i64::MAX),
                field: "strategy.steps[0].timeout",
                says: "at most",
            },
            Case {
                name: "zero saga timeout",
                mutate: |s| s.saga_timeout_ms = Some(0),
                field: "strategy.saga_timeout",
                says: "or unset for no deadline",
            },
            Case {
                name: "negative saga timeout",
                mutate: |s| s.saga_timeout_ms = Some(-5),
                field: "strategy.saga_timeout",
                says: "must be longer than zero",
            },
            Case {
                name: "empty first set",
                mutate: |s| {
                    s.first_set.clear();
                    s.steps.truncate(1);
                    s.rules.clear();
                    s.end_statuses = vec![status("reserve", "RESERVED")];
                    s.abnormal_statuses.clear();
                    s.exception_scopes.clear();
                },
                field: "strategy.first_set",
                says: "is empty",
            },
            Case {
                name: "unknown step in the first set",
                mutate: |s| s.first_set[1] = "charg".into(),
                field: "strategy.first_set[1]",
                says: "names step \"charg\", which is not among strategy.steps",
            },
            Case {
                name: "first set lists a step twice",
                mutate: |s| s.first_set.push("reserve".into()),
                field: "strategy.first_set[2]",
                says: "repeats \"reserve\" of strategy.first_set[0]",
            },
            Case {
                name: "rule with an empty when",
                mutate: |s| {
                    s.rules.push(RuleInput {
                        when: vec![],
                        trigger: vec!["ship".into()],
                    })
                },
                field: "strategy.rules[1].when",
                says: "is empty",
            },
            Case {
                name: "unknown step in a rule's when",
                mutate: |s| s.rules[0].when[1].step_id = "pay".into(),
                field: "strategy.rules[0].when[1].step_id",
                says: "names step \"pay\"",
            },
            Case {
                name: "empty status name in a rule's when",
                mutate: |s| s.rules[0].when[1].status.clear(),
                field: "strategy.rules[0].when[1].status",
                says: "is required: the status name",
            },
            Case {
                name: "a rule's when repeats a condition",
                mutate: |s| s.rules[0].when.push(status("charge", "PAID")),
                field: "strategy.rules[0].when[2].status",
                says: "repeats the condition of strategy.rules[0].when[1]",
            },
            Case {
                name: "unknown step in a rule's trigger",
                mutate: |s| s.rules[0].trigger.push("notify".into()),
                field: "strategy.rules[0].trigger[1]",
                says: "names step \"notify\"",
            },
            Case {
                name: "a rule triggers a step twice",
                mutate: |s| s.rules[0].trigger.push("ship".into()),
                field: "strategy.rules[0].trigger[1]",
                says: "repeats \"ship\"",
            },
            Case {
                name: "a rule waits for an end status",
                mutate: |s| {
                    s.steps.push(step("notify", "mailer"));
                    s.rules.push(RuleInput {
                        when: vec![status("ship", "SHIPPED")],
                        trigger: vec!["notify".into()],
                    });
                },
                field: "strategy.rules[1].when[0].status",
                says: "is an end status: the saga completes when it is reported (strategy.end_statuses[0]), so this rule can never fire",
            },
            Case {
                name: "a rule waits for an abnormal status",
                mutate: |s| s.rules[0].when[1].status = "DECLINED".into(),
                field: "strategy.rules[0].when[1].status",
                says: "is an abnormal status",
            },
            Case {
                name: "a rule waits for a step nothing triggers",
                mutate: |s| {
                    s.steps.push(step("audit", "ledger"));
                    s.steps.push(step("archive", "ledger"));
                    s.rules.push(RuleInput {
                        when: vec![status("audit", "DONE")],
                        trigger: vec!["archive".into()],
                    });
                },
                field: "strategy.rules[1].when[0].step_id",
                says: "waits for step \"audit\", which can never be triggered",
            },
            Case {
                name: "a step no rule reaches",
                mutate: |s| s.steps.push(step("audit", "ledger")),
                field: "strategy.steps[3].id",
                says: "step \"audit\" can never be triggered: it is not in first_set and no rule triggers it",
            },
            Case {
                name: "a step only a dead rule reaches",
                mutate: |s| {
                    s.steps.push(step("audit", "ledger"));
                    s.steps.push(step("archive", "ledger"));
                    s.rules.push(RuleInput {
                        when: vec![status("audit", "DONE")],
                        trigger: vec!["archive".into()],
                    });
                },
                field: "strategy.steps[4].id",
                says: "only strategy.rules[1], which can never fire, trigger it",
            },
            Case {
                name: "steps that only wait for each other",
                mutate: |s| {
                    s.steps.push(step("a", "n"));
                    s.steps.push(step("b", "n"));
                    s.rules.push(RuleInput {
                        when: vec![status("a", "OK")],
                        trigger: vec!["b".into()],
                    });
                    s.rules.push(RuleInput {
                        when: vec![status("b", "OK")],
                        trigger: vec!["a".into()],
                    });
                },
                field: "strategy.steps[3].id",
                says: "can never be triggered",
            },
            Case {
                name: "a join that waits for a dead branch never fires",
                mutate: |s| {
                    s.steps.push(step("audit", "ledger"));
                    s.rules[0].when.push(status("audit", "DONE"));
                },
                field: "strategy.rules[0].when[2].step_id",
                says: "so this rule can never fire",
            },
            Case {
                name: "unknown step in an end status",
                mutate: |s| s.end_statuses[0].step_id = "shipping".into(),
                field: "strategy.end_statuses[0].step_id",
                says: "names step \"shipping\"",
            },
            Case {
                name: "empty end status name",
                mutate: |s| s.end_statuses[0].status.clear(),
                field: "strategy.end_statuses[0].status",
                says: "is required",
            },
            Case {
                name: "unknown step in an abnormal status",
                mutate: |s| s.abnormal_statuses[0].step_id = "pay".into(),
                field: "strategy.abnormal_statuses[0].step_id",
                says: "names step \"pay\"",
            },
            Case {
                name: "empty abnormal status name",
                mutate: |s| s.abnormal_statuses[0].status.clear(),
                field: "strategy.abnormal_statuses[0].status",
                says: "is required",
            },
            Case {
                name: "a status both ends and reverses",
                mutate: |s| s.abnormal_statuses.push(status("ship", "SHIPPED")),
                field: "strategy.abnormal_statuses[1].status",
                says: "is also an end status (strategy.end_statuses[0])",
            },
            Case {
                name: "an end status listed twice",
                mutate: |s| s.end_statuses.push(status("ship", "SHIPPED")),
                field: "strategy.end_statuses[1].status",
                says: "repeats strategy.end_statuses[0]",
            },
            Case {
                name: "no way to end",
                mutate: |s| s.end_statuses.clear(),
                field: "strategy.end_statuses",
                says: "could never complete",
            },
            Case {
                name: "unknown step in a mapping",
                mutate: |s| s.status_mappings[0].step_id = "pay".into(),
                field: "strategy.status_mappings[0].step_id",
                says: "names step \"pay\"",
            },
            Case {
                name: "mapping with an empty parameter",
                mutate: |s| s.status_mappings[0].parameter.clear(),
                field: "strategy.status_mappings[0].parameter",
                says: "is required: the name of the status parameter",
            },
            Case {
                name: "mapping with an unspecified meaning",
                mutate: |s| s.status_mappings[0].meaning = None,
                field: "strategy.status_mappings[0].meaning",
                says: "is required: NORMAL, ABNORMAL or END",
            },
            Case {
                name: "mapping shadowed by an earlier one",
                mutate: |s| {
                    s.status_mappings.push(StatusMappingInput {
                        step_id: "charge".into(),
                        parameter: "result_code".into(),
                        value: "E12".into(),
                        meaning: Some(Meaning::Normal),
                    })
                },
                field: "strategy.status_mappings[1]",
                says: "can never apply: strategy.status_mappings[0]",
            },
            Case {
                name: "unknown reporting step in an exception scope",
                mutate: |s| s.exception_scopes[0].step_id = "pay".into(),
                field: "strategy.exception_scopes[0].step_id",
                says: "names step \"pay\"",
            },
            Case {
                name: "unknown reversed step in an exception scope",
                mutate: |s| s.exception_scopes[0].reverse.push("release".into()),
                field: "strategy.exception_scopes[0].reverse[1]",
                says: "names step \"release\"",
            },
            Case {
                name: "an exception scope reverses a step twice",
                mutate: |s| s.exception_scopes[0].reverse.push("reserve".into()),
                field: "strategy.exception_scopes[0].reverse[1]",
                says: "repeats \"reserve\"",
            },
            Case {
                name: "two exception scopes for one step",
                mutate: |s| {
                    s.exception_scopes.push(ExceptionScopeInput {
                        step_id: "charge".into(),
                        reverse: vec!["ship".into()],
                    })
                },
                field: "strategy.exception_scopes[1].step_id",
                says: "repeats the exception scope of step \"charge\" (strategy.exception_scopes[0])",
            },
        ]
    }

    #[test]
    fn every_problem_is_named_by_its_field_and_says_what_to_fix() {
        for case in cases() {
            let mut input = order();
            (case.mutate)(&mut input);
            let violations = match validate(input, 1, 0) {
                Ok(_) => panic!("{}: was accepted", case.name),
                Err(violations) => violations,
            };
            let found = violations
                .iter()
                .find(|v| v.field == case.field && v.description.contains(case.says));
            assert!(
                found.is_some(),
                "{}: expected {} to say {:?}; got {violations:#?}",
                case.name,
                case.field,
                case.says
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut input = order();
        for case in cases() {
            // A subset of independent mutations, each touching its own field.
            if matches!(
                case.name,
                "empty business type"
                    | "duplicate step id"
                    | "empty node id"
                    | "unknown step in a rule's trigger"
                    | "mapping with an unspecified meaning"
                    | "two exception scopes for one step"
                    | "zero saga timeout"
            ) {
                (case.mutate)(&mut input);
            }
        }
        let violations = validate(input, 1, 0).unwrap_err();
        let fields = fields(&violations);
        for expected in [
            "strategy.business_type",
            "strategy.steps[1].id",
            "strategy.steps[0].node_id",
            "strategy.rules[0].trigger[1]",
            "strategy.status_mappings[0].meaning",
            "strategy.exception_scopes[1].step_id",
            "strategy.saga_timeout",
        ] {
            assert!(fields.contains(&expected), "{expected} missing: {fields:?}");
        }
    }

    #[test]
    fn an_unknown_step_is_reported_where_it_is_named_not_again_as_unreachable() {
        let mut input = order();
        input.rules[0].when[0].step_id = "reserv".into();
        let violations = validate(input, 1, 0).unwrap_err();
        // The typo is the one problem; "ship" becomes unreachable because of it, which is
        // also true and worth saying, but the typo must not be reported twice.
        let at_typo: Vec<_> = violations
            .iter()
            .filter(|v| v.field == "strategy.rules[0].when[0].step_id")
            .collect();
        assert_eq!(at_typo.len(), 1, "{violations:#?}");
    }

    #[test]
    fn the_list_of_known_steps_helps_fix_a_typo() {
        let mut input = order();
        input.first_set[0] = "reserv".into();
        let violations = validate(input, 1, 0).unwrap_err();
        let v = violations
            .iter()
            .find(|v| v.field == "strategy.first_set[0]")
            .unwrap();
        assert!(
            v.description
                .contains("known: \"charge\", \"reserve\", \"ship\""),
            "{}",
            v.description
        );
    }

    #[test]
    fn an_empty_input_lists_every_missing_part() {
        let violations = validate(StrategyInput::default(), 1, 0).unwrap_err();
        assert_eq!(
            fields(&violations),
            vec![
                "strategy.business_type",
                "strategy.steps",
                "strategy.first_set",
                "strategy.end_statuses",
            ]
        );
    }

    // ---- Properties ----

    /// Runs a saga through the strategy the way the engine will: trigger the first set, have
    /// every triggered step report each normal status a rule waits for, fire every rule whose
    /// conditions are all reported. Returns (steps triggered, rules fired).
    fn simulate(strategy: &Strategy) -> (BTreeSet<String>, BTreeSet<usize>) {
        let mut triggered: BTreeSet<String> = strategy.first_set.iter().cloned().collect();
        let mut fired = BTreeSet::new();
        let mut reported = BTreeSet::new();
        loop {
            let before = (triggered.len(), fired.len());
            for rule in &strategy.rules {
                for c in &rule.when {
                    let normal = strategy.meaning_of(&c.step_id, &c.status, &BTreeMap::new())
                        == Meaning::Normal;
                    if triggered.contains(&c.step_id) && normal {
                        reported.insert(c.clone());
                    }
                }
            }
            for (i, rule) in strategy.rules.iter().enumerate() {
                if !fired.contains(&i) && rule.when.iter().all(|c| reported.contains(c)) {
                    fired.insert(i);
                    triggered.extend(rule.trigger.iter().cloned());
                }
            }
            if before == (triggered.len(), fired.len()) {
                return (triggered, fired);
            }
        }
    }

    /// Random flows over up to six steps. Lists are drawn without repeats, so most refusals
    /// come from the flow itself (unreachable steps, rules waiting on dead or terminal
    /// statuses), which is what the property is about.
    fn arbitrary_strategy() -> impl Generator<Value = StrategyInput> {
        (1usize..=6).prop_flat_map(|n| {
            let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let subset = |min: usize| proptest::sample::subsequence(ids.clone(), min..=n);
            let status_name = proptest::sample::select(vec!["OK", "DONE", "FAILED", "END"]);
            let rule =
                (subset(0), status_name, subset(0)).prop_map(|(when, name, trigger)| RuleInput {
                    when: when.iter().map(|id| status(id, name)).collect(),
                    trigger,
                });
            (
                subset(0),
                proptest::collection::vec(rule, 0..6),
                proptest::sample::select(ids.clone()),
                proptest::option::of(proptest::sample::select(ids.clone())),
                Just(ids),
            )
                .prop_map(|(first_set, rules, end_step, abnormal_step, ids)| {
                    StrategyInput {
                        business_type: "random".into(),
                        steps: ids.iter().map(|id| step(id, "node")).collect(),
                        first_set,
                        rules,
                        end_statuses: vec![status(&end_step, "END")],
                        abnormal_statuses: abnormal_step
                            .map(|s| vec![status(&s, "FAILED")])
                            .unwrap_or_default(),
                        ..StrategyInput::default()
                    }
                })
        })
    }

    /// A layered flow: each rule waits only for earlier steps and triggers later ones, and
    /// every step is triggered by the first set or by some rule.
    fn layered_strategy() -> impl Generator<Value = StrategyInput> {
        (2usize..8, proptest::collection::vec(0usize..100, 16)).prop_map(|(n, picks)| {
            let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let rules = (1..n)
                .map(|i| {
                    let waits_for = picks[i] % i;
                    RuleInput {
                        when: vec![status(&ids[waits_for], "OK")],
                        trigger: vec![ids[i].clone()],
                    }
                })
                .collect();
            StrategyInput {
                business_type: "layered".into(),
                steps: ids.iter().map(|id| step(id, "node")).collect(),
                first_set: vec![ids[0].clone()],
                rules,
                end_statuses: vec![status(&ids[n - 1], "END")],
                ..StrategyInput::default()
            }
        })
    }

    proptest! {
        // About one random flow in eight validates; more cases keep the first property busy.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn a_validated_strategy_has_every_rule_fireable_and_every_step_reachable(
            input in arbitrary_strategy()
        ) {
            if let Ok(strategy) = validate(input, 1, 0) {
                let (triggered, fired) = simulate(&strategy);
                for step in &strategy.steps {
                    prop_assert!(triggered.contains(&step.id), "step {} unreachable", step.id);
                }
                prop_assert_eq!(fired.len(), strategy.rules.len());
            }
        }

        #[test]
        fn a_layered_flow_always_validates(input in layered_strategy()) {
            let strategy = validate(input, 1, 0);
            prop_assert!(strategy.is_ok(), "{:?}", strategy.err());
        }

        #[test]
        fn validation_never_panics_and_refusals_name_strategy_fields(
            input in arbitrary_strategy(),
            business_type in ".{0,20}",
            timeout in proptest::option::of(any::<i64>()),
        ) {
            let mut input = input;
            input.business_type = business_type;
            input.saga_timeout_ms = timeout;
            if let Err(violations) = validate(input, 1, 0) {
                prop_assert!(!violations.is_empty());
                for v in violations {
                    prop_assert!(v.field.starts_with("strategy."), "{}", v.field);
                    prop_assert!(!v.description.is_empty());
                }
            }
        }
    }
}
