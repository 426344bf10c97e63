//! The world the nemesis attacks: PostgreSQL targets behind fault proxies, operator replicas as
//! processes behind apiserver proxies, namespaces, Secrets and DbPools, and client processes.
//!
//! Lives here: [`World`], [`Target`], [`Replica`], [`LivePool`], setting them up, finding the
//! leader, and the superuser's side channel to each server (sessions, password changes, filler
//! connections). Must not live here: choosing or timing faults (`nemesis`), judging (the
//! library).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use dbpool_api::DbPool;
use dbpool_soak::{
    checks::ISOLATED_DB,
    history::{Ms, PoolInfo},
    pglog::LOG_CONF,
};
use dbpool_testkit::{
    kube::create_consenting_secret,
    pools::pool,
    ports::free_port,
    postgres::{PgServer, SUPERUSER, SUPERUSER_PASSWORD},
    process::{http_get, sample},
    proxy::FaultProxy,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::{controlplane::ControlPlane, recorder::Recorder};

/// The soak's namespaces; spec.gate is allowed in the first.
pub const NAMESPACES: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
/// Where the Lease lives.
pub const LEASE_NS: &str = "soak-system";
/// The operators' lease duration.
pub const LEASE: Duration = Duration::from_secs(4);
/// The client tasks' role and password (never rotated, never the operator's).
const CLIENT_ROLE: (&str, &str) = ("client", "client-pw-7f3a");
/// The role that fills every connection slot.
const FILLER_ROLE: (&str, &str) = ("filler", "filler-pw-1c9e");

/// One database target: a server, the proxy every pool goes through, the role's password.
pub struct Target {
    /// `t0`, `t1`, …
    pub name: String,
    /// The server (locked for the whole of a fault on it).
    pub pg: tokio::sync::Mutex<PgServer>,
    /// The server's own port (the soak's side channel, never the operator's).
    pub direct_port: u16,
    /// The fault proxy the pools point at.
    pub proxy: FaultProxy,
    /// The app role's current password.
    pub password: Mutex<String>,
    /// The server's log.
    pub log: PathBuf,
}

/// One operator replica: its identity, its apiserver proxy, its current process.
pub struct Replica {
    /// `op-0`, … (POD_NAME).
    pub id: String,
    /// Its kubeconfig (through `proxy`).
    pub kubeconfig: PathBuf,
    /// The fault proxy in front of the apiserver, for this replica only.
    pub proxy: FaultProxy,
    /// The running process, its metrics port and incarnation.
    pub proc: Mutex<(Option<Child>, u16, u32)>,
    /// Its log (JSON lines, every incarnation appended).
    pub log: PathBuf,
}

/// A pool that exists now.
#[derive(Clone, Debug)]
pub struct LivePool {
    /// `namespace/name`.
    pub key: String,
    /// Namespace.
    pub ns: String,
    /// Name.
    pub name: String,
    /// Its host is not allowed by its Secret.
    pub isolated: bool,
}

/// Everything of one run.
pub struct World {
    /// The nemesis seed.
    pub seed: u64,
    /// etcd and the apiserver.
    pub cp: tokio::sync::Mutex<ControlPlane>,
    /// etcd's pid.
    pub etcd_pid: u32,
    /// The soak's own client (admin, straight to the apiserver).
    pub client: Client,
    /// The targets.
    pub targets: Vec<Target>,
    /// The operator replicas.
    pub replicas: Vec<Replica>,
    /// The pools that exist now.
    pub pools: Mutex<Vec<LivePool>>,
    /// The history.
    pub rec: Recorder,
    /// Every password the run used.
    pub passwords: Mutex<Vec<String>>,
    /// For unique names and tokens.
    pub counter: AtomicU64,
    /// The operator binary.
    pub operator_bin: PathBuf,
    /// The sampler and the live checks stop when this is set (the clients are finished then).
    pub stop_clients: AtomicBool,
    /// The client processes, as (name, pid), for the sampler.
    pub client_pids: Mutex<Vec<(String, u32)>>,
    /// Client queries that worked and that failed.
    pub client_ok: AtomicU64,
    /// Client queries that failed.
    pub client_err: AtomicU64,
}

/// A fresh random password (not from the seed: passwords need not replay).
pub fn new_password() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "pw-{:016x}",
        RandomState::new().hash_one(crate::recorder::now_ms())
    )
}

