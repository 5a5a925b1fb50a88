//! Fulfillment strategies (S2): the model a saga is driven by, and the rule that recognises a
//! reported status (normal, abnormal or end). Validation of a strategy as submitted lives in
//! `strategy_validation`.

use std::collections::BTreeMap;

use crate::domain::Millis;

/// What a reported status means for the saga (S2 item 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meaning {
    Normal,
    Abnormal,
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub id: String,
    pub node_id: String,
    pub forward_action: String,
    /// Empty: the step has nothing to undo.
    pub reversal_action: String,
    pub timeout_ms: Millis,
}

/// "Step `step_id` reported status `status`".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepStatus {
    pub step_id: String,
    pub status: String,
}

/// When every `when` has been reported, trigger `trigger` (fan-in and fan-out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub when: Vec<StepStatus>,
    pub trigger: Vec<String>,
}

/// A status whose parameter `parameter` equals `value` (from `step_id`, or any step when
/// `None`) means `meaning`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMapping {
    pub step_id: Option<String>,
    pub parameter: String,
    pub value: String,
    pub meaning: Meaning,
}

/// A validated strategy: every step id it names exists, every rule can fire, every step can be
/// reached, and the flow has a way to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    pub business_type: String,
    pub version: u64,
    pub description: String,
    pub steps: Vec<Step>,
    pub first_set: Vec<String>,
    pub rules: Vec<Rule>,
    pub end_statuses: Vec<StepStatus>,
    pub abnormal_statuses: Vec<StepStatus>,
    pub status_mappings: Vec<StatusMapping>,
    /// Reporting step id → steps its abnormal status reverses. A step not listed reverses every
    /// triggered step.
    pub exception_scopes: BTreeMap<String, Vec<String>>,
    /// 0: sagas of this type have no default deadline.
    pub saga_timeout_ms: Millis,
    pub created_ms: Millis,
}

impl Strategy {
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// S2 item 5: recognise a status. Parameter mappings are checked first, in order (the
    /// first match wins); then the named end and abnormal statuses; anything else is normal.
    pub fn meaning_of(
        &self,
        step_id: &str,
        status: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Meaning {
        let mapped = self.status_mappings.iter().find(|m| {
            m.step_id.as_deref().is_none_or(|s| s == step_id)
                && parameters.get(&m.parameter).is_some_and(|v| *v == m.value)
        });
        if let Some(mapping) = mapped {
            return mapping.meaning;
        }
        let named = |list: &[StepStatus]| {
            list.iter()
                .any(|s| s.step_id == step_id && s.status == status)
        };
        if named(&self.end_statuses) {
            Meaning::End
        } else if named(&self.abnormal_statuses) {
            Meaning::Abnormal
        } else {
            Meaning::Normal
        }
    }

    /// S2 item 6: the steps an abnormal status from `step_id` reverses (if triggered).
    pub fn exception_scope(&self, step_id: &str) -> Vec<String> {
        match self.exception_scopes.get(step_id) {
            Some(scope) => scope.clone(),
            None => self.steps.iter().map(|s| s.id.clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategy() -> Strategy {
        Strategy {
            business_type: "order".into(),
            version: 1,
            description: String::new(),
            steps: ["reserve", "charge", "ship"]
                .iter()
                .map(|id| Step {
                    id: (*id).into(),
                    node_id: format!("{id}-node"),
                    forward_action: (*id).into(),
                    reversal_action: format!("undo-{id}"),
                    timeout_ms: 1_000,
                })
                .collect(),
            first_set: vec!["reserve".into()],
            rules: vec![],
            end_statuses: vec![StepStatus {
                step_id: "ship".into(),
                status: "SHIPPED".into(),
            }],
            abnormal_statuses: vec![StepStatus {
                step_id: "charge".into(),
                status: "DECLINED".into(),
            }],
            status_mappings: vec![StatusMapping {
                step_id: None,
                parameter: "result_code".into(),
                value: "E12".into(),
                meaning: Meaning::Abnormal,
            }],
            exception_scopes: BTreeMap::from([("charge".into(), vec!["reserve".into()])]),
            saga_timeout_ms: 0,
            created_ms: 0,
        }
    }

    #[test]
    fn a_status_is_recognised_by_its_preset_parameter_first() {
        let s = strategy();
        let params = BTreeMap::from([("result_code".to_owned(), "E12".to_owned())]);
        assert_eq!(s.meaning_of("ship", "SHIPPED", &params), Meaning::Abnormal);
        assert_eq!(
            s.meaning_of("ship", "SHIPPED", &BTreeMap::new()),
            Meaning::End
        );
        assert_eq!(
            s.meaning_of("charge", "DECLINED", &BTreeMap::new()),
            Meaning::Abnormal
        );
        assert_eq!(
            s.meaning_of("charge", "PAID", &BTreeMap::new()),
            Meaning::Normal
        );
    }

    #[test]
    fn the_exception_scope_defaults_to_every_step() {
        let s = strategy();
        assert_eq!(s.exception_scope("charge"), vec!["reserve".to_owned()]);
        assert_eq!(s.exception_scope("ship").len(), 3);
    }
}
