//! [`Prober`]: probes run on persistent connections, one per distinct target, with their loss
//! reported the moment it happens.
//!
//! Lives here: the map from target key to connection and owners (the pools probing it), the choice
//! between the cheap path (checks on the open connection) and the full connect path, the periodic
//! replacement of old connections, and the watcher task of each connection that sends
//! [`ConnectionLost`]. Must not live here: the stages themselves (`connect`, `checks`) or any
//! policy about what a pool does with a report. No lock is held across an await.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use rustls::crypto::CryptoProvider;
use tokio::{sync::mpsc, time::Instant};
use tokio_postgres::Client;

use crate::{ProbeOutcome, ProbeStage, SslMode, StageTimeouts};

use super::{
    ConnectionLost, Password, ProbeReport, ProbeTarget, ProberConfig,
    checks::{self, Findings},
    classify::{from_pg_error, redact},
    connect::{self, ConnectionTask, Opened},
    stage::{Clock, Failure},
};

/// Probes PostgreSQL targets on persistent connections. Cheap to clone: clones share connections.
///
/// One connection is kept per distinct target (host, port, database, user, sslMode, CA,
/// application name, password); every pool (owner) that probes the same target shares it. A probe
/// on an open connection runs only the query stages; the full connect path runs when the
/// connection is missing or broken, when the target (including its credentials) changed, and once
/// the connection is older than [`ProberConfig::reconnect_every`]. A connection that ends without
/// the prober closing it is reported at once on the channel returned by [`Prober::new`].
#[derive(Clone)]
pub struct Prober {
    inner: Arc<Inner>,
}

impl fmt::Debug for Prober {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prober")
            .field("config", &self.inner.config)
            .field("open_connections", &self.open_connections())
            .finish()
    }
}

struct Inner {
    config: ProberConfig,
    provider: Arc<CryptoProvider>,
    hash_state: RandomState,
    next_id: AtomicU64,
    lost_tx: mpsc::UnboundedSender<ConnectionLost>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: HashMap<ConnectionKey, Slot>,
    owners: HashMap<String, ConnectionKey>,
}

/// One distinct target: who probes it, and its connection if one is open.
struct Slot {
    owners: BTreeSet<String>,
    conn: Option<Live>,
    /// Serialises the connect path so that concurrent probes of one target open one connection.
    connect_lock: Arc<tokio::sync::Mutex<()>>,
}

/// An open connection (the client half; its connection half runs in a watcher task).
#[derive(Clone)]
struct Live {
    id: u64,
    client: Arc<Client>,
    opened_at: Instant,
    server_version: Option<String>,
    peer: String,
    /// The resolved address the session is connected (and authenticated) to.
    peer_addr: SocketAddr,
    /// Set before the prober drops the connection on purpose, so its end is not reported.
    closing: Arc<AtomicBool>,
}

/// What makes two targets share a connection ([`Prober::connection_key`]). Holds hashes of the
/// password and the CA (keyed by the prober's own random state), never the password itself; its
/// `Debug` prints the hashes' presence only.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    host: String,
    port: u16,
    dbname: String,
    user: String,
    ssl_mode: SslMode,
    ca: Option<u64>,
    application_name: String,
    password: Option<u64>,
}

impl ConnectionKey {
    fn new(target: &ProbeTarget, hash_state: &RandomState) -> Self {
        Self {
            host: target.host.clone(),
            port: target.port,
            dbname: target.dbname.clone(),
            user: target.user.clone(),
            ssl_mode: target.ssl_mode,
            ca: target.ca_pem.as_deref().map(|pem| hash_state.hash_one(pem)),
            application_name: target.application_name.clone(),
            password: target
                .password
                .as_ref()
                .map(|p| hash_state.hash_one(p.expose())),
        }
    }
}

impl fmt::Debug for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionKey")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca", &self.ca.map(|h| format!("{h:016x}")))
            .field("application_name", &self.application_name)
            .field("password", &self.password.map(|_| "<hashed>"))
            .finish()
    }
}

