//! `baton`: the command line for Baton's REST API, and `baton dev`, which runs a private
//! PostgreSQL, an api and a worker in one process for a first run or local development.
#![forbid(unsafe_code)]

mod client;
mod commands;
mod dev;
mod schedules;
mod webhooks;
mod workflows;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Baton: queue, run and chain jobs on your workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run Baton locally: a private PostgreSQL (under BATON_DATA_DIR), the api and a worker.
    Dev(dev::DevArgs),
    #[command(flatten)]
    Api(commands::ApiCommand),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Api(cmd) => commands::run(cmd).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("baton: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
