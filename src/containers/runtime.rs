//! Container runtimes, recognised from their cgroups and named from their
//! files: no runtime API, no CLI call.
//!
//! | runtime | cgroup (systemd driver / cgroupfs driver) | names from |
//! |---|---|---|
//! | Docker | `docker-<id>.scope` / `docker/<id>` | `<docker-root>/containers/<id>/config.v2.json` "Name" |
//! | containerd (Kubernetes) | `cri-containerd-<id>.scope` / `kubepods/<qos>/pod<uid>/<id>` | OCI bundle `config.json` annotations under `<containerd-state>/io.containerd.runtime.v2.task/<ns>/<id>/` |
//! | CRI-O | `crio-<id>.scope` / `kubepods/.../<id>` | `<containers-storage>/overlay-containers/<id>/userdata/config.json` annotations |
//! | Podman | `libpod-<id>.scope` / `libpod_parent/libpod-<id>` | `<containers-storage>/overlay-containers/containers.json` |
//!
//! Kubernetes containers are named `<namespace>_<pod>_<container>`; pause
//! (sandbox) containers are not containers here.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    Crio,
    Podman,
    /// A cgroup under `kubepods` named by a bare id: containerd or CRI-O
    /// with the cgroupfs driver; the metadata tells which.
    Kubernetes,
}

impl Runtime {
    /// The runtime a [`Runtime::name`] stands for, where one name is one
    /// runtime.
    pub fn by_name(name: &str) -> Option<Runtime> {
        [Runtime::Docker, Runtime::Crio, Runtime::Podman]
            .into_iter()
            .find(|r| r.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd | Runtime::Kubernetes => "containerd",
            Runtime::Crio => "cri-o",
            Runtime::Podman => "podman",
        }
    }
}

/// A container id as runtimes write them: hex, 12 to 64 characters.
fn is_id(text: &str) -> bool {
    (12..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Which runtime's container a cgroup is, and its id, from the path alone.
pub fn classify(cgroup: &Path) -> Option<(Runtime, String)> {
    let name = cgroup.file_name()?.to_str()?;
    let parent = cgroup
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|p| p.to_str());
    let scoped = |prefix: &str| {
        name.strip_prefix(prefix)?
            .strip_suffix(".scope")
            .filter(|id| is_id(id))
    };
    if let Some(id) = scoped("docker-") {
        return Some((Runtime::Docker, id.to_string()));
    }
    if let Some(id) = scoped("cri-containerd-") {
        return Some((Runtime::Containerd, id.to_string()));
    }
    if let Some(id) = scoped("crio-") {
        return Some((Runtime::Crio, id.to_string()));
    }
    if let Some(id) = scoped("libpod-") {
        return Some((Runtime::Podman, id.to_string()));
    }
    if !is_id(name) {
        return name
            .strip_prefix("libpod-")
            .filter(|id| is_id(id) && parent == Some("libpod_parent"))
            .map(|id| (Runtime::Podman, id.to_string()));
    }
    if parent == Some("docker") {
        return Some((Runtime::Docker, name.to_string()));
    }
    let under_kubepods = cgroup.components().next().is_some_and(|c| {
        c.as_os_str()
            .to_str()
            .is_some_and(|c| c.starts_with("kubepods"))
    });
    if under_kubepods && parent.is_some_and(|p| p.starts_with("pod")) {
        return Some((Runtime::Kubernetes, name.to_string()));
    }
    None
}

/// What the runtime's files say about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Its name, and the runtime that turned out to own it.
    Named(String, Runtime),
    /// A pause/sandbox container: not listed.
    Sandbox,
    /// No usable metadata: the reason, for one log line.
    Unknown(String),
}

/// Where the runtimes keep their files.
#[derive(Debug, Clone)]
pub struct MetadataRoots {
    pub docker_root: PathBuf,
    pub containerd_state: PathBuf,
    pub containers_storage: PathBuf,
}

impl MetadataRoots {
    pub fn resolve(&self, runtime: Runtime, id: &str) -> Resolution {
        match runtime {
            Runtime::Docker => self.docker(id),
            Runtime::Containerd => self.containerd(id),
            Runtime::Crio => self.crio(id),
            Runtime::Podman => self.podman(id),
            Runtime::Kubernetes => match self.containerd(id) {
                Resolution::Unknown(why) => match self.crio(id) {
                    Resolution::Unknown(_) => Resolution::Unknown(why),
                    found => found,
                },
                found => found,
            },
        }
    }

