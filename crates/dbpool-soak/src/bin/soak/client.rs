//! The client processes: each a `dbpool-soak client PORT` child doing work through
//! `dbpool-client` against one target's proxy, as its own role, for the whole run.
//!
//! Lives here: [`client_main`] (the child: one `SELECT 1` every 250ms, each bounded by 5s, until
//! its stdin closes, then its counts on stdout) and [`ClientProc`] (the parent's handle: spawn,
//! pid for the sampler, finish and read the counts; the child is killed if the handle is dropped).
//! The role's password goes through the environment, never the command line or a log. Must not
//! live here: the clients' role (`world`), judging.

use std::{
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};

/// The environment variable that carries the client role's password to the child.
const PASSWORD_ENV: &str = "SOAK_CLIENT_PASSWORD";

/// The child: queries `127.0.0.1:port` as `user` until stdin closes; prints `ok=N err=M`.
pub async fn client_main(name: &str, port: u16, user: &str) -> ExitCode {
    let password = std::env::var(PASSWORD_ENV).ok();
    let config =
        dbpool_client::PoolConfig::new(name, "127.0.0.1", port, "postgres", user, password);
    let pool = dbpool_client::Pool::new(config, None);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // EOF (the parent closed the pipe or died) or an error: stop.
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (ok, err) = (AtomicU64::new(0), AtomicU64::new(0));
    while !stop.load(Ordering::Relaxed) {
        let worked = match tokio::time::timeout(Duration::from_secs(5), pool.get()).await {
            Ok(Ok(client)) => client.simple_query("SELECT 1").await.is_ok(),
            _ => false,
        };
        if worked { &ok } else { &err }.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    pool.close();
    watcher.abort();
    let mut out = tokio::io::stdout();
    let line = format!(
        "ok={} err={}\n",
        ok.load(Ordering::Relaxed),
        err.load(Ordering::Relaxed)
    );
    let _ = out.write_all(line.as_bytes()).await;
    let _ = out.flush().await;
    ExitCode::SUCCESS
}

/// A client process the parent started.
pub struct ClientProc {
    /// `client-<target>`: the sampler's subject.
    pub name: String,
    child: Child,
}

impl ClientProc {
    /// Starts `dbpool-soak client NAME PORT USER` with the password in its environment.
    pub fn spawn(name: &str, port: u16, user: &str, password: &str) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let child = Command::new(exe)
            .args(["client", name, &port.to_string(), user])
            .env(PASSWORD_ENV, password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("client {name}: {e}"))?;
        Ok(ClientProc {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Closes its stdin, waits (at most 15s: a query is bounded by 5s) and returns its counts
    /// (ok, failed); (0, 0) if it did not say.
    pub async fn finish(mut self) -> (u64, u64) {
        drop(self.child.stdin.take());
        let mut text = String::new();
        let read = async {
            if let Some(mut out) = self.child.stdout.take() {
                let _ = out.read_to_string(&mut text).await;
            }
            let _ = self.child.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .is_err()
        {
            eprintln!("[soak] client {} did not stop in 15s: killed", self.name);
            let _ = self.child.kill().await;
        }
        parse_counts(&text)
    }
}

/// `ok=N err=M` as (N, M).
fn parse_counts(text: &str) -> (u64, u64) {
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("ok="), field("err="))
}

#[cfg(test)]
mod tests {
    use super::parse_counts;

    #[test]
    fn a_childs_counts_are_read_and_silence_is_zero() {
        assert_eq!(parse_counts("ok=622 err=72\n"), (622, 72));
        assert_eq!(parse_counts(""), (0, 0));
        assert_eq!(parse_counts("ok=x err=3"), (0, 3));
    }
}
