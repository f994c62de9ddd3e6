//! Overload: 64 parallel readers for 60 s, and a reader that opens files and
//! never closes them. Every read must succeed, latency and the daemon's CPU
//! time per read stay bounded (both are reported), and the hoarder costs the
//! daemon no descriptors.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{cpu_time, fd_targets, heavy_turn, rss_kib, Cgroup, Daemon, Rng};

const READERS: usize = 64;
const DURATION: Duration = Duration::from_secs(60);
const CONTAINERS: usize = 16;
/// The most cgroup files one container has (hybrid: v1's 15 and the v2
/// tree's 3 pressure files).
const FILES_PER_CONTAINER: usize = 18;
/// Files the hoarder holds open at once.
const HOARD: usize = 4000;
const FILES: [&str; 6] = [
    "pids_current",
    "memory_usage",
    "memory_rss",
    "cpu_usage_usec",
    "cpu_throttled_usec",
    "name",
];

/// Descriptors of the process on cgroup files whose path holds `part`.
fn cgroup_fds(pid: u32, part: &str) -> usize {
    fd_targets(pid)
        .iter()
        .map(|t| t.to_string_lossy())
        .filter(|t| t.starts_with("/sys/fs/cgroup/") && t.contains(part))
        .count()
}

/// Descriptors of the process on anything but cgroup files.
fn other_fds(pid: u32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|t| !t.to_string_lossy().starts_with("/sys/fs/cgroup/"))
        .count()
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of one open/read/close of `path` by this thread, over many.
fn raw_read_cpu(path: &std::path::Path) -> Duration {
    const READS: u32 = 2000;
    let began = thread_cpu();
    for _ in 0..READS {
        std::fs::read(path).unwrap();
    }
    (thread_cpu() - began) / READS
}

/// CPU time, both sides together, of one wake-up round trip between two
/// threads over sockets: what every FUSE request costs at least (the reader
/// sleeps, a daemon thread wakes, replies and wakes the reader).
fn round_trip_cpu() -> Duration {
    use std::io::Write;
    const TRIPS: u32 = 2000;
    let (mut ping_rx, mut ping_tx) = std::os::unix::net::UnixStream::pair().unwrap();
    let (mut pong_rx, mut pong_tx) = std::os::unix::net::UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let began = thread_cpu();
        let mut byte = [0u8];
        for _ in 0..TRIPS {
            ping_rx.read_exact(&mut byte).unwrap();
            pong_tx.write_all(&byte).unwrap();
        }
        thread_cpu() - began
    });
    let began = thread_cpu();
    let mut byte = [0u8];
    for _ in 0..TRIPS {
        ping_tx.write_all(&byte).unwrap();
        pong_rx.read_exact(&mut byte).unwrap();
    }
    (thread_cpu() - began + echo.join().unwrap()) / TRIPS
}

/// Lets this process hold the hoard: the soft descriptor limit up to the
/// hard one.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: valid rlimit pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    limit.rlim_cur
}