impl Prober {
    /// A prober, and the channel on which it reports connections lost without a probe running.
    pub fn new(config: ProberConfig) -> (Prober, mpsc::UnboundedReceiver<ConnectionLost>) {
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let inner = Inner {
            config,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            hash_state: RandomState::new(),
            next_id: AtomicU64::new(1),
            lost_tx,
            state: Mutex::new(State::default()),
        };
        (
            Prober {
                inner: Arc::new(inner),
            },
            lost_rx,
        )
    }

    /// Probes `target` for the pool `owner` ("namespace/name"). Never takes much longer than
    /// `target.timeout`; never fails: the report says what went wrong.
    pub async fn probe(&self, owner: &str, target: &ProbeTarget) -> ProbeReport {
        self.probe_within(owner, target, StageTimeouts::none())
            .await
    }

    /// [`Prober::probe`] with each stage's wait limited by `limits` (adaptive timeouts; see
    /// [`AdaptiveTimeouts`](crate::AdaptiveTimeouts)); the whole probe stays within
    /// `target.timeout`.
    pub async fn probe_within(
        &self,
        owner: &str,
        target: &ProbeTarget,
        limits: StageTimeouts,
    ) -> ProbeReport {
        let mut clock = Clock::limited(target.timeout, limits);
        let mut findings = Findings::default();
        let mut fresh = false;
        let result = self
            .run(owner, target, &mut clock, &mut findings, &mut fresh)
            .await;
        let report = build_report(result, clock, findings, fresh, target);
        tracing::debug!(
            owner,
            outcome = ?report.outcome,
            stage = ?report.stage,
            latency_ms = report.latency.as_millis() as u64,
            fresh = report.fresh_connection,
            message = %report.message,
            "probe finished"
        );
        report
    }

    /// The key under which `target` shares a persistent connection: host, port, database, user,
    /// sslMode, CA, application name and password. Two targets with equal keys run on the same
    /// session, so a result of one holds for the other's credentials. Only meaningful for this
    /// prober (its hashes are keyed per process).
    pub fn connection_key(&self, target: &ProbeTarget) -> ConnectionKey {
        ConnectionKey::new(target, &self.inner.hash_state)
    }

    /// How many pools (owners) this prober keeps a connection share for.
    pub fn owner_count(&self) -> usize {
        self.inner.lock().owners.len()
    }

    /// Unregisters the pool `owner` (deleted); its connection is closed when no pool uses it.
    pub fn forget(&self, owner: &str) {
        let closed = {
            let mut state = self.inner.lock();
            match state.owners.remove(owner) {
                Some(key) => state.release(owner, &key),
                None => None,
            }
        };
        if let Some(live) = closed {
            close(live);
        }
    }

    /// Number of persistent connections currently open.
    pub fn open_connections(&self) -> usize {
        self.inner
            .lock()
            .slots
            .values()
            .filter(|slot| slot.conn.is_some())
            .count()
    }

    async fn run(
        &self,
        owner: &str,
        target: &ProbeTarget,
        clock: &mut Clock,
        findings: &mut Findings,
        fresh: &mut bool,
    ) -> Result<(), Failure> {
        let inner = &self.inner;
        let key = ConnectionKey::new(target, &inner.hash_state);
        let (existing, connect_lock) = inner.register(owner, &key);

        // The cheap path: the open connection, if it is healthy and young enough.
        let seen = existing.as_ref().map(|live| live.id);
        if let Some(live) = existing.filter(|live| inner.usable(live)) {
            let result = checks_on(&live, target, clock, findings).await;
            match result {
                Ok(()) => return Ok(()),
                // The connection died under us: the server may well be fine, so open a new one
                // with what is left of the budget rather than report an outage.
                Err(failure) if failure.broken && !clock.remaining().is_zero() => {
                    inner.discard(&key, live.id);
                    clock.stages.clear();
                    *findings = Findings::default();
                }
                Err(failure) => {
                    if failure.broken {
                        inner.discard(&key, live.id);
                    }
                    return Err(failure);
                }
            }
        }

        // The full path, one prober at a time per target.
        let _connecting =
            match tokio::time::timeout(clock.remaining(), connect_lock.lock_owned()).await {
                Ok(guard) => guard,
                Err(_) => {
                    return Err(Failure::timeout(
                        ProbeStage::Connect,
                        "waiting for another probe of the same target",
                        clock.budget(),
                    ));
                }
            };
        let current = inner.current(&key);
        if let Some(live) = current.as_ref()
            && Some(live.id) != seen
            && inner.usable(live)
        {
            // Another probe opened a connection while we waited.
            return checks_on(live, target, clock, findings).await;
        }

        *fresh = true;
        match connect::open(target, &inner.provider, clock).await {
            Ok(opened) => {
                let live = inner.install(&key, opened, target.password.clone());
                let result = checks_on(&live, target, clock, findings).await;
                if let Err(failure) = &result
                    && failure.broken
                {
                    inner.discard(&key, live.id);
                }
                result
            }
            Err(failure) => {
                // A full server refuses new sessions; the one we already hold can still say how
                // full it is.
                if failure.sql_state.as_deref() == Some("53300")
                    && let Some(old) = current.filter(|old| !old.client.is_closed())
                {
                    checks::saturation_only(&old.client, target, &old.peer, clock, findings).await;
                }
                Err(failure)
            }
        }
    }
}

