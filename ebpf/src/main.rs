//! cgmetric's eBPF programs, attached once at the cgroup v2 root.
//!
//! - `count_egress` / `count_ingress` (cgroup_skb): IP bytes and packets per
//!   cgroup, keyed by the *socket's* cgroup (`bpf_skb_cgroup_id`), which is
//!   right in softirq context where the current task is not.
//! - `remember_socket` (cgroup/sock_create): runs in the creating process, so
//!   the current cgroup is the socket's; stores it in socket storage, which
//!   accepted sockets inherit from their listener (`BPF_F_CLONE`).
//! - `track_connections` (sock_ops): established (both sides) and
//!   retransmits, attributed through that socket storage.
//! - `count_close` (cgroup/sock_release): closed with lifetime, once per
//!   socket as its last descriptor is closed. TCP's state-change callbacks
//!   would tell the same at about eight sock_ops runs a connection.
//!
//! - With `--net-class` configured, `count_egress` / `count_ingress` also
//!   look the peer address up in a trie and count the bytes under the
//!   peer's class; peers in no class are the rest of the totals (user space
//!   derives `external`), so the classes sum to the totals exactly.
//!
//! Counters are per-CPU and added atomically, so a softirq interrupting a
//! program on the same CPU loses nothing.

#![no_std]
#![no_main]
// Atomic add: core's atomic types offer only load/store on this target,
// while the kernel has BPF_ATOMIC add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod sk_storage;

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::bindings::{
    BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
};
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_skb_cgroup_id};
use aya_ebpf::macros::{cgroup_skb, cgroup_sock, map, sock_ops};
use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::programs::{SkBuffContext, SockContext, SockOpsContext};
use cgmetric_common::{
    health, ClassCounters, ClassKey, ConnCounters, NetCounters, PeerCache, Retired, SocketState,
    MAX_CGROUPS, MAX_CLASS_PREFIXES,
};

use crate::sk_storage::SkStorage;

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Pinned by name: a restarted daemon, or a newer program, finds the same
// counters under --bpf-dir.
#[map]
static NET_COUNTERS: PerCpuHashMap<u64, NetCounters> =
    PerCpuHashMap::pinned(MAX_CGROUPS, BPF_F_NO_PREALLOC);
#[map]
static CONN_COUNTERS: PerCpuHashMap<u64, ConnCounters> =
    PerCpuHashMap::pinned(MAX_CGROUPS, BPF_F_NO_PREALLOC);
#[map]
static HEALTH: PerCpuArray<u64> = PerCpuArray::pinned(health::COUNT, 0);
// User space's: declared here so it is created and pinned with the rest.
#[map]
static RETIRED: HashMap<u64, Retired> = HashMap::pinned(MAX_CGROUPS, BPF_F_NO_PREALLOC);

#[map]
static NET_CLASSES: LpmTrie<[u8; 16], u64> = LpmTrie::pinned(MAX_CLASS_PREFIXES, 0);
// A cgroup's entries for the classes its traffic met; a class per cgroup
// is rarely more than a few.
#[map]
static CLASS_COUNTERS: PerCpuHashMap<ClassKey, ClassCounters> =
    PerCpuHashMap::pinned(MAX_CGROUPS * 4, BPF_F_NO_PREALLOC);
#[map]
static RETIRED_CLASSES: HashMap<ClassKey, ClassCounters> =
    HashMap::pinned(MAX_CGROUPS * 4, BPF_F_NO_PREALLOC);
/// Non-zero while classes are configured; the daemon writes a new value
/// with every change of the trie, so [`PeerCache`] entries of the old
/// classes no longer match.
#[map]
static NET_CONFIG: Array<u32> = Array::pinned(1, 0);
// Pinned like the rest: a restart keeps a link only if all of its program's
// maps are pinned.
#[map]
static PEER_CACHE: PerCpuArray<PeerCache> = PerCpuArray::pinned(1, 0);

#[unsafe(no_mangle)]
#[unsafe(link_section = ".maps")]
static SOCKETS: SkStorage<SocketState> = SkStorage::new();

const IPPROTO_TCP: u32 = 6;
/// cgroup_skb: let the packet through (cgmetric only counts).
const ALLOW: i32 = 1;

fn add(counter: &mut u64, n: u64) {
    // SAFETY: the pointer comes from a live map value, aligned for u64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

fn note(index: u32) {
    if let Some(slot) = HEALTH.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot is valid for the program's run.
        add(unsafe { &mut *slot }, 1);
    }
}

