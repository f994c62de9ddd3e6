//! The command line: the contract that operators and the tests drive.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_MOUNTPOINT: &str = "/run/cgmetric";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cgmetric";

/// Per-container metrics (network, CPU, memory, I/O, processes) as a
/// procfs-style FUSE filesystem. Without a subcommand it runs the daemon in
/// the foreground; SIGTERM or SIGINT unmounts and exits.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cgmetric",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Options {
    #[command(subcommand)]
    pub report: Option<Report>,

    /// Where to mount the tree. The default is created when missing; any
    /// other mountpoint must exist.
    #[arg(default_value = DEFAULT_MOUNTPOINT)]
    pub mountpoint: PathBuf,

    /// Treat every cgroup whose path relative to the hierarchy roots matches
    /// GLOB as a container, named by its last path component (repeatable;
    /// `*` stays within one path component, `**` crosses them).
    #[arg(long = "cgroup", value_name = "GLOB")]
    pub cgroups: Vec<String>,

    /// Docker's data root (container names from containers/<id>/config.v2.json).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/docker")]
    pub docker_root: PathBuf,

    /// containerd's state directory (Kubernetes names from the OCI bundles).
    #[arg(long, value_name = "DIR", default_value = "/run/containerd")]
    pub containerd_state: PathBuf,

    /// The containers/storage root of Podman and CRI-O.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/containers/storage"
    )]
    pub containers_storage: PathBuf,

    /// Where cgroup filesystems are mounted.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Where the eBPF maps and links are pinned: the kernel keeps counting
    /// there while no daemon runs, and a restart picks them up.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/cgmetric")]
    pub bpf_dir: PathBuf,

    /// Durable state: the billing ledger (ledger.jsonl, one line per ended
    /// container incarnation) and the index of known containers, from
    /// which the next start records containers that ended while no daemon
    /// ran. Created when missing; must be writable.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// How long a container that ended stays under exited/<name>/ (and its
    /// final series in metrics.prom); 0 keeps none.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_keep)]
    pub keep_exited: Duration,

    /// The family names and labels of metrics.prom: cgmetric's own
    /// (`cgmetric_*`), or cAdvisor's for every value cAdvisor has (rules and
    /// dashboards written for cAdvisor and the kubelet work unchanged; the
    /// rest keep their `cgmetric_` names).
    #[arg(long, value_enum, value_name = "NAMES", default_value_t = PrometheusNames::Cgmetric)]
    pub prometheus_names: PrometheusNames,

    /// Split each container's traffic by the peer's address: NAME=CIDR[,CIDR...]
    /// (repeatable; IPv4 and IPv6; `+` may stand for `,`, as in a mount -o
    /// word). Each container then has net_bytes_tx_NAME and net_bytes_rx_NAME,
    /// plus `loopback` (127.0.0.0/8, ::1) and `external` (peers in no class);
    /// the classes sum to net_bytes_tx and net_bytes_rx. With none, the
    /// programs look no address up.
    #[arg(long = "net-class", value_name = "NAME=CIDR[,CIDR...]")]
    pub net_classes: Vec<crate::net::NetClass>,

    /// Run without eBPF: no network accounting (no net_* files), and every
    /// cgroup value read from cgroupfs (as with --no-cgroup-walk).
    #[arg(long)]
    pub no_ebpf: bool,

    /// Read every cgroup value from cgroupfs. By default `metric` and
    /// `metrics.prom` first walk each cgroup hierarchy once with an eBPF
    /// cgroup iterator (Linux 6.1+; v1 hierarchies 6.2+), which reads the
    /// memory, pids and CPU-limit counters of all containers at once, in
    /// place of a few files each.
    #[arg(long)]
    pub no_cgroup_walk: bool,

    /// Make each container's directory owned by the owner of its cgroup and
    /// readable by that owner only (delegated and rootless containers); the
    /// files about all containers become root's.
    #[arg(long)]
    pub private: bool,

    /// The window over which *_millicores and *_bps rates are measured (1s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_window)]
    pub window: Duration,

    /// How long a FUSE thread keeps polling for the next request before it
    /// sleeps (0 never spins). Catching a reader's next request this way saves
    /// waking an idle CPU; the default is 50us when two or more CPUs are online
    /// and 0 on one, where a spin only delays the reader.
    #[arg(long, value_name = "DURATION", value_parser = parse_spin)]
    pub fuse_spin: Option<Duration>,

    /// Serve FUSE over /dev/fuse only, even where the kernel offers io_uring
    /// (Linux 6.14+ with fuse.enable_uring=1). Over io_uring each request is
    /// served on the reader's own CPU, which saves a cross-CPU wake-up.
    /// io_uring is only taken with --no-supervise: the requests a ring holds
    /// when its server dies are never answered.
    #[arg(long)]
    pub no_fuse_uring: bool,

    /// Serve from this process instead of from a child that a supervisor
    /// replaces when it dies. Without the supervisor, a crash leaves the
    /// mount stale until the next start (and bind mounts of it inside
    /// containers stale until they are made again).
    #[arg(long)]
    pub no_supervise: bool,

    /// If a live cgmetric serves the mountpoint, take its connection over
    /// instead of refusing: an upgrade or restart in place, with no new
    /// mount, so bind mounts of the tree in containers stay live and readers
    /// wait instead of failing. Without a live cgmetric there, start as
    /// usual.
    #[arg(long, conflicts_with = "no_supervise")]
    pub takeover: bool,

    /// Internal: serve the FUSE connection on this inherited descriptor (the
    /// supervisor's child).
    #[arg(long, value_name = "FD", hide = true)]
    pub serve_fd: Option<i32>,

    /// Internal: with --serve-fd, the descriptor to write one byte to once
    /// serving.
    #[arg(long, value_name = "FD", hide = true, requires = "serve_fd")]
    pub ready_fd: Option<i32>,

    /// Internal: with --serve-fd, the connection was served before (no INIT
    /// to answer; requests the last server held are asked for again).
    #[arg(long, hide = true, requires = "serve_fd")]
    pub resume: bool,

    /// How many cgroup files may stay open between reads (0 keeps none).
    /// A kept file is read with one pread instead of open + read + close,
    /// about twice as fast, and pins about 5 KiB of kernel memory. Each
    /// container has up to 14 files on cgroup v2, 15 on v1 and 18 on a
    /// hybrid host; files beyond the limit are opened on every read.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_OPEN_FILES)]
    pub open_files: usize,
}

