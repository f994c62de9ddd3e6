//! Discovery: runtimes' containers named from fixture metadata over real
//! cgroups, for every runtime and driver; safe names; appear and vanish
//! latency; `self`; the `cgroup/` tree against the kernel.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cgmetric::cgroup::Controller;

use crate::require;
use crate::support::{eventually, hex_id, unique, Cgroup, Daemon, Nest};

/// Fixture directories for every runtime's metadata.
struct Metadata {
    dir: tempfile::TempDir,
}

impl Metadata {
    fn new() -> Metadata {
        Metadata {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, sub: &str) -> String {
        self.dir.path().join(sub).to_str().unwrap().to_string()
    }

    fn write(&self, path: &str, json: &str) {
        let path = self.dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, json).unwrap();
    }

    fn docker(&self, id: &str, name: &str) {
        let name = serde_json::to_string(&format!("/{name}")).unwrap();
        self.write(
            &format!("docker/containers/{id}/config.v2.json"),
            &format!(r#"{{"ID":"{id}","Name":{name}}}"#),
        );
    }

    fn containerd(&self, id: &str, kind: &str, namespace: &str, pod: &str, container: &str) {
        self.write(
            &format!("containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"),
            &format!(
                r#"{{"annotations":{{"io.kubernetes.cri.container-type":"{kind}","io.kubernetes.cri.sandbox-namespace":"{namespace}","io.kubernetes.cri.sandbox-name":"{pod}","io.kubernetes.cri.container-name":"{container}"}}}}"#
            ),
        );
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--docker-root".into(),
            self.path("docker"),
            "--containerd-state".into(),
            self.path("containerd"),
            "--containers-storage".into(),
            self.path("containers"),
        ]
    }
}

