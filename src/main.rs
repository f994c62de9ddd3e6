use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let options = cgmetric::cli::Options::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cgmetric::daemon::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
