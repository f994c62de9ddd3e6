use std::process::ExitCode;

use cgmetric::cli::{Options, Report};
use clap::Parser;

fn main() -> ExitCode {
    let options = Options::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match &options.report {
        Some(Report::Top(top)) => {
            cgmetric::report::top(top).map_err(|e| format!("cgmetric top: {e}"))
        }
        Some(Report::Billing(billing)) => {
            cgmetric::report::billing(billing).map_err(|e| format!("cgmetric billing: {e}"))
        }
        None => cgmetric::daemon::run(options).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error!("{message}");
            ExitCode::FAILURE
        }
    }
}
