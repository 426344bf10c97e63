//! A counting fake PostgreSQL server: what clients cost a server, counted at the server.
//!
//! Lives here: [`CountingServer`] (a loopback listener speaking just enough of the startup
//! protocol), its [`Answer`] (switchable while it runs) and the record of every connection
//! ([`Connection`], [`Kind`]). Must not live here: assertions about the operator (the tests make
//! them), a real login (the server never lets anyone in), the TCP fault proxy (`proxy`).
//!
//! Every connection is answered like this: an SSLRequest or GSSENCRequest gets 'N'; the
//! StartupMessage (at most [`MAX_STARTUP`] bytes) is read and the names of its parameters kept
//! (never their values); then, by the [`Answer`] in force:
//! - [`Answer::StartingUp`]: a FATAL ErrorResponse with SQLSTATE 57P03, as a server that never
//!   comes back out of recovery answers every connection;
//! - [`Answer::Cleartext`] or [`Answer::Scram`]: an authentication request. A client that sends a
//!   password message ('p': a password, a SASL initial response) has made a *credentialed
//!   attempt*; it gets a FATAL 28P01 and the connection is closed. Only the password message's
//!   length is kept, never its bytes.
//!
//! How a connection is counted ([`Kind`]): a password message makes it [`Kind::Credentialed`].
//! Without one, a client that named only `user` and `database` in its StartupMessage is a
//! [`Kind::Ping`] (the operator's readiness ping is specified so, `dbpool-probe`'s `ping.rs`);
//! any other startup (a driver's: it names `application_name`, `client_encoding`…) is
//! [`Kind::Login`]: a client that would have sent its password had the server asked for it.
//! While the server answers 57P03 nobody gets as far as a password, so the startup is all the
//! server can tell a ping from a login by.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// The largest StartupMessage read; a longer one ends the connection.
pub const MAX_STARTUP: usize = 10_000;

/// The largest password message read.
const MAX_PASSWORD: usize = 64 * 1024;

/// How long a connection may stay silent before the server closes it.
const IDLE: Duration = Duration::from_secs(2);

/// What the server answers a StartupMessage with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// FATAL 57P03 "the database system is starting up".
    StartingUp,
    /// AuthenticationCleartextPassword; a password message gets FATAL 28P01.
    Cleartext,
    /// AuthenticationSASL (SCRAM-SHA-256); a SASL initial response gets FATAL 28P01.
    Scram,
}

/// What a connection was, as the server saw it (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// It sent a password message.
    Credentialed,
    /// A startup naming only user and database, and no password.
    Ping,
    /// Another client's startup, and no password (the server never asked, or it gave up).
    Login,
    /// No complete StartupMessage.
    Incomplete,
}

/// One connection, as the server saw it.
#[derive(Clone, Debug)]
pub struct Connection {
    /// When it was accepted.
    pub at: SystemTime,
    /// The answer in force when its StartupMessage came.
    pub answer: Answer,
    /// The names of its StartupMessage's parameters (`None`: no complete StartupMessage).
    pub startup_keys: Option<Vec<String>>,
    /// The length of its password message, if it sent one.
    pub password_len: Option<usize>,
}

impl Connection {
    /// What it was (see the module comment).
    pub fn kind(&self) -> Kind {
        match (&self.startup_keys, self.password_len) {
            (_, Some(_)) => Kind::Credentialed,
            (None, None) => Kind::Incomplete,
            (Some(keys), None) if keys.iter().all(|k| k == "user" || k == "database") => Kind::Ping,
            (Some(_), None) => Kind::Login,
        }
    }

    /// Whether it is a credentialed attempt: it sent a password, or it is a login the server
    /// did not let get as far as one.
    pub fn credentialed(&self) -> bool {
        matches!(self.kind(), Kind::Credentialed | Kind::Login)
    }
}

/// The fake server, listening on a loopback port until dropped.
pub struct CountingServer {
    port: u16,
    answer: watch::Sender<Answer>,
    seen: Arc<Mutex<Vec<Connection>>>,
    task: JoinHandle<()>,
}