/// Enough for about 290 containers on a v2 host, 270 on a v1 one and 220
/// on a hybrid one, about 20 MiB of kernel memory at most.
pub const DEFAULT_OPEN_FILES: usize = 4096;

/// Whose family names and labels `metrics.prom` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrometheusNames {
    /// `cgmetric_*` families; labels `container`, `namespace`, `pod`,
    /// `name`, `id` (the runtime's), `image`, `runtime`.
    Cgmetric,
    /// cAdvisor's families where it has the value; labels `container`,
    /// `namespace`, `pod`, `name`, `id` (the cgroup path), `image`.
    Cadvisor,
}

/// Reports for people, read from a mounted tree (and the ledger).
#[derive(Debug, Clone, Subcommand)]
pub enum Report {
    /// A live table of every container, refreshed, sorted by a column.
    Top(TopOptions),
    /// Network egress and ingress per container name, in GB, and what they
    /// cost: every incarnation that ended in the period (the ledger), plus
    /// the running containers when the period reaches now.
    Billing(BillingOptions),
}

#[derive(Debug, Clone, Args)]
pub struct TopOptions {
    /// The mounted cgmetric tree.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_MOUNTPOINT)]
    pub mount: PathBuf,
    /// The column to sort by, largest first (names A to Z).
    #[arg(long, value_enum, default_value_t = SortBy::Cpu)]
    pub sort: SortBy,
    /// Time between refreshes.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_window)]
    pub interval: Duration,
    /// Print the table once and exit (for scripts).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    Name,
    Cpu,
    Memory,
    Tx,
    Rx,
    Connections,
    Pids,
}

#[derive(Debug, Clone, Args)]
pub struct BillingOptions {
    /// The mounted cgmetric tree, for the containers still running. Without
    /// a live one there, only the ledger is billed (with a warning).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_MOUNTPOINT)]
    pub mount: PathBuf,
    /// The daemon's --state-dir: the ledger of ended containers
    /// (ledger.jsonl and its rotated files) is read from there.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Bill incarnations that ended at or after TIME: RFC 3339
    /// (2026-11-01T00:00:00Z, 2026-11-01T01:00:00+01:00, 2026-11-01 for
    /// midnight UTC), a duration ago (24h, 7d, 1h30m), or now. Default: the
    /// ledger's beginning.
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<SystemTime>,
    /// Bill incarnations that ended before TIME (same forms as --since).
    /// Default: now, which also bills the running containers' counts so
    /// far; so does a TIME still to come.
    #[arg(long, value_name = "TIME", value_parser = parse_until)]
    pub until: Option<Until>,
    /// The price of one GB (10^9 bytes) of egress: PRICE for all traffic,
    /// or CLASS=PRICE[,CLASS=PRICE...] by destination class (--net-class;
    /// `external` is every peer in no class, and all traffic counted
    /// without classes). Classes without a price cost nothing.
    #[arg(long, value_name = "PRICE")]
    pub price_per_gb: crate::billing::Prices,
    /// Bill ingress at the same price too.
    #[arg(long)]
    pub include_ingress: bool,
    /// A table with a total, CSV, or JSON; all three give bytes exactly.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Where a billing period ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Now, whenever the report reads: running containers are billed too.
    Now,
    At(SystemTime),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

fn parse_since(text: &str) -> Result<SystemTime, String> {
    let now = SystemTime::now();
    match parse_time(text, now).map_err(|e| e.to_string())? {
        Until::Now => Ok(now),
        Until::At(time) => Ok(time),
    }
}

fn parse_until(text: &str) -> Result<Until, String> {
    parse_time(text, SystemTime::now()).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    /// Occurs when a --since or --until is none of the accepted forms.
    #[error(
        "{0:?} is not a time: give RFC 3339 (2026-11-01T00:00:00Z, \
         2026-11-01T01:00:00+01:00, 2026-11-01), a duration ago (24h, 7d) or now"
    )]
    Unrecognised(String),
    /// Occurs when a duration ago reaches before 1970.
    #[error("{0:?} ago is before 1970")]
    TooLongAgo(String),
}

