//! `kubectl dbpool`: the kubectl plugin for DbPools.
//!
//! Lives here: the command line (verbs `status`, `reopen`, `hold`, `release`, `diagnose`,
//! `events`, with kubectl's `--kubeconfig`, `--context` and `-n`), running a verb, and turning
//! every error into a message on stderr and an exit code (0 done or healthy, 1 unhealthy for
//! `diagnose`, 2 an error). Must not live here: API calls (`cluster`), formatting (`render`),
//! judging health (`diagnose`). Nothing here panics on what the cluster returns.

mod cluster;
mod diagnose;
mod render;

use std::{
    collections::BTreeMap,
    fmt,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use dbpool_api::{
    DbPool, FORCE_REOPEN_ANNOTATION, HELD_BY_ANNOTATION, HOLD_ANNOTATION, Hold,
    RELEASED_BY_ANNOTATION,
};
use k8s_openapi::jiff::Timestamp;
use kube::{ResourceExt, api::ListParams};

use cluster::{Cluster, Connection};

/// An error shown to the user as `error: …`.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: String) -> Self {
        Self(message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => Self(format!("the apiserver said: {}", status.message)),
            other => Self(other.to_string()),
        }
    }
}

impl From<kube::config::KubeconfigError> for Error {
    fn from(e: kube::config::KubeconfigError) -> Self {
        Self(format!("kubeconfig: {e}"))
    }
}

/// kubectl plugin for DbPools (dbpool.io): status, force reopen, maintenance holds, diagnostics
/// and events.
#[derive(Parser, Debug)]
#[command(name = "kubectl-dbpool", bin_name = "kubectl dbpool", version)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// One line per pool: phase, breaker, since, next trial, last probe's stage and message.
    Status {
        /// The pool (default: every pool in the namespace).
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
    },
    /// Force one immediate reopen (a fresh dbpool.io/force-reopen token), wait for the operator
    /// to act on it and print the result.
    Reopen {
        /// The pool.
        name: String,
        /// How long to wait for the operator.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Hold the breaker open for maintenance (like breaker.mode ForcedOpen, without touching the
    /// spec), recording who (SelfSubjectReview) and why.
    Hold {
        /// The pool.
        name: String,
        /// Why (shown in the BreakerOpen condition and the Held event).
        #[arg(long)]
        reason: String,
    },
    /// End a maintenance hold, recording who.
    Release {
        /// The pool.
        name: String,
    },
    /// Findings with a recommendation for each failing stage or SQLSTATE; exits 1 when the pool
    /// is unhealthy.
    Diagnose {
        /// The pool.
        name: String,
    },
    /// The pool's events, oldest first.
    Events {
        /// The pool.
        name: String,
    },
}

/// `30s`, `2m`, `500ms`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration {s:?} (use ms, s, m or h)")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

/// Runs the verb of `cli`: the exit code, or the error to show.
async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let cluster = Cluster::connect(&cli.connection).await?;
    match cli.verb {
        Verb::Status {
            name,
            all_namespaces,
        } => status(&cluster, name, all_namespaces).await,
        Verb::Reopen { name, timeout } => reopen(&cluster, &name, timeout).await,
        Verb::Hold { name, reason } => hold(&cluster, &name, &reason).await,
        Verb::Release { name } => release(&cluster, &name).await,
        Verb::Diagnose { name } => diagnose_pool(&cluster, &name).await,
        Verb::Events { name } => events(&cluster, &name).await,
    }
}

