//! `cgmetric billing`: network traffic per container name over a period,
//! from the ledger of ended incarnations (`<state-dir>/ledger.jsonl` and its
//! rotated files) and, when the period reaches now, the running containers
//! of the mounted tree.
//!
//! Counters are cumulative per incarnation, from its cgroup's creation to
//! its removal, and the ledger keeps only their final values: an ended
//! incarnation is billed whole in the period in which it ended
//! (`since <= exited < until`), so successive periods bill each one exactly
//! once. A running container's counts so far are added only to a period
//! that reaches now; its record bills it again, whole, in the period in
//! which it ends.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cli::{BillingOptions, Format, Until};
use crate::fs::inode::RESERVED_NAMES;
use crate::ledger::{read_ledger, timestamp, Incarnation, Record};
use crate::net::class::EXTERNAL_CLASS;
use crate::report::{number, read_snapshot, ReportError, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// Occurs when `--since` is not before `--until`.
    #[error("--since {since} is not before --until {until}: the period is empty")]
    EmptyPeriod { since: String, until: String },
    /// Occurs when the ledger exists but cannot be read (permissions).
    #[error("the ledger in {}: {source}", dir.display())]
    Ledger {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// Occurs when there is neither a live tree nor a state directory: a
    /// wrong `--mount` or `--state-dir` would otherwise print an empty bill.
    #[error(
        "nothing to bill: no live cgmetric at {} and no state directory {} \
         (pass the daemon's --state-dir)",
        mount.display(),
        state_dir.display()
    )]
    NothingToBill { mount: PathBuf, state_dir: PathBuf },
    /// Occurs when a period that has ended is billed without a state
    /// directory: only the ledger bills it.
    #[error(
        "no state directory {}: a period that has ended is billed from the ledger \
         (pass the daemon's --state-dir)",
        .0.display()
    )]
    NoLedger(PathBuf),
    /// Occurs when the mounted tree cannot be read.
    #[error(transparent)]
    Live(#[from] ReportError),
}

/// The period billed: ended incarnations with `since <= exited < until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub since: Option<SystemTime>,
    pub until: Until,
}

impl Period {
    pub fn new(since: Option<SystemTime>, until: Until) -> Result<Period, BillingError> {
        if let (Some(since), Until::At(until)) = (since, until) {
            if since >= until {
                return Err(BillingError::EmptyPeriod {
                    since: timestamp(since),
                    until: timestamp(until),
                });
            }
        }
        Ok(Period { since, until })
    }

    /// Whether an incarnation that ended at `exited` is billed in it.
    pub fn holds(&self, exited: SystemTime) -> bool {
        self.since.is_none_or(|since| exited >= since)
            && match self.until {
                Until::Now => true,
                Until::At(until) => exited < until,
            }
    }

    /// Whether the running containers' counts so far belong to it: it
    /// reaches `now`.
    pub fn reaches(&self, now: SystemTime) -> bool {
        match self.until {
            Until::Now => true,
            Until::At(until) => until > now,
        }
    }
}

/// What a GB (10^9 bytes) costs: one price for all traffic, or one per
/// destination class (`--net-class`; `external` is every peer in no class).
#[derive(Debug, Clone, PartialEq)]
pub enum Prices {
    Flat(f64),
    ByClass(Vec<(String, f64)>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error(
        "{0:?} is not a price: give PRICE (0.09) or CLASS=PRICE[,CLASS=PRICE...] \
         (external=0.09,cluster=0)"
    )]
    Form(String),
    #[error("price {0:?} is not a number of at least 0")]
    Price(String),
    #[error("class {0:?} is priced twice")]
    Twice(String),
}

impl std::str::FromStr for Prices {
    type Err = PriceError;

    fn from_str(text: &str) -> Result<Prices, PriceError> {
        let price = |p: &str| match p.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(PriceError::Price(p.to_string())),
        };
        if !text.contains('=') {
            return price(text).map(Prices::Flat);
        }
        let mut classes: Vec<(String, f64)> = Vec::new();
        for pair in text.split(',') {
            let (class, value) = pair
                .split_once('=')
                .filter(|(c, _)| !c.trim().is_empty())
                .ok_or_else(|| PriceError::Form(text.to_string()))?;
            let class = class.trim().to_string();
            if classes.iter().any(|(c, _)| *c == class) {
                return Err(PriceError::Twice(class));
            }
            classes.push((class, price(value)?));
        }
        Ok(Prices::ByClass(classes))
    }
}

