//! Steps 1 and 2 of the reconcile: observe the pool, and feed the engine what changed.
//!
//! Lives here: `Run::recall` (the pool's memory in this process, or one rebuilt from its
//! status), `Run::load_credentials`, `Run::apply_triggers` (which [`triggers`] fired, fed to the
//! engine, with what each one resets) and the wording of hold notes ([`hold_note`]). Must not
//! live here: which triggers fire (`triggers`, pure), the engine's rules (`dbpool-recovery`).

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::{
    ResourceExt,
    runtime::{events::EventType, reflector::ObjectRef},
};

use super::Run;
use crate::{
    api::{
        BreakerMode, DbPool, FORCE_REOPEN_ANNOTATION, ForceReopenRecord, Hold,
        RELEASED_BY_ANNOTATION, reason,
    },
    controller::{
        context::{Context, Plan, PoolMemory, Reason},
        credentials::Credentials,
        error::CredentialError,
        names::{pool_labels, spec_target_key},
        triggers::{Observed, Trigger, triggers},
    },
    recovery::{Policy, add},
};

impl Run {
    /// A run of `pool` on `memory`, under [`policy_of`] the pool.
    pub(super) fn new(pool: &DbPool, memory: PoolMemory) -> Self {
        let (hold, policy) = policy_of(pool);
        Self {
            key: ObjectRef::from_obj(pool),
            hold,
            policy,
            memory,
            effects: Vec::new(),
            notes: Vec::new(),
            stream: None,
            readiness_edge: false,
        }
    }

    /// Step 1: the pool's memory in this process, or a new one rebuilt from its status; and
    /// whether its probe connection was lost since the last reconcile.
    pub(super) fn recall(pool: &DbPool, ctx: &Context) -> (Self, bool) {
        let key = ObjectRef::from_obj(pool);
        let recalled = ctx.take_memory(pool, &key);
        let requested_at = recalled.requested;
        let mut memory = recalled.memory.unwrap_or_else(|| {
            // First reconcile of this pool in this process: its series start at 0 (only a
            // leader exports per-pool series).
            if let Some(metrics) = ctx.door.metrics() {
                metrics.pool_seen(&pool_labels(&key));
            }
            let (_, policy) = policy_of(pool);
            let status = recalled.watched_status.as_ref();
            let memory = PoolMemory::restore(pool, status, &policy, Timestamp::now());
            let held = memory.state.held_since.is_some();
            ctx.parts
                .fleet
                .restored(&key, &spec_target_key(pool), &memory.state, held);
            memory
        });
        if let Some(at) = requested_at {
            memory.wants.requested(at);
        }
        (Self::new(pool, memory), requested_at.is_some())
    }

    /// Step 1b: reads the Secrets the pool refers to (through the cache).
    pub(super) async fn load_credentials(
        &self,
        pool: &DbPool,
        ctx: &Context,
    ) -> Result<Credentials, CredentialError> {
        let db = &pool.spec.database;
        ctx.secrets
            .load(
                &pool.namespace().unwrap_or_default(),
                &db.host,
                db.password_secret_ref.as_ref(),
                db.ca_secret_ref.as_ref(),
            )
            .await
    }

    /// Step 2: feed the engine what changed since the last reconcile (`readiness_edge`: the
    /// instant the pool's target was seen accepting connections again, see `pings`).
    pub(super) fn apply_triggers(
        &mut self,
        pool: &DbPool,
        (connection_lost, edge): (bool, Option<Timestamp>),
        credentials: &Result<Credentials, CredentialError>,
    ) {
        let now = Timestamp::now();
        // What the probe logs in with and where: the Secrets' versions and spec.database, so
        // a changed host, port, database, user or TLS setting is probed at once too (not at the
        // next interval or, for a failing pool, after its backoff or cooldown).
        let database = serde_json::to_string(&pool.spec.database).unwrap_or_default();
        let fingerprint = match credentials {
            Ok(c) => format!("{} {database}", c.fingerprint),
            Err(e) => format!("error: {e} {database}"),
        };
        let token = pool.annotations().get(FORCE_REOPEN_ANNOTATION).cloned();
        let hold = self.hold.as_ref().map(Hold::describe);
        let observed = Observed {
            known_hold: self.memory.hold.as_deref(),
            hold: hold.as_deref(),
            known_generation: self.memory.generation,
            generation: pool.metadata.generation,
            force_reopen_token: token.as_deref(),
            handled_token: self
                .memory
                .last_force_reopen
                .as_ref()
                .map(|r| r.token.as_str()),
            connection_lost,
            failing: self.memory.state.consecutive_failures > 0,
            known_fingerprint: self.memory.credentials_fingerprint.as_deref(),
            fingerprint: &fingerprint,
            readiness_edge: edge.is_some(),
        };
        for trigger in triggers(&observed) {
            self.memory
                .apply(trigger.event(), now, &self.policy, &mut self.effects);
            self.memory.plan = plan_after(trigger, self.memory.state.last_probe_at, &self.policy);
            self.record_trigger(trigger, pool, token.as_deref(), hold.as_deref(), now);
        }
        self.memory.credentials_fingerprint = Some(fingerprint);
        if let Some(at) = edge.filter(|_| self.memory.state.trial_requested) {
            self.memory.wants.edge(at);
        }
        self.readiness_edge = edge.is_some();
    }

