//! Reading PostgreSQL's connection log into credentialed attempts.
//!
//! Lives here: [`LOG_CONF`] (the postgresql.conf lines every soak server runs with: connections
//! logged, each line prefixed with its instant in UTC and `user@db`) and [`parse_line`]. A
//! credentialed attempt is a login that reached authentication: `connection authorized` or
//! `password authentication failed`. The readiness ping sends no password and stops at the
//! server's authentication request, so it logs neither. Must not live here: judging the attempts.

use crate::history::{Attempt, Ms};

/// postgresql.conf lines for a soak server.
pub const LOG_CONF: [&str; 3] = [
    "log_connections = on",
    "log_timezone = 'UTC'",
    "log_line_prefix = '%m [%p] %u@%d '",
];

/// `2026-12-02 13:58:01.123 UTC` as [`Ms`].
fn parse_pg_time(date: &str, time: &str) -> Option<Ms> {
    let ts: jiff::Timestamp = format!("{date}T{time}Z").parse().ok()?;
    Some(ts.as_millisecond())
}

/// The attempt one server log line records, if it records one.
pub fn parse_line(target: &str, line: &str) -> Option<Attempt> {
    let ok = if line.contains("connection authorized:") {
        true
    } else if line.contains("password authentication failed") {
        false
    } else {
        return None;
    };
    let mut words = line.split_whitespace();
    let (date, time, _utc, _pid, who) = (
        words.next()?,
        words.next()?,
        words.next()?,
        words.next()?,
        words.next()?,
    );
    let (user, db) = who.split_once('@')?;
    Some(Attempt {
        time: parse_pg_time(date, time)?,
        target: target.to_owned(),
        user: user.to_owned(),
        db: db.to_owned(),
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorized_and_failed_logins_are_attempts() {
        let ok = "2026-01-01 00:00:01.250 UTC [42] app@app LOG:  connection authorized: user=app database=app";
        let a = parse_line("t0", ok).expect("attempt");
        assert!(a.ok);
        assert_eq!(
            (a.user.as_str(), a.db.as_str(), a.time),
            ("app", "app", 1_767_225_601_250)
        );
        let bad = "2026-01-01 00:00:02.000 UTC [43] app@iso FATAL:  password authentication failed for user \"app\"";
        let a = parse_line("t0", bad).expect("attempt");
        assert!(!a.ok);
        assert_eq!(a.db, "iso");
        let received = "2026-01-01 00:00:02.000 UTC [43] [unknown]@[unknown] LOG:  connection received: host=127.0.0.1";
        assert_eq!(parse_line("t0", received), None);
    }
}