impl Prices {
    /// The classes priced, when priced by class.
    fn classes(&self) -> &[(String, f64)] {
        match self {
            Prices::Flat(_) => &[],
            Prices::ByClass(classes) => classes,
        }
    }
}

/// One class's traffic in a bill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassTraffic {
    pub egress_bytes: u64,
    pub ingress_bytes: u64,
}

/// One name's bill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    pub container: String,
    /// Incarnations billed: the ended ones plus the running one, if any.
    pub incarnations: u32,
    /// Whether a running container's counts so far are included.
    pub live: bool,
    pub egress_bytes: u64,
    pub ingress_bytes: u64,
    /// By priced class, when priced by class.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub classes: BTreeMap<String, ClassTraffic>,
}

/// Every name's bill, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Bill {
    pub rows: BTreeMap<String, Row>,
    /// Ended incarnations in the period without network counters (a
    /// daemon with --no-ebpf, a container without a cgroup v2 directory,
    /// or one that ended unseen without one): nothing to bill them for.
    pub without_network: usize,
}

impl Bill {
    /// The bill of `records` ended in `period` and, when it reaches now, the
    /// running containers of `live`. A record repeated in the ledger (the
    /// same incarnation, told by its v2 cgroup id, which the kernel never
    /// reuses, and its first sighting) counts once.
    ///
    /// With `classes` (the priced ones), each row also has their traffic:
    /// from the per-class counters, or, for an incarnation counted with no
    /// `--net-class`, all as `external` (every peer was in no class).
    pub fn new(live: &Snapshot, records: &[Record], period: &Period, classes: &[&str]) -> Bill {
        let mut bill = Bill::default();
        let mut seen: HashSet<Incarnation> = HashSet::new();
        for record in records {
            let Some(exited) = exited_at(record) else {
                continue;
            };
            if !period.holds(exited) {
                continue;
            }
            if record.cgroup_id.is_some() && !seen.insert(record.incarnation()) {
                continue;
            }
            let (Some(tx), rx) = (
                record.counters.get("net_bytes_tx").copied(),
                record.counters.get("net_bytes_rx").copied(),
            ) else {
                bill.without_network += 1;
                continue;
            };
            let rx = rx.unwrap_or(0);
            let counter = |file: &str| record.counters.get(file).copied();
            let split = by_class(classes, tx, rx, counter);
            bill.add(&record.name, tx, rx, false, split);
        }
        for (name, values) in live {
            if let Some(tx) = number(values, "net_bytes_tx") {
                let rx = number(values, "net_bytes_rx").unwrap_or(0);
                let split = by_class(classes, tx, rx, |file| number(values, file));
                bill.add(name, tx, rx, true, split);
            }
        }
        bill
    }

    fn add(
        &mut self,
        name: &str,
        tx: u64,
        rx: u64,
        live: bool,
        classes: Vec<(&str, ClassTraffic)>,
    ) {
        let row = self.rows.entry(name.to_string()).or_insert_with(|| Row {
            container: name.to_string(),
            ..Row::default()
        });
        row.incarnations += 1;
        row.live |= live;
        row.egress_bytes += tx;
        row.ingress_bytes += rx;
        for (class, traffic) in classes {
            let total = row.classes.entry(class.to_string()).or_default();
            total.egress_bytes += traffic.egress_bytes;
            total.ingress_bytes += traffic.ingress_bytes;
        }
    }
}

/// One incarnation's traffic in each of `classes`, from its per-class
/// counters (`counter("net_bytes_tx_<class>")`); counted with no classes,
/// all of it (`tx`, `rx`) is `external`.
fn by_class<'c>(
    classes: &[&'c str],
    tx: u64,
    rx: u64,
    counter: impl Fn(&str) -> Option<u64>,
) -> Vec<(&'c str, ClassTraffic)> {
    let external = counter("net_bytes_tx_external").is_none();
    classes
        .iter()
        .map(|class| {
            let traffic = match (external, *class == EXTERNAL_CLASS) {
                (true, true) => ClassTraffic {
                    egress_bytes: tx,
                    ingress_bytes: rx,
                },
                (true, false) => ClassTraffic::default(),
                (false, _) => ClassTraffic {
                    egress_bytes: counter(&format!("net_bytes_tx_{class}")).unwrap_or(0),
                    ingress_bytes: counter(&format!("net_bytes_rx_{class}")).unwrap_or(0),
                },
            };
            (*class, traffic)
        })
        .collect()
}

