use std::process::ExitCode;

use clap::Parser;
use pequod::cli::{Cli, Command};
use pequod::commands::{self, CommandError};

#[tokio::main]
async fn main() -> ExitCode {
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
        Some(Command::Publish {
            module,
            reference,
            insecure,
        }) => commands::publish(&module, &reference, insecure).await,
        None => {
            pequod::telemetry::init(cli.run.zap_log_level, cli.run.zap_encoder);
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