/// A point in time as operators write one, relative to `now`: `now`, a
/// duration ago (`24h`, `7d`, humantime's units), or RFC 3339 with `Z` or
/// a numeric offset, a space allowed for the `T`, a date alone meaning its
/// midnight UTC (month boundaries are the usual bills).
pub fn parse_time(text: &str, now: SystemTime) -> Result<Until, TimeError> {
    let text = text.trim();
    if text == "now" {
        return Ok(Until::Now);
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        return now
            .checked_sub(ago)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .map(Until::At)
            .ok_or_else(|| TimeError::TooLongAgo(text.to_string()));
    }
    let unrecognised = || TimeError::Unrecognised(text.to_string());
    if !text.is_ascii() {
        return Err(unrecognised());
    }
    if text.len() == 10 {
        return humantime::parse_rfc3339(&format!("{text}T00:00:00Z"))
            .map(Until::At)
            .map_err(|_| unrecognised());
    }
    // humantime reads UTC only (`Z`, `+00:00` or nothing): another offset
    // is taken off and applied here.
    let (local, offset) = match text.len().checked_sub(6).map(|at| text.split_at(at)) {
        Some((local, offset))
            if local.len() > 10
                && (offset.starts_with('+') || offset.starts_with('-'))
                && offset.as_bytes()[3] == b':' =>
        {
            let number = |s: &str| s.parse::<u64>().ok().filter(|_| s.len() == 2);
            let (hours, minutes) = number(&offset[1..3])
                .zip(number(&offset[4..]))
                .filter(|(h, m)| *h < 24 && *m < 60)
                .ok_or_else(unrecognised)?;
            let seconds = Duration::from_secs(hours * 3600 + minutes * 60);
            (local, Some((offset.starts_with('+'), seconds)))
        }
        _ => (text, None),
    };
    let time = humantime::parse_rfc3339_weak(local).map_err(|_| unrecognised())?;
    let utc = match offset {
        // 01:00+01:00 is 00:00 UTC.
        Some((true, by)) => time.checked_sub(by),
        Some((false, by)) => time.checked_add(by),
        None => Some(time),
    };
    utc.map(Until::At).ok_or_else(unrecognised)
}

fn parse_window(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d >= Duration::from_millis(10) => Ok(d),
        Ok(_) => Err("the window must be at least 10ms".into()),
        Err(e) => Err(format!("{e} (examples: 1s, 500ms, 2m)")),
    }
}

fn parse_keep(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 5m, 30s, 1h, 0)"))
}

