//! Rates of counters (CPU time, network bytes), computed from the reads
//! themselves: no thread samples anything between reads, so the cost of
//! rates grows with reads × containers and never with time alone.
//!
//! Every rate read records the counter's value. A read computes its rate
//! against the newest value recorded at least one window (`--window`) and
//! at most [`MAX_SPAN`] before it: a scraper that reads every 15 s gets
//! the rate over the 15 s since its previous scrape, a `cat` repeated every
//! half second the rate over the last one to one and a half windows. With
//! no such value (the first read, or the first after a quiet spell), the
//! read records one, waits one window and reads again: it answers over
//! exactly the window. An aggregate read (a scrape) waits only when cold,
//! once for all its containers ([`RateTracker::prime`]): the first since
//! the daemon started or after a quiet spell of [`MAX_SPAN`]. Once warm, a
//! container it has no reference for (one found since the previous scrape)
//! answers [`Rate::NotYet`] and has its rate on the next read: a scrape's
//! time never depends on how many containers came and went.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The longest interval a rate is averaged over. A value recorded longer
/// ago is history, not a reference: a reader who comes back after an hour
/// gets the rate now (over a window), not the hour's average.
pub const MAX_SPAN: Duration = Duration::from_secs(300);

/// Series kept before the table is swept of those older than [`MAX_SPAN`]
/// (containers that went, rates nobody reads any more).
const SWEEP_AT: usize = 4096;

/// What a rate read answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    /// Nothing to compute against yet, and the read may not wait for it.
    NotYet,
}

impl Rate {
    /// The rate, when there is one.
    pub fn value(self) -> Option<f64> {
        match self {
            Rate::PerSecond(rate) => Some(rate),
            Rate::NotYet => None,
        }
    }
}

/// What recording a value found.
enum Recorded {
    /// The value a rate is computed against: when, and what it was.
    Reference(Instant, u64),
    /// None yet; the oldest value held becomes one at this moment.
    ReadyAt(Instant),
}

pub struct RateTracker<K> {
    window: Duration,
    max_span: Duration,
    state: Mutex<State<K>>,
}

struct State<K> {
    series: HashMap<K, VecDeque<(Instant, u64)>>,
    /// The table's size after its last sweep: the next sweep comes when it
    /// has doubled, so sweeping is amortised over the records that grew it.
    swept: usize,
    /// When the last aggregate read began: the next one within `max_span`
    /// has references for all but newcomers.
    last_aggregate: Option<Instant>,
    /// When the last priming recorded its values: they are references from
    /// a window later, and an aggregate read before then waits for that.
    primed_at: Option<Instant>,
}

impl<K: Copy + Eq + Hash> RateTracker<K> {
    pub fn new(window: Duration) -> RateTracker<K> {
        Self::with_max_span(window, MAX_SPAN)
    }

    pub fn with_max_span(window: Duration, max_span: Duration) -> RateTracker<K> {
        RateTracker {
            window,
            max_span: max_span.max(window),
            state: Mutex::new(State {
                series: HashMap::new(),
                swept: 0,
                last_aggregate: None,
                primed_at: None,
            }),
        }
    }

    /// The counter's increase per second since its reference value (see the
    /// module's documentation). `read_now` reads its current value; `None`
    /// from it (the source vanished) is passed on. Its argument says whether
    /// the value must be read anew: `false` lets the caller pass one it read
    /// moments ago (the same sample's), `true` comes after this read waited,
    /// when such a value would be stale. With no reference, a read that
    /// `may_wait` waits one window; one that may not (a container of an
    /// aggregate found after [`RateTracker::prime`]) records its value and
    /// answers [`Rate::NotYet`], so an aggregate never waits once per
    /// container.
    pub fn per_second(
        &self,
        key: K,
        may_wait: bool,
        mut read_now: impl FnMut(bool) -> Option<u64>,
    ) -> Option<Rate> {
        let mut stale = false;
        loop {
            let value = read_now(stale)?;
            let now = Instant::now();
            match self.record(key, now, value) {
                Recorded::Reference(then, old) => {
                    let elapsed = now.duration_since(then).as_secs_f64();
                    return Some(Rate::PerSecond(value.saturating_sub(old) as f64 / elapsed));
                }
                Recorded::ReadyAt(_) if !may_wait => return Some(Rate::NotYet),
                Recorded::ReadyAt(ready) => {
                    std::thread::sleep(ready.saturating_duration_since(Instant::now()));
                    stale = true;
                }
            }
        }
    }

