//! Where the walk's words are in the running kernel: member offsets and
//! controller indices from its BTF (`/sys/kernel/btf/vmlinux`).

use std::path::Path;

use cgmetric_common::walk::{WalkConfig, WalkField};

use super::{
    WalkError, CFS_PERIOD, CFS_QUOTA, MEM_FAILCNT, MEM_MAX, MEM_USAGE, MEM_WATERMARK, PIDS_COUNT,
    PIDS_LIMIT,
};

/// Where each word is: the index, the controller (`enum cgroup_subsys_id`),
/// the controller's structure and the member's path in it.
/// `CSS_VISIBLE` (include/linux/cgroup-defs.h, the same since 4.6): an
/// anonymous enum's value, which BTF does not name.
const CSS_VISIBLE: u32 = 1 << 3;

pub(super) const WORDS: [(usize, &str, &str, &str); 8] = [
    (MEM_USAGE, "memory_cgrp_id", "mem_cgroup", "memory.usage"),
    (MEM_MAX, "memory_cgrp_id", "mem_cgroup", "memory.max"),
    (
        MEM_WATERMARK,
        "memory_cgrp_id",
        "mem_cgroup",
        "memory.watermark",
    ),
    (
        MEM_FAILCNT,
        "memory_cgrp_id",
        "mem_cgroup",
        "memory.failcnt",
    ),
    (PIDS_COUNT, "pids_cgrp_id", "pids_cgroup", "counter"),
    (PIDS_LIMIT, "pids_cgrp_id", "pids_cgroup", "limit"),
    (
        CFS_QUOTA,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.quota",
    ),
    (
        CFS_PERIOD,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.period",
    ),
];

/// Offsets in the running kernel, from its BTF.
#[derive(Debug, Clone)]
pub(super) struct Offsets {
    pub config: WalkConfig,
    /// Bit `i` set: word `i` was found.
    pub configured: u64,
}

impl Offsets {
    pub fn from_btf(path: &Path) -> Result<Offsets, WalkError> {
        let bytes = std::fs::read(path).map_err(|e| WalkError::Btf(format!("{path:?}: {e}")))?;
        let types = btfparse::TypeInformation::new(&BtfBytes(bytes))
            .map_err(|e| WalkError::Btf(format!("{path:?}: {e:?}")))?;
        let offset = |ty: &str, member: &str| -> Result<u32, WalkError> {
            let missing = || WalkError::Layout(format!("{ty}.{member}"));
            let id = types.id_of(ty).ok_or_else(missing)?;
            match types.offset_of(id, member).map_err(|_| missing())? {
                (_, btfparse::Offset::ByteOffset(at)) => Ok(at),
                _ => Err(missing()),
            }
        };
        let subsys_ids = subsystem_ids(&types)?;
        let subsys_count = subsys_ids
            .iter()
            .find(|(name, _)| name == "CGROUP_SUBSYS_COUNT")
            .map(|(_, v)| *v)
            .ok_or_else(|| WalkError::Layout("CGROUP_SUBSYS_COUNT".into()))?;
        let mut config = WalkConfig {
            cgroup_kn: offset("cgroup", "kn")?,
            kn_id: offset("kernfs_node", "id")?,
            cgroup_subsys: offset("cgroup", "subsys")?,
            subsys_count,
            css_flags: offset("cgroup_subsys_state", "flags")?,
            css_visible: CSS_VISIBLE,
            ..WalkConfig::EMPTY
        };
        let mut configured = 0u64;
        for (index, subsys, structure, member) in WORDS {
            // A kernel built without the controller, or without CPU
            // bandwidth control, lacks these: its files are read instead.
            let found = subsys_ids
                .iter()
                .find(|(n, _)| n == subsys)
                .map(|(_, v)| *v);
            let at = offset(structure, member)
                .and_then(|at| Ok(at.checked_sub(offset(structure, "css")?)))
                .ok()
                .flatten();
            if let (Some(subsys), Some(offset)) = (found, at) {
                config.fields[index] = WalkField { subsys, offset };
                configured |= 1 << index;
            } else {
                log::debug!("cgroup walk: no {structure}.{member} in this kernel");
            }
        }
        Ok(Offsets { config, configured })
    }
}

/// `enum cgroup_subsys_id`: each controller's index in `cgroup.subsys`.
fn subsystem_ids(types: &btfparse::TypeInformation) -> Result<Vec<(String, u32)>, WalkError> {
    let missing = || WalkError::Layout("enum cgroup_subsys_id".into());
    let id = types.id_of("cgroup_subsys_id").ok_or_else(missing)?;
    let Some(btfparse::TypeVariant::Enum(e)) = types.from_id(id) else {
        return Err(missing());
    };
    Ok(e.named_value_list()
        .iter()
        .map(|v| {
            let value = match v.value {
                btfparse::Integer32Value::Signed(n) => n as u32,
                btfparse::Integer32Value::Unsigned(n) => n,
            };
            (v.name.clone(), value)
        })
        .collect())
}

/// The BTF file's bytes, as btfparse reads them.
struct BtfBytes(Vec<u8>);

impl btfparse::Readable for BtfBytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = offset as usize;
        match self.0.get(start..start + buffer.len()) {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::EOF,
                "read past the end of the BTF",
            )),
        }
    }
}
