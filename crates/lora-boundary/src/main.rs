//! The `lora-boundary` binary.
use clap::Parser;

fn main() {
    let cli = lora_boundary::cli::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(e) = lora_boundary::cli::run(&cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
