//! The durable state under `--state-dir`: the billing ledger
//! (`ledger.jsonl`, one JSON line per ended incarnation of a container) and
//! the index of the containers the daemon knows (`containers.json`), from
//! which the next start records the containers that ended while no daemon
//! ran.
//!
//! Every record is written and fsync'd before the eBPF entries it was read
//! from are swept. A record that cannot be written (a full disk) stays
//! pending, in memory, and is written at the next attempt; each failure is
//! counted ([`Ledger::write_errors`]) and logged, never fatal. The ledger is
//! bounded: when `ledger.jsonl` would grow past [`ROTATE_BYTES`] it becomes
//! `ledger.jsonl.1` (`.1` becomes `.2`, ...), and [`KEEP_ROTATED`] old files
//! are kept.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The ledger's file name in the state directory.
pub const LEDGER_FILE: &str = "ledger.jsonl";
/// The index of known containers, replaced atomically.
pub const INDEX_FILE: &str = "containers.json";
/// When `ledger.jsonl` would grow past this, it is rotated.
pub const ROTATE_BYTES: u64 = 16 << 20;
/// How many rotated files (`ledger.jsonl.1` ...) are kept.
pub const KEEP_ROTATED: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Occurs when the state directory cannot be created or written.
    #[error("--state-dir {}: {source} (the billing ledger needs a writable directory)", path.display())]
    Unwritable { path: PathBuf, source: io::Error },
}

/// One ended incarnation of a container, as one line of `ledger.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its directory name when it ended.
    pub name: String,
    /// The runtime's container id (a `--cgroup` container's cgroup id).
    pub id: String,
    pub runtime: String,
    /// Its cgroup path relative to the hierarchy roots, with a leading `/`.
    pub cgroup: String,
    /// The inode number of its cgroup v2 directory (eBPF's key), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// When the daemon first saw it (RFC 3339, UTC).
    pub first_seen: String,
    /// When the daemon saw it end (RFC 3339, UTC); for a `recovered`
    /// record, when the next start found it gone.
    pub exited: String,
    /// Recorded at a later start: it ended while no daemon ran, and only
    /// the counters the pinned eBPF maps kept are known.
    #[serde(default, skip_serializing_if = "is_false")]
    pub recovered: bool,
    /// Every final counter, by file name (`net_bytes_tx`, `cpu_usage_usec`...).
    /// (Names are borrowed from the catalogue when written: no allocation
    /// per counter.)
    pub counters: BTreeMap<Cow<'static, str>, u64>,
}

/// What tells incarnations apart: cgroup path, id, v2 id, first seen.
pub type Incarnation = (String, String, Option<u64>, String);

impl Record {
    pub fn incarnation(&self) -> Incarnation {
        (
            self.cgroup.clone(),
            self.id.clone(),
            self.cgroup_id,
            self.first_seen.clone(),
        )
    }
}

