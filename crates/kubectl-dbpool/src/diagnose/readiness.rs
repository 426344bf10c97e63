//! What `diagnose` makes of the target's readiness: is it the network, the server's state or
//! the login?
//!
//! Lives here: [`readiness_finding`] (pure): from the status's `readiness` (what the operator's
//! credential-free pings saw, and since when) and the last probe's own SQLSTATE, one finding
//! that names which of the three fails, e.g. "accepting since 12:03:05 UTC; login fails with
//! 28P01". Must not live here: API calls, the other findings (`diagnose`), the recommendations'
//! wording (`diagnose`'s `stage_recommendation` and `sqlstate_recommendation`).

use dbpool_api::{DbPoolStatus, ProbeOutcome, ProbeStage, ProbeSummary, Readiness};
use k8s_openapi::jiff::Timestamp;

use super::{Finding, Severity, finding, sqlstate_recommendation, stage_recommendation};
use crate::render::relative;

/// `t` as a wall-clock time in UTC, and how long ago: `12:03:05 UTC, 4m12s ago`.
fn clock(t: Timestamp, now: Timestamp) -> String {
    format!("{} UTC, {}", t.strftime("%H:%M:%S"), relative(t, now))
}

/// The finding on the pool's readiness, when the status has one: network (nothing accepts
/// connections), server state (57P03: starting up, recovering, shutting down) or login (the
/// server accepts connections; the login's own SQLSTATE says why it fails).
pub(super) fn readiness_finding(status: &DbPoolStatus, now: Timestamp) -> Option<Finding> {
    let readiness = status.readiness.as_ref()?;
    let since = clock(readiness.since.0, now);
    let probe = status.last_probe.as_ref();
    Some(match readiness.state {
        Readiness::Accepting => accepting(&since, readiness.since.0, probe),
        Readiness::Unreachable => finding(
            Severity::Failure,
            format!(
                "network: nothing accepts connections at the server's address (unreachable since {since})"
            ),
            Some(stage_recommendation(ProbeStage::Connect)),
        ),
        Readiness::StartingUp => Finding {
            severity: Severity::Failure,
            what: format!(
                "server state: the server answers but does not accept connections yet: starting up, in recovery or shutting down (57P03 since {since}); the login is tried the moment it accepts"
            ),
            recommendation: Some(sqlstate_recommendation("57P03")),
        },
        Readiness::ConfigAnswer => finding(
            Severity::Failure,
            format!(
                "login configuration: the server refuses this pool's connections before any password (pg_hba.conf, or TLS) since {since}"
            ),
            Some(stage_recommendation(ProbeStage::Tls)),
        ),
        Readiness::Rejected | Readiness::NotPostgres => finding(
            Severity::Failure,
            format!(
                "server state: something answers at the server's address, but not as PostgreSQL accepting connections ({}, since {since})",
                readiness.state.name()
            ),
            Some(stage_recommendation(ProbeStage::Connect)),
        ),
    })
}

