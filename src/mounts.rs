//! The kernel's mount table (`/proc/self/mountinfo`), parsed once, and
//! whether a path is served by a live cgmetric.
//!
//! Cgroup layout detection, stale-mount healing, the mount helper and the
//! reports all need to know what is mounted where; this module is the one
//! place that asks.

use std::io;
use std::path::{Path, PathBuf};

/// The filesystem type the kernel shows for the tree (`fuse.` + subtype).
pub const FS_TYPE: &str = "fuse.cgmetric";

/// One line of mountinfo, reduced to the fields cgmetric uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options; for cgroup v1 these name the controllers.
    pub super_options: String,
}

/// Parses mountinfo text. Lines that do not have the documented shape are
/// skipped: the table is the kernel's, so a bad line means a format we do not
/// know rather than an error worth failing on.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent maj:min root mount_point options [optional...] - fstype source super_options
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fs_type = right.next()?;
    let source = right.next()?;
    let super_options = right.next().unwrap_or("");
    Some(MountEntry {
        mount_point: PathBuf::from(unescape(mount_point)),
        fs_type: fs_type.to_string(),
        source: unescape(source),
        super_options: super_options.to_string(),
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the calling process's mount table.
pub fn read_mount_table() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The last (topmost) mount whose mount point is exactly `path`.
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Asks the filesystem at `path` for its statistics. FUSE forwards every
/// statfs to the daemon (a `stat` may be answered from the kernel's
/// attribute cache), so this tells a live mount from a dead one.
pub fn statfs(path: &Path) -> io::Result<libc::statfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is NUL-terminated and buf is large enough for statfs.
    match unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) } {
        // SAFETY: statfs filled buf when it returned 0.
        0 => Ok(unsafe { buf.assume_init() }),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Whether a live FUSE filesystem answers at `path`. A mount seen in the
/// mount table is not enough: a starting daemon may detach it (a stale one)
/// before the statfs, which then succeeds on the directory underneath.
pub fn is_served(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.f_type == libc::FUSE_SUPER_MAGIC)
}

/// Whether a live cgmetric daemon serves `path`: a cgmetric mount there that
/// answers (a stale one, left by a killed daemon, answers ENOTCONN).
pub fn is_live_cgmetric(path: &Path) -> bool {
    let mounts = read_mount_table().unwrap_or_default();
    mount_at(&mounts, path).is_some_and(|m| m.fs_type == FS_TYPE) && is_served(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = include_str!("../tests/fixtures/mountinfo/hybrid");

    #[test]
    fn parses_fields_and_optional_fields() {
        let mounts = parse_mountinfo(HYBRID);
        let cpu = mount_at(&mounts, Path::new("/sys/fs/cgroup/cpu")).unwrap();
        assert_eq!(cpu.fs_type, "cgroup");
        assert_eq!(cpu.super_options, "rw,cpu");
        let unified = mount_at(&mounts, Path::new("/sys/fs/cgroup/unified")).unwrap();
        assert_eq!(unified.fs_type, "cgroup2");
    }

    #[test]
    fn unescapes_octal_sequences() {
        let line = "1 2 0:50 / /run/with\\040space rw - fuse.cgmetric cgmetric rw,user_id=0";
        let mounts = parse_mountinfo(line);
        assert_eq!(mounts[0].mount_point, Path::new("/run/with space"));
        assert_eq!(mounts[0].fs_type, "fuse.cgmetric");
    }

    #[test]
    fn skips_malformed_lines() {
        let text = "garbage\n\n1 2 0:1 / /x rw - tmpfs tmpfs rw\nno separator here at all";
        assert_eq!(parse_mountinfo(text).len(), 1);
    }
}
