use std::process::ExitCode;

use cgmetric::cli::{Options, Report};
use clap::Parser;

fn main() -> ExitCode {
    one_malloc_arena();
    let options = Options::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match &options.report {
        Some(Report::Top(top)) => {
            cgmetric::report::top(top).map_err(|e| format!("cgmetric top: {e}"))
        }
        Some(Report::Billing(billing)) => {
            cgmetric::billing::billing(billing).map_err(|e| format!("cgmetric billing: {e}"))
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

/// glibc gives threads their own malloc arenas (up to 8 per CPU), and each
/// keeps what it freed: the threads that sampled aggregates, then spawned
/// for each read, grew the daemon's RSS by a quarter over 10,000 containers
/// of churn (the churn test). One arena keeps the footprint flat; the threads allocate little.
/// A fixed mmap threshold keeps big transient buffers (an aggregate file's
/// rendering) out of the heap: glibc's sliding threshold otherwise moves
/// them into it, where they fragment what stays.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator tunables; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
