//! The soak's own control plane: etcd and kube-apiserver as child processes, with an audit log
//! and one bearer token per identity, so the audit log tells the operator replicas apart.
//!
//! Lives here: [`ControlPlane`] (start, the apiserver restarted on its port, etcd frozen and
//! thawed, kubeconfigs per user, a client for the soak itself). The apiserver's serving
//! certificate comes from the testkit's CA generator; every user authenticates with a static
//! token (`--token-auth-file`) and is in system:masters (the soak tests fencing and recovery,
//! not RBAC, which tests/rbac.rs covers). Must not live here: the databases, the operators.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use dbpool_soak::audit::POLICY;
use dbpool_testkit::{ports::free_port, postgres::generate_tls, process::http_get};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// The users the apiserver knows: the soak itself, then one per operator replica.
pub fn users(replicas: usize) -> Vec<String> {
    let mut users = vec!["soak-admin".to_owned()];
    users.extend((0..replicas).map(|i| format!("soak-op-{i}")));
    users
}

/// etcd and kube-apiserver of one soak run.
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    /// The apiserver's port on 127.0.0.1.
    pub port: u16,
    /// The audit log (JSON lines).
    pub audit_log: PathBuf,
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

async fn etcd_healthy(port: u16) -> bool {
    http_get(port, "/health")
        .await
        .is_some_and(|(code, body)| code == 200 && body.contains("true"))
}

impl ControlPlane {
    /// Starts etcd and the apiserver under `dir` with binaries from `bin`, for `replicas`
    /// operator identities; returns once the apiserver answers the admin.
    pub async fn start(dir: &Path, bin: &Path, replicas: usize) -> Result<ControlPlane, String> {
        // A fresh store and audit log, also when SOAK_OUT names a folder of an earlier run.
        let _ = std::fs::remove_dir_all(dir.join("etcd"));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("audit") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        std::fs::create_dir_all(dir.join("etcd")).map_err(|e| e.to_string())?;
        let tls = generate_tls(&["127.0.0.1".to_owned(), "localhost".to_owned()]);
        write(&dir.join("ca.crt"), &tls.ca_pem)?;
        write(&dir.join("apiserver.crt"), &tls.cert_pem)?;
        write(&dir.join("apiserver.key"), &tls.key_pem)?;
        let sa = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        write(&dir.join("sa.key"), &sa.serialize_pem())?;
        write(&dir.join("sa.pub"), &sa.public_key_pem())?;
        write(&dir.join("audit-policy.yaml"), POLICY)?;
        let tokens: String = users(replicas)
            .iter()
            .map(|u| format!("{},{u},{u},system:masters\n", token_of(u)))
            .collect();
        write(&dir.join("tokens.csv"), &tokens)?;

        let (client_port, peer_port) = (free_port(), free_port());
        let d = |p: &str| dir.join(p).display().to_string();
        let etcd_args: Vec<String> = vec![
            "--name=soak".into(),
            format!("--data-dir={}", d("etcd")),
            "--unsafe-no-fsync".into(),
            format!("--listen-client-urls=http://127.0.0.1:{client_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=soak=http://127.0.0.1:{peer_port}"),
            "--log-level=warn".into(),
        ];
        let etcd = spawn(&bin.join("etcd"), &etcd_args, &dir.join("etcd.log"))?;
        let port = free_port();
        let audit_log = dir.join("audit.log");
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{client_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d("apiserver-certs")),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--service-account-issuer=https://127.0.0.1:{port}/"),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", audit_log.display()),
            "--audit-log-format=json".into(),
            // Rotation at 100 GB (0 means lumberjack's default, 100 MB); the reader reads rotated
            // files too.
            "--audit-log-maxsize=100000".into(),
        ];
        let mut cp = ControlPlane {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            etcd,
            apiserver: None,
            apiserver_args,
            port,
            audit_log,
        };
        for user in users(replicas) {
            cp.write_kubeconfig(&user, port)?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !etcd_healthy(client_port).await {
            if tokio::time::Instant::now() > deadline {
                return Err("etcd not healthy within 60s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cp.start_apiserver().await?;
        Ok(cp)
    }

    /// The kubeconfig of `user` pointing at `127.0.0.1:port` (a replica's goes through its proxy).
    pub fn write_kubeconfig(&self, user: &str, port: u16) -> Result<PathBuf, String> {
        let path = self.dir.join(format!("{user}-{port}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: soak\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: dbpool-env\n  context:\n    cluster: soak\n    user: {user}\n    namespace: default\ncurrent-context: dbpool-env\n",
            ca = self.dir.join("ca.crt").display(),
            token = token_of(user),
        );
        write(&path, &text)?;
        Ok(path)
    }

    /// A client of the apiserver as `user`.
    pub async fn client(&self, user: &str) -> Result<Client, String> {
        let path = self.write_kubeconfig(user, self.port)?;
        let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| e.to_string())?;
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        config.read_timeout = Some(Duration::from_secs(15));
        config.write_timeout = Some(Duration::from_secs(15));
        Client::try_from(config).map_err(|e| e.to_string())
    }

    async fn start_apiserver(&mut self) -> Result<(), String> {
        let log = self.dir.join("apiserver.log");
        self.apiserver = Some(spawn(
            &self.bin.join("kube-apiserver"),
            &self.apiserver_args,
            &log,
        )?);
        let client = self.client("soak-admin").await?;
        let namespaces: Api<Namespace> = Api::all(client);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if namespaces.list(&Default::default()).await.is_ok() {
                return Ok(());
            }
            let exited = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "kube-apiserver exited ({status}); see {}",
                    log.display()
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err("kube-apiserver not ready within 120s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the apiserver (SIGTERM, then SIGKILL after 20s) and starts it again on its port;
    /// returns once it answers.
    pub async fn restart_apiserver(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.apiserver.take() {
            signal(child.id(), "TERM");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if tokio::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.start_apiserver().await
    }

    /// etcd's pid (for SIGSTOP and SIGCONT).
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.id()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        signal(self.etcd.id(), "CONT");
        if let Some(mut a) = self.apiserver.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        // The store goes; the audit log and the logs stay with the report.
        let _ = std::fs::remove_dir_all(self.dir.join("etcd"));
    }
}

/// The bearer token of `user` (fixed per user name: the soak's apiserver is private, on
/// loopback, and gone when the run ends).
fn token_of(user: &str) -> String {
    format!("soak-token-{user}")
}

/// Sends `kill -SIGNAL pid`; false if it failed.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
