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
//!
//! The same files say who a container is to Kubernetes and which image it
//! runs ([`Identity`]), for the labels of `metrics.prom`:
//!
//! | runtime | Kubernetes namespace, pod, container | image |
//! |---|---|---|
//! | Docker (cri-dockerd, dockershim) | `Config.Labels` `io.kubernetes.pod.namespace`, `io.kubernetes.pod.name`, `io.kubernetes.container.name` | `Config.Image` |
//! | containerd | annotations `io.kubernetes.cri.sandbox-namespace`, `-sandbox-name`, `-container-name` | annotation `io.kubernetes.cri.image-name` |
//! | CRI-O | annotations `io.kubernetes.pod.namespace`, `io.kubernetes.pod.name`, `io.kubernetes.container.name` | annotation `io.kubernetes.cri-o.ImageName` |
//! | Podman | (none: its labels live in its database) | `containers.json` `metadata` `image-name` |

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

/// The labels (Docker) and annotations (CRI-O) under which the CRI records
/// a container's pod namespace, pod name and container name.
const CRI_LABELS: [&str; 3] = [
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.name",
    "io.kubernetes.container.name",
];

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

/// Who a container is to Kubernetes: its pod's namespace and name, and its
/// own name in the pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Kubernetes {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl Kubernetes {
    /// From the three values, all present and non-empty: a container with
    /// only some of them is not one Kubernetes runs.
    fn from_values([namespace, pod, container]: [Option<&str>; 3]) -> Option<Kubernetes> {
        let value = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        Some(Kubernetes {
            namespace: value(namespace)?,
            pod: value(pod)?,
            container: value(container)?,
        })
    }

    /// The name a Kubernetes container asks for as a directory.
    fn directory_name(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.pod, self.container)
    }
}

/// What the runtime records about a container besides its name: the labels
/// it gets in `metrics.prom`. One value each, fixed for the container's life,
/// so they add no series of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kubernetes: Option<Kubernetes>,
    /// The image as the runtime was asked for it (`busybox`,
    /// `docker.io/library/nginx:1.27`).
    pub image: Option<String>,
}

/// A JSON string that is there and not empty.
fn text(value: &Json) -> Option<String> {
    value.as_str().filter(|v| !v.is_empty()).map(str::to_string)
}

/// The value of each key of `keys` in the JSON object `map`.
fn values<'a>(map: &'a Json, keys: [&str; 3]) -> [Option<&'a str>; 3] {
    keys.map(|key| map[key].as_str())
}