/// This CPU's counters under `key`, created on first use; `None` (and a
/// health note) when the map is full.
fn counters<K, V: Default>(map: &PerCpuHashMap<K, V>, key: K, full: u32) -> Option<&mut V> {
    if let Some(value) = map.get_ptr_mut(&key) {
        // SAFETY: lookup results stay valid for the program's run.
        return Some(unsafe { &mut *value });
    }
    // Another CPU may insert first (EEXIST): either way, look again.
    let _ = map.insert(&key, &V::default(), BPF_NOEXIST.into());
    match map.get_ptr_mut(&key) {
        // SAFETY: as above.
        Some(value) => Some(unsafe { &mut *value }),
        None => {
            note(full);
            None
        }
    }
}

fn count_packet(ctx: &SkBuffContext, egress: bool) {
    // SAFETY: the context's skb pointer is the program's argument.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if cgroup == 0 {
        return;
    }
    let Some(c) = counters(&NET_COUNTERS, cgroup, health::NET_MAP_FULL) else {
        return;
    };
    // SAFETY: reading a context field.
    let segments = unsafe { (*ctx.skb.skb).gso_segs };
    let mut bytes = u64::from(ctx.len());
    if segments > 1 {
        // A GSO (egress) or GRO (ingress) packet carries its headers once;
        // on the wire each of its segments carries them.
        bytes += u64::from(segments - 1) * u64::from(header_len(ctx).unwrap_or(0));
    }
    let packets = u64::from(segments.max(1));
    if egress {
        add(&mut c.tx_bytes, bytes);
        add(&mut c.tx_packets, packets);
    } else {
        add(&mut c.rx_bytes, bytes);
        add(&mut c.rx_packets, packets);
    }
    if let Some(&config) = NET_CONFIG.get(0) {
        if config != 0 {
            count_class(ctx, cgroup, egress, bytes, config);
        }
    }
}

/// Adds `bytes` to the class of the packet's peer, if it has one. The same
/// bytes as the totals, so the classes and the rest sum to them exactly.
fn count_class(ctx: &SkBuffContext, cgroup: u64, egress: bool, bytes: u64, config: u32) {
    let Some(peer) = peer_address(ctx, egress) else {
        return;
    };
    let Some(class) = class_of(peer, u64::from(config)) else {
        return;
    };
    let key = ClassKey { cgroup, class };
    let Some(c) = counters(&CLASS_COUNTERS, key, health::NET_MAP_FULL) else {
        return;
    };
    match egress {
        true => add(&mut c.tx_bytes, bytes),
        false => add(&mut c.rx_bytes, bytes),
    }
}

/// The class of `peer` under the classes `config` stands for: from this
/// CPU's [`PeerCache`] when it holds the peer, else from the trie (and
/// cached).
fn class_of(peer: [u8; 16], config: u64) -> Option<u64> {
    use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
    // SAFETY: 16 bytes either way, and every bit pattern is a valid u64.
    let key: [u64; 2] = unsafe { core::mem::transmute(peer) };
    let cache = PEER_CACHE.get_ptr_mut(0);
    if let Some(cache) = cache {
        // SAFETY: a per-CPU array slot is valid for the program's run;
        // volatile, so that the reads stay between the two of `seq`.
        unsafe {
            let seq = read_volatile(addr_of!((*cache).seq));
            if seq & 1 == 0 {
                let hit = read_volatile(addr_of!((*cache).config)) == config
                    && read_volatile(addr_of!((*cache).peer)) == key;
                let class = read_volatile(addr_of!((*cache).class));
                let found = read_volatile(addr_of!((*cache).found));
                if hit && read_volatile(addr_of!((*cache).seq)) == seq {
                    return (found != 0).then_some(class);
                }
            }
        }
    }
    // Both fields from the lookup's branches: a None's payload is
    // undefined, and the verifier refuses a program that stores it.
    let (class, found) = match NET_CLASSES.get(&Key::new(128, peer)) {
        Some(&class) => (class, 1),
        None => (0, 0),
    };
    if let Some(cache) = cache {
        // SAFETY: as above. Not while another write of this CPU's entry is
        // under way (this program interrupted it).
        unsafe {
            let seq = read_volatile(addr_of!((*cache).seq));
            if seq & 1 == 0 {
                write_volatile(addr_of_mut!((*cache).seq), seq + 1);
                write_volatile(addr_of_mut!((*cache).config), config);
                write_volatile(addr_of_mut!((*cache).peer), key);
                write_volatile(addr_of_mut!((*cache).class), class);
                write_volatile(addr_of_mut!((*cache).found), found);
                write_volatile(addr_of_mut!((*cache).seq), seq + 2);
            }
        }
    }
    (found != 0).then_some(class)
}

