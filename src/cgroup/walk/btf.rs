//! Where the walk's words are in the running kernel: member offsets and
//! controller indices from its BTF (`/sys/kernel/btf/vmlinux`).

use std::path::Path;

use cgmetric_common::walk::{WalkConfig, WalkField};

use super::{
    WalkError, Words, CFS_BURSTS, CFS_BURST_TIME, CFS_PERIOD, CFS_PERIODS, CFS_QUOTA,
    CFS_THROTTLED, CFS_THROTTLED_TIME, EVENTS, EVENT_SLOTS, MEM_FAILCNT, MEM_MAX, MEM_SWAP,
    MEM_USAGE, MEM_WATERMARK, OOM_KILL, OOM_KILL_DISABLE, PIDS_COUNT, PIDS_LIMIT, UNDER_OOM,
};

/// Where each word is: the index, the controller (`enum cgroup_subsys_id`),
/// the controller's structure and the member's path in it.
/// `CSS_VISIBLE` (include/linux/cgroup-defs.h, the same since 4.6): an
/// anonymous enum's value, which BTF does not name.
const CSS_VISIBLE: u32 = 1 << 3;

pub(super) const WORDS: [(usize, &str, &str, &str); 17] = [
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
    (MEM_SWAP, "memory_cgrp_id", "mem_cgroup", "swap.usage"),
    (
        OOM_KILL_DISABLE,
        "memory_cgrp_id",
        "mem_cgroup",
        "oom_kill_disable",
    ),
    (UNDER_OOM, "memory_cgrp_id", "mem_cgroup", "under_oom"),
    (
        OOM_KILL,
        "memory_cgrp_id",
        "mem_cgroup",
        "memory_events[MEMCG_OOM_KILL]",
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
    (
        CFS_PERIODS,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.nr_periods",
    ),
    (
        CFS_THROTTLED,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.nr_throttled",
    ),
    (
        CFS_THROTTLED_TIME,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.throttled_time",
    ),
    (
        CFS_BURSTS,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.nr_burst",
    ),
    (
        CFS_BURST_TIME,
        "cpu_cgrp_id",
        "task_group",
        "cfs_bandwidth.burst_time",
    ),
];

/// Offsets in the running kernel, from its BTF.
#[derive(Debug, Clone)]
pub(super) struct Offsets {
    pub config: WalkConfig,
    pub words: Words,
}

impl Offsets {
    /// The offsets of every word the kernel has; `events` names the lines
    /// of v2 `memory.events` in the order this kernel prints them (learnt
    /// from one file: they vary by kernel), words `EVENTS..`.
    pub fn from_btf(path: &Path, events: &[String]) -> Result<Offsets, WalkError> {
        let bytes = std::fs::read(path).map_err(|e| WalkError::Btf(format!("{path:?}: {e}")))?;
        let types = Types::parse(&bytes).map_err(|e| WalkError::Btf(format!("{path:?}: {e}")))?;
        let offset = |ty: &str, member: &str| -> Result<u32, WalkError> {
            types
                .field(ty, member)
                .map(|(at, _)| at)
                .ok_or_else(|| WalkError::Layout(format!("{ty}.{member}")))
        };
        let subsys = |name: &str| types.enumerator("cgroup_subsys_id", name);
        let subsys_count = subsys("CGROUP_SUBSYS_COUNT")
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
        let mut words = Words::default();
        // `memory.events` prints `memory_events[MEMCG_<LINE>]` for each line.
        let event_words = events
            .iter()
            .take(EVENT_SLOTS)
            .enumerate()
            .map(|(i, line)| {
                let member = format!("memory_events[MEMCG_{}]", line.to_uppercase());
                (EVENTS + i, "memory_cgrp_id", "mem_cgroup", member)
            });
        let all = WORDS
            .iter()
            .map(|&(i, controller, ty, member)| (i, controller, ty, member.to_string()))
            .chain(event_words);
        for (index, controller, structure, member) in all {
            // A kernel built without the controller, or without CPU
            // bandwidth control, lacks these: its files are read instead.
            let at = types.field(structure, &member).and_then(|(at, size)| {
                let css = types.field(structure, "css")?.0;
                Some((at.checked_sub(css)?, size))
            });
            match (subsys(controller), at) {
                (Some(subsys), Some((offset, size))) if (1..=8).contains(&size) => {
                    config.fields[index] = WalkField { subsys, offset };
                    words.configured |= 1 << index;
                    words.sizes[index] = size as u8;
                }
                _ => log::debug!("cgroup walk: no {structure}.{member} in this kernel"),
            }
        }
        let learnt = events.len() <= EVENT_SLOTS
            && (EVENTS..EVENTS + events.len()).all(|i| words.configured & (1 << i) != 0);
        if learnt {
            words.events = events.to_vec();
        } else if !events.is_empty() {
            log::debug!("cgroup walk: memory.events has lines {events:?}, not all in BTF");
        }
        Ok(Offsets { config, words })
    }
}

/// The kernel's BTF, read in place: where each type starts, and nothing
/// else. A parser that builds every type (btfparse, aya's) makes tens of
/// megabytes of small allocations for vmlinux's 100,000-odd types, which
/// stay in the daemon's heap as holes that later allocations spread into.
struct Types<'a> {
    bytes: &'a [u8],
    strings: &'a [u8],
    /// Byte offset of each type id's record (id 1 is index 0).
    starts: Vec<u32>,
}

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