/// When a record's incarnation ended; a record whose time does not parse
/// (edited by hand) cannot be placed in a period and is skipped, with a
/// warning.
fn exited_at(record: &Record) -> Option<SystemTime> {
    match humantime::parse_rfc3339_weak(&record.exited) {
        Ok(time) => Some(time),
        Err(e) => {
            log::warn!(
                "ledger record of {} ({}): exited {:?} is not a time ({e}); skipped",
                record.name,
                record.cgroup,
                record.exited
            );
            None
        }
    }
}

/// The names both running in `live` and in a record of an incarnation that
/// ended at or after `taken` (the moment before the snapshot was read):
/// such a record may be of the very incarnation the snapshot shows, which
/// ended while it was read. Records that ended before `taken` cannot be:
/// the daemon drops a container from its list before it stamps its record,
/// and lists its containers for a snapshot after the snapshot's open.
pub fn overlap(live: &Snapshot, records: &[Record], taken: SystemTime) -> HashSet<String> {
    // Records have milliseconds: compare at that precision, rounding down,
    // so that a record stamped in the same millisecond counts as after.
    let since_epoch = taken
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let taken = SystemTime::UNIX_EPOCH + Duration::from_millis(since_epoch.as_millis() as u64);
    records
        .iter()
        .filter(|r| live.contains_key(&r.name))
        .filter(|r| humantime::parse_rfc3339_weak(&r.exited).is_ok_and(|t| t >= taken))
        .map(|r| r.name.clone())
        .collect()
}

/// How many snapshots are taken at most while containers end during them;
/// then what is left is resolved as [`gather`] says.
const SNAPSHOT_ATTEMPTS: u32 = 5;

/// The pause before the next snapshot, times the attempts so far: a
/// runtime's teardown removes a container's cgroup one hierarchy at a time,
/// and the daemon drops it from its list some milliseconds after the first.
const SNAPSHOT_PAUSE: Duration = Duration::from_millis(10);

/// The running containers (when `period` reaches now and a daemon serves
/// `mount`) and the ledger's records, with no incarnation in both and none
/// in neither.
///
/// The snapshot (`metric`) is read first, then the root is listed, which
/// runs the daemon's refresh after any refresh in flight: a container it
/// dropped from its list before the snapshot has its record written by
/// then (a record the daemon cannot write, a full disk, is written and
/// billed later). Then the ledger is read. The snapshot is taken again
/// when either check fails:
///
/// - a record of a name the snapshot shows ended since the snapshot began:
///   it may be the very incarnation the snapshot shows;
/// - a container of the listing is not in the snapshot: its cgroup was
///   being removed while it was sampled (the snapshot leaves out what it
///   cannot read whole), and it is not recorded yet. (Or it is new.)
///
/// If that keeps happening, a record wins over the running entry of its
/// name, as it holds the final counts where the entry could only be a
/// newer incarnation a few milliseconds old; and containers that could not
/// be read are named in a warning, to be billed when they end.
pub fn gather(
    mount: &Path,
    state_dir: &Path,
    period: &Period,
) -> Result<(Snapshot, Vec<Record>), BillingError> {
    let ledger = || -> Result<Vec<Record>, BillingError> {
        read_ledger(state_dir).map_err(|source| BillingError::Ledger {
            dir: state_dir.to_path_buf(),
            source,
        })
    };
    let no_state = !state_dir.is_dir();
    if !period.reaches(SystemTime::now()) {
        if no_state {
            return Err(BillingError::NoLedger(state_dir.to_path_buf()));
        }
        return Ok((Snapshot::new(), ledger()?));
    }
    if !crate::mounts::is_live_cgmetric(mount) {
        if no_state {
            return Err(BillingError::NothingToBill {
                mount: mount.to_path_buf(),
                state_dir: state_dir.to_path_buf(),
            });
        }
        log::warn!(
            "no live cgmetric at {}: billing the ledger only (running containers \
             are billed once they end and a daemon records them)",
            mount.display()
        );
        return Ok((Snapshot::new(), ledger()?));
    }
    if no_state {
        log::warn!(
            "no state directory {}: billing running containers only",
            state_dir.display()
        );
    }
    let mut attempt = 1;
    loop {
        let taken = SystemTime::now();
        let mut live = read_snapshot(mount)?;
        let listed = containers_listed(mount)?;
        let records = ledger()?;
        let overlap = overlap(&live, &records, taken);
        let unread: Vec<&String> = listed.iter().filter(|n| !live.contains_key(*n)).collect();
        if overlap.is_empty() && unread.is_empty() {
            return Ok((live, records));
        }
        if attempt == SNAPSHOT_ATTEMPTS {
            if !overlap.is_empty() {
                log::warn!(
                    "containers of these names kept ending while they were read: \
                     {overlap:?}; billed by their records"
                );
                live.retain(|name, _| !overlap.contains(name));
            }
            if !unread.is_empty() {
                log::warn!(
                    "containers that could not be read (ending, or new): {unread:?}; \
                     what they counted is billed once they end"
                );
            }
            return Ok((live, records));
        }
        log::debug!(
            "snapshot {attempt} taken again: records of running names {overlap:?}, \
             containers not in it {unread:?}"
        );
        std::thread::sleep(SNAPSHOT_PAUSE * attempt);
        attempt += 1;
    }
}

