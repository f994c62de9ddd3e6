//! Network accounting with real traffic: a server and a client in two
//! cgroups (on loopback, and across a veth pair into a network namespace),
//! compared with what the peers moved and what the kernel's devices count.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require;
use crate::support::{
    eventually, finish, finish_client, heavy_turn, tcp_peer, unique, BpfDir, Cgroup, Daemon, Sent,
};

/// Headers a TCP/IPv4 segment carries (20 + 20, plus 12 of timestamps).
const HEADER: u64 = 52;

/// Fields drop in order: the daemon, then the children, then their parent.
struct Pair {
    daemon: Daemon,
    server: Cgroup,
    client: Cgroup,
    _parent: Cgroup,
}

impl Pair {
    fn new(test: &str, daemon_args: &[&str]) -> Pair {
        let parent = Cgroup::parent(test);
        let server = parent.child("server");
        let client = parent.child("client");
        let glob = format!("{}/*", parent.relative);
        let mut args = vec!["--cgroup", &glob];
        args.extend_from_slice(daemon_args);
        let daemon = Daemon::start(&args);
        Pair {
            daemon,
            server,
            client,
            _parent: parent,
        }
    }

    /// Starts the server for `connections` and returns it with its address.
    fn serve(&self, bind: &str, connections: usize) -> (Child, String) {
        self.server.serve(bind, connections)
    }

    /// Sends `payload` on one connection from the client's cgroup to
    /// `server` at `addr`, waits for both peers and for TCP to finish, and
    /// returns what the client's kernel says it sent.
    fn transfer(&self, server: Child, addr: &str, payload: u64) -> Sent {
        let client = self.client.start(Command::new(tcp_peer()).args([
            "client",
            addr,
            "1",
            &payload.to_string(),
            "0",
        ]));
        let sent = finish_client(client);
        assert_eq!(sent.payload, payload);
        assert_eq!(finish(server), payload);
        settle();
        sent
    }

    fn number(&self, container: &str, file: &str) -> u64 {
        self.daemon.number(&format!("{container}/{file}"))
    }
}

/// The client's counters against what the kernel's TCP_INFO says its
/// connections sent: every segment, and in bytes, the data (retransmits
/// included) plus, on each segment, IP and TCP headers with at most 8 bytes
/// of options beyond timestamps (a SYN's), and no more.
fn assert_client_counts_what_tcp_sent(pair: &Pair, sent: &Sent) {
    let (tx, packets) = (
        pair.number("client", "net_bytes_tx"),
        pair.number("client", "net_packets_tx"),
    );
    assert_eq!(packets, sent.segs_out, "packets sent, {sent:?}");
    assert!(
        tx >= sent.bytes_sent + packets * 40 && tx <= sent.bytes_sent + packets * (HEADER + 8),
        "tx {tx} in {packets} packets for {sent:?}"
    );
    assert_eq!(
        pair.number("client", "net_tcp_retransmits"),
        sent.total_retrans,
        "segments retransmitted, {sent:?}"
    );
}

/// TCP keeps talking briefly after the peers exit (FIN, final ACK).
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn client_and_server_traffic_is_exact() {
    require!();
    let _turn = heavy_turn();
    let pair = Pair::new("net-exact", &[]);
    let (server, addr) = pair.serve("127.0.0.1", 1);
    let payload = 4 << 20;
    let sent = pair.transfer(server, &addr, payload);

    // Loopback drops now and then under load; the kernel says what it
    // sent again, in segments and in bytes.
    assert_client_counts_what_tcp_sent(&pair, &sent);
    let tx = pair.number("client", "net_bytes_tx");
    let rx = pair.number("server", "net_bytes_rx");
    if sent.total_retrans > 0 {
        // What the receiver had already seen is not resent.
        assert!(
            rx >= payload && rx <= tx + HEADER,
            "server rx {rx} vs client tx {tx}, {sent:?}"
        );
    } else {
        // The server received what the client sent: only a TIME_WAIT ACK,
        // sent by the kernel on the closed socket's behalf, is
        // unattributable.
        assert!(
            rx.abs_diff(tx) <= HEADER,
            "server rx {rx} vs client tx {tx}"
        );
    }
    let (back_tx, back_rx) = (
        pair.number("server", "net_bytes_tx"),
        pair.number("client", "net_bytes_rx"),
    );
    assert!(
        back_tx.abs_diff(back_rx) <= HEADER,
        "server tx {back_tx} vs client rx {back_rx}"
    );
    for side in ["client", "server"] {
        assert_eq!(pair.number(side, "net_connections_total"), 1, "{side}");
        assert_eq!(pair.number(side, "net_connections_closed"), 1, "{side}");
        assert_eq!(pair.number(side, "net_connections_active"), 0, "{side}");
    }
}

