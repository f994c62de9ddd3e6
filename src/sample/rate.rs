//! Rates of counters (CPU time now, network bytes later) over a window,
//! measured only while somebody reads them.
//!
//! The first rate read starts a sampler thread that records every tracked
//! counter each half window; a read computes the rate against the newest
//! sample at least one window old, so it averages over one to one and a half
//! windows. When no sample is old enough yet (the first read after a quiet
//! period), the read waits for the window to pass. With no rate read for
//! [`IDLE_TIMEOUT`], the sampler stops and forgets: an idle daemon does no
//! work per container.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long the sampler keeps running after the last rate read.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Reads every counter the tracker should follow: `(key, value)` pairs.
pub type ReadCounters<K> = Box<dyn Fn() -> Vec<(K, u64)> + Send + Sync>;

pub struct RateTracker<K> {
    window: Duration,
    idle_timeout: Duration,
    read: ReadCounters<K>,
    state: Mutex<State<K>>,
}

struct State<K> {
    series: HashMap<K, VecDeque<(Instant, u64)>>,
    last_read: Instant,
    sampling: bool,
}

/// What a read can compute against.
enum Reference {
    Ready(Instant, u64),
    WaitUntil(Instant),
    NoSample,
}

impl<K: Copy + Eq + Hash + Send + 'static> RateTracker<K> {
    pub fn new(window: Duration, read: ReadCounters<K>) -> Arc<Self> {
        Self::with_idle_timeout(window, IDLE_TIMEOUT, read)
    }

    pub fn with_idle_timeout(
        window: Duration,
        idle_timeout: Duration,
        read: ReadCounters<K>,
    ) -> Arc<Self> {
        Arc::new(RateTracker {
            window,
            idle_timeout,
            read,
            state: Mutex::new(State {
                series: HashMap::new(),
                last_read: Instant::now(),
                sampling: false,
            }),
        })
    }

    /// The counter's increase per second over the last window. `read_now`
    /// reads its current value; `None` from it (the source vanished) is
    /// passed on. Its argument says whether the value must be read anew:
    /// `false` lets the caller pass one it read moments ago (the same
    /// sample's), `true` comes after this read waited or sampled, when such
    /// a value would be stale.
    pub fn per_second(
        self: &Arc<Self>,
        key: K,
        mut read_now: impl FnMut(bool) -> Option<u64>,
    ) -> Option<f64> {
        let mut stale = self.wake();
        loop {
            match self.reference(key) {
                Reference::Ready(then, old) => {
                    let value = read_now(stale)?;
                    let elapsed = then.elapsed().as_secs_f64();
                    return Some(value.saturating_sub(old) as f64 / elapsed);
                }
                Reference::WaitUntil(deadline) => {
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    stale = true;
                }
                Reference::NoSample => {
                    let value = read_now(stale)?;
                    self.record(key, Instant::now(), value);
                }
            }
        }
    }

    /// Notes a read; starts the sampler if it is not running, taking its
    /// first sample here so every counter has one before any read waits.
    /// True when it sampled.
    fn wake(self: &Arc<Self>) -> bool {
        let mut state = self.state.lock();
        state.last_read = Instant::now();
        if state.sampling {
            return false;
        }
        state.sampling = true;
        drop(state);
        self.sample_all();
        let tracker = Arc::clone(self);
        crate::sample::pool::spawn("rate-sampler".into(), move || tracker.run_sampler())
            .expect("spawning the rate sampler thread");
        true
    }

    fn run_sampler(&self) {
        loop {
            std::thread::sleep(self.window / 2);
            {
                let mut state = self.state.lock();
                if state.last_read.elapsed() > self.idle_timeout {
                    state.series.clear();
                    state.sampling = false;
                    return;
                }
            }
            self.sample_all();
        }
    }

    fn sample_all(&self) {
        let samples = (self.read)();
        let now = Instant::now();
        let mut state = self.state.lock();
        for (key, value) in samples {
            push(
                state.series.entry(key).or_default(),
                self.window,
                now,
                value,
            );
        }
        // Series nobody sampled for a while belong to vanished sources.
        let stale = 3 * self.window;
        state.series.retain(|_, s| {
            s.back()
                .is_some_and(|(t, _)| now.duration_since(*t) < stale)
        });
    }

    fn record(&self, key: K, at: Instant, value: u64) {
        let mut state = self.state.lock();
        push(state.series.entry(key).or_default(), self.window, at, value);
    }

    fn reference(&self, key: K) -> Reference {
        let state = self.state.lock();
        let Some(series) = state.series.get(&key) else {
            return Reference::NoSample;
        };
        let now = Instant::now();
        match series
            .iter()
            .rev()
            .find(|(t, _)| now.duration_since(*t) >= self.window)
        {
            Some(&(t, v)) => Reference::Ready(t, v),
            None => match series.front() {
                Some(&(t, _)) => Reference::WaitUntil(t + self.window),
                None => Reference::NoSample,
            },
        }
    }
}

