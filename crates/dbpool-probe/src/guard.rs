//! The authentication guard: a stream adapter that reads every message the server sends before
//! tokio-postgres sees it, and refuses unsafe authentication requests before the client answers.
//!
//! Lives here: [`Guarded`], which wraps the stream handed to `tokio_postgres::Config::connect_raw`
//! (the TCP stream for plain text, the TLS stream for TLS), frames the server's byte stream into
//! messages, caps their size, and checks each `Authentication*` request against an
//! [`AuthPolicy`]. A refused request is never delivered to the client, so tokio-postgres 0.7 (which
//! answers whatever the server asks) never computes or sends anything derived from the password.
//! Must not live here: the TLS handshake (`tls`), the classification of ordinary errors
//! (`classify`), or how a refusal becomes a report (`connect`).
//!
//! Why an adapter and not our own startup: tokio-postgres 0.7 has no hook between the startup
//! message and its answer to the authentication request, and doing the startup ourselves would
//! mean re-implementing SCRAM and the startup parameters it keeps. Reading the stream is enough:
//! the client can only answer what it has been given.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsStream};

/// The largest server message the probe accepts (type byte and length word excluded).
pub const MAX_SERVER_MESSAGE: usize = 1024 * 1024;

/// The most bytes a server may send before its first ReadyForQuery (startup, authentication,
/// parameters and notices together).
pub const MAX_STARTUP_BYTES: usize = 1024 * 1024;

/// The fewest SCRAM iterations accepted without verified TLS (PostgreSQL's default is 4096).
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;

/// The most SCRAM iterations accepted at all: the key derivation runs on the operator's CPU, so a
/// server must not be able to make one login cost minutes.
pub const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// What the server may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthPolicy {
    /// TLS is established and the certificate was verified (verify-ca or verify-full).
    pub tls_verified: bool,
    /// The DbPool allows MD5 password authentication (`database.allowMd5`).
    pub allow_md5: bool,
}

/// Why the guard stopped the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An authentication method the policy forbids: a configuration problem.
    Refused(String),
    /// The server broke the protocol or a limit (oversized message, endless startup).
    Violation(String),
}

/// The cell a [`Guarded`] stream fills when it stops a session.
pub type VerdictCell = Arc<Mutex<Option<Verdict>>>;

/// A server stream whose messages are framed, size-checked and (for authentication requests)
/// checked against an [`AuthPolicy`] before the client reads them.
pub struct Guarded<S> {
    inner: S,
    policy: AuthPolicy,
    verdict: VerdictCell,
    /// Bytes read from `inner` not yet handed to the client.
    buf: Vec<u8>,
    /// `buf[..ready]` holds whole, checked messages the client may read.
    ready: usize,
    /// Bytes received before the first ReadyForQuery (`None` once it arrived).
    startup_bytes: Option<usize>,
    /// `buf` was filled from the inner stream into this scratch space.
    scratch: Box<[u8; 8192]>,
    /// The inner stream reached end of file.
    eof: bool,
}

impl<S> Guarded<S> {
    /// Wraps `inner`; a refusal or violation is also written to `verdict`.
    pub fn new(inner: S, policy: AuthPolicy, verdict: VerdictCell) -> Self {
        Self {
            inner,
            policy,
            verdict,
            buf: Vec::new(),
            ready: 0,
            startup_bytes: Some(0),
            scratch: Box::new([0; 8192]),
            eof: false,
        }
    }

    fn stopped(&self) -> Option<Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stop(&self, verdict: Verdict) -> io::Error {
        let text = match &verdict {
            Verdict::Refused(m) | Verdict::Violation(m) => m.clone(),
        };
        *self.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(verdict);
        io::Error::new(io::ErrorKind::PermissionDenied, text)
    }

