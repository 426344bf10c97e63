//! The checks run on an open session: `SELECT 1`, the role check and the saturation check.
//!
//! Lives here: the three queries, the parsing of their (text) answers, and the verdicts drawn from
//! them (WrongRole, free slots, whether the pool fits). Every answer from the server is parsed
//! without panicking. Must not live here: opening sessions (`connect`) or deciding which session
//! to use (`prober`).

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::{ProbeOutcome, ProbeStage, TargetSessionAttrs};

use super::{
    ProbeTarget,
    classify::from_pg_error,
    stage::{Clock, Failure},
};

/// Client backends in use, max_connections and the slots reserved for superusers (and, from
/// PostgreSQL 16, for roles with pg_use_reserved_connections), all as text.
///
/// A role without pg_read_all_stats (or pg_monitor) sees `backend_type` only for its own
/// sessions; other sessions show NULL there but still show their database. Those are counted
/// when they are in a database, which includes a running autovacuum worker now and then: the
/// count is exact for privileged roles and at most a few too high otherwise.
pub(crate) const SATURATION_SQL: &str = "SELECT \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
      OR (backend_type IS NULL AND datid IS NOT NULL)), \
     current_setting('max_connections'), \
     current_setting('superuser_reserved_connections'), \
     coalesce(current_setting('reserved_connections', true), '0')";

/// What the checks found out, kept even when a later check fails.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    /// `server_version`.
    pub server_version: Option<String>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: Option<bool>,
    /// The saturation numbers, when known.
    pub saturation: Option<Saturation>,
    /// Why saturation is unknown although the probe succeeded.
    pub saturation_note: Option<String>,
    /// The resolved address of the authenticated session the checks ran on.
    pub peer: Option<std::net::SocketAddr>,
}

/// Connection slots on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Saturation {
    /// Client backends open.
    pub connections: i64,
    /// Slots ordinary roles may use: max_connections minus reserved slots.
    pub usable: i64,
    /// `usable - connections`, not below zero.
    pub free: i64,
    /// Whether the pool's maximum size fits into `free`.
    pub pool_fits: bool,
}

impl Saturation {
    /// Derives the numbers from the four text columns of [`SATURATION_SQL`].
    pub fn from_columns(columns: [Option<&str>; 4], pool_max_size: u32) -> Option<Self> {
        let [connections, max, superuser_reserved, reserved] =
            columns.map(|c| c.and_then(|text| text.trim().parse::<i64>().ok()));
        let connections = connections?;
        let usable = max?
            .saturating_sub(superuser_reserved?)
            .saturating_sub(reserved.unwrap_or(0));
        let free = usable.saturating_sub(connections).max(0);
        Some(Self {
            connections,
            usable,
            free,
            pool_fits: free >= i64::from(pool_max_size),
        })
    }
}

/// Parses PostgreSQL's text form of a boolean.
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "t" | "true" | "on" => Some(true),
        "f" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// Runs `sql` as a simple query and returns the text columns of its first row.
async fn first_row<const N: usize>(
    client: &Client,
    sql: &str,
    stage: ProbeStage,
    peer: &str,
) -> Result<[Option<String>; N], Failure> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| from_pg_error(&e, stage, peer))?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| {
            Failure::transient(stage, format!("{peer} returned no row for \"{sql}\""))
        })?;
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    for (index, slot) in out.iter_mut().enumerate() {
        *slot = row.try_get(index).ok().flatten().map(str::to_owned);
    }
    Ok(out)
}

