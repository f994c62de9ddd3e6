//! The metric catalogue: one table that drives lookup, readdir, reads and
//! every aggregate format (`metrics`, `metric`, `metrics.prom`).
//!
//! Adding a metric means adding one row here and filling it in the reader of
//! its [`Group`].

use std::fmt;

/// The source files one read fills: every metric of a group comes from the
/// same cgroup file(s), so reading a group costs one pass over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    CpuUsage,
    /// Derived: the rate of `CpuUsage` over the window.
    CpuRate,
    CpuThrottle,
    CpuLimit,
    /// Pressure stall information: the v2 tree's `*.pressure` files, on
    /// hybrid hosts too.
    CpuPressure,
    MemoryUsage,
    MemoryPeak,
    MemoryStat,
    MemorySwap,
    MemoryLimit,
    MemoryOom,
    MemoryEvents,
    MemoryPressure,
    Io,
    IoPressure,
    PidsCurrent,
    PidsLimit,
    /// eBPF: bytes and packets.
    NetTraffic,
    /// Derived: the rates of `NetTraffic` bytes over the window.
    NetRate,
    /// eBPF: TCP connection lifecycle.
    NetConn,
}

impl Group {
    /// Whether the group's values come from cgroup files (the others come
    /// from rates or eBPF maps).
    pub fn is_cgroupfs(self) -> bool {
        !matches!(
            self,
            Group::CpuRate | Group::NetTraffic | Group::NetRate | Group::NetConn
        )
    }

    /// Whether the group's values come from the eBPF maps (its rate
    /// included).
    pub fn reads_ebpf(self) -> bool {
        matches!(self, Group::NetTraffic | Group::NetRate | Group::NetConn)
    }
}

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromType {
    Counter,
    Gauge,
}

/// The factor between a file's unit and the Prometheus base unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    One,
    /// Thousandths (millicores to cores).
    Milli,
    /// Millionths (microseconds to seconds).
    Micro,
}

/// One row of the catalogue.
#[derive(Debug)]
pub struct MetricDef {
    pub id: MetricId,
    /// The file name in a container directory.
    pub file: &'static str,
    pub group: Group,
    pub kind: PromType,
    /// The Prometheus family name, without the `cgmetric_` prefix.
    pub prom: &'static str,
    pub scale: Scale,
    pub help: &'static str,
    /// The cAdvisor family with the same value, where cAdvisor has one:
    /// `--prometheus-names cadvisor` renders the row under it.
    pub cadvisor: Option<Cadvisor>,
}

/// How cAdvisor exposes a catalogue row: its family name and the labels it
/// adds. Its types and base units are the catalogue's own (cAdvisor's
/// counters are `_total` in seconds and bytes too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadvisor {
    pub family: &'static str,
    /// The labels cAdvisor gives the family besides the container's own,
    /// rendered (`cpu="total"`), or empty.
    pub labels: &'static str,
    /// What cAdvisor writes for a limit that is not set: it writes 0 where
    /// cgmetric writes `+Inf` (`container_spec_memory_limit_bytes`,
    /// `container_threads_max`), and dashboards filter on `> 0`.
    pub unset_as_zero: bool,
}

/// A row's cAdvisor family, with no labels of its own.
const fn cadvisor(family: &'static str) -> Cadvisor {
    Cadvisor {
        family,
        labels: "",
        unset_as_zero: false,
    }
}

impl Cadvisor {
    const fn labels(self, labels: &'static str) -> Cadvisor {
        Cadvisor { labels, ..self }
    }

    const fn unset_as_zero(self) -> Cadvisor {
        Cadvisor {
            unset_as_zero: true,
            ..self
        }
    }
}

/// `Some(the row's cAdvisor mapping)`, or `None` for a row without one.
macro_rules! optional {
    () => {
        None
    };
    ($value:expr) => {
        Some($value)
    };
}

macro_rules! catalogue {
    ($($id:ident: $file:literal, $group:ident, $kind:ident, $prom:literal, $scale:ident, $help:literal $(=> $cadvisor:expr)?;)*) => {
        /// A metric, by its position in [`METRICS`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum MetricId { $($id),* }

        /// The catalogue, in the order files are listed.
        pub static METRICS: &[MetricDef] = &[$(MetricDef {
            id: MetricId::$id,
            file: $file,
            group: Group::$group,
            kind: PromType::$kind,
            prom: $prom,
            scale: Scale::$scale,
            help: $help,
            cadvisor: optional!($($cadvisor)?),
        }),*];

        /// How many metrics the catalogue has.
        pub const METRIC_COUNT: usize = [$(MetricId::$id),*].len();
    };
}