fn start(metadata: &Metadata, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = metadata.args();
    args.extend(extra.iter().map(|a| a.to_string()));
    Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn docker_containers_by_both_drivers() {
    require!();
    let meta = Metadata::new();
    let (cgroupfs_id, systemd_id) = (hex_id(), hex_id());
    meta.docker(&cgroupfs_id, "web-1");
    meta.docker(&systemd_id, "db");
    let parent = Cgroup::parent("docker");
    let mut web = Nest::new(&parent, &format!("docker/{cgroupfs_id}"));
    let _db = Nest::new(&parent, &format!("system.slice/docker-{systemd_id}.scope"));
    web.leaf().spawn(Command::new("sleep").arg("600"));
    let daemon = start(&meta, &[]);

    assert_eq!(daemon.read("web-1/id"), format!("{cgroupfs_id}\n"));
    assert_eq!(daemon.read("web-1/runtime"), "docker\n");
    assert_eq!(
        daemon.read("web-1/cgroup"),
        format!("/{}/docker/{cgroupfs_id}\n", parent.relative)
    );
    assert_eq!(daemon.read("web-1/pids_current"), "1\n");
    assert_eq!(daemon.read("db/id"), format!("{systemd_id}\n"));
    assert_eq!(
        daemon.read("db/cgroup"),
        format!(
            "/{}/system.slice/docker-{systemd_id}.scope\n",
            parent.relative
        )
    );
}

#[test]
fn kubernetes_podman_and_cri_o_containers() {
    require!();
    let meta = Metadata::new();
    let (nginx, pause, app, postgres, crio_pause, cache) =
        (hex_id(), hex_id(), hex_id(), hex_id(), hex_id(), hex_id());
    meta.containerd(&nginx, "container", "shop", "web-7d4f", "nginx");
    meta.containerd(&pause, "sandbox", "shop", "web-7d4f", "");
    meta.containerd(&app, "container", "shop", "api-0", "app");
    meta.write(
        &format!("containers/overlay-containers/{postgres}/userdata/config.json"),
        r#"{"annotations":{"io.kubernetes.cri-o.ContainerType":"container","io.kubernetes.pod.namespace":"db","io.kubernetes.pod.name":"pg-0","io.kubernetes.container.name":"postgres"}}"#,
    );
    meta.write(
        &format!("containers/overlay-containers/{crio_pause}/userdata/config.json"),
        r#"{"annotations":{"io.kubernetes.cri-o.ContainerType":"sandbox"}}"#,
    );
    meta.write(
        "containers/overlay-containers/containers.json",
        &format!(r#"[{{"id":"{cache}","names":["cache"]}}]"#),
    );
    let parent = Cgroup::parent("k8s");
    let mut pod = Nest::new(
        &parent,
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
    );
    let pod = pod.leaf();
    let _containers: Vec<Cgroup> = [
        format!("cri-containerd-{nginx}.scope"),
        format!("cri-containerd-{pause}.scope"),
        format!("crio-{postgres}.scope"),
        format!("crio-{crio_pause}.scope"),
    ]
    .iter()
    .map(|name| pod.child(name))
    .collect();
    let _cache = Nest::new(&parent, &format!("machine.slice/libpod-{cache}.scope"));
    // The cgroupfs driver: kubepods/<qos>/pod<uid>/<id>.
    let kubepods = Cgroup::top(&unique("kubepods-cgmt"));
    let _app = Nest::new(&kubepods, &format!("burstable/pod4c1d/{app}"));
    let daemon = start(&meta, &[]);

    assert_eq!(daemon.read("shop_web-7d4f_nginx/runtime"), "containerd\n");
    assert_eq!(daemon.read("shop_web-7d4f_nginx/id"), format!("{nginx}\n"));
    assert_eq!(
        daemon.read("shop_api-0_app/cgroup"),
        format!("/{}/burstable/pod4c1d/{app}\n", kubepods.relative)
    );
    assert_eq!(daemon.read("db_pg-0_postgres/runtime"), "cri-o\n");
    assert_eq!(daemon.read("cache/runtime"), "podman\n");
    // Pause containers are not containers here.
    let names: Vec<String> = fs::read_dir(&daemon.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for id in [&pause, &crio_pause] {
        assert!(!names.iter().any(|n| n.starts_with(&id[..12])), "{names:?}");
    }
}

#[test]
fn missing_metadata_names_a_container_by_its_short_id() {
    require!();
    let meta = Metadata::new();
    let id = hex_id();
    let parent = Cgroup::parent("nometa");
    let _orphan = Nest::new(&parent, &format!("docker/{id}"));
    let daemon = start(&meta, &[]);
    assert_eq!(daemon.read(&format!("{}/id", &id[..12])), format!("{id}\n"));
    let log = daemon.stderr();
    assert!(
        log.contains(&format!("docker container {}: no name", &id[..12])),
        "{log}"
    );
    let _ = fs::read_dir(&daemon.mountpoint).unwrap().count();
    let _ = fs::read_dir(&daemon.mountpoint).unwrap().count();
    // Other tests' containers have no metadata here either: count ours.
    let reports = daemon
        .stderr()
        .lines()
        .filter(|l| l.contains(&format!("container {}: no name", &id[..12])))
        .count();
    assert_eq!(reports, 1, "logged once");
}

#[test]
fn collisions_and_odd_names_stay_safe_and_truthful() {
    require!();
    let meta = Metadata::new();
    let [first, second, reserved, odd, newline] =
        [hex_id(), hex_id(), hex_id(), hex_id(), hex_id()];
    meta.docker(&first, "twin");
    meta.docker(&second, "twin");
    meta.docker(&reserved, "metric");
    meta.docker(&odd, "we ird \"q\" ünï");
    meta.docker(&newline, "a\nb");
    let parent = Cgroup::parent("names");
    let docker = parent.child("docker");
    // Sorted by cgroup path, the smaller id comes first and keeps the name.
    let (lo, hi) = if first < second {
        (&first, &second)
    } else {
        (&second, &first)
    };
    let _cgroups: Vec<Cgroup> = [&first, &second, &reserved, &odd, &newline]
        .iter()
        .map(|id| docker.child(id))
        .collect();
    let daemon = start(&meta, &[]);

    assert_eq!(daemon.read("twin/id"), format!("{lo}\n"));
    assert_eq!(
        daemon.read(&format!("twin-{}/id", &hi[..12])),
        format!("{hi}\n")
    );
    assert_eq!(
        daemon.read(&format!("metric-{}/id", &reserved[..12])),
        format!("{reserved}\n")
    );
    assert!(
        daemon.read("metric").lines().all(|l| l.contains(' ')),
        "the root file is still the daemon's"
    );
    assert_eq!(daemon.read("we ird \"q\" ünï/id"), format!("{odd}\n"));
    assert_eq!(daemon.read("a_b/id"), format!("{newline}\n"));
    assert_eq!(daemon.read("a_b/name"), "a_b\n");
}

/// How long until `check` holds, polling every millisecond.
fn time_until(check: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(5), "never happened");
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

#[test]
fn containers_appear_and_vanish_within_100_ms() {
    require!();
    let meta = Metadata::new();
    let parent = Cgroup::parent("latency");
    let daemon = start(&meta, &[]);
    let docker = Nest::new(&parent, "docker");
    for round in 0..3 {
        let id = hex_id();
        let name = format!("late-{round}");
        meta.docker(&id, &name);
        let dir = daemon.path(&name);
        let mut container = Cgroup::top(&format!("{}/docker/{id}", parent.relative));
        let appeared = time_until(|| dir.join("id").exists());
        // The kernel now caches the name; removal must still show at once.
        assert!(fs::metadata(&dir).is_ok());
        container.remove();
        let vanished = time_until(|| fs::metadata(&dir).is_err());
        eprintln!("round {round}: appeared after {appeared:?}, vanished after {vanished:?}");
        assert!(
            appeared < Duration::from_millis(100),
            "appeared after {appeared:?}"
        );
        assert!(
            vanished < Duration::from_millis(100),
            "vanished after {vanished:?}"
        );
    }
    drop(docker);
}

#[test]
fn self_is_the_readers_own_container() {
    require!();
    let parent = Cgroup::parent("self");
    let glob = format!("{}/*", parent.relative);
    let outer = parent.child("selfbox");
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let run = |cgroup: &Cgroup, script: &str| {
        let out = cgroup
            .start(Command::new("sh").args(["-c", script]))
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mnt = daemon.mountpoint.display().to_string();
    assert_eq!(
        run(&outer, &format!("readlink {mnt}/self; cat {mnt}/self/name")),
        "selfbox\nselfbox\n"
    );
    // A process in a cgroup below the container's is still in the container.
    // (Made only now: on v2 a cgroup whose children have controllers holds
    // no processes itself.)
    let worker = outer.child("worker");
    assert_eq!(run(&worker, &format!("cat {mnt}/self/name")), "selfbox\n");
    // Outside every container there is no self.
    let out = Command::new("readlink")
        .arg(daemon.path("self"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_cgroup_tree_agrees_with_the_kernel() {
    require!();
    let parent = Cgroup::parent("tree");
    let a = parent.child("a");
    let mut b = a.child("b");
    // Beside b, not in a: v2 allows no processes in a cgroup whose children
    // have controllers. a's count still covers both.
    let mut own = a.child("own");
    for _ in 0..3 {
        own.spawn(Command::new("sleep").arg("600"));
    }
    for _ in 0..2 {
        b.spawn(Command::new("sleep").arg("600"));
    }
    let daemon = Daemon::start(&["--no-ebpf"]);
    let base = format!("cgroup/{}", parent.relative);
    let listing: Vec<String> = fs::read_dir(daemon.path(&format!("{base}/a")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listing.contains(&"b".to_string()) && listing.contains(&"pids_current".to_string()));
    for (path, cgroup) in [("a", &a), ("a/b", &b)] {
        let kernel = cgroup.read(Controller::Pids, "pids.current");
        assert_eq!(
            daemon.read(&format!("{base}/{path}/pids_current")),
            kernel,
            "{path}"
        );
        assert_eq!(
            daemon.read(&format!("{base}/{path}/cgroup")),
            format!("/{}\n", cgroup.relative)
        );
    }
    assert_eq!(daemon.read(&format!("{base}/a/pids_current")), "5\n");
    assert!(eventually(Duration::from_secs(2), || !Path::new(
        &daemon.path("cgroup/none-such")
    )
    .exists()));
    drop(b);
}

#[test]
fn hostile_names_stay_inside_the_tree_and_escape_in_prometheus() {
    require!("promtool");
    let meta = Metadata::new();
    // Any tenant can name a container: path syntax, quoting, length.
    let long_ascii = "x".repeat(300);
    let long_wide = "ü".repeat(200); // 400 bytes
    let named = [
        ("../../etc", ".._.._etc".to_string()),
        ("..", "__".to_string()),
        (".", "_".to_string()),
        ("a/b", "a_b".to_string()),
        (r#"q"uote\back"#, r#"q"uote\back"#.to_string()),
        (long_ascii.as_str(), "x".repeat(255)),
        (long_wide.as_str(), "ü".repeat(127)),
    ];
    let ids: Vec<String> = named.iter().map(|_| hex_id()).collect();
    for ((name, _), id) in named.iter().zip(&ids) {
        meta.docker(id, name);
    }
    let parent = Cgroup::parent("hostile");
    let docker = parent.child("docker");
    let _cgroups: Vec<Cgroup> = ids.iter().map(|id| docker.child(id)).collect();
    let daemon = start(&meta, &[]);

    let listing: Vec<String> = fs::read_dir(&daemon.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ((given, expected), id) in named.iter().zip(&ids) {
        assert!(expected.len() <= 255);
        assert!(
            listing.contains(expected),
            "{given:?} is not listed as {expected:?}: {listing:?}"
        );
        // Each is a directory of the tree itself, reached by its own name.
        assert_eq!(daemon.read(&format!("{expected}/id")), format!("{id}\n"));
        let canonical = fs::canonicalize(daemon.path(expected)).unwrap();
        assert_eq!(canonical.parent().unwrap(), daemon.mountpoint);
    }

    // Label values escaped: promtool parses the whole exposition, and the
    // quote and backslash name is there as the format spells it.
    let text = daemon.read("metrics.prom");
    let (passed, said) = crate::support::promtool_check(&text);
    assert!(passed && !said.contains("error"), "{said}");
    assert!(
        text.contains(r#"container="q\"uote\\back""#),
        "{}",
        text.lines()
            .find(|l| l.contains("uote"))
            .unwrap_or("no such series")
    );
    // The plain format: one line per value, each `<name>_<file> <value>`.
    let metric = daemon.read("metric");
    assert!(metric.lines().all(|l| l.rsplit_once(' ').is_some()));
    for (_, expected) in &named {
        let line = format!("{expected}_pids_current ");
        assert!(
            metric.lines().any(|l| l.starts_with(&line)),
            "no {line:?} line"
        );
    }
}
