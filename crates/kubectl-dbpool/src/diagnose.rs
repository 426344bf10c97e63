//! `kubectl dbpool diagnose`: the origin's `health_check()`, diagnostics with recommendations.
//!
//! Lives here: judging one pool from its status and events ([`diagnose`], pure and unit-tested):
//! a finding per problem with a recommendation for each failing probe stage and SQLSTATE, and
//! whether the pool is healthy (the exit code); the readiness finding (network, server state or
//! login) is in `diagnose/readiness.rs`. Must not live here: API calls or the table formatting
//! of the other verbs.

use dbpool_api::{
    BreakerState, CONDITION_BREAKER_OPEN, CONDITION_READY, DbPool, DbPoolStatus, Phase,
    ProbeOutcome, ProbeStage, ProbeSummary, reason,
};
use k8s_openapi::{
    api::core::v1::Event, apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp,
};
use kube::ResourceExt;

use crate::render::{event_count, event_time, relative};

mod readiness;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Worth knowing, nothing to do.
    Info,
    /// Needs attention, the pool works.
    Warning,
    /// The pool is not usable.
    Failure,
}

/// One thing `diagnose` found, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What was found.
    pub what: String,
    /// What to do, if anything.
    pub recommendation: Option<String>,
}

/// The verdict on one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `namespace/name`.
    pub pool: String,
    /// Ready is True (phases Healthy and Degraded) and nothing holds the breaker open.
    pub healthy: bool,
    /// The findings, most important first.
    pub findings: Vec<Finding>,
}

fn finding(severity: Severity, what: String, recommendation: Option<&str>) -> Finding {
    Finding {
        severity,
        what,
        recommendation: recommendation.map(str::to_owned),
    }
}

/// What to do about a failure at `stage`.
pub fn stage_recommendation(stage: ProbeStage) -> &'static str {
    match stage {
        ProbeStage::Credentials => {
            "The Secret or key in spec.database.passwordSecretRef / caSecretRef is missing or unreadable: create or fix it (kubectl get secret -n NAMESPACE NAME); the operator probes again as soon as it changes."
        }
        ProbeStage::Resolve => {
            "spec.database.host does not resolve: check the host name and that its Service exists (kubectl get svc), and cluster DNS."
        }
        ProbeStage::Connect => {
            "Nothing accepts TCP connections at host:port: is PostgreSQL running (its pods, the Service's endpoints), is the port right, does a NetworkPolicy block the operator?"
        }
        ProbeStage::Tls => {
            "TLS failed: check spec.database.sslMode, the CA in caSecretRef and that the server certificate names the host; sslMode require/verify-* needs ssl=on on the server."
        }
        ProbeStage::Auth => {
            "The server refused the login: check the user, the password in the Secret and pg_hba.conf (see the SQLSTATE below)."
        }
        ProbeStage::Query => {
            "Connected, but SELECT 1 failed or timed out: the server is overloaded, locked or shutting down; read its log and check healthCheck.timeout."
        }
        ProbeStage::Role => {
            "The server is a standby but targetSessionAttrs wants read-write: a failover may be in progress, or host points at a replica; point it at the primary's Service."
        }
        ProbeStage::Saturation => {
            "pool.maxSize more connections would not fit into the server's free slots: raise max_connections, lower pool.maxSize, or find who holds the connections (pg_stat_activity)."
        }
    }
}

