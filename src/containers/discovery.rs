//! Which cgroups are containers, and what they are called.
//!
//! Two sources: the container runtimes, recognised from their cgroups and
//! named from their files ([`crate::containers::runtime`]), and `--cgroup GLOB`: a
//! cgroup whose path relative to the hierarchy roots matches is a container
//! named by its last path component. Every hierarchy is walked (on a hybrid
//! host a container may exist only in the v1 controllers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use parking_lot::Mutex;

use crate::cgroup::Layout;
use crate::containers::runtime::{classify, Identity, MetadataRoots, Resolution, Runtime};
use crate::containers::watch::{Change, Watcher};

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
    /// What its runtime records besides the name (Kubernetes identity,
    /// image); empty for `--cgroup` containers.
    pub identity: Identity,
}

/// How often cgroups are walked when inotify cannot follow them all.
const REWALK: Duration = Duration::from_secs(1);

/// What the registry must do to match the cgroups, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Added(Found),
    /// The container of this cgroup path was created or removed in one of
    /// the hierarchies (runtimes make them one after the other): its
    /// directories are not what they were.
    Changed(PathBuf),
    /// The container of this cgroup path vanished.
    Removed(PathBuf),
    /// The last process of the container at this cgroup path left (v2
    /// `cgroup.events` says `populated 0`); its cgroups still exist.
    Emptied(PathBuf),
}

/// Every source of containers, and what is known of the hierarchies: one
/// walk at start, then only the changes inotify reports. Walking on every
/// read instead costs seconds per lookup on a host with 10,000 cgroups.
pub struct Discovery {
    globs: Globs,
    /// `None` when only `--cgroup` patterns are wanted (fixture trees).
    runtimes: Option<MetadataRoots>,
    state: Mutex<State>,
    /// For containers whose runtime can rename them: when their name file
    /// last changed, as last seen.
    name_times: Mutex<HashMap<PathBuf, SystemTime>>,
}

#[derive(Default)]
struct State {
    /// Every cgroup discovery looked at: containers, and the cgroups that
    /// may hold containers. Nothing below a container (containers do not
    /// nest), so neither is watched.
    known: BTreeMap<PathBuf, Known>,
    watcher: Option<Watcher>,
    /// Whether `known` was walked and no change was lost since.
    walked: bool,
    /// When the last walk was, if it could not watch everything it saw (no
    /// inotify, or its limit): changes there show at the next walk.
    unwatched: Option<Instant>,
    /// Whether the watch limit was already reported.
    limit_reported: bool,
    /// Containers whose missing metadata was already reported.
    reported: HashSet<String>,
}

/// What one walk found.
#[derive(Default)]
struct Walked {
    /// What cgroups were before a rewalk, so none is resolved twice.
    remembered: BTreeMap<PathBuf, Class>,
    /// Containers new to discovery.
    added: Vec<Found>,
    /// Known containers found in one more hierarchy.
    grown: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
struct Known {
    /// Which hierarchies (by index in `Layout::hierarchies`) hold it; it is
    /// gone when none does.
    hierarchies: u64,
    class: Class,
}

#[derive(Debug, Clone)]
enum Class {
    /// May hold containers: walked and watched.
    Plain,
    Container(Found),
    /// A sandbox, or deeper than any pattern reaches: neither listed nor
    /// walked.
    Skipped,
}

impl Discovery {
    pub fn new(globs: Globs, runtimes: Option<MetadataRoots>) -> Discovery {
        Discovery {
            globs,
            runtimes,
            state: Mutex::new(State::default()),
            name_times: Mutex::default(),
        }
    }