    /// Checks the messages complete in `buf[ready..]`, moving `ready` past each accepted one.
    fn check_complete(&mut self) -> Result<(), Verdict> {
        loop {
            let rest = &self.buf[self.ready..];
            if rest.len() < 5 {
                return Ok(());
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 {
                return Err(Verdict::Violation(format!(
                    "server sent a malformed message (length {len})"
                )));
            }
            let body_len = len - 4;
            if body_len > MAX_SERVER_MESSAGE {
                return Err(Verdict::Violation(format!(
                    "server announced a {body_len}-byte message; the probe accepts at most {MAX_SERVER_MESSAGE} bytes"
                )));
            }
            if rest.len() < 5 + body_len {
                return Ok(());
            }
            if tag == b'R' {
                check_auth(&rest[5..5 + body_len], self.policy)?;
            }
            if let Some(seen) = self.startup_bytes {
                let seen = seen + 5 + body_len;
                if tag == b'Z' {
                    self.startup_bytes = None;
                } else if seen > MAX_STARTUP_BYTES {
                    return Err(Verdict::Violation(format!(
                        "server sent over {MAX_STARTUP_BYTES} bytes without finishing the startup"
                    )));
                } else {
                    self.startup_bytes = Some(seen);
                }
            }
            self.ready += 5 + body_len;
        }
    }

    /// Whether the partial message at `buf[ready..]` already breaks a limit.
    fn check_partial(&self) -> Result<(), Verdict> {
        let pending = self.buf.len() - self.ready;
        match self.startup_bytes {
            Some(seen) if seen + pending > MAX_STARTUP_BYTES + 5 => Err(Verdict::Violation(
                format!("server sent over {MAX_STARTUP_BYTES} bytes without finishing the startup"),
            )),
            _ => Ok(()),
        }
    }
}

/// Checks one authentication request (the body of an `R` message) against `policy`.
fn check_auth(body: &[u8], policy: AuthPolicy) -> Result<(), Verdict> {
    let Some(code) = body.get(..4) else {
        return Err(Verdict::Violation(
            "server sent a malformed authentication request".to_owned(),
        ));
    };
    let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    match code {
        3 if !policy.tls_verified => Err(Verdict::Refused(
            "the server asked for the password in clear text (AuthenticationCleartextPassword) \
             over a connection without verified TLS; refused, the password was not sent. Fix: \
             configure the server for scram-sha-256, or use sslMode verify-full (or verify-ca) \
             with a caSecretRef"
                .to_owned(),
        )),
        5 if !policy.allow_md5 => Err(Verdict::Refused(
            "the server asked for MD5 password authentication; refused, nothing derived from the \
             password was sent. Fix: configure the server for scram-sha-256 (password_encryption \
             and pg_hba.conf, then set the password again), or set spec.database.allowMd5: true"
                .to_owned(),
        )),
        11 => check_scram_first(&body[4..], policy),
        _ => Ok(()),
    }
}

/// Checks the iteration count of a SCRAM server-first-message (`r=…,s=…,i=N`).
fn check_scram_first(message: &[u8], policy: AuthPolicy) -> Result<(), Verdict> {
    let iterations = std::str::from_utf8(message).ok().and_then(|text| {
        text.split(',')
            .find_map(|attr| attr.strip_prefix("i="))
            .and_then(|n| n.parse::<u32>().ok())
    });
    let Some(iterations) = iterations else {
        return Err(Verdict::Violation(
            "server sent a SCRAM challenge without a valid iteration count".to_owned(),
        ));
    };
    if iterations > MAX_SCRAM_ITERATIONS {
        return Err(Verdict::Refused(format!(
            "the server asked for SCRAM-SHA-256 with {iterations} iterations, over the limit of \
             {MAX_SCRAM_ITERATIONS}; refused. Fix: lower scram_iterations on the server and set \
             the password again"
        )));
    }
    if iterations < MIN_SCRAM_ITERATIONS && !policy.tls_verified {
        return Err(Verdict::Refused(format!(
            "the server asked for SCRAM-SHA-256 with only {iterations} iterations over a \
             connection without verified TLS (at least {MIN_SCRAM_ITERATIONS} are required); \
             refused, no proof was sent. Fix: set scram_iterations to 4096 or more on the server \
             and set the password again, or use sslMode verify-full (or verify-ca) with a \
             caSecretRef"
        )));
    }
    Ok(())
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(verdict) = this.stopped() {
                return Poll::Ready(Err(this.stop(verdict)));
            }
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A partial message at the end is dropped; the client sees the end of file.
                return Poll::Ready(Ok(()));
            }
            let mut scratch = ReadBuf::new(&mut this.scratch[..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut scratch) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let filled = scratch.filled();
            if filled.is_empty() {
                this.eof = true;
                continue;
            }
            this.buf.extend_from_slice(filled);
            if let Err(verdict) = this.check_complete().and_then(|()| this.check_partial()) {
                this.buf = Vec::new();
                this.ready = 0;
                return Poll::Ready(Err(this.stop(verdict)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Belt and braces: once stopped, nothing more reaches the server.
        if let Some(verdict) = self.stopped() {
            return Poll::Ready(Err(self.stop(verdict)));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Guarded<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        body
    }

    const OPEN: AuthPolicy = AuthPolicy {
        tls_verified: false,
        allow_md5: false,
    };
    const VERIFIED: AuthPolicy = AuthPolicy {
        tls_verified: true,
        allow_md5: false,
    };

    #[test]
    fn cleartext_needs_verified_tls() {
        assert!(matches!(
            check_auth(&auth(3, b""), OPEN),
            Err(Verdict::Refused(m)) if m.contains("clear text") && m.contains("verify-full")
        ));
        assert_eq!(check_auth(&auth(3, b""), VERIFIED), Ok(()));
    }

    #[test]
    fn md5_needs_allow_md5() {
        let req = auth(5, b"salt");
        assert!(matches!(
            check_auth(&req, VERIFIED),
            Err(Verdict::Refused(m)) if m.contains("MD5") && m.contains("allowMd5")
        ));
        let allowed = AuthPolicy {
            allow_md5: true,
            ..OPEN
        };
        assert_eq!(check_auth(&req, allowed), Ok(()));
    }

    #[test]
    fn scram_iterations_are_bounded() {
        let first = |i: &str| auth(11, format!("r=abc,s=c2FsdA==,i={i}").as_bytes());
        assert!(matches!(
            check_auth(&first("1"), OPEN),
            Err(Verdict::Refused(m)) if m.contains("only 1 iterations")
        ));
        assert_eq!(check_auth(&first("1"), VERIFIED), Ok(()));
        assert_eq!(check_auth(&first("4096"), OPEN), Ok(()));
        assert!(matches!(
            check_auth(&first("2000000000"), VERIFIED),
            Err(Verdict::Refused(_))
        ));
        assert!(matches!(
            check_auth(&first("x"), VERIFIED),
            Err(Verdict::Violation(_))
        ));
        // SASL (10), SASLFinal (12), Ok (0) pass.
        assert_eq!(check_auth(&auth(10, b"SCRAM-SHA-256\0\0"), OPEN), Ok(()));
        assert_eq!(check_auth(&auth(0, b""), OPEN), Ok(()));
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_at_the_header() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, client) = tokio::io::duplex(64);
        let verdict = VerdictCell::default();
        let mut guarded = Guarded::new(client, OPEN, Arc::clone(&verdict));
        let mut header = vec![b'E'];
        header.extend_from_slice(&(0x4000_0000u32).to_be_bytes());
        server.write_all(&header).await.expect("write");
        let mut sink = Vec::new();
        let err = guarded.read_to_end(&mut sink).await.expect_err("refused");
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(sink.is_empty());
        assert!(matches!(
            &*verdict.lock().expect("lock"),
            Some(Verdict::Violation(_))
        ));
    }

    #[tokio::test]
    async fn accepted_messages_pass_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, client) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(client, OPEN, VerdictCell::default());
        let mut wire = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0]; // AuthenticationOk
        wire.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        server.write_all(&wire).await.expect("write");
        drop(server);
        let mut got = Vec::new();
        guarded.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, wire);
    }
}
