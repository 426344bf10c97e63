//! How to start a test server.
//!
//! Lives here: [`PgOptions`], the builder of a server's settings (TLS names, connection limits,
//! extra postgresql.conf lines, pg_hba.conf lines that decide first) and its `start`. Must not
//! live here: what the settings turn into (the configuration written and the server started:
//! `server`).

use super::PgServer;

/// How to start a [`PgServer`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    pub(super) tls_names: Option<Vec<String>>,
    pub(super) max_connections: Option<u32>,
    pub(super) superuser_reserved_connections: Option<u32>,
    pub(super) extra_conf: Vec<String>,
    pub(super) hba_first: Vec<String>,
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

    /// A pg_hba.conf line placed before the template's own lines (so it decides first), e.g.
    /// `host all blocked 127.0.0.1/32 reject`.
    pub fn hba_first(mut self, line: &str) -> Self {
        self.hba_first.push(line.to_owned());
        self
    }

    /// Starts the server.
    pub async fn start(self) -> PgServer {
        PgServer::create(self).await
    }
}