impl Known {
    pub fn incarnation(&self) -> Incarnation {
        (
            self.cgroup.clone(),
            self.id.clone(),
            self.cgroup_id,
            self.first_seen.clone(),
        )
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the index remembers of a live container: enough to record it if it
/// ends while no daemon runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub name: String,
    pub id: String,
    pub runtime: String,
    pub cgroup: String,
    pub cgroup_id: Option<u64>,
    pub first_seen: String,
    /// The container's slot (whence its inode numbers) under the server
    /// that wrote the index: the next server on the same mount
    /// gives it the same one, so the names the kernel keeps still lead to
    /// it. A cgroup's key can differ between two walks (on a hybrid host
    /// its v2 directory may appear after its v1 ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    containers: Vec<Known>,
}

/// `time` as RFC 3339 UTC with milliseconds.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

pub struct Ledger {
    dir: PathBuf,
    inner: Mutex<Inner>,
    write_errors: AtomicU64,
}

struct Inner {
    /// Records not yet on disk, oldest first.
    pending: Vec<Record>,
    /// The index as last written, to skip writing it unchanged.
    index: Option<Vec<Known>>,
    /// When the last write failed, if it did: retried a second later at
    /// the soonest, so a full disk costs one attempt and one warning a
    /// second, not one per read.
    failed_at: Option<Instant>,
}

/// How long after a failed write the next is tried.
const RETRY: Duration = Duration::from_secs(1);

impl Ledger {
    /// Opens (creating it when missing) the state directory `dir` and checks
    /// that the ledger can be written there.
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        let unwritable = |source| LedgerError::Unwritable {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(unwritable)?;
        // Opening for append proves the ledger writable; a crash may have
        // left a torn last line, which is ended so the next record stands
        // on a line of its own.
        let ledger = dir.join(LEDGER_FILE);
        let mut file = open_append(&ledger).map_err(unwritable)?;
        end_torn_line(&ledger, &mut file).map_err(unwritable)?;
        // And the index is replaced through a temporary file.
        let probe = dir.join(format!(".{INDEX_FILE}.probe"));
        File::create(&probe).map_err(unwritable)?;
        let _ = std::fs::remove_file(&probe);
        Ok(Ledger {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                pending: Vec::new(),
                index: None,
                failed_at: None,
            }),
            write_errors: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` (after any still pending) and writes them out;
    /// what cannot be written stays pending for a later call. Returns
    /// whether nothing is left pending.
    pub fn record(&self, records: impl IntoIterator<Item = Record>) -> bool {
        let mut inner = self.inner.lock();
        inner.pending.extend(records);
        self.flush_locked(&mut inner)
    }

    /// What the index must keep of the records still pending: should the
    /// daemon die before they are written, the next start records them.
    pub fn pending_known(&self) -> Vec<Known> {
        self.inner
            .lock()
            .pending
            .iter()
            .filter(|r| !r.recovered)
            .map(|r| Known {
                name: r.name.clone(),
                id: r.id.clone(),
                runtime: r.runtime.clone(),
                cgroup: r.cgroup.clone(),
                cgroup_id: r.cgroup_id,
                first_seen: r.first_seen.clone(),
                slot: None,
            })
            .collect()
    }

    /// Writes what is pending. Returns whether nothing is left pending.
    pub fn flush(&self) -> bool {
        let mut inner = self.inner.lock();
        self.flush_locked(&mut inner)
    }

    /// How many records wait to be written.
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// Writes that failed since the start (`cgmetric_ledger_write_errors_total`).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    fn flush_locked(&self, inner: &mut Inner) -> bool {
        if inner.pending.is_empty() {
            return true;
        }
        if inner.failed_at.is_some_and(|at| at.elapsed() < RETRY) {
            return false;
        }
        match self.write_lines(&inner.pending) {
            Ok(()) => {
                if inner.failed_at.take().is_some() {
                    log::info!(
                        "ledger {}: written again ({} pending records)",
                        self.path().display(),
                        inner.pending.len()
                    );
                }
                inner.pending.clear();
                true
            }
            Err(e) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "ledger {}: {e}; {} records stay pending and are retried",
                    self.path().display(),
                    inner.pending.len()
                );
                inner.failed_at = Some(Instant::now());
                false
            }
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// Appends one line per record and fsyncs; on failure the file is cut
    /// back to where it was, so no torn line is left for the next write to
    /// follow.
    fn write_lines(&self, records: &[Record]) -> io::Result<()> {
        let mut text = String::new();
        for record in records {
            text.push_str(&serde_json::to_string(record).map_err(io::Error::other)?);
            text.push('\n');
        }
        let path = self.path();
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        if size > 0 && size + text.len() as u64 > ROTATE_BYTES {
            self.rotate()?;
        }
        let mut file = open_append(&path)?;
        let before = file.metadata()?.len();
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(before);
            return Err(e);
        }
        Ok(())
    }

    /// `ledger.jsonl` becomes `.1`, `.1` becomes `.2`, ...; the oldest
    /// beyond [`KEEP_ROTATED`] is dropped.
    fn rotate(&self) -> io::Result<()> {
        let numbered = |n: u32| self.dir.join(format!("{LEDGER_FILE}.{n}"));
        let _ = std::fs::remove_file(numbered(KEEP_ROTATED));
        for n in (1..KEEP_ROTATED).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(self.path(), numbered(1))?;
        sync_dir(&self.dir)
    }

    /// Every record of the ledger, oldest first (rotated files included).
    /// A line that is not a record (torn by a crash, edited by hand) is
    /// skipped with a warning.
    pub fn read_all(&self) -> Vec<Record> {
        read_ledger(&self.dir).unwrap_or_else(|e| {
            log::warn!("ledger in {}: {e}", self.dir.display());
            Vec::new()
        })
    }

    /// The records of the current file, `ledger.jsonl`, oldest first.
    pub fn read_current(&self) -> Vec<Record> {
        match File::open(self.path()) {
            Ok(file) => read_records(BufReader::new(file), &self.path()),
            Err(_) => Vec::new(),
        }
    }

    /// The containers the last daemon knew (empty if none, or unreadable).
    pub fn read_index(&self) -> Vec<Known> {
        let path = self.dir.join(INDEX_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                log::warn!(
                    "{}: {e}; containers that ended meanwhile are not recorded",
                    path.display()
                );
                return Vec::new();
            }
        };
        match serde_json::from_str::<Index>(&text) {
            Ok(index) => index.containers,
            Err(e) => {
                log::warn!("{}: not an index ({e}); ignored", path.display());
                Vec::new()
            }
        }
    }

    /// Replaces the index with `known`, atomically (a temporary file renamed
    /// over it). Unchanged, it is not written again; a failure is a warning
    /// and a write error, retried at the next change. Not fsync'd: it only
    /// matters together with the pinned eBPF maps, which live in memory and
    /// do not survive what would lose a rename (a power loss).
    pub fn write_index(&self, mut known: Vec<Known>) {
        known.sort_by(|a, b| a.cgroup.cmp(&b.cgroup).then(a.cgroup_id.cmp(&b.cgroup_id)));
        let mut inner = self.inner.lock();
        if inner.index.as_ref() == Some(&known) {
            return;
        }
        let index = Index { containers: known };
        match self.replace_index(&index) {
            Ok(()) => inner.index = Some(index.containers),
            Err(e) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                inner.index = None;
                log::warn!(
                    "{}: {e}; retried at the next change",
                    self.dir.join(INDEX_FILE).display()
                );
            }
        }
    }

    fn replace_index(&self, index: &Index) -> io::Result<()> {
        let path = self.dir.join(INDEX_FILE);
        let tmp = self.dir.join(format!(".{INDEX_FILE}.tmp"));
        let text = serde_json::to_vec(index).map_err(io::Error::other)?;
        let result = (|| {
            File::create(&tmp)?.write_all(&text)?;
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Ends a last line a crash left without its newline.
fn end_torn_line(path: &Path, file: &mut File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut reader = File::open(path)?;
    reader.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8];
    reader.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Every record of the ledger in the state directory `dir`, oldest first:
/// the rotated files (`ledger.jsonl.4` ... `.1`), then `ledger.jsonl`. It
/// only reads, so it serves readers other than the daemon (`cgmetric
/// billing`) while a daemon appends. Missing files are no records; a line
/// that is not a record (torn by a crash, edited by hand) is skipped with a
/// warning. A rotation while it reads would shift records between files
/// already read and not yet read, so the files are read again when
/// `ledger.jsonl` was replaced meanwhile.
pub fn read_ledger(dir: &Path) -> io::Result<Vec<Record>> {
    use std::os::unix::fs::MetadataExt;
    let current = dir.join(LEDGER_FILE);
    let identity = || match std::fs::metadata(&current) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let mut records = Vec::new();
    for _ in 0..READ_ATTEMPTS {
        let before = identity()?;
        records.clear();
        for n in (1..=KEEP_ROTATED).rev() {
            records.extend(read_file(&dir.join(format!("{LEDGER_FILE}.{n}")))?);
        }
        records.extend(read_file(&current)?);
        if identity()? == before {
            break;
        }
    }
    Ok(records)
}

/// How often [`read_ledger`] reads again when a rotation overlapped its
/// read: rotations are 16 MiB apart, so a second read overlapping one
/// too means the ledger is written faster than it can be read.
const READ_ATTEMPTS: usize = 3;

/// The records of one ledger file; none if it does not exist.
fn read_file(path: &Path) -> io::Result<Vec<Record>> {
    match File::open(path) {
        Ok(file) => Ok(read_records(BufReader::new(file), path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// The records of one ledger file; other lines are skipped with a warning.
pub fn read_records(reader: impl BufRead, path: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    for (number, line) in reader.split(b'\n').enumerate() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                log::warn!("{}: {e}; the rest is skipped", path.display());
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => records.push(record),
            Err(e) => log::warn!(
                "{} line {}: not a ledger record ({e}); skipped",
                path.display(),
                number + 1
            ),
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, tx: u64) -> Record {
        Record {
            name: name.into(),
            id: "1234".into(),
            runtime: "cgroup".into(),
            cgroup: format!("/tenants/{name}"),
            cgroup_id: Some(1234),
            first_seen: "2026-11-27T20:00:00.000Z".into(),
            exited: "2026-11-27T21:00:00.000Z".into(),
            recovered: false,
            counters: BTreeMap::from([("net_bytes_tx".into(), tx)]),
        }
    }

    #[test]
    fn records_round_trip_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.record([record("a", 1), record("b", 2)]);
        ledger.record([record("a", 3)]);
        let text = std::fs::read_to_string(dir.path().join(LEDGER_FILE)).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().next().unwrap().starts_with("{\"name\":\"a\""));
        assert_eq!(
            ledger.read_all(),
            [record("a", 1), record("b", 2), record("a", 3)]
        );
        assert_eq!(ledger.write_errors(), 0);
    }

    #[test]
    fn malformed_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::to_string(&record("a", 7)).unwrap();
        let torn = &good[..good.len() / 2];
        let text = format!(
            "{good}\nnot json\n{{\"name\":\"x\"}}\n\n[1,2]\n\u{0}\u{ff}garbage\n{good}\n{torn}"
        );
        std::fs::write(dir.path().join(LEDGER_FILE), text).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.read_all(), [record("a", 7), record("a", 7)]);
        // The torn last line was ended at open: the next record is whole.
        ledger.record([record("b", 8)]);
        assert_eq!(
            ledger.read_all(),
            [record("a", 7), record("a", 7), record("b", 8)]
        );
        // Invalid UTF-8 and binary junk never panic either.
        let junk = b"\xff\xfe{\"name\":\n\x00\x01\n";
        assert!(read_records(&junk[..], Path::new("junk")).is_empty());
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        // Records of about 1 MiB: a file holds 15 of them.
        let mut big = record("big", 0);
        big.name = "x".repeat(1 << 20);
        for n in 0..(16 * (KEEP_ROTATED as u64 + 2)) {
            big.counters.insert("net_bytes_tx".into(), n);
            ledger.record([big.clone()]);
        }
        for n in 1..=KEEP_ROTATED {
            let rotated = dir.path().join(format!("{LEDGER_FILE}.{n}"));
            assert!(rotated.exists(), "{}", rotated.display());
            assert!(std::fs::metadata(&rotated).unwrap().len() <= ROTATE_BYTES);
        }
        assert!(!dir
            .path()
            .join(format!("{LEDGER_FILE}.{}", KEEP_ROTATED + 1))
            .exists());
        let all = ledger.read_all();
        // Oldest first, and the newest is the last written.
        let tx: Vec<u64> = all.iter().map(|r| r.counters["net_bytes_tx"]).collect();
        assert!(tx.windows(2).all(|w| w[0] < w[1]), "{tx:?}");
        assert_eq!(*tx.last().unwrap(), 16 * (KEEP_ROTATED as u64 + 2) - 1);
    }

    #[test]
    fn a_reader_reads_every_file_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_ledger(&dir.path().join("none")).unwrap().is_empty());
        let good = serde_json::to_string(&record("old", 1)).unwrap();
        std::fs::write(
            dir.path().join(format!("{LEDGER_FILE}.2")),
            format!("{good}\n"),
        )
        .unwrap();
        let newer = serde_json::to_string(&record("new", 2)).unwrap();
        // A torn last line is skipped, and left as it is: only the daemon
        // ends it.
        let text = format!("{newer}\n{}", &newer[..9]);
        std::fs::write(dir.path().join(LEDGER_FILE), &text).unwrap();
        assert_eq!(
            read_ledger(dir.path()).unwrap(),
            [record("old", 1), record("new", 2)]
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LEDGER_FILE)).unwrap(),
            text
        );
    }

    #[test]
    fn the_index_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert!(ledger.read_index().is_empty());
        let known = Known {
            name: "a".into(),
            id: "1".into(),
            runtime: "cgroup".into(),
            cgroup: "/t/a".into(),
            cgroup_id: Some(1),
            first_seen: timestamp(SystemTime::now()),
            slot: Some(7),
        };
        ledger.write_index(vec![known.clone()]);
        assert_eq!(ledger.read_index(), [known]);
        std::fs::write(dir.path().join(INDEX_FILE), "{\"containers\": [").unwrap();
        assert!(ledger.read_index().is_empty());
        assert!(!dir.path().join(format!(".{INDEX_FILE}.tmp")).exists());
    }

    #[test]
    fn an_unwritable_state_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let error = Ledger::open(&file.join("state")).err().unwrap();
        assert!(error.to_string().contains("--state-dir"), "{error}");
        assert!(Ledger::open(&file).is_err());
    }
}
