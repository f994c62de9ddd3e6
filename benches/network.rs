//! The cost of cgmetric's eBPF programs to the traffic they count.
//!
//! `cargo bench --bench network` (as root, with iperf3 installed) measures,
//! in one run, loopback TCP throughput (iperf3) and the TCP connect/close
//! rate with no programs, with the programs, and with the programs and
//! `--net-class` classes configured (every loopback packet then looked up
//! and counted under `loopback` too), rotating the three so that drift on a
//! shared machine hits all, and prints the ratios against no programs.
//! Absolute numbers vary between machines; the ratios are what carry over.
//! Then, from a second connect/close loop with the kernel's statistics on,
//! what each program costs a connection, in runs and nanoseconds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cgmetric::net::PROGRAMS;

const ROUNDS: usize = 5;
const IPERF_SECONDS: u32 = 3;
const CONNECT_SECONDS: f64 = 3.0;
/// The connect/close loop whose program run times are counted.
const STATS_SECONDS: f64 = 1.0;

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("network benchmark: needs root (it attaches eBPF programs)");
        std::process::exit(1);
    }
    let layout =
        cgmetric::cgroup::Layout::detect(Path::new("/sys/fs/cgroup")).expect("cgroup layout");
    let v2_root = layout.unified.expect("a cgroup v2 hierarchy to attach to");
    let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/cgmetric-bench-{}", std::process::id()));

    // Three classes, as an operator might split a cluster's traffic.
    let classes: Vec<cgmetric::net::NetClass> = [
        "pods=10.244.0.0/16",
        "services=10.96.0.0/12",
        "peered=172.16.0.0/12,fd00::/8",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    let configs = [
        None,
        Some(cgmetric::net::Classes::default()),
        Some(cgmetric::net::Classes::new(&classes).unwrap()),
    ];
    let names = [
        "loopback TCP throughput (iperf3, Gbit/s)",
        "TCP connect/close rate (per second)",
        "CPU per connection (µs; ratio: without/with)",
    ];
    // rows[metric][config]: one value a round.
    let mut rows = vec![vec![Vec::new(); configs.len()]; names.len()];
    // The kernel's own count of the programs' run time, per connection:
    // spent[config][program], one value a round. Unlike the rates, this
    // does not move with what else the machine runs. Counted in a loop of
    // its own: timing every run costs the runs two clock reads, which the
    // rates above must not pay.
    let mut spent = vec![vec![Vec::new(); PROGRAMS.len()]; configs.len()];
    for round in 0..ROUNDS {
        for (index, config) in configs.iter().enumerate() {
            let net = config.clone().map(|classes| {
                cgmetric::net::Net::start(&bpf_dir, &v2_root, classes).expect("attach")
            });
            rows[0][index].push(iperf3_gbps(5400 + round as u16));
            let (rate, _, cpu) = connect_close_rate(CONNECT_SECONDS);
            rows[1][index].push(rate);
            rows[2][index].push(cpu);
            if net.is_some() {
                let stats =
                    aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
                let before = program_stats(&bpf_dir);
                let (_, connections, _) = connect_close_rate(STATS_SECONDS);
                let after = program_stats(&bpf_dir);
                drop(stats);
                for (p, (b, a)) in before.iter().zip(&after).enumerate() {
                    spent[index][p].push(a.per(b, connections));
                }
            }
            drop(net);
            // Unpinning the links detaches the programs.
            let _ = std::fs::remove_dir_all(&bpf_dir);
        }
        eprintln!("round {}/{ROUNDS} done", round + 1);
    }

    println!(
        "\ncgmetric eBPF overhead, medians of {ROUNDS} rotating rounds; a ratio is the median of \
         each round's ratio to that round's run without programs\n"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>7} {:>10} {:>7} {:>8}",
        "", "without", "with", "ratio", "+classes", "ratio", "target"
    );
    // A cost (CPU) is compared the other way up, so that below 1 is worse
    // on every row.
    let rows_are_costs = [false, false, true];
    let targets = [Some(0.99), Some(0.98), None];
    let mut all_met = true;
    for (((name, values), target), cost) in names.iter().zip(&rows).zip(targets).zip(rows_are_costs)
    {
        let medians: Vec<f64> = values.iter().map(|v| median(v)).collect();
        // Paired within a round: drift between rounds on a shared machine
        // moves both sides of a pair alike.
        let paired = |config: usize| {
            let ratios: Vec<f64> = values[config]
                .iter()
                .zip(&values[0])
                .map(|(with, without)| match cost {
                    true => without / with,
                    false => with / without,
                })
                .collect();
            median(&ratios)
        };
        let (with, classes) = (paired(1), paired(2));
        let verdict = match target {
            Some(target) => {
                let met = with >= target && classes >= target;
                all_met &= met;
                format!("≥{target} {}", if met { "ok" } else { "MISS" })
            }
            None => String::new(),
        };
        println!(
            "{name:<44} {:>10.1} {:>10.1} {with:>7.3} {:>10.1} {classes:>7.3} {verdict:>8}",
            medians[0], medians[1], medians[2],
        );
    }
    println!("\nprogram time per connection (the kernel's run_time_ns and run_cnt over {STATS_SECONDS} s of connections, medians of {ROUNDS} rounds)\n");
    println!(
        "{:<20} {:>16} {:>16} {:>16}",
        "", "runs", "ns (with)", "ns (+classes)"
    );
    let mut totals = [0.0, 0.0];
    for (p, program) in PROGRAMS.iter().enumerate() {
        let with = &spent[1][p];
        let classes = &spent[2][p];
        let runs = median(&with.iter().map(|s| s.runs).collect::<Vec<_>>());
        let ns = [with, classes].map(|s| median(&s.iter().map(|s| s.ns).collect::<Vec<_>>()));
        totals[0] += ns[0];
        totals[1] += ns[1];
        println!("{program:<20} {runs:>16.1} {:>16.0} {:>16.0}", ns[0], ns[1]);
    }
    println!(
        "{:<20} {:>16} {:>16.0} {:>16.0}",
        "all", "", totals[0], totals[1]
    );
    println!(
        "(a connection without the programs took {:.1} µs in this run)",
        1e6 / median(&rows[1][0])
    );
    println!("\nmachine: {} CPUs, Linux {}", num_cpus(), kernel());
    if !all_met {
        println!(
            "(a target was missed in this run; on shared machines rerun to tell noise from cost)"
        );
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted[sorted.len() / 2]
}