#[test]
fn connections_open_and_close_on_both_sides() {
    require!();
    let pair = Pair::new("net-conns", &[]);
    let n = 5;
    let (server, addr) = pair.serve("127.0.0.1", n);
    // The client holds its connections until its stdin closes.
    let mut command = Command::new(tcp_peer());
    command.args(["client", &addr, &n.to_string(), "1000", "stdin"]);
    let mut client = pair.client.start(command.stdin(Stdio::piped()));
    // Both peers' containers read `value` in `file`.
    let on_both_sides = |file: &str, value: u64| {
        ["client", "server"]
            .iter()
            .all(|side| pair.number(side, file) == value)
    };
    assert!(
        eventually(Duration::from_secs(10), || on_both_sides(
            "net_connections_active",
            n as u64
        )),
        "connections never all open"
    );
    for side in ["client", "server"] {
        assert_eq!(
            pair.number(side, "net_connections_total"),
            n as u64,
            "{side}"
        );
        assert_eq!(pair.number(side, "net_connections_closed"), 0, "{side}");
    }
    drop(client.stdin.take());
    finish(client);
    finish(server);
    assert!(
        eventually(Duration::from_secs(10), || on_both_sides(
            "net_connections_closed",
            n as u64
        )),
        "connections never all closed"
    );
    for side in ["client", "server"] {
        assert_eq!(pair.number(side, "net_connections_active"), 0, "{side}");
        assert_eq!(
            pair.number(side, "net_connections_total"),
            n as u64,
            "{side}"
        );
    }
}

#[test]
fn connections_held_a_second_live_about_a_second() {
    require!();
    let pair = Pair::new("net-life", &[]);
    let (server, addr) = pair.serve("127.0.0.1", 3);
    let client = pair
        .client
        .start(Command::new(tcp_peer()).args(["client", &addr, "3", "100", "1000"]));
    finish(client);
    finish(server);
    assert!(eventually(Duration::from_secs(5), || pair
        .number("client", "net_connections_closed")
        == 3));
    let lifetime = pair.number("client", "net_connection_lifetime_avg_ms");
    assert!(
        (950..1300).contains(&lifetime),
        "client lifetime {lifetime} ms"
    );
    let lifetime = pair.number("server", "net_connection_lifetime_avg_ms");
    assert!(
        (900..1300).contains(&lifetime),
        "server lifetime {lifetime} ms"
    );
}

#[test]
fn rates_follow_paced_traffic() {
    require!();
    let _turn = heavy_turn();
    let pair = Pair::new("net-rate", &["--window", "1s"]);
    let (server, addr) = pair.serve("127.0.0.1", 1);
    // 64 KiB every 20 ms: about 3.2 MB/s for 6 s.
    let client = pair.client.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &(300 << 16).to_string(),
        "0",
        "20",
    ]));
    std::thread::sleep(Duration::from_millis(1000));
    // The first rate reads wait one window each; after them, a rate spans
    // the interval since the previous read, which the byte counts below
    // bracket (a paced sender on a busy machine is not steady enough to
    // compare different intervals).
    pair.number("client", "net_tx_bps");
    pair.number("server", "net_rx_bps");
    let started = Instant::now();
    let bytes_before = pair.number("client", "net_bytes_tx");
    std::thread::sleep(Duration::from_secs(1));
    let tx_bps = pair.number("client", "net_tx_bps");
    let rx_bps = pair.number("server", "net_rx_bps");
    let measured = (pair.number("client", "net_bytes_tx") - bytes_before) as f64
        / started.elapsed().as_secs_f64();
    for (what, bps) in [("tx", tx_bps), ("rx", rx_bps)] {
        let ratio = bps as f64 / measured;
        assert!(
            (0.7..1.3).contains(&ratio),
            "net_{what}_bps {bps} vs {measured:.0} B/s measured"
        );
    }
    finish(client);
    finish(server);
    // Over an interval with no traffic the rate is zero: a read after the
    // traffic ended, and another more than a window later.
    std::thread::sleep(Duration::from_millis(200));
    pair.number("client", "net_tx_bps");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(pair.number("client", "net_tx_bps"), 0);
}

