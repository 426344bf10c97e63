//! The `dbpool-operator` command: `crd` prints the CustomResourceDefinition.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kubernetes operator that keeps PostgreSQL connection pools out of a permanent failure state.
#[derive(Parser, Debug)]
#[command(name = "dbpool-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the DbPool CustomResourceDefinition as YAML (what crds/dbpool.yaml holds).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match dbpool_operator::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: cannot render the CRD: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
