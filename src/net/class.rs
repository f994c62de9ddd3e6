//! Destination classes (`--net-class NAME=CIDR[,CIDR...]`): traffic split by
//! the peer's address. The programs count the bytes of each configured class
//! and of `loopback`; `external` is what is left of the totals, so the
//! classes always sum to `net_bytes_tx` / `net_bytes_rx` exactly.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cgmetric_common::{class_id, class_prefix_v4, LOOPBACK_CLASS};

use crate::metrics::{CLASS_METRICS, METRICS};
use ipnet::IpNet;

/// The class of peers in no other class.
pub const EXTERNAL_CLASS: &str = "external";

/// How many classes `--net-class` may name: the trie's ids are hashes, but
/// every class costs a map lookup per cgroup on every read.
pub const MAX_NAMED_CLASSES: usize = 14;

/// One `--net-class`: a name and the prefixes its peers are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetClass {
    pub name: String,
    pub nets: Vec<IpNet>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error(
        "--net-class {0}: expected NAME=CIDR[,CIDR...] (use + between CIDRs in a mount -o word)"
    )]
    Form(String),
    #[error(
        "--net-class name {0:?}: use lower-case letters, digits and _ (it names files and a label value)"
    )]
    Name(String),
    #[error("--net-class name {0:?} is the daemon's own class")]
    Reserved(String),
    #[error(
        "--net-class name {0:?} would make its files ambiguous in `metric` (it holds net_bytes or ends in a file's name)"
    )]
    Ambiguous(String),
    #[error("--net-class {name}: {cidr:?} is not a CIDR (10.0.0.0/8, fd00::/8)")]
    Cidr { name: String, cidr: String },
    #[error("--net-class {0} is given twice")]
    Twice(String),
    #[error("at most {MAX_NAMED_CLASSES} --net-class names")]
    TooMany,
}

impl FromStr for NetClass {
    type Err = ClassError;

    fn from_str(text: &str) -> Result<NetClass, ClassError> {
        let (name, cidrs) = text
            .split_once('=')
            .ok_or_else(|| ClassError::Form(text.to_string()))?;
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(ClassError::Name(name.to_string()));
        }
        if name == EXTERNAL_CLASS || name == LOOPBACK_CLASS {
            return Err(ClassError::Reserved(name.to_string()));
        }
        if is_ambiguous(name) {
            return Err(ClassError::Ambiguous(name.to_string()));
        }
        let nets = cidrs
            .split([',', '+'])
            .map(|cidr| {
                cidr.trim().parse::<IpNet>().map_err(|_| ClassError::Cidr {
                    name: name.to_string(),
                    cidr: cidr.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetClass {
            name: name.to_string(),
            nets,
        })
    }
}

/// Whether a class's files would read as something else in `metric`, whose
/// lines are `<container>_<file> <value>` and whose names may hold `_`: a
/// per-class file ending in a catalogue file's name would be taken for it,
/// and one holding `net_bytes` would split at the wrong place.
fn is_ambiguous(class: &str) -> bool {
    class.contains("net_bytes")
        || CLASS_METRICS.iter().any(|def| {
            let file = def.file_of(class);
            METRICS
                .iter()
                .any(|m| file.ends_with(&format!("_{}", m.file)))
        })
}

impl fmt::Display for NetClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nets: Vec<String> = self.nets.iter().map(|n| n.to_string()).collect();
        write!(f, "{}={}", self.name, nets.join(","))
    }
}

/// The classes the programs count, in the order files and series list
/// them: the configured ones, then `loopback`. `external` is derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classes {
    counted: Vec<Counted>,
    /// Every name, `external` last: shared by the samples that carry them.
    names: Vec<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Counted {
    name: String,
    id: u64,
    nets: Vec<IpNet>,
}

impl Classes {
    /// Checks the configured classes and adds `loopback`. None configured:
    /// no classes at all (the programs look nothing up).
    pub fn new(configured: &[NetClass]) -> Result<Classes, ClassError> {
        if configured.is_empty() {
            return Ok(Classes::default());
        }
        if configured.len() > MAX_NAMED_CLASSES {
            return Err(ClassError::TooMany);
        }
        let mut counted: Vec<Counted> = Vec::new();
        for class in configured {
            if counted.iter().any(|c| c.name == class.name) {
                return Err(ClassError::Twice(class.name.clone()));
            }
            counted.push(Counted {
                name: class.name.clone(),
                id: class_id(&class.name),
                nets: class.nets.clone(),
            });
        }
        counted.push(Counted {
            name: LOOPBACK_CLASS.to_string(),
            id: class_id(LOOPBACK_CLASS),
            nets: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        });
        let names = counted
            .iter()
            .map(|c| c.name.as_str())
            .chain([EXTERNAL_CLASS])
            .map(Arc::from)
            .collect();
        Ok(Classes { counted, names })
    }

