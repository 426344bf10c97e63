//! The initdb'd template every test server is a copy of.
//!
//! Lives here: `template`, which runs initdb once per machine (and once per process at most)
//! into `$TMPDIR/dbpool-operator-pg15-template-v1` and creates the `app` role and database in it.
//! Must not live here: starting the servers that copy it (`server`), or anything a test asks of
//! a server.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD,
    system::{chown_to_postgres, pg_bin, run_blocking, std_command},
};

const TEMPLATE_NAME: &str = "dbpool-operator-pg15-template-v1";

/// The initdb'd template, made once per machine (and once per process at most).
pub(super) fn template() -> &'static Path {
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
