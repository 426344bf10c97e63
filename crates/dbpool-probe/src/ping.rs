//! The readiness ping: does the server accept connections again, learned without a password.
//!
//! Lives here: [`ping`], [`PingTarget`] and [`PingReport`]. A ping is a TCP connect, the probe's
//! own TLS stage (the same [`client_config`](crate::tls) and SSLRequest: under verify-ca and
//! verify-full the certificate is verified before anything names a user), a StartupMessage with
//! the user and database only, the first answer read whole, and a clean close (TLS close_notify,
//! then FIN, then whatever the server still sends is read and dropped, so neither side resets).
//! Only messages of type 'R', 'E' or 'v' of at most [`MAX_PING_MESSAGE`] bytes are read: anything
//! else is "not PostgreSQL", never accepting. The classification: an authentication request is
//! [`Readiness::Accepting`]; SQLSTATE 57P03 is [`Readiness::StartingUp`]; refused, reset, closed
//! or timed out is [`Readiness::Unreachable`]; a rejected certificate, 'N' under require or
//! verify-*, or a class-28 error (pg_hba) is [`Readiness::ConfigAnswer`]; any other error before
//! authentication is [`Readiness::Rejected`]. The whole ping takes at most
//! min(`timeout`, [`MAX_PING_TIME`]).
//!
//! Must not live here: passwords. [`PingTarget`] has no field for one, so a ping can neither send
//! a password nor anything derived from one. Also not here: when to ping and what an answer means
//! to a pool (the operator and `dbpool-recovery`).

use std::{net::SocketAddr, time::Duration};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use crate::{ProbeOutcome, ProbeStage, ProbeTarget, Readiness, SslMode};

use super::{
    classify::from_io_error,
    connect::{check_host, connect_one, resolve},
    session::provider,
    stage::Failure,
    tls,
};

/// The longest a ping may take, whatever the health-check timeout says.
pub const MAX_PING_TIME: Duration = Duration::from_secs(1);

/// The largest answer a ping reads (type byte and length word excluded): an authentication
/// request or an error is far smaller; a larger announcement is "not PostgreSQL".
pub const MAX_PING_MESSAGE: usize = 8 * 1024;

/// The most bytes read and dropped while closing (the rest of a trust login's greeting).
const MAX_DRAIN: usize = 16 * 1024;

/// Where to ping and as whom: a [`ProbeTarget`] without the password, the pool size and the
/// session checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingTarget {
    /// Host name or IP address of the server.
    pub host: String,
    /// TCP port of the server.
    pub port: u16,
    /// Database named in the StartupMessage.
    pub dbname: String,
    /// Role named in the StartupMessage.
    pub user: String,
    /// TLS mode (libpq's sslmode), exactly as the probe applies it.
    pub ssl_mode: SslMode,
    /// PEM CA bundle for verify-ca and verify-full.
    pub ca_pem: Option<Vec<u8>>,
    /// The health-check timeout; the ping takes at most the smaller of it and [`MAX_PING_TIME`].
    pub timeout: Duration,
}

impl From<&ProbeTarget> for PingTarget {
    fn from(t: &ProbeTarget) -> Self {
        Self {
            host: t.host.clone(),
            port: t.port,
            dbname: t.dbname.clone(),
            user: t.user.clone(),
            ssl_mode: t.ssl_mode,
            ca_pem: t.ca_pem.clone(),
            timeout: t.timeout,
        }
    }
}

/// What one ping saw. Never contains a password (the ping never had one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingReport {
    /// The classified answer.
    pub readiness: Readiness,
    /// SQLSTATE of the server's error, when it answered with one.
    pub sql_state: Option<String>,
    /// What happened, short and for people. May quote the server's error message: it belongs to
    /// the pool (credential key) that pinged.
    pub message: String,
    /// Time from the start until the answer was known (the close is not counted).
    pub latency: Duration,
    /// The address that answered, when one did.
    pub peer: Option<SocketAddr>,
}

/// A classified answer before it becomes a report.
struct Answer {
    readiness: Readiness,
    sql_state: Option<String>,
    message: String,
    peer: Option<SocketAddr>,
    /// When the answer was known (before the close).
    known_at: Instant,
}