/// What to do about SQLSTATE `code`, for the codes a probe meets.
pub fn sqlstate_recommendation(code: &str) -> String {
    let known = match code {
        "28P01" => Some(
            "wrong password: the Secret's value does not match the role's password; fix the Secret (or ALTER ROLE ... PASSWORD), the operator retries at once",
        ),
        "28000" => Some(
            "no pg_hba.conf entry (or invalid authorization) for this user, database and address: add a host/hostssl line for the operator's pod network and reload PostgreSQL",
        ),
        "3D000" => {
            Some("the database in spec.database.dbname does not exist: fix the name or create it")
        }
        "42501" => Some("permission denied: GRANT CONNECT ON DATABASE ... TO the user"),
        "53300" => Some(
            "too many connections: every slot is taken; raise max_connections or find the clients that hold them (pg_stat_activity)",
        ),
        "57P01" | "57P02" => {
            Some("the server was shut down by an administrator or crashed: check its pods and log")
        }
        "57P03" => Some(
            "the server is starting up, shutting down or in recovery and not accepting connections yet: wait, and check its log if it stays",
        ),
        "25006" => {
            Some("read-only transaction: the server is a standby; point host at the primary")
        }
        _ => None,
    };
    match known {
        Some(text) => format!("SQLSTATE {code}: {text}."),
        None if code.starts_with("08") => format!(
            "SQLSTATE {code} (connection exception): the connection broke; check the network path and the server's log."
        ),
        None if code.starts_with("28") => format!(
            "SQLSTATE {code} (invalid authorization): check the user, the Secret and pg_hba.conf."
        ),
        None if code.starts_with("42") => format!(
            "SQLSTATE {code} (privilege or syntax): check the user's privileges on the database."
        ),
        None if code.starts_with("53") => format!(
            "SQLSTATE {code} (insufficient resources): the server is out of memory, disk or connections."
        ),
        None => format!(
            "SQLSTATE {code}: see https://www.postgresql.org/docs/current/errcodes-appendix.html"
        ),
    }
}

/// Judges `pool` from its status and `events` at `now`.
pub fn diagnose(pool: &DbPool, events: &[Event], now: Timestamp) -> Report {
    let name = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    let Some(status) = pool.status.as_ref().filter(|s| s.phase.is_some()) else {
        return not_reconciled(name);
    };
    let phase = status.phase.unwrap_or(Phase::Pending);
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    let ready = condition(CONDITION_READY).is_some_and(|c| c.status == "True");
    let held = condition(CONDITION_BREAKER_OPEN).filter(|c| c.reason == reason::HELD);
    let forced = condition(CONDITION_BREAKER_OPEN).filter(|c| c.reason == reason::FORCED_OPEN);

    let mut findings = Vec::new();
    findings.extend(stale_generation(pool, status));
    findings.extend(held_open(held, forced.is_some()));
    let on_purpose = held.is_some() || forced.is_some();
    findings.extend(phase_finding(phase, status, on_purpose, now));
    // Network, the server's state or the login (before the last probe's own findings).
    findings.extend(readiness::readiness_finding(status, now));
    if let Some(probe) = &status.last_probe {
        findings.extend(last_probe(probe, now));
    }
    findings.extend(warning_events(events, now));

    let healthy = ready && !on_purpose;
    if healthy && findings.iter().all(|f| f.severity == Severity::Info) {
        findings.insert(
            0,
            finding(
                Severity::Info,
                format!("{phase:?}: the database answers and the breaker is closed"),
                None,
            ),
        );
    }
    findings.sort_by_key(|f| match f.severity {
        Severity::Failure => 0,
        Severity::Warning => 1,
        Severity::Info => 2,
    });
    Report {
        pool: name,
        healthy,
        findings,
    }
}

/// The report on a pool without a status: the operator has not reconciled it.
fn not_reconciled(name: String) -> Report {
    Report {
        pool: name,
        healthy: false,
        findings: vec![finding(
            Severity::Failure,
            "no status: the operator has not reconciled this pool".to_owned(),
            Some(
                "Is the operator running, and does it watch this namespace (chart value watchNamespace)? kubectl get pods -n dbpool-system; its log names every pool it reconciles.",
            ),
        )],
    }
}

/// A warning when the status is for an older generation than the spec.
fn stale_generation(pool: &DbPool, status: &DbPoolStatus) -> Option<Finding> {
    if pool.metadata.generation.is_none() || status.observed_generation >= pool.metadata.generation
    {
        return None;
    }
    Some(finding(
        Severity::Warning,
        format!(
            "the status is for generation {:?}, the spec is at {:?}",
            status.observed_generation, pool.metadata.generation
        ),
        Some(
            "The operator has not acted on the latest spec yet: wait a few seconds, else check that it runs.",
        ),
    ))
}