catalogue! {
    CpuUsageUsec: "cpu_usage_usec", CpuUsage, Counter, "cpu_usage_seconds_total", Micro,
        "CPU time used by the container's tasks, user and system."
        => cadvisor("container_cpu_usage_seconds_total").labels("cpu=\"total\"");
    CpuUserUsec: "cpu_user_usec", CpuUsage, Counter, "cpu_user_seconds_total", Micro,
        "CPU time used in user mode."
        => cadvisor("container_cpu_user_seconds_total");
    CpuSystemUsec: "cpu_system_usec", CpuUsage, Counter, "cpu_system_seconds_total", Micro,
        "CPU time used in kernel mode."
        => cadvisor("container_cpu_system_seconds_total");
    CpuMillicores: "cpu_millicores", CpuRate, Gauge, "cpu_usage_cores", Milli,
        "CPU used over the last rate window, in cores.";
    CpuLimitMillicores: "cpu_limit_millicores", CpuLimit, Gauge, "cpu_limit_cores", Milli,
        "CPU quota in cores (+Inf when unlimited).";
    CpuNrPeriods: "cpu_nr_periods", CpuThrottle, Counter, "cpu_periods_total", One,
        "CFS enforcement periods that have elapsed."
        => cadvisor("container_cpu_cfs_periods_total");
    CpuNrThrottled: "cpu_nr_throttled", CpuThrottle, Counter, "cpu_throttled_periods_total", One,
        "CFS periods in which the container was throttled."
        => cadvisor("container_cpu_cfs_throttled_periods_total");
    CpuThrottledUsec: "cpu_throttled_usec", CpuThrottle, Counter, "cpu_throttled_seconds_total", Micro,
        "Time the container's tasks were throttled."
        => cadvisor("container_cpu_cfs_throttled_seconds_total");
    CpuPressureSomeUsec: "cpu_pressure_some_usec", CpuPressure, Counter, "cpu_pressure_some_seconds_total", Micro,
        "Time at least one of the container's tasks waited for a CPU (PSI some), throttling included."
        => cadvisor("container_pressure_cpu_waiting_seconds_total");
    CpuPressureFullUsec: "cpu_pressure_full_usec", CpuPressure, Counter, "cpu_pressure_full_seconds_total", Micro,
        "Time all of the container's non-idle tasks waited for a CPU at once (PSI full)."
        => cadvisor("container_pressure_cpu_stalled_seconds_total");
    MemoryUsage: "memory_usage", MemoryUsage, Gauge, "memory_usage_bytes", One,
        "Memory charged to the container, page cache included."
        => cadvisor("container_memory_usage_bytes");
    MemoryPeak: "memory_peak", MemoryPeak, Gauge, "memory_peak_bytes", One,
        "Highest memory usage since the cgroup was created (or its peak was reset)."
        => cadvisor("container_memory_max_usage_bytes");
    MemoryWorkingSet: "memory_working_set", MemoryStat, Gauge, "memory_working_set_bytes", One,
        "Memory usage minus inactive file cache."
        => cadvisor("container_memory_working_set_bytes");
    MemoryRss: "memory_rss", MemoryStat, Gauge, "memory_rss_bytes", One,
        "Anonymous memory (heap, stacks, anonymous mappings)."
        => cadvisor("container_memory_rss");
    MemoryCache: "memory_cache", MemoryStat, Gauge, "memory_cache_bytes", One,
        "Page cache memory."
        => cadvisor("container_memory_cache");
    MemoryRssHuge: "memory_rss_huge", MemoryStat, Gauge, "memory_rss_huge_bytes", One,
        "Anonymous memory backed by transparent huge pages.";
    MemoryShmem: "memory_shmem", MemoryStat, Gauge, "memory_shmem_bytes", One,
        "Shared memory (tmpfs, shm).";
    MemoryMappedFile: "memory_mapped_file", MemoryStat, Gauge, "memory_mapped_file_bytes", One,
        "Page cache mapped into processes."
        => cadvisor("container_memory_mapped_file");
    MemoryDirty: "memory_dirty", MemoryStat, Gauge, "memory_dirty_bytes", One,
        "Page cache waiting to be written back."
        => cadvisor("container_memory_file_dirty_bytes");
    MemoryWriteback: "memory_writeback", MemoryStat, Gauge, "memory_writeback_bytes", One,
        "Page cache being written back."
        => cadvisor("container_memory_file_writeback_bytes");
    MemorySwap: "memory_swap", MemorySwap, Gauge, "memory_swap_bytes", One,
        "Swap used by the container."
        => cadvisor("container_memory_swap");
    MemoryPgfault: "memory_pgfault", MemoryStat, Counter, "memory_page_faults_total", One,
        "Page faults.";
    MemoryPgmajfault: "memory_pgmajfault", MemoryStat, Counter, "memory_major_page_faults_total", One,
        "Major page faults (served from disk).";
    MemoryPgpgin: "memory_pgpgin", MemoryStat, Counter, "memory_pages_charged_total", One,
        "Pages charged to the cgroup (cgroup v1 only).";
    MemoryPgpgout: "memory_pgpgout", MemoryStat, Counter, "memory_pages_uncharged_total", One,
        "Pages uncharged from the cgroup (cgroup v1 only).";
    MemoryLimit: "memory_limit", MemoryLimit, Gauge, "memory_limit_bytes", One,
        "Memory limit (+Inf when unlimited)."
        => cadvisor("container_spec_memory_limit_bytes").unset_as_zero();
    MemoryOomKills: "memory_oom_kills", MemoryOom, Counter, "memory_oom_kills_total", One,
        "Processes killed by the OOM killer for this cgroup."
        => cadvisor("container_oom_events_total");
    MemoryLowEvents: "memory_low_events", MemoryEvents, Counter, "memory_low_events_total", One,
        "Times the container was reclaimed below its memory.low protection.";
    MemoryHighEvents: "memory_high_events", MemoryEvents, Counter, "memory_high_events_total", One,
        "Times the container went over memory.high and was throttled and reclaimed."
        => cadvisor("container_memory_events_high_total");
    MemoryMaxEvents: "memory_max_events", MemoryEvents, Counter, "memory_max_events_total", One,
        "Times a charge hit the memory limit (cgroup v1: memory.failcnt)."
        => cadvisor("container_memory_events_max_total");
    MemoryOomEvents: "memory_oom_events", MemoryEvents, Counter, "memory_oom_events_total", One,
        "Times the container reached its limit with reclaim failing (the OOM path ran).";
    MemoryOomGroupKills: "memory_oom_group_kills", MemoryEvents, Counter, "memory_oom_group_kills_total", One,
        "Times the whole cgroup was killed as one unit (memory.oom.group).";
    MemoryPressureSomeUsec: "memory_pressure_some_usec", MemoryPressure, Counter, "memory_pressure_some_seconds_total", Micro,
        "Time at least one of the container's tasks stalled on memory (PSI some: reclaim, refaults, throttling)."
        => cadvisor("container_pressure_memory_waiting_seconds_total");
    MemoryPressureFullUsec: "memory_pressure_full_usec", MemoryPressure, Counter, "memory_pressure_full_seconds_total", Micro,
        "Time all of the container's non-idle tasks stalled on memory at once (PSI full)."
        => cadvisor("container_pressure_memory_stalled_seconds_total");
    IoReadBytes: "io_read_bytes", Io, Counter, "io_read_bytes_total", One,
        "Bytes read from block devices."
        => cadvisor("container_fs_reads_bytes_total");
    IoWriteBytes: "io_write_bytes", Io, Counter, "io_written_bytes_total", One,
        "Bytes written to block devices."
        => cadvisor("container_fs_writes_bytes_total");
    IoReadOps: "io_read_ops", Io, Counter, "io_read_ops_total", One,
        "Read operations on block devices."
        => cadvisor("container_fs_reads_total");
    IoWriteOps: "io_write_ops", Io, Counter, "io_write_ops_total", One,
        "Write operations on block devices."
        => cadvisor("container_fs_writes_total");
    IoPressureSomeUsec: "io_pressure_some_usec", IoPressure, Counter, "io_pressure_some_seconds_total", Micro,
        "Time at least one of the container's tasks waited for I/O (PSI some)."
        => cadvisor("container_pressure_io_waiting_seconds_total");
    IoPressureFullUsec: "io_pressure_full_usec", IoPressure, Counter, "io_pressure_full_seconds_total", Micro,
        "Time all of the container's non-idle tasks waited for I/O at once (PSI full)."
        => cadvisor("container_pressure_io_stalled_seconds_total");
    PidsCurrent: "pids_current", PidsCurrent, Gauge, "pids", One,
        "Tasks (processes and threads) in the container."
        => cadvisor("container_threads");
    PidsLimit: "pids_limit", PidsLimit, Gauge, "pids_limit", One,
        "Task limit (+Inf when unlimited)."
        => cadvisor("container_threads_max").unset_as_zero();
    NetBytesTx: "net_bytes_tx", NetTraffic, Counter, "network_transmit_bytes_total", One,
        "IP bytes sent by the container's sockets."
        => cadvisor("container_network_transmit_bytes_total");
    NetBytesRx: "net_bytes_rx", NetTraffic, Counter, "network_receive_bytes_total", One,
        "IP bytes received by the container's sockets."
        => cadvisor("container_network_receive_bytes_total");
    NetPacketsTx: "net_packets_tx", NetTraffic, Counter, "network_transmit_packets_total", One,
        "IP packets sent (a GSO packet counts as its segments)."
        => cadvisor("container_network_transmit_packets_total");
    NetPacketsRx: "net_packets_rx", NetTraffic, Counter, "network_receive_packets_total", One,
        "IP packets received (a GRO packet counts as its segments)."
        => cadvisor("container_network_receive_packets_total");
    NetTxBps: "net_tx_bps", NetRate, Gauge, "network_transmit_bytes_per_second", One,
        "Bytes sent per second over the last rate window.";
    NetRxBps: "net_rx_bps", NetRate, Gauge, "network_receive_bytes_per_second", One,
        "Bytes received per second over the last rate window.";
    NetConnectionsActive: "net_connections_active", NetConn, Gauge, "tcp_connections_active", One,
        "TCP connections established and not yet closed.";
    NetConnectionsTotal: "net_connections_total", NetConn, Counter, "tcp_connections_total", One,
        "TCP connections established, active and passive.";
    NetConnectionsClosed: "net_connections_closed", NetConn, Counter, "tcp_connections_closed_total", One,
        "TCP connections closed after being established.";
    NetConnectionLifetimeAvgMs: "net_connection_lifetime_avg_ms", NetConn, Gauge, "tcp_connection_lifetime_avg_seconds", Milli,
        "Mean lifetime of closed TCP connections.";
    NetTcpRetransmits: "net_tcp_retransmits", NetConn, Counter, "tcp_retransmits_total", One,
        "TCP segments retransmitted.";
}

