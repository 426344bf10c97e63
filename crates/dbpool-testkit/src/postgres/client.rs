//! The test clients of a server.
//!
//! Lives here: the methods of [`PgNode`] that log in to it over TCP without TLS (`connect_as`,
//! `superuser`, `app_client`) and the superuser's one-liners (`execute`, `query_text`). Must not
//! live here: the server's lifecycle (`server`), and any client under test (the probe, the pools):
//! these are the tests' own eyes on the server.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{APP_DB, APP_PASSWORD, APP_USER, PgNode, SUPERUSER, SUPERUSER_PASSWORD};

impl PgNode {
    /// Connects as `user`/`password` to `dbname` over TCP without TLS.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .application_name("test-harness")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser client on database `postgres`.
    pub async fn superuser(&self) -> Client {
        self.connect_as(SUPERUSER, SUPERUSER_PASSWORD, "postgres")
            .await
            .unwrap_or_else(|e| panic!("superuser connect to {}: {e:?}", self.addr()))
    }

    /// An `app` client on database `app`.
    pub async fn app_client(&self) -> Client {
        self.connect_as(APP_USER, APP_PASSWORD, APP_DB)
            .await
            .unwrap_or_else(|e| panic!("app connect to {}: {e:?}", self.addr()))
    }

    /// Runs `sql` (one or more statements) as superuser.
    pub async fn execute(&self, sql: &str) {
        self.superuser()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs a one-value query as superuser and returns the value as text.
    pub async fn query_text(&self, sql: &str) -> Option<String> {
        let messages = self
            .superuser()
            .await
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        messages.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
    }
}
