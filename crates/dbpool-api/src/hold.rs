//! The maintenance hold: annotations that hold a pool's breaker open like `breaker.mode:
//! ForcedOpen`, without touching the spec that a GitOps tool would revert.
//!
//! Lives here: the annotation names, [`Hold`] (reading them) and its one-line description, which
//! the operator writes into the BreakerOpen condition and the Held event, and `kubectl dbpool`
//! prints. Must not live here: acting on a hold (the operator's reconcile) or setting one (the
//! plugin).

use std::collections::BTreeMap;

/// Annotation that holds the breaker open for maintenance; its value is why (must not be empty).
pub const HOLD_ANNOTATION: &str = "dbpool.io/hold";
/// Annotation naming who set the hold (`kubectl dbpool hold` takes it from a SelfSubjectReview).
pub const HELD_BY_ANNOTATION: &str = "dbpool.io/held-by";
/// Annotation naming who released the last hold (set by `kubectl dbpool release`).
pub const RELEASED_BY_ANNOTATION: &str = "dbpool.io/released-by";

/// A maintenance hold read from a DbPool's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Why the pool is held (the hold annotation's value).
    pub reason: String,
    /// Who held it, if recorded.
    pub by: Option<String>,
}

impl Hold {
    /// The hold the annotations declare, if any: the hold annotation with a non-blank value.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Self> {
        let reason = annotations.get(HOLD_ANNOTATION)?.trim();
        if reason.is_empty() {
            return None;
        }
        let by = annotations
            .get(HELD_BY_ANNOTATION)
            .map(|b| b.trim().to_owned())
            .filter(|b| !b.is_empty());
        Some(Self {
            reason: reason.to_owned(),
            by,
        })
    }

    /// One line naming who and why, e.g. `held by alice@example.com: failover drill`.
    pub fn describe(&self) -> String {
        format!(
            "held by {}: {}",
            self.by.as_deref().unwrap_or("an unknown user"),
            self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_hold_needs_a_reason() {
        assert_eq!(Hold::from_annotations(&annotations(&[])), None);
        assert_eq!(
            Hold::from_annotations(&annotations(&[(HOLD_ANNOTATION, "  ")])),
            None
        );
        let hold = Hold::from_annotations(&annotations(&[
            (HOLD_ANNOTATION, "failover drill"),
            (HELD_BY_ANNOTATION, "alice"),
        ]));
        assert_eq!(
            hold.map(|h| h.describe()).as_deref(),
            Some("held by alice: failover drill")
        );
        let anonymous = Hold::from_annotations(&annotations(&[(HOLD_ANNOTATION, "drill")]));
        assert_eq!(
            anonymous.map(|h| h.describe()).as_deref(),
            Some("held by an unknown user: drill")
        );
    }
}