/// Receiver-side throughput of one iperf3 run over loopback.
fn iperf3_gbps(port: u16) -> f64 {
    let port = port.to_string();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 is needed (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            &IPERF_SECONDS.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = server.wait();
    let json = String::from_utf8_lossy(&out.stdout);
    // "sum_received": { ... "bits_per_second": N ... }
    let received = json.split("\"sum_received\"").nth(1).expect("iperf3 JSON");
    let bps: f64 = received
        .split("\"bits_per_second\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.trim().parse().ok())
        .expect("bits_per_second");
    bps / 1e9
}

/// One program's counters as the kernel keeps them while stats are on.
#[derive(Clone, Copy)]
struct Stats {
    runs: f64,
    ns: f64,
}

impl Stats {
    /// Runs and nanoseconds per connection since `before`.
    fn per(&self, before: &Stats, connections: u64) -> Stats {
        let n = connections.max(1) as f64;
        Stats {
            runs: (self.runs - before.runs) / n,
            ns: (self.ns - before.ns) / n,
        }
    }
}

/// The run counts of the programs linked under `bpf_dir` (this run's, not
/// another daemon's programs of the same name).
fn program_stats(bpf_dir: &Path) -> Vec<Stats> {
    PROGRAMS
        .iter()
        .map(|name| {
            let pin = cgmetric::net::link_pin(bpf_dir, name);
            let link = aya::programs::links::PinnedLink::from_pin(&pin).expect("pinned link");
            let id = aya::programs::links::FdLink::from(link)
                .info()
                .expect("link info")
                .program_id();
            let info = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .expect("linked program");
            Stats {
                runs: info.run_count() as f64,
                ns: info.run_time().as_nanos() as f64,
            }
        })
        .collect()
}

/// Sequential connect, one byte each way, close: connections per second,
/// how many were made, and this process's CPU time per connection (µs).
fn connect_close_rate(seconds: f64) -> (f64, u64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            if stream.read_exact(&mut byte).is_err() || byte[0] == b'q' {
                break;
            }
            let _ = stream.write_all(&byte);
        }
    });
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let cpu = process_cpu() - cpu_before;
    let _ = TcpStream::connect(addr).and_then(|mut s| s.write_all(b"q"));
    let _ = server.join();
    (rate, count, cpu.as_secs_f64() * 1e6 / count.max(1) as f64)
}

/// CPU time of this process, user and system: on loopback, the softirq
/// work of a packet mostly runs in the sending thread and is charged to it.
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