/// The query stages on `live`.
async fn checks_on(
    live: &Live,
    target: &ProbeTarget,
    clock: &mut Clock,
    findings: &mut Findings,
) -> Result<(), Failure> {
    findings.peer = Some(live.peer_addr);
    checks::run(
        &live.client,
        target,
        &live.peer,
        live.server_version.as_deref(),
        clock,
        findings,
    )
    .await
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `live` may serve a probe without reconnecting.
    fn usable(&self, live: &Live) -> bool {
        !live.client.is_closed() && live.opened_at.elapsed() < self.config.reconnect_every
    }

    /// Registers `owner` on `key` (moving it off its previous key, which is closed when left
    /// without owners) and returns the key's connection and connect lock.
    fn register(
        &self,
        owner: &str,
        key: &ConnectionKey,
    ) -> (Option<Live>, Arc<tokio::sync::Mutex<()>>) {
        let (result, closed) = {
            let mut state = self.lock();
            let previous = state.owners.insert(owner.to_owned(), key.clone());
            let closed = match previous {
                Some(previous) if &previous != key => state.release(owner, &previous),
                _ => None,
            };
            let slot = state.slots.entry(key.clone()).or_insert_with(|| Slot {
                owners: BTreeSet::new(),
                conn: None,
                connect_lock: Arc::new(tokio::sync::Mutex::new(())),
            });
            slot.owners.insert(owner.to_owned());
            ((slot.conn.clone(), Arc::clone(&slot.connect_lock)), closed)
        };
        if let Some(live) = closed {
            close(live);
        }
        result
    }

    /// The connection of `key`, if open.
    fn current(&self, key: &ConnectionKey) -> Option<Live> {
        self.lock()
            .slots
            .get(key)
            .and_then(|slot| slot.conn.clone())
    }

    /// Closes the connection `id` of `key` on purpose (if it is still the current one).
    fn discard(&self, key: &ConnectionKey, id: u64) {
        let taken = {
            let mut state = self.lock();
            match state.slots.get_mut(key) {
                Some(slot) if slot.conn.as_ref().is_some_and(|c| c.id == id) => slot.conn.take(),
                _ => None,
            }
        };
        if let Some(live) = taken {
            close(live);
        }
    }

    /// Makes `opened` the connection of `key` (closing the one it replaces) and starts its
    /// watcher. If every owner of `key` went away meanwhile, the connection serves this probe
    /// only and is closed afterwards.
    fn install(
        self: &Arc<Self>,
        key: &ConnectionKey,
        opened: Opened,
        password: Option<Password>,
    ) -> Live {
        let Opened {
            client,
            connection,
            server_version,
            peer,
            peer_addr,
        } = opened;
        let live = Live {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client: Arc::new(client),
            opened_at: Instant::now(),
            server_version,
            peer,
            peer_addr,
            closing: Arc::new(AtomicBool::new(false)),
        };
        let replaced = {
            let mut state = self.lock();
            match state.slots.get_mut(key) {
                Some(slot) => slot.conn.replace(live.clone()),
                None => {
                    live.closing.store(true, Ordering::SeqCst);
                    None
                }
            }
        };
        if let Some(old) = replaced {
            close(old);
        }
        tokio::spawn(watch(
            Arc::downgrade(self),
            key.clone(),
            live.id,
            live.peer.clone(),
            Arc::clone(&live.closing),
            connection,
            password,
        ));
        live
    }
}

