//! Hot standbys of a test server.
//!
//! Lives here: [`PgNode::standby`], which makes a standby with `pg_basebackup -R` and starts it on
//! its own port, with the primary's TLS material. Must not live here: starting, stopping and
//! killing a server (`server`, which a standby shares with any server), or promotion and role
//! checks (the tests run SQL for those).

use super::{
    PgNode, PgServer, SUPERUSER, TlsMaterial,
    system::{append, command, new_dir, pg_bin},
};

impl PgNode {
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
