use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use pequod::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd { output_dir }) => exit(print_crds(output_dir.as_deref())),
        None => {
            pequod::telemetry::init(cli.run.zap_log_level, cli.run.zap_encoder);
            match pequod::operator::run(cli.run).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "pequod stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds(output_dir: Option<&Path>) -> Result<(), String> {
    let docs = pequod::api::crds_yaml().map_err(|e| format!("rendering CRDs: {e}"))?;
    for (file, yaml) in docs {
        match output_dir {
            Some(dir) => {
                let path = dir.join(&file);
                std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
