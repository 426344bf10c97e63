//! Real PostgreSQL 15 servers for tests, one per test, each in its own temporary directory.
//!
//! Lives here: [`PgServer`] (start, stop fast or immediate, SIGKILL, restart on the same port,
//! standbys made with pg_basebackup, TLS with a generated CA) and the constants tests log in with.
//! Must not live here: anything about the operator's code; tests drive it themselves.
//!
//! We run as root and PostgreSQL refuses to, so every PostgreSQL binary runs as the `postgres`
//! system user and every directory it touches is owned by it. initdb runs once per machine into a
//! template (`$TMPDIR/dbpool-operator-pg15-template-v1`, roles `postgres` and `app` and database
//! `app` already created); each server is a copy of it, which takes a fraction of an initdb.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tempfile::TempDir;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Superuser name.
pub const SUPERUSER: &str = "postgres";
/// Superuser password (scram-sha-256 over TCP; the unix socket trusts local users).
pub const SUPERUSER_PASSWORD: &str = "postgres-secret";
/// The application role.
pub const APP_USER: &str = "app";
/// The application role's password.
pub const APP_PASSWORD: &str = "app-secret-1";
/// The application database, owned by [`APP_USER`].
pub const APP_DB: &str = "app";

const TEMPLATE_NAME: &str = "dbpool-operator-pg15-template-v1";

/// Directory of the PostgreSQL 15 binaries (`PG_BIN` overrides).
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let line = passwd
            .lines()
            .find(|l| l.starts_with("postgres:"))
            .expect("no postgres system user (apt-get install postgresql-15)");
        let fields: Vec<&str> = line.split(':').collect();
        (
            fields[2].parse().expect("uid"),
            fields[3].parse().expect("gid"),
        )
    })
}

fn chown_to_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// A blocking command running `program` as the postgres user in `cwd`.
fn std_command(program: &Path, cwd: &Path) -> std::process::Command {
    let (uid, gid) = postgres_ids();
    let mut cmd = std::process::Command::new(program);
    cmd.uid(uid)
        .gid(gid)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .env_remove("PGPORT");
    cmd
}

/// An async command running `program` as the postgres user in `cwd`.
fn command(program: &Path, cwd: &Path) -> tokio::process::Command {
    tokio::process::Command::from(std_command(program, cwd))
}

fn run_blocking(mut cmd: std::process::Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The initdb'd template, made once per machine (and once per process at most).
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let final_dir = std::env::temp_dir().join(TEMPLATE_NAME);
        if final_dir.join("data/PG_VERSION").exists() {
            return final_dir;
        }
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let build = std::env::temp_dir().join(format!(
            "{TEMPLATE_NAME}-build-{}-{nonce}",
            std::process::id()
        ));
        std::fs::create_dir_all(&build).expect("template dir");
        chown_to_postgres(&build);
        let pwfile = build.join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("pwfile");
        chown_to_postgres(&pwfile);
        let data = build.join("data");
        let bin = pg_bin();

        let mut initdb = std_command(&bin.join("initdb"), &build);
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ]);
        run_blocking(initdb, "initdb");

        let mut start = std_command(&bin.join("pg_ctl"), &build);
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(build.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses='' -c unix_socket_directories='{}' -p 5432",
                build.display()
            ))
            .arg("start");
        run_blocking(start, "pg_ctl start (template)");

        let mut psql = std_command(&bin.join("psql"), &build);
        psql.arg("-h")
            .arg(&build)
            .args([
                "-p",
                "5432",
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args([
                "-c",
                &format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
            ])
            .args(["-c", &format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}")]);
        run_blocking(psql, "create app role and database");

        let mut stop = std_command(&bin.join("pg_ctl"), &build);
        stop.arg("-D").arg(&data).args(["-m", "fast", "-w", "stop"]);
        run_blocking(stop, "pg_ctl stop (template)");
        let _ = std::fs::remove_file(&pwfile);
        let _ = std::fs::remove_file(build.join("log"));

        if std::fs::rename(&build, &final_dir).is_err() {
            // Another process finished its template first: use that one.
            let _ = std::fs::remove_dir_all(&build);
            assert!(
                final_dir.join("data/PG_VERSION").exists(),
                "template {} missing",
                final_dir.display()
            );
        }
        final_dir
    })
}

/// A CA and a server certificate signed by it, all PEM.
pub struct TlsMaterial {
    /// The CA certificate clients verify against.
    pub ca_pem: String,
    /// The server certificate.
    pub cert_pem: String,
    /// The server's private key.
    pub key_pem: String,
}

