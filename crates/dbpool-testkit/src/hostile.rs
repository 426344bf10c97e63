//! Fake, hostile PostgreSQL servers on loopback, for the probe's and the operator's security tests.
//!
//! Lives here: [`FakeServer`], which accepts connections on `127.0.0.1`, speaks just enough of the
//! protocol for one [`Behaviour`] (ask for a cleartext password, for MD5, for SCRAM with a chosen
//! iteration count; hang after accepting; announce an oversized message; drip bytes slowly; flood
//! the startup; answer with garbage; trickle the first answer) and records every message the client sends, so that tests can prove what a client
//! never sent. Must not live here: assertions (the tests make them) or anything that listens
//! beyond loopback.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the fake server does after accepting a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Declines TLS, then asks for the password in clear text (AuthenticationCleartextPassword).
    Cleartext,
    /// Declines TLS, then asks for an MD5 password with a fixed salt.
    Md5,
    /// Declines TLS, offers SCRAM-SHA-256 and answers the client-first message with `iterations`.
    Scram {
        /// The iteration count of the server-first message.
        iterations: u32,
    },
    /// Accepts the connection and never sends a byte.
    HangAfterAccept,
    /// Declines TLS, then announces a 1 GiB message and writes zeros as long as the client reads.
    Oversized,
    /// Declines TLS, accepts the login (AuthenticationOk), then sends a valid ParameterStatus
    /// message one byte at a time, `every` apart, forever.
    SlowDrip {
        /// Time between two bytes.
        every: Duration,
    },
    /// Declines TLS, accepts the login (AuthenticationOk), then sends small ParameterStatus
    /// messages as fast as the client reads, never finishing the startup.
    EndlessStartup,
    /// Declines TLS, then answers the startup with an HTTP error page: not PostgreSQL.
    Garbage,
    /// Declines TLS, then announces a 200-byte ErrorResponse and sends it one byte at a time,
    /// `every` apart, forever (the bytes never finish the message).
    Trickle {
        /// Time between two bytes.
        every: Duration,
    },
}

/// The salt [`Behaviour::Md5`] sends.
pub const MD5_SALT: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// One message a client sent: its type byte (0 for the untyped startup and SSL requests) and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Message type (`p` for a password, SASL initial or SASL response message).
    pub tag: u8,
    /// The message body (after the length word).
    pub body: Vec<u8>,
}

/// A fake server listening on a loopback port until dropped.
pub struct FakeServer {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    sent: Arc<AtomicU64>,
    ended: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl FakeServer {
    /// Starts a server with `behaviour` on `127.0.0.1` and a free port.
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (ended_tx, ended) = watch::channel(0usize);
        let ended_tx = Arc::new(ended_tx);
        let task = {
            let received = Arc::clone(&received);
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let received = Arc::clone(&received);
                    let sent = Arc::clone(&sent);
                    let ended_tx = Arc::clone(&ended_tx);
                    tokio::spawn(async move {
                        let mut session = Session {
                            stream,
                            received,
                            sent,
                        };
                        // Any I/O error simply ends the session (the client went away).
                        let _ = session.run(behaviour).await;
                        ended_tx.send_modify(|n| *n += 1);
                    });
                }
            })
        };
        Self {
            port,
            received,
            sent,
            ended,
            task,
        }
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes the server has written so far, over all sessions.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits (at most 10 s) until `sessions` sessions have ended, then returns every message
    /// the clients sent, in order.
    pub async fn received_after(&self, sessions: usize) -> Vec<Received> {
        let mut ended = self.ended.clone();
        tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|n| *n >= sessions))
            .await
            .expect("sessions did not end within 10s")
            .expect("server task gone");
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Session {
    stream: TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    sent: Arc<AtomicU64>,
}

