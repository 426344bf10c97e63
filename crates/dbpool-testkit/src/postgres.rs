//! Real PostgreSQL 15 servers for tests, one per test, each in its own temporary directory.
//!
//! Lives here: the constants tests log in with, and the map of the submodules, whose public items
//! are re-exported here so every path is `dbpool_testkit::postgres::…`: a server's lifecycle,
//! [`PgServer`] and [`PgNode`] (`server`: start, stop fast or immediate, SIGKILL, restart on the
//! same port), how to start one, [`PgOptions`] (`options`), the tests' clients (`client`), TLS
//! material with a generated CA (`tls`), standbys made with pg_basebackup (`standby`), the
//! initdb'd template every server copies (`template`) and running PostgreSQL's binaries as the
//! `postgres` user (`system`). Must not live here: anything about the operator's code; tests
//! drive it themselves.
//!
//! We run as root and PostgreSQL refuses to, so every PostgreSQL binary runs as the `postgres`
//! system user and every directory it touches is owned by it. initdb runs once per machine into a
//! template (`$TMPDIR/dbpool-operator-pg15-template-v1`, roles `postgres` and `app` and database
//! `app` already created); each server is a copy of it, which takes a fraction of an initdb.

mod client;
mod options;
mod server;
mod standby;
mod system;
mod template;
mod tls;

pub use options::PgOptions;
pub use server::{PgNode, PgServer};
pub use system::pg_bin;
pub use tls::{TlsMaterial, generate_tls, unrelated_ca_pem};

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