/// The server accepts connections since `since_at`: what the login (the last probe) says.
fn accepting(since: &str, since_at: Timestamp, probe: Option<&ProbeSummary>) -> Finding {
    let Some(probe) = probe.filter(|p| p.time.0 >= since_at) else {
        return finding(
            Severity::Info,
            format!(
                "accepting since {since}; no login tried since then yet (one is tried at once)"
            ),
            None,
        );
    };
    if probe.outcome == ProbeOutcome::Success {
        return finding(
            Severity::Info,
            format!("accepting since {since}; login succeeds"),
            None,
        );
    }
    match probe.sql_state.as_deref() {
        Some(code) => Finding {
            severity: Severity::Failure,
            what: format!("accepting since {since}; login fails with {code}"),
            recommendation: Some(sqlstate_recommendation(code)),
        },
        None => {
            let stage = probe.stage.unwrap_or(ProbeStage::Auth);
            finding(
                Severity::Failure,
                format!(
                    "accepting since {since}; login fails at stage {}",
                    stage.name()
                ),
                Some(stage_recommendation(stage)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbpool_api::ReadinessStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    /// 12:03:05 UTC.
    fn edge() -> Timestamp {
        "2027-01-15T12:03:05Z"
            .parse()
            .unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn now() -> Timestamp {
        "2027-01-15T12:05:00Z"
            .parse()
            .unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn probe(outcome: ProbeOutcome, stage: ProbeStage, code: Option<&str>) -> ProbeSummary {
        ProbeSummary {
            time: MicroTime(
                "2027-01-15T12:03:06Z"
                    .parse()
                    .unwrap_or(Timestamp::UNIX_EPOCH),
            ),
            outcome,
            stage: (outcome != ProbeOutcome::Success).then_some(stage),
            latency_ms: 3,
            message: Some("m".into()),
            sql_state: code.map(str::to_owned),
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
        }
    }

    fn status(state: Readiness, last: Option<ProbeSummary>) -> DbPoolStatus {
        DbPoolStatus {
            readiness: Some(ReadinessStatus {
                state,
                since: MicroTime(edge()),
            }),
            last_probe: last,
            ..DbPoolStatus::default()
        }
    }

    fn judge(s: &DbPoolStatus) -> (Severity, String, String) {
        let f = readiness_finding(s, now()).unwrap_or_else(|| panic!("a finding for {s:?}"));
        (f.severity, f.what, f.recommendation.unwrap_or_default())
    }

    #[test]
    fn no_readiness_no_finding() {
        assert_eq!(readiness_finding(&DbPoolStatus::default(), now()), None);
    }

    #[test]
    fn unreachable_is_the_network() {
        let refused = probe(ProbeOutcome::TransientFailure, ProbeStage::Connect, None);
        let (severity, what, rec) = judge(&status(Readiness::Unreachable, Some(refused)));
        assert_eq!(severity, Severity::Failure);
        assert!(what.starts_with("network:"), "{what}");
        assert!(
            what.contains("unreachable since 12:03:05 UTC, 1m55s ago"),
            "{what}"
        );
        assert_eq!(rec, stage_recommendation(ProbeStage::Connect));
    }

    #[test]
    fn starting_up_is_the_servers_state() {
        let code = probe(
            ProbeOutcome::TransientFailure,
            ProbeStage::Auth,
            Some("57P03"),
        );
        let (severity, what, rec) = judge(&status(Readiness::StartingUp, Some(code)));
        assert_eq!(severity, Severity::Failure);
        assert!(what.starts_with("server state:"), "{what}");
        assert!(what.contains("57P03 since 12:03:05 UTC"), "{what}");
        assert!(rec.contains("starting up"), "{rec}");
    }

    #[test]
    fn accepting_with_a_failing_login_names_the_logins_own_sqlstate() {
        let wrong = probe(ProbeOutcome::ConfigFailure, ProbeStage::Auth, Some("28P01"));
        let (severity, what, rec) = judge(&status(Readiness::Accepting, Some(wrong)));
        assert_eq!(severity, Severity::Failure);
        assert!(
            what.starts_with("accepting since 12:03:05 UTC, 1m55s ago; login fails with 28P01"),
            "{what}"
        );
        assert!(rec.contains("wrong password"), "{rec}");
        // Without a SQLSTATE: the stage.
        let timeout = probe(ProbeOutcome::TransientFailure, ProbeStage::Query, None);
        let (_, what, rec) = judge(&status(Readiness::Accepting, Some(timeout)));
        assert!(what.ends_with("login fails at stage Query"), "{what}");
        assert_eq!(rec, stage_recommendation(ProbeStage::Query));
    }

    #[test]
    fn accepting_and_healthy_is_said_so() {
        let ok = probe(ProbeOutcome::Success, ProbeStage::Query, None);
        let (severity, what, rec) = judge(&status(Readiness::Accepting, Some(ok)));
        assert_eq!(severity, Severity::Info);
        assert!(what.ends_with("; login succeeds"), "{what}");
        assert!(rec.is_empty());
        // A probe from before the edge says nothing about the login since.
        let mut old = probe(ProbeOutcome::TransientFailure, ProbeStage::Connect, None);
        old.time = MicroTime(
            "2027-01-15T12:02:00Z"
                .parse()
                .unwrap_or(Timestamp::UNIX_EPOCH),
        );
        let (severity, what, _) = judge(&status(Readiness::Accepting, Some(old)));
        assert_eq!(severity, Severity::Info);
        assert!(what.contains("no login tried since"), "{what}");
    }

    #[test]
    fn a_config_answer_is_the_login_configuration() {
        let (severity, what, _) = judge(&status(Readiness::ConfigAnswer, None));
        assert_eq!(severity, Severity::Failure);
        assert!(what.starts_with("login configuration:"), "{what}");
    }
}
