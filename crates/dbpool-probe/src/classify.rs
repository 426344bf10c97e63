//! Error classification: which failures are outages, which are configuration mistakes, and the
//! short messages people read about them.
//!
//! Lives here: pure functions from an error (I/O, TLS, PostgreSQL) and the stage it happened in
//! to a [`Failure`], and the password scrubber every message passes through. Must not live here:
//! any I/O, or knowledge of how the stages are run.

use std::{error::Error as StdError, io};

use crate::{ProbeOutcome, ProbeStage};

use super::{Password, stage::Failure};

/// The outcome a server error with SQLSTATE `code` stands for.
///
/// Configuration: class 28 (invalid authorization: 28P01 wrong password, 28000 no pg_hba entry),
/// 3D000 (database does not exist) and class 42 (e.g. 42501, no CONNECT privilege). Everything
/// else (57P03 starting up, 53300 too many connections, 57P01 admin shutdown, class 08, ...) is
/// treated as an outage, which is retried.
pub(crate) fn outcome_for_sqlstate(code: &str) -> ProbeOutcome {
    if code.starts_with("28") || code == "3D000" || code.starts_with("42") {
        ProbeOutcome::ConfigFailure
    } else {
        ProbeOutcome::TransientFailure
    }
}

/// Whether a server error with SQLSTATE `code` ends the session (connection exceptions and
/// operator intervention such as 57P01 admin shutdown).
pub(crate) fn sqlstate_ends_session(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P")
}

/// Classifies an error of the PostgreSQL client library that happened in `stage` while talking
/// to `peer`.
pub(crate) fn from_pg_error(err: &tokio_postgres::Error, stage: ProbeStage, peer: &str) -> Failure {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        return Failure {
            outcome: outcome_for_sqlstate(code),
            stage,
            message: format!("{} ({code})", db.message()),
            sql_state: Some(code.to_owned()),
            broken: sqlstate_ends_session(code),
            path_evidence: false,
        };
    }
    if err.is_closed() {
        return Failure::transient(stage, format!("connection closed by {peer}"));
    }
    if let Some(io) = find_io(err) {
        return from_io_error(io, stage, peer);
    }
    let kind = err.to_string();
    let detail = err.source().map(ToString::to_string).unwrap_or_default();
    match kind.as_str() {
        "invalid configuration" if detail.contains("password missing") => Failure::config(
            stage,
            format!("{peer} asks for a password but none is configured"),
        ),
        "authentication error" => Failure::config(
            stage,
            format!("authentication with {peer} failed: {detail}"),
        ),
        _ => Failure::transient(stage, format!("{peer}: {}", chain(err))),
    }
}

/// Classifies an I/O error that happened in `stage` while talking to `peer`. All are outages;
/// a timeout and an unreachable network or host are also evidence about the path (the fleet
/// guard's), while a refusal, a reset or a close prove that something at the address answered.
pub(crate) fn from_io_error(err: &io::Error, stage: ProbeStage, peer: &str) -> Failure {
    use io::ErrorKind as K;
    let message = match err.kind() {
        K::ConnectionRefused => format!("connection refused by {peer}"),
        K::ConnectionReset => format!("connection reset by {peer}"),
        K::ConnectionAborted => format!("connection to {peer} aborted"),
        K::UnexpectedEof => format!("connection closed by {peer}"),
        K::BrokenPipe => format!("connection to {peer} broken (broken pipe)"),
        K::TimedOut => format!("connection to {peer} timed out"),
        K::HostUnreachable | K::NetworkUnreachable => format!("{peer} is unreachable ({err})"),
        _ => format!("{peer}: {err}"),
    };
    if is_path_error(err.kind()) {
        Failure::path(stage, message)
    } else {
        Failure::transient(stage, message)
    }
}

/// Whether an I/O error of this kind is evidence about the network path (see
/// [`ProbeReport::path_evidence`](crate::ProbeReport::path_evidence)): timed out, host or network
/// unreachable. Refused, reset, aborted and closed are not: a host answered.
pub(crate) fn is_path_error(kind: io::ErrorKind) -> bool {
    use io::ErrorKind as K;
    matches!(
        kind,
        K::TimedOut | K::HostUnreachable | K::NetworkUnreachable
    )
}

/// Classifies an error of the TLS handshake with `peer`: what rustls rejects (an untrusted or
/// mismatched certificate, a handshake alert) is a configuration problem; I/O trouble during the
/// handshake is an outage.
pub(crate) fn from_tls_io_error(err: &io::Error, peer: &str) -> Failure {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => Failure::config(
            ProbeStage::Tls,
            format!("TLS certificate of {peer} rejected: {cert}"),
        ),
        Some(other) => Failure::config(
            ProbeStage::Tls,
            format!("TLS handshake with {peer} failed: {other}"),
        ),
        None => from_io_error(err, ProbeStage::Tls, peer),
    }
}

/// The first I/O error in the source chain of `err`.
pub(crate) fn find_io<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// `err` and its sources, joined with ": ".
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = e.source();
    }
    text
}

/// Passwords shorter than this are not searched for in messages: a short string turns up in
/// ordinary text by chance, and showing where would spell the password out.
pub(crate) const MIN_REDACTABLE: usize = 8;