/// The containers of the tree's root listing. Listing the root also makes
/// the daemon refresh, after any refresh in flight.
fn containers_listed(mount: &Path) -> Result<HashSet<String>, BillingError> {
    let failed = |source| ReportError::Read {
        path: mount.to_path_buf(),
        source,
    };
    let mut names = HashSet::new();
    for entry in std::fs::read_dir(mount).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Containers are the directories the daemon does not own.
        if entry.file_type().map_err(failed)?.is_dir() && !RESERVED_NAMES.contains(&name.as_str()) {
            names.insert(name);
        }
    }
    Ok(names)
}

/// `bytes` in GB (10^9 bytes), exactly: nine decimals are whole bytes.
fn gb(bytes: u64) -> String {
    format!("{}.{:09}", bytes / 1_000_000_000, bytes % 1_000_000_000)
}

/// What a row costs.
fn cost(row: &Row, prices: &Prices, include_ingress: bool) -> f64 {
    let billed = |egress: u64, ingress: u64| egress + if include_ingress { ingress } else { 0 };
    match prices {
        Prices::Flat(price) => billed(row.egress_bytes, row.ingress_bytes) as f64 / 1e9 * price,
        Prices::ByClass(classes) => classes
            .iter()
            .map(|(class, price)| {
                let t = row.classes.get(class).copied().unwrap_or_default();
                billed(t.egress_bytes, t.ingress_bytes) as f64 / 1e9 * price
            })
            .sum(),
    }
}

impl Bill {
    /// Bytes in no priced class (egress, ingress): when priced by class,
    /// traffic to classes with no price, which costs nothing.
    pub fn unpriced(&self, prices: &Prices) -> (u64, u64) {
        if prices.classes().is_empty() {
            return (0, 0);
        }
        let mut unpriced = (0, 0);
        for row in self.rows.values() {
            let priced = row.classes.values().fold((0, 0), |(e, i), t| {
                (e + t.egress_bytes, i + t.ingress_bytes)
            });
            unpriced.0 += row.egress_bytes.saturating_sub(priced.0);
            unpriced.1 += row.ingress_bytes.saturating_sub(priced.1);
        }
        unpriced
    }
}

#[derive(Serialize)]
struct JsonBill<'a> {
    since: Option<String>,
    /// `null`: now, running containers included.
    until: Option<String>,
    generated: String,
    /// A number, or an object of prices by class.
    price_per_gb: serde_json::Value,
    include_ingress: bool,
    containers: Vec<JsonRow<'a>>,
    total_egress_bytes: u64,
    total_ingress_bytes: u64,
    total_cost: f64,
}

/// A cost as CSV prints it, to millionths: JSON readers get `1.402431`,
/// not the float's last digits (`1.40243121198`).
fn millionths(cost: f64) -> f64 {
    (cost * 1e6).round() / 1e6
}

#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    row: &'a Row,
    cost: f64,
}