#[test]
fn no_ebpf_means_no_network_files() {
    require!();
    let parent = Cgroup::parent("noebpf");
    let _box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--no-ebpf"]);
    let names: Vec<String> = std::fs::read_dir(daemon.path("box1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with("net_")), "{names:?}");
    assert!(names.contains(&"memory_usage".to_string()));
    assert!(!daemon.read("metrics.prom").contains("cgmetric_ebpf_"));
}

/// A network namespace with a veth pair into it, torn down on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    const HOST_ADDR: &'static str = "169.254.77.1";
    const NS_ADDR: &'static str = "169.254.77.2";

    fn new() -> Netns {
        Netns::with_addresses(Self::HOST_ADDR, Self::NS_ADDR)
    }

    /// A namespace whose veth pair has these addresses (in one /30).
    fn with_addresses(host_addr: &str, ns_addr: &str) -> Netns {
        let id = unique("cgmt");
        let suffix = &id[id.len().saturating_sub(8)..];
        let ns = Netns {
            name: id.clone(),
            host_if: format!("cgh{suffix}"),
        };
        let ns_if = format!("cgn{suffix}");
        let ip = |args: &str| run("ip", args);
        ip(&format!("netns add {}", ns.name));
        ip(&format!(
            "link add {} type veth peer name {ns_if} netns {}",
            ns.host_if, ns.name
        ));
        // Only the test's traffic on the namespace's wire: no IPv6 chatter,
        // no ARP either way, and segmentation before the veth so that its
        // counters see the packets a physical link would.
        ns.exec("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        ip(&format!("addr add {host_addr}/30 dev {}", ns.host_if));
        ns.exec(&format!("ip addr add {ns_addr}/30 dev {ns_if}"));
        let mac = |dev: &str, in_ns: bool| {
            let mut show = Command::new("ip");
            if in_ns {
                show.args(["netns", "exec", &ns.name, "ip"]);
            }
            let out = show.args(["link", "show", dev]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .unwrap_or_else(|| panic!("no MAC for {dev}: {text}"))
                .to_string()
        };
        let (host_mac, ns_mac) = (mac(&ns.host_if, false), mac(&ns_if, true));
        ip(&format!(
            "neigh replace {ns_addr} lladdr {ns_mac} dev {} nud permanent",
            ns.host_if
        ));
        ns.exec(&format!(
            "ip neigh replace {host_addr} lladdr {host_mac} dev {ns_if} nud permanent"
        ));
        ns.exec(&format!("ethtool -K {ns_if} tso off gso off"));
        ip(&format!("link set {} up", ns.host_if));
        ns.exec(&format!("ip link set {ns_if} up"));
        ns.exec("ip link set lo up");
        ns
    }

    fn exec(&self, command: &str) {
        run("ip", &format!("netns exec {} {command}", self.name));
    }

    /// The namespace's end of the veth pair.
    fn ns_if(&self) -> String {
        self.host_if.replacen("cgh", "cgn", 1)
    }

    /// A veth counter inside the namespace.
    fn counter(&self, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{}/statistics/{name}", self.ns_if()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Loads an nftables ruleset into the namespace (gone with it).
    fn nft(&self, ruleset: &str) {
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let status = nft.wait().unwrap();
        assert!(status.success(), "nft -f: {status} for {ruleset}");
    }

    /// The packets and bytes of the one counter in a netdev chain.
    fn nft_counter(&self, table: &str, chain: &str) -> (u64, u64) {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "list", "chain", "netdev", table, chain,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let after = |word: &str| -> u64 {
            text.split_whitespace()
                .skip_while(|w| *w != word)
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {word} counter in {text}"))
        };
        (after("packets"), after("bytes"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &str) {
    let status = Command::new(program)
        .args(args.split_whitespace())
        .status()
        .unwrap_or_else(|e| panic!("{program} {args}: {e}"));
    assert!(status.success(), "{program} {args}: {status}");
}

/// `--net-class`: traffic to two namespaces in two classes, to loopback
/// (IPv4 and IPv6) and to a host address in no class, one connection after
/// another. Each connection's bytes land in its peer's class and nowhere
/// else, to the byte, both ways; the files and `metrics.prom` agree.
#[test]
fn classes_split_traffic_by_peer_exactly() {
    require!("ip", "ethtool");
    let _turn = heavy_turn();
    let (east_host, east_ns) = ("169.254.78.1", "169.254.78.2");
    let (west_host, west_ns) = ("169.254.79.1", "169.254.79.2");
    let pair = Pair::new(
        "net-class",
        &[
            "--net-class",
            &format!("east={east_ns}/32"),
            "--net-class",
            &format!("west={west_ns}/32,fd00:79::/64"),
        ],
    );
    let east = Netns::with_addresses(east_host, east_ns);
    let west = Netns::with_addresses(west_host, west_ns);
    const CLASSES: [&str; 4] = ["east", "west", "loopback", "external"];
    let counts = || {
        let mut all = Vec::new();
        for dir in ["tx", "rx"] {
            all.push(pair.number("client", &format!("net_bytes_{dir}")));
            for class in CLASSES {
                all.push(pair.number("client", &format!("net_bytes_{dir}_{class}")));
            }
        }
        all
    };
    let payload: u64 = 1 << 20;
    // Where each connection goes, and the class that must take its bytes.
    // The host's own end of east's veth is no class's: external (the
    // packets go over loopback, but by address it is not).
    let peers = [
        (Some(&east), east_ns, "east"),
        (Some(&west), west_ns, "west"),
        (None, "127.0.0.1", "loopback"),
        (None, "[::1]", "loopback"),
        (None, east_host, "external"),
    ];
    for (netns, bind, class) in peers {
        let before = counts();
        let (server, addr) = pair
            .server
            .serve_in(netns.map(|n| n.name.as_str()), bind, 1);
        pair.transfer(server, &addr, payload);
        let after = counts();
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let index = 1 + CLASSES.iter().position(|c| *c == class).unwrap();
        for (dir, base) in [("tx", 0), ("rx", 5)] {
            let total = delta[base];
            assert!(total > 0, "{class} {dir}: {delta:?}");
            for (i, name) in CLASSES.iter().enumerate() {
                let want = if i + 1 == index { total } else { 0 };
                assert_eq!(
                    delta[base + 1 + i],
                    want,
                    "to {bind} ({class}), {dir} of class {name}: {delta:?}"
                );
            }
        }
    }
    // The classes sum to the totals, in the files and in metrics.prom.
    let now = counts();
    assert_eq!(now[0], now[1..5].iter().sum::<u64>(), "{now:?}");
    assert_eq!(now[5], now[6..10].iter().sum::<u64>(), "{now:?}");
    let prom = pair.daemon.read("metrics.prom");
    let class_series = |family: &str| -> u64 {
        prom.lines()
            .filter(|l| l.starts_with(family) && l.contains("container=\"client\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(
        class_series("cgmetric_network_class_transmit_bytes_total{"),
        pair.number("client", "net_bytes_tx"),
        "{prom}"
    );
    assert!(prom.contains("class=\"east\""), "{prom}");
}

/// A restart with other classes counts a peer under its new class from the
/// first packet: the programs keep the last peer's class per CPU, and what
/// they kept was looked up under the old classes.
#[test]
fn a_restart_with_other_classes_counts_a_peer_under_its_new_class() {
    require!("ip", "ethtool");
    let _turn = heavy_turn();
    let (host, peer) = ("169.254.80.1", "169.254.80.2");
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-reclass");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let netns = Netns::with_addresses(host, peer);
    // Both ends' peers in the class, so that whatever packet of the
    // transfer a CPU saw last, its cached class is the old one.
    for class in ["east", "west", "east"] {
        let spec = format!("{class}=169.254.80.0/30");
        let daemon = Daemon::start(&[
            "--cgroup",
            &glob,
            "--bpf-dir",
            bpf.arg(),
            "--net-class",
            &spec,
        ]);
        let counts = || {
            ["client", "server"].map(|side| {
                ["net_bytes_tx", &format!("net_bytes_tx_{class}")]
                    .map(|file| daemon.number(&format!("{side}/{file}")))
            })
        };
        let before = counts();
        let (server, addr) = server_cg.serve_in(Some(&netns.name), peer, 1);
        let client =
            client_cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"]));
        assert_eq!(finish(client), 100_000);
        assert_eq!(finish(server), 100_000);
        settle();
        let after = counts();
        for (side, (after, before)) in ["client", "server"].iter().zip(after.iter().zip(&before)) {
            let (total, in_class) = (after[0] - before[0], after[1] - before[1]);
            assert!(total > 0, "{side}, {class}: {total}");
            assert_eq!(in_class, total, "{side}, {class}: every byte is {class}'s");
        }
        drop(daemon);
    }
}

#[test]
fn client_in_a_network_namespace_agrees_with_its_veth() {
    require!("ip", "ethtool");
    let _turn = heavy_turn();
    let pair = Pair::new("net-ns", &[]);
    let netns = Netns::new();
    let (server, addr) = pair.serve(Netns::HOST_ADDR, 1);
    let payload: u64 = 3 << 20;
    let (bytes0, packets0) = (netns.counter("tx_bytes"), netns.counter("tx_packets"));
    let client = pair.client.start(
        Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(tcp_peer())
            .args(["client", &addr, "1", &payload.to_string(), "0"]),
    );
    let sent = finish_client(client);
    assert_eq!(sent.payload, payload);
    assert_eq!(finish(server), payload);
    settle();
    assert_client_counts_what_tcp_sent(&pair, &sent);
    let veth_bytes = netns.counter("tx_bytes") - bytes0;
    let veth_packets = netns.counter("tx_packets") - packets0;
    // The veth counts Ethernet frames: 14 bytes of header over each IP packet.
    let veth_ip_bytes = veth_bytes - 14 * veth_packets;
    let tx = pair.number("client", "net_bytes_tx");
    assert!(tx >= payload);
    assert!(
        tx.abs_diff(veth_ip_bytes) <= HEADER,
        "net_bytes_tx {tx}, veth {veth_ip_bytes} IP bytes in {veth_packets} packets"
    );
    assert!(
        pair.number("client", "net_packets_tx")
            .abs_diff(veth_packets)
            <= 1
    );
    assert!(pair.number("server", "net_bytes_rx").abs_diff(tx) <= HEADER);
}

#[test]
fn lost_packets_are_retransmitted_and_counted_as_the_kernel_counts_them() {
    require!("ip", "ethtool", "nft");
    let _turn = heavy_turn();
    let pair = Pair::new("net-loss", &[]);
    let netns = Netns::new();
    let (server, addr) = pair.server.serve_in(Some(&netns.name), Netns::NS_ADDR, 1);
    // Every tenth TCP packet into the namespace is lost on the wire,
    // starting with the client's SYN: after the client's egress has counted
    // it, before the server's ingress can. The host's side of the veth
    // keeps segmentation offload, so a lost or resent packet may carry many
    // segments.
    netns.nft(&format!(
        "table netdev lossy {{
            chain ingress {{
                type filter hook ingress device \"{}\" priority 0; policy accept;
                ip protocol tcp numgen inc mod 10 == 0 counter drop
            }}
        }}",
        netns.ns_if()
    ));
    let payload: u64 = 2 << 20;
    let sent = pair.transfer(server, &addr, payload);

    assert!(sent.total_retrans > 1, "nothing was resent: {sent:?}");
    assert_client_counts_what_tcp_sent(&pair, &sent);
    // What the client sent was received or lost. The rule counts an
    // offloaded packet once, with one header, where the wire (and cgmetric)
    // has a segment and a header for each part: each lost segment beyond
    // the rule's count carried a header of its own.
    let (lost_packets, lost_bytes) = netns.nft_counter("lossy", "ingress");
    let (tx, packets_tx) = (
        pair.number("client", "net_bytes_tx"),
        pair.number("client", "net_packets_tx"),
    );
    let (rx, packets_rx) = (
        pair.number("server", "net_bytes_rx"),
        pair.number("server", "net_packets_rx"),
    );
    let context = format!(
        "client tx {tx} in {packets_tx}, server rx {rx} in {packets_rx}, \
         lost {lost_bytes} in {lost_packets}"
    );
    let lost_segments = packets_tx
        .checked_sub(packets_rx)
        .filter(|lost| *lost >= lost_packets)
        .unwrap_or_else(|| panic!("fewer segments lost than the rule dropped: {context}"));
    assert!(
        (rx + lost_bytes + (lost_segments - lost_packets) * HEADER).abs_diff(tx) <= HEADER,
        "{context}"
    );
}

#[test]
fn a_daemon_killed_during_traffic_loses_nothing() {
    require!();
    let _turn = heavy_turn();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-crash");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let args = ["--cgroup", &glob, "--bpf-dir", bpf.arg()];
    let mut daemon = Daemon::start(&args);
    let link = cgmetric::net::link_pin(&bpf.0, cgmetric_common::PROG_EGRESS);
    let link_id = || {
        let pinned = aya::programs::links::PinnedLink::from_pin(&link).unwrap();
        aya::programs::links::FdLink::from(pinned)
            .info()
            .unwrap()
            .id()
    };
    let attachment = link_id();

    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    // 20 MiB in 64 KiB writes 10 ms apart: about 3 s of traffic.
    let payload: u64 = 20 << 20;
    let client = client_cg.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &payload.to_string(),
        "0",
        "10",
    ]));
    std::thread::sleep(Duration::from_millis(700));
    let before_crash = daemon.number("client/net_bytes_tx");
    daemon.crash();
    std::thread::sleep(Duration::from_millis(700));
    let mut daemon = Daemon::spawn_at(&daemon.mountpoint.clone(), &args);
    daemon.wait_mounted();
    assert!(
        daemon.number("client/net_bytes_tx") > before_crash,
        "traffic while down was not counted"
    );
    assert_eq!(finish(client), payload);
    assert_eq!(finish(server), payload);
    settle();
    let tx = daemon.number("client/net_bytes_tx");
    let rx = daemon.number("server/net_bytes_rx");
    assert!(
        tx >= payload && tx < payload + payload / 50,
        "tx {tx} for {payload}"
    );
    if daemon.number("client/net_tcp_retransmits") == 0 {
        assert!(rx.abs_diff(tx) <= HEADER, "rx {rx} vs tx {tx}");
    } else {
        assert!(rx >= payload && rx <= tx + HEADER, "rx {rx} vs tx {tx}");
    }
    assert_eq!(link_id(), attachment, "the restart attached a second time");
    assert!(
        daemon.stderr().contains("still attached"),
        "{}",
        daemon.stderr()
    );
    drop(daemon);
}

/// What the link pinned at `pin` is: its id, and its program's tag.
fn pinned_link(pin: &std::path::Path) -> (u32, u64) {
    use aya::programs::links::{FdLink, PinnedLink};
    let info = FdLink::from(PinnedLink::from_pin(pin).unwrap())
        .info()
        .unwrap();
    let tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.program_id())
        .unwrap()
        .tag();
    (info.id(), tag)
}

/// A cgroup_skb egress program that lets every packet through and counts
/// nothing: to the next daemon, what an older build's program looks like.
fn load_stub_egress() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    /// `bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
    #[repr(C, align(8))]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
    const BPF_CGROUP_INET_EGRESS: u32 = 1;
    // r0 = 1 (let the packet through); exit.
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SKB,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET_EGRESS,
    };
    // SAFETY: attr is a padding-free bpf_attr prefix of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

#[test]
fn a_changed_program_is_swapped_into_the_pinned_link() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-swap");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let args = ["--cgroup", &glob, "--bpf-dir", bpf.arg()];
    let daemon = Daemon::start(&args);
    let pin = cgmetric::net::link_pin(&bpf.0, cgmetric_common::PROG_EGRESS);
    let (link, tag) = pinned_link(&pin);
    drop(daemon);

    // The link runs another program, as a daemon of another build left it.
    let stub = load_stub_egress();
    cgmetric::bpf_sys::link_update(&pin, std::os::fd::AsFd::as_fd(&stub)).unwrap();
    drop(stub);
    assert_ne!(pinned_link(&pin).1, tag);

    let daemon = Daemon::start(&args);
    assert!(
        daemon
            .stderr()
            .contains("eBPF program count_egress: replaced by this version's, in place"),
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        pinned_link(&pin),
        (link, tag),
        "the same link runs this build's program again"
    );
    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    finish(client_cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"])));
    finish(server);
    settle();
    let tx = daemon.number("client/net_bytes_tx");
    assert!(tx >= 100_000, "the swapped-in program counts: {tx}");
    drop(daemon);
}

/// The object of an earlier build (`a236c91`), whose `sock_ops` program
/// counted closes from TCP's state changes and asked every socket for them.
/// Aligned as aya wants it, as the daemon embeds its own.
static EARLIER_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!("../fixtures/ebpf/cgmetric-a236c91.bpf.o"));

#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

/// An upgrade from a build that counted closes in `sock_ops` (state-change
/// callbacks, which its sockets keep asking for) to one that counts them at
/// `sock_release`: a connection open across it is counted closed once, by
/// whichever of the two sees the close first, and a new one as well.
#[test]
fn an_upgrade_counts_a_connection_open_across_it_closed_once() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-upgrade");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let args = ["--cgroup", &glob, "--bpf-dir", bpf.arg()];
    let layout = cgmetric::cgroup::Layout::detect(std::path::Path::new("/sys/fs/cgroup")).unwrap();
    let earlier = [
        cgmetric_common::PROG_EGRESS,
        cgmetric_common::PROG_INGRESS,
        cgmetric_common::PROG_SOCK_CREATE,
        cgmetric_common::PROG_SOCK_OPS,
    ];
    drop(
        cgmetric::net::load_and_attach_object(
            &bpf.0,
            layout.unified.as_ref().unwrap(),
            &EARLIER_OBJECT.0,
            &earlier,
        )
        .unwrap(),
    );
    let sock_ops = cgmetric::net::link_pin(&bpf.0, cgmetric_common::PROG_SOCK_OPS);
    let earlier_tag = pinned_link(&sock_ops).1;

    // Established under the earlier programs, closed under this build's.
    let (server, addr) = server_cg.serve("127.0.0.1", 2);
    let mut command = Command::new(tcp_peer());
    command.args(["client", &addr, "1", "1000", "stdin"]);
    let mut held = client_cg.start(command.stdin(Stdio::piped()));
    let daemon = Daemon::start(&args);
    assert_ne!(pinned_link(&sock_ops).1, earlier_tag, "{}", daemon.stderr());
    assert!(
        eventually(Duration::from_secs(10), || {
            daemon.number("client/net_connections_active") == 1
                && daemon.number("server/net_connections_active") == 1
        }),
        "the held connection never showed"
    );
    drop(held.stdin.take());
    finish(held);
    // And one made and closed under this build's alone.
    finish(client_cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "1000", "0"])));
    finish(server);
    let counts = |side: &str| {
        ["total", "closed", "active"]
            .map(|what| daemon.number(&format!("{side}/net_connections_{what}")))
    };
    for side in ["client", "server"] {
        assert!(
            eventually(Duration::from_secs(10), || counts(side) == [2, 2, 0]),
            "{side}: total, closed, active {:?}",
            counts(side)
        );
    }
    drop(daemon);
}

