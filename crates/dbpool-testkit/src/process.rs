//! The operator as a real process: start it, signal it, scrape it, read its log.
//!
//! Lives here: [`OperatorProcess`] (a `dbpool-operator run` child with its own metrics port and a
//! log file) and [`sample`] (one value from a Prometheus text exposition). The caller passes the
//! binary's path (`env!("CARGO_BIN_EXE_dbpool-operator")` in the operator's tests), since this kit
//! cannot depend on the operator. Must not live here: assertions about the operator.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{kube::kubeconfig_path, ports::free_port};

/// A `dbpool-operator run` process, killed when dropped. Its output (JSON logs) goes to a file.
pub struct OperatorProcess {
    /// The child process.
    pub child: Child,
    /// Its /metrics, /healthz and /readyz port on 127.0.0.1.
    pub port: u16,
    /// Its instance name (POD_NAME).
    pub name: String,
    log: PathBuf,
    _dir: TempDir,
}

impl OperatorProcess {
    /// Starts `binary run` watching `namespace` as instance `name`, with `extra` flags, against
    /// the test control plane.
    pub fn start(binary: &str, namespace: &str, name: &str, extra: &[&str]) -> Self {
        Self::start_with_kubeconfig(binary, &kubeconfig_path(), namespace, name, extra)
    }

    /// As [`OperatorProcess::start`], with another kubeconfig (e.g. one through a fault proxy).
    pub fn start_with_kubeconfig(
        binary: &str,
        kubeconfig: &Path,
        namespace: &str,
        name: &str,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let dir = TempDir::new().expect("log directory");
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let stdout = file.try_clone().expect("log file handle");
        let child = Command::new(binary)
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--namespace", namespace])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "json"])
            .args(extra)
            .env("POD_NAME", name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start dbpool-operator");
        Self {
            child,
            port,
            name: name.to_owned(),
            log,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, …).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// GET `path` on the metrics port: (status code, body), or None if nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path).await
    }

    /// The /metrics text (empty if nothing answers).
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Everything the process logged so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size in KiB (VmRSS), while the process runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.0 GET of `path` on 127.0.0.1:`port`: (status code, body), or None if nothing
/// answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// The value of the first sample of `metric` whose labels contain every `labels` pair.
pub fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