    /// What changes when the runtime renames the container (`docker
    /// rename`, `podman rename`); `None` for runtimes whose names never
    /// change. Docker rewrites `config.v2.json` by renaming a new file into
    /// the container's directory, which changes that directory's time;
    /// Podman rewrites its one `containers.json` for all its containers.
    pub fn name_file(&self, runtime: Runtime, id: &str) -> Option<PathBuf> {
        match runtime {
            Runtime::Docker => Some(self.docker_root.join("containers").join(id)),
            Runtime::Podman => Some(
                self.containers_storage
                    .join("overlay-containers/containers.json"),
            ),
            Runtime::Containerd | Runtime::Crio | Runtime::Kubernetes => None,
        }
    }

    fn docker(&self, id: &str) -> Resolution {
        let path = self
            .docker_root
            .join("containers")
            .join(id)
            .join("config.v2.json");
        let config = match read_json(&path) {
            Ok(config) => config,
            Err(why) => return Resolution::Unknown(why),
        };
        match config["Name"].as_str().map(|n| n.trim_start_matches('/')) {
            Some(name) if !name.is_empty() => Resolution::Named(name.to_string(), Runtime::Docker),
            _ => Resolution::Unknown(format!("{}: no \"Name\"", path.display())),
        }
    }

    fn containerd(&self, id: &str) -> Resolution {
        let tasks = self.containerd_state.join("io.containerd.runtime.v2.task");
        let namespaces = match std::fs::read_dir(&tasks) {
            Ok(entries) => entries,
            Err(e) => return Resolution::Unknown(format!("{}: {e}", tasks.display())),
        };
        for namespace in namespaces.flatten() {
            let path = namespace.path().join(id).join("config.json");
            if !path.is_file() {
                continue;
            }
            let config = match read_json(&path) {
                Ok(config) => config,
                Err(why) => return Resolution::Unknown(why),
            };
            let annotations = &config["annotations"];
            if annotations["io.kubernetes.cri.container-type"] == "sandbox" {
                return Resolution::Sandbox;
            }
            let k8s = [
                "io.kubernetes.cri.sandbox-namespace",
                "io.kubernetes.cri.sandbox-name",
                "io.kubernetes.cri.container-name",
            ]
            .map(|key| annotations[key].as_str());
            if let [Some(ns), Some(pod), Some(container)] = k8s {
                return Resolution::Named(format!("{ns}_{pod}_{container}"), Runtime::Containerd);
            }
            // Plain containerd (nerdctl) names its containers in an annotation.
            if let Some(name) = annotations["nerdctl/name"].as_str() {
                return Resolution::Named(name.to_string(), Runtime::Containerd);
            }
            return Resolution::Unknown(format!("{}: no name annotations", path.display()));
        }
        Resolution::Unknown(format!("no bundle for {id} under {}", tasks.display()))
    }

    fn crio(&self, id: &str) -> Resolution {
        let path = self
            .containers_storage
            .join("overlay-containers")
            .join(id)
            .join("userdata/config.json");
        let config = match read_json(&path) {
            Ok(config) => config,
            Err(why) => return Resolution::Unknown(why),
        };
        let annotations = &config["annotations"];
        if annotations["io.kubernetes.cri-o.ContainerType"] == "sandbox" {
            return Resolution::Sandbox;
        }
        let k8s = [
            "io.kubernetes.pod.namespace",
            "io.kubernetes.pod.name",
            "io.kubernetes.container.name",
        ]
        .map(|key| annotations[key].as_str());
        match k8s {
            [Some(ns), Some(pod), Some(container)] => {
                Resolution::Named(format!("{ns}_{pod}_{container}"), Runtime::Crio)
            }
            _ => Resolution::Unknown(format!("{}: no name annotations", path.display())),
        }
    }

    fn podman(&self, id: &str) -> Resolution {
        let path = self
            .containers_storage
            .join("overlay-containers/containers.json");
        let list = match read_json(&path) {
            Ok(list) => list,
            Err(why) => return Resolution::Unknown(why),
        };
        let entry = list
            .as_array()
            .and_then(|l| l.iter().find(|c| c["id"] == id));
        match entry.and_then(|c| c["names"][0].as_str()) {
            Some(name) => Resolution::Named(name.to_string(), Runtime::Podman),
            None => Resolution::Unknown(format!("{}: no container {id}", path.display())),
        }
    }
}

