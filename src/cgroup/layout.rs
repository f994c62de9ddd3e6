//! Which cgroup hierarchies exist and where: unified (v2 only), hybrid (v1
//! controllers beside a v2 tree) or legacy (v1 only).
//!
//! Detected once at start from the mount table. A `--cgroup-root` that holds no
//! cgroup mounts (the fixture trees of the tests) is described from its files
//! instead: `cgroup.controllers` marks a v2 hierarchy, a v1 hierarchy is named
//! by its controllers (`cpu,cpuacct`).

use std::path::{Path, PathBuf};

use crate::mounts::MountEntry;

/// The v1 controllers cgmetric reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Memory,
    Blkio,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Memory,
        Controller::Blkio,
        Controller::Pids,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Blkio => "blkio",
            Controller::Pids => "pids",
        }
    }

    fn from_name(name: &str) -> Option<Controller> {
        Controller::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    Unified,
    Hybrid,
    Legacy,
}

impl std::fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayoutKind::Unified => "unified (cgroup v2)",
            LayoutKind::Hybrid => "hybrid (cgroup v1 controllers and a v2 tree)",
            LayoutKind::Legacy => "legacy (cgroup v1)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Occurs when neither the mount table nor the tree under the root shows a
    /// cgroup hierarchy.
    #[error("no cgroup filesystem found under {0} (is cgroupfs mounted?)")]
    NoCgroupFs(PathBuf),
    /// Occurs when the mount table or the root directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The hierarchies of one host, as absolute directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub kind: LayoutKind,
    /// The v2 hierarchy's root directory, if there is one.
    pub unified: Option<PathBuf>,
    /// Each v1 controller cgmetric reads, with its hierarchy's root. Two
    /// controllers may share one hierarchy (`cpu,cpuacct`).
    v1: Vec<(Controller, PathBuf)>,
}