impl<'a> Types<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Types<'a>, String> {
        let word = |at: usize| -> Result<u32, String> {
            let b = bytes.get(at..at + 4).ok_or("truncated header")?;
            Ok(u32::from_le_bytes(b.try_into().unwrap()))
        };
        if bytes.get(..2) != Some(&[0x9f, 0xeb]) {
            return Err("not little-endian BTF".into());
        }
        let (hdr_len, type_off, type_len) = (word(4)?, word(8)?, word(12)?);
        let (str_off, str_len) = (word(16)?, word(20)?);
        let types_at = (hdr_len + type_off) as usize;
        let types_end = types_at + type_len as usize;
        let strings_at = (hdr_len + str_off) as usize;
        let strings = bytes
            .get(strings_at..strings_at + str_len as usize)
            .ok_or("truncated strings")?;
        let mut starts = Vec::new();
        let mut at = types_at;
        while at < types_end {
            starts.push(at as u32);
            let info = word(at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16
                | KIND_TYPE_TAG => 0,
                other => return Err(format!("unknown BTF kind {other}")),
            };
            at += 12 + extra;
        }
        Ok(Types {
            bytes,
            strings,
            starts,
        })
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// A type's record: its start, kind and member count.
    fn record(&self, id: u32) -> Option<(usize, u32, usize)> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)? as usize;
        let info = self.word(at + 4);
        Some((at, (info >> 24) & 0x1f, (info & 0xffff) as usize))
    }

    /// The first type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        (1..=self.starts.len() as u32).find(|&id| {
            self.record(id)
                .is_some_and(|(at, k, _)| k == kind && self.name(self.word(at)) == name.as_bytes())
        })
    }

    /// Through typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        loop {
            let (at, kind, _) = self.record(id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = self.word(at + 8)
                }
                _ => return Some(id),
            }
        }
    }

    /// The byte offset and size of `path` in struct `ty`: members joined
    /// by dots (`memory.usage`), an array's element by its index or an
    /// enumerator (`memory_events[MEMCG_OOM_KILL]`); members of anonymous
    /// structs and unions are found through them.
    fn field(&self, ty: &str, path: &str) -> Option<(u32, u32)> {
        let mut id = self.find(KIND_STRUCT, ty)?;
        let mut total = 0;
        for part in path.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((name, index)) => (name, Some(index.strip_suffix(']')?)),
                None => (part, None),
            };
            let (member, bits) = self.member(id, name)?;
            total += bits;
            id = self.resolve(member)?;
            if let Some(index) = index {
                let index = match index.parse() {
                    Ok(n) => n,
                    Err(_) => self.any_enumerator(index)?,
                };
                let (at, kind, _) = self.record(id)?;
                if kind != KIND_ARRAY || index >= self.word(at + 20) {
                    return None;
                }
                id = self.resolve(self.word(at + 12))?;
                total += index * 8 * self.size(id)?;
            }
        }
        (total % 8 == 0).then_some((total / 8, self.size(id)?))
    }

    /// The size in bytes of a resolved type that has one.
    fn size(&self, id: u32) -> Option<u32> {
        let (at, kind, _) = self.record(id)?;
        match kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => {
                Some(self.word(at + 8))
            }
            // Pointers: the walk's programs run on 64-bit kernels only.
            2 => Some(8),
            KIND_ARRAY => Some(self.word(at + 20) * self.size(self.resolve(self.word(at + 12))?)?),
            _ => None,
        }
    }

    /// Member `name` of struct or union `id`: its type and bit offset.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let (at, kind, vlen) = self.record(id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let bitfields = self.word(at + 4) >> 31 == 1;
        (0..vlen).find_map(|i| {
            let m = at + 12 + 12 * i;
            let (member_name, member_type, offset) =
                (self.word(m), self.word(m + 4), self.word(m + 8));
            let bits = if bitfields {
                offset & 0xff_ffff
            } else {
                offset
            };
            if self.name(member_name) == name.as_bytes() {
                return Some((member_type, bits));
            }
            // An anonymous struct or union: look inside.
            if member_name == 0 {
                let inner = self.resolve(member_type)?;
                let (found, inner_bits) = self.member(inner, name)?;
                return Some((found, bits + inner_bits));
            }
            None
        })
    }

    /// The value of enumerator `name` of whichever enum has it (C's
    /// enumerators share one namespace).
    fn any_enumerator(&self, name: &str) -> Option<u32> {
        (1..=self.starts.len() as u32).find_map(|id| {
            let (at, kind, vlen) = self.record(id)?;
            if kind != KIND_ENUM {
                return None;
            }
            (0..vlen).find_map(|i| {
                let e = at + 12 + 8 * i;
                (self.name(self.word(e)) == name.as_bytes()).then(|| self.word(e + 4))
            })
        })
    }

    /// The value of enumerator `name` of enum `ty`.
    fn enumerator(&self, ty: &str, name: &str) -> Option<u32> {
        let id = self.find(KIND_ENUM, ty)?;
        let (at, _, vlen) = self.record(id)?;
        (0..vlen).find_map(|i| {
            let e = at + 12 + 8 * i;
            (self.name(self.word(e)) == name.as_bytes()).then(|| self.word(e + 4))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF, where there is one (every kernel cgmetric
    /// runs its eBPF on has it).
    #[test]
    fn finds_offsets_in_the_kernels_btf() {
        let Ok(bytes) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            return;
        };
        let types = Types::parse(&bytes).unwrap();
        // Stable across kernels: the first member of each is at 0.
        let offset_of = |ty, path| types.field(ty, path).map(|(at, _)| at);
        assert_eq!(offset_of("page_counter", "usage"), Some(0));
        assert_eq!(offset_of("mem_cgroup", "css"), Some(0));
        assert_eq!(offset_of("task_group", "css"), Some(0));
        // A path through a nested struct adds up.
        let memory = offset_of("mem_cgroup", "memory").unwrap();
        let max = offset_of("page_counter", "max").unwrap();
        assert_eq!(offset_of("mem_cgroup", "memory.max"), Some(memory + max));
        // Sizes: a long and an int.
        assert_eq!(types.field("page_counter", "max").unwrap().1, 8);
        assert_eq!(types.field("cfs_bandwidth", "nr_periods").unwrap().1, 4);
        // An array's element, by number or by enumerator.
        let events = offset_of("mem_cgroup", "memory_events").unwrap();
        let kill = types.any_enumerator("MEMCG_OOM_KILL").unwrap();
        assert_eq!(
            types.field("mem_cgroup", "memory_events[MEMCG_OOM_KILL]"),
            Some((events + 8 * kill, 8))
        );
        assert_eq!(
            offset_of("mem_cgroup", "memory_events[1]"),
            Some(events + 8)
        );
        assert_eq!(
            offset_of("mem_cgroup", "memory_events[MEMCG_NO_SUCH]"),
            None
        );
        assert_eq!(offset_of("mem_cgroup", "memory_events[1000]"), None);
        assert!(
            types
                .enumerator("cgroup_subsys_id", "CGROUP_SUBSYS_COUNT")
                .unwrap()
                > 0
        );
        assert_eq!(offset_of("mem_cgroup", "no_such_member"), None);
        assert_eq!(offset_of("no_such_struct", "x"), None);
    }
}