/// What the runtime's files say about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Its name, what else its runtime records, and the runtime that turned
    /// out to own it.
    Named(String, Identity, Runtime),
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
        // cri-dockerd (and dockershim before it) put the pod's identity in
        // the labels of the containers it creates.
        let identity = Identity {
            kubernetes: Kubernetes::from_values(values(&config["Config"]["Labels"], CRI_LABELS)),
            image: text(&config["Config"]["Image"]),
        };
        match config["Name"].as_str().map(|n| n.trim_start_matches('/')) {
            Some(name) if !name.is_empty() => {
                Resolution::Named(name.to_string(), identity, Runtime::Docker)
            }
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
            let kubernetes = Kubernetes::from_values(values(
                annotations,
                [
                    "io.kubernetes.cri.sandbox-namespace",
                    "io.kubernetes.cri.sandbox-name",
                    "io.kubernetes.cri.container-name",
                ],
            ));
            // The CRI plugin writes the image into the bundle; nerdctl keeps
            // it only in containerd's database, which is not read here.
            let image = text(&annotations["io.kubernetes.cri.image-name"]);
            if let Some(k8s) = kubernetes {
                let name = k8s.directory_name();
                let identity = Identity {
                    kubernetes: Some(k8s),
                    image,
                };
                return Resolution::Named(name, identity, Runtime::Containerd);
            }
            // Plain containerd (nerdctl) names its containers in an annotation.
            if let Some(name) = annotations["nerdctl/name"].as_str() {
                let identity = Identity {
                    kubernetes: None,
                    image,
                };
                return Resolution::Named(name.to_string(), identity, Runtime::Containerd);
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
        match Kubernetes::from_values(values(annotations, CRI_LABELS)) {
            Some(k8s) => {
                let name = k8s.directory_name();
                // ImageName is the image as the pod spec asked for it; Image
                // may be its id once resolved.
                let image = text(&annotations["io.kubernetes.cri-o.ImageName"])
                    .or_else(|| text(&annotations["io.kubernetes.cri-o.Image"]));
                let identity = Identity {
                    kubernetes: Some(k8s),
                    image,
                };
                Resolution::Named(name, identity, Runtime::Crio)
            }
            None => Resolution::Unknown(format!("{}: no name annotations", path.display())),
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
        let Some(entry) = entry else {
            return Resolution::Unknown(format!("{}: no container {id}", path.display()));
        };
        let Some(name) = entry["names"][0].as_str() else {
            return Resolution::Unknown(format!("{}: container {id} has no name", path.display()));
        };
        // The entry's own "image" is the image's id; the name Podman was
        // asked for is in the metadata libpod stores, itself a JSON string.
        let image = entry["metadata"]
            .as_str()
            .and_then(|m| serde_json::from_str::<Json>(m).ok())
            .and_then(|m| text(&m["image-name"]));
        let identity = Identity {
            kubernetes: None,
            image,
        };
        Resolution::Named(name.to_string(), identity, Runtime::Podman)
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

    fn k8s(namespace: &str, pod: &str, container: &str) -> Option<Kubernetes> {
        Some(Kubernetes {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
        })
    }

    fn identity(kubernetes: Option<Kubernetes>, image: Option<&str>) -> Identity {
        Identity {
            kubernetes,
            image: image.map(str::to_string),
        }
    }

    #[test]
    fn names_from_runtime_files() {
        let r = roots();
        let named = |name: &str, identity, rt| Resolution::Named(name.to_string(), identity, rt);
        assert_eq!(
            r.resolve(Runtime::Docker, "aaaaaaaaaaaa1"),
            named("busybox1", identity(None, Some("busybox")), Runtime::Docker)
        );
        let nginx = identity(
            k8s("shop", "web-7d4f", "nginx"),
            Some("docker.io/library/nginx:1.27"),
        );
        assert_eq!(
            r.resolve(Runtime::Containerd, "bbbbbbbbbbbb1"),
            named("shop_web-7d4f_nginx", nginx.clone(), Runtime::Containerd)
        );
        assert_eq!(
            r.resolve(Runtime::Containerd, "bbbbbbbbbbbb2"),
            Resolution::Sandbox
        );
        assert_eq!(
            r.resolve(Runtime::Kubernetes, "bbbbbbbbbbbb1"),
            named("shop_web-7d4f_nginx", nginx, Runtime::Containerd)
        );
        assert_eq!(
            r.resolve(Runtime::Kubernetes, "cccccccccccc1"),
            named(
                "db_pg-0_postgres",
                identity(
                    k8s("db", "pg-0", "postgres"),
                    Some("docker.io/library/postgres:16")
                ),
                Runtime::Crio
            )
        );
        assert_eq!(
            r.resolve(Runtime::Crio, "cccccccccccc2"),
            Resolution::Sandbox
        );
        assert_eq!(
            r.resolve(Runtime::Podman, "dddddddddddd1"),
            named(
                "cache",
                identity(None, Some("docker.io/library/redis:7")),
                Runtime::Podman
            )
        );
        // A container made from no image (podman create --rootfs).
        assert_eq!(
            r.resolve(Runtime::Podman, "dddddddddddd2"),
            named("scratch", identity(None, None), Runtime::Podman)
        );
    }

    /// cri-dockerd's containers: Docker names them `k8s_<container>_<pod>_
    /// <namespace>_<uid>_<attempt>` and labels them with the CRI's keys.
    #[test]
    fn kubernetes_identity_from_docker_labels() {
        assert_eq!(
            roots().resolve(Runtime::Docker, "aaaaaaaaaaaa3"),
            Resolution::Named(
                "k8s_app_api-5c9b_shop_0d3c2b1a-9f8e-7d6c-5b4a-392817161514_0".into(),
                identity(
                    k8s("shop", "api-5c9b", "app"),
                    Some("registry.example/shop/api:2.3")
                ),
                Runtime::Docker
            )
        );
    }

    #[test]
    fn kubernetes_identity_needs_all_three_values() {
        let labels = serde_json::json!({
            "io.kubernetes.pod.namespace": "shop",
            "io.kubernetes.pod.name": "",
            "io.kubernetes.container.name": "app",
        });
        assert_eq!(Kubernetes::from_values(values(&labels, CRI_LABELS)), None);
        let labels = serde_json::json!({"io.kubernetes.pod.namespace": "shop"});
        assert_eq!(Kubernetes::from_values(values(&labels, CRI_LABELS)), None);
        assert_eq!(
            Kubernetes::from_values(values(&Json::Null, CRI_LABELS)),
            None
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