    pub fn is_empty(&self) -> bool {
        self.counted.is_empty()
    }

    /// How many classes the programs count (`external` not among them).
    pub fn counted(&self) -> usize {
        self.counted.len()
    }

    /// The map id of the counted class at `index`.
    pub fn id(&self, index: usize) -> u64 {
        self.counted[index].id
    }

    /// Every class's name, counted ones first, then `external`; empty when
    /// none are configured.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.names.iter().map(|n| &**n)
    }

    /// The name at `index` among [`Classes::names`], shared.
    pub fn shared_name(&self, index: usize) -> Arc<str> {
        self.names[index].clone()
    }

    /// The index among [`Classes::names`] of `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names().position(|n| n == name)
    }

    /// The trie's entries: (IPv6 or IPv4-mapped address, prefix length,
    /// class id). Prefixes given twice go to the class named last, as the
    /// trie keeps one value per prefix; longer prefixes win at lookup.
    pub fn trie_entries(&self) -> Vec<([u8; 16], u32, u64)> {
        let mut entries = Vec::new();
        for class in &self.counted {
            for net in &class.nets {
                let (addr, len) = match net.trunc() {
                    IpNet::V4(v4) => {
                        class_prefix_v4(v4.addr().octets(), u32::from(v4.prefix_len()))
                    }
                    IpNet::V6(v6) => (v6.addr().octets(), u32::from(v6.prefix_len())),
                };
                entries.push((addr, len, class.id));
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_cidrs() {
        let c: NetClass = "internal=10.0.0.0/8,fd00::/8+192.168.0.0/16"
            .parse()
            .unwrap();
        assert_eq!(c.name, "internal");
        assert_eq!(c.nets.len(), 3);
        assert_eq!(c.to_string(), "internal=10.0.0.0/8,fd00::/8,192.168.0.0/16");
    }

    #[test]
    fn refuses_what_would_break_files_or_labels() {
        assert!(matches!("x".parse::<NetClass>(), Err(ClassError::Form(_))));
        assert!(matches!(
            "A=10.0.0.0/8".parse::<NetClass>(),
            Err(ClassError::Name(_))
        ));
        assert!(matches!(
            "a/b=10.0.0.0/8".parse::<NetClass>(),
            Err(ClassError::Name(_))
        ));
        assert!(matches!(
            "=10.0.0.0/8".parse::<NetClass>(),
            Err(ClassError::Name(_))
        ));
        assert!(matches!(
            "external=10.0.0.0/8".parse::<NetClass>(),
            Err(ClassError::Reserved(_))
        ));
        for ambiguous in [
            "net_bytes",
            "x_net_bytes_tx",
            "pids_current",
            "memory_usage",
        ] {
            assert!(
                matches!(
                    format!("{ambiguous}=10.0.0.0/8").parse::<NetClass>(),
                    Err(ClassError::Ambiguous(_))
                ),
                "{ambiguous}"
            );
        }
        assert!("usage=10.0.0.0/8".parse::<NetClass>().is_ok());
        assert!(matches!(
            "lan=10.0.0.300/8".parse::<NetClass>(),
            Err(ClassError::Cidr { .. })
        ));
        let twice = [
            "a=10.0.0.0/8".parse().unwrap(),
            "a=11.0.0.0/8".parse().unwrap(),
        ];
        assert_eq!(Classes::new(&twice), Err(ClassError::Twice("a".into())));
    }

    #[test]
    fn loopback_and_external_come_with_any_class() {
        assert!(Classes::new(&[]).unwrap().is_empty());
        assert_eq!(Classes::new(&[]).unwrap().names().count(), 0);
        let classes = Classes::new(&["lan=10.1.0.0/16".parse().unwrap()]).unwrap();
        let names: Vec<&str> = classes.names().collect();
        assert_eq!(names, ["lan", "loopback", "external"]);
        assert_eq!(classes.counted(), 2);
    }

    #[test]
    fn ipv4_prefixes_are_mapped_into_ipv6() {
        let classes = Classes::new(&["lan=10.1.2.3/16".parse().unwrap()]).unwrap();
        let entries = classes.trie_entries();
        let mut want = [0u8; 16];
        want[10..].copy_from_slice(&[0xff, 0xff, 10, 1, 0, 0]);
        assert_eq!(entries[0], (want, 112, class_id("lan")));
        // loopback: 127/8 and ::1.
        assert_eq!(entries[1].1, 104);
        assert_eq!(
            entries[2],
            (
                {
                    let mut a = [0u8; 16];
                    a[15] = 1;
                    a
                },
                128,
                class_id("loopback")
            )
        );
    }
}
