//! An aggregate read's samples, shared with the helper threads of
//! [`super::pool`]: reading cgroup files is all syscalls, so spread over
//! the CPUs it takes a fraction of the time.

use std::sync::{mpsc, Arc};

use super::pool::{daemon_parallelism, Chunks, Helpers};
use super::Sampler;
use crate::containers::registry::Metered;
use crate::metrics::Sample;

/// Below this many containers per CPU, an aggregate is sampled on one thread.
const CONTAINERS_PER_THREAD: usize = 32;

/// Containers a sampling thread takes at a time: about 0.3 ms of work.
const CHUNK: usize = 16;

/// A sample of each of `containers`, spread over the helper threads when
/// there are enough of them to pay for the hand-over; containers that vanish
/// meanwhile are left out.
pub fn sample_all(
    sampler: &Arc<Sampler>,
    pool: &Helpers,
    containers: Vec<Arc<Metered>>,
) -> Vec<(Arc<Metered>, Sample)> {
    // Handing work over costs a wake-up, so small sets stay on this thread.
    let helpers = daemon_parallelism()
        .min(containers.len() / CONTAINERS_PER_THREAD)
        .max(1)
        - 1;
    // One walk and one snapshot for all, shared read-only by every thread.
    let pass = Arc::new(sampler.begin_pass(containers.len()));
    if helpers == 0 {
        return sampler.sample_each(&containers, &pass);
    }
    // Chunks taken in turn rather than halves: a helper the scheduler
    // starts late takes fewer, and this thread never waits for one that
    // has not begun.
    let work = Arc::new(Chunks::new(containers, CHUNK));
    let (done, finished) = mpsc::channel();
    for helper in 0..helpers {
        let (sampler, work, done) = (Arc::clone(sampler), Arc::clone(&work), done.clone());
        let pass = Arc::clone(&pass);
        pool.submit(helper, move || {
            work.take_all(|chunk, part| {
                let _ = done.send((chunk, sampler.sample_each(part, &pass)));
            });
        });
    }
    drop(done);
    let mut parts: Vec<Option<_>> = (0..work.count()).map(|_| None).collect();
    let mine = work.take_all(|chunk, part| parts[chunk] = Some(sampler.sample_each(part, &pass)));
    for _ in mine..work.count() {
        // Disconnected: a helper panicked; its chunk is done below.
        let Ok((chunk, samples)) = finished.recv() else {
            break;
        };
        parts[chunk] = Some(samples);
    }
    parts
        .into_iter()
        .enumerate()
        .flat_map(|(chunk, part)| {
            part.unwrap_or_else(|| sampler.sample_each(work.get(chunk), &pass))
        })
        .collect()
}
