//! Reports for people (`cgmetric top`, and the live half of `cgmetric
//! billing`), read from a mounted tree like any other client: one read of
//! the root `metric` file is one consistent snapshot of every container.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::cli::{SortBy, TopOptions};
use crate::metrics::{CLASS_METRICS, METRICS};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Occurs when no live cgmetric is mounted where the report looks.
    #[error("{0} is not a mounted cgmetric tree (start cgmetric, or pass --mount DIR)")]
    NotMounted(PathBuf),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every container's values, by name, then by file.
pub type Snapshot = BTreeMap<String, Values>;

/// One container's values by file name (a catalogue name, or a per-class
/// file such as `net_bytes_tx_external`).
pub type Values = BTreeMap<Cow<'static, str>, String>;

/// Parses `metric` (`<name>_<file> <value>` a line). Names may hold `_` and
/// spaces, so the file is recognised as a catalogue name at the end, or
/// else as a per-class file (`<name>_net_bytes_tx_<class>`: class names
/// hold no `net_bytes` and end in no catalogue name, so neither is
/// ambiguous).
pub fn parse_metric(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for line in text.lines() {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let file = METRICS
            .iter()
            .filter(|m| key.ends_with(m.file) && key[..key.len() - m.file.len()].ends_with('_'))
            .max_by_key(|m| m.file.len());
        let (name, file): (&str, Cow<'static, str>) = match file {
            Some(def) => (&key[..key.len() - def.file.len() - 1], def.file.into()),
            None => {
                let class_file = CLASS_METRICS.iter().find_map(|def| {
                    let at = key.rfind(&format!("_{}_", def.file))?;
                    Some((&key[..at], key[at + 1..].to_string().into()))
                });
                match class_file {
                    Some(found) => found,
                    None => continue,
                }
            }
        };
        snapshot
            .entry(name.to_string())
            .or_default()
            .insert(file, value.to_string());
    }
    snapshot
}

pub(crate) fn read_snapshot(mount: &Path) -> Result<Snapshot, ReportError> {
    if !crate::mounts::is_live_cgmetric(mount) {
        return Err(ReportError::NotMounted(mount.to_path_buf()));
    }
    let path = mount.join("metric");
    let text =
        std::fs::read_to_string(&path).map_err(|source| ReportError::Read { path, source })?;
    Ok(parse_metric(&text))
}

pub(crate) fn number(values: &Values, file: &str) -> Option<u64> {
    values.get(file)?.parse().ok()
}

/// A column of `top`: its title, the file it shows, and how.
struct Column {
    title: &'static str,
    file: &'static str,
    show: fn(u64) -> String,
}

const TOP_COLUMNS: [Column; 6] = [
    Column {
        title: "CPU",
        file: "cpu_millicores",
        show: |m| format!("{:.2}", m as f64 / 1000.0),
    },
    Column {
        title: "MEMORY",
        file: "memory_working_set",
        show: human_bytes,
    },
    Column {
        title: "TX/s",
        file: "net_tx_bps",
        show: human_bytes,
    },
    Column {
        title: "RX/s",
        file: "net_rx_bps",
        show: human_bytes,
    },
    Column {
        title: "CONNS",
        file: "net_connections_active",
        show: |n| n.to_string(),
    },
    Column {
        title: "PIDS",
        file: "pids_current",
        show: |n| n.to_string(),
    },
];

/// One line per container, sorted by `sort`; `-` where a value is missing.
pub fn render_top(snapshot: &Snapshot, sort: SortBy) -> String {
    let key = match sort {
        SortBy::Name => None,
        SortBy::Cpu => Some("cpu_millicores"),
        SortBy::Memory => Some("memory_working_set"),
        SortBy::Tx => Some("net_tx_bps"),
        SortBy::Rx => Some("net_rx_bps"),
        SortBy::Connections => Some("net_connections_active"),
        SortBy::Pids => Some("pids_current"),
    };
    let mut rows: Vec<(&String, &Values)> = snapshot.iter().collect();
    if let Some(key) = key {
        rows.sort_by_key(|(_, values)| std::cmp::Reverse(number(values, key).unwrap_or(0)));
    }
    let width = rows
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(9);
    let mut out = format!("{:<width$}", "CONTAINER");
    for column in &TOP_COLUMNS {
        let _ = write!(out, " {:>9}", column.title);
    }
    out.push('\n');
    for (name, values) in rows {
        let _ = write!(out, "{name:<width$}");
        for column in &TOP_COLUMNS {
            let cell = number(values, column.file).map_or_else(|| "-".to_string(), column.show);
            let _ = write!(out, " {cell:>9}");
        }
        out.push('\n');
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n}B"),
        _ => format!("{value:.1}{}", UNITS[unit]),
    }
}

pub fn top(options: &TopOptions) -> Result<(), ReportError> {
    // SAFETY: isatty has no memory preconditions.
    let is_tty = unsafe { libc::isatty(1) } == 1;
    loop {
        let table = render_top(&read_snapshot(&options.mount)?, options.sort);
        let mut stdout = std::io::stdout().lock();
        if is_tty && !options.once {
            // Home and clear: the table redraws in place.
            let _ = stdout.write_all(b"\x1b[H\x1b[2J");
        }
        let _ = stdout.write_all(table.as_bytes());
        let _ = stdout.flush();
        if options.once {
            return Ok(());
        }
        std::thread::sleep(options.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRIC: &str = "web_1_cpu_millicores 1500\nweb_1_memory_working_set 2097152\nweb_1_net_tx_bps 1024\n\
        web_1_net_bytes_tx 2000000000\nweb_1_net_bytes_rx 500000000\nweb_1_pids_current 3\n\
        we ird_cpu_millicores 10\nwe ird_net_bytes_tx 0\nwe ird_net_bytes_rx 0\nwe ird_memory_limit max\n\
        shop_api-0_app_pids_current 40\n";

    #[test]
    fn names_with_underscores_and_spaces_parse() {
        let s = parse_metric(METRIC);
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            ["shop_api-0_app", "we ird", "web_1"]
        );
        assert_eq!(s["web_1"]["cpu_millicores"], "1500");
        assert_eq!(s["we ird"]["memory_limit"], "max");
    }

    #[test]
    fn top_sorts_and_shows_missing_values_as_dashes() {
        let table = render_top(&parse_metric(METRIC), SortBy::Pids);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CONTAINER") && lines[0].contains("PIDS"));
        assert!(lines[1].starts_with("shop_api-0_app") && lines[1].ends_with("40"));
        assert!(
            lines[2].starts_with("web_1")
                && lines[2].contains("1.50")
                && lines[2].contains("2.0MiB")
        );
        assert!(lines[3].starts_with("we ird") && lines[3].contains(" -"));
        let by_cpu = render_top(&parse_metric(METRIC), SortBy::Cpu);
        assert!(by_cpu.lines().nth(1).unwrap().starts_with("web_1"));
    }
}
