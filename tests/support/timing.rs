//! When tests act: polling until something holds, taking turns on a small
//! machine, holding process spawns off in-flight reads, and picking random
//! moments reproducibly.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Polls `check` until it holds, at most `timeout`.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// Tests that burn CPU or push traffic take turns: on a 2-core machine a
/// busy loop starves a transfer (loopback drops, TCP retransmits) and a
/// transfer steals a busy loop's core.
static HEAVY_TURN: Mutex<()> = Mutex::new(());

pub fn heavy_turn() -> MutexGuard<'static, ()> {
    HEAVY_TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// `pre_exec` makes std fork() instead of vfork(). A fork while another
/// thread's direct-I/O read is in flight can land the data in the page the
/// child now owns (the read's buffer was pinned without FOLL_PIN: kernels
/// before the fuse switch to pinned pages; seen on 6.1): the reader sees its
/// buffer's previous bytes with the new length. Tests that read from many
/// threads hold [`reading`] around each read; spawning waits for them.
static FORKING: RwLock<()> = RwLock::new(());

pub fn reading() -> RwLockReadGuard<'static, ()> {
    FORKING.read().unwrap_or_else(|e| e.into_inner())
}

/// Held while a test process is spawned (see [`FORKING`]).
pub(super) fn forking() -> RwLockWriteGuard<'static, ()> {
    FORKING.write().unwrap_or_else(|e| e.into_inner())
}

/// A small deterministic generator for tests that pick random moments. The
/// seed comes from CGMETRIC_TEST_SEED or the clock; failures print it.
pub struct Rng {
    pub seed: u64,
    state: u64,
}

impl Rng {
    pub fn seeded(test: &str) -> Rng {
        let seed = std::env::var("CGMETRIC_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{test}: CGMETRIC_TEST_SEED={seed}");
        Rng {
            seed,
            state: seed | 1,
        }
    }

    /// A number below `bound` (xorshift64*).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    }
}