    /// The containers among `known` (cgroup, runtime, id) that their
    /// runtime renamed since the last call, with the names they now ask
    /// for. Only containers whose name file changed are resolved again: a
    /// `stat` of each distinct name file, no parsing.
    pub fn renames(&self, known: &[(PathBuf, &'static str, String)]) -> Vec<(PathBuf, String)> {
        let Some(roots) = &self.runtimes else {
            return Vec::new();
        };
        let mut changed_at: HashMap<PathBuf, Option<SystemTime>> = HashMap::new();
        let mut times = self.name_times.lock();
        let mut renamed = Vec::new();
        for (cgroup, runtime, id) in known {
            let Some(runtime) = Runtime::by_name(runtime) else {
                continue;
            };
            let Some(file) = roots.name_file(runtime, id) else {
                continue;
            };
            let now = *changed_at
                .entry(file)
                .or_insert_with_key(|file| std::fs::metadata(file).and_then(|m| m.modified()).ok());
            let Some(now) = now else { continue };
            match times.insert(cgroup.clone(), now) {
                Some(before) if before != now => {}
                // First seen: discovery has just resolved its name.
                _ => continue,
            }
            if let Resolution::Named(name, _, _) = roots.resolve(runtime, id) {
                renamed.push((cgroup.clone(), sanitize(&name)));
            }
        }
        let live: HashSet<&PathBuf> = known.iter().map(|(cgroup, _, _)| cgroup).collect();
        times.retain(|cgroup, _| live.contains(cgroup));
        renamed
    }

    /// From now on, learn of cgroups from inotify instead of walking. Returns
    /// the fd that becomes readable when changes are waiting.
    pub fn watch(&self) -> std::io::Result<RawFd> {
        let watcher = Watcher::new()?;
        let fd = watcher.fd();
        let mut state = self.state.lock();
        state.watcher = Some(watcher);
        state.walked = false;
        Ok(fd)
    }

    /// How often the hierarchies must be walked because not all of them are
    /// watched; `None` when inotify reports every change.
    pub fn rewalk_interval(&self) -> Option<Duration> {
        self.state.lock().unwatched.map(|_| REWALK)
    }

    /// What changed since the last call: everything on the first.
    pub fn changes(&self, layout: &Layout) -> Vec<Event> {
        let mut state = self.state.lock();
        let mut events = Vec::new();
        if state.walked {
            let pending = match state.watcher.as_mut().map(Watcher::changes) {
                Some(Ok(changes)) => changes,
                Some(Err(e)) => {
                    log::warn!("reading cgroup changes failed ({e}); walking instead");
                    vec![Change::Lost]
                }
                // Unwatched: the rewalk below, when due, finds the changes.
                None => Vec::new(),
            };
            let roots = layout.hierarchies();
            for change in pending {
                match change {
                    Change::Created { hierarchy, path } => {
                        let Some(root) = roots.get(hierarchy) else {
                            continue;
                        };
                        self.scan(&mut state, hierarchy, root, &path, &mut events);
                    }
                    Change::Removed { hierarchy, path } => {
                        forget_cgroup(&mut state, hierarchy, &path, &mut events)
                    }
                    Change::Events { path } => {
                        let container = matches!(
                            state.known.get(&path),
                            Some(Known {
                                class: Class::Container(_),
                                ..
                            })
                        );
                        let events_file =
                            roots.first().map(|r| r.join(&path).join("cgroup.events"));
                        if container && events_file.is_some_and(|f| is_unpopulated(&f)) {
                            events.push(Event::Emptied(path));
                        }
                    }
                    Change::Lost => {
                        state.walked = false;
                        break;
                    }
                }
            }
        }
        let due = state.unwatched.is_some_and(|last| last.elapsed() >= REWALK);
        if !state.walked || due {
            self.rescan(&mut state, layout, &mut events);
        }
        events
    }

    /// Walks every hierarchy afresh and reports the difference.
    fn rescan(&self, state: &mut State, layout: &Layout, events: &mut Vec<Event>) {
        let old = std::mem::take(&mut state.known);
        // Names already resolved stay resolved: no metadata re-read, no
        // second "no name" line.
        let mut walked = Walked {
            remembered: old
                .iter()
                .map(|(p, k)| (p.clone(), k.class.clone()))
                .collect(),
            ..Walked::default()
        };
        state.walked = true;
        state.unwatched = state.watcher.is_none().then(Instant::now);
        for (hierarchy, root) in layout.hierarchies().into_iter().enumerate() {
            self.walk(state, hierarchy, root, Path::new(""), &mut walked);
        }
        // What the walk saw grow is the same cgroup in several hierarchies;
        // changes are what differs from before.
        for (path, known) in &old {
            if !matches!(known.class, Class::Container(_)) {
                continue;
            }
            match state.known.get(path) {
                None => {
                    if let Some(watcher) = state.watcher.as_mut() {
                        watcher.unwatch_events(path);
                    }
                    events.push(Event::Removed(path.clone()))
                }
                Some(now) if now.hierarchies != known.hierarchies => {
                    events.push(Event::Changed(path.clone()))
                }
                Some(_) => {}
            }
        }
        walked.added.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        for found in walked.added {
            if !matches!(
                old.get(&found.cgroup),
                Some(Known {
                    class: Class::Container(_),
                    ..
                })
            ) {
                events.push(Event::Added(found));
            }
        }
    }

    /// Learns of `path` (new in `hierarchy`) and everything below it.
    fn scan(
        &self,
        state: &mut State,
        hierarchy: usize,
        root: &Path,
        path: &Path,
        events: &mut Vec<Event>,
    ) {
        // Only cgroups that may hold containers are watched, so the parent
        // is one of them (or was, and its removal is queued).
        let mut walked = Walked::default();
        self.walk(state, hierarchy, root, path, &mut walked);
        walked.added.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        events.extend(walked.grown.into_iter().map(Event::Changed));
        events.extend(walked.added.into_iter().map(Event::Added));
    }

    /// Records `path` in `hierarchy`, then watches and walks it if it may
    /// hold containers.
    fn walk(
        &self,
        state: &mut State,
        hierarchy: usize,
        root: &Path,
        path: &Path,
        walked: &mut Walked,
    ) {
        if !path.as_os_str().is_empty() {
            // A cgroup removed meanwhile is simply not found.
            if !root.join(path).is_dir() {
                return;
            }
            let class = match state.known.get_mut(path) {
                Some(known) => {
                    let bit = 1 << hierarchy;
                    if known.hierarchies & bit == 0 {
                        known.hierarchies |= bit;
                        if let Class::Container(found) = &known.class {
                            walked.grown.push(found.cgroup.clone());
                        }
                    }
                    known.class.clone()
                }
                None => {
                    let class = walked
                        .remembered
                        .remove(path)
                        .unwrap_or_else(|| self.classify(path, &mut state.reported));
                    if let Class::Container(found) = &class {
                        walked.added.push(found.clone());
                    }
                    let known = Known {
                        hierarchies: 1 << hierarchy,
                        class: class.clone(),
                    };
                    state.known.insert(path.to_path_buf(), known);
                    class
                }
            };
            if let (Class::Container(_), Some(watcher)) = (&class, state.watcher.as_mut()) {
                // Only v2 cgroups have the file: the kernel says there when
                // the last process left.
                if root.join(path).join("cgroup.events").exists() {
                    watcher.watch_events(root, path);
                }
            }
            if !matches!(class, Class::Plain) {
                return;
            }
        }
        if let Some(watcher) = state.watcher.as_mut() {
            if let Err(e) = watcher.watch(hierarchy, root, path) {
                // The watch limit: still correct, within a walk's interval.
                state.unwatched = Some(Instant::now());
                if !std::mem::replace(&mut state.limit_reported, true) {
                    log::warn!(
                        "cannot watch {} ({e}); new and removed cgroups show within {} s \
                         instead of at once (raise fs.inotify.max_user_watches)",
                        root.join(path).display(),
                        REWALK.as_secs()
                    );
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(root.join(path)) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child = path.join(entry.file_name());
                self.walk(state, hierarchy, root, &child, walked);
            }
        }
    }

    /// What `cgroup` is, from its path and the runtimes' files.
    fn classify(&self, cgroup: &Path, reported: &mut HashSet<String>) -> Class {
        if self.globs.set.is_match(cgroup) {
            return Class::Container(Found {
                name: display_name(cgroup),
                cgroup: cgroup.to_path_buf(),
                id: None,
                runtime: "cgroup",
                identity: Identity::default(),
            });
        }
        let Some(roots) = &self.runtimes else {
            let depth = cgroup.components().count();
            return match self.globs.max_depth {
                Some(max) if depth >= max => Class::Skipped,
                _ => Class::Plain,
            };
        };
        let Some((runtime, id)) = classify(cgroup) else {
            return Class::Plain;
        };
        let (name, identity, runtime) = match roots.resolve(runtime, &id) {
            Resolution::Named(name, identity, runtime) => (sanitize(&name), identity, runtime),
            Resolution::Sandbox => return Class::Skipped,
            Resolution::Unknown(why) => {
                if reported.insert(id.clone()) {
                    log::warn!(
                        "{} container {}: no name ({why}); using its short id",
                        runtime.name(),
                        &id[..12]
                    );
                }
                (id[..12].to_string(), Identity::default(), runtime)
            }
        };
        Class::Container(Found {
            cgroup: cgroup.to_path_buf(),
            name,
            id: Some(id),
            runtime: runtime.name(),
            identity,
        })
    }
}

/// Whether the `cgroup.events` file at `path` says `populated 0`.
fn is_unpopulated(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.lines().any(|l| l.trim() == "populated 0"))
}

/// `path` is gone from `hierarchy`, and so is everything below it.
fn forget_cgroup(state: &mut State, hierarchy: usize, path: &Path, events: &mut Vec<Event>) {
    let below: Vec<PathBuf> = state
        .known
        .range(path.to_path_buf()..)
        .take_while(|(p, _)| p.starts_with(path))
        .map(|(p, _)| p.clone())
        .collect();
    for cgroup in below {
        let Some(known) = state.known.get_mut(&cgroup) else {
            continue;
        };
        let bit = 1 << hierarchy;
        if known.hierarchies & bit == 0 {
            continue;
        }
        known.hierarchies &= !bit;
        if let (Class::Container(_), Some(watcher)) = (&known.class, state.watcher.as_mut()) {
            watcher.unwatch_events(&cgroup);
        }
        if known.hierarchies != 0 {
            if matches!(known.class, Class::Container(_)) {
                events.push(Event::Changed(cgroup));
            }
            continue;
        }
        if let Some(Known {
            class: Class::Container(found),
            ..
        }) = state.known.remove(&cgroup)
        {
            if let Some(id) = &found.id {
                state.reported.remove(id);
            }
            events.push(Event::Removed(cgroup));
        }
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

/// Replaces control characters, whitespace other than a plain space, and `/`
/// with `_`, and turns `.` and `..` into `_` and `__`: a name is one line in
/// `metric` and one path component of the tree, never a way out of it.
/// (Runtime metadata is not trusted: any tenant can name a container.)
pub fn sanitize(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_control() || (c.is_whitespace() && c != ' ') || c == '/' {
                '_'
            } else {
                c
            }
        })
        .collect();
    match name.as_str() {
        "." | ".." => "_".repeat(name.len()),
        _ => name,
    }
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
        let discovery = Discovery::new(globs, None);
        let events = discovery.changes(&layout);
        // Unwatched, every call walks again; nothing changed meanwhile.
        assert_eq!(discovery.changes(&layout), []);
        events
            .into_iter()
            .map(|e| match e {
                Event::Added(f) => format!("{}={}", f.cgroup.display(), f.name),
                other => panic!("{other:?}"),
            })
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
    fn a_watched_tree_is_walked_once_then_followed() {
        let root = tempfile::tempdir().unwrap();
        let tree = root.path();
        std::fs::write(tree.join("cgroup.controllers"), "").unwrap();
        std::fs::create_dir_all(tree.join("tenants/alpha/inner")).unwrap();
        let layout = Layout::from_tree(tree).unwrap();
        let globs = Globs::new(&["tenants/*".to_string()]).unwrap();
        let discovery = Discovery::new(globs, None);
        discovery.watch().unwrap();
        let added = |e: &[Event]| -> Vec<String> {
            e.iter()
                .map(|e| match e {
                    Event::Added(f) => format!("+{}", f.name),
                    Event::Removed(p) => format!("-{}", p.display()),
                    Event::Changed(p) => format!("~{}", p.display()),
                    Event::Emptied(p) => format!("0{}", p.display()),
                })
                .collect()
        };
        assert_eq!(added(&discovery.changes(&layout)), ["+alpha"]);
        assert_eq!(discovery.changes(&layout), []);
        // A tree made at once (mkdir -p) is found whole; a container's
        // insides are not containers.
        std::fs::create_dir_all(tree.join("tenants/beta/inner")).unwrap();
        std::fs::create_dir(tree.join("other")).unwrap();
        assert_eq!(added(&discovery.changes(&layout)), ["+beta"]);
        std::fs::remove_dir(tree.join("tenants/alpha/inner")).unwrap();
        std::fs::remove_dir(tree.join("tenants/alpha")).unwrap();
        assert_eq!(added(&discovery.changes(&layout)), ["-tenants/alpha"]);
        // A rename is a rewalk, and comes out as what it is.
        std::fs::rename(tree.join("tenants/beta"), tree.join("tenants/gamma")).unwrap();
        assert_eq!(
            added(&discovery.changes(&layout)),
            ["-tenants/beta", "+gamma"]
        );
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
        assert_eq!(sanitize("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(sanitize(".."), "__");
        assert_eq!(sanitize("."), "_");
        assert_eq!(sanitize("a\0b\\c"), "a_b\\c");
        assert_eq!(display_name(Path::new("a/b c")), "b c");
    }
}