/// A restart keeps every link whose program's maps are all still pinned,
/// and redoes only a link whose map was removed (by hand): that link
/// counted into a map nobody reads any more. Also how an upgrade that adds
/// maps keeps the links of the programs it did not change.
#[test]
fn a_restart_redoes_only_the_links_whose_maps_were_removed() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-relink");
    let server_cg = parent.child("server");
    let client_cg = parent.child("client");
    let glob = format!("{}/*", parent.relative);
    let args = ["--cgroup", &glob, "--bpf-dir", bpf.arg()];
    let links = || {
        [cgmetric_common::PROG_EGRESS, cgmetric_common::PROG_SOCK_OPS]
            .map(|p| pinned_link(&cgmetric::net::link_pin(&bpf.0, p)).0)
    };
    let daemon = Daemon::start(&args);
    let [egress, sock_ops] = links();
    drop(daemon);
    // Only the connection program uses CONN_COUNTERS.
    std::fs::remove_file(bpf.0.join(cgmetric_common::CONN_COUNTERS_MAP)).unwrap();

    let daemon = Daemon::start(&args);
    let [egress_after, sock_ops_after] = links();
    assert_eq!(egress_after, egress, "{}", daemon.stderr());
    assert_ne!(sock_ops_after, sock_ops, "{}", daemon.stderr());
    // The new link counts into the new, pinned map.
    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    finish(client_cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "1000", "0"])));
    finish(server);
    settle();
    assert_eq!(daemon.number("client/net_connections_total"), 1);
    assert!(bpf.0.join(cgmetric_common::CONN_COUNTERS_MAP).exists());
}

