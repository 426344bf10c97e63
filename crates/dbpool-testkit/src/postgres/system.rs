//! Running PostgreSQL's binaries as the `postgres` system user, and the files they touch.
//!
//! Lives here: where the binaries are ([`pg_bin`]), the `postgres` user's ids, commands that run
//! as it, and the file helpers that leave what they create owned by it (new temporary
//! directories, appended configuration, key files). Must not live here: what a server is or
//! does (`server`), what the template holds (`template`), any SQL.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use tempfile::TempDir;

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

pub(super) fn chown_to_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// A blocking command running `program` as the postgres user in `cwd`.
pub(super) fn std_command(program: &Path, cwd: &Path) -> std::process::Command {
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
pub(super) fn command(program: &Path, cwd: &Path) -> tokio::process::Command {
    tokio::process::Command::from(std_command(program, cwd))
}

pub(super) fn run_blocking(mut cmd: std::process::Command, what: &str) {
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

pub(super) fn new_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("dbpool-pg-")
        .tempdir()
        .expect("tempdir");
    chown_to_postgres(dir.path());
    dir
}

pub(super) fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub(super) fn write_owned(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    chown_to_postgres(path);
}
