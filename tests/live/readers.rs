//! Every way a program reads a file gets the whole value: `read` in any
//! chunk size, `pread`, `sendfile`, `splice`, `copy_file_range`, `mmap`,
//! `std::io::copy` into a pipe, and real programs nobody here wrote (busybox
//! and GNU `cat`, GNU `tar`, `grep -r`, Python), over container files, the
//! `cgroup/` tree and every aggregate, including values whose length
//! changes between reads.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{Cgroup, Daemon};

/// A reader: its name and how it reads a whole file.
type Reader = (&'static str, fn(&Path) -> Result<Vec<u8>, String>);

/// The readers every kernel in the matrix has (the guests have no Python).
const READERS: &[Reader] = &[
    ("std::fs::read", |p| fs::read(p).map_err(|e| e.to_string())),
    ("read in 7-byte chunks", |p| chunks(p, 7)),
    ("pread at every offset", pread_all),
    ("sendfile to a file", sendfile_all),
    ("splice into a pipe", splice_all),
    ("copy_file_range", copy_file_range_all),
    ("mmap of st_size bytes", mmap_all),
    ("std::io::copy into a pipe", io_copy_to_pipe),
    ("busybox cat", |p| run("busybox", &["cat"], p)),
    ("GNU cat", |p| run("cat", &[], p)),
    ("GNU tar", tar_roundtrip),
    ("grep -r", grep_r),
];

/// Python, on the host only.
const PYTHON_READERS: &[Reader] = &[
    ("python read()", |p| {
        python(
            "import sys; sys.stdout.buffer.write(open(sys.argv[1],'rb').read())",
            p,
        )
    }),
    ("python shutil.copyfile", |p| {
        python(
            "import shutil, sys, tempfile\n\
             t = tempfile.NamedTemporaryFile()\n\
             shutil.copyfile(sys.argv[1], t.name)\n\
             sys.stdout.buffer.write(open(t.name, 'rb').read())",
            p,
        )
    }),
    ("python sendfile", |p| {
        python(
            "import os, sys, tempfile\n\
             fd = os.open(sys.argv[1], os.O_RDONLY); t = tempfile.TemporaryFile()\n\
             while os.sendfile(t.fileno(), fd, None, 1 << 20): pass\n\
             t.seek(0); sys.stdout.buffer.write(t.read())",
            p,
        )
    }),
];

fn chunks(path: &Path, size: usize) -> Result<Vec<u8>, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = vec![0; size];
    loop {
        match file.read(&mut buf).map_err(|e| e.to_string())? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn pread_all(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match file
            .read_at(&mut buf, out.len() as u64)
            .map_err(|e| e.to_string())?
        {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Drains `read_end` on a thread of its own, so a writer never blocks on a
/// full pipe.
fn drain(mut read_end: File) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        read_end.read_to_end(&mut out).unwrap();
        out
    })
}

/// Calls `copy(from, to)` until it returns 0 (the end) or fails.
fn pump(from: &File, to: &File, copy: impl Fn(i32, i32) -> isize) -> std::io::Result<()> {
    loop {
        match copy(from.as_raw_fd(), to.as_raw_fd()) {
            0 => return Ok(()),
            n if n < 0 => return Err(errno()),
            _ => {}
        }
    }
}

/// Copies the file with `copy` into a temporary file, and reads that back.
fn through_a_file(
    path: &Path,
    copy: impl Fn(i32, i32) -> isize,
) -> Result<std::io::Result<Vec<u8>>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut out = tempfile::tempfile().unwrap();
    Ok(pump(&file, &out, copy).map(|()| {
        let mut text = Vec::new();
        std::io::Seek::rewind(&mut out).unwrap();
        out.read_to_end(&mut text).unwrap();
        text
    }))
}

fn sendfile_all(path: &Path) -> Result<Vec<u8>, String> {
    // SAFETY: two open descriptors, no offset pointer.
    through_a_file(path, |from, to| unsafe {
        libc::sendfile(to, from, std::ptr::null_mut(), 1 << 20)
    })?
    .map_err(|e| format!("sendfile: {e}"))
}