    /// Drops the series of every key `keep` refuses (sources that went):
    /// their values are no use to anybody now.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        let mut state = self.state.lock();
        state.series.retain(|key, _| keep(key));
        state.swept = state.series.len();
    }

    /// Whether `key` has a value a read now could compute against.
    pub fn ready(&self, key: K) -> bool {
        let now = Instant::now();
        let state = self.state.lock();
        state
            .series
            .get(&key)
            .is_some_and(|s| self.reference(s, now).is_some())
    }

    /// Called as an aggregate read begins: whether it is cold (no
    /// aggregate read in the last `max_span`) and should [`prime`] its
    /// rates. When warm, the counters it lacks references for are only
    /// newcomers': they answer [`Rate::NotYet`] rather than hold the whole
    /// read for a window (a scrape with a deadline, with containers coming
    /// and going, would time out). A warm read that comes while a cold one
    /// waits out its window waits for the rest of it, so that both answer
    /// with the same rates.
    ///
    /// [`prime`]: RateTracker::prime
    pub fn aggregate_begins(&self) -> bool {
        let now = Instant::now();
        let cold = {
            let mut state = self.state.lock();
            let cold = state
                .last_aggregate
                .is_none_or(|then| now.duration_since(then) > self.max_span);
            state.last_aggregate = Some(now);
            if cold {
                state.primed_at = Some(now);
            }
            cold
        };
        // The priming moves `primed_at` to when it recorded its values,
        // which may be later than when it began: look again after a wait.
        if !cold {
            loop {
                let ready = self.state.lock().primed_at.map(|at| at + self.window);
                match ready.map(|r| r.saturating_duration_since(Instant::now())) {
                    Some(wait) if !wait.is_zero() => std::thread::sleep(wait),
                    _ => break,
                }
            }
        }
        cold
    }

    /// Records `(key, value)` for every counter a cold aggregate read is
    /// about to need but has no reference for (`missing`, read by the
    /// caller), then waits one window, once: every rate of the read that
    /// follows is ready. Returns whether it waited.
    pub fn prime(&self, missing: Vec<(K, u64)>) -> bool {
        if missing.is_empty() {
            // Nothing to wait for, for this read or any beside it.
            self.state.lock().primed_at = None;
            return false;
        }
        let now = Instant::now();
        for (key, value) in missing {
            self.record(key, now, value);
        }
        self.state.lock().primed_at = Some(now);
        std::thread::sleep(self.window);
        true
    }

    /// Appends a value and returns the reference a read at `at` computes
    /// against, or when the oldest value held becomes one.
    fn record(&self, key: K, at: Instant, value: u64) -> Recorded {
        let mut state = self.state.lock();
        let series = state.series.entry(key).or_default();
        let reference = self.reference(series, at);
        series.push_back((at, value));
        // Keep the newest value older than a window (the next read's
        // reference) and everything after it; nothing older than the span.
        while series.len() >= 2 && at.duration_since(series[1].0) >= self.window {
            series.pop_front();
        }
        while series
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > self.max_span)
        {
            series.pop_front();
        }
        let recorded = match reference {
            Some((then, old)) => Recorded::Reference(then, old),
            None => Recorded::ReadyAt(series.front().map_or(at, |(t, _)| *t) + self.window),
        };
        if state.series.len() >= SWEEP_AT.max(2 * state.swept) {
            let span = self.max_span;
            state
                .series
                .retain(|_, s| s.back().is_some_and(|(t, _)| at.duration_since(*t) <= span));
            state.swept = state.series.len();
        }
        recorded
    }

    /// The newest value of `series` at least a window and at most the span
    /// before `at`.
    fn reference(&self, series: &VecDeque<(Instant, u64)>, at: Instant) -> Option<(Instant, u64)> {
        series
            .iter()
            .rev()
            .map(|&(t, v)| (at.saturating_duration_since(t), (t, v)))
            .find(|(age, _)| *age >= self.window)
            .filter(|(age, _)| *age <= self.max_span)
            .map(|(_, reference)| reference)
    }

    /// Series held now (for tests and the sweep's bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().series.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that may wait, as a number.
    fn rate_of<K: Copy + Eq + Hash>(
        tracker: &RateTracker<K>,
        key: K,
        read_now: impl FnMut(bool) -> Option<u64>,
    ) -> Option<f64> {
        tracker
            .per_second(key, true, read_now)
            .map(|r| r.value().expect("a read that may wait has a rate"))
    }

    /// A counter that grows 1000 per second of wall time.
    fn clock_counter(start: Instant) -> u64 {
        start.elapsed().as_millis() as u64
    }

    #[test]
    fn first_read_waits_one_window_then_reads_are_immediate() {
        let start = Instant::now();
        let tracker = RateTracker::new(Duration::from_millis(200));
        let t = Instant::now();
        let rate = rate_of(&tracker, 1u32, |_| Some(clock_counter(start))).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!((rate - 1000.0).abs() < 100.0, "{rate}");
        let t = Instant::now();
        let rate = rate_of(&tracker, 1, |_| Some(clock_counter(start))).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!((rate - 1000.0).abs() < 100.0, "{rate}");
    }

    #[test]
    fn a_rate_spans_the_interval_since_the_previous_read() {
        // A counter that jumps by 600 once: a scraper whose reads are 300 ms
        // apart sees 2000/s over the interval that holds the jump, then 0.
        let value = std::cell::Cell::new(0u64);
        let tracker = RateTracker::new(Duration::from_millis(100));
        rate_of(&tracker, 1u32, |_| Some(value.get())).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        value.set(600);
        let t = Instant::now();
        let rate = rate_of(&tracker, 1, |_| Some(value.get())).unwrap();
        assert!(t.elapsed() < Duration::from_millis(50), "no wait");
        assert!((1400.0..=2100.0).contains(&rate), "{rate}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rate_of(&tracker, 1, |_| Some(value.get())), Some(0.0));
    }

    #[test]
    fn a_value_older_than_the_span_is_not_a_reference() {
        let start = Instant::now();
        let tracker =
            RateTracker::with_max_span(Duration::from_millis(50), Duration::from_millis(150));
        rate_of(&tracker, 1u32, |_| Some(0)).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        // The first value (0) is too old: this read waits a window and
        // answers over it, not over the 250 ms.
        let t = Instant::now();
        let rate = rate_of(&tracker, 1, |_| Some(clock_counter(start))).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!((rate - 1000.0).abs() < 200.0, "{rate}");
    }

    #[test]
    fn a_value_held_from_before_a_wait_is_not_used() {
        let start = Instant::now();
        let tracker = RateTracker::new(Duration::from_millis(100));
        // The value the caller holds (0) is older than the wait: used after
        // it, it would make the rate negative (0).
        let mut asked = Vec::new();
        let rate = rate_of(&tracker, 1u32, |stale| {
            asked.push(stale);
            Some(if stale { clock_counter(start) } else { 0 })
        });
        assert_eq!(asked, [false, true]);
        assert!(rate.unwrap() > 0.0, "{rate:?}");
    }

    #[test]
    fn priming_waits_once_for_every_key() {
        let start = Instant::now();
        let tracker = RateTracker::new(Duration::from_millis(100));
        let keys: Vec<u32> = (0..50).collect();
        assert!(keys.iter().all(|k| !tracker.ready(*k)));
        let t = Instant::now();
        assert!(tracker.prime(keys.iter().map(|k| (*k, clock_counter(start))).collect()));
        assert!(t.elapsed() < Duration::from_millis(300), "one wait, not 50");
        assert!(keys.iter().all(|k| tracker.ready(*k)));
        let t = Instant::now();
        for k in &keys {
            let rate = rate_of(&tracker, *k, |_| Some(clock_counter(start))).unwrap();
            assert!((rate - 1000.0).abs() < 150.0, "{rate}");
        }
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert!(!tracker.prime(Vec::new()), "nothing missing, no wait");
    }

    #[test]
    fn a_warm_aggregate_never_waits_for_newcomers() {
        let tracker = RateTracker::new(Duration::from_millis(200));
        let start = Instant::now();
        assert!(tracker.aggregate_begins(), "the first is cold");
        assert!(tracker.prime(vec![(1, clock_counter(start))]));
        let t = Instant::now();
        assert!(!tracker.aggregate_begins(), "the next is warm");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "and does not wait"
        );
        // A newcomer answers on a later read, over a window.
        let rate = |key| tracker.per_second(key, false, |_| Some(clock_counter(start)));
        assert!(rate(1).unwrap().value().is_some());
        assert_eq!(rate(2), Some(Rate::NotYet));
    }

    #[test]
    fn an_aggregate_that_comes_during_a_priming_waits_for_its_references() {
        let window = Duration::from_millis(300);
        let tracker = std::sync::Arc::new(RateTracker::new(window));
        let start = Instant::now();
        assert!(tracker.aggregate_begins());
        let priming = {
            let tracker = tracker.clone();
            std::thread::spawn(move || tracker.prime(vec![(1u32, clock_counter(start))]))
        };
        std::thread::sleep(Duration::from_millis(50));
        // Warm, but the cold read's references are not ready: it waits for
        // them, and then has the rate.
        assert!(!tracker.aggregate_begins());
        assert!(start.elapsed() >= window);
        let rate = tracker.per_second(1, false, |_| Some(clock_counter(start)));
        assert!(rate.unwrap().value().is_some(), "{rate:?}");
        assert!(priming.join().unwrap());
    }

    #[test]
    fn an_aggregate_after_a_quiet_spell_is_cold_again() {
        let span = Duration::from_millis(300);
        let tracker: RateTracker<u32> =
            RateTracker::with_max_span(Duration::from_millis(100), span);
        assert!(tracker.aggregate_begins());
        assert!(!tracker.aggregate_begins());
        std::thread::sleep(span + Duration::from_millis(50));
        assert!(tracker.aggregate_begins(), "cold again");
    }

    #[test]
    fn a_read_that_may_not_wait_records_and_answers_not_yet() {
        let start = Instant::now();
        let tracker = RateTracker::new(Duration::from_millis(50));
        let t = Instant::now();
        let first = tracker.per_second(1u32, false, |_| Some(clock_counter(start)));
        assert_eq!(first, Some(Rate::NotYet));
        assert!(t.elapsed() < Duration::from_millis(40), "it did not wait");
        std::thread::sleep(Duration::from_millis(60));
        let rate = tracker
            .per_second(1, false, |_| Some(clock_counter(start)))
            .and_then(Rate::value)
            .unwrap();
        assert!((rate - 1000.0).abs() < 200.0, "{rate}");
    }

    #[test]
    fn series_of_sources_that_went_are_dropped() {
        let tracker = RateTracker::new(Duration::from_secs(1));
        let now = Instant::now();
        for key in 0..10u32 {
            tracker.record(key, now, 1);
        }
        tracker.retain(|key| key % 2 == 0);
        assert_eq!(tracker.len(), 5);
        assert!(tracker.state.lock().series.keys().all(|k| k % 2 == 0));
    }

    #[test]
    fn vanished_source_is_none_and_resets_read_as_zero() {
        let tracker = RateTracker::new(Duration::from_millis(50));
        assert_eq!(rate_of(&tracker, 2u32, |_| None), None);
        let mut values = [1000u64, 10].into_iter();
        assert_eq!(rate_of(&tracker, 1, |_| values.next()), Some(0.0));
    }

    #[test]
    fn nothing_happens_between_reads_and_old_series_are_swept() {
        let tracker =
            RateTracker::with_max_span(Duration::from_millis(10), Duration::from_millis(20));
        let now = Instant::now();
        for key in 0..SWEEP_AT as u32 - 1 {
            tracker.record(key, now, 1);
        }
        assert_eq!(tracker.len(), SWEEP_AT - 1);
        std::thread::sleep(Duration::from_millis(40));
        // Time alone changes nothing; the next record sweeps what is stale.
        assert_eq!(tracker.len(), SWEEP_AT - 1);
        tracker.record(u32::MAX, Instant::now(), 1);
        assert_eq!(tracker.len(), 1);
    }
}
