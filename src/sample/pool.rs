//! Long-lived helper threads that take a share of an aggregate read, and
//! the work they share.
//!
//! Not a thread per read: the scheduler places a new thread on its parent's
//! CPU (`sched_wakeup_new` balances late), so the two halves of a sample
//! would run one after the other. A helper that sleeps on a channel is
//! placed when it is woken, on an idle CPU when there is one; when there is
//! none, [`Chunks`] lets the reading thread do the work itself rather than
//! wait for it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// Helper threads, started on first use; they end when this is dropped.
#[derive(Default)]
pub struct Helpers {
    queues: Mutex<Vec<Sender<Job>>>,
}

impl Helpers {
    /// Queues `job` for helper `index`, starting helpers up to it if need
    /// be. A job that panics, or finds no helper (one could not be started),
    /// is dropped: whatever it captured, a result channel say, sees that.
    pub fn submit(&self, index: usize, job: impl FnOnce() + Send + 'static) {
        let mut queues = self.queues.lock();
        while queues.len() <= index {
            match start(queues.len()) {
                Some(queue) => queues.push(queue),
                None => return,
            }
        }
        let _ = queues[index].send(Box::new(job));
    }

    /// How many helpers are running.
    pub fn started(&self) -> usize {
        self.queues.lock().len()
    }
}

/// Items handed out a chunk at a time to whichever thread asks next.
pub struct Chunks<T> {
    items: Vec<T>,
    size: usize,
    next: AtomicUsize,
}

impl<T> Chunks<T> {
    pub fn new(items: Vec<T>, size: usize) -> Chunks<T> {
        Chunks {
            items,
            size: size.max(1),
            next: AtomicUsize::new(0),
        }
    }

    pub fn count(&self) -> usize {
        self.items.len().div_ceil(self.size)
    }

    /// The items of chunk `index`.
    pub fn get(&self, index: usize) -> &[T] {
        let start = (index * self.size).min(self.items.len());
        &self.items[start..(start + self.size).min(self.items.len())]
    }

    /// Takes chunks until none is left, giving each to `work` with its
    /// index; returns how many this caller took.
    pub fn take_all(&self, mut work: impl FnMut(usize, &[T])) -> usize {
        let mut taken = 0;
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.count() {
                return taken;
            }
            work(index, self.get(index));
            taken += 1;
        }
    }
}

/// The CPUs the daemon may run on, as it started (`None` if unknown), and
/// how many threads can run at once (`available_parallelism`, which also
/// heeds a CPU quota and reads cgroup files, hence kept).
static DAEMON_CPUS: OnceLock<(Option<libc::cpu_set_t>, usize)> = OnceLock::new();

/// The daemon's CPUs, taken on first use. The daemon takes them at startup
/// (`remember_daemon_cpus`), before any thread is bound to one: FUSE over
/// io_uring binds each serving thread to its CPU, and a thread inherits its
/// creator's CPUs. A helper started from a request would share the reading
/// thread's CPU, and a count taken there would say one CPU, leaving an
/// aggregate read to one thread.
fn daemon_cpus() -> &'static (Option<libc::cpu_set_t>, usize) {
    DAEMON_CPUS.get_or_init(|| {
        // SAFETY: a zeroed cpu_set_t is valid.
        let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: writes only `cpus`, for the calling thread.
        let known =
            unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut cpus) } == 0;
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        (known.then_some(cpus), parallelism)
    })
}

/// Takes the daemon's CPUs now, while the calling thread still has them all.
pub fn remember_daemon_cpus() {
    daemon_cpus();
}

/// How many threads of the daemon can run at once.
pub fn daemon_parallelism() -> usize {
    daemon_cpus().1
}

/// Starts a thread that may run on every CPU the daemon may, whichever
/// thread starts it.
pub fn spawn<T: Send + 'static>(
    name: String,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name).spawn(move || {
        if let (Some(cpus), _) = daemon_cpus() {
            // SAFETY: sets this thread's CPUs from a valid set. A failure
            // leaves the inherited ones, which still work.
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), cpus) };
        }
        work()
    })
}

fn start(index: usize) -> Option<Sender<Job>> {
    let (queue, jobs) = mpsc::channel::<Job>();
    spawn(format!("sample-helper-{index}"), move || {
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

    use std::sync::Arc;

    #[test]
    fn jobs_run_and_helpers_are_reused() {
        let helpers = Helpers::default();
        let (done, results) = mpsc::channel();
        for i in 0..8 {
            let done = done.clone();
            helpers.submit(i % 2, move || done.send(i * 10).unwrap());
        }
        drop(done);
        let mut results: Vec<usize> = results.iter().collect();
        results.sort();
        assert_eq!(results, [0, 10, 20, 30, 40, 50, 60, 70]);
        assert_eq!(helpers.started(), 2);
    }

    #[test]
    fn a_panicking_job_is_dropped_and_the_helper_survives() {
        let helpers = Helpers::default();
        let (done, result) = mpsc::channel::<u32>();
        helpers.submit(0, move || {
            let _keep = done;
            panic!("bad job")
        });
        assert!(result.recv().is_err());
        let (done, result) = mpsc::channel();
        helpers.submit(0, move || done.send(7).unwrap());
        assert_eq!(result.recv().unwrap(), 7);
        assert_eq!(helpers.started(), 1);
    }

    #[test]
    fn chunks_are_each_taken_once_by_whoever_asks() {
        let chunks = Arc::new(Chunks::new((0..100).collect::<Vec<u32>>(), 16));
        assert_eq!(chunks.count(), 7);
        assert_eq!(chunks.get(6), [96, 97, 98, 99]);
        let other = Arc::clone(&chunks);
        let helper = std::thread::spawn(move || {
            let mut seen = Vec::new();
            other.take_all(|i, items| seen.push((i, items.to_vec())));
            seen
        });
        let mut seen = Vec::new();
        let mine = chunks.take_all(|i, items| seen.push((i, items.to_vec())));
        let theirs = helper.join().unwrap();
        assert_eq!(mine + theirs.len(), 7);
        seen.extend(theirs);
        seen.sort();
        let items: Vec<u32> = seen.into_iter().flat_map(|(_, items)| items).collect();
        assert_eq!(items, (0..100).collect::<Vec<u32>>());
        assert_eq!(chunks.take_all(|_, _| unreachable!()), 0);
        assert!(Chunks::<u32>::new(Vec::new(), 16).get(0).is_empty());
    }
}
