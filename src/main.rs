use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    identity::cli::run(identity::cli::Cli::parse()).await
}