impl Layout {
    /// Detects the layout under `root`: from the mount table when it has cgroup
    /// mounts there, else from the files of the tree.
    pub fn detect(root: &Path) -> Result<Layout, LayoutError> {
        let mounts = crate::mounts::read_mount_table().map_err(|source| LayoutError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
        match Layout::from_mounts(&mounts, root) {
            Some(layout) => Ok(layout),
            None => Layout::from_tree(root),
        }
    }

    /// The layout that the cgroup mounts at or below `root` make up, or `None`
    /// when there are none.
    pub fn from_mounts(mounts: &[MountEntry], root: &Path) -> Option<Layout> {
        let mut unified: Option<PathBuf> = None;
        let mut v1 = Vec::new();
        for mount in mounts.iter().filter(|m| m.mount_point.starts_with(root)) {
            match mount.fs_type.as_str() {
                "cgroup2" => {
                    // Several v2 mounts: the one nearest the root is the host's.
                    let nearer = unified
                        .as_ref()
                        .is_none_or(|u| mount.mount_point.as_os_str().len() < u.as_os_str().len());
                    if nearer {
                        unified = Some(mount.mount_point.clone());
                    }
                }
                "cgroup" => {
                    for controller in mount
                        .super_options
                        .split(',')
                        .filter_map(Controller::from_name)
                    {
                        v1.retain(|(c, _)| *c != controller);
                        v1.push((controller, mount.mount_point.clone()));
                    }
                }
                _ => {}
            }
        }
        Layout::assemble(unified, v1)
    }

    /// Describes a tree that is not mounted cgroupfs (a test fixture) from its
    /// files.
    pub fn from_tree(root: &Path) -> Result<Layout, LayoutError> {
        let io_err = |source| LayoutError::Io {
            path: root.to_path_buf(),
            source,
        };
        if root.join("cgroup.controllers").is_file() {
            return Ok(Layout {
                kind: LayoutKind::Unified,
                unified: Some(root.to_path_buf()),
                v1: Vec::new(),
            });
        }
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::NoCgroupFs(root.to_path_buf()))
            }
            Err(e) => return Err(io_err(e)),
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        let mut unified = None;
        let mut v1 = Vec::new();
        for dir in dirs {
            if dir.join("cgroup.controllers").is_file() {
                unified.get_or_insert(dir);
            } else if dir.join("cgroup.procs").is_file() {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                for controller in name.split(',').filter_map(Controller::from_name) {
                    v1.push((controller, dir.clone()));
                }
            }
        }
        Layout::assemble(unified, v1).ok_or_else(|| LayoutError::NoCgroupFs(root.to_path_buf()))
    }

    fn assemble(unified: Option<PathBuf>, mut v1: Vec<(Controller, PathBuf)>) -> Option<Layout> {
        v1.sort();
        let kind = match (&unified, v1.is_empty()) {
            (Some(_), true) => LayoutKind::Unified,
            (Some(_), false) => LayoutKind::Hybrid,
            (None, false) => LayoutKind::Legacy,
            (None, true) => return None,
        };
        Some(Layout { kind, unified, v1 })
    }

    /// The root of the v1 hierarchy holding `controller`, if it is mounted.
    pub fn v1(&self, controller: Controller) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, p)| p.as_path())
    }

    /// Every distinct hierarchy root cgmetric reads from, v2 first.
    pub fn hierarchies(&self) -> Vec<&Path> {
        let mut roots: Vec<&Path> = self.unified.iter().map(|p| p.as_path()).collect();
        for (_, path) in &self.v1 {
            if !roots.contains(&path.as_path()) {
                roots.push(path);
            }
        }
        roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::parse_mountinfo;

    fn layout_of(fixture: &str) -> Option<Layout> {
        let text = std::fs::read_to_string(format!(
            "{}/tests/fixtures/mountinfo/{fixture}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        Layout::from_mounts(&parse_mountinfo(&text), Path::new("/sys/fs/cgroup"))
    }

    #[test]
    fn hybrid_host() {
        let layout = layout_of("hybrid").unwrap();
        assert_eq!(layout.kind, LayoutKind::Hybrid);
        assert_eq!(
            layout.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            layout.v1(Controller::Cpu),
            Some(Path::new("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(
            layout.v1(Controller::Cpuacct),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(
            layout.v1(Controller::Pids),
            Some(Path::new("/sys/fs/cgroup/pids"))
        );
    }

    #[test]
    fn unified_host() {
        let layout = layout_of("unified").unwrap();
        assert_eq!(layout.kind, LayoutKind::Unified);
        assert_eq!(layout.unified.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(layout.v1(Controller::Memory), None);
        assert_eq!(layout.hierarchies(), vec![Path::new("/sys/fs/cgroup")]);
    }

    #[test]
    fn legacy_host_with_comounted_controllers() {
        let layout = layout_of("legacy").unwrap();
        assert_eq!(layout.kind, LayoutKind::Legacy);
        assert_eq!(layout.unified, None);
        let cpu = Path::new("/sys/fs/cgroup/cpu,cpuacct");
        assert_eq!(layout.v1(Controller::Cpu), Some(cpu));
        assert_eq!(layout.v1(Controller::Cpuacct), Some(cpu));
        // cpu and cpuacct share one hierarchy: it is walked once.
        assert_eq!(
            layout.hierarchies().iter().filter(|p| **p == cpu).count(),
            1
        );
    }

    #[test]
    fn no_cgroup_mounts() {
        assert_eq!(layout_of("none"), None);
    }

    #[test]
    fn fixture_trees_are_described_from_files() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert_eq!(
            Layout::from_tree(&fixtures.join("v2")).unwrap().kind,
            LayoutKind::Unified
        );
        assert_eq!(
            Layout::from_tree(&fixtures.join("v1")).unwrap().kind,
            LayoutKind::Legacy
        );
        assert_eq!(
            Layout::from_tree(&fixtures.join("hybrid")).unwrap().kind,
            LayoutKind::Hybrid
        );
        assert!(matches!(
            Layout::from_tree(&fixtures.join("does-not-exist")),
            Err(LayoutError::NoCgroupFs(_))
        ));
    }
}
