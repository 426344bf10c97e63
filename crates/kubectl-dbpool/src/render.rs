//! Text output of the verbs: status lines, event lines, times as people read them.
//!
//! Lives here: formatting only, from API objects to strings (pure, unit-tested). Must not live
//! here: API calls (`cluster`) or judging health (`diagnose`).

use dbpool_api::{CONDITION_BREAKER_OPEN, DbPool, reason};
use k8s_openapi::{
    api::core::v1::Event,
    jiff::{SignedDuration, Timestamp},
};
use kube::ResourceExt;

/// A duration as `3s`, `4m12s`, `2h5m`, `3d4h`.
pub fn human(d: SignedDuration) -> String {
    let s = d.as_secs().unsigned_abs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// How long ago `t` was (`12s ago`), or how far ahead (`in 12s`).
pub fn relative(t: Timestamp, now: Timestamp) -> String {
    let d = now.duration_since(t);
    if d.is_negative() {
        format!("in {}", human(d))
    } else {
        format!("{} ago", human(d))
    }
}

/// The column headers of [`status_row`].
pub fn status_header(all_namespaces: bool) -> Vec<String> {
    let mut h = vec![];
    if all_namespaces {
        h.push("NAMESPACE");
    }
    h.extend([
        "NAME",
        "PHASE",
        "BREAKER",
        "SINCE",
        "NEXT TRIAL",
        "LAST PROBE",
        "STAGE",
        "MESSAGE",
    ]);
    h.into_iter().map(str::to_owned).collect()
}

/// One pool's status line: breaker, since, next trial, last probe's time, stage and message.
pub fn status_row(pool: &DbPool, all_namespaces: bool, now: Timestamp) -> Vec<String> {
    let none = || "-".to_owned();
    let status = pool.status.as_ref();
    let breaker = status.and_then(|s| s.breaker.as_ref());
    let held = status
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_BREAKER_OPEN && c.reason == reason::HELD)
        })
        .is_some();
    let probe = status.and_then(|s| s.last_probe.as_ref());
    let mut row = vec![];
    if all_namespaces {
        row.push(pool.namespace().unwrap_or_default());
    }
    row.push(pool.name_any());
    row.push(
        status
            .and_then(|s| s.phase)
            .map_or_else(|| "<no status>".to_owned(), |p| format!("{p:?}")),
    );
    row.push(breaker.map_or_else(none, |b| {
        format!("{:?}{}", b.state, if held { " (held)" } else { "" })
    }));
    row.push(
        breaker
            .and_then(|b| b.since.as_ref())
            .map_or_else(none, |t| relative(t.0, now)),
    );
    row.push(
        breaker
            .and_then(|b| b.next_probe_at.as_ref())
            .map_or_else(none, |t| relative(t.0, now)),
    );
    row.push(probe.map_or_else(none, |p| {
        format!("{} {}", p.outcome.name(), relative(p.time.0, now))
    }));
    row.push(
        probe
            .and_then(|p| p.stage)
            .map_or_else(none, |s| s.name().to_owned()),
    );
    row.push(probe.and_then(|p| p.message.clone()).unwrap_or_else(none));
    row
}

/// Rows as aligned columns (the last column is not padded), like kubectl's tables.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// When an event last happened (series, lastTimestamp, eventTime, firstTimestamp: the first set).
pub fn event_time(e: &Event) -> Timestamp {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// How often an event happened.
pub fn event_count(e: &Event) -> i32 {
    e.series
        .as_ref()
        .and_then(|s| s.count)
        .or(e.count)
        .unwrap_or(1)
        .max(1)
}

/// The `events` verb's rows: last seen, type, reason, count, message.
pub fn event_rows(events: &[Event], now: Timestamp) -> Vec<Vec<String>> {
    let mut rows = vec![
        ["LAST SEEN", "TYPE", "REASON", "COUNT", "MESSAGE"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for e in events {
        rows.push(vec![
            relative(event_time(e), now),
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            event_count(e).to_string(),
            e.message.clone().unwrap_or_default(),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        assert_eq!(human(SignedDuration::from_secs(5)), "5s");
        assert_eq!(human(SignedDuration::from_secs(252)), "4m12s");
        assert_eq!(human(SignedDuration::from_secs(7500)), "2h5m");
        assert_eq!(human(SignedDuration::from_secs(-90)), "1m30s");
        let now = Timestamp::from_second(1_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let later = Timestamp::from_second(1_000_019).unwrap_or(Timestamp::UNIX_EPOCH);
        assert_eq!(relative(later, now), "in 19s");
        assert_eq!(relative(now, later), "19s ago");
    }

    #[test]
    fn tables_align_all_but_the_last_column() {
        let rows = vec![
            vec!["NAME".to_owned(), "PHASE".to_owned(), "MESSAGE".to_owned()],
            vec!["orders".to_owned(), "Healthy".to_owned(), "ok".to_owned()],
        ];
        assert_eq!(
            table(&rows),
            "NAME     PHASE     MESSAGE\norders   Healthy   ok\n"
        );
    }
}
