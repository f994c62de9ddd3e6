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

/// LPM trie: peer address (IPv6, IPv4 mapped: [`class_prefix_v4`]) →
/// class ([`class_id`]).
/// Written only by user space (`--net-class`).
pub const NET_CLASSES_MAP: &str = "NET_CLASSES";
/// Per-CPU hash: [`ClassKey`] → [`ClassCounters`].
pub const CLASS_COUNTERS_MAP: &str = "CLASS_COUNTERS";
/// Hash: [`ClassKey`] of a container → [`ClassCounters`] its removed
/// descendants left. Written only by user space.
pub const RETIRED_CLASSES_MAP: &str = "RETIRED_CLASSES";
/// Array of one `u32`: non-zero when classes are configured, so that with
/// none the programs look no address up.
pub const NET_CONFIG_MAP: &str = "NET_CONFIG";

/// Per-CPU array of one entry: the last peer looked up in the class trie on
/// that CPU. Used only by the programs.
pub const PEER_CACHE_MAP: &str = "PEER_CACHE";

/// The maps a restart must find pinned to reuse the attached programs.
pub const PINNED_MAPS: [&str; 10] = [
    NET_COUNTERS_MAP,
    CONN_COUNTERS_MAP,
    HEALTH_MAP,
    SOCKETS_MAP,
    RETIRED_MAP,
    NET_CLASSES_MAP,
    CLASS_COUNTERS_MAP,
    RETIRED_CLASSES_MAP,
    NET_CONFIG_MAP,
    PEER_CACHE_MAP,
];

/// Program names (the eBPF functions), as user space finds them.
pub const PROG_EGRESS: &str = "count_egress";
pub const PROG_INGRESS: &str = "count_ingress";
pub const PROG_SOCK_CREATE: &str = "remember_socket";
pub const PROG_SOCK_OPS: &str = "track_connections";
pub const PROG_SOCK_RELEASE: &str = "count_close";

/// How many cgroups the counter maps hold. A full map is counted in
/// [`health::NET_MAP_FULL`] / [`health::CONN_MAP_FULL`], never a crash.
pub const MAX_CGROUPS: u32 = 16384;

/// How many prefixes the classes may hold between them.
pub const MAX_CLASS_PREFIXES: u32 = 4096;

/// The name of the class the daemon adds for loopback peers (127.0.0.0/8,
/// ::1).
pub const LOOPBACK_CLASS: &str = "loopback";

/// A class's id in the maps: a hash of its name (FNV-1a, 64 bits), so that
/// counts stay with a name when the classes are reordered or changed
/// between starts, and need no table kept in step.
pub const fn class_id(name: &str) -> u64 {
    let bytes = name.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// An address as the class trie holds it: IPv6, with IPv4 as IPv4-mapped
/// (`::ffff:a.b.c.d`), so one trie serves both. Returns the bytes and the
/// prefix length that `prefix_len` bits of the original address become.
pub const fn class_prefix_v4(addr: [u8; 4], prefix_len: u32) -> ([u8; 16], u32) {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = addr[0];
    out[13] = addr[1];
    out[14] = addr[2];
    out[15] = addr[3];
    (out, 96 + prefix_len)
}

/// A container's (or cgroup's) counters for one class.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey {
    pub cgroup: u64,
    pub class: u64,
}

/// Bytes to and from the peers of one class, counted as [`NetCounters`]
/// counts them.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassCounters {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

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

/// The last peer looked up in the class trie on one CPU, and its class
/// ([`PEER_CACHE_MAP`]). Consecutive packets mostly belong to one flow, and
/// the trie lookup costs more than the rest of counting a packet's class.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerCache {
    /// Odd while being written, and changed by every write: a softirq can
    /// run a program on this CPU in the middle of another's read or write
    /// of the entry, and a torn entry must never match.
    pub seq: u64,
    /// `NET_CONFIG`'s value when the entry was written.
    pub config: u64,
    /// The peer address as the trie key holds it, in two words.
    pub peer: [u64; 2],
    pub class: u64,
    /// Whether the peer is in a class at all (`class` is then valid).
    pub found: u64,
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
    /// Packets not counted because the traffic map was full, or not split
    /// by class because the class map was.
    pub const NET_MAP_FULL: u32 = 0;
    /// Connection events not counted because the connection map was full.
    pub const CONN_MAP_FULL: u32 = 1;
    /// Connections established on sockets created before the programs were
    /// attached: their cgroup is unknown, so they are not counted.
    pub const UNATTRIBUTED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// The cgroup walk: a second object (`cgmetric-walk.bpf.o`) whose one