/// A failure when the breaker is held open on purpose: a maintenance hold (`held`, its
/// condition) or spec.breaker.mode ForcedOpen (`forced`).
fn held_open(held: Option<&Condition>, forced: bool) -> Option<Finding> {
    if let Some(held) = held {
        Some(finding(
            Severity::Failure,
            format!("the breaker is held open on purpose: {}", held.message),
            Some("Maintenance hold: when it is over, kubectl dbpool release NAME."),
        ))
    } else if forced {
        Some(finding(
            Severity::Failure,
            "the breaker is held open by spec.breaker.mode ForcedOpen".to_owned(),
            Some(
                "Planned maintenance: set breaker.mode back to Auto when it is over (then kubectl dbpool reopen NAME).",
            ),
        ))
    } else {
        None
    }
}

/// What the phase says, if anything worth a finding (`on_purpose`: the breaker is held open on
/// purpose, already reported).
fn phase_finding(
    phase: Phase,
    status: &DbPoolStatus,
    on_purpose: bool,
    now: Timestamp,
) -> Option<Finding> {
    match phase {
        Phase::Pending => Some(finding(
            Severity::Warning,
            "not probed yet".to_owned(),
            Some("The first probe follows within seconds; if it stays Pending, check the operator."),
        )),
        Phase::BreakerOpen if !on_purpose => Some(breaker_open(status, now)),
        Phase::CoolingDown => Some(cooling_down(status, now)),
        Phase::Recovering => Some(finding(
            Severity::Failure,
            format!(
                "{} consecutive failed probes, retrying on the backoff schedule (next in {})",
                status.consecutive_failures,
                status.current_backoff.as_deref().unwrap_or("-")
            ),
            None,
        )),
        Phase::ConfigError => Some(finding(
            Severity::Failure,
            "configuration error: retries cannot succeed until the spec, its Secret or the server's configuration is fixed".to_owned(),
            None,
        )),
        Phase::Degraded => Some(finding(
            Severity::Warning,
            "the database answers, but pool.maxSize does not fit into its free connection slots".to_owned(),
            Some(stage_recommendation(ProbeStage::Saturation)),
        )),
        _ => None,
    }
}

/// The breaker is open after failures: since when, and when the next trial probe is.
fn breaker_open(status: &DbPoolStatus, now: Timestamp) -> Finding {
    let breaker = status.breaker.as_ref();
    let state = breaker.map_or(BreakerState::Open, |b| b.state);
    let since = breaker
        .and_then(|b| b.since.as_ref())
        .map(|t| format!(" since {}", relative(t.0, now)))
        .unwrap_or_default();
    let next = breaker
        .and_then(|b| b.next_probe_at.as_ref())
        .map(|t| format!("; next trial probe {}", relative(t.0, now)))
        .unwrap_or_default();
    finding(
        Severity::Failure,
        format!(
            "circuit breaker {state:?}{since} after {} consecutive failures{next}",
            status.consecutive_failures
        ),
        Some(
            "Applications treat the database as unavailable. Fix the cause below; once the database answers, kubectl dbpool reopen NAME closes the breaker without waiting for the trial.",
        ),
    )
}

/// The pool cools down after failed recovery attempts, and until when.
fn cooling_down(status: &DbPoolStatus, now: Timestamp) -> Finding {
    finding(
        Severity::Failure,
        format!(
            "cooling down after {} failed attempts{}",
            status.recovery_attempts,
            status
                .cooldown_until
                .as_ref()
                .map(|t| format!(", no probes until {}", relative(t.0, now)))
                .unwrap_or_default()
        ),
        Some(
            "Fix the cause below, then kubectl dbpool reopen NAME instead of waiting for the cooldown.",
        ),
    )
}

