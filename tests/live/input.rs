//! Bad and awkward input at the filesystem's edge: a directory of 10,000
//! containers read in small getdents buffers and resumed from offsets, and a
//! container that vanishes between a listing and an open.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;

use crate::require;
use crate::support::{Cgroup, Daemon};

const CONTAINERS: usize = 10_000;

/// One getdents64 record.
struct Dirent {
    offset: i64,
    name: String,
}

/// Reads what one getdents64 call with a `size`-byte buffer returns.
fn getdents(fd: i32, size: usize) -> Vec<Dirent> {
    let mut buf = vec![0u8; size];
    // SAFETY: buf is valid for size bytes.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), size) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut records = Vec::new();
    let mut at = 0;
    while at < n as usize {
        let field = |from: usize, len: usize| &buf[at + from..at + from + len];
        let offset = i64::from_ne_bytes(field(8, 8).try_into().unwrap());
        let reclen = u16::from_ne_bytes(field(16, 2).try_into().unwrap()) as usize;
        let name = &buf[at + 19..at + reclen];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap()];
        records.push(Dirent {
            offset,
            name: String::from_utf8_lossy(name).into_owned(),
        });
        at += reclen;
    }
    records
}

/// A pure v2 fixture tree with `CONTAINERS` containers under `tenants/`.
fn big_fixture() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let write = |path: &std::path::Path, text: &str| fs::write(path, text).unwrap();
    write(
        &root.path().join("cgroup.controllers"),
        "cpu io memory pids\n",
    );
    write(&root.path().join("cgroup.procs"), "");
    let tenants = root.path().join("tenants");
    fs::create_dir(&tenants).unwrap();
    write(&tenants.join("cgroup.controllers"), "pids\n");
    for i in 0..CONTAINERS {
        let dir = tenants.join(format!("k{i}"));
        fs::create_dir(&dir).unwrap();
        write(&dir.join("cgroup.controllers"), "pids\n");
        write(&dir.join("pids.current"), &format!("{i}\n"));
    }
    root
}

#[test]
fn ten_thousand_entries_read_in_small_buffers_and_from_offsets() {
    require!();
    let tree = big_fixture();
    let daemon = Daemon::start(&[
        "--cgroup-root",
        tree.path().to_str().unwrap(),
        "--cgroup",
        "tenants/*",
        "--no-ebpf",
    ]);
    let path = CString::new(daemon.mountpoint.as_os_str().as_bytes()).unwrap();
    let open = || {
        // SAFETY: valid NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        fd
    };

    // The whole listing, 300 bytes (a few entries) at a time.
    let fd = open();
    let mut all = Vec::new();
    loop {
        let batch = getdents(fd, 300);
        if batch.is_empty() {
            break;
        }
        all.extend(batch);
    }
    let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
    let unique: HashSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "an entry came twice");
    for i in 0..CONTAINERS {
        assert!(unique.contains(format!("k{i}").as_str()), "k{i} is missing");
    }
    let fixed = [
        ".",
        "..",
        "metric",
        "metrics.prom",
        "self",
        "cgroup",
        "exited",
    ];
    for name in fixed {
        assert!(unique.contains(name), "{name} is missing");
    }
    assert_eq!(names.len(), CONTAINERS + fixed.len());

    // Resuming from any entry's offset (telldir/seekdir) continues exactly
    // after it, on the same handle and on a fresh one.
    for at in [0, 1, 7, 4999, all.len() - 2] {
        let expected: Vec<&str> = names[at + 1..].iter().copied().take(50).collect();
        for fresh in [false, true] {
            let fd = if fresh { open() } else { fd };
            // SAFETY: fd is an open directory.
            let pos = unsafe { libc::lseek(fd, all[at].offset, libc::SEEK_SET) };
            assert_eq!(pos, all[at].offset);
            let mut resumed = Vec::new();
            while resumed.len() < expected.len() {
                let batch = getdents(fd, 200);
                if batch.is_empty() {
                    break;
                }
                resumed.extend(batch.into_iter().map(|d| d.name));
            }
            resumed.truncate(expected.len());
            assert_eq!(
                resumed, expected,
                "resumed after entry {at} (fresh: {fresh})"
            );
            if fresh {
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
            }
        }
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    assert_eq!(daemon.read("k9999/pids_current"), "9999\n");
}

#[test]
fn a_container_vanishing_between_listing_and_open_is_enoent() {
    require!();
    let parent = Cgroup::parent("vanish");
    let mut doomed = parent.child("doomed");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);

    let listed: Vec<String> = fs::read_dir(&daemon.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listed.contains(&"doomed".to_string()));
    // Opened before: keeps its snapshot. A directory handle keeps its listing.
    let held = fs::File::open(daemon.path("doomed/pids_current")).unwrap();
    let mut dir_handle = fs::read_dir(daemon.path("doomed")).unwrap();
    let first = dir_handle.next().unwrap().unwrap();
    // The name is already cached by the kernel from the listing.
    let _ = fs::metadata(daemon.path("doomed/memory_usage")).unwrap();

    doomed.remove();
    for file in ["pids_current", "memory_usage", "name", "cpu_usage_usec"] {
        let err = fs::read_to_string(daemon.path(&format!("doomed/{file}"))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{file}: {err}");
    }
    let err = fs::read_dir(daemon.path("doomed")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    use std::io::Read;
    let mut text = String::new();
    (&held).read_to_string(&mut text).unwrap();
    assert_eq!(text, "0\n");
    let rest: Vec<_> = dir_handle.map(|e| e.unwrap().file_name()).collect();
    assert!(!first.file_name().is_empty() && !rest.is_empty());
    assert!(daemon.stderr().lines().all(|l| !l.contains("ERROR")));
}
