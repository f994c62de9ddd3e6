//! Pure parsers for the cgroup files cgmetric reads, v1 and v2.
//!
//! Each takes the file's text and returns numbers or a [`ParseError`] that says
//! what was wrong; none touches the filesystem, so every format is tested on
//! fixture text, malformed text included.

/// What was wrong with a cgroup file's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Occurs when a file that must hold a value holds nothing.
    #[error("empty file")]
    Empty,
    /// Occurs when a value is not an unsigned decimal number.
    #[error("not a number: {0:?}")]
    NotANumber(String),
    /// Occurs when a line does not have the file's documented shape.
    #[error("malformed line: {0:?}")]
    BadLine(String),
    /// Occurs when a CPU quota's period is zero.
    #[error("CPU period is zero")]
    ZeroPeriod,
}

type Result<T> = std::result::Result<T, ParseError>;

/// A limit as cgroupfs states it: a number, or none (`max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Max,
    Value(u64),
}

impl From<Limit> for crate::metrics::Value {
    fn from(limit: Limit) -> crate::metrics::Value {
        match limit {
            Limit::Max => crate::metrics::Value::Max,
            Limit::Value(n) => crate::metrics::Value::Count(n),
        }
    }
}

/// The smallest value cgroup v1 uses for "no limit": `PAGE_COUNTER_MAX` times
/// the page size, rounded down to 64 KiB pages so every page size is covered.
const V1_UNLIMITED_FLOOR: u64 = 0x7FFF_FFFF_FFFF_0000;

fn number(token: &str) -> Result<u64> {
    token
        .parse()
        .map_err(|_| ParseError::NotANumber(token.to_string()))
}

/// A file holding one unsigned number (`memory.current`, `cpuacct.usage`).
pub fn single(text: &str) -> Result<u64> {
    match text.trim() {
        "" => Err(ParseError::Empty),
        value => number(value),
    }
}

/// A limit file: `max` or a number (`memory.max`, `pids.max`), or v1's
/// `memory.limit_in_bytes` whose "unlimited" is a huge number.
pub fn limit(text: &str) -> Result<Limit> {
    match text.trim() {
        "" => Err(ParseError::Empty),
        "max" => Ok(Limit::Max),
        value => match number(value)? {
            n if n >= V1_UNLIMITED_FLOOR => Ok(Limit::Max),
            n => Ok(Limit::Value(n)),
        },
    }
}

/// The values of `keys` in a flat keyed file, `key value` a line
/// (`cpu.stat`, `memory.stat`, `memory.events`, `memory.oom_control`,
/// `cpuacct.stat`), in the order asked; `None` for a key the kernel does not
/// provide.
///
/// One pass, converting only the values asked for: this runs for every
/// container on every scrape, and v1 `memory.stat` has 42 lines of which 12
/// are used. Every line must still be a key and a number, so that a file in
/// another format is an error rather than a row of missing values.
pub fn keyed<const N: usize>(text: &str, keys: [&str; N]) -> Result<[Option<u64>; N]> {
    let mut values = [None; N];
    let mut empty = true;
    for line in text.split('\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        empty = false;
        let bad = || ParseError::BadLine(line.to_string());
        let (key, value) = line
            .split_once(|c: char| c.is_ascii_whitespace())
            .ok_or_else(bad)?;
        let value = value.trim_ascii_start();
        if value.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad());
        }
        match keys.iter().position(|k| *k == key) {
            Some(i) => values[i] = Some(number(value)?),
            None if value.bytes().all(|b| b.is_ascii_digit()) => {}
            None => return Err(ParseError::NotANumber(value.to_string())),
        }
    }
    if empty {
        return Err(ParseError::Empty);
    }
    Ok(values)
}

/// cgroup v2 `cpu.max` (`$QUOTA $PERIOD`, quota `max` when unlimited) as
/// millicores.
pub fn cpu_max(text: &str) -> Result<Limit> {
    let mut fields = text.split_whitespace();
    match (fields.next(), fields.next(), fields.next()) {
        (None, _, _) => Err(ParseError::Empty),
        (Some("max"), _, None) => Ok(Limit::Max),
        (Some(quota), Some(period), None) => quota_millicores(number(quota)?, number(period)?),
        _ => Err(ParseError::BadLine(text.trim().to_string())),
    }
}

/// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` as millicores; a
/// negative quota (`-1`) means unlimited.
pub fn cfs_quota(quota: &str, period: &str) -> Result<Limit> {
    let quota = quota.trim();
    if quota.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Some(magnitude) = quota.strip_prefix('-') {
        return match magnitude.parse::<u64>() {
            Ok(_) => Ok(Limit::Max),
            Err(_) => Err(ParseError::NotANumber(quota.to_string())),
        };
    }
    quota_millicores(number(quota)?, single(period)?)
}

