//! The one definition of every eBPF map that kernel and user space share:
//! names, keys, values and sizes. `no_std`, so the eBPF crate can use it;
//! the `user` feature adds `aya::Pod` for the daemon.
//!
//! Every map is keyed by a cgroup v2 id (the inode number of the cgroup's
//! directory, what `bpf_skb_cgroup_id` returns). Values are all `u64`
//! fields, so there is no padding to keep in step.

#![no_std]

/// Per-CPU hash: cgroup id → [`NetCounters`].
pub const NET_COUNTERS_MAP: &str = "NET_COUNTERS";
/// Per-CPU hash: cgroup id → [`ConnCounters`].
pub const CONN_COUNTERS_MAP: &str = "CONN_COUNTERS";
/// Per-CPU array of `u64`, indexed by [`health`] constants.
pub const HEALTH_MAP: &str = "HEALTH";
/// Socket storage: [`SocketState`] per TCP socket.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Hash: container cgroup id → [`Retired`]. Written only by user space.
pub const RETIRED_MAP: &str = "RETIRED";

/// The maps a restart must find pinned to reuse the attached programs.
pub const PINNED_MAPS: [&str; 5] = [
    NET_COUNTERS_MAP,
    CONN_COUNTERS_MAP,
    HEALTH_MAP,
    SOCKETS_MAP,
    RETIRED_MAP,
];

/// Program names (the eBPF functions), as user space finds them.
pub const PROG_EGRESS: &str = "count_egress";
pub const PROG_INGRESS: &str = "count_ingress";
pub const PROG_SOCK_CREATE: &str = "remember_socket";
pub const PROG_SOCK_OPS: &str = "track_connections";

/// How many cgroups the counter maps hold. A full map is counted in
/// [`health::NET_MAP_FULL`] / [`health::CONN_MAP_FULL`], never a crash.
pub const MAX_CGROUPS: u32 = 16384;

/// IP traffic of one cgroup's sockets.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
}

/// TCP connection lifecycle of one cgroup's sockets.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnCounters {
    /// Connections that reached ESTABLISHED, active and passive.
    pub established: u64,
    /// Of those, how many have since reached CLOSE.
    pub closed: u64,
    /// Summed lifetime of the closed ones, established to close.
    pub lifetime_ns: u64,
    pub retransmits: u64,
}

/// What the programs remember per TCP socket.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SocketState {
    /// The cgroup that created the socket (accepted sockets inherit their
    /// listener's through the map's clone flag).
    pub cgroup_id: u64,
    /// When the connection was established; 0 while not counted as open.
    pub established_ns: u64,
}

/// Counts of cgroups removed inside a live container, folded into it so the
/// container's totals stay monotonic after their own entries are deleted.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    pub net: NetCounters,
    pub conn: ConnCounters,
}

/// Indices of the health counters.
pub mod health {
    /// Packets not counted because the traffic map was full.
    pub const NET_MAP_FULL: u32 = 0;
    /// Connection events not counted because the connection map was full.
    pub const CONN_MAP_FULL: u32 = 1;
    /// Connections established on sockets created before the programs were
    /// attached: their cgroup is unknown, so they are not counted.
    pub const UNATTRIBUTED: u32 = 2;
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) structs of u64 fields: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::NetCounters {}
    unsafe impl aya::Pod for super::ConnCounters {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::Retired {}
}