fn read_json(path: &Path) -> Result<Json, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4c0e1a2b5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f";

    fn classified(path: &str) -> Option<(Runtime, String)> {
        classify(Path::new(path))
    }

    #[test]
    fn runtimes_by_their_cgroups() {
        let d = |rt| Some((rt, ID.to_string()));
        assert_eq!(
            classified(&format!("system.slice/docker-{ID}.scope")),
            d(Runtime::Docker)
        );
        assert_eq!(classified(&format!("docker/{ID}")), d(Runtime::Docker));
        assert_eq!(
            classified(&format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"
            )),
            d(Runtime::Containerd)
        );
        assert_eq!(
            classified(&format!("kubepods/burstable/pod1234-abcd/{ID}")),
            d(Runtime::Kubernetes)
        );
        assert_eq!(
            classified(&format!("kubepods/pod1234/{ID}")),
            d(Runtime::Kubernetes)
        );
        assert_eq!(
            classified(&format!("kubepods.slice/x/crio-{ID}.scope")),
            d(Runtime::Crio)
        );
        assert_eq!(
            classified(&format!("machine.slice/libpod-{ID}.scope")),
            d(Runtime::Podman)
        );
        assert_eq!(
            classified(&format!("libpod_parent/libpod-{ID}")),
            d(Runtime::Podman)
        );
    }

    #[test]
    fn lookalikes_are_not_containers() {
        assert_eq!(classified("system.slice/ssh.service"), None);
        assert_eq!(
            classified(&format!("system.slice/crio-conmon-{ID}.scope")),
            None
        );
        assert_eq!(
            classified(&format!("machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(classified("docker/not-an-id"), None);
        assert_eq!(classified(&format!("elsewhere/{ID}")), None);
        assert_eq!(
            classified(&format!("docker-{}.scope", ID.to_uppercase())),
            None
        );
        assert_eq!(classified("kubepods/burstable/pod1234"), None);
    }

    fn roots() -> MetadataRoots {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runtimes");
        MetadataRoots {
            docker_root: base.join("docker"),
            containerd_state: base.join("containerd"),
            containers_storage: base.join("containers"),
        }
    }

    #[test]
    fn names_from_runtime_files() {
        let r = roots();
        let named = |name: &str, rt| Resolution::Named(name.to_string(), rt);
        assert_eq!(
            r.resolve(Runtime::Docker, "aaaaaaaaaaaa1"),
            named("busybox1", Runtime::Docker)
        );
        assert_eq!(
            r.resolve(Runtime::Containerd, "bbbbbbbbbbbb1"),
            named("shop_web-7d4f_nginx", Runtime::Containerd)
        );
        assert_eq!(
            r.resolve(Runtime::Containerd, "bbbbbbbbbbbb2"),
            Resolution::Sandbox
        );
        assert_eq!(
            r.resolve(Runtime::Kubernetes, "bbbbbbbbbbbb1"),
            named("shop_web-7d4f_nginx", Runtime::Containerd)
        );
        assert_eq!(
            r.resolve(Runtime::Kubernetes, "cccccccccccc1"),
            named("db_pg-0_postgres", Runtime::Crio)
        );
        assert_eq!(
            r.resolve(Runtime::Crio, "cccccccccccc2"),
            Resolution::Sandbox
        );
        assert_eq!(
            r.resolve(Runtime::Podman, "dddddddddddd1"),
            named("cache", Runtime::Podman)
        );
    }

    #[test]
    fn missing_or_broken_metadata_says_why() {
        let r = roots();
        let why = |res: Resolution| match res {
            Resolution::Unknown(why) => why,
            other => panic!("expected Unknown, got {other:?}"),
        };
        assert!(why(r.resolve(Runtime::Docker, "eeeeeeeeeeee1")).contains("No such file"));
        assert!(why(r.resolve(Runtime::Docker, "aaaaaaaaaaaa2")).contains("config.v2.json"));
        assert!(why(r.resolve(Runtime::Podman, "eeeeeeeeeeee1")).contains("no container"));
        assert!(why(r.resolve(Runtime::Kubernetes, "eeeeeeeeeeee1")).contains("no bundle"));
    }
}
