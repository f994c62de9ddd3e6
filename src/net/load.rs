//! Loading and attaching the eBPF programs once, at the cgroup v2 root, with
//! maps and links pinned under `--bpf-dir`: the kernel keeps counting while
//! no daemon runs, and a restarted daemon picks up what is pinned instead of
//! attaching a second time.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};
use cgmetric_common::{PINNED_MAPS, PROG_EGRESS, PROG_INGRESS, PROG_SOCK_CREATE, PROG_SOCK_OPS};

use super::sys::{self, AttachType};
use super::NetError;
use crate::mounts::{mount_at, read_mount_table};

/// The compiled programs (see `ebpf/build.sh`), aligned as aya requires.
static OBJECT: &[u8] = aligned::OBJECT;

mod aligned {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static ALIGNED: &Aligned<[u8]> =
        &Aligned(*include_bytes!("../../ebpf/prebuilt/cgmetric.bpf.o"));
    pub static OBJECT: &[u8] = &ALIGNED.0;
}

const PROGRAMS: [(&str, AttachType); 4] = [
    (PROG_EGRESS, AttachType::Egress),
    (PROG_INGRESS, AttachType::Ingress),
    (PROG_SOCK_CREATE, AttachType::SockCreate),
    (PROG_SOCK_OPS, AttachType::SockOps),
];

/// Where a program's link is pinned.
pub fn link_pin(bpf_dir: &Path, program: &str) -> PathBuf {
    bpf_dir.join(format!("link_{program}"))
}

/// Loads the object (its pinned maps are reused or created) and makes sure
/// every program is attached at `cgroup_root` through a pinned link.
pub fn load_and_attach(bpf_dir: &Path, cgroup_root: &Path) -> Result<Ebpf, NetError> {
    ensure_bpffs(bpf_dir)?;
    std::fs::create_dir_all(bpf_dir).map_err(|source| NetError::Io {
        path: bpf_dir.to_path_buf(),
        source,
    })?;
    // Links only count into the maps they were loaded with: when any map is
    // missing (first start, or removed by hand) every link is redone.
    let maps_pinned = PINNED_MAPS.iter().all(|m| bpf_dir.join(m).exists());
    if !maps_pinned {
        for (program, _) in PROGRAMS {
            let _ = std::fs::remove_file(link_pin(bpf_dir, program));
        }
    }

    let mut ebpf = EbpfLoader::new()
        .map_pin_path(bpf_dir)
        // The socket storage map: aya 0.13 creates it but has no type for it.
        .allow_unsupported_maps()
        .load(OBJECT)
        .map_err(|e| NetError::Load(Box::new(e)))?;
    let cgroup = File::open(cgroup_root).map_err(|source| NetError::Io {
        path: cgroup_root.to_path_buf(),
        source,
    })?;

    for (name, attach_type) in PROGRAMS {
        let program_error = |e| NetError::Program {
            name,
            source: Box::new(e),
        };
        let fd = match ebpf.program_mut(name) {
            Some(Program::CgroupSkb(p)) => p.load().and_then(|()| p.fd()),
            Some(Program::CgroupSock(p)) => p.load().and_then(|()| p.fd()),
            Some(Program::SockOps(p)) => p.load().and_then(|()| p.fd()),
            _ => return Err(NetError::MissingProgram(name)),
        }
        .map_err(program_error)?;
        let pin = link_pin(bpf_dir, name);
        let io_error = |source| NetError::Io {
            path: pin.clone(),
            source,
        };
        if let Ok(link) = sys::open_pinned(&pin) {
            // Attached by an earlier daemon: keep the link (its counts never
            // stop); swap in this build's program if it differs.
            let ours =
                sys::program_tag(fd.as_fd()).map_err(|e| NetError::Attach { name, source: e })?;
            let theirs = sys::link_program_tag(link.as_fd()).map_err(io_error)?;
            if theirs == ours {
                log::info!(
                    "eBPF program {name}: still attached (pinned at {})",
                    pin.display()
                );
            } else {
                sys::link_update(link.as_fd(), fd.as_fd())
                    .map_err(|source| NetError::Attach { name, source })?;
                log::info!("eBPF program {name}: replaced by this version's, in place");
            }
            continue;
        }
        let _ = std::fs::remove_file(&pin);
        let link = sys::link_create(fd.as_fd(), cgroup.as_fd(), attach_type)
            .map_err(|source| NetError::Attach { name, source })?;
        sys::pin(link.as_fd(), &pin).map_err(io_error)?;
        log::info!("eBPF program {name}: attached at {}", cgroup_root.display());
    }
    Ok(ebpf)
}

/// bpffs is not always mounted (a fresh machine here has an empty
/// /sys/fs/bpf): mount it there when `bpf_dir` lives below it.
fn ensure_bpffs(bpf_dir: &Path) -> Result<(), NetError> {
    const BPFFS: &str = "/sys/fs/bpf";
    let mounts = read_mount_table().map_err(|source| NetError::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    let on_bpffs = bpf_dir
        .ancestors()
        .find_map(|a| mount_at(&mounts, a))
        .is_some_and(|m| m.fs_type == "bpf");
    if on_bpffs {
        return Ok(());
    }
    if !bpf_dir.starts_with(BPFFS) || mount_at(&mounts, Path::new(BPFFS)).is_some() {
        return Err(NetError::NotBpffs(bpf_dir.to_path_buf()));
    }
    let source = c"bpf";
    let target = c"/sys/fs/bpf";
    let options = c"mode=0700";
    // SAFETY: NUL-terminated constant strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(NetError::Io {
            path: BPFFS.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    log::info!("mounted a bpf filesystem at {BPFFS}");
    Ok(())
}