/// The bill as a table (with a total), CSV or JSON. CSV keeps the columns
/// of earlier versions first, so scripts that read them by position go on.
pub fn render(
    bill: &Bill,
    period: &Period,
    generated: SystemTime,
    prices: &Prices,
    include_ingress: bool,
    format: Format,
) -> String {
    let rows: Vec<(&Row, f64)> = bill
        .rows
        .values()
        .map(|row| (row, cost(row, prices, include_ingress)))
        .collect();
    let total_cost: f64 = rows.iter().map(|r| r.1).sum();
    let total_egress: u64 = rows.iter().map(|r| r.0.egress_bytes).sum();
    let total_ingress: u64 = rows.iter().map(|r| r.0.ingress_bytes).sum();
    let mut out = String::new();
    match format {
        Format::Csv => {
            out.push_str(
                "container,egress_gb,ingress_gb,cost,incarnations,live,egress_bytes,ingress_bytes",
            );
            // Priced by class: each class's bytes, after the columns above.
            for (class, _) in prices.classes() {
                let _ = write!(out, ",egress_bytes_{class},ingress_bytes_{class}");
            }
            out.push('\n');
            for (row, cost) in &rows {
                let _ = write!(
                    out,
                    "{},{},{},{cost:.6},{},{},{},{}",
                    csv_field(&row.container),
                    gb(row.egress_bytes),
                    gb(row.ingress_bytes),
                    row.incarnations,
                    u8::from(row.live),
                    row.egress_bytes,
                    row.ingress_bytes
                );
                for (class, _) in prices.classes() {
                    let t = row.classes.get(class).copied().unwrap_or_default();
                    let _ = write!(out, ",{},{}", t.egress_bytes, t.ingress_bytes);
                }
                out.push('\n');
            }
        }
        Format::Table => {
            let width = rows
                .iter()
                .map(|r| r.0.container.chars().count())
                .max()
                .unwrap_or(0)
                .max(9);
            let _ = writeln!(
                out,
                "{:<width$} {:>4} {:>4} {:>16} {:>16} {:>12}",
                "CONTAINER", "RUNS", "LIVE", "EGRESS GB", "INGRESS GB", "COST"
            );
            for (row, cost) in &rows {
                let _ = writeln!(
                    out,
                    "{:<width$} {:>4} {:>4} {:>16} {:>16} {cost:>12.4}",
                    row.container,
                    row.incarnations,
                    if row.live { "yes" } else { "" },
                    gb(row.egress_bytes),
                    gb(row.ingress_bytes),
                );
            }
            let runs: u32 = rows.iter().map(|r| r.0.incarnations).sum();
            let _ = writeln!(
                out,
                "{:<width$} {runs:>4} {:>4} {:>16} {:>16} {total_cost:>12.4}",
                "TOTAL",
                "",
                gb(total_egress),
                gb(total_ingress),
            );
        }
        Format::Json => {
            let json = JsonBill {
                since: period.since.map(timestamp),
                until: match period.until {
                    Until::Now => None,
                    Until::At(until) => Some(timestamp(until)),
                },
                generated: timestamp(generated),
                price_per_gb: match prices {
                    Prices::Flat(price) => serde_json::json!(price),
                    Prices::ByClass(classes) => serde_json::Value::Object(
                        classes
                            .iter()
                            .map(|(c, p)| (c.clone(), serde_json::json!(p)))
                            .collect(),
                    ),
                },
                include_ingress,
                containers: rows
                    .iter()
                    .map(|(row, cost)| JsonRow {
                        row,
                        cost: millionths(*cost),
                    })
                    .collect(),
                total_egress_bytes: total_egress,
                total_ingress_bytes: total_ingress,
                total_cost: millionths(total_cost),
            };
            // Serialising plain structs of strings and numbers cannot fail.
            out = serde_json::to_string_pretty(&json).expect("a bill serialises");
            out.push('\n');
        }
    }
    out
}