fn quota_millicores(quota_us: u64, period_us: u64) -> Result<Limit> {
    if period_us == 0 {
        return Err(ParseError::ZeroPeriod);
    }
    Ok(Limit::Value(
        (u128::from(quota_us) * 1000 / u128::from(period_us)) as u64,
    ))
}

/// The stall totals of a pressure file, in µs; `None` for a line the kernel
/// does not write (cgroup `cpu.pressure` has no `full` before 5.13).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    pub some_usec: Option<u64>,
    pub full_usec: Option<u64>,
}

/// A pressure stall file (`cpu.pressure`, `memory.pressure`, `io.pressure`):
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=N` and the same for
/// `full`. Only the totals are kept; the averages are the kernel's own
/// smoothing and not counters. Every line must be a word and `key=value`
/// fields with a numeric `total`, so that another format is an error.
pub fn pressure(text: &str) -> Result<Pressure> {
    let mut out = Pressure::default();
    let mut empty = true;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        empty = false;
        let bad = || ParseError::BadLine(line.trim().to_string());
        let mut fields = line.split_ascii_whitespace();
        let kind = fields.next().ok_or_else(bad)?;
        let mut total = None;
        for field in fields {
            let (key, value) = field.split_once('=').ok_or_else(bad)?;
            if key == "total" {
                total = Some(number(value)?);
            }
        }
        let total = total.ok_or_else(bad)?;
        match kind {
            "some" => out.some_usec = Some(total),
            "full" => out.full_usec = Some(total),
            _ => {}
        }
    }
    if empty {
        return Err(ParseError::Empty);
    }
    Ok(out)
}

/// Block I/O summed over every device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoTotals {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// cgroup v2 `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...` a
/// device. An empty file is valid: no device has seen I/O.
pub fn io_stat(text: &str) -> Result<IoTotals> {
    let mut totals = IoTotals::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || ParseError::BadLine(line.to_string());
        let mut fields = line.split_whitespace();
        let device = fields.next().ok_or_else(bad)?;
        if !device.contains(':') {
            return Err(bad());
        }
        for field in fields {
            let (key, value) = field.split_once('=').ok_or_else(bad)?;
            let value = number(value)?;
            let slot = match key {
                "rbytes" => &mut totals.read_bytes,
                "wbytes" => &mut totals.write_bytes,
                "rios" => &mut totals.read_ops,
                "wios" => &mut totals.write_ops,
                _ => continue,
            };
            *slot = slot.saturating_add(value);
        }
    }
    Ok(totals)
}

/// cgroup v1 `blkio.throttle.io_service_bytes` or `io_serviced`
/// (`MAJ:MIN Read N` lines and a `Total N` line): the Read and Write sums
/// over every device.
pub fn blkio_throttle(text: &str) -> Result<(u64, u64)> {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Total", value] => {
                number(value)?;
            }
            [device, op, value] if device.contains(':') => {
                let value = number(value)?;
                match *op {
                    "Read" => read = read.saturating_add(value),
                    "Write" => write = write.saturating_add(value),
                    _ => {}
                }
            }
            _ => return Err(ParseError::BadLine(line.to_string())),
        }
    }
    Ok((read, write))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_values() {
        assert_eq!(single("4096\n"), Ok(4096));
        assert_eq!(single(""), Err(ParseError::Empty));
        assert_eq!(single("  \n"), Err(ParseError::Empty));
        assert_eq!(single("12ab"), Err(ParseError::NotANumber("12ab".into())));
        assert_eq!(single("-1"), Err(ParseError::NotANumber("-1".into())));
    }

    #[test]
    fn limits() {
        assert_eq!(limit("max\n"), Ok(Limit::Max));
        assert_eq!(limit("67108864\n"), Ok(Limit::Value(67108864)));
        // v1 "unlimited" on 4 KiB and 64 KiB pages.
        assert_eq!(limit("9223372036854771712\n"), Ok(Limit::Max));
        assert_eq!(limit("9223372036854710272\n"), Ok(Limit::Max));
        assert_eq!(limit(""), Err(ParseError::Empty));
        assert!(limit("unlimited").is_err());
    }

    #[test]
    fn keyed_files() {
        let text = "usage_usec 100\nuser_usec 60\nsystem_usec 40\n";
        assert_eq!(
            keyed(text, ["user_usec", "nr_periods", "usage_usec"]),
            Ok([Some(60), None, Some(100)])
        );
        assert_eq!(keyed(text, []), Ok([]));
        // The kernel's separator is one space; other blanks are tolerated.
        assert_eq!(keyed(" anon\t 7 \n\n", ["anon"]), Ok([Some(7)]));
        assert_eq!(keyed("", ["anon"]), Err(ParseError::Empty));
        assert_eq!(keyed(" \n\n", ["anon"]), Err(ParseError::Empty));
        assert_eq!(
            keyed("usage_usec 1\nthis is garbage\n", ["usage_usec"]),
            Err(ParseError::BadLine("this is garbage".into()))
        );
        assert_eq!(
            keyed("usage_usec\n", ["usage_usec"]),
            Err(ParseError::BadLine("usage_usec".into()))
        );
        assert_eq!(
            keyed("anon x\n", ["anon"]),
            Err(ParseError::NotANumber("x".into()))
        );
        // A value nobody asked for must still be a number.
        assert_eq!(
            keyed("anon 1\nfile -2\n", ["anon"]),
            Err(ParseError::NotANumber("-2".into()))
        );
    }

    #[test]
    fn cpu_quotas() {
        assert_eq!(cpu_max("max 100000\n"), Ok(Limit::Max));
        assert_eq!(cpu_max("50000 100000\n"), Ok(Limit::Value(500)));
        assert_eq!(cpu_max("250000 100000\n"), Ok(Limit::Value(2500)));
        assert_eq!(cpu_max("50000 0\n"), Err(ParseError::ZeroPeriod));
        assert_eq!(cpu_max(""), Err(ParseError::Empty));
        assert!(cpu_max("1 2 3").is_err());
        assert_eq!(cfs_quota("-1\n", "100000\n"), Ok(Limit::Max));
        assert_eq!(cfs_quota("50000\n", "100000\n"), Ok(Limit::Value(500)));
        assert_eq!(cfs_quota("50000\n", ""), Err(ParseError::Empty));
        assert!(cfs_quota("-x", "100000").is_err());
    }

    #[test]
    fn io_stat_sums_devices() {
        let text = "8:0 rbytes=1000 wbytes=2000 rios=10 wios=20 dbytes=0 dios=0\n\
                    8:16 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6\n";
        assert_eq!(
            io_stat(text),
            Ok(IoTotals {
                read_bytes: 1001,
                write_bytes: 2002,
                read_ops: 13,
                write_ops: 24
            })
        );
        assert_eq!(io_stat(""), Ok(IoTotals::default()));
        assert!(io_stat("8:0 rbytes\n").is_err());
        assert!(io_stat("rbytes=1\n").is_err());
    }

    #[test]
    fn pressure_totals() {
        let text = "some avg10=1.50 avg60=0.30 avg300=0.06 total=2617677\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=364655\n";
        assert_eq!(
            pressure(text),
            Ok(Pressure {
                some_usec: Some(2_617_677),
                full_usec: Some(364_655)
            })
        );
        // Kernels before 5.13 have no cgroup CPU `full` line: no value.
        assert_eq!(
            pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"),
            Ok(Pressure {
                some_usec: Some(7),
                full_usec: None
            })
        );
        // A line a later kernel may add is read past if well-formed.
        assert_eq!(
            pressure("some total=1\nfull total=2\nirq avg10=0.00 total=3\n"),
            Ok(Pressure {
                some_usec: Some(1),
                full_usec: Some(2)
            })
        );
        assert_eq!(pressure(""), Err(ParseError::Empty));
        assert_eq!(pressure("\n \n"), Err(ParseError::Empty));
        assert_eq!(
            pressure("some avg10=0.00 avg60=0.00 avg300=0.00\n"),
            Err(ParseError::BadLine(
                "some avg10=0.00 avg60=0.00 avg300=0.00".into()
            ))
        );
        assert_eq!(
            pressure("some avg10 total=1\n"),
            Err(ParseError::BadLine("some avg10 total=1".into()))
        );
        assert_eq!(
            pressure("some total=-1\n"),
            Err(ParseError::NotANumber("-1".into()))
        );
        assert_eq!(
            pressure("some total=1.5\n"),
            Err(ParseError::NotANumber("1.5".into()))
        );
        // A flat keyed file is not a pressure file.
        assert_eq!(
            pressure("some 1\n"),
            Err(ParseError::BadLine("some 1".into()))
        );
    }

    #[test]
    fn memory_events_are_a_keyed_file() {
        let text = "low 0\nhigh 17\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(
            keyed(text, ["low", "high", "max", "oom", "oom_group_kill"]),
            Ok([Some(0), Some(17), Some(4), Some(1), Some(0)])
        );
        // Before oom_group_kill existed: that key has no value.
        assert_eq!(
            keyed(
                "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
                ["oom_group_kill"]
            ),
            Ok([None])
        );
        // v1 memory.oom_control is keyed the same way.
        assert_eq!(
            keyed(
                "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
                ["oom_kill"]
            ),
            Ok([Some(3)])
        );
    }

    #[test]
    fn blkio_sums_read_and_write() {
        let text = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Discard 0\n\
                    8:0 Total 12288\n8:16 Read 1\n8:16 Write 1\nTotal 12290\n";
        assert_eq!(blkio_throttle(text), Ok((4097, 8193)));
        assert_eq!(blkio_throttle("Total 0\n"), Ok((0, 0)));
        assert!(blkio_throttle("8:0 Read\n").is_err());
        assert!(blkio_throttle("Total x\n").is_err());
    }
}