/// The peer's address, as the class trie holds addresses (IPv4 mapped into
/// IPv6): the destination of what leaves, the source of what arrives.
fn peer_address(ctx: &SkBuffContext, egress: bool) -> Option<[u8; 16]> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => {
            let v4: [u8; 4] = ctx.load(if egress { 16 } else { 12 }).ok()?;
            Some(cgmetric_common::class_prefix_v4(v4, 32).0)
        }
        6 => ctx.load(if egress { 24 } else { 8 }).ok(),
        _ => None,
    }
}

/// The IP and TCP/UDP header bytes of one segment of this packet.
fn header_len(ctx: &SkBuffContext) -> Option<u32> {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    let first: u8 = ctx.load(0).ok()?;
    let (ip, protocol) = match first >> 4 {
        4 => (u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).ok()?),
        6 => (40, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    let transport = match protocol {
        TCP => u32::from(ctx.load::<u8>(ip as usize + 12).ok()? >> 4) * 4,
        UDP => 8,
        _ => 0,
    };
    Some(ip + transport)
}

#[cgroup_skb(egress)]
pub fn count_egress(ctx: SkBuffContext) -> i32 {
    count_packet(&ctx, true);
    ALLOW
}

#[cgroup_skb(ingress)]
pub fn count_ingress(ctx: SkBuffContext) -> i32 {
    count_packet(&ctx, false);
    ALLOW
}

#[cgroup_sock(sock_create)]
pub fn remember_socket(ctx: SockContext) -> i32 {
    // SAFETY: reading a context field.
    if unsafe { (*ctx.sock).protocol } == IPPROTO_TCP {
        if let Some(state) = SOCKETS.get_or_create(ctx.sock.cast()) {
            // SAFETY: process context: the current task created the socket.
            state.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        }
    }
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn count_close(ctx: SockContext) -> i32 {
    // SAFETY: reading a context field.
    if unsafe { (*ctx.sock).protocol } != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(state) = SOCKETS.get(ctx.sock.cast()) else {
        return ALLOW;
    };
    if state.established_ns != 0 {
        closed(state, now());
    }
    ALLOW
}

fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts the close of `state`'s connection, established and not yet
/// counted closed, and marks it counted.
fn closed(state: &mut SocketState, now: u64) {
    let established = core::mem::replace(&mut state.established_ns, 0);
    if let Some(c) = counters(&CONN_COUNTERS, state.cgroup_id, health::CONN_MAP_FULL) {
        add(&mut c.closed, 1);
        add(&mut c.lifetime_ns, now.saturating_sub(established));
    }
}

#[sock_ops]
pub fn track_connections(ctx: SockOpsContext) -> u32 {
    // TCP calls this for many events; decide on the cheap fields before
    // touching socket storage.
    let event = match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => Event::Connecting,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            Event::Established
        }
        // Asked for only by earlier versions of this program: their
        // sockets still call it until they close.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => Event::Closed,
        // The kernel calls this once per retransmitted skb, after adding
        // its segments (the second argument) to TcpRetransSegs and the
        // socket's total_retrans, whether or not the send then failed.
        BPF_SOCK_OPS_RETRANS_CB => Event::Retransmit(ctx.arg(1)),
        _ => return 1,
    };
    // SAFETY: reading a context field; null for request and timewait sockets.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    let Some(state) = SOCKETS.get(sk.cast()) else {
        if event == Event::Established {
            note(health::UNATTRIBUTED);
        }
        return 1;
    };
    let flags = BPF_SOCK_OPS_RETRANS_CB_FLAG as i32;
    match event {
        // Before the SYN goes out, so that its retransmits count as the
        // kernel counts them; nothing to add yet.
        Event::Connecting => {
            let _ = ctx.set_cb_flags(flags);
            return 1;
        }
        Event::Closed if state.established_ns == 0 => return 1,
        Event::Closed => {
            closed(state, now());
            return 1;
        }
        // Connected again after a disconnect (`connect(AF_UNSPEC)`), which
        // releases nothing: the earlier connection ended by now.
        Event::Established if state.established_ns != 0 => closed(state, now()),
        _ => {}
    }
    let Some(c) = counters(&CONN_COUNTERS, state.cgroup_id, health::CONN_MAP_FULL) else {
        return 1;
    };
    match event {
        Event::Established => {
            add(&mut c.established, 1);
            state.established_ns = now().max(1);
            // Ask for this socket's retransmit callbacks (an accepted
            // socket's first chance to).
            let _ = ctx.set_cb_flags(flags);
        }
        Event::Retransmit(segments) => add(&mut c.retransmits, u64::from(segments)),
        Event::Connecting | Event::Closed => {}
    }
    1
}

#[derive(PartialEq, Eq)]
enum Event {
    Connecting,
    Established,
    Closed,
    /// Segments retransmitted.
    Retransmit(u32),
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