#[test]
fn removed_cgroups_leave_the_maps_and_their_container_keeps_their_counts() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-gc");
    let server_cg = parent.child("server");
    let box_cg = parent.child("box");
    let mut job = box_cg.child("job");
    let mut gone = parent.child("gone");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--bpf-dir", bpf.arg()]);

    let send_from = |cg: &Cgroup| {
        let (server, addr) = server_cg.serve("127.0.0.1", 1);
        finish(cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"])));
        finish(server);
    };
    send_from(&job);
    send_from(&gone);
    settle();
    let box_tx = daemon.number("box/net_bytes_tx");
    assert!(
        box_tx >= 100_000,
        "the child's traffic counts for its container: {box_tx}"
    );
    let ids_in_map = || traffic_ids(&bpf);
    let job_id = job.v2_id();
    let gone_id = gone.v2_id();
    assert!(ids_in_map().contains(&job_id) && ids_in_map().contains(&gone_id));

    job.remove();
    gone.remove();
    // Listing the root notices the vanished container and sweeps the maps.
    let _ = std::fs::read_dir(&daemon.mountpoint).unwrap().count();
    let ids = ids_in_map();
    assert!(!ids.contains(&job_id) && !ids.contains(&gone_id), "{ids:?}");
    assert!(
        daemon.number("box/net_bytes_tx") >= box_tx,
        "the container's total went down"
    );
    drop(daemon);
}

