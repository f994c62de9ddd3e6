//! A TCP peer for cgmetric's network tests, run inside a test's cgroup:
//! exact payloads, exact connection counts, connections held open until
//! told to close.
//!
//! ```text
//! tcp_peer server ADDR PORT_FILE CONNECTIONS   accept CONNECTIONS, read each to EOF
//! tcp_peer client ADDR CONNECTIONS BYTES HOLD [PACE]
//!                                              open CONNECTIONS, send BYTES on each (in 64 KiB
//!                                              writes PACE ms apart, if given), keep them open
//!                                              until stdin closes (HOLD=stdin) or for HOLD
//!                                              milliseconds, then close
//! ```
//! Each prints one line on stdout when done: the bytes it moved. The client
//! closes in order (it shuts down its side, then waits for the server's
//! EOF, which acknowledges everything it sent) and prints a second line:
//! what the kernel's TCP_INFO says it sent over all its connections,
//! `bytes_sent=N bytes_retrans=N total_retrans=N segs_out=N` (data bytes
//! including retransmits, retransmitted bytes, retransmitted segments, and
//! all segments sent).
//!
//! A test helper, not part of cgmetric: a binary target that only tests,
//! benches and examples build (Cargo.toml, `test-helpers`); the tests run it
//! from `env!("CARGO_BIN_EXE_tcp_peer")`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).unwrap_or_else(|| usage()).as_str();
    match arg(0) {
        "server" => server(arg(1), arg(2), arg(3).parse().unwrap_or_else(|_| usage())),
        "client" => client(
            arg(1),
            arg(2).parse().unwrap_or_else(|_| usage()),
            arg(3).parse().unwrap_or_else(|_| usage()),
            arg(4),
            args.get(5).map(|p| p.parse().unwrap_or_else(|_| usage())),
        ),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tcp_peer server ADDR PORT_FILE CONNECTIONS | client ADDR CONNECTIONS BYTES HOLD"
    );
    std::process::exit(2)
}

fn server(addr: &str, port_file: &str, connections: usize) {
    let listener = TcpListener::bind(addr).expect("bind");
    let port = listener.local_addr().unwrap().port();
    // Written whole, then renamed: a reader never sees a partial port.
    std::fs::write(format!("{port_file}.tmp"), port.to_string()).unwrap();
    std::fs::rename(format!("{port_file}.tmp"), port_file).unwrap();
    let readers: Vec<_> = (0..connections)
        .map(|_| {
            let (mut stream, _) = listener.accept().expect("accept");
            std::thread::spawn(move || {
                let mut total = 0u64;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return total,
                        Ok(n) => total += n as u64,
                    }
                }
            })
        })
        .collect();
    let total: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    println!("{total}");
}

fn client(addr: &str, connections: usize, bytes: usize, hold: &str, pace_ms: Option<u64>) {
    let mut streams: Vec<TcpStream> = (0..connections)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let chunk = vec![0x5au8; 1 << 16];
    for stream in &mut streams {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n]).expect("send");
            left -= n;
            if let Some(pace) = pace_ms {
                std::thread::sleep(Duration::from_millis(pace));
            }
        }
    }
    match hold {
        "stdin" => {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        ms => std::thread::sleep(Duration::from_millis(
            ms.parse().unwrap_or_else(|_| usage()),
        )),
    }
    let mut sent = TcpInfo::default();
    for mut stream in streams {
        stream.shutdown(Shutdown::Write).expect("shutdown");
        // The server sends nothing back; a hung peer fails the test.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("waiting for the server's EOF");
        sent.add(&TcpInfo::of(&stream));
    }
    println!("{}", connections * bytes);
    println!(
        "bytes_sent={} bytes_retrans={} total_retrans={} segs_out={}",
        sent.bytes_sent, sent.bytes_retrans, sent.total_retrans, sent.segs_out
    );
}

/// What the tests compare with, from the kernel's `struct tcp_info`.
#[derive(Default)]
struct TcpInfo {
    total_retrans: u64,
    bytes_sent: u64,
    bytes_retrans: u64,
    segs_out: u64,
}

impl TcpInfo {
    fn of(stream: &TcpStream) -> TcpInfo {
        // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: info is writable for len bytes, and len is passed by pointer.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        // bytes_sent and bytes_retrans came with Linux 4.19.
        let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_retrans) + 8;
        assert!(len as usize >= needed, "TCP_INFO of {len} bytes");
        TcpInfo {
            total_retrans: info.tcpi_total_retrans.into(),
            bytes_sent: info.tcpi_bytes_sent,
            bytes_retrans: info.tcpi_bytes_retrans,
            segs_out: info.tcpi_segs_out.into(),
        }
    }

    fn add(&mut self, other: &TcpInfo) {
        self.total_retrans += other.total_retrans;
        self.bytes_sent += other.bytes_sent;
        self.bytes_retrans += other.bytes_retrans;
        self.segs_out += other.segs_out;
    }
}
