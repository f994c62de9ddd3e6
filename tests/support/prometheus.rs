//! A real Prometheus server (Debian's `prometheus`) scraping a real
//! node_exporter whose textfile collector reads a daemon's mountpoint, on
//! loopback ports chosen at run time, with the shipped alert rules loaded;
//! and the few calls of its HTTP API the tests make. Both processes are
//! killed in `Drop`.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::Daemon;

/// The alert rules cgmetric ships.
pub fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus/cgmetric-alerts.yml")
}

/// A copy of the shipped rules in `dir` whose `for:` clauses read `hold`
/// (`"3s"`), so that alerts fire within a test. Every other line, and so
/// every expression, is the shipped one: the copy is checked to differ in
/// `for:` lines only.
pub fn shipped_rules_holding_for(dir: &Path, hold: &str) -> PathBuf {
    let shipped = fs::read_to_string(shipped_rules()).unwrap();
    let mut copy = String::new();
    let mut rewritten = 0;
    for line in shipped.lines() {
        let body = line.trim_start();
        match body.strip_prefix("for: ") {
            Some(_) => {
                let indent = &line[..line.len() - body.len()];
                copy.push_str(&format!("{indent}for: {hold}\n"));
                rewritten += 1;
            }
            None => {
                copy.push_str(line);
                copy.push('\n');
            }
        }
    }
    assert!(rewritten > 0, "no `for:` clause in the shipped rules");
    for (shipped, copied) in shipped.lines().zip(copy.lines()) {
        assert!(
            shipped == copied || shipped.trim_start().starts_with("for: "),
            "the copy changed {shipped:?}"
        );
    }
    let path = dir.join("cgmetric-alerts.yml");
    fs::write(&path, copy).unwrap();
    path
}

/// node_exporter reading `daemon`'s mountpoint (textfile collector only),
/// and a Prometheus server scraping it and evaluating `rules` every second.
pub struct Prometheus {
    server: Child,
    exporter: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn scraping(daemon: &Daemon, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let (exporter, exporter_port) = start_on_free_port("node_exporter", |port| {
            let mut command = Command::new("prometheus-node-exporter");
            command
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg(format!(
                    "--collector.textfile.directory={}",
                    daemon.mountpoint.display()
                ))
                .args(["--collector.disable-defaults", "--collector.textfile"])
                .stdout(Stdio::null())
                .stderr(log_file(dir.path(), "node_exporter"));
            command
        });
        // Every second: scrapes, rule evaluations. A scrape times out within
        // its interval (Prometheus requires it); a slow one is a missing
        // sample, which rate() and the lookback ride over.
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: node\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{exporter_port}']\n",
                rules = rules.display()
            ),
        )
        .unwrap();
        let storage = dir.path().join("data");
        let (server, port) = start_on_free_port("prometheus", |port| {
            let mut command = Command::new("prometheus");
            command
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log_file(dir.path(), "prometheus"));
            command
        });
        let mut prometheus = Prometheus {
            server,
            exporter,
            port,
            dir,
        };
        prometheus.wait_ready();
        prometheus.wait_scraped();
        prometheus
    }

    /// Waits until Prometheus holds two samples of the daemon's own series
    /// (the first scrape may time out: the daemon's first rate read waits a
    /// window), so that a test's workload is sampled from its start.
    fn wait_scraped(&self) {
        let samples = || {
            self.query(
                "count_over_time(cgmetric_ledger_write_errors_total[1m])",
                None,
            )
            .first()
            .map_or(0.0, |s| sample_value(&s["value"]))
        };
        assert!(
            super::timing::eventually(Duration::from_secs(30), || samples() >= 2.0),
            "prometheus did not scrape node_exporter twice in 30 s:\n{}",
            self.logs()
        );
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = get(self.port, "/-/ready") {
                return;
            }
            if let Some(status) = self.server.try_wait().unwrap() {
                panic!("prometheus exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the server and node_exporter said on stderr.
    pub fn logs(&self) -> String {
        ["prometheus", "node_exporter"]
            .iter()
            .map(|name| {
                let text = fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                format!("--- {name}:\n{text}")
            })
            .collect()
    }

    /// `data` of a GET of the HTTP API (`path` holds the query string).
    pub fn api(&self, path: &str) -> Value {
        self.try_api(path)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// `data` of a GET of the HTTP API, or what went wrong: the error
    /// Prometheus answered (a query that fails to evaluate), or none.
    pub fn try_api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = get(self.port, path).map_err(|e| format!("GET {path}: {e}"))?;
        let reply: Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {path}: {status} {e}: {body}"))?;
        match status == 200 && reply["status"] == "success" {
            true => Ok(reply["data"].clone()),
            false => Err(format!("GET {path}: {status} {body}")),
        }
    }

    /// An instant query evaluated at `time` (Unix seconds; now if `None`):
    /// its result (a vector's or a matrix's series).
    pub fn query(&self, promql: &str, time: Option<f64>) -> Vec<Value> {
        self.try_query(promql, time)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// [`Prometheus::query`], or the error Prometheus answered.
    pub fn try_query(&self, promql: &str, time: Option<f64>) -> Result<Vec<Value>, String> {
        let mut path = format!("/api/v1/query?query={}", encode(promql));
        if let Some(time) = time {
            path.push_str(&format!("&time={time:.3}"));
        }
        let data = self.try_api(&path)?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The active alerts (pending and firing).
    pub fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every loaded alerting and recording rule, of every group.
    pub fn rules(&self) -> Vec<Value> {
        let data = self.api("/api/v1/rules");
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        for child in [&mut self.server, &mut self.exporter] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sample's value as Prometheus' API gives it (`[time, "value"]`).
pub fn sample_value(sample: &Value) -> f64 {
    sample[1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a sample: {sample}"))
}

fn log_file(dir: &Path, name: &str) -> fs::File {
    fs::File::create(dir.join(format!("{name}.log"))).unwrap()
}

/// Starts the command `make` builds for a port that was free a moment ago,
/// and waits until it answers HTTP there. Another process may take the port
/// between the probe and the start: then the program exits, and another
/// port is tried.
fn start_on_free_port(name: &str, mut make: impl FnMut(u16) -> Command) -> (Child, u16) {
    for _ in 0..5 {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let mut child = make(port)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            // Prometheus answers /-/ready with 503 until its storage is
            // open: any HTTP answer shows it holds the port.
            if get(port, "/-/ready").is_ok() {
                break None;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not answer on port {port} in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        match exited {
            None => return (child, port),
            Some(status) => eprintln!("{name} on port {port} exited with {status}; another port"),
        }
    }
    panic!("{name} could not start on any of 5 free ports");
}

/// An HTTP/1.0 GET on loopback: the status and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header end: {reply:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status: {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