fn splice_all(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let (read_end, write_end) = pipe();
    let drained = drain(read_end);
    // SAFETY: two open descriptors, no offset pointers.
    pump(&file, &write_end, |from, to| unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            1 << 16,
            0,
        )
    })
    .map_err(|e| format!("splice: {e}"))?;
    drop(write_end);
    Ok(drained.join().unwrap())
}

/// The whole value, or the error that makes coreutils and Python fall back
/// to `read` (a FUSE file and a file elsewhere are on two filesystems).
fn copy_file_range_all(path: &Path) -> Result<Vec<u8>, String> {
    // SAFETY: two open descriptors, no offset pointers.
    let copied = through_a_file(path, |from, to| unsafe {
        libc::copy_file_range(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            1 << 20,
            0,
        ) as isize
    })?;
    match copied {
        Ok(text) => Ok(text),
        Err(e) => match e.raw_os_error() {
            Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                fs::read(path).map_err(|e| e.to_string())
            }
            _ => Err(format!("copy_file_range: {e}")),
        },
    }
}

/// What a program that maps `st_size` bytes sees.
fn mmap_all(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len() as usize;
    if size == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a private read-only mapping of an open file, unmapped below.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        );
        if at == libc::MAP_FAILED {
            return Err(format!("mmap: {}", errno()));
        }
        let text = std::slice::from_raw_parts(at.cast::<u8>(), size).to_vec();
        libc::munmap(at, size);
        Ok(text)
    }
}

/// Rust's `io::copy` from a file into a pipe uses `splice` or `sendfile`.
fn io_copy_to_pipe(path: &Path) -> Result<Vec<u8>, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let (read_end, mut write_end) = pipe();
    let drained = drain(read_end);
    std::io::copy(&mut file, &mut write_end).map_err(|e| e.to_string())?;
    drop(write_end);
    Ok(drained.join().unwrap())
}