/// The pools' policy: short timings, fixed 2s timeouts (a loaded 2-core machine must not time
/// out a healthy login), early trials on. The cost checker replays these values
/// (`dbpool_soak::checks::soak_policy`): change both together.
pub fn policy() -> serde_json::Value {
    serde_json::json!({
        "healthCheck": { "interval": "3s", "timeout": "2s", "adaptiveTimeout": false },
        "backoff": { "initialDelay": "300ms", "multiplier": 2.0, "maxDelay": "2s", "maxAttempts": 10, "cooldown": "10s", "jitter": 0.0 },
        "breaker": { "failureThreshold": 3, "openTimeout": "2s", "successThreshold": 1 },
    })
}

/// Connects as `user` straight to a server (not through its proxy), with a deadline.
pub async fn connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .application_name("soak-side-channel")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(6),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `sql` as superuser on the server at `port`; the first value of the first row.
pub async fn superuser_query(port: u16, sql: &str) -> Result<Option<String>, String> {
    let client = connect(port, SUPERUSER, SUPERUSER_PASSWORD, "postgres").await?;
    let messages = tokio::time::timeout(Duration::from_secs(5), client.simple_query(sql))
        .await
        .map_err(|_| "query timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(messages.into_iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    }))
}

impl Target {
    /// A server (connections logged, 30 slots) behind a proxy, its app password rotated to a
    /// fresh one, with the client and filler roles.
    pub async fn start(index: usize) -> Result<Target, String> {
        let mut options = PgServer::options()
            .max_connections(30)
            .superuser_reserved_connections(3);
        for line in LOG_CONF {
            options = options.conf(line);
        }
        let pg = options.start().await;
        let direct_port = pg.port();
        let password = new_password();
        let sql = format!(
            "ALTER ROLE app PASSWORD '{password}'; CREATE ROLE {} LOGIN PASSWORD '{}'; CREATE ROLE {} LOGIN PASSWORD '{}';",
            CLIENT_ROLE.0, CLIENT_ROLE.1, FILLER_ROLE.0, FILLER_ROLE.1
        );
        superuser_query(direct_port, &sql).await?;
        let proxy = FaultProxy::start(pg.addr()).await;
        Ok(Target {
            name: format!("t{index}"),
            log: pg.log_path(),
            pg: tokio::sync::Mutex::new(pg),
            direct_port,
            proxy,
            password: Mutex::new(password),
        })
    }

    /// The operator's sessions on this server now (role app on database app).
    pub async fn operator_sessions(&self) -> Option<i64> {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app'";
        superuser_query(self.direct_port, sql)
            .await
            .ok()??
            .parse()
            .ok()
    }

    /// Opens filler sessions until the server refuses one (at most 40).
    pub async fn fill(&self) -> Vec<tokio_postgres::Client> {
        let mut held = Vec::new();
        while held.len() < 40 {
            match connect(self.direct_port, FILLER_ROLE.0, FILLER_ROLE.1, "postgres").await {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        held
    }
}

impl Replica {
    /// Whether its process runs (not necessarily answering: it may be stopped).
    pub fn pid(&self) -> Option<u32> {
        let guard = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.as_ref().map(Child::id)
    }

    /// Its metrics text, if it answers within 2s.
    pub async fn metrics(&self) -> Option<String> {
        let port = self.proc.lock().unwrap_or_else(|e| e.into_inner()).1;
        let got = tokio::time::timeout(Duration::from_secs(2), http_get(port, "/metrics")).await;
        got.ok().flatten().map(|(_, body)| body)
    }

    /// `op-1#2`: identity and incarnation.
    pub fn subject(&self) -> String {
        format!(
            "{}#{}",
            self.id,
            self.proc.lock().unwrap_or_else(|e| e.into_inner()).2
        )
    }

    /// Starts a new incarnation (the old one must be gone).
    pub fn start(&self, bin: &std::path::Path) -> Result<(), String> {
        let port = free_port();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args([
                "--log-format",
                "json",
                "--leader-elect",
                "--lease-namespace",
                LEASE_NS,
            ])
            .args([
                "--lease-name",
                "soak",
                "--lease-duration",
                "4s",
                "--lease-renew-grace",
                "1s",
            ])
            .args(["--allow-gates-in", NAMESPACES[0]])
            .env("POD_NAME", &self.id)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut guard = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 = Some(child);
        guard.1 = port;
        guard.2 += 1;
        Ok(())
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&self) {
        let mut guard = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.0.take() {
            crate::controlplane::signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl World {
    /// The replica that leads now (exactly one reports dbpool_leader 1), within `deadline`.
    pub async fn leader(&self, deadline: Duration) -> Option<usize> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let mut leaders = Vec::new();
            for (i, r) in self.replicas.iter().enumerate() {
                if r.pid().is_none() {
                    continue;
                }
                if let Some(text) = r.metrics().await
                    && sample(&text, "dbpool_leader", &[]) == Some(1.0)
                {
                    leaders.push(i);
                }
            }
            if leaders.len() == 1 {
                return Some(leaders[0]);
            }
            if tokio::time::Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The live pools (isolated ones too when `with_isolated`), sorted by key.
    pub fn live(&self, with_isolated: bool) -> Vec<LivePool> {
        let mut pools: Vec<LivePool> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| with_isolated || !p.isolated)
            .cloned()
            .collect();
        pools.sort_by(|a, b| a.key.cmp(&b.key));
        pools
    }

    /// A unique number.
    pub fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates pool `name` in `ns` on target `t` (isolated: host localhost, which its Secret
    /// does not allow, and database [`ISOLATED_DB`]; gated: with spec.gate).
    pub async fn create_pool(
        &self,
        ns: &str,
        name: &str,
        t: usize,
        isolated: bool,
        gated: bool,
    ) -> Result<Ms, String> {
        let target = &self.targets[t];
        let mut overrides = policy();
        if isolated {
            overrides["database"] =
                serde_json::json!({ "host": "localhost", "dbname": ISOLATED_DB });
        }
        if gated {
            overrides["gate"] =
                serde_json::json!({ "serviceName": format!("gate-{name}"), "port": 5432 });
        }
        let secret = format!("db-{}", target.name);
        let spec = pool(
            name,
            target.proxy.port(),
            Some((&secret, "password")),
            overrides,
        );
        let api: Api<DbPool> = Api::namespaced(self.client.clone(), ns);
        let created = settle(30, "AlreadyExists", || async {
            api.create(&PostParams::default(), &spec)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await?;
        let key = format!("{ns}/{name}");
        self.rec.lock().pools.push(PoolInfo {
            key: key.clone(),
            target: target.name.clone(),
            threshold: 3,
            isolated,
        });
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(LivePool {
                key,
                ns: ns.to_owned(),
                name: name.to_owned(),
                isolated,
            });
        Ok(created)
    }
}

/// Sends an idempotent apiserver call until it is accepted (one try a second, each bounded by
/// 20s, for `tries` tries) and returns the instant it took effect. A failed answer does not say
/// the call failed: a 504 after etcd took it, or a connection cut by an apiserver restart, may
/// hide an applied change (a long run's delete answered 504 and the pool was gone; the driver,
/// thinking it alive, then judged its convergence). So the instant is that of the first attempt
/// whose failure leaves it open (a connect error never took effect), else the accepted one's; an
/// answer that the effect is there already (`already`: `NotFound` for a delete, `AlreadyExists`
/// for a create) after such an attempt is success, before any it is the error; `NotFound` is an
/// error for any other call.
pub async fn settle<Fut>(
    tries: u32,
    already: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<Ms, String>
where
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut took: Option<Ms> = None;
    let mut last = String::new();
    for _ in 0..tries.max(1) {
        let at = crate::recorder::now_ms();
        let answer = tokio::time::timeout(Duration::from_secs(20), call())
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        match answer {
            Ok(()) => return Ok(took.unwrap_or(at)),
            Err(e) if !already.is_empty() && e.contains(already) => return took.ok_or(e),
            Err(e) if e.contains("NotFound") => return Err(e),
            Err(e) => {
                if !e.contains("(Connect)") {
                    took.get_or_insert(at);
                }
                last = e;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let unknown = if took.is_some() {
        " (it may have taken effect: not recorded)"
    } else {
        ""
    };
    Err(format!("not accepted in {tries} tries{unknown}: {last}"))
}

/// Namespaces and one Secret per (namespace, target), consenting to 127.0.0.1 only.
pub async fn namespaces_and_secrets(client: &Client, targets: &[Target]) -> Result<(), String> {
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in NAMESPACES.iter().chain([&LEASE_NS]) {
        let object = Namespace {
            metadata: ObjectMeta {
                name: Some((*ns).to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &object)
            .await
            .map_err(|e| e.to_string())?;
        if *ns == LEASE_NS {
            continue;
        }
        for t in targets {
            let password = t.password.lock().unwrap_or_else(|e| e.into_inner()).clone();
            create_consenting_secret(
                client,
                ns,
                &format!("db-{}", t.name),
                "password",
                &password,
                &["127.0.0.1"],
            )
            .await;
        }
    }
    Ok(())
}

/// The client process on target `t`: dbpool-client against the proxy as the client role, one
/// `SELECT 1` every 250ms until it is finished (`client` module); its pid joins the sampler's.
pub fn spawn_client(world: &World, t: usize) -> Result<crate::client::ClientProc, String> {
    let target = &world.targets[t];
    let name = format!("client-{}", target.name);
    let proc =
        crate::client::ClientProc::spawn(&name, target.proxy.port(), CLIENT_ROLE.0, CLIENT_ROLE.1)?;
    if let Some(pid) = proc.pid() {
        world
            .client_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, pid));
    }
    Ok(proc)
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::settle;
    use std::sync::Mutex;

    /// A call that answers `answers` in turn and notes when it was asked.
    async fn run(already: &str, answers: &[&str]) -> (Result<i64, String>, Vec<i64>) {
        let left = Mutex::new(answers.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        let asked = Mutex::new(Vec::new());
        let result = settle(5, already, || {
            asked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(crate::recorder::now_ms());
            let answer = left.lock().unwrap_or_else(|e| e.into_inner()).remove(0);
            async move { if answer == "ok" { Ok(()) } else { Err(answer) } }
        })
        .await;
        (result, asked.into_inner().unwrap_or_default())
    }

    #[tokio::test]
    async fn a_delete_answered_504_that_took_effect_is_recorded_at_its_first_attempt() {
        // The long run's soak-b/p7: a 504, then NotFound: the first attempt deleted it.
        let (result, asked) =
            run("NotFound", &["ApiError: 504 Timeout", "ApiError: NotFound"]).await;
        assert_eq!(result, Ok(asked[0]));
        // A refused connection never took effect: NotFound after it is the error.
        let (result, _) = run(
            "NotFound",
            &["client error (Connect)", "ApiError: NotFound"],
        )
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn an_edit_is_sent_again_until_accepted_and_a_missing_pool_is_an_error() {
        let (result, asked) = run(
            "",
            &["client error (Connect)", "client error (SendRequest)", "ok"],
        )
        .await;
        // Recorded at the attempt the cut connection may have applied, not at the refused one.
        assert_eq!(result, Ok(asked[1]));
        let (result, _) = run("", &["ApiError: NotFound", "ok"]).await;
        assert!(result.is_err());
        let (result, _) = run("", &["timed out"; 5]).await;
        assert!(result.is_err_and(|e| e.contains("may have taken effect")));
    }
}
