use std::process::ExitCode;

use clap::Parser;
use pequod::cli::{Cli, Command};
use pequod::commands::{self, CommandError};

/// Stack of each runtime thread. Reconcile futures are large (unoptimized builds copy them
/// through several frames); tokio's 2 MiB default left little headroom.
const THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

fn main() -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_BYTES)
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Crd { output_dir }) => commands::crd(output_dir.as_deref()),
        Some(Command::Render {
            module,
            input,
            output,
            cue,
        }) => commands::render(&module, &input, output, &cue).await,
        Some(Command::Schema {
            module,
            name,
            group,
            version,
            output,
            cue,
        }) => commands::schema(&module, name.as_deref(), &group, &version, output, &cue).await,
        Some(Command::Rbac {
            transform,
            service_account,
            service_account_namespace,
        }) => commands::rbac(&transform, service_account, service_account_namespace).await,
        Some(Command::Plan {
            transform,
            module,
            output,
            cue,
        }) => commands::plan(&transform, &module, output, &cue).await,
        Some(Command::Publish {
            module,
            reference,
            insecure,
        }) => commands::publish(&module, &reference, insecure).await,
        None => {
            pequod::runtime::telemetry::init(cli.run.zap_log_level, cli.run.zap_encoder);
            return match pequod::operator::run(cli.run).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "pequod stopped");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError { message, code }) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}
