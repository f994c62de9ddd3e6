//! Long-lived helper threads that take a share of an aggregate read.
//!
//! A thread spawned for each read started on its parent's CPU nearly every
//! time (22 of 23 spawns on a 2-CPU VM, `perf record -e
//! sched:sched_wakeup_new`), so the two halves of a sample ran one after the
//! other and an aggregate read took either 3.2 or 5 ms. A helper that sleeps
//! on a channel is placed when it is woken, on an idle CPU when there is one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// Helper threads, started on first use; they end when this is dropped.
#[derive(Default)]
pub struct Helpers {
    queues: Mutex<Vec<Sender<Job>>>,
}

impl Helpers {
    /// Runs `job` on helper `index`, starting helpers up to it if need be.
    /// The result comes through the receiver; it reports a disconnection
    /// instead when the job panicked or no helper could be started, and the
    /// caller then does the work itself.
    pub fn run<T: Send + 'static>(
        &self,
        index: usize,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Receiver<T> {
        let (result, receiver) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = result.send(job());
        });
        let mut queues = self.queues.lock();
        while queues.len() <= index {
            match start(queues.len()) {
                Some(queue) => queues.push(queue),
                // Dropping the job drops its result sender.
                None => return receiver,
            }
        }
        let _ = queues[index].send(job);
        receiver
    }

    /// How many helpers are running.
    pub fn started(&self) -> usize {
        self.queues.lock().len()
    }
}

fn start(index: usize) -> Option<Sender<Job>> {
    let (queue, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(format!("sample-helper-{index}"))
        .spawn(move || {
            for job in jobs {
                // A panicking job drops its result sender, which its caller
                // sees; the helper goes on serving.
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
        })
        .inspect_err(|e| log::warn!("cannot start a sampling helper thread: {e}"))
        .ok()?;
    Some(queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_and_helpers_are_reused() {
        let helpers = Helpers::default();
        let pending: Vec<_> = (0..8).map(|i| helpers.run(i % 2, move || i * 10)).collect();
        let results: Vec<usize> = pending.into_iter().map(|r| r.recv().unwrap()).collect();
        assert_eq!(results, [0, 10, 20, 30, 40, 50, 60, 70]);
        assert_eq!(helpers.started(), 2);
    }

    #[test]
    fn a_panicking_job_disconnects_and_the_helper_survives() {
        let helpers = Helpers::default();
        let failed = helpers.run(0, || -> u32 { panic!("bad job") });
        assert!(failed.recv().is_err());
        assert_eq!(helpers.run(0, || 7).recv().unwrap(), 7);
        assert_eq!(helpers.started(), 1);
    }
}