#[test]
fn sixty_four_readers_for_a_minute_and_a_hoarder() {
    require!();
    let _turn = heavy_turn();
    let mut rng = Rng::seeded("sixty_four_readers_for_a_minute_and_a_hoarder");
    let parent = Cgroup::parent("overload");
    let mut boxes: Vec<Cgroup> = (0..CONTAINERS)
        .map(|i| parent.child(&format!("box{i}")))
        .collect();
    for b in &mut boxes {
        b.spawn(std::process::Command::new("sleep").arg("600"));
    }
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let pid = daemon.server_pid();
    let hoard_size = HOARD.min(raise_nofile() as usize / 2);
    let raw_cpu = raw_read_cpu(&boxes[0].dir(Controller::Pids).join("pids.current"));
    // What a read cannot cost less than: the cgroupfs read behind it and a
    // wake-up round trip for each of its FUSE requests (open, read, the read
    // that finds the end, release).
    let floor_cpu = raw_cpu + 4 * round_trip_cpu();

    // The daemon keeps cgroup files open (--open-files), as many as the
    // containers it has read, other tests' included. Every other descriptor
    // must stay as it is, whatever the readers and the hoarder do, once the
    // first aggregate read has loaded the cgroup walk (its program, maps
    // and links).
    let _ = daemon.read("metric");
    let (fds_before, rss_before, cpu_before) = (other_fds(pid), rss_kib(pid), cpu_time(pid));
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (latencies, failures, hoard) = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let (stop, daemon) = (&stop, &daemon);
                let mut seed = rng.below(u64::MAX) | 1;
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    let mut failures = Vec::new();
                    let mut buf = Vec::with_capacity(64 << 10);
                    while !stop.load(Ordering::Relaxed) {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        // One reader in eight scrapes the aggregate now and then.
                        let relative = if r % 8 == 0 && seed.is_multiple_of(16) {
                            "metrics.prom".to_string()
                        } else {
                            let container = seed as usize % CONTAINERS;
                            let file = FILES[(seed >> 8) as usize % FILES.len()];
                            format!("box{container}/{file}")
                        };
                        let path = daemon.path(&relative);
                        let _reading = crate::support::reading();
                        let began = Instant::now();
                        buf.clear();
                        let result =
                            std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut buf));
                        latencies.push(began.elapsed().as_micros() as u32);
                        match result {
                            Ok(n) if n > 0 && buf.ends_with(b"\n") => {}
                            Ok(_) => failures
                                .push(format!("{relative}: {:?}", String::from_utf8_lossy(&buf))),
                            Err(e) => failures.push(format!("{relative}: {e}")),
                        }
                    }
                    (latencies, failures)
                })
            })
            .collect();
        // The hoarder: opens and never closes, until the test ends.
        let hoarder = scope.spawn(|| {
            let mut held = Vec::new();
            for i in 0..hoard_size {
                let path =
                    daemon.path(&format!("box{}/{}", i % CONTAINERS, FILES[i % FILES.len()]));
                match std::fs::File::open(&path) {
                    Ok(f) => held.push(f),
                    Err(e) => panic!("hoarder's open {i}: {e}"),
                }
            }
            held
        });
        let hoard = hoarder.join().unwrap();
        std::thread::sleep(DURATION.saturating_sub(started.elapsed()));
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        for reader in readers {
            let (l, f) = reader.join().unwrap();
            latencies.extend(l);
            failures.extend(f);
        }
        (latencies, failures, hoard)
    });
    let elapsed = started.elapsed();
    let (fds_during, rss_during, cpu) = (other_fds(pid), rss_kib(pid), cpu_time(pid) - cpu_before);
    let (kept, kept_boxes) = (cgroup_fds(pid, "/"), cgroup_fds(pid, &parent.relative));
    // Every held handle still reads its snapshot.
    for mut f in hoard.iter().take(100) {
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
    }
    drop(hoard);

    assert!(
        failures.is_empty(),
        "{} failed reads, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut sorted = latencies.clone();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let reads = sorted.len() as u64;
    let cpu_per_read = cpu / reads.max(1) as u32;
    let cpu_ratio = cpu_per_read.as_secs_f64() / floor_cpu.as_secs_f64();
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "overload: {reads} reads by {READERS} readers in {:.0} s ({:.0}/s); latency p50 {} µs, \
         p99 {} µs, max {} µs; daemon CPU {:.1} s ({:.1} µs a read, {cpu_ratio:.2}× the floor of \
         {:.1} µs: a raw cgroupfs read and 4 wake-up round trips; {:.0}% of a core); \
         hoarder held {hoard_size} files: daemon fds other than cgroup files {fds_before} -> {fds_during}, cgroup files kept {kept} ({kept_boxes} of the {CONTAINERS} boxes), RSS {rss_before} -> {rss_during} KiB",
        elapsed.as_secs_f64(),
        reads as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        sorted.last().unwrap(),
        cpu.as_secs_f64(),
        cpu_per_read.as_secs_f64() * 1e6,
        floor_cpu.as_secs_f64() * 1e6,
        cpu.as_secs_f64() * 100.0 / elapsed.as_secs_f64(),
    );
    assert!(reads > 10_000, "only {reads} reads in a minute");
    // Bounds with room for a loaded CI machine or an emulated VM: 64 readers
    // queue on two CPUs, so a read waits for the others' turns.
    assert!(at(0.99) < 1_000_000, "p99 {} µs", at(0.99));
    // Measured: 0.4× on this 2-CPU host; 5.7× and 8.2× in the 6.1 and 6.12
    // guests under qemu's TCG (against a pipe round trip, cheaper than this
    // socket one). There 64 readers and the daemon's threads contend for
    // two emulated CPUs, and a context switch costs far more than the
    // floor's round trip shows.
    assert!(
        cpu_ratio < 16.0,
        "daemon CPU a read is {cpu_ratio:.1}× the floor"
    );
    assert_eq!(fds_during, fds_before, "the daemon's descriptors");
    assert!(
        kept <= cgmetric::cli::DEFAULT_OPEN_FILES,
        "{kept} cgroup files kept"
    );
    assert!(
        kept_boxes <= CONTAINERS * FILES_PER_CONTAINER,
        "{kept_boxes} cgroup files kept for {CONTAINERS} containers"
    );
    // Snapshots live from open to release; the kernel must let releases
    // through as fast as opens (see MAX_BACKGROUND in src/fs/fuse.rs: with
    // the kernel's default this grew 78 MiB in this minute).
    assert!(
        rss_during < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_during} KiB"
    );
}
