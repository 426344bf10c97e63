//! The limbo rule: while the database fails and the breaker is still Closed, whether a caller of
//! `get()` waits or gets the real cause of the last failed attempt at once.
//!
//! Lives here: [`Evidence`] (what the pool knows that could bring a connection soon), [`verdict`]
//! (the rule, a pure function of the evidence and `now`) and [`PING_WAIT`]. Must not live here:
//! gathering the evidence (`checkout`, `readiness`), pinging, or the Open breaker (`get()` fails
//! at once while it is Open or HalfOpen, whatever this rule says).
//!
//! The rule. A caller waits (never past `acquire_timeout`) only while there is reason to expect a
//! connection soon:
//! - a credentialed attempt is in flight or due now (the supervisor's probe or trial, a caller's
//!   connect), so its result comes within the connect timeout;
//! - the server is starting: after the server was seen down, a readiness ping (or the DbPool's
//!   `status.readiness`, or a connect's SQLSTATE 57P03) says it is starting up, so an early trial
//!   follows as soon as it accepts;
//! - a readiness ping started less than [`PING_WAIT`] ago is in flight (on loopback or a LAN its
//!   answer comes first; past that the caller does not wait for it).
//!
//! Otherwise the caller gets [`PoolError::Unavailable`](crate::PoolError) with the cause of the
//! last failed attempt, at once. The next scheduled attempt, however close, is no reason to wait:
//! that was the old rule, and it left callers hanging ~2.8 s in a 3 s outage for a refusal.

use std::time::Duration;

use tokio::time::Instant;

/// The longest a caller waits for a readiness ping in flight.
pub(super) const PING_WAIT: Duration = Duration::from_millis(50);

/// What could bring a connection soon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Evidence {
    /// A credentialed attempt is in flight or due now.
    pub attempt: bool,
    /// The server was seen down and now says it is starting.
    pub starting: bool,
    /// A readiness ping of this pool is in flight, started then.
    pub ping_since: Option<Instant>,
}

/// What a caller does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Wait for a change (bounded by `acquire_timeout`).
    Wait,
    /// Wait for a change, and decide again at this instant at the latest.
    WaitUntil(Instant),
    /// Return the last failure's cause now.
    Fail,
}

/// The rule (module docs) at `now`.
pub(super) fn verdict(e: &Evidence, now: Instant) -> Verdict {
    if e.attempt || e.starting {
        return Verdict::Wait;
    }
    match e.ping_since {
        Some(since) if now < since + PING_WAIT => Verdict::WaitUntil(since + PING_WAIT),
        _ => Verdict::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_in_flight_fails_at_once() {
        let now = Instant::now();
        assert_eq!(verdict(&Evidence::default(), now), Verdict::Fail);
    }

    #[test]
    fn an_attempt_in_flight_or_a_starting_server_is_worth_waiting_for() {
        let now = Instant::now();
        let attempt = Evidence {
            attempt: true,
            ..Evidence::default()
        };
        assert_eq!(verdict(&attempt, now), Verdict::Wait);
        let starting = Evidence {
            starting: true,
            ..Evidence::default()
        };
        assert_eq!(verdict(&starting, now), Verdict::Wait);
    }

    #[test]
    fn a_ping_in_flight_is_waited_for_at_most_ping_wait() {
        let start = Instant::now();
        let e = Evidence {
            ping_since: Some(start),
            ..Evidence::default()
        };
        assert_eq!(verdict(&e, start), Verdict::WaitUntil(start + PING_WAIT));
        let almost = start + PING_WAIT - Duration::from_millis(1);
        assert_eq!(verdict(&e, almost), Verdict::WaitUntil(start + PING_WAIT));
        assert_eq!(verdict(&e, start + PING_WAIT), Verdict::Fail);
        assert_eq!(verdict(&e, start + Duration::from_secs(1)), Verdict::Fail);
    }
}