/// What a message that contained the password becomes, whole: no position, no length.
pub(crate) const WITHHELD: &str = "message withheld: it contained the configured password";

/// `message`, or [`WITHHELD`] when it contains the password. Server and library messages never
/// quote a password, so this is a last line of defence, not a formatting step.
///
/// Not an oracle: the message is replaced whole (replacing only the occurrence would show where
/// the password sits in text the server chose), and passwords shorter than [`MIN_REDACTABLE`]
/// bytes are not searched for at all (a one-letter password would blank every message with that
/// letter). What remains is one bit per probe for long passwords, useless for guessing, and only
/// towards a server the Secret allows (`dbpool.io/allowed-hosts`).
pub(crate) fn redact(message: String, password: Option<&Password>) -> String {
    match password.map(Password::expose) {
        Some(secret) if secret.len() >= MIN_REDACTABLE && message.contains(secret) => {
            WITHHELD.to_owned()
        }
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sqlstates_map_to_outcomes() {
        for code in ["28P01", "28000", "3D000", "42501"] {
            assert_eq!(
                outcome_for_sqlstate(code),
                ProbeOutcome::ConfigFailure,
                "{code}"
            );
        }
        for code in ["57P03", "53300", "57P01", "08006", "XX000", "53100"] {
            assert_eq!(
                outcome_for_sqlstate(code),
                ProbeOutcome::TransientFailure,
                "{code}"
            );
        }
        assert!(sqlstate_ends_session("57P01"));
        assert!(sqlstate_ends_session("08006"));
        assert!(!sqlstate_ends_session("42P01"));
    }

    #[test]
    fn only_timeouts_and_unreachable_networks_are_path_evidence() {
        let peer = "127.0.0.1:5432";
        for (kind, path) in [
            (io::ErrorKind::TimedOut, true),
            (io::ErrorKind::HostUnreachable, true),
            (io::ErrorKind::NetworkUnreachable, true),
            (io::ErrorKind::ConnectionRefused, false),
            (io::ErrorKind::ConnectionReset, false),
            (io::ErrorKind::UnexpectedEof, false),
        ] {
            let f = from_io_error(&io::Error::from(kind), ProbeStage::Connect, peer);
            assert_eq!(f.path_evidence, path, "{kind:?}");
            assert_eq!(f.outcome, ProbeOutcome::TransientFailure);
        }
        let timeout = Failure::timeout(ProbeStage::Auth, "login", Duration::from_secs(1));
        assert!(timeout.path_evidence);
        assert!(!Failure::transient(ProbeStage::Query, "closed").path_evidence);
    }

    #[test]
    fn io_errors_are_transient_with_short_messages() {
        let peer = "127.0.0.1:5432";
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let f = from_io_error(&refused, ProbeStage::Connect, peer);
        assert_eq!(f.outcome, ProbeOutcome::TransientFailure);
        assert_eq!(f.stage, ProbeStage::Connect);
        assert_eq!(f.message, "connection refused by 127.0.0.1:5432");
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            from_io_error(&reset, ProbeStage::Auth, peer).message,
            "connection reset by 127.0.0.1:5432"
        );
    }

    #[test]
    fn rustls_errors_inside_io_errors_are_config_failures() {
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let f = from_tls_io_error(&err, "db:5432");
        assert_eq!(f.outcome, ProbeOutcome::ConfigFailure);
        assert_eq!(f.stage, ProbeStage::Tls);
        assert!(
            f.message.starts_with("TLS certificate of db:5432 rejected"),
            "{}",
            f.message
        );
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        let f = from_tls_io_error(&eof, "db:5432");
        assert_eq!(f.outcome, ProbeOutcome::TransientFailure);
        assert_eq!(f.stage, ProbeStage::Tls);
    }

    #[test]
    fn find_io_walks_the_source_chain() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("outer")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(io::Error::from(io::ErrorKind::ConnectionReset));
        let found = find_io(&err).map(io::Error::kind);
        assert_eq!(found, Some(io::ErrorKind::ConnectionReset));
        assert!(chain(&err).starts_with("outer: "));
    }

    #[test]
    fn redact_removes_the_password() {
        let pw = Password::new("s3cret-pw".to_owned());
        assert_eq!(
            redact("login s3cret-pw failed".to_owned(), Some(&pw)),
            WITHHELD
        );
        assert_eq!(redact("plain".to_owned(), Some(&pw)), "plain");
        assert_eq!(redact("plain".to_owned(), None), "plain");
        let empty = Password::new(String::new());
        assert_eq!(redact("plain".to_owned(), Some(&empty)), "plain");
    }

    #[test]
    fn redact_is_not_an_oracle_for_short_passwords() {
        // A short password is not searched for, so a message shows nothing about it.
        let short = Password::new("a".to_owned());
        let text = "password authentication failed for user app".to_owned();
        assert_eq!(redact(text.clone(), Some(&short)), text);
        // A long one withholds the whole message: its position and length are not shown.
        let long = Password::new("correct-horse".to_owned());
        let one = redact("x correct-horse y".to_owned(), Some(&long));
        let other = redact(
            "a much longer message correct-horse".to_owned(),
            Some(&long),
        );
        assert_eq!(one, other);
        assert!(!one.contains("correct"));
    }
}