/// An aggregate read takes every container's counters from one read of the
/// maps (`cgmetric_aggregate_ebpf_snapshots_total`), and gives each
/// container its own, as its files do: a sender whose two child cgroups
/// sent (on pure v2 a cgroup with children holds no processes), the
/// server, and a container that sent nothing.
#[test]
fn an_aggregate_takes_the_counters_from_one_read_of_the_maps() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-snapshot");
    let server_cg = parent.child("server");
    let sender = parent.child("sender");
    let (main, job) = (sender.child("main"), sender.child("job"));
    let _idle = parent.child("idle");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--bpf-dir", bpf.arg()]);
    for (cg, payload) in [(&main, "300000"), (&job, "200000")] {
        let (server, addr) = server_cg.serve("127.0.0.1", 1);
        finish(cg.start(Command::new(tcp_peer()).args(["client", &addr, "1", payload, "0"])));
        finish(server);
    }
    settle();
    let prom = daemon.read("metrics.prom");
    let series = |family: &str, container: &str| series(&prom, family, container);
    let snapshots = prom
        .lines()
        .find_map(|l| l.strip_prefix("cgmetric_aggregate_ebpf_snapshots_total "))
        .map(|v| v.parse::<u64>().unwrap());
    assert!(snapshots >= Some(1), "no snapshot of the maps:\n{prom}");
    for container in ["server", "sender", "idle"] {
        for (family, file) in [
            ("network_transmit_bytes_total", "net_bytes_tx"),
            ("network_receive_bytes_total", "net_bytes_rx"),
            ("network_transmit_packets_total", "net_packets_tx"),
            ("network_receive_packets_total", "net_packets_rx"),
            ("tcp_connections_total", "net_connections_total"),
        ] {
            assert_eq!(
                series(family, container),
                daemon.number(&format!("{container}/{file}")),
                "{container}: {family} against {file}"
            );
        }
    }
    assert!(series("network_transmit_bytes_total", "sender") > 500_000);
    assert_eq!(series("tcp_connections_total", "server"), 2);
    assert_eq!(series("network_transmit_bytes_total", "idle"), 0);
}

