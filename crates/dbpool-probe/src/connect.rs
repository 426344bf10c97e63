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
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
    time::Instant,
};
use tokio_postgres::{
    Client, NoTls,
    config::{ChannelBinding, SslMode as PgSslMode, SslNegotiation},
    tls::TlsConnect,
};

use crate::{ProbeOutcome, ProbeStage, SslMode};

use super::{
    ProbeTarget,
    classify::{find_io, from_io_error, from_pg_error, from_tls_io_error},
    guard::{AuthPolicy, Guarded, Verdict, VerdictCell},
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
///
/// Every address the host resolves to is tried in order, each with an equal share of what is
/// left of the budget (the last one gets all that is left), so a black-holed first address does
/// not use up the whole probe. A configuration failure (a refused login method, a wrong
/// password, a rejected certificate) stops at once: the next address would only repeat it.
pub(crate) async fn open(
    target: &ProbeTarget,
    provider: &Arc<CryptoProvider>,
    clock: &mut Clock,
) -> Result<Opened, Failure> {
    check_host(&target.host)?;
    let addrs = clock
        .stage(
            ProbeStage::Resolve,
            &format!("resolving host \"{}\"", target.host),
            resolve(&target.host, target.port),
        )
        .await?;
    open_any(&addrs, target, provider, clock).await
}

/// Tries `addrs` in order, each within its share of the remaining budget.
pub(crate) async fn open_any(
    addrs: &[SocketAddr],
    target: &ProbeTarget,
    provider: &Arc<CryptoProvider>,
    clock: &mut Clock,
) -> Result<Opened, Failure> {
    let mut failures: Vec<Failure> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        clock.cap(clock.remaining() / left);
        let attempt = open_at(*addr, target, provider, clock).await;
        clock.uncap();
        match attempt {
            Ok(opened) => return Ok(opened),
            Err(failure) if failure.outcome != ProbeOutcome::TransientFailure => {
                return Err(failure);
            }
            Err(failure) => failures.push(failure),
        }
    }
    let Some(mut last) = failures.pop() else {
        return Err(Failure::path(
            ProbeStage::Resolve,
            format!("host \"{}\" resolved to no address", target.host),
        ));
    };
    if !failures.is_empty() {
        // Path evidence only if every address said so (one refusal proves a path works).
        last.path_evidence = last.path_evidence && failures.iter().all(|f| f.path_evidence);
        failures.push(last.clone());
        last.message = failures
            .iter()
            .map(|f| f.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
    }
    Err(last)
}

/// A host name or address literal can only hold these characters: anything else (a NUL, a
/// space, a slash, a control character) is a mistake or an attack on the resolver, reported
/// without echoing the host.
pub(crate) fn check_host(host: &str) -> Result<(), Failure> {
    let plausible = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if plausible {
        Ok(())
    } else {
        Err(Failure::config(
            ProbeStage::Resolve,
            "database.host is not a host name or an IP address (only letters, digits, '.', '-', \
             '_' and ':' are allowed)",
        ))
    }
}

/// One attempt at `addr`: TCP, TLS, startup and authentication, within what `clock` allows.
async fn open_at(
    addr: SocketAddr,
    target: &ProbeTarget,
    provider: &Arc<CryptoProvider>,
    clock: &mut Clock,
) -> Result<Opened, Failure> {
    let (mut stream, peer) = clock
        .stage(
            ProbeStage::Connect,
            &format!("connecting to {addr}"),
            connect_one(addr, target.timeout),
        )
        .await?;

    let mut pg = tokio_postgres::Config::new();
    pg.user(&target.user)
        .dbname(&target.dbname)
        .application_name(&target.application_name);
    if let Some(password) = &target.password {
        pg.password(password.expose());
    }

    // Only verify-ca and verify-full authenticate the server; the guard needs to know.
    let tls_verified = matches!(target.ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull);
    let guard = |tls_verified: bool| {
        let verdict = VerdictCell::default();
        let policy = AuthPolicy {
            tls_verified,
            allow_md5: target.allow_md5,
        };
        (policy, verdict)
    };

    let tls_started = Instant::now();
    let Some(tls_config) = tls::client_config(target.ssl_mode, target.ca_pem.as_deref(), provider)?
    else {
        pg.ssl_mode(PgSslMode::Disable);
        let (policy, verdict) = guard(false);
        let stream = Guarded::new(stream, policy, Arc::clone(&verdict));
        return authenticate(&pg, stream, NoTls, None, &verdict, addr, clock).await;
    };
    if ServerName::try_from(target.host.as_str()).is_err() {
        return Err(Failure::config(
            ProbeStage::Tls,
            format!("host \"{}\" is not a valid name for TLS", target.host),
        ));
    }
    let tls_limit = clock.limits().get(ProbeStage::Tls);
    let ssl_request = tls::ssl_request(&mut stream, &peer);
    let answer = match tokio::time::timeout(clock.remaining_within(tls_limit), ssl_request).await {
        Ok(answer) => answer,
        Err(_) => Err(clock.timed_out(
            ProbeStage::Tls,
            &format!("TLS negotiation with {peer}"),
            tls_limit,
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
            let (policy, verdict) = guard(false);
            let stream = Guarded::new(stream, policy, Arc::clone(&verdict));
            authenticate(&pg, stream, NoTls, None, &verdict, addr, clock).await
        }
        SslAnswer::Supported => {
            // The server said 'S' to our SSLRequest, so the next bytes are the TLS handshake:
            // exactly what tokio-postgres's direct negotiation sends. Verification is done by the
            // rustls configuration, whatever tokio-postgres's own (coarser) sslmode says.
            // With verified TLS, SCRAM-SHA-256-PLUS (channel binding) is used whenever the
            // server offers it: tokio-postgres prefers it when the stream can bind.
            pg.ssl_mode(PgSslMode::Require)
                .ssl_negotiation(SslNegotiation::Direct)
                .channel_binding(ChannelBinding::Prefer);
            let (policy, verdict) = guard(tls_verified);
            let (connector, done) =
                TimedTls::new(&target.host, tls_config, policy, Arc::clone(&verdict));
            authenticate(
                &pg,
                stream,
                connector,
                Some((tls_started, done)),
                &verdict,
                addr,
                clock,
            )
            .await
        }
    }
}

/// When the TLS stage began, and the cell the connector fills when the handshake completes.
type TlsTiming = (Instant, Arc<std::sync::Mutex<Option<Instant>>>);

/// Startup and authentication (and, when `tls` is given, the TLS handshake before them).
///
/// `stream` is already wrapped in the authentication guard (or `connector` wraps the TLS stream in
/// it); when the guard stops the session, its `verdict` is the failure reported.
async fn authenticate<S, T>(
    pg: &tokio_postgres::Config,
    stream: S,
    connector: T,
    tls: Option<TlsTiming>,
    verdict: &VerdictCell,
    peer_addr: SocketAddr,
    clock: &mut Clock,
) -> Result<Opened, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TlsConnect<S> + Send,
    T::Stream: Send + 'static,
    T::Future: Send,
{
    let peer = peer_addr.to_string();
    let peer = peer.as_str();
    let auth_started = Instant::now();
    let login_limit = clock.limits().login(tls.is_some());
    let result = tokio::time::timeout(clock.remaining_within(login_limit), async {
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

    let stopped = verdict
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match (result, stopped) {
        (Ok(Err(_)), Some(Verdict::Refused(message))) => Err(Failure::config(
            ProbeStage::Auth,
            format!("{peer}: {message}"),
        )),
        (Ok(Err(_)), Some(Verdict::Violation(message))) => Err(Failure::transient(
            ProbeStage::Auth,
            format!("{peer}: {message}"),
        )),
        (result, _) => classify_login(result, handshake_done, peer_addr, (clock, login_limit)),
    }
}

/// What a successful startup yields: the client, its connection future and `server_version`.
type Session = (Client, ConnectionTask, Option<String>);

/// The result of the startup once the guard had nothing to say.
fn classify_login(
    result: Result<Result<Session, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    handshake_done: bool,
    peer_addr: SocketAddr,
    (clock, limit): (&Clock, Option<Duration>),
) -> Result<Opened, Failure> {
    let peer = peer_addr.to_string();
    let peer = peer.as_str();
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
        Err(_) if !handshake_done => Err(clock.timed_out(
            ProbeStage::Tls,
            &format!("TLS handshake with {peer}"),
            limit,
        )),
        Err(_) => Err(clock.timed_out(ProbeStage::Auth, &format!("login to {peer}"), limit)),
    }
}

/// Host lookups in flight at once. Each holds a blocking thread (getaddrinfo cannot be
/// cancelled); the permit moves into that thread and is released only when the lookup returns, so
/// a resolver that hangs holds at most this many threads however many probes time out on it.
const MAX_LOOKUPS: usize = 8;

/// The permits of [`MAX_LOOKUPS`].
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// Resolves `host` (a name or an address literal; literals need no lookup).
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let permit = LOOKUPS.acquire().await.map_err(|_| {
        Failure::transient(ProbeStage::Resolve, "host lookups are shut down".to_owned())
    })?;
    let name = host.to_owned();
    let lookup = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port))
            .map(Iterator::collect::<Vec<_>>)
    });
    let addrs = lookup
        .await
        .map_err(|_| Failure::transient(ProbeStage::Resolve, "host lookup failed".to_owned()))?
        .map_err(|e| {
            Failure::path(
                ProbeStage::Resolve,
                format!("could not resolve host \"{host}\": {e}"),
            )
        })?;
    if addrs.is_empty() {
        return Err(Failure::path(
            ProbeStage::Resolve,
            format!("host \"{host}\" resolved to no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to `addr`.
pub(crate) async fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, String), Failure> {
    let peer = addr.to_string();
    let attempt = async {
        let socket = probe_socket(addr, timeout)?;
        socket.connect(addr).await
    };
    match attempt.await {
        Ok(stream) => Ok((stream, peer)),
        Err(e) => Err(from_io_error(&e, ProbeStage::Connect, &peer)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Password, TargetSessionAttrs};
    use dbpool_testkit::hostile::{Behaviour, FakeServer};

    fn target(timeout: Duration) -> ProbeTarget {
        ProbeTarget {
            host: "127.0.0.1".into(),
            port: 1,
            dbname: "app".into(),
            user: "app".into(),
            password: Some(Password::new("per-address-test-pw".into())),
            allow_md5: false,
            ssl_mode: SslMode::Disable,
            ca_pem: None,
            target_session_attrs: TargetSessionAttrs::ReadWrite,
            application_name: "t".into(),
            pool_max_size: 1,
            timeout,
        }
    }

    #[tokio::test]
    async fn a_hanging_first_address_leaves_budget_for_the_next() {
        let hang = FakeServer::start(Behaviour::HangAfterAccept).await;
        let next = FakeServer::start(Behaviour::Cleartext).await;
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], hang.port())),
            SocketAddr::from(([127, 0, 0, 1], next.port())),
        ];
        let budget = Duration::from_secs(2);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut clock = Clock::start(budget);
        let started = Instant::now();
        let result = open_any(&addrs, &target(budget), &provider, &mut clock).await;
        let took = started.elapsed();
        let Err(failure) = result else {
            panic!("the cleartext server must be refused");
        };
        // The second address was reached (its refusal is the answer) after about half the budget.
        assert_eq!(failure.outcome, ProbeOutcome::ConfigFailure, "{failure:?}");
        assert!(
            failure.message.contains("clear text"),
            "{}",
            failure.message
        );
        assert!(took < budget * 3 / 4, "{took:?}");
    }

    #[test]
    fn impossible_hosts_are_config_failures_without_echo() {
        for host in ["db\0.example", "db example", "db/x", "", "x\u{7f}", "héllo"] {
            let failure = check_host(host).expect_err(host);
            assert_eq!(failure.outcome, ProbeOutcome::ConfigFailure);
            assert_eq!(failure.stage, ProbeStage::Resolve);
            assert!(!failure.message.contains('\0'));
        }
        for host in ["db.shop.svc", "10.0.0.5", "::1", "fe80::1", "my_host-1"] {
            assert!(check_host(host).is_ok(), "{host}");
        }
    }

    #[tokio::test]
    async fn address_literals_need_no_lookup() {
        let addrs = resolve("127.0.0.1", 5432).await.expect("literal");
        assert_eq!(addrs, [SocketAddr::from(([127, 0, 0, 1], 5432))]);
        assert_eq!(LOOKUPS.available_permits(), MAX_LOOKUPS);
    }
}