    /// What a fired trigger changes in the memory besides the engine: the generation seen, the
    /// force reopen acted on, the hold acted on (with its note).
    fn record_trigger(
        &mut self,
        trigger: Trigger,
        pool: &DbPool,
        token: Option<&str>,
        hold: Option<&str>,
        now: Timestamp,
    ) {
        match trigger {
            Trigger::SpecChanged => self.memory.generation = pool.metadata.generation,
            Trigger::ForceReopen => {
                self.memory.last_force_reopen = token.map(|token| ForceReopenRecord {
                    token: token.to_owned(),
                    time: MicroTime(now),
                });
            }
            Trigger::HoldChanged => {
                let released_by = pool.annotations().get(RELEASED_BY_ANNOTATION);
                self.notes.push(hold_note(
                    hold,
                    self.memory.hold.as_deref(),
                    released_by.map(String::as_str),
                    pool.spec.breaker.mode,
                ));
                self.memory.hold = hold.map(str::to_owned);
            }
            Trigger::ConnectionLost | Trigger::CredentialsChanged | Trigger::ReadinessAccepting => {
            }
        }
    }
}

/// The maintenance hold the pool's annotations declare, and its policy: a hold makes it
/// ForcedOpen (a hold is breaker.mode ForcedOpen set outside the spec, which GitOps would
/// revert).
pub(super) fn policy_of(pool: &DbPool) -> (Option<Hold>, Policy) {
    let hold = Hold::from_annotations(pool.annotations());
    let mut policy = pool.spec.policy();
    if hold.is_some() {
        policy.mode = BreakerMode::ForcedOpen;
    }
    (hold, policy)
}

/// The plan after `trigger` (see `context::schedule`): a lost connection waits `initialDelay`
/// after the last probe (a connection that dies right after every probe must not become a probe
/// loop); every other trigger follows the engine, which probes at once.
pub(super) fn plan_after(
    trigger: Trigger,
    last_probe_at: Option<Timestamp>,
    policy: &Policy,
) -> Plan {
    match (trigger, last_probe_at) {
        (Trigger::ConnectionLost, Some(last)) => {
            Plan::NotBefore(add(last, policy.initial_delay), Reason::LostConnection)
        }
        (Trigger::ConnectionLost, None)
        | (
            Trigger::SpecChanged
            | Trigger::HoldChanged
            | Trigger::ForceReopen
            | Trigger::CredentialsChanged
            | Trigger::ReadinessAccepting,
            _,
        ) => Plan::Engine,
    }
}

/// The event a hold change deserves: `hold` set (Held), or released (Released, naming who
/// released it and which hold it was).
pub(super) fn hold_note(
    hold: Option<&str>,
    before: Option<&str>,
    released_by: Option<&str>,
    mode: BreakerMode,
) -> (EventType, &'static str, String) {
    match hold {
        Some(now) => (
            EventType::Normal,
            reason::HELD,
            format!("circuit breaker {now}; probes continue, nothing closes it"),
        ),
        None => (
            EventType::Normal,
            reason::RELEASED,
            format!(
                "hold released by {} ({}); breaker.mode {mode:?} applies again",
                released_by.unwrap_or("an unknown user"),
                before.unwrap_or("no hold recorded"),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_a_lost_connection_waits_for_the_initial_delay() {
        let policy = Policy::default();
        let last = Timestamp::UNIX_EPOCH;
        assert_eq!(
            plan_after(Trigger::ConnectionLost, Some(last), &policy),
            Plan::NotBefore(add(last, policy.initial_delay), Reason::LostConnection)
        );
        assert_eq!(
            plan_after(Trigger::ConnectionLost, None, &policy),
            Plan::Engine
        );
        for trigger in [
            Trigger::SpecChanged,
            Trigger::HoldChanged,
            Trigger::ForceReopen,
            Trigger::CredentialsChanged,
        ] {
            assert_eq!(plan_after(trigger, Some(last), &policy), Plan::Engine);
        }
        assert_eq!(policy.initial_delay, Duration::from_secs(1));
    }

    #[test]
    fn hold_notes_say_who_and_what() {
        let (type_, reason, note) = hold_note(Some("held by ops"), None, None, BreakerMode::Auto);
        assert_eq!((type_, reason), (EventType::Normal, reason::HELD));
        assert!(note.contains("held by ops"), "{note}");
        let (_, reason, note) =
            hold_note(None, Some("held by ops"), Some("alice"), BreakerMode::Auto);
        assert_eq!(reason, reason::RELEASED);
        assert!(
            note.contains("alice") && note.contains("held by ops") && note.contains("Auto"),
            "{note}"
        );
        let (_, _, note) = hold_note(None, None, None, BreakerMode::Auto);
        assert!(note.contains("an unknown user") && note.contains("no hold recorded"));
    }
}