impl MetricId {
    pub fn def(self) -> &'static MetricDef {
        &METRICS[self as usize]
    }

    pub fn by_file(file: &str) -> Option<MetricId> {
        METRICS.iter().find(|m| m.file == file).map(|m| m.id)
    }

    pub fn from_index(index: usize) -> Option<MetricId> {
        METRICS.get(index).map(|m| m.id)
    }
}

/// The groups the metrics come from, each once, in first-seen order.
pub fn groups_of(ids: impl IntoIterator<Item = MetricId>) -> Vec<Group> {
    let mut groups = Vec::new();
    for id in ids {
        if !groups.contains(&id.def().group) {
            groups.push(id.def().group);
        }
    }
    groups
}

/// A metric's value: a number in the file's unit, or `max` for a limit that
/// is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Count(u64),
    Max,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Count(n) => write!(f, "{n}"),
            Value::Max => f.write_str("max"),
        }
    }
}

/// One destination class's bytes (`--net-class`), read with the network
/// counters: the classes of a container sum to its `net_bytes_tx` and
/// `net_bytes_rx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassBytes {
    pub class: std::sync::Arc<str>,
    pub tx: u64,
    pub rx: u64,
}

/// A metric kept per destination class: a file `<file>_<class>` beside the
/// catalogue's, and one Prometheus family with a `class` label (apart from
/// the totals' family, which a `sum` would otherwise count twice).
#[derive(Debug)]
pub struct ClassMetricDef {
    pub file: &'static str,
    /// The Prometheus family name, without the `cgmetric_` prefix.
    pub prom: &'static str,
    pub help: &'static str,
    pub pick: fn(&ClassBytes) -> u64,
}