impl Answer {
    fn new(readiness: Readiness, message: impl Into<String>) -> Self {
        Self {
            readiness,
            sql_state: None,
            message: message.into(),
            peer: None,
            known_at: Instant::now(),
        }
    }

    /// A probe-stage failure: a configuration failure is a config answer, anything else (refused,
    /// reset, closed, timed out, unreachable) says nothing accepted the connection.
    fn from_failure(failure: Failure) -> Self {
        let readiness = match failure.outcome {
            ProbeOutcome::ConfigFailure => Readiness::ConfigAnswer,
            _ => Readiness::Unreachable,
        };
        Self::new(readiness, failure.message)
    }

    fn at(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }
}

/// Pings `target` once: see the module documentation. Never fails: every outcome is a
/// [`Readiness`].
pub async fn ping(target: &PingTarget) -> PingReport {
    let budget = target.timeout.min(MAX_PING_TIME);
    let started = Instant::now();
    let deadline = started + budget;
    let answer = ping_any(target, deadline).await;
    PingReport {
        readiness: answer.readiness,
        sql_state: answer.sql_state,
        message: answer.message,
        latency: answer.known_at.saturating_duration_since(started),
        peer: answer.peer,
    }
}

/// Resolves the host and pings each address in turn (each with an equal share of what is left),
/// until one answers with anything but "unreachable".
async fn ping_any(target: &PingTarget, deadline: Instant) -> Answer {
    if let Err(failure) = check_host(&target.host) {
        return Answer::from_failure(failure);
    }
    let addrs = match within(deadline, resolve(&target.host, target.port), || {
        format!("resolving host \"{}\"", target.host)
    })
    .await
    {
        Ok(addrs) => addrs,
        Err(answer) => return answer,
    };
    let mut last = Answer::new(Readiness::Unreachable, "no address to ping");
    for (i, addr) in addrs.iter().enumerate() {
        let left = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let share = deadline.saturating_duration_since(Instant::now()) / left;
        let answer = ping_at(*addr, target, Instant::now() + share)
            .await
            .at(*addr);
        if answer.readiness != Readiness::Unreachable {
            return answer;
        }
        last = answer;
    }
    last
}

/// Runs `fut` until `deadline`; a failure or the deadline becomes the answer.
async fn within<T, F>(deadline: Instant, fut: F, what: impl FnOnce() -> String) -> Result<T, Answer>
where
    F: Future<Output = Result<T, Failure>>,
{
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(failure)) => Err(Answer::from_failure(failure)),
        Err(_) => Err(Answer::new(
            Readiness::Unreachable,
            format!("{} timed out", what()),
        )),
    }
}

/// One ping of `addr`: TCP, the TLS stage of `target.ssl_mode`, then the exchange.
async fn ping_at(addr: SocketAddr, target: &PingTarget, deadline: Instant) -> Answer {
    let budget = deadline.saturating_duration_since(Instant::now());
    let connected = within(deadline, connect_one(addr, budget), || {
        format!("connecting to {addr}")
    })
    .await;
    let (mut stream, peer) = match connected {
        Ok(connected) => connected,
        Err(answer) => return answer,
    };
    let config = match tls::client_config(target.ssl_mode, target.ca_pem.as_deref(), provider()) {
        Ok(Some(config)) => config,
        Ok(None) => return exchange(stream, target, &peer, deadline).await,
        Err(failure) => return Answer::from_failure(failure),
    };
    if ServerName::try_from(target.host.as_str()).is_err() {
        return Answer::new(
            Readiness::ConfigAnswer,
            format!("host \"{}\" is not a valid name for TLS", target.host),
        );
    }
    let byte = within(deadline, tls::ssl_request_byte(&mut stream, &peer), || {
        format!("TLS negotiation with {peer}")
    })
    .await;
    match byte {
        Err(answer) => answer,
        Ok(b'S') => {
            let handshake = within(
                deadline,
                tls::handshake(&target.host, config, stream, &peer),
                || format!("TLS handshake with {peer}"),
            )
            .await;
            match handshake {
                Ok(tls) => exchange(tls, target, &peer, deadline).await,
                Err(answer) => answer,
            }
        }
        Ok(b'N') if target.ssl_mode == SslMode::Prefer => {
            exchange(stream, target, &peer, deadline).await
        }
        Ok(b'N') => {
            // The server waits for a StartupMessage; an end of file here is what libpq does
            // after an unwanted 'N', which the server does not log.
            close(stream, deadline).await;
            Answer::new(
                Readiness::ConfigAnswer,
                format!(
                    "server does not support TLS but sslMode is {}",
                    tls::ssl_mode_name(target.ssl_mode)
                ),
            )
        }
        Ok(other) => {
            close(stream, deadline).await;
            Answer::new(
                Readiness::NotPostgres,
                format!("{peer} answered the TLS request with byte {other:#04x}: not PostgreSQL"),
            )
        }
    }
}

