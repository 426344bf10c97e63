//! A test server's lifecycle.
//!
//! Lives here: [`PgServer`] and [`PgNode`] (the server a `PgServer` dereferences to), creating a
//! server from the template and [`PgOptions`](super::PgOptions) (the configuration it writes),
//! starting on a free port, where it is (host, port, directories, CA), stopping fast, immediate
//! or smart (held by an open session), SIGKILL, restarting on the same port, and stopping it when
//! dropped. Must not live here: the test clients (`client`), standbys (`standby`), TLS material
//! (`tls`), or running commands as the `postgres` user (`system`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;
use tokio::time::Instant;

use super::{
    PgOptions, TlsMaterial, generate_tls,
    system::{append, command, new_dir, pg_bin, std_command, write_owned},
    template::template,
};

/// A running (or stopped) PostgreSQL 15 server on 127.0.0.1. Dropping it stops it
/// (immediate mode) and deletes its directory.
///
/// `PgServer::start()` makes a new server; `pg.start()` starts a stopped one again on the same
/// port. Rust does not allow both in one impl, so the server's methods live on [`PgNode`], which
/// `PgServer` dereferences to: call them on a `PgServer` as if they were its own.
pub struct PgServer {
    pub(super) node: PgNode,
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
    pub(super) dir: TempDir,
    pub(super) port: u16,
    pub(super) running: bool,
    pub(super) tls: Option<TlsMaterial>,
    pub(super) standby: bool,
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

    pub(super) async fn create(options: PgOptions) -> PgServer {
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
        if !options.hba_first.is_empty() {
            let hba = dir.path().join("data/pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            let first = options.hba_first.join("\n");
            write_owned(&hba, &format!("{first}\n{rest}"), 0o600);
        }

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
    pub(super) async fn start_on_new_port(&mut self) {
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

    /// Starts a smart shutdown and returns at once: the server refuses new connections with
    /// SQLSTATE 57P03 ("the database system is shutting down") until every open session has
    /// ended, then stops. Keep a session open to hold it there.
    pub async fn begin_smart_shutdown(&mut self) {
        let out = self
            .pg_ctl()
            .args(["-m", "smart", "-W", "stop"])
            .output()
            .await
            .expect("pg_ctl stop -m smart");
        assert!(
            out.status.success(),
            "pg_ctl stop -m smart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// Stops (fast) and starts again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
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

fn is_port_collision(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not bind")
}

fn is_retryable_start(log: &str) -> bool {
    is_port_collision(log)
        || log.contains("is still in use")
        || log.contains("already exists")
        || log.contains("another server might be running")
}