impl CountingServer {
    /// Starts it on `127.0.0.1` and a free port, answering `answer`.
    pub async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let (answer_tx, answer_rx) = watch::channel(answer);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let index = {
                        let mut seen = seen.lock().expect("lock");
                        seen.push(Connection {
                            at: SystemTime::now(),
                            answer: *answer_rx.borrow(),
                            startup_keys: None,
                            password_len: None,
                        });
                        seen.len() - 1
                    };
                    let seen = Arc::clone(&seen);
                    let answer = answer_rx.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(IDLE * 3, serve(stream, answer, &seen, index))
                            .await;
                    });
                }
            })
        };
        Self {
            port,
            answer: answer_tx,
            seen,
            task,
        }
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Answers `answer` from now on (to new StartupMessages).
    pub fn set_answer(&self, answer: Answer) {
        self.answer.send_replace(answer);
    }

    /// Every connection so far, in the order accepted.
    pub fn connections(&self) -> Vec<Connection> {
        self.seen.lock().expect("lock").clone()
    }

    /// The connections of `kind` accepted at or after `since`.
    pub fn count(&self, kind: Kind, since: SystemTime) -> usize {
        self.connections()
            .iter()
            .filter(|c| c.kind() == kind && c.at >= since)
            .count()
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection, recording it at `index`.
async fn serve(
    mut stream: TcpStream,
    answer: watch::Receiver<Answer>,
    seen: &Mutex<Vec<Connection>>,
    index: usize,
) -> std::io::Result<()> {
    let Some(keys) = read_startup(&mut stream).await? else {
        return Ok(());
    };
    let answer = *answer.borrow();
    if let Some(c) = seen.lock().expect("lock").get_mut(index) {
        c.startup_keys = Some(keys);
        c.answer = answer;
    }
    match answer {
        Answer::StartingUp => {
            stream
                .write_all(&error("57P03", "the database system is starting up"))
                .await?;
        }
        Answer::Cleartext | Answer::Scram => {
            stream.write_all(&auth_request(answer)).await?;
            if let Some(len) = read_password(&mut stream).await? {
                if let Some(c) = seen.lock().expect("lock").get_mut(index) {
                    c.password_len = Some(len);
                }
                stream
                    .write_all(&error("28P01", "password authentication failed"))
                    .await?;
            }
        }
    }
    stream.shutdown().await?;
    // Let the client close first, as a real server's FATAL does.
    let mut sink = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(IDLE, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Reads SSL/GSS requests (answered 'N') and the StartupMessage; the names of its parameters,
/// or None when the client went away or sent something else.
async fn read_startup(stream: &mut TcpStream) -> std::io::Result<Option<Vec<String>>> {
    for _ in 0..3 {
        let mut head = [0u8; 8];
        match tokio::time::timeout(IDLE, stream.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(None),
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match code {
            // SSLRequest, GSSENCRequest: no.
            80_877_103 | 80_877_104 => stream.write_all(b"N").await?,
            196_608 if (8..=MAX_STARTUP).contains(&len) => {
                let mut body = vec![0u8; len - 8];
                match tokio::time::timeout(IDLE, stream.read_exact(&mut body)).await {
                    Ok(Ok(_)) => return Ok(Some(parameter_names(&body))),
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The names of the `name\0value\0` pairs of a StartupMessage body.
fn parameter_names(body: &[u8]) -> Vec<String> {
    let mut fields = body.split(|b| *b == 0);
    let mut names = Vec::new();
    while let Some(name) = fields.next().filter(|n| !n.is_empty()) {
        names.push(String::from_utf8_lossy(name).into_owned());
        if fields.next().is_none() {
            break;
        }
    }
    names
}

/// Reads the client's next message; its length when it is a password message ('p').
async fn read_password(stream: &mut TcpStream) -> std::io::Result<Option<usize>> {
    let mut head = [0u8; 5];
    match tokio::time::timeout(IDLE, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        _ => return Ok(None),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if head[0] != b'p' || !(4..=MAX_PASSWORD).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len - 4];
    match tokio::time::timeout(IDLE, stream.read_exact(&mut body)).await {
        Ok(Ok(_)) => Ok(Some(body.len())),
        _ => Ok(None),
    }
}

/// The authentication request of `answer`.
fn auth_request(answer: Answer) -> Vec<u8> {
    let body: Vec<u8> = match answer {
        Answer::Scram => {
            let mut b = 10u32.to_be_bytes().to_vec();
            b.extend_from_slice(b"SCRAM-SHA-256\0\0");
            b
        }
        _ => 3u32.to_be_bytes().to_vec(),
    };
    message(b'R', &body)
}

/// A FATAL ErrorResponse with `code` and `text`.
fn error(code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_startup_is_a_ping_only_when_it_names_user_and_database_only() {
        let conn = |keys: &[&str], password: Option<usize>| Connection {
            at: SystemTime::now(),
            answer: Answer::StartingUp,
            startup_keys: Some(keys.iter().map(|k| (*k).to_owned()).collect()),
            password_len: password,
        };
        assert_eq!(conn(&["user", "database"], None).kind(), Kind::Ping);
        assert_eq!(
            conn(&["user", "database", "application_name"], None).kind(),
            Kind::Login
        );
        assert_eq!(
            conn(&["user", "database"], Some(12)).kind(),
            Kind::Credentialed
        );
        assert!(conn(&["user", "application_name"], None).credentialed());
        assert!(!conn(&["user", "database"], None).credentialed());
        assert_eq!(
            parameter_names(b"user\0app\0database\0db\0\0"),
            vec!["user".to_owned(), "database".to_owned()]
        );
    }
}
