//! TCP traffic between cgroups: the `tcp_peer` helper, servers started in
//! a cgroup (optionally in a network namespace), and what the peers report
//! when they are done.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use super::cgroup::Cgroup;
use super::timing::eventually;

/// The `tcp_peer` test helper (`tests/helpers/tcp_peer.rs`), which cargo
/// builds before the tests (Cargo.toml says how).
pub fn tcp_peer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tcp_peer"))
}

/// Waits for a `tcp_peer` and returns the byte count it printed first.
pub fn finish(child: Child) -> u64 {
    finish_client(child).payload
}

/// What a `tcp_peer` client reports when it is done: its payload, and what
/// the kernel's TCP_INFO says its connections sent (a server reports only
/// the payload, and the rest stays 0).
#[derive(Debug, Default)]
pub struct Sent {
    pub payload: u64,
    /// Data bytes, retransmits included.
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    /// Segments retransmitted.
    pub total_retrans: u64,
    /// Segments sent, data or not, retransmits included.
    pub segs_out: u64,
}

/// Waits for a `tcp_peer` client and returns what it reported.
pub fn finish_client(child: Child) -> Sent {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "peer failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let parse = |what: &str, value: &str| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("tcp_peer printed {what} {value:?}: {text:?}"))
    };
    let mut sent = Sent {
        payload: parse("a payload of", lines.next().unwrap_or("")),
        ..Sent::default()
    };
    for field in lines.flat_map(str::split_whitespace) {
        let (key, value) = field.split_once('=').unwrap_or((field, ""));
        let slot = match key {
            "bytes_sent" => &mut sent.bytes_sent,
            "bytes_retrans" => &mut sent.bytes_retrans,
            "total_retrans" => &mut sent.total_retrans,
            "segs_out" => &mut sent.segs_out,
            _ => panic!("tcp_peer printed {field:?}: {text:?}"),
        };
        *slot = parse(key, value);
    }
    sent
}

impl Cgroup {
    /// Starts a `tcp_peer` server in this cgroup on `bind` (an IPv4
    /// address) for `connections`, and returns it with the address it
    /// listens on.
    pub fn serve(&self, bind: &str, connections: usize) -> (Child, String) {
        self.serve_in(None, bind, connections)
    }

    /// [`Cgroup::serve`] inside the network namespace `netns`, if given.
    pub fn serve_in(&self, netns: Option<&str>, bind: &str, connections: usize) -> (Child, String) {
        let ports = tempfile::tempdir().unwrap();
        let port_file = ports.path().join("port");
        let mut command = match netns {
            Some(netns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns]).arg(tcp_peer());
                ip
            }
            None => Command::new(tcp_peer()),
        };
        let server = self.start(command.args([
            "server",
            &format!("{bind}:0"),
            port_file.to_str().unwrap(),
            &connections.to_string(),
        ]));
        assert!(
            eventually(Duration::from_secs(10), || port_file.exists()),
            "server did not start"
        );
        let port = fs::read_to_string(&port_file).unwrap();
        (server, format!("{bind}:{port}"))
    }
}