/// The per-class metrics, in the order files are listed.
pub static CLASS_METRICS: [ClassMetricDef; 2] = [
    ClassMetricDef {
        file: "net_bytes_tx",
        prom: "network_class_transmit_bytes_total",
        help: "IP bytes sent to peers of the class (--net-class; external: in no class).",
        pick: |c| c.tx,
    },
    ClassMetricDef {
        file: "net_bytes_rx",
        prom: "network_class_receive_bytes_total",
        help: "IP bytes received from peers of the class (--net-class; external: in no class).",
        pick: |c| c.rx,
    },
];

impl ClassMetricDef {
    /// The file of class `class`.
    pub fn file_of(&self, class: &str) -> String {
        format!("{}_{class}", self.file)
    }

    /// The class a file `name` of this metric is for, if it is one.
    pub fn class_of<'n>(&self, name: &'n str) -> Option<&'n str> {
        name.strip_prefix(self.file)?.strip_prefix('_')
    }
}

/// The values one read produced; `None` where the host does not provide a
/// metric (so it has no file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    values: [Option<Value>; METRIC_COUNT],
    /// Per destination class, with the network counters, when classes are
    /// configured.
    pub classes: Vec<ClassBytes>,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            values: [None; METRIC_COUNT],
            classes: Vec::new(),
        }
    }
}