/// Sends the StartupMessage, reads the first answer whole and closes cleanly.
async fn exchange<S>(mut stream: S, target: &PingTarget, peer: &str, deadline: Instant) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(startup) = startup_message(&target.user, &target.dbname) else {
        close(stream, deadline).await;
        return Answer::new(
            Readiness::ConfigAnswer,
            "user or database name contains a NUL byte",
        );
    };
    let sent = within(
        deadline,
        async {
            stream
                .write_all(&startup)
                .await
                .map_err(|e| from_io_error(&e, ProbeStage::Auth, peer))?;
            stream
                .flush()
                .await
                .map_err(|e| from_io_error(&e, ProbeStage::Auth, peer))
        },
        || format!("sending the startup to {peer}"),
    )
    .await;
    if let Err(answer) = sent {
        return answer;
    }
    let answer = match within(deadline, read_answer(&mut stream, peer), || {
        format!("waiting for the answer of {peer}")
    })
    .await
    {
        Ok(answer) | Err(answer) => answer,
    };
    close(stream, deadline).await;
    answer
}

/// A protocol 3.0 StartupMessage naming `user` and `database`, nothing else; `None` when a name
/// contains a NUL byte (it could not be sent as one string).
fn startup_message(user: &str, database: &str) -> Option<Vec<u8>> {
    if user.contains('\0') || database.contains('\0') {
        return None;
    }
    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for (key, value) in [("user", user), ("database", database)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).ok()?;
    let mut message = len.to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    Some(message)
}

/// Reads the server's first answer to the StartupMessage (after at most one
/// NegotiateProtocolVersion) and classifies it. Reads at most 5 + [`MAX_PING_MESSAGE`] bytes per
/// message.
async fn read_answer<S>(stream: &mut S, peer: &str) -> Result<Answer, Failure>
where
    S: AsyncRead + Unpin,
{
    let io = |e: std::io::Error| from_io_error(&e, ProbeStage::Auth, peer);
    let mut negotiated = false;
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.map_err(io)?;
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let not_postgres = |why: String| {
            Ok(Answer::new(
                Readiness::NotPostgres,
                format!("{peer} answered {why}: not PostgreSQL"),
            ))
        };
        if !matches!(tag, b'R' | b'E' | b'v') || (tag == b'v' && negotiated) {
            return not_postgres(format!("with a message of type {tag:#04x}"));
        }
        if !(4..=MAX_PING_MESSAGE + 4).contains(&len) {
            return not_postgres(format!("with a {len}-byte message"));
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.map_err(io)?;
        match tag {
            b'R' if body.len() >= 4 => {
                let method = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                return Ok(Answer::new(
                    Readiness::Accepting,
                    format!("{peer} accepts connections (authentication request {method})"),
                ));
            }
            b'R' => return not_postgres("with a short authentication request".to_owned()),
            b'E' => return Ok(classify_error(&body)),
            _ => negotiated = true,
        }
    }
}

