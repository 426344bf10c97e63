//! PgBouncer as a peer: a `pgbouncer` process in front of the bench's PostgreSQL, on loopback.
//!
//! Lives here: [`Bouncer`] (writes the configuration into a temporary directory, starts Debian's
//! `pgbouncer` in the foreground as the `postgres` system user — it refuses to run as root —,
//! waits until it listens, and stops it with SIGTERM, then SIGKILL, when dropped) and
//! [`BouncerSettings`] (its defaults, or `server_login_retry = 1`). Must not live here: the
//! tasks' connections to it (`pools`) or the scenario (`scenario`).
//!
//! Only what the benchmark needs is set: where it listens, the database it forwards to and the
//! credentials (`auth_file` with the `app` role's password, so it can log in to PostgreSQL with
//! SCRAM). Everything else (`pool_mode = session`, `default_pool_size = 20`, `max_client_conn =
//! 100`, `auth_type = md5`, `server_login_retry = 15`, `server_connect_timeout = 15`, ...) is
//! PgBouncer's default, except `server_login_retry` in [`BouncerSettings::LoginRetry1`].

use std::{
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use dbpool_testkit::postgres::{APP_DB, APP_PASSWORD, APP_USER};

/// Where Debian's package puts the binary (`PGBOUNCER` overrides).
pub fn binary() -> PathBuf {
    std::env::var_os("PGBOUNCER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"))
}

/// The PgBouncer version (`pgbouncer --version`'s first line), for the report.
pub fn version() -> String {
    Command::new(binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not found".into())
}

/// Which PgBouncer configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BouncerSettings {
    /// Every setting at PgBouncer's default.
    Defaults,
    /// The defaults but `server_login_retry = 1` (default 15 s).
    LoginRetry1,
}

/// A running `pgbouncer`; stopped when dropped.
pub struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

/// uid and gid of the `postgres` system user (the testkit's PostgreSQL runs as it too).
fn postgres_ids() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or("no postgres system user")?;
    let f: Vec<&str> = line.split(':').collect();
    let id = |i: usize| f.get(i).and_then(|v| v.parse::<u32>().ok());
    Ok((id(2).ok_or("bad uid")?, id(3).ok_or("bad gid")?))
}

fn write(path: &Path, text: &str, ids: (u32, u32)) -> Result<(), String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    std::os::unix::fs::chown(path, Some(ids.0), Some(ids.1))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

impl Bouncer {
    /// Starts PgBouncer forwarding database `app` to 127.0.0.1:`pg_port`, and waits (at most
    /// 10 s) until it accepts connections.
    pub async fn start(settings: BouncerSettings, pg_port: u16) -> Result<Bouncer, String> {
        let ids = postgres_ids()?;
        let port = dbpool_testkit::ports::free_port();
        let dir = std::env::temp_dir().join(format!(
            "dbpool-bench-pgbouncer-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::os::unix::fs::chown(&dir, Some(ids.0), Some(ids.1))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        let mut ini = format!(
            "[databases]\n{APP_DB} = host=127.0.0.1 port={pg_port} dbname={APP_DB}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_file = {auth}\nlogfile = {log}\npidfile = {pid}\n",
            auth = dir.join("userlist.txt").display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        if settings == BouncerSettings::LoginRetry1 {
            ini.push_str("server_login_retry = 1\n");
        }
        write(&dir.join("pgbouncer.ini"), &ini, ids)?;
        write(
            &dir.join("userlist.txt"),
            &format!("\"{APP_USER}\" \"{APP_PASSWORD}\"\n"),
            ids,
        )?;
        let child = Command::new(binary())
            .arg(dir.join("pgbouncer.ini"))
            .uid(ids.0)
            .gid(ids.1)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary().display()))?;
        let mut b = Bouncer { child, port, dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(b);
            }
            if let Ok(Some(status)) = b.child.try_wait() {
                return Err(format!("pgbouncer exited ({status}): {}", b.log_tail()));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "pgbouncer did not listen within 10 s: {}",
                    b.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // SIGTERM: PgBouncer's immediate shutdown; SIGKILL if still running 5 s later.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..250 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