impl Sample {
    pub fn set(&mut self, id: MetricId, value: Option<u64>) {
        self.values[id as usize] = value.map(Value::Count);
    }

    pub fn set_value(&mut self, id: MetricId, value: Value) {
        self.values[id as usize] = Some(value);
    }

    pub fn get(&self, id: MetricId) -> Option<Value> {
        self.values[id as usize]
    }

    /// Every per-class file and its value, metric by metric.
    pub fn class_files(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        CLASS_METRICS.iter().flat_map(move |def| {
            self.classes
                .iter()
                .map(move |c| (def.file_of(&c.class), (def.pick)(c)))
        })
    }

    pub fn count(&self, id: MetricId) -> Option<u64> {
        match self.get(id) {
            Some(Value::Count(n)) => Some(n),
            _ => None,
        }
    }

    /// The metrics that have a value, in catalogue order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static MetricDef, Value)> + '_ {
        METRICS
            .iter()
            .zip(self.values.iter())
            .filter_map(|(def, v)| v.map(|v| (def, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_index_the_table() {
        for (index, def) in METRICS.iter().enumerate() {
            assert_eq!(def.id as usize, index);
            assert_eq!(MetricId::by_file(def.file), Some(def.id));
        }
        assert_eq!(METRICS.len(), METRIC_COUNT);
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for def in METRICS {
            assert_eq!(
                def.kind == PromType::Counter,
                def.prom.ends_with("_total"),
                "{}",
                def.prom
            );
            if def.scale == Scale::Micro {
                assert!(def.prom.contains("_seconds"), "{}", def.prom);
            }
            assert!(def.prom.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    /// cAdvisor's families keep the catalogue's type and unit: a counter is
    /// `_total` (which is why `container_memory_failcnt`, a counter by
    /// another name that `promtool check metrics` rejects, is not one of
    /// them), microseconds become `_seconds`; no two rows share a family;
    /// only limits read 0 when unset.
    #[test]
    fn cadvisor_families_follow_the_catalogue() {
        let mut seen = std::collections::HashSet::new();
        for def in METRICS {
            let Some(c) = def.cadvisor else { continue };
            assert!(seen.insert(c.family), "{} twice", c.family);
            assert!(c.family.starts_with("container_"), "{}", c.family);
            assert_eq!(
                def.kind == PromType::Counter,
                c.family.ends_with("_total"),
                "{}",
                c.family
            );
            if def.scale == Scale::Micro {
                assert!(c.family.contains("_seconds"), "{}", c.family);
            }
            assert_eq!(
                c.unset_as_zero,
                matches!(def.group, Group::MemoryLimit | Group::PidsLimit),
                "{}",
                c.family
            );
        }
        // The families kubernetes-mixin's rules and dashboards read.
        for family in [
            "container_cpu_usage_seconds_total",
            "container_cpu_cfs_periods_total",
            "container_cpu_cfs_throttled_periods_total",
            "container_memory_working_set_bytes",
            "container_memory_rss",
            "container_memory_cache",
            "container_memory_swap",
            "container_spec_memory_limit_bytes",
            "container_network_receive_bytes_total",
            "container_network_transmit_bytes_total",
            "container_fs_reads_bytes_total",
            "container_fs_writes_bytes_total",
        ] {
            assert!(seen.contains(family), "{family} is not mapped");
        }
    }
}