/// Classifies an ErrorResponse body by its SQLSTATE: 57P03 starting up (or recovering, or
/// shutting down), class 28 a configuration answer, anything else rejected.
fn classify_error(body: &[u8]) -> Answer {
    let mut code = None;
    let mut text = None;
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = after.iter().position(|b| *b == 0).unwrap_or(after.len());
        let value = String::from_utf8_lossy(&after[..end]);
        match field {
            b'C' => code = Some(value.into_owned()),
            b'M' => text = Some(value.into_owned()),
            _ => {}
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    let text: String = text
        .unwrap_or_else(|| "error without a message".to_owned())
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let readiness = match code.as_deref() {
        Some("57P03") => Readiness::StartingUp,
        Some(code) if code.starts_with("28") => Readiness::ConfigAnswer,
        _ => Readiness::Rejected,
    };
    let message = match &code {
        Some(code) => format!("{text} ({code})"),
        None => text,
    };
    Answer {
        sql_state: code,
        ..Answer::new(readiness, message)
    }
}

/// Closes cleanly: TLS close_notify (for a TLS stream) and FIN, then reads and drops what the
/// server still sends until it closes too, at most [`MAX_DRAIN`] bytes and until `deadline`.
/// Closing with unread data would reset the connection, which the server logs.
async fn close<S>(mut stream: S, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let drain = async {
        stream.shutdown().await?;
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_DRAIN {
            match stream.read(&mut scratch).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    // Whatever happens while closing changes nothing about the answer.
    let _ = tokio::time::timeout_at(deadline, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_startup_message_names_user_and_database_only() {
        let message = startup_message("app", "db").unwrap_or_default();
        assert_eq!(&message[..4], &(message.len() as u32).to_be_bytes());
        assert_eq!(&message[4..8], &196_608u32.to_be_bytes());
        assert_eq!(&message[8..], b"user\0app\0database\0db\0\0");
        assert_eq!(startup_message("a\0b", "db"), None);
        assert_eq!(startup_message("app", "d\0b"), None);
    }

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (tag, value) in fields {
            body.push(*tag);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn errors_are_classified_by_sqlstate() {
        let cases = [
            ("57P03", Readiness::StartingUp),
            ("28000", Readiness::ConfigAnswer),
            ("28P01", Readiness::ConfigAnswer),
            ("53300", Readiness::Rejected),
            ("08P01", Readiness::Rejected),
        ];
        for (code, readiness) in cases {
            let body = error_body(&[(b'S', "FATAL"), (b'C', code), (b'M', "some text")]);
            let answer = classify_error(&body);
            assert_eq!(answer.readiness, readiness, "{code}");
            assert_eq!(answer.sql_state.as_deref(), Some(code));
            assert_eq!(answer.message, format!("some text ({code})"));
        }
        let answer = classify_error(b"garbage without terminators");
        assert_eq!(answer.readiness, Readiness::Rejected);
        let answer = classify_error(&error_body(&[(b'M', "line\nbreak\u{7}")]));
        assert_eq!(answer.message, "linebreak");
    }

    #[tokio::test]
    async fn answers_are_read_whole_or_refused() {
        async fn classify(bytes: &[u8]) -> Answer {
            let mut reader = bytes;
            match read_answer(&mut reader, "peer").await {
                Ok(answer) => answer,
                Err(failure) => Answer::from_failure(failure),
            }
        }
        let sasl = [b'R', 0, 0, 0, 23]
            .into_iter()
            .chain(10u32.to_be_bytes())
            .chain(*b"SCRAM-SHA-256\0\0")
            .collect::<Vec<_>>();
        assert_eq!(classify(&sasl).await.readiness, Readiness::Accepting);
        // NegotiateProtocolVersion first, then the request.
        let mut negotiated = vec![b'v', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0];
        negotiated.extend_from_slice(&sasl);
        assert_eq!(classify(&negotiated).await.readiness, Readiness::Accepting);
        let mut twice = negotiated[..13].to_vec();
        twice.extend_from_slice(&negotiated);
        assert_eq!(classify(&twice).await.readiness, Readiness::NotPostgres);
        // Another type, an oversized or undersized length, a short request.
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            &[b'E', 0x40, 0, 0, 0][..],
            &[b'E', 0, 0, 0x20, 0x05][..],
            &[b'R', 0, 0, 0, 3][..],
            &[b'R', 0, 0, 0, 6, 0, 0][..],
        ] {
            assert_eq!(
                classify(bytes).await.readiness,
                Readiness::NotPostgres,
                "{bytes:?}"
            );
        }
        // A close before a whole answer.
        assert_eq!(classify(&sasl[..7]).await.readiness, Readiness::Unreachable);
    }
}