/// Quotes a CSV field that needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub fn billing(options: &BillingOptions) -> Result<(), BillingError> {
    let period = Period::new(options.since, options.until.unwrap_or(Until::Now))?;
    let (live, records) = gather(&options.mount, &options.state_dir, &period)?;
    let generated = SystemTime::now();
    let classes: Vec<&str> = options
        .price_per_gb
        .classes()
        .iter()
        .map(|(c, _)| c.as_str())
        .collect();
    let bill = Bill::new(&live, &records, &period, &classes);
    if bill.without_network > 0 {
        log::warn!(
            "{} ended incarnations in the period have no network counters: not billed",
            bill.without_network
        );
    }
    let (egress, ingress) = bill.unpriced(&options.price_per_gb);
    if egress > 0 || (options.include_ingress && ingress > 0) {
        log::warn!(
            "{egress} bytes sent and {ingress} received went to classes without a price: \
             they cost nothing in this bill"
        );
    }
    print!(
        "{}",
        render(
            &bill,
            &period,
            generated,
            &options.price_per_gb,
            options.include_ingress,
            options.format
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_time;
    use crate::report::parse_metric;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    fn record(name: &str, v2: u64, exited: &str, tx: u64, rx: u64) -> Record {
        Record {
            name: name.into(),
            id: v2.to_string(),
            runtime: "cgroup".into(),
            cgroup: format!("/tenants/{name}"),
            cgroup_id: Some(v2),
            first_seen: "2026-11-01T00:00:00.000Z".into(),
            exited: exited.into(),
            recovered: false,
            counters: BTreeMap::from([("net_bytes_tx".into(), tx), ("net_bytes_rx".into(), rx)]),
        }
    }

    #[test]
    fn times_operators_write() {
        let now = at("2026-11-27T12:00:00Z");
        let time = |text| match parse_time(text, now).unwrap() {
            Until::At(t) => t,
            Until::Now => panic!("{text} is not now"),
        };
        assert_eq!(time("2026-11-01T00:00:00Z"), at("2026-11-01T00:00:00Z"));
        assert_eq!(time("2026-11-01"), at("2026-11-01T00:00:00Z"));
        assert_eq!(time("2026-11-01 08:30:00"), at("2026-11-01T08:30:00Z"));
        assert_eq!(
            time("2026-11-01T01:00:00.250+01:00"),
            at("2026-11-01T00:00:00.250Z")
        );
        assert_eq!(
            time("2026-10-31T19:30:00-04:30"),
            at("2026-11-01T00:00:00Z")
        );
        assert_eq!(time("24h"), at("2026-11-26T12:00:00Z"));
        assert_eq!(time("7d"), at("2026-11-20T12:00:00Z"));
        assert_eq!(time("1h 30m"), at("2026-11-27T10:30:00Z"));
        assert_eq!(parse_time("now", now).unwrap(), Until::Now);
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-11-01T00:00:00+25:00",
            "2026-11-01T00:00:00+1:000",
            "",
            "2026-11-01T00:00:00Zü",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad:?}");
        }
        assert!(parse_time("100000d", now).is_err(), "before 1970");
    }

    #[test]
    fn a_period_holds_what_ended_in_it_and_excludes_its_end() {
        let period = Period::new(
            Some(at("2026-11-01T00:00:00Z")),
            Until::At(at("2026-12-01T00:00:00Z")),
        )
        .unwrap();
        assert!(period.holds(at("2026-11-01T00:00:00Z")));
        assert!(period.holds(at("2026-11-30T23:59:59.999Z")));
        assert!(!period.holds(at("2026-12-01T00:00:00Z")));
        assert!(!period.holds(at("2026-10-31T23:59:59.999Z")));
        assert!(!period.reaches(at("2026-12-01T00:00:00Z")));
        assert!(period.reaches(at("2026-11-27T00:00:00Z")));
        assert!(Period::new(None, Until::Now)
            .unwrap()
            .reaches(SystemTime::now()));
        let empty = Period::new(
            Some(at("2026-12-01T00:00:00Z")),
            Until::At(at("2026-12-01T00:00:00Z")),
        );
        assert!(matches!(empty, Err(BillingError::EmptyPeriod { .. })));
    }

    #[test]
    fn every_incarnation_of_a_name_in_the_period_is_billed_once() {
        let live = parse_metric(
            "job_net_bytes_tx 1000\njob_net_bytes_rx 10\nidle_cpu_usage_usec 5\n\
             new_net_bytes_tx 7\nnew_net_bytes_rx 3\n",
        );
        let mut no_network = record("quiet", 9, "2026-11-10T00:00:00.000Z", 0, 0);
        no_network.counters.clear();
        let records = [
            record("job", 1, "2026-10-31T23:59:59.999Z", 100_000, 1),
            record("job", 2, "2026-11-02T00:00:00.000Z", 200_000, 2),
            record("job", 3, "2026-11-03T00:00:00.000Z", 300_000, 3),
            // The same incarnation again: counted once.
            record("job", 3, "2026-11-04T00:00:00.000Z", 300_000, 3),
            record("other", 4, "2026-11-05T00:00:00.000Z", 5, 6),
            no_network,
        ];
        let open = Period::new(Some(at("2026-11-01T00:00:00Z")), Until::Now).unwrap();
        let bill = Bill::new(&live, &records, &open, &[]);
        let job = &bill.rows["job"];
        assert_eq!(
            (
                job.incarnations,
                job.live,
                job.egress_bytes,
                job.ingress_bytes
            ),
            (3, true, 501_000, 15)
        );
        assert_eq!(bill.rows["other"].incarnations, 1);
        assert!(bill.rows["new"].live && bill.rows["new"].incarnations == 1);
        assert!(!bill.rows.contains_key("idle"), "no network: no bill");
        assert_eq!(bill.without_network, 1);

        // A closed period: only what ended in it, no running containers.
        let november = Period::new(
            Some(at("2026-11-01T00:00:00Z")),
            Until::At(at("2026-11-03T00:00:00Z")),
        )
        .unwrap();
        let (live, records) = (Snapshot::new(), &records[..]);
        let bill = Bill::new(&live, records, &november, &[]);
        assert_eq!(bill.rows.len(), 1);
        assert_eq!(bill.rows["job"].egress_bytes, 200_000);
        assert!(!bill.rows["job"].live);
    }

    #[test]
    fn a_record_ended_during_the_snapshot_overlaps_its_running_entry() {
        let live = parse_metric("job_net_bytes_tx 1000\njob_net_bytes_rx 10\n");
        let taken = at("2026-11-27T12:00:00.123456Z");
        let records = [
            // Ended before the snapshot began: another incarnation.
            record("job", 1, "2026-11-27T12:00:00.122Z", 10, 1),
            // Not running: no overlap whenever it ended.
            record("gone", 2, "2026-11-27T12:00:01.000Z", 10, 1),
        ];
        assert!(overlap(&live, &records, taken).is_empty());
        // Stamped in the snapshot's own millisecond: maybe the same.
        let same = record("job", 3, "2026-11-27T12:00:00.123Z", 1000, 10);
        assert_eq!(
            overlap(&live, &[same], taken),
            HashSet::from(["job".to_string()])
        );
    }

    #[test]
    fn bills_as_table_csv_and_json_with_exact_bytes() {
        let live = parse_metric("web,1_net_bytes_tx 2000000001\nweb,1_net_bytes_rx 500000000\n");
        let records = [
            record("web,1", 1, "2026-11-02T00:00:00.000Z", 1, 0),
            record(
                "batch",
                2,
                "2026-11-02T00:00:00.000Z",
                12_482_113_902,
                912_332_101,
            ),
        ];
        let period = Period::new(Some(at("2026-11-01T00:00:00Z")), Until::Now).unwrap();
        let bill = Bill::new(&live, &records, &period, &[]);
        let generated = at("2026-11-27T12:00:00Z");
        let prices = Prices::Flat(0.09);
        let render = |format, ingress| render(&bill, &period, generated, &prices, ingress, format);

        assert_eq!(
            render(Format::Csv, false),
            "container,egress_gb,ingress_gb,cost,incarnations,live,egress_bytes,ingress_bytes\n\
             batch,12.482113902,0.912332101,1.123390,1,0,12482113902,912332101\n\
             \"web,1\",2.000000002,0.500000000,0.180000,2,1,2000000002,500000000\n"
        );
        assert!(render(Format::Csv, true).contains(",2.000000002,0.500000000,0.225000,"));

        let table = render(Format::Table, false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CONTAINER") && lines[0].contains("RUNS"));
        let cells =
            |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_string).collect() };
        assert_eq!(
            cells(lines[1]),
            ["batch", "1", "12.482113902", "0.912332101", "1.1234"]
        );
        assert_eq!(
            cells(lines[2]),
            ["web,1", "2", "yes", "2.000000002", "0.500000000", "0.1800"]
        );
        assert_eq!(
            cells(lines[3]),
            ["TOTAL", "3", "14.482113904", "1.412332101", "1.3034"]
        );

        let json: serde_json::Value = serde_json::from_str(&render(Format::Json, false)).unwrap();
        assert_eq!(json["since"], "2026-11-01T00:00:00.000Z");
        assert_eq!(json["until"], serde_json::Value::Null);
        assert_eq!(json["generated"], "2026-11-27T12:00:00.000Z");
        let web = &json["containers"][1];
        assert_eq!(web["container"], "web,1");
        assert_eq!(web["incarnations"], 2);
        assert_eq!(web["live"], true);
        assert_eq!(web["egress_bytes"], 2_000_000_002u64);
        assert_eq!(web["ingress_bytes"], 500_000_000u64);
        assert_eq!(web["cost"].as_f64(), Some(0.18));
        assert_eq!(json["total_cost"].as_f64(), Some(1.30339));
        assert_eq!(json["total_egress_bytes"], 14_482_113_904u64);
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn prices_are_one_or_by_class() {
        assert_eq!("0.09".parse(), Ok(Prices::Flat(0.09)));
        assert_eq!(
            "external=0.09, cluster=0".parse(),
            Ok(Prices::ByClass(vec![
                ("external".into(), 0.09),
                ("cluster".into(), 0.0)
            ]))
        );
        for bad in ["-1", "x", "nan", "inf", "=1", "a=1,a=2", "a=-0.5", "a"] {
            assert!(bad.parse::<Prices>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bill_by_class_prices_each_class_and_counts_classless_traffic_as_external() {
        // Running: split by class in `metric` (as a daemon with
        // --net-class lan=... renders it).
        let live = parse_metric(
            "web_net_bytes_tx 3000000000\nweb_net_bytes_rx 30\n\
             web_net_bytes_tx_lan 1000000000\nweb_net_bytes_tx_loopback 0\n\
             web_net_bytes_tx_external 2000000000\nweb_net_bytes_rx_lan 10\n\
             web_net_bytes_rx_loopback 0\nweb_net_bytes_rx_external 20\n",
        );
        // Ended: one counted with classes, one without (all external).
        let mut split = record("web", 1, "2026-11-02T00:00:00.000Z", 500, 5);
        split.counters.extend([
            ("net_bytes_tx_lan".into(), 400),
            ("net_bytes_tx_external".into(), 100),
            ("net_bytes_rx_lan".into(), 5),
            ("net_bytes_rx_external".into(), 0),
        ]);
        let classless = record("web", 2, "2026-11-03T00:00:00.000Z", 7000, 70);
        let period = Period::new(Some(at("2026-11-01T00:00:00Z")), Until::Now).unwrap();
        let prices: Prices = "external=0.09,lan=0.01".parse().unwrap();
        let bill = Bill::new(&live, &[split, classless], &period, &["external", "lan"]);
        let web = &bill.rows["web"];
        assert_eq!(web.incarnations, 3);
        assert_eq!(
            web.classes["external"],
            ClassTraffic {
                egress_bytes: 2_000_000_000 + 100 + 7000,
                ingress_bytes: 20 + 70
            }
        );
        assert_eq!(
            web.classes["lan"],
            ClassTraffic {
                egress_bytes: 1_000_000_000 + 400,
                ingress_bytes: 15
            }
        );
        // loopback has no price: its bytes (none here) cost nothing.
        assert_eq!(bill.unpriced(&prices), (0, 0));
        let cost = cost(web, &prices, false);
        let want = 2_000_007_100.0 / 1e9 * 0.09 + 1_000_000_400.0 / 1e9 * 0.01;
        assert!((cost - want).abs() < 1e-12, "{cost} vs {want}");

        let generated = at("2026-11-27T12:00:00Z");
        let csv = render(&bill, &period, generated, &prices, false, Format::Csv);
        let mut lines = csv.lines();
        assert!(lines.next().unwrap().ends_with(
            ",egress_bytes_external,ingress_bytes_external,egress_bytes_lan,ingress_bytes_lan"
        ));
        assert!(lines
            .next()
            .unwrap()
            .ends_with(",2000007100,90,1000000400,15"));
        let json: serde_json::Value = serde_json::from_str(&render(
            &bill,
            &period,
            generated,
            &prices,
            false,
            Format::Json,
        ))
        .unwrap();
        assert_eq!(json["price_per_gb"]["lan"].as_f64(), Some(0.01));
        assert_eq!(
            json["containers"][0]["classes"]["lan"]["egress_bytes"],
            1_000_000_400u64
        );
        // Priced by class, the classes not priced are no cost, and said.
        let only_lan: Prices = "lan=0.01".parse().unwrap();
        let bill = Bill::new(&live, &[], &period, &["lan"]);
        assert_eq!(bill.unpriced(&only_lan), (2_000_000_000, 20));
    }
}