/// The last probe: a failure with the stage's (and SQLSTATE's) recommendation, or a success.
fn last_probe(probe: &ProbeSummary, now: Timestamp) -> Vec<Finding> {
    let when = relative(probe.time.0, now);
    let message = probe.message.as_deref().unwrap_or("");
    if probe.outcome == ProbeOutcome::Success {
        let detail = match (probe.connections, probe.max_connections) {
            (Some(c), Some(m)) => format!(", {c}/{m} connections"),
            _ => String::new(),
        };
        return vec![finding(
            Severity::Info,
            format!(
                "last probe ({when}) succeeded in {} ms: {message}{detail}",
                probe.latency_ms
            ),
            None,
        )];
    }
    let stage = probe.stage.unwrap_or(ProbeStage::Connect);
    let mut findings = vec![finding(
        Severity::Failure,
        format!(
            "last probe ({when}) failed at stage {} ({}): {message}",
            stage.name(),
            probe.outcome.name()
        ),
        Some(stage_recommendation(stage)),
    )];
    if message.contains("(adaptive timeout ") {
        findings.push(finding(
            Severity::Info,
            "the stage timed out at its adaptive timeout, learned from this server's latency \
             (healthCheck.adaptiveTimeout; each timeout in a row doubles it, up to \
             healthCheck.timeout)"
                .to_owned(),
            Some(
                "A black hole or a stalled server is noticed this way in a fraction of \
                 healthCheck.timeout. If the server is only slow and the breaker opens falsely, \
                 raise breaker.failureThreshold or set healthCheck.adaptiveTimeout: false.",
            ),
        ));
    }
    if let Some(code) = probe.sql_state.as_deref() {
        findings.push(Finding {
            severity: Severity::Failure,
            what: format!("the server answered SQLSTATE {code}"),
            recommendation: Some(sqlstate_recommendation(code)),
        });
    }
    findings
}

/// The last five Warning events, newest first.
fn warning_events(events: &[Event], now: Timestamp) -> Vec<Finding> {
    let warnings: Vec<&Event> = events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .collect();
    warnings
        .iter()
        .rev()
        .take(5)
        .map(|e| {
            finding(
                Severity::Info,
                format!(
                    "event {} x{} ({}): {}",
                    e.reason.as_deref().unwrap_or("?"),
                    event_count(e),
                    relative(event_time(e), now),
                    e.message.as_deref().unwrap_or("")
                ),
                None,
            )
        })
        .collect()
}

