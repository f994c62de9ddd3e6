//! Which cgroups are containers, and what they are called.
//!
//! Two sources: the container runtimes, recognised from their cgroups and
//! named from their files ([`crate::runtime`]), and `--cgroup GLOB`: a
//! cgroup whose path relative to the hierarchy roots matches is a container
//! named by its last path component. Every hierarchy is walked (on a hybrid
//! host a container may exist only in the v1 controllers).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use parking_lot::Mutex;

use crate::cgroup::Layout;
use crate::runtime::{classify, MetadataRoots, Resolution};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Occurs when a `--cgroup` pattern is not a valid glob.
    #[error("invalid --cgroup pattern {pattern:?}: {source}")]
    BadGlob {
        pattern: String,
        source: globset::Error,
    },
}

/// A container as discovery sees it, before the registry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Path relative to the hierarchy roots, without a leading `/`.
    pub cgroup: PathBuf,
    /// The name it asks for; the registry may add a suffix.
    pub name: String,
    /// The runtime's container id; `None` for `--cgroup` containers, whose
    /// id is their cgroup's.
    pub id: Option<String>,
    pub runtime: &'static str,
}

/// Every source of containers.
pub struct Discovery {
    globs: Globs,
    /// `None` when only `--cgroup` patterns are wanted (fixture trees).
    runtimes: Option<MetadataRoots>,
    /// Containers whose missing metadata was already reported.
    reported: Mutex<HashSet<String>>,
}

impl Discovery {
    pub fn new(globs: Globs, runtimes: Option<MetadataRoots>) -> Discovery {
        Discovery {
            globs,
            runtimes,
            reported: Mutex::new(HashSet::new()),
        }
    }

    /// Every container of `layout`.
    pub fn discover(&self, layout: &Layout) -> Vec<Found> {
        let Some(roots) = &self.runtimes else {
            return self.globs.discover(layout);
        };
        let mut cgroups = BTreeSet::new();
        for root in layout.hierarchies() {
            walk(root, Path::new(""), None, &mut cgroups);
        }
        let mut found = Vec::new();
        // Sorted paths: a container comes before the cgroups inside it, and
        // they follow it without a gap, so the last container is the only
        // one a path can be inside of.
        let mut containers: Vec<PathBuf> = Vec::new();
        for cgroup in cgroups {
            if containers.last().is_some_and(|c| cgroup.starts_with(c)) {
                continue;
            }
            if self.globs.set.is_match(&cgroup) {
                containers.push(cgroup.clone());
                found.push(Found {
                    name: display_name(&cgroup),
                    cgroup,
                    id: None,
                    runtime: "cgroup",
                });
                continue;
            }
            let Some((runtime, id)) = classify(&cgroup) else {
                continue;
            };
            let (name, runtime) = match roots.resolve(runtime, &id) {
                Resolution::Named(name, runtime) => (sanitize(&name), runtime),
                Resolution::Sandbox => continue,
                Resolution::Unknown(why) => {
                    if self.reported.lock().insert(id.clone()) {
                        log::warn!(
                            "{} container {}: no name ({why}); using its short id",
                            runtime.name(),
                            &id[..12]
                        );
                    }
                    (id[..12].to_string(), runtime)
                }
            };
            containers.push(cgroup.clone());
            found.push(Found {
                cgroup,
                name,
                id: Some(id),
                runtime: runtime.name(),
            });
        }
        found
    }
}

/// The compiled `--cgroup` patterns.
#[derive(Debug, Clone)]
pub struct Globs {
    set: GlobSet,
    /// How deep a match can be; `None` when a pattern has `**`.
    max_depth: Option<usize>,
}