impl State {
    /// Removes `owner` from `key`; returns the connection to close when that left `key` unused.
    fn release(&mut self, owner: &str, key: &ConnectionKey) -> Option<Live> {
        let slot = self.slots.get_mut(key)?;
        slot.owners.remove(owner);
        if slot.owners.is_empty() {
            self.slots.remove(key).and_then(|slot| slot.conn)
        } else {
            None
        }
    }
}

/// Drops a connection on purpose: its watcher will not report the end.
fn close(live: Live) {
    live.closing.store(true, Ordering::SeqCst);
    // The session ends (with a Terminate message) once the last probe using the client is done.
    drop(live);
}

/// Drives one connection and reports its end, unless the prober ended it.
async fn watch(
    inner: Weak<Inner>,
    key: ConnectionKey,
    id: u64,
    peer: String,
    closing: Arc<AtomicBool>,
    connection: ConnectionTask,
    password: Option<Password>,
) {
    let result = connection.await;
    if closing.load(Ordering::SeqCst) {
        return;
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let (owners, lost) = {
        let mut state = inner.lock();
        match state.slots.get_mut(&key) {
            Some(slot) if slot.conn.as_ref().is_some_and(|c| c.id == id) => (
                slot.owners.iter().cloned().collect::<Vec<_>>(),
                slot.conn.take(),
            ),
            _ => return,
        }
    };
    drop(lost);
    let reason = match result {
        Ok(()) => format!("connection closed by {peer}"),
        Err(err) => from_pg_error(&err, ProbeStage::Query, &peer).message,
    };
    let reason = redact(reason, password.as_ref());
    tracing::info!(?owners, %reason, "persistent connection lost");
    if inner
        .lost_tx
        .send(ConnectionLost { owners, reason })
        .is_err()
    {
        tracing::debug!("nobody listens for lost connections");
    }
}

/// Turns the result of the stages into the report.
fn build_report(
    result: Result<(), Failure>,
    clock: Clock,
    findings: Findings,
    fresh: bool,
    target: &ProbeTarget,
) -> ProbeReport {
    let latency = clock.elapsed();
    let (outcome, stage, message, sql_state, path_evidence) = match result {
        Ok(()) => (
            ProbeOutcome::Success,
            clock
                .stages
                .last()
                .map_or(ProbeStage::Saturation, |(stage, _)| *stage),
            success_message(&findings, target),
            None,
            false,
        ),
        Err(failure) => (
            failure.outcome,
            failure.stage,
            failure.message,
            failure.sql_state,
            failure.path_evidence,
        ),
    };
    let saturation = findings.saturation;
    let peer = findings.peer;
    ProbeReport {
        outcome,
        stage,
        latency,
        message: redact(message, target.password.as_ref()),
        sql_state,
        server_version: findings.server_version,
        in_recovery: findings.in_recovery,
        connections: saturation.map(|s| s.connections),
        max_connections: saturation.map(|s| s.usable),
        free_slots: saturation.map(|s| s.free),
        pool_fits: saturation.map(|s| s.pool_fits),
        fresh_connection: fresh,
        path_evidence,
        stage_latencies: clock.stages,
        peer,
    }
}

/// "ok: PostgreSQL 15.8, primary". Deliberately free of numbers that change from probe to probe
/// (slots in use are in the report's own fields), so that an unchanged state is an unchanged
/// message and does not cost a status write.
fn success_message(findings: &Findings, target: &ProbeTarget) -> String {
    let mut message = String::from("ok");
    if let Some(version) = &findings.server_version {
        message.push_str(&format!(": PostgreSQL {version}"));
    }
    match findings.in_recovery {
        Some(true) => message.push_str(", standby"),
        Some(false) => message.push_str(", primary"),
        None => {}
    }
    if let Some(s) = findings.saturation
        && !s.pool_fits
    {
        message.push_str(&format!(
            "; pool maxSize {} does not fit into the free connection slots",
            target.pool_max_size
        ));
    }
    if let Some(note) = &findings.saturation_note {
        message.push_str(&format!("; {note}"));
    }
    message
}

#[cfg(test)]
mod tests;