/// Appends a sample, keeping only one sample older than a window.
fn push(series: &mut VecDeque<(Instant, u64)>, window: Duration, at: Instant, value: u64) {
    series.push_back((at, value));
    while series.len() >= 2 && at.duration_since(series[1].0) >= window {
        series.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A counter that grows 1000 per second of wall time.
    fn clock_counter(start: Instant) -> u64 {
        start.elapsed().as_millis() as u64
    }

    #[test]
    fn first_read_waits_one_window_then_reads_are_immediate() {
        let start = Instant::now();
        let samples = Arc::new(AtomicU64::new(0));
        let counted = samples.clone();
        let tracker = RateTracker::new(
            Duration::from_millis(200),
            Box::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                vec![(1u32, clock_counter(start))]
            }),
        );
        let t = Instant::now();
        let rate = tracker
            .per_second(1, |_| Some(clock_counter(start)))
            .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!((rate - 1000.0).abs() < 100.0, "{rate}");
        let t = Instant::now();
        let rate = tracker
            .per_second(1, |_| Some(clock_counter(start)))
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!((rate - 1000.0).abs() < 100.0, "{rate}");
        assert!(samples.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_value_held_from_before_a_wait_is_not_used() {
        let start = Instant::now();
        let tracker = RateTracker::new(
            Duration::from_millis(100),
            Box::new(move || vec![(1u32, clock_counter(start))]),
        );
        // The value the caller holds (0) is older than every sample: used
        // after the wait, it would make the rate 0.
        let held = |stale: bool| Some(if stale { clock_counter(start) } else { 0 });
        let mut asked = Vec::new();
        let rate = tracker.per_second(1, |stale| {
            asked.push(stale);
            held(stale)
        });
        // This read started the sampler and waited a window: each value it
        // asked for had to be read anew.
        assert_eq!(asked, [true]);
        assert!((rate.unwrap() - 1000.0).abs() < 150.0, "{rate:?}");
        // The sampler is running now: no wait, the held value is welcome.
        asked.clear();
        tracker.per_second(1, |stale| {
            asked.push(stale);
            held(stale)
        });
        assert_eq!(asked, [false]);
    }

    #[test]
    fn untracked_keys_sample_themselves() {
        let start = Instant::now();
        let tracker =
            RateTracker::new(Duration::from_millis(100), Box::new(Vec::<(u32, u64)>::new));
        let rate = tracker
            .per_second(7, |_| Some(clock_counter(start)))
            .unwrap();
        assert!((rate - 1000.0).abs() < 150.0, "{rate}");
    }

    #[test]
    fn vanished_source_is_none_and_resets_read_as_zero() {
        let tracker = RateTracker::new(
            Duration::from_millis(50),
            Box::new(|| vec![(1u32, 1000u64)]),
        );
        assert_eq!(tracker.per_second(2, |_| None), None);
        assert_eq!(tracker.per_second(1, |_| Some(10)), Some(0.0));
    }

    #[test]
    fn sampler_stops_when_nobody_reads() {
        let samples = Arc::new(AtomicU64::new(0));
        let counted = samples.clone();
        let tracker = RateTracker::with_idle_timeout(
            Duration::from_millis(20),
            Duration::from_millis(50),
            Box::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                vec![(1u32, 0u64)]
            }),
        );
        tracker.per_second(1, |_| Some(0));
        std::thread::sleep(Duration::from_millis(200));
        let after_idle = samples.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            samples.load(Ordering::Relaxed),
            after_idle,
            "sampler kept running"
        );
        assert!(!tracker.state.lock().sampling);
    }
}