/// The value of the one series of `cgmetric_<family>` for `container` in
/// the text of `metrics.prom`.
fn series(prom: &str, family: &str, container: &str) -> u64 {
    let prefix = format!("cgmetric_{family}{{");
    let label = format!("container=\"{container}\"");
    let values: Vec<u64> = prom
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&label))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(values.len(), 1, "{family} of {container}:\n{prom}");
    values[0]
}

/// The cgroup ids the traffic map of the daemon pinned at `bpf` holds.
fn traffic_ids(bpf: &BpfDir) -> Vec<u64> {
    let map = aya::maps::MapData::from_pin(bpf.0.join(cgmetric_common::NET_COUNTERS_MAP)).unwrap();
    let map = aya::maps::PerCpuHashMap::<_, u64, cgmetric_common::NetCounters>::try_from(
        aya::maps::Map::PerCpuHashMap(map),
    )
    .unwrap();
    map.keys().map(Result::unwrap).collect()
}

/// A child cgroup removed from a live container keeps counting for it
/// before any sweep folds its entry, in single files and in aggregates: a
/// counter that dipped until the sweep would read to Prometheus as a
/// reset, and `rate()` would bill the whole total again.
#[test]
fn a_removed_child_cgroup_still_counts_before_the_sweep() {
    require!();
    let bpf = BpfDir::new();
    let parent = Cgroup::parent("net-child-gone");
    let server_cg = parent.child("server");
    let box_cg = parent.child("box");
    let mut job = box_cg.child("job");
    let mut other = parent.child("other");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--bpf-dir", bpf.arg()]);
    let (server, addr) = server_cg.serve("127.0.0.1", 1);
    finish(job.start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"])));
    finish(server);
    settle();
    let before = daemon.number("box/net_bytes_tx");
    assert!(before >= 100_000, "{before}");
    let job_id = job.v2_id();
    let prom_tx = |daemon: &Daemon| {
        series(
            &daemon.read("metrics.prom"),
            "network_transmit_bytes_total",
            "box",
        )
    };
    assert_eq!(prom_tx(&daemon), before);
    // No container vanished, so nothing sweeps for up to a minute.
    job.remove();
    assert_eq!(daemon.number("box/net_bytes_tx"), before);
    assert_eq!(prom_tx(&daemon), before);
    // A container that goes makes the next listing sweep: the child's
    // entry moves to the container's retired entry, and counts once.
    other.remove();
    let _ = std::fs::read_dir(&daemon.mountpoint).unwrap().count();
    assert!(
        !traffic_ids(&bpf).contains(&job_id),
        "the child was not swept"
    );
    assert_eq!(daemon.number("box/net_bytes_tx"), before);
    assert_eq!(prom_tx(&daemon), before);
}

#[test]
fn a_full_traffic_map_is_counted_and_reported() {
    require!();
    let bpf = BpfDir::new();
    let pair = Pair::new("net-full", &["--bpf-dir", bpf.arg()]);
    // Fill the traffic map with ids of cgroups that do not exist, before
    // the test's cgroups send anything.
    let pinned =
        aya::maps::MapData::from_pin(bpf.0.join(cgmetric_common::NET_COUNTERS_MAP)).unwrap();
    let mut map = aya::maps::PerCpuHashMap::<_, u64, cgmetric_common::NetCounters>::try_from(
        aya::maps::Map::PerCpuHashMap(pinned),
    )
    .unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let mut fake = 1u64 << 62;
    let mut retries = 0;
    // Until the kernel says full (E2BIG). Every daemon's programs count the
    // whole host, so parallel tests' traffic may take some of the slots.
    loop {
        let zero =
            aya::maps::PerCpuValues::try_from(vec![cgmetric_common::NetCounters::default(); cpus])
                .unwrap();
        let errno = match map.insert(fake, zero, 0) {
            Ok(()) => {
                fake += 1;
                continue;
            }
            Err(aya::maps::MapError::SyscallError(e)) => e.io_error.raw_os_error(),
            Err(e) => panic!("filling the traffic map: {e}"),
        };
        match errno {
            Some(libc::E2BIG) => break,
            // A map without preallocation takes elements from per-CPU
            // caches that the kernel refills in the background; a fill
            // this fast can find them empty though the map is not full.
            Some(libc::ENOMEM) if retries < 500 => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => panic!(
                "filling the traffic map stopped after {} entries: errno {errno:?}",
                fake - (1 << 62)
            ),
        }
    }

    let (server, addr) = pair.serve("127.0.0.1", 1);
    finish(
        pair.client
            .start(Command::new(tcp_peer()).args(["client", &addr, "1", "100000", "0"])),
    );
    finish(server);
    // Nothing counted for the newcomers, and that is said, not hidden.
    assert_eq!(pair.number("client", "net_bytes_tx"), 0);
    let prom = pair.daemon.read("metrics.prom");
    let uncounted: u64 = prom
        .lines()
        .find_map(|l| l.strip_prefix("cgmetric_ebpf_uncounted_total{reason=\"traffic_map_full\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no traffic_map_full series:\n{prom}"));
    assert!(
        uncounted >= 10,
        "only {uncounted} packets reported uncounted"
    );
    assert!(
        pair.daemon.stderr().contains("the traffic map is full"),
        "{}",
        pair.daemon.stderr()
    );
}

#[test]
fn top_and_billing_read_the_mounted_tree() {
    require!();
    let _turn = heavy_turn();
    let pair = Pair::new("reports", &[]);
    let (server, addr) = pair.serve("127.0.0.1", 1);
    let payload: u64 = 2_000_000;
    finish(pair.client.start(Command::new(tcp_peer()).args([
        "client",
        &addr,
        "1",
        &payload.to_string(),
        "0",
    ])));
    finish(server);
    settle();
    let mount = pair.daemon.mountpoint.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(crate::support::binary())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let top = run(&["top", "--once", "--sort", "tx", "--mount", &mount]);
    let lines: Vec<&str> = top.lines().collect();
    assert!(
        lines[0].starts_with("CONTAINER") && lines[0].contains("TX/s"),
        "{top}"
    );
    assert!(lines.iter().any(|l| l.starts_with("client ")), "{top}");
    assert!(lines.iter().any(|l| l.starts_with("server ")), "{top}");

    // Its own ledger (empty), not the host's /var/lib/cgmetric.
    let state = pair
        .daemon
        .state_dir()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let csv = run(&[
        "billing",
        "--price-per-gb",
        "10",
        "--format",
        "csv",
        "--mount",
        &mount,
        "--state-dir",
        &state,
    ]);
    let client = csv
        .lines()
        .find(|l| l.starts_with("client,"))
        .unwrap_or_else(|| panic!("{csv}"));
    let fields: Vec<f64> = client
        .split(',')
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let tx = pair.number("client", "net_bytes_tx") as f64;
    assert!((fields[0] - tx / 1e9).abs() < 1e-6, "{client} vs {tx}");
    assert!(fields[0] >= payload as f64 / 1e9);
    assert!(
        (fields[2] - fields[0] * 10.0).abs() < 1e-6,
        "cost is egress × price: {client}"
    );
    let table = run(&[
        "billing",
        "--price-per-gb",
        "10",
        "--mount",
        &mount,
        "--state-dir",
        &state,
    ]);
    assert!(
        table.lines().last().unwrap().starts_with("TOTAL"),
        "{table}"
    );

    // Not mounted: one clear line, a failure.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(crate::support::binary())
        .args(["top", "--once", "--mount", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not a mounted cgmetric tree"),
        "{stderr}"
    );
}