impl Session {
    async fn run(&mut self, behaviour: Behaviour) -> std::io::Result<()> {
        if behaviour == Behaviour::HangAfterAccept {
            // Read (and record) whatever comes, never answer.
            return self.record_until_eof().await;
        }
        self.startup().await?;
        match behaviour {
            Behaviour::Cleartext => {
                self.send(b'R', &3u32.to_be_bytes()).await?;
                self.record_until_eof().await
            }
            Behaviour::Md5 => {
                let mut body = 5u32.to_be_bytes().to_vec();
                body.extend_from_slice(&MD5_SALT);
                self.send(b'R', &body).await?;
                self.record_until_eof().await
            }
            Behaviour::Scram { iterations } => {
                let mut body = 10u32.to_be_bytes().to_vec();
                body.extend_from_slice(b"SCRAM-SHA-256\0\0");
                self.send(b'R', &body).await?;
                let initial = self.read_typed().await?;
                let nonce = client_nonce(&initial.body).unwrap_or_default();
                let mut body = 11u32.to_be_bytes().to_vec();
                body.extend_from_slice(
                    format!("r={nonce}fakeserver,s=c2FsdHNhbHRzYWx0,i={iterations}").as_bytes(),
                );
                self.send(b'R', &body).await?;
                self.record_until_eof().await
            }
            Behaviour::Oversized => {
                let mut header = vec![b'E'];
                header.extend_from_slice(&0x4000_0000u32.to_be_bytes());
                self.write(&header).await?;
                let zeros = vec![0u8; 64 * 1024];
                loop {
                    self.write(&zeros).await?;
                }
            }
            Behaviour::SlowDrip { every } => {
                self.send(b'R', &0u32.to_be_bytes()).await?;
                let message = parameter_status("server_version", "15.0");
                let mut tick = tokio::time::interval(every);
                loop {
                    for byte in &message {
                        tick.tick().await;
                        self.write(std::slice::from_ref(byte)).await?;
                    }
                }
            }
            Behaviour::EndlessStartup => {
                self.send(b'R', &0u32.to_be_bytes()).await?;
                let mut n = 0u64;
                loop {
                    n += 1;
                    self.write(&parameter_status(&format!("p{n}"), "x")).await?;
                }
            }
            Behaviour::Garbage => {
                self.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await?;
                self.record_until_eof().await
            }
            Behaviour::Trickle { every } => {
                self.write(&[b'E', 0, 0, 0, 204]).await?;
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    self.write(b"S").await?;
                }
            }
            Behaviour::HangAfterAccept => Ok(()),
        }
    }

    /// Reads the startup message, declining SSL and GSS encryption requests before it.
    async fn startup(&mut self) -> std::io::Result<()> {
        loop {
            let len = self.stream.read_u32().await? as usize;
            let mut body = vec![0; len.saturating_sub(4).min(64 * 1024)];
            self.stream.read_exact(&mut body).await?;
            let code = body
                .get(..4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            self.record(0, body);
            match code {
                Some(80_877_103 | 80_877_104) => self.write(b"N").await?,
                _ => return Ok(()),
            }
        }
    }

    async fn read_typed(&mut self) -> std::io::Result<Received> {
        let tag = self.stream.read_u8().await?;
        let len = self.stream.read_u32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4).min(1024 * 1024)];
        self.stream.read_exact(&mut body).await?;
        self.record(tag, body.clone());
        Ok(Received { tag, body })
    }

    async fn record_until_eof(&mut self) -> std::io::Result<()> {
        loop {
            match self.read_typed().await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn record(&self, tag: u8, body: Vec<u8>) {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Received { tag, body });
    }

    async fn send(&mut self, tag: u8, body: &[u8]) -> std::io::Result<()> {
        let mut message = vec![tag];
        let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
        message.extend_from_slice(&len.to_be_bytes());
        message.extend_from_slice(body);
        self.write(&message).await
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// A ParameterStatus message `name = value`.
fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    let mut message = vec![b'S'];
    message.extend_from_slice(&u32::try_from(body.len() + 4).unwrap_or(0).to_be_bytes());
    message.extend_from_slice(&body);
    message
}

/// The nonce of a SASLInitialResponse body (`mechanism\0`, length, `n,,n=,r=NONCE`).
fn client_nonce(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.split(',')
        .find_map(|attr| attr.strip_prefix("r="))
        .map(str::to_owned)
}
