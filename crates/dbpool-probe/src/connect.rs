//! The connect path of a probe: resolve, TCP, TLS, startup and authentication.
//!
//! Lives here: opening one new PostgreSQL session stage by stage, on a socket of our own (TCP
//! keepalive, `TCP_USER_TIMEOUT` no longer than the probe timeout), each stage bounded by what
//! is left of the probe's budget. Must not live here: the queries run on the session (`checks`),
//! or deciding when a new session is needed (`prober`).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, PoisonError},
    time::Duration,
};

use rustls::{crypto::CryptoProvider, pki_types::ServerName};
use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::{
    net::{TcpSocket, TcpStream},
    time::Instant,
};
use tokio_postgres::{
    Client, NoTls,
    config::{SslMode as PgSslMode, SslNegotiation},
    tls::TlsConnect,
};

use crate::{ProbeStage, SslMode};

use super::{
    ProbeTarget,
    classify::{find_io, from_io_error, from_pg_error, from_tls_io_error},
    stage::{Clock, Failure},
    tls::{self, SslAnswer, TimedTls},
};

/// A running session's connection future: it drives the socket and ends when the session does.
pub(crate) type ConnectionTask =
    Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// A freshly opened, authenticated session.
pub(crate) struct Opened {
    /// The client half, for queries.
    pub client: Client,
    /// The connection half, to be spawned.
    pub connection: ConnectionTask,
    /// `server_version` as the server reported it at startup.
    pub server_version: Option<String>,
    /// The address actually connected to, for messages.
    pub peer: String,
    /// The resolved address actually connected to (and authenticated at).
    pub peer_addr: SocketAddr,
}

/// Opens a new session to `target`, recording each stage on `clock`.
pub(crate) async fn open(
    target: &ProbeTarget,
    provider: &Arc<CryptoProvider>,
    clock: &mut Clock,
) -> Result<Opened, Failure> {
    let addrs = clock
        .stage(
            ProbeStage::Resolve,
            &format!("resolving host \"{}\"", target.host),
            resolve(&target.host, target.port),
        )
        .await?;
    let (mut stream, peer_addr) = clock
        .stage(
            ProbeStage::Connect,
            &format!("connecting to {}:{}", target.host, target.port),
            connect_any(&addrs, target.timeout),
        )
        .await?;
    let peer = peer_addr.to_string();

    let mut pg = tokio_postgres::Config::new();
    pg.user(&target.user)
        .dbname(&target.dbname)
        .application_name(&target.application_name);
    if let Some(password) = &target.password {
        pg.password(password.expose());
    }

    let tls_started = Instant::now();
    let Some(tls_config) = tls::client_config(target.ssl_mode, target.ca_pem.as_deref(), provider)?
    else {
        pg.ssl_mode(PgSslMode::Disable);
        return authenticate(&pg, stream, NoTls, None, peer_addr, clock).await;
    };
    if ServerName::try_from(target.host.as_str()).is_err() {
        return Err(Failure::config(
            ProbeStage::Tls,
            format!("host \"{}\" is not a valid name for TLS", target.host),
        ));
    }
    let answer =
        match tokio::time::timeout(clock.remaining(), tls::ssl_request(&mut stream, &peer)).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::timeout(
                ProbeStage::Tls,
                &format!("TLS negotiation with {peer}"),
                clock.budget(),
            )),
        };
    let answer = answer.inspect_err(|_| clock.record(ProbeStage::Tls, tls_started.elapsed()))?;
    match answer {
        SslAnswer::NotSupported => {
            clock.record(ProbeStage::Tls, tls_started.elapsed());
            if target.ssl_mode != SslMode::Prefer {
                return Err(Failure::config(
                    ProbeStage::Tls,
                    format!(
                        "server does not support TLS but sslMode is {}",
                        tls::ssl_mode_name(target.ssl_mode)
                    ),
                ));
            }
            pg.ssl_mode(PgSslMode::Disable);
            authenticate(&pg, stream, NoTls, None, peer_addr, clock).await
        }
        SslAnswer::Supported => {
            // The server said 'S' to our SSLRequest, so the next bytes are the TLS handshake:
            // exactly what tokio-postgres's direct negotiation sends. Verification is done by the
            // rustls configuration, whatever tokio-postgres's own (coarser) sslmode says.
            pg.ssl_mode(PgSslMode::Require)
                .ssl_negotiation(SslNegotiation::Direct);
            let (connector, done) = TimedTls::new(&target.host, tls_config);
            authenticate(
                &pg,
                stream,
                connector,
                Some((tls_started, done)),
                peer_addr,
                clock,
            )
            .await
        }
    }
}