fn parse_spin(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d <= Duration::from_millis(10) => Ok(d),
        Ok(_) => Err("a spin longer than 10ms burns a CPU for nothing".into()),
        Err(e) => Err(format!("{e} (examples: 0, 20us, 100us)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = Options::try_parse_from(["cgmetric"]).unwrap();
        assert_eq!(o.mountpoint, PathBuf::from(DEFAULT_MOUNTPOINT));
        assert_eq!(o.window, Duration::from_secs(1));
        assert!(o.cgroups.is_empty());
        assert_eq!(o.bpf_dir, PathBuf::from("/sys/fs/bpf/cgmetric"));
        assert!(!o.no_ebpf);
        assert!(!o.no_cgroup_walk);
        assert_eq!(o.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(o.keep_exited, Duration::from_secs(300));
        let o = Options::try_parse_from(["cgmetric", "--keep-exited", "0", "--state-dir", "/s"])
            .unwrap();
        assert_eq!(o.keep_exited, Duration::ZERO);
        assert_eq!(o.state_dir, PathBuf::from("/s"));
        assert!(Options::try_parse_from(["cgmetric", "--keep-exited", "a while"]).is_err());
        assert_eq!(o.prometheus_names, PrometheusNames::Cgmetric);
    }

    #[test]
    fn prometheus_names() {
        let o = Options::try_parse_from(["cgmetric", "--prometheus-names", "cadvisor"]).unwrap();
        assert_eq!(o.prometheus_names, PrometheusNames::Cadvisor);
        let o = Options::try_parse_from(["cgmetric", "--prometheus-names", "cgmetric"]).unwrap();
        assert_eq!(o.prometheus_names, PrometheusNames::Cgmetric);
        assert!(Options::try_parse_from(["cgmetric", "--prometheus-names", "datadog"]).is_err());
    }

    #[test]
    fn repeatable_globs_and_windows() {
        let o = Options::try_parse_from([
            "cgmetric", "--cgroup", "a/*", "--cgroup", "b", "--window", "250ms", "/mnt",
        ])
        .unwrap();
        assert_eq!(o.cgroups, ["a/*", "b"]);
        assert_eq!(o.window, Duration::from_millis(250));
        assert_eq!(o.mountpoint, PathBuf::from("/mnt"));
        assert!(Options::try_parse_from(["cgmetric", "--window", "0s"]).is_err());
        assert!(Options::try_parse_from(["cgmetric", "--window", "soon"]).is_err());
    }

    #[test]
    fn fuse_spin() {
        let o = Options::try_parse_from(["cgmetric", "--fuse-spin", "20us"]).unwrap();
        assert_eq!(o.fuse_spin, Some(Duration::from_micros(20)));
        let o = Options::try_parse_from(["cgmetric", "--fuse-spin", "0"]).unwrap();
        assert_eq!(o.fuse_spin, Some(Duration::ZERO));
        assert_eq!(
            Options::try_parse_from(["cgmetric"]).unwrap().fuse_spin,
            None
        );
        assert!(Options::try_parse_from(["cgmetric", "--fuse-spin", "1s"]).is_err());
    }

    #[test]
    fn open_files() {
        let o = Options::try_parse_from(["cgmetric", "--open-files", "0"]).unwrap();
        assert_eq!(o.open_files, 0);
        let o = Options::try_parse_from(["cgmetric"]).unwrap();
        assert_eq!(o.open_files, DEFAULT_OPEN_FILES);
        assert!(Options::try_parse_from(["cgmetric", "--open-files", "-1"]).is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Options::command().debug_assert();
    }

    #[test]
    fn reports_are_subcommands() {
        let o = Options::try_parse_from(["cgmetric", "top", "--sort", "memory", "--once"]).unwrap();
        assert!(matches!(
            o.report,
            Some(Report::Top(TopOptions {
                sort: SortBy::Memory,
                once: true,
                ..
            }))
        ));
        let o = Options::try_parse_from([
            "cgmetric",
            "billing",
            "--price-per-gb",
            "0.09",
            "--format",
            "csv",
        ])
        .unwrap();
        assert!(matches!(
            o.report,
            Some(Report::Billing(BillingOptions {
                format: Format::Csv,
                ..
            }))
        ));
        assert!(
            Options::try_parse_from(["cgmetric", "billing"]).is_err(),
            "a price is required"
        );
        let o = Options::try_parse_from([
            "cgmetric",
            "billing",
            "--price-per-gb",
            "1",
            "--since",
            "2026-11-01",
            "--until",
            "now",
            "--state-dir",
            "/s",
            "--format",
            "json",
        ])
        .unwrap();
        let Some(Report::Billing(billing)) = o.report else {
            panic!("{o:?}")
        };
        assert_eq!(
            billing.since,
            Some(humantime::parse_rfc3339("2026-11-01T00:00:00Z").unwrap())
        );
        assert_eq!(billing.until, Some(Until::Now));
        assert_eq!(billing.state_dir, PathBuf::from("/s"));
        assert_eq!(billing.format, Format::Json);
        let o = Options::try_parse_from(["cgmetric", "billing", "--price-per-gb", "1"]).unwrap();
        let Some(Report::Billing(billing)) = o.report else {
            panic!("{o:?}")
        };
        assert_eq!(billing.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!((billing.since, billing.until), (None, None));
        let error = Options::try_parse_from([
            "cgmetric",
            "billing",
            "--price-per-gb",
            "1",
            "--since",
            "last tuesday",
        ])
        .unwrap_err();
        assert!(error.to_string().contains("RFC 3339"), "{error}");
        let o = Options::try_parse_from(["cgmetric", "/mnt"]).unwrap();
        assert!(o.report.is_none());
    }
}