/// A fresh CA with a server certificate for `names` (DNS names or IP addresses).
pub fn generate_tls(names: &[String]) -> TlsMaterial {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dbpool-operator test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params = rcgen::CertificateParams::new(names.to_vec()).expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postgres");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    TlsMaterial {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A CA that signed nothing a test server uses: verification against it must fail.
pub fn unrelated_ca_pem() -> String {
    generate_tls(&["localhost".to_owned()]).ca_pem
}

/// How to start a [`PgServer`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    tls_names: Option<Vec<String>>,
    max_connections: Option<u32>,
    superuser_reserved_connections: Option<u32>,
    extra_conf: Vec<String>,
}

impl PgOptions {
    /// TLS on, with a generated CA and a certificate for `localhost` and `127.0.0.1`.
    pub fn tls(self) -> Self {
        self.tls_names(&["localhost", "127.0.0.1"])
    }

    /// TLS on, with a certificate for exactly `names`.
    pub fn tls_names(mut self, names: &[&str]) -> Self {
        self.tls_names = Some(names.iter().map(|n| (*n).to_owned()).collect());
        self
    }

    /// `max_connections`.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// `superuser_reserved_connections`.
    pub fn superuser_reserved_connections(mut self, n: u32) -> Self {
        self.superuser_reserved_connections = Some(n);
        self
    }

    /// An extra postgresql.conf line, e.g. `log_connections = on`.
    pub fn conf(mut self, line: &str) -> Self {
        self.extra_conf.push(line.to_owned());
        self
    }

    /// Starts the server.
    pub async fn start(self) -> PgServer {
        PgServer::create(self).await
    }
}

/// A running (or stopped) PostgreSQL 15 server on 127.0.0.1. Dropping it stops it
/// (immediate mode) and deletes its directory.
///
/// `PgServer::start()` makes a new server; `pg.start()` starts a stopped one again on the same
/// port. Rust does not allow both in one impl, so the server's methods live on [`PgNode`], which
/// `PgServer` dereferences to: call them on a `PgServer` as if they were its own.
pub struct PgServer {
    node: PgNode,
}

impl std::ops::Deref for PgServer {
    type Target = PgNode;

    fn deref(&self) -> &PgNode {
        &self.node
    }
}

impl std::ops::DerefMut for PgServer {
    fn deref_mut(&mut self) -> &mut PgNode {
        &mut self.node
    }
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.node.fmt(f)
    }
}

/// The server behind a [`PgServer`]: every method of a server.
pub struct PgNode {
    dir: TempDir,
    port: u16,
    running: bool,
    tls: Option<TlsMaterial>,
    standby: bool,
}

impl std::fmt::Debug for PgNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("running", &self.running)
            .field("tls", &self.tls.is_some())
            .field("standby", &self.standby)
            .finish()
    }
}

impl PgServer {
    /// A plain server with default settings.
    pub async fn start() -> PgServer {
        PgOptions::default().start().await
    }

    /// Options for a server that is not plain.
    pub fn options() -> PgOptions {
        PgOptions::default()
    }

    async fn create(options: PgOptions) -> PgServer {
        PgServer {
            node: PgNode::create(options).await,
        }
    }
}

impl PgNode {
    async fn create(options: PgOptions) -> PgNode {
        let template = template().to_owned();
        let dir = new_dir();
        let mut cp = command(Path::new("/bin/cp"), dir.path());
        cp.arg("-a")
            .arg(template.join("data"))
            .arg(dir.path().join("data"));
        let out = cp.output().await.expect("cp");
        assert!(out.status.success(), "copying the template failed: {out:?}");

        let tls = options.tls_names.as_ref().map(|names| {
            let material = generate_tls(names);
            let data = dir.path().join("data");
            write_owned(&data.join("server.crt"), &material.cert_pem, 0o600);
            write_owned(&data.join("server.key"), &material.key_pem, 0o600);
            material
        });

        let mut conf = String::from("\n# test harness\n");
        writeln!(conf, "listen_addresses = '127.0.0.1'").ok();
        writeln!(conf, "unix_socket_directories = '{}'", dir.path().display()).ok();
        conf.push_str(
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 16MB\nmax_wal_senders = 4\nlog_min_messages = warning\n",
        );
        if let Some(n) = options.max_connections {
            writeln!(conf, "max_connections = {n}").ok();
        }
        if let Some(n) = options.superuser_reserved_connections {
            writeln!(conf, "superuser_reserved_connections = {n}").ok();
        }
        if tls.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for line in &options.extra_conf {
            writeln!(conf, "{line}").ok();
        }
        append(&dir.path().join("data/postgresql.conf"), &conf);

        let mut server = PgNode {
            dir,
            port: 0,
            running: false,
            tls,
            standby: false,
        };
        server.start_on_new_port().await;
        server
    }