/// When the TLS stage began, and the cell the connector fills when the handshake completes.
type TlsTiming = (Instant, Arc<std::sync::Mutex<Option<Instant>>>);

/// Startup and authentication (and, when `tls` is given, the TLS handshake before them).
async fn authenticate<T>(
    pg: &tokio_postgres::Config,
    stream: TcpStream,
    connector: T,
    tls: Option<TlsTiming>,
    peer_addr: SocketAddr,
    clock: &mut Clock,
) -> Result<Opened, Failure>
where
    T: TlsConnect<TcpStream> + Send,
    T::Stream: Send + 'static,
    T::Future: Send,
{
    let peer = peer_addr.to_string();
    let peer = peer.as_str();
    let auth_started = Instant::now();
    let result = tokio::time::timeout(clock.remaining(), async {
        let (client, connection) = pg.connect_raw(stream, connector).await?;
        let server_version = connection.parameter("server_version").map(str::to_owned);
        let connection: ConnectionTask = Box::pin(connection);
        Ok::<_, tokio_postgres::Error>((client, connection, server_version))
    })
    .await;
    let now = Instant::now();

    // Which stage we were in: TLS until the handshake completed, authentication after.
    let handshake_done = match &tls {
        Some((tls_started, cell)) => {
            let done = *cell.lock().unwrap_or_else(PoisonError::into_inner);
            clock.record(
                ProbeStage::Tls,
                done.unwrap_or(now).saturating_duration_since(*tls_started),
            );
            if let Some(done) = done {
                clock.record(ProbeStage::Auth, now.saturating_duration_since(done));
            }
            done.is_some()
        }
        None => {
            clock.record(
                ProbeStage::Auth,
                now.saturating_duration_since(auth_started),
            );
            true
        }
    };

    match result {
        Ok(Ok((client, connection, server_version))) => Ok(Opened {
            client,
            connection,
            server_version,
            peer: peer.to_owned(),
            peer_addr,
        }),
        Ok(Err(err)) if !handshake_done => Err(match find_io(&err) {
            Some(io) => from_tls_io_error(io, peer),
            None => from_pg_error(&err, ProbeStage::Tls, peer),
        }),
        Ok(Err(err)) => Err(from_pg_error(&err, ProbeStage::Auth, peer)),
        Err(_) if !handshake_done => Err(Failure::timeout(
            ProbeStage::Tls,
            &format!("TLS handshake with {peer}"),
            clock.budget(),
        )),
        Err(_) => Err(Failure::timeout(
            ProbeStage::Auth,
            &format!("login to {peer}"),
            clock.budget(),
        )),
    }
}

/// Resolves `host` (a name or an address literal).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            Failure::transient(
                ProbeStage::Resolve,
                format!("could not resolve host \"{host}\": {e}"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Failure::transient(
            ProbeStage::Resolve,
            format!("host \"{host}\" resolved to no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that accepts. All failing: the failures, joined.
async fn connect_any(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Failure> {
    let mut failures: Vec<Failure> = Vec::new();
    for addr in addrs {
        let peer = addr.to_string();
        let attempt = async {
            let socket = probe_socket(*addr, timeout)?;
            socket.connect(*addr).await
        };
        match attempt.await {
            Ok(stream) => return Ok((stream, *addr)),
            Err(e) => failures.push(from_io_error(&e, ProbeStage::Connect, &peer)),
        }
    }
    let message = failures
        .iter()
        .map(|f| f.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Failure::transient(ProbeStage::Connect, message))
}

/// A TCP socket for `addr` whose dead peers are noticed within about `timeout`: keepalive probes
/// on idle connections, and `TCP_USER_TIMEOUT` bounding how long sent data may stay unacknowledged.
fn probe_socket(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let idle = timeout.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let keepalive = TcpKeepalive::new().with_time(idle);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive
        .with_interval((timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}
