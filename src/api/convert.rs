//! Record-model values to their protobuf form.
use crate::pb::api;
use crate::record::{self, ClaimOutcome, Record, RecordKey, State};

pub fn claim_outcome(o: ClaimOutcome) -> api::claim_response::Outcome {
    use api::claim_response::Outcome as O;
    match o {
        ClaimOutcome::Acquired {
            token,
            lease_deadline_ms,
            attempt,
            previous_owner,
            checkpoint,
            takeover: _,
        } => O::Acquired(api::Acquired {
            token,
            lease_deadline_ms,
            attempt,
            previous_owner,
            checkpoint,
        }),
        ClaimOutcome::InProgress {
            owner,
            lease_remaining_ms,
            attempt,
        } => O::InProgress(api::InProgress {
            owner,
            lease_remaining_ms,
            attempt,
        }),
        ClaimOutcome::Completed {
            result,
            code,
            completed_at_ms,
            token,
        } => O::Completed(api::Completed {
            result,
            completed_at_ms,
            token,
            code,
        }),
        ClaimOutcome::Failed {
            attempts,
            last_error,
        } => O::Failed(api::Failed {
            attempts,
            last_error,
        }),
    }
}

pub fn batch_item(item: Result<ClaimOutcome, record::RuleError>) -> api::ClaimBatchItem {
    use api::claim_batch_item::Outcome as B;
    use api::claim_response::Outcome as O;
    let outcome = match item {
        Ok(o) => match claim_outcome(o) {
            O::Acquired(a) => B::Acquired(a),
            O::InProgress(p) => B::InProgress(p),
            O::Completed(c) => B::Completed(c),
            O::Failed(f) => B::Failed(f),
        },
        Err(e) => B::Error(api::ItemError {
            reason: e.reason().to_string(),
            message: e.to_string(),
        }),
    };
    api::ClaimBatchItem {
        outcome: Some(outcome),
    }
}

pub fn record(k: &RecordKey, r: &Record) -> api::Record {
    let mut out = api::Record {
        namespace: k.namespace.clone(),
        key: k.key.clone(),
        attempts: r.attempts,
        max_attempts: r.max_attempts,
        fingerprint: r.fingerprint.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        expires_at_ms: record::expires_at(r),
        ..Default::default()
    };
    match &r.state {
        State::InProgress {
            owner,
            token,
            lease_deadline_ms,
            checkpoint,
            ..
        } => {
            out.state = api::RecordState::InProgress as i32;
            out.owner = owner.clone();
            out.token = *token;
            out.lease_deadline_ms = *lease_deadline_ms;
            out.checkpoint = checkpoint.clone();
        }
        State::Available {
            last_owner,
            last_error,
            checkpoint,
            ..
        } => {
            out.state = api::RecordState::Available as i32;
            out.owner = last_owner.clone();
            out.last_error = last_error.clone();
            out.checkpoint = checkpoint.clone();
        }
        State::Completed {
            token,
            result,
            code,
            completed_at_ms,
            ..
        } => {
            out.state = api::RecordState::Completed as i32;
            out.token = *token;
            out.result = result.clone();
            out.code = *code;
            out.completed_at_ms = *completed_at_ms;
        }
        State::Failed {
            last_owner,
            last_error,
            ..
        } => {
            out.state = api::RecordState::Failed as i32;
            out.owner = last_owner.clone();
            out.last_error = last_error.clone();
        }
    }
    out
}