fn run(program: &str, args: &[&str], path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!(
            "{program} {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

fn python(script: &str, path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(out.stdout)
}

/// GNU tar archives the file (trusting `st_size`), and complains if the
/// file shrank or grew; the archive is read back by tar itself.
fn tar_roundtrip(path: &Path) -> Result<Vec<u8>, String> {
    let (dir, name) = (path.parent().unwrap(), path.file_name().unwrap());
    let archive = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-"])
        .arg(name)
        .output()
        .map_err(|e| e.to_string())?;
    if !archive.status.success() || !archive.stderr.is_empty() {
        return Err(format!(
            "tar -c {}: {}",
            archive.status,
            String::from_utf8_lossy(&archive.stderr)
        ));
    }
    let mut extract = Command::new("tar")
        .args(["-xOf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Fed from a thread of its own: tar writes while it reads.
    let mut stdin = extract.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&archive.stdout));
    let out = extract.wait_with_output().unwrap();
    feeder.join().unwrap().map_err(|e| e.to_string())?;
    Ok(out.stdout)
}

/// `grep -r` over the file's directory; the file's own lines, in order.
fn grep_r(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("grep")
        .args(["-r", "^"])
        .arg(path.parent().unwrap())
        .output()
        .map_err(|e| e.to_string())?;
    let prefix = format!("{}:", path.display());
    let mut text = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(line) = line.strip_prefix(&prefix) {
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
        }
    }
    Ok(text)
}

/// A container whose values stay put while it is read: one sleeping
/// process and a pids limit of 42.
struct Still {
    // Dropped in this order: the daemon, then the cgroups, children first.
    daemon: Daemon,
    boxed: Cgroup,
    parent: Cgroup,
}

fn still_container(test: &str) -> Still {
    let parent = Cgroup::parent(test);
    let mut boxed = parent.child("box");
    boxed.write(Controller::Pids, "pids.max", "42");
    boxed.spawn(Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--no-ebpf"]);
    Still {
        parent,
        boxed,
        daemon,
    }
}

/// A file and a text: its whole text, or a line it must hold.
type Expected = Vec<(PathBuf, String)>;

/// The files whose whole text is known, and the lines the changing ones
/// must hold.
fn expectations(still: &Still) -> (Expected, Expected) {
    let d = &still.daemon;
    let tree = format!("cgroup/{}", still.boxed.relative);
    let exact = vec![
        (d.path("box/name"), "box\n".to_string()),
        (d.path("box/cgroup"), format!("/{}\n", still.boxed.relative)),
        (d.path("box/pids_limit"), "42\n".to_string()),
        (d.path("box/pids_current"), "1\n".to_string()),
        (d.path(&format!("{tree}/pids_limit")), "42\n".to_string()),
    ];
    let containing = vec![
        (d.path("box/metrics"), "pids_limit 42\n".to_string()),
        (d.path("metric"), "box_pids_limit 42\n".to_string()),
        (
            d.path("metrics.prom"),
            "cgmetric_pids_limit{container=\"box\",".to_string(),
        ),
        (
            d.path(&format!("{tree}/metrics")),
            "pids_current 1\n".to_string(),
        ),
    ];
    (exact, containing)
}

/// Every line of an aggregate is complete: nothing cut, nothing padded.
fn assert_whole(reader: &str, path: &Path, text: &[u8]) {
    let text = std::str::from_utf8(text)
        .unwrap_or_else(|_| panic!("{reader} {}: not UTF-8 (padded?)", path.display()));
    assert!(
        text.ends_with('\n') && !text.contains('\0'),
        "{reader} {}: cut or padded: ...{:?}",
        path.display(),
        &text[text.len().saturating_sub(80)..]
    );
    for line in text.lines() {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            line.starts_with('#')
                || value == "max"
                || value == "+Inf"
                || value.parse::<f64>().is_ok(),
            "{reader} {}: a cut line {line:?}",
            path.display()
        );
    }
}

fn check_readers(readers: &[Reader], still: &Still) {
    let (exact, containing) = expectations(still);
    for (reader, read) in readers {
        for (path, want) in &exact {
            let got = read(path).unwrap_or_else(|e| panic!("{reader} {}: {e}", path.display()));
            assert_eq!(
                String::from_utf8_lossy(&got),
                *want,
                "{reader} {}",
                path.display()
            );
            assert_eq!(
                fs::metadata(path).unwrap().len(),
                want.len() as u64,
                "st_size of {}",
                path.display()
            );
        }
        for (path, line) in &containing {
            let got = read(path).unwrap_or_else(|e| panic!("{reader} {}: {e}", path.display()));
            assert_whole(reader, path, &got);
            assert!(
                String::from_utf8_lossy(&got).contains(line.as_str()),
                "{reader} {}: no {line:?}",
                path.display()
            );
        }
    }
}

#[test]
fn every_reader_gets_every_file_whole() {
    require!("busybox", "tar", "grep");
    let still = still_container("readers");
    check_readers(READERS, &still);
}

#[test]
fn python_reads_and_copies_whole_values() {
    require!("python3");
    let still = still_container("pyreaders");
    check_readers(PYTHON_READERS, &still);
    // Each `open` asks whether the file is a terminal: answered quietly.
    let log = still.daemon.stderr();
    assert!(!log.contains("ioctl"), "{log}");
}

#[test]
fn a_stat_reports_the_length_the_next_read_returns() {
    require!();
    let still = still_container("sizes");
    for file in [
        "box/name",
        "box/pids_limit",
        "box/metrics",
        "metric",
        "metrics.prom",
    ] {
        let path = still.daemon.path(file);
        for _ in 0..20 {
            let size = fs::metadata(&path).unwrap().len();
            let text = fs::read(&path).unwrap();
            assert_eq!(size, text.len() as u64, "{file}");
        }
    }
    // `ls -l` shows real sizes; directories show 0.
    let listing = Command::new("ls")
        .args(["-l"])
        .arg(still.daemon.path("box"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing.lines().find(|l| l.ends_with(" name")).unwrap();
    assert!(line.contains(" 4 "), "name is 4 bytes: {line}");
}

/// The kernel keeps the size a stat reported; a reader that copies through
/// the page cache without a stat of its own (busybox `cat`) stops there
/// unless the daemon raises it when the value grew.
#[test]
fn an_aggregate_that_grew_since_the_last_stat_is_read_whole() {
    require!("busybox");
    let still = still_container("grown");
    let metric = still.daemon.path("metric");
    let mut added = Vec::new();
    for round in 0..3 {
        let before = fs::metadata(&metric).unwrap().len();
        std::thread::sleep(cgmetric::fs::snapshots::HANDOFF);
        let mut more = still.parent.child(&format!("more{round}"));
        more.spawn(Command::new("sleep").arg("600"));
        for (reader, read) in [
            (
                "busybox cat",
                (|p| run("busybox", &["cat"], p)) as fn(&Path) -> _,
            ),
            ("splice into a pipe", splice_all),
            ("sendfile to a file", sendfile_all),
        ] {
            let text = read(&metric).unwrap();
            assert_whole(reader, &metric, &text);
            assert!(
                text.len() as u64 > before,
                "{reader}, round {round}: {} <= {before}",
                text.len(),
            );
            assert!(
                String::from_utf8_lossy(&text).contains(&format!("more{round}_pids_current 1\n")),
                "{reader}: the new container is missing"
            );
        }
        added.push(more);
    }
    // Children before their parent.
    drop(added);
}

/// A value flips between one and two digits while every reader reads it:
/// each read is one of the values, whole.
#[test]
fn values_that_change_length_are_never_cut() {
    require!("busybox", "tar");
    let mut still = still_container("flip");
    let pids = still.daemon.path("box/pids_current");
    let procs = still.boxed.dir(Controller::Pids).join("cgroup.procs");
    for _ in 0..8 {
        still.boxed.spawn(Command::new("sleep").arg("600"));
    }
    // 9 processes; a flipper adds and removes a tenth.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut child = Command::new("sleep").arg("600").spawn().unwrap();
                fs::write(&procs, child.id().to_string()).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                child.kill().unwrap();
                child.wait().unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    while Instant::now() < deadline {
        for (reader, read) in READERS.iter().filter(|(name, _)| *name != "grep -r") {
            let text = read(&pids).unwrap_or_else(|e| panic!("{reader}: {e}"));
            let text = String::from_utf8_lossy(&text).into_owned();
            assert!(
                text == "9\n" || text == "10\n",
                "{reader} read {text:?}, not 9 or 10"
            );
            *seen.entry(text).or_default() += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    assert_eq!(seen.len(), 2, "the value did not flip: {seen:?}");
}

/// Aggregates of 10,000 containers (megabytes) through every reader: a
/// generated cgroup v2 tree, as `--cgroup-root` reads fixture trees.
#[test]
fn aggregates_of_ten_thousand_containers_are_read_whole() {
    require!("busybox", "tar", "grep");
    let root = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
    for file in ["cgroup.controllers", "cgroup.procs"] {
        fs::copy(fixtures.join(file), root.path().join(file)).unwrap();
    }
    let template = fixtures.join("tenants/alpha");
    let files: Vec<(String, Vec<u8>)> = fs::read_dir(&template)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    for n in 0..10_000 {
        let dir = root.path().join(format!("tenants/c{n:05}"));
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in &files {
            fs::write(dir.join(name), text).unwrap();
        }
    }
    let daemon = Daemon::start(&[
        "--cgroup-root",
        root.path().to_str().unwrap(),
        "--cgroup",
        "tenants/*",
        "--no-ebpf",
    ]);
    for file in ["metric", "metrics.prom"] {
        let path = daemon.path(file);
        for (reader, read) in READERS
            .iter()
            .filter(|(name, _)| !matches!(*name, "read in 7-byte chunks" | "grep -r"))
        {
            let text = read(&path).unwrap_or_else(|e| panic!("{reader} {file}: {e}"));
            assert!(
                text.len() > 1 << 20,
                "{reader} {file}: {} bytes",
                text.len()
            );
            assert_whole(reader, &path, &text);
            let text = String::from_utf8_lossy(&text);
            for n in [0, 4_999, 9_999] {
                assert!(
                    text.contains(&format!("c{n:05}")),
                    "{reader} {file}: c{n:05} missing"
                );
            }
        }
    }
}
