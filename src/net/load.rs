//! Loading and attaching the eBPF programs once, at the cgroup v2 root, with
//! maps and links pinned under `--bpf-dir`: the kernel keeps counting while
//! no daemon runs, and a restarted daemon picks up what is pinned instead of
//! attaching a second time.

use std::collections::HashSet;
use std::error::Error;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{loaded_programs, CgroupAttachMode, Program};
use aya::{Ebpf, EbpfLoader};
use cgmetric_common::{
    PINNED_MAPS, PROG_EGRESS, PROG_INGRESS, PROG_SOCK_CREATE, PROG_SOCK_OPS, PROG_SOCK_RELEASE,
};

use super::NetError;
use crate::bpf_sys as sys;
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

/// Each attaches where its section says (`cgroup_skb/egress`, ...). The
/// close counter comes before `sock_ops`: an earlier `sock_ops` counted
/// closes from state changes, and whichever of the two sees a close first
/// counts it, so a close is never missed while one is swapped for the other.
pub const PROGRAMS: [&str; 5] = [
    PROG_EGRESS,
    PROG_INGRESS,
    PROG_SOCK_CREATE,
    PROG_SOCK_RELEASE,
    PROG_SOCK_OPS,
];

type BoxError = Box<dyn Error + Send + Sync>;

/// Where a program's link is pinned.
pub fn link_pin(bpf_dir: &Path, program: &str) -> PathBuf {
    bpf_dir.join(format!("link_{program}"))
}

/// Loads the object (its pinned maps are reused or created) and makes sure
/// every program is attached at `cgroup_root` through a pinned link.
pub fn load_and_attach(bpf_dir: &Path, cgroup_root: &Path) -> Result<Ebpf, NetError> {
    attach_object(bpf_dir, cgroup_root, OBJECT, &PROGRAMS)
}

/// [`load_and_attach`] for another build's object and its programs: tests
/// leave the links as an earlier version of the daemon left them.
#[cfg(feature = "test-helpers")]
pub fn load_and_attach_object(
    bpf_dir: &Path,
    cgroup_root: &Path,
    object: &[u8],
    programs: &[&'static str],
) -> Result<Ebpf, NetError> {
    attach_object(bpf_dir, cgroup_root, object, programs)
}

fn attach_object(
    bpf_dir: &Path,
    cgroup_root: &Path,
    object: &[u8],
    programs: &[&'static str],
) -> Result<Ebpf, NetError> {
    ensure_bpffs(bpf_dir)?;
    std::fs::create_dir_all(bpf_dir).map_err(|source| NetError::Io {
        path: bpf_dir.to_path_buf(),
        source,
    })?;
    // Links only count into the maps they were loaded with: a pinned link
    // whose program is this build's but uses a map no longer pinned (removed
    // by hand) counts where nobody reads, and is redone. A link running an
    // older program is updated in place to this build's, which uses the
    // pinned maps and creates the ones that older program lacked.
    let pinned = pinned_map_ids(bpf_dir);

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpf_dir)
        .load(object)
        .map_err(|e| NetError::Load(Box::new(e)))?;
    let cgroup = File::open(cgroup_root).map_err(|source| NetError::Io {
        path: cgroup_root.to_path_buf(),
        source,
    })?;

    for &name in programs {
        let program_error = |e| NetError::Program {
            name,
            source: Box::new(e),
        };
        let program = ebpf
            .program_mut(name)
            .ok_or(NetError::MissingProgram(name))?;
        match program {
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SockOps(p) => p.load(),
            _ => return Err(NetError::MissingProgram(name)),
        }
        .map_err(program_error)?;
        let pin = link_pin(bpf_dir, name);
        let link_error = |source| NetError::Link {
            name,
            path: pin.clone(),
            source,
        };
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            // Attached by an earlier daemon: keep the link (its counts never
            // stop); swap in this build's program if it differs.
            let ours = program.info().map_err(program_error)?.tag();
            let theirs = FdLink::from(link)
                .info()
                .map_err(BoxError::from)
                .and_then(|info| linked_program(info.program_id()))
                .map_err(link_error)?;
            if theirs.tag != ours {
                let fd = program.fd().map_err(program_error)?;
                sys::link_update(&pin, fd.as_fd()).map_err(|e| link_error(e.into()))?;
                log::info!("eBPF program {name}: replaced by this version's, in place");
                continue;
            }
            // Without the kernel's list of a program's maps (before 4.15),
            // every map this build pins must have been pinned already.
            let sound = match &theirs.map_ids {
                Some(ids) => ids.iter().all(|id| pinned.contains(id)),
                None => pinned.len() == PINNED_MAPS.len(),
            };
            if sound {
                log::info!(
                    "eBPF program {name}: still attached (pinned at {})",
                    pin.display()
                );
                continue;
            }
            log::warn!("eBPF program {name}: its maps were removed; attaching it again");
        }
        let _ = std::fs::remove_file(&pin);
        let link = attach(program, &cgroup).map_err(|source| NetError::Attach { name, source })?;
        // The pinned file holds the link: dropping aya's handle closes only
        // this descriptor, and the programs stay attached without a daemon.
        drop(link.pin(&pin).map_err(|e| link_error(e.into()))?);
        log::info!("eBPF program {name}: attached at {}", cgroup_root.display());
    }
    Ok(ebpf)
}

/// Attaches a loaded program at `cgroup` through a new link (BPF_LINK_CREATE,
/// so other programs at the same cgroup keep running) and takes the link
/// from aya's keeping, for pinning.
fn attach(program: &mut Program, cgroup: &File) -> Result<FdLink, BoxError> {
    // A link's flags, which the kernel wants zero for a cgroup: a link
    // attaches with multi-attach semantics whatever the mode says.
    let mode = CgroupAttachMode::Single;
    // Kernels before 5.7 have no cgroup links; aya falls back to a plain
    // attachment there, which cannot be pinned (the conversion fails).
    let link = match program {
        Program::CgroupSkb(p) => {
            let attach_type = p
                .expected_attach_type()
                .ok_or("no attach type in its section name")?;
            let id = p.attach(cgroup, attach_type, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::CgroupSock(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        _ => return Err("not a cgroup program".into()),
    };
    Ok(link)
}

/// What matters of a linked program: its tag (a hash of its instructions,
/// which does not depend on the maps it uses) and the ids of those maps.
struct Linked {
    tag: u64,
    map_ids: Option<Vec<u32>>,
}

/// The loaded program with this id. aya 0.14 looks programs up by id only
/// internally; its public list of the host's programs gives the same answer
/// (run once per pinned link, at start).
fn linked_program(id: u32) -> Result<Linked, BoxError> {
    let mut error: Option<BoxError> = None;
    for program in loaded_programs() {
        match program {
            Ok(program) if program.id() == id => {
                return Ok(Linked {
                    tag: program.tag(),
                    map_ids: program.map_ids()?,
                })
            }
            Ok(_) => {}
            // Another program unloaded while listing, or no listing at all.
            Err(e) => error = Some(e.into()),
        }
    }
    Err(error.unwrap_or_else(|| format!("its program (id {id}) is not loaded").into()))
}

/// The ids of the maps pinned under `bpf_dir` now, before this build's
/// object is loaded.
fn pinned_map_ids(bpf_dir: &Path) -> HashSet<u32> {
    PINNED_MAPS
        .iter()
        .filter_map(|name| MapInfo::from_pin(bpf_dir.join(name)).ok())
        .map(|info| info.id())
        .collect()
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
