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
//! Each prints one line on stdout when done: the bytes it moved.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
    drop(streams);
    println!("{}", connections * bytes);
}