/// `status`: one row per pool (the one named, or every pool in the namespace or cluster).
async fn status(
    cluster: &Cluster,
    name: Option<String>,
    all_namespaces: bool,
) -> Result<ExitCode, Error> {
    let pools = match name {
        Some(name) => vec![cluster.pool(&name).await?],
        None => {
            let mut pools = cluster
                .pools(all_namespaces)
                .list(&ListParams::default())
                .await?
                .items;
            pools.sort_by_key(|p| (p.namespace(), p.name_any()));
            pools
        }
    };
    if pools.is_empty() {
        eprintln!(
            "No DbPools found{}.",
            if all_namespaces {
                String::new()
            } else {
                format!(" in namespace {}", cluster.namespace)
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![render::status_header(all_namespaces)];
    rows.extend(
        pools
            .iter()
            .map(|p| render::status_row(p, all_namespaces, Timestamp::now())),
    );
    print!("{}", render::table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// `reopen`: sets a fresh force-reopen token, waits for the operator to act on it and prints
/// the pool's row.
async fn reopen(cluster: &Cluster, name: &str, timeout: Duration) -> Result<ExitCode, Error> {
    cluster.pool(name).await?;
    let token = format!(
        "kubectl-dbpool-{}",
        Timestamp::now().as_nanosecond().unsigned_abs()
    );
    cluster
        .annotate(
            name,
            BTreeMap::from([(FORCE_REOPEN_ANNOTATION, Some(token.clone()))]),
        )
        .await?;
    println!(
        "force-reopen token {token} set on {}/{name}",
        cluster.namespace
    );
    let pool = wait_for_reopen(cluster, name, &token, timeout).await?;
    let acted_at = pool
        .status
        .as_ref()
        .and_then(|s| s.last_force_reopen.as_ref())
        .map(|r| render::relative(r.time.0, Timestamp::now()))
        .unwrap_or_default();
    println!("the operator acted on it {acted_at}:");
    let rows = vec![
        render::status_header(false),
        render::status_row(&pool, false, Timestamp::now()),
    ];
    print!("{}", render::table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The pool once its status records that the operator acted on `token`; an error after
/// `timeout`.
async fn wait_for_reopen(
    cluster: &Cluster,
    name: &str,
    token: &str,
    timeout: Duration,
) -> Result<DbPool, Error> {
    let start = Instant::now();
    loop {
        let pool = cluster.pool(name).await?;
        let acted = pool
            .status
            .as_ref()
            .and_then(|s| s.last_force_reopen.as_ref())
            .is_some_and(|r| r.token == token);
        if acted {
            return Ok(pool);
        }
        if start.elapsed() >= timeout {
            return Err(Error::new(format!(
                "the operator did not act on token {token} within {timeout:?}: is it running? (kubectl dbpool diagnose {name})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `hold`: holds the breaker open, recording who and why.
async fn hold(cluster: &Cluster, name: &str, reason: &str) -> Result<ExitCode, Error> {
    if reason.trim().is_empty() {
        return Err(Error::new("--reason must say why".to_owned()));
    }
    cluster.pool(name).await?;
    let who = cluster.whoami().await?;
    let pool = cluster
        .annotate(
            name,
            BTreeMap::from([
                (HOLD_ANNOTATION, Some(reason.trim().to_owned())),
                (HELD_BY_ANNOTATION, Some(who)),
                (RELEASED_BY_ANNOTATION, None),
            ]),
        )
        .await?;
    let hold = Hold::from_annotations(pool.annotations())
        .map(|h| h.describe())
        .unwrap_or_default();
    println!(
        "{}/{name}: breaker {hold}; release with: kubectl dbpool release {name} -n {}",
        cluster.namespace, cluster.namespace
    );
    Ok(ExitCode::SUCCESS)
}

/// `release`: ends a maintenance hold, recording who.
async fn release(cluster: &Cluster, name: &str) -> Result<ExitCode, Error> {
    let pool = cluster.pool(name).await?;
    let Some(hold) = Hold::from_annotations(pool.annotations()) else {
        println!("{}/{name} is not held", cluster.namespace);
        return Ok(ExitCode::SUCCESS);
    };
    let who = cluster.whoami().await?;
    cluster
        .annotate(
            name,
            BTreeMap::from([
                (HOLD_ANNOTATION, None),
                (HELD_BY_ANNOTATION, None),
                (RELEASED_BY_ANNOTATION, Some(who.clone())),
            ]),
        )
        .await?;
    println!(
        "{}/{name}: released by {who} (was {}); the breaker follows spec.breaker.mode again",
        cluster.namespace,
        hold.describe()
    );
    Ok(ExitCode::SUCCESS)
}

/// `diagnose`: prints the findings; exit code 1 when the pool is unhealthy.
async fn diagnose_pool(cluster: &Cluster, name: &str) -> Result<ExitCode, Error> {
    let pool = cluster.pool(name).await?;
    let events = cluster.events(name).await?;
    let report = diagnose::diagnose(&pool, &events, Timestamp::now());
    print!("{}", diagnose::render(&report));
    if !report.healthy {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `events`: the pool's events, oldest first.
async fn events(cluster: &Cluster, name: &str) -> Result<ExitCode, Error> {
    cluster.pool(name).await?;
    let events = cluster.events(name).await?;
    if events.is_empty() {
        eprintln!("No events for {}/{name}.", cluster.namespace);
    } else {
        print!(
            "{}",
            render::table(&render::event_rows(&events, Timestamp::now()))
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("2x").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