impl Globs {
    pub fn new(patterns: &[String]) -> Result<Globs, DiscoveryError> {
        let mut builder = GlobSetBuilder::new();
        let mut max_depth = Some(0);
        for pattern in patterns {
            let trimmed = pattern.trim_matches('/');
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .build()
                .map_err(|source| DiscoveryError::BadGlob {
                    pattern: pattern.clone(),
                    source,
                })?;
            builder.add(glob);
            max_depth = match (max_depth, trimmed.contains("**")) {
                (Some(depth), false) => Some(depth.max(trimmed.split('/').count())),
                _ => None,
            };
        }
        let set = builder.build().map_err(|source| DiscoveryError::BadGlob {
            pattern: patterns.join(" "),
            source,
        })?;
        Ok(Globs { set, max_depth })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Every cgroup of `layout` that a pattern matches.
    pub fn discover(&self, layout: &Layout) -> Vec<Found> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut cgroups = BTreeSet::new();
        for root in layout.hierarchies() {
            walk(root, Path::new(""), self.max_depth, &mut cgroups);
        }
        cgroups
            .into_iter()
            .filter(|cgroup| self.set.is_match(cgroup))
            .map(|cgroup: PathBuf| Found {
                name: display_name(&cgroup),
                cgroup,
                id: None,
                runtime: "cgroup",
            })
            .collect()
    }
}

/// Collects every cgroup below `root` (as paths relative to it), at most
/// `depth` levels deep.
fn walk(root: &Path, relative: &Path, depth: Option<usize>, out: &mut BTreeSet<PathBuf>) {
    if depth == Some(0) {
        return;
    }
    // A cgroup removed during the walk is simply not found.
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let child = relative.join(entry.file_name());
            walk(root, &child, depth.map(|d| d - 1), out);
            out.insert(child);
        }
    }
}

/// The name a cgroup asks for: its last path component, with characters
/// that would break a line-oriented file (control characters) replaced.
pub fn display_name(cgroup: &Path) -> String {
    let last = cgroup
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    sanitize(&last)
}

/// Replaces control characters and whitespace other than a plain space with
/// `_`: a name is one line in `metric`, one path component on disk.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() || (c.is_whitespace() && c != ' ') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(globs: &[&str], tree: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(tree);
        let layout = Layout::from_tree(&root).unwrap();
        let globs = Globs::new(&globs.iter().map(|g| g.to_string()).collect::<Vec<_>>()).unwrap();
        globs
            .discover(&layout)
            .into_iter()
            .map(|f| format!("{}={}", f.cgroup.display(), f.name))
            .collect()
    }

    #[test]
    fn star_does_not_cross_slashes() {
        assert_eq!(
            found(&["tenants/*"], "v2"),
            [
                "tenants/alpha=alpha",
                "tenants/beta=beta",
                "tenants/broken=broken"
            ]
        );
        assert_eq!(found(&["*"], "v2"), ["tenants=tenants"]);
        assert_eq!(found(&["**/alpha"], "v2"), ["tenants/alpha=alpha"]);
        assert_eq!(found(&["/tenants/a*/"], "v2"), ["tenants/alpha=alpha"]);
    }

    #[test]
    fn every_hierarchy_is_walked_once_per_cgroup() {
        // v1: alpha exists in four hierarchies; it is one container.
        assert_eq!(found(&["tenants/*"], "v1"), ["tenants/alpha=alpha"]);
        // hybrid: found in the v1 controllers and the v2 tree alike.
        assert_eq!(found(&["tenants/*"], "hybrid"), ["tenants/alpha=alpha"]);
    }

    #[test]
    fn no_patterns_no_containers() {
        assert!(found(&[], "v2").is_empty());
    }

    #[test]
    fn bad_glob_is_a_clear_error() {
        let err = Globs::new(&["tenants/[".to_string()]).unwrap_err();
        assert!(err.to_string().contains("tenants/["), "{err}");
    }

    #[test]
    fn names_lose_control_characters() {
        assert_eq!(sanitize("web\n1\t\"x\""), "web_1_\"x\"");
        assert_eq!(display_name(Path::new("a/b c")), "b c");
    }
}
