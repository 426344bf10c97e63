//! Reading the apiserver's audit log (JSON lines) into history records: the independent witness
//! of every status write and event.
//!
//! Lives here: [`parse_line`], [`Record`] and [`POLICY`] (the audit policy the soak's apiserver
//! runs with: Secrets at Metadata level only, so no password reaches the log; DbPool status
//! writes at RequestResponse, so the stored writerEpoch and breaker are seen; events at Request).
//! Must not live here: judging the records (`checks`), or tailing the file (the binary).

use serde_json::Value;

use crate::history::{Ms, StatusWrite};

/// The audit policy: first matching rule wins.
pub const POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    resources: [{group: "", resources: ["secrets"]}]
  - level: None
    verbs: ["get", "list", "watch"]
  - level: RequestResponse
    resources: [{group: "dbpool.io", resources: ["dbpools/status"]}]
  - level: Request
    resources: [{group: "dbpool.io", resources: ["dbpools"]}]
  - level: Request
    resources: [{group: "events.k8s.io", resources: ["events"]}, {group: "", resources: ["events"]}]
  - level: Metadata
    resources: [{group: "coordination.k8s.io", resources: ["leases"]}]
  - level: None
"#;

/// What one audit line is to the soak.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A write to dbpools/status.
    Status(StatusWrite),
    /// An event created or updated: (time, reason, pool name, user).
    Event(Ms, String, String, String),
}

/// An RFC 3339 instant as [`Ms`].
pub fn parse_time(text: &str) -> Option<Ms> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    Some(ts.as_millisecond())
}

/// The record of one audit log line, if it is one the soak keeps.
pub fn parse_line(line: &str) -> Option<Record> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["stage"].as_str() != Some("ResponseComplete") {
        return None;
    }
    let object_ref = &v["objectRef"];
    let resource = object_ref["resource"].as_str()?;
    let time = parse_time(v["requestReceivedTimestamp"].as_str()?)?;
    let user = v["user"]["username"].as_str().unwrap_or("").to_owned();
    let verb = v["verb"].as_str().unwrap_or("");
    match (resource, object_ref["subresource"].as_str()) {
        ("dbpools", Some("status")) if verb == "patch" || verb == "update" => {
            let ns = object_ref["namespace"].as_str()?;
            let name = object_ref["name"].as_str()?;
            let code = v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16;
            let status = &v["responseObject"]["status"];
            let mut write = StatusWrite {
                time,
                user,
                pool: format!("{ns}/{name}"),
                code,
                ..StatusWrite::default()
            };
            if write.accepted() {
                write.epoch = status["writerEpoch"].as_i64();
                write.rv = v["responseObject"]["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(0);
                write.breaker = status["breaker"]["state"].as_str().map(str::to_owned);
                write.open_count = status["breaker"]["openCount"].as_i64().unwrap_or(0);
                write.failures = status["consecutiveFailures"].as_i64().unwrap_or(0) as i32;
                write.phase = status["phase"].as_str().map(str::to_owned);
                let reopen = &status["lastForceReopen"];
                if let (Some(token), Some(at)) = (reopen["token"].as_str(), reopen["time"].as_str())
                {
                    write.reopen = Some((token.to_owned(), at.to_owned()));
                }
            }
            Some(Record::Status(write))
        }
        ("events", None) if verb == "create" || verb == "patch" || verb == "update" => {
            let body = &v["requestObject"];
            let reason = body["reason"].as_str().unwrap_or("").to_owned();
            let pool = body["regarding"]["name"]
                .as_str()
                .or_else(|| body["involvedObject"]["name"].as_str())
                .or_else(|| object_ref["name"].as_str())
                .unwrap_or("")
                .to_owned();
            let ns = object_ref["namespace"].as_str().unwrap_or("");
            Some(Record::Event(time, reason, format!("{ns}/{pool}"), user))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_write_and_an_event_are_read() {
        let line = r#"{"kind":"Event","level":"RequestResponse","stage":"ResponseComplete","verb":"patch","user":{"username":"soak-op-1"},"objectRef":{"resource":"dbpools","namespace":"a","name":"p","subresource":"status"},"responseStatus":{"code":200},"responseObject":{"status":{"writerEpoch":4,"breaker":{"state":"Open","openCount":2},"consecutiveFailures":5,"phase":"BreakerOpen","lastForceReopen":{"token":"t1","time":"x"}}},"requestReceivedTimestamp":"2026-01-01T00:00:01.500000Z"}"#;
        let Some(Record::Status(w)) = parse_line(line) else {
            panic!("not read")
        };
        assert_eq!(w.user, "soak-op-1");
        assert_eq!(w.pool, "a/p");
        assert_eq!(w.epoch, Some(4));
        assert_eq!(w.breaker.as_deref(), Some("Open"));
        assert_eq!(w.open_count, 2);
        assert_eq!(w.failures, 5);
        assert_eq!(w.reopen, Some(("t1".into(), "x".into())));
        assert_eq!(w.time, 1_767_225_601_500);
        let refused = line.replace("\"code\":200", "\"code\":422");
        let Some(Record::Status(w)) = parse_line(&refused) else {
            panic!("not read")
        };
        assert!(!w.accepted());
        assert_eq!(w.epoch, None);
        let event = r#"{"stage":"ResponseComplete","verb":"create","user":{"username":"soak-op-0"},"objectRef":{"resource":"events","namespace":"a","apiGroup":"events.k8s.io"},"requestObject":{"reason":"ForceReopen","regarding":{"name":"p"}},"requestReceivedTimestamp":"2026-01-01T00:00:02Z"}"#;
        assert_eq!(
            parse_line(event),
            Some(Record::Event(
                1_767_225_602_000,
                "ForceReopen".into(),
                "a/p".into(),
                "soak-op-0".into()
            ))
        );
        assert_eq!(parse_line("not json"), None);
    }
}
