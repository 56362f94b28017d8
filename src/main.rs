use std::process::ExitCode;

use clap::Parser;

/// mimalloc keeps the resident size flat under the token cache's steady
/// insert-and-evict churn, where the system allocator fragments.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    identity::cli::run(identity::cli::Cli::parse()).await
}
