fn main() -> std::process::ExitCode {
    pequod::cli::Cli::run()
}