    /// Picks a free port and starts; a port taken in the meantime is retried with another.
    async fn start_on_new_port(&mut self) {
        for _ in 0..10 {
            self.port = crate::ports::free_port();
            append(
                &self.data_dir().join("postgresql.conf"),
                &format!("port = {}\n", self.port),
            );
            match self.pg_ctl_start().await {
                Ok(()) => {
                    self.running = true;
                    return;
                }
                Err(log) if is_port_collision(&log) => continue,
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        panic!("PostgreSQL could not find a free port");
    }

    /// Runs `pg_ctl start -w`; on failure returns what the server logged meanwhile.
    async fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.log_path();
        let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = self
            .pg_ctl()
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .await
            .expect("pg_ctl");
        if out.status.success() {
            return Ok(());
        }
        let text = std::fs::read(&log).unwrap_or_default();
        let start = usize::try_from(before).unwrap_or(0).min(text.len());
        Err(format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&text[start..])
        ))
    }

    fn pg_ctl(&self) -> tokio::process::Command {
        let mut cmd = command(&pg_bin().join("pg_ctl"), self.dir.path());
        cmd.arg("-D").arg(self.data_dir());
        cmd
    }

    /// Always 127.0.0.1.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TCP port (stays the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log (appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The PEM CA that signed the server certificate, for a TLS server.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Connects as `user`/`password` to `dbname` over TCP without TLS.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .application_name("test-harness")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser client on database `postgres`.
    pub async fn superuser(&self) -> Client {
        self.connect_as(SUPERUSER, SUPERUSER_PASSWORD, "postgres")
            .await
            .unwrap_or_else(|e| panic!("superuser connect to {}: {e:?}", self.addr()))
    }

    /// An `app` client on database `app`.
    pub async fn app_client(&self) -> Client {
        self.connect_as(APP_USER, APP_PASSWORD, APP_DB)
            .await
            .unwrap_or_else(|e| panic!("app connect to {}: {e:?}", self.addr()))
    }

    /// Runs `sql` (one or more statements) as superuser.
    pub async fn execute(&self, sql: &str) {
        self.superuser()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs a one-value query as superuser and returns the value as text.
    pub async fn query_text(&self, sql: &str) -> Option<String> {
        let messages = self
            .superuser()
            .await
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        messages.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
    }

    /// Stops the server in fast mode (sessions are terminated, a checkpoint is written).
    pub async fn stop(&mut self) {
        self.pg_ctl_stop("fast").await;
    }

    /// Stops the server in immediate mode (no checkpoint; like a crash, with crash recovery on
    /// the next start).
    pub async fn stop_immediate(&mut self) {
        self.pg_ctl_stop("immediate").await;
    }

    async fn pg_ctl_stop(&mut self, mode: &str) {
        let out = self
            .pg_ctl()
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .await
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGKILLs the postmaster (its backends notice and exit on their own).
    pub async fn kill(&mut self) {
        let pid = self.postmaster_pid().expect("postmaster.pid");
        let status = tokio::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .await
            .expect("kill");
        assert!(status.success(), "kill -KILL {pid}");
        self.running = false;
    }

    /// Starts a stopped (or killed) server again on the same port. Retries for a while when the
    /// port or the shared memory of a killed server are still in use.
    pub async fn start(&mut self) {
        assert!(!self.running, "server already running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.pg_ctl_start().await {
                Ok(()) => {
                    self.running = true;
                    return;
                }
                Err(log) if Instant::now() < deadline && is_retryable_start(&log) => {
                    // Whatever blocks the start (a dying backend of a killed server, the port)
                    // goes away on its own.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(log) => panic!("PostgreSQL did not restart on port {}:\n{log}", self.port),
            }
        }
    }

    /// Stops (fast) and starts again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// A hot standby of this server (pg_basebackup -R), started on its own port.
    pub async fn standby(&self) -> PgServer {
        assert!(self.running, "the primary must run");
        let dir = new_dir();
        let data = dir.path().join("data");
        let out = command(&pg_bin().join("pg_basebackup"), dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER])
            .output()
            .await
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# standby\nunix_socket_directories = '{}'\nhot_standby = on\n",
                dir.path().display()
            ),
        );
        let mut standby = PgNode {
            dir,
            port: 0,
            running: false,
            tls: self.tls.as_ref().map(|t| TlsMaterial {
                ca_pem: t.ca_pem.clone(),
                cert_pem: t.cert_pem.clone(),
                key_pem: t.key_pem.clone(),
            }),
            standby: true,
        };
        standby.start_on_new_port().await;
        PgServer { node: standby }
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        if self.postmaster_pid().is_some() {
            let mut stop = std_command(&pg_bin().join("pg_ctl"), self.dir.path());
            stop.arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let _ = stop.status();
        }
    }
}

fn new_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("dbpool-pg-")
        .tempdir()
        .expect("tempdir");
    chown_to_postgres(dir.path());
    dir
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn write_owned(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    chown_to_postgres(path);
}

fn is_port_collision(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not bind")
}

fn is_retryable_start(log: &str) -> bool {
    is_port_collision(log)
        || log.contains("is still in use")
        || log.contains("already exists")
        || log.contains("another server might be running")
}