/// The report as text.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "DbPool {}: {}\n",
        report.pool,
        if report.healthy {
            "HEALTHY"
        } else {
            "UNHEALTHY"
        }
    );
    for f in &report.findings {
        let tag = match f.severity {
            Severity::Failure => "FAIL",
            Severity::Warning => "WARN",
            Severity::Info => "ok  ",
        };
        out.push_str(&format!("[{tag}] {}\n", f.what));
        if let Some(r) = &f.recommendation {
            out.push_str(&format!("       -> {r}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbpool_api::{DbPoolSpec, DbPoolStatus, ProbeSummary};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

    fn pool(status: Option<DbPoolStatus>) -> DbPool {
        let spec: Result<DbPoolSpec, _> = serde_json::from_value(serde_json::json!({
            "database": {"host": "h", "dbname": "d", "user": "u"}
        }));
        let mut pool = DbPool::new("orders", spec.unwrap_or_else(|e| panic!("spec: {e}")));
        pool.metadata.namespace = Some("shop".into());
        pool.metadata.generation = Some(1);
        pool.status = status;
        pool
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(now()),
            observed_generation: Some(1),
        }
    }

    fn failing(outcome: ProbeOutcome, stage: ProbeStage, sql_state: Option<&str>) -> DbPoolStatus {
        DbPoolStatus {
            observed_generation: Some(1),
            phase: Some(if outcome == ProbeOutcome::ConfigFailure {
                Phase::ConfigError
            } else {
                Phase::Recovering
            }),
            consecutive_failures: 2,
            last_probe: Some(ProbeSummary {
                time: MicroTime(now()),
                outcome,
                stage: Some(stage),
                latency_ms: 1,
                message: Some("boom".into()),
                sql_state: sql_state.map(str::to_owned),
                server_version: None,
                in_recovery: None,
                connections: None,
                max_connections: None,
            }),
            conditions: vec![cond(CONDITION_READY, "False", "Recovering", "boom")],
            ..DbPoolStatus::default()
        }
    }

    #[test]
    fn no_status_is_unhealthy_and_points_at_the_operator() {
        let report = diagnose(&pool(None), &[], now());
        assert!(!report.healthy);
        assert!(render(&report).contains("Is the operator running"));
    }

    #[test]
    fn an_adaptive_timeout_is_explained() {
        let mut status = failing(ProbeOutcome::TransientFailure, ProbeStage::Query, None);
        if let Some(probe) = status.last_probe.as_mut() {
            probe.message =
                Some("SELECT 1 timed out (adaptive timeout 250ms, probe timeout 5s)".into());
        }
        let text = render(&diagnose(&pool(Some(status)), &[], now()));
        assert!(text.contains("adaptive timeout 250ms"), "{text}");
        assert!(
            text.contains("healthCheck.adaptiveTimeout: false"),
            "{text}"
        );
        let plain = render(&diagnose(
            &pool(Some(failing(
                ProbeOutcome::TransientFailure,
                ProbeStage::Query,
                None,
            ))),
            &[],
            now(),
        ));
        assert!(!plain.contains("adaptiveTimeout"), "{plain}");
    }

    #[test]
    fn every_failing_stage_gets_its_recommendation() {
        for stage in ProbeStage::ALL {
            let report = diagnose(
                &pool(Some(failing(ProbeOutcome::TransientFailure, stage, None))),
                &[],
                now(),
            );
            assert!(!report.healthy);
            let text = render(&report);
            assert!(text.contains(stage_recommendation(stage)), "{text}");
            assert!(text.contains(&format!("stage {}", stage.name())), "{text}");
        }
    }

    #[test]
    fn sqlstates_get_their_recommendation() {
        let report = diagnose(
            &pool(Some(failing(
                ProbeOutcome::ConfigFailure,
                ProbeStage::Auth,
                Some("28P01"),
            ))),
            &[],
            now(),
        );
        let text = render(&report);
        assert!(text.contains("SQLSTATE 28P01: wrong password"), "{text}");
        assert!(sqlstate_recommendation("08006").contains("connection exception"));
        assert!(sqlstate_recommendation("XX000").contains("errcodes-appendix"));
    }

    #[test]
    fn the_report_tells_the_login_from_the_network() {
        let mut status = failing(ProbeOutcome::ConfigFailure, ProbeStage::Auth, Some("28P01"));
        status.readiness = Some(dbpool_api::ReadinessStatus {
            state: dbpool_api::Readiness::Accepting,
            since: MicroTime(now() - k8s_openapi::jiff::SignedDuration::from_secs(10)),
        });
        let text = render(&diagnose(&pool(Some(status)), &[], now()));
        let at = (now() - k8s_openapi::jiff::SignedDuration::from_secs(10)).strftime("%H:%M:%S");
        assert!(
            text.contains(&format!(
                "accepting since {at} UTC, 10s ago; login fails with 28P01"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_healthy_pool_is_healthy_and_a_held_one_is_not() {
        let mut status = DbPoolStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Healthy),
            conditions: vec![cond(CONDITION_READY, "True", "ProbeSucceeded", "ok")],
            ..DbPoolStatus::default()
        };
        let report = diagnose(&pool(Some(status.clone())), &[], now());
        assert!(report.healthy, "{report:?}");
        status.conditions.push(cond(
            CONDITION_BREAKER_OPEN,
            "True",
            reason::HELD,
            "held by alice: drill",
        ));
        status.phase = Some(Phase::BreakerOpen);
        status.conditions[0].status = "False".into();
        let report = diagnose(&pool(Some(status)), &[], now());
        assert!(!report.healthy);
        assert!(render(&report).contains("held by alice: drill"));
    }
}