/// `SELECT 1`, the role check and the saturation check on `client`, each within what is left of
/// the budget. `known_version` is the server_version reported at startup; without it the version
/// is asked for with `SHOW server_version`.
pub(crate) async fn run(
    client: &Client,
    target: &ProbeTarget,
    peer: &str,
    known_version: Option<&str>,
    clock: &mut Clock,
    findings: &mut Findings,
) -> Result<(), Failure> {
    findings.server_version = known_version.map(str::to_owned);

    let [one] = clock
        .stage(
            ProbeStage::Query,
            "SELECT 1",
            first_row::<1>(client, "SELECT 1", ProbeStage::Query, peer),
        )
        .await?;
    if one.as_deref().map(str::trim) != Some("1") {
        return Err(Failure::transient(
            ProbeStage::Query,
            format!("{peer} gave an unexpected answer to SELECT 1"),
        ));
    }
    if findings.server_version.is_none() {
        let [version] = clock
            .stage(
                ProbeStage::Query,
                "SHOW server_version",
                first_row::<1>(client, "SHOW server_version", ProbeStage::Query, peer),
            )
            .await?;
        findings.server_version = version;
    }

    let [recovery] = clock
        .stage(
            ProbeStage::Role,
            "role check",
            first_row::<1>(client, "SELECT pg_is_in_recovery()", ProbeStage::Role, peer),
        )
        .await?;
    let in_recovery = recovery.as_deref().and_then(parse_bool).ok_or_else(|| {
        Failure::transient(
            ProbeStage::Role,
            format!("{peer} gave an unexpected answer to pg_is_in_recovery()"),
        )
    })?;
    findings.in_recovery = Some(in_recovery);
    if in_recovery && target.target_session_attrs == TargetSessionAttrs::ReadWrite {
        return Err(Failure {
            outcome: ProbeOutcome::WrongRole,
            stage: ProbeStage::Role,
            message: format!(
                "{peer} is a standby (in recovery) but targetSessionAttrs is read-write"
            ),
            sql_state: None,
            broken: false,
            path_evidence: false,
        });
    }

    let saturation = clock
        .stage(
            ProbeStage::Saturation,
            "saturation check",
            first_row::<4>(client, SATURATION_SQL, ProbeStage::Saturation, peer),
        )
        .await;
    match saturation {
        Ok(columns) => {
            let columns = columns.each_ref().map(Option::as_deref);
            findings.saturation = Saturation::from_columns(columns, target.pool_max_size);
            if findings.saturation.is_none() {
                findings.saturation_note =
                    Some("connection slots unknown: unexpected answer from the server".into());
            }
            Ok(())
        }
        // The session is gone (or a request is stuck): that is an outage like any other.
        Err(failure) if failure.broken => Err(failure),
        // The server refused the query itself (e.g. a proxy without pg_stat_activity): the
        // database is usable, only the slot numbers are unknown.
        Err(failure) => {
            findings.saturation_note =
                Some(format!("connection slots unknown: {}", failure.message));
            Ok(())
        }
    }
}

/// Only the saturation check, on an older session, to explain a failure of a new one (such as
/// 53300 too_many_connections). Best effort: errors leave `findings` as they are, and the time is
/// not recorded as a stage because the probe already failed in an earlier one.
pub(crate) async fn saturation_only(
    client: &Client,
    target: &ProbeTarget,
    peer: &str,
    clock: &Clock,
    findings: &mut Findings,
) {
    let query = first_row::<4>(client, SATURATION_SQL, ProbeStage::Saturation, peer);
    if let Ok(Ok(columns)) = tokio::time::timeout(clock.remaining(), query).await {
        let columns = columns.each_ref().map(Option::as_deref);
        findings.saturation = Saturation::from_columns(columns, target.pool_max_size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_numbers() {
        let s = Saturation::from_columns([Some("7"), Some("100"), Some("3"), Some("0")], 10)
            .expect("parsed");
        assert_eq!(
            s,
            Saturation {
                connections: 7,
                usable: 97,
                free: 90,
                pool_fits: true
            }
        );
        let full =
            Saturation::from_columns([Some("12"), Some("10"), Some("3"), None], 1).expect("parsed");
        assert_eq!(full.usable, 7);
        assert_eq!(full.free, 0, "never negative");
        assert!(!full.pool_fits);
        let exact = Saturation::from_columns([Some("0"), Some("13"), Some("3"), Some("0")], 10)
            .expect("parsed");
        assert!(
            exact.pool_fits,
            "a pool exactly the size of the free slots fits"
        );
    }

    #[test]
    fn saturation_rejects_garbage() {
        assert_eq!(
            Saturation::from_columns([Some("x"), Some("100"), Some("3"), Some("0")], 1),
            None
        );
        assert_eq!(
            Saturation::from_columns([Some("1"), None, Some("3"), Some("0")], 1),
            None
        );
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool("t"), Some(true));
        assert_eq!(parse_bool("f"), Some(false));
        assert_eq!(parse_bool("on"), Some(true));
        assert_eq!(parse_bool("maybe"), None);
    }
}
