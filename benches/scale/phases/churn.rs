//! A window with connection churn on every server, as application pools cause all day: status
//! writes must not follow the servers' connection counts.
//!
//! Lives here: `Run::churn` and the churn client's connection. Must not live here: the quiet
//! window before it (`fast`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use dbpool_operator::api::GoDuration;
use tokio::task::JoinHandle;

use crate::{
    report::verdict,
    run::Run,
    support::postgres::{APP_DB, APP_PASSWORD, APP_USER},
};

impl Run {
    /// The churn window at `interval`; then waits one interval so every pool writes its quiet
    /// state again before the next phase.
    pub async fn churn(&mut self, interval: Duration) {
        let iv = GoDuration(interval);
        // Connection churn: each server gains and loses a client connection every 400ms, as
        // application pools do. The probe's message carries the connection count.
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU32::new(0));
        let churn: Vec<JoinHandle<()>> = self
            .pgs
            .iter()
            .map(|pg| {
                let port = pg.port();
                let (stop, connects) = (stop.clone(), connects.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match connect_app(port).await {
                            Ok(client) => {
                                connects.fetch_add(1, Ordering::Relaxed);
                                // Hold it for a while, as an application's pool does.
                                let _ = client.simple_query("SELECT 1").await;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                drop(client);
                            }
                            Err(err) => progress!("churn connection to :{port}: {err}"),
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            })
            .collect();
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (usage, _, _) = self.usage_end(begin);
        stop.store(true, Ordering::Relaxed);
        for task in churn {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let churned = self.writes_per_pool_hour(usage.writes, usage.wall);
        let probes_per_hour = 3600.0 / interval.as_secs_f64();
        self.report.row(
            format!("status writes per pool-hour, DB with connection churn, {iv} interval"),
            format!(
                "{churned:.0} ({} writes in {:.0} s; a pool probes {probes_per_hour:.0} times \
                 an hour; {} churn connections); operator CPU {:.3} s per 1,000 results; {}",
                usage.writes,
                usage.wall,
                connects.load(Ordering::Relaxed),
                usage.cpu_per_1000(),
                self.control_plane(&usage)
            ),
            "≤ 12",
            &verdict(churned <= 12.0),
        );
        // Let every pool write its quiet state again before the next phase.
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
    }
}

/// A client connection like an application's, to the server on `port`.
async fn connect_app(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB)
        .application_name("bench-churn")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
