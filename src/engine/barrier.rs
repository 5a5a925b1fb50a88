//! The barrier over the idempotency table: Idempotency.Guard as one ledger write. Both records
//! of the branch are read and the decision's record is written in the same write, and the
//! ledger runs writes one at a time, so two concurrent Guards for one branch can never both
//! be told to run an action, nor can a forward and a reversal race past each other.
//!
//! The records are ordinary participant records (`IdempotencyNamespace::Participant`): the
//! participant finishes a guarded action with the plain `finish`, and they expire with the
//! usual retention, except that collection keeps them while their saga may still reverse
//! (`Engine::collect_expired`).

use crate::domain::barrier::{self, Action, BranchKeys, Verdict};
use crate::domain::idempotency;
use crate::engine::{Engine, Error, convert, stored_record};
use crate::store::{IdempotencyKey, IdempotencyNamespace};

/// What Guard answers: the verdict, and the record it is about under its own names (after
/// PROCEED, exactly what the participant passes to Finish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    pub verdict: Verdict,
    pub scope: String,
    pub request_id: String,
    pub record: idempotency::Record,
}

/// Where a barrier record lives; the names were validated by `BranchKeys::parse`.
fn guard_key(scope: &str, request_id: &str) -> IdempotencyKey {
    IdempotencyKey {
        namespace: IdempotencyNamespace::Participant,
        scope: scope.to_owned(),
        key: request_id.to_owned(),
    }
}

/// Command ids sagad issues are `<gsn>:<kind><outbox id>.<send>`, under 80 characters; this
/// leaves room and bounds what a barrier record keeps.
const MAX_COMMAND_ID_CHARS: usize = 256;

impl Engine {
    /// The branch barrier: judges `action` of branch `branch_id` of saga `gsn` on node
    /// `node_id`, and registers what the verdict calls for, durably, before answering.
    pub async fn guard(
        &self,
        node_id: &str,
        gsn: &str,
        branch_id: &str,
        action: Action,
        command_id: &str,
    ) -> Result<Guarded, Error> {
        let keys = BranchKeys::parse(node_id, gsn, branch_id).map_err(Error::Invalid)?;
        if command_id.chars().count() > MAX_COMMAND_ID_CHARS
            || command_id.chars().any(char::is_control)
        {
            return Err(Error::invalid(
                "command_id",
                format!(
                    "is not a command id sagad sends (at most {MAX_COMMAND_ID_CHARS} characters, \
                     no control characters): give the command's command_id exactly as received, \
                     or leave it empty"
                ),
            ));
        }
        let sent_as = command_id.to_owned();
        let terms = self.terms(None);
        let now = self.clock.now_ms();
        let guarded = self
            .store
            .write(move |tx| -> Result<Guarded, Error> {
                let key_of = |whose: Action| guard_key(&keys.scope, keys.request_id(whose));
                let forward = stored_record(tx, &key_of(Action::Forward))?;
                let reversal = stored_record(tx, &key_of(Action::Reversal))?;
                let decision = barrier::on_guard(
                    action,
                    forward.as_ref(),
                    reversal.as_ref(),
                    &sent_as,
                    terms,
                    now,
                );
                if let Some((whose, record)) = decision.write() {
                    tx.put_idempotency(&key_of(whose), &convert::idempotency_to_record(record))?;
                }
                let (whose, record) = decision.shown();
                Ok(Guarded {
                    verdict: decision.verdict(),
                    scope: keys.scope.clone(),
                    request_id: keys.request_id(whose).to_owned(),
                    record: record.clone(),
                })
            })
            .await??;
        log(node_id, gsn, branch_id, action, &guarded);
        Ok(guarded)
    }
}

/// The two verdicts that say the saga's order of events went wrong on the node are worth an
/// operator's eye; the routine ones are DEBUG.
fn log(node_id: &str, gsn: &str, branch_id: &str, action: Action, guarded: &Guarded) {
    match guarded.verdict {
        Verdict::NullCompensation => tracing::info!(
            node = node_id,
            gsn,
            branch = branch_id,
            "barrier: reversal before its forward action; stored a null compensation"
        ),
        Verdict::Hanging => tracing::info!(
            node = node_id,
            gsn,
            branch = branch_id,
            "barrier: refused a forward action that arrived after its reversal"
        ),
        Verdict::Proceed | Verdict::Duplicate | Verdict::InProgress => tracing::debug!(
            node = node_id,
            gsn,
            branch = branch_id,
            ?action,
            verdict = ?guarded.verdict,
            "barrier"
        ),
    }
}