/// program, [`PROG_WALK`], an `iter/cgroup` iterator, visits every cgroup of
/// a hierarchy in one pass and writes each one's [`WalkRecord`] into
/// [`WALKED_MAP`], which user space maps into its memory. The kernel's
/// structures have no fixed layout, so which words a record holds is told
/// by [`WalkConfig`], set at load from the running kernel's BTF.
pub mod walk {
    /// The iterator program.
    pub const PROG_WALK: &str = "walk_cgroups";
    /// Mmapable array of [`WalkRecord`], one per cgroup visited, in the
    /// order visited; its size is set at load.
    pub const WALKED_MAP: &str = "WALKED";
    /// Array of one `u64`: how many cgroups the walk under way has visited
    /// (user space zeroes it before each walk). Counted on past the
    /// array's end, so user space learns how much room it lacked.
    pub const WALK_COUNT_MAP: &str = "WALK_COUNT";
    /// The global [`WalkConfig`] the program reads.
    pub const WALK_CONFIG_GLOBAL: &str = "WALK_CONFIG";

    /// How many words a record holds besides the cgroup's id.
    pub const FIELDS: usize = 25;
    /// A field the config leaves unused.
    pub const UNUSED: u32 = u32::MAX;

    /// One word to read per cgroup: at `offset` bytes into the state
    /// (`struct cgroup_subsys_state`, the first member of each
    /// controller's own structure) of controller `subsys`, the kernel's
    /// `enum cgroup_subsys_id`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WalkField {
        pub subsys: u32,
        pub offset: u32,
    }

    /// Where the program finds what it reads: byte offsets in the running
    /// kernel's `struct cgroup` and `struct kernfs_node`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WalkConfig {
        /// `cgroup.kn`: the cgroup's directory.
        pub cgroup_kn: u32,
        /// `kernfs_node.id`: the directory's inode number, the cgroup's id.
        pub kn_id: u32,
        /// `cgroup.subsys`: the array of controller states.
        pub cgroup_subsys: u32,
        /// How many entries `cgroup.subsys` has.
        pub subsys_count: u32,
        /// `cgroup_subsys_state.flags`, and the flag (`CSS_VISIBLE`) a
        /// controller's state has while its files are shown: a state can
        /// exist without them (a controller another depends on, such as
        /// memory under io, or one being switched off).
        pub css_flags: u32,
        pub css_visible: u32,
        pub fields: [WalkField; FIELDS],
    }

    impl WalkConfig {
        /// A config that reads nothing: the program's value until loaded.
        pub const EMPTY: WalkConfig = WalkConfig {
            cgroup_kn: 0,
            kn_id: 0,
            cgroup_subsys: 0,
            subsys_count: 0,
            css_flags: 0,
            css_visible: 0,
            fields: [WalkField {
                subsys: UNUSED,
                offset: 0,
            }; FIELDS],
        };
    }

    /// One cgroup as the walk found it.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct WalkRecord {
        /// The cgroup's id: its directory's inode number in its hierarchy.
        pub id: u64,
        /// Bit `i` set: `values[i]` was read.
        pub present: u64,
        /// Bit `i` set: field `i`'s controller is not enabled for this
        /// cgroup (no state, or a state without files), so its files are
        /// absent from cgroupfs too. A field in neither mask could not be
        /// read.
        pub missing: u64,
        pub values: [u64; FIELDS],
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) structs of u64 fields: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::NetCounters {}
    unsafe impl aya::Pod for super::ConnCounters {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::Retired {}
    unsafe impl aya::Pod for super::ClassKey {}
    unsafe impl aya::Pod for super::ClassCounters {}
    unsafe impl aya::Pod for super::PeerCache {}
    // SAFETY: repr(C) structs of u32 pairs and u64s: no padding.
    unsafe impl aya::Pod for super::walk::WalkConfig {}
    unsafe impl aya::Pod for super::walk::WalkRecord {}
}
