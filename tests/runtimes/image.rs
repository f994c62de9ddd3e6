//! The container image (`contrib/image/build`) run as the DaemonSet
//! (`contrib/kubernetes/cgmetric-daemonset.yaml`) runs it: the test reads the
//! DaemonSet's cgmetric container and grants `docker run` exactly its
//! privileges, environment, arguments and volumes, with the host paths of the
//! tree's parent and of the state moved to directories of the test's own.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::engine::{cli, name, Container, Dockerd, DOCKER, IMAGE};
use crate::require;
use crate::support::{detach, eventually, is_live, is_mounted, BpfDir};

const DAEMONSET: &str = "contrib/kubernetes/cgmetric-daemonset.yaml";

/// The DaemonSet's pod spec, as JSON.
fn pod_spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DAEMONSET);
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{DAEMONSET}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemonset: Value = serde_json::from_slice(&out.stdout).unwrap();
    daemonset["spec"]["template"]["spec"].clone()
}

/// `contrib/image/build ARGS`; its last line of output is the tag.
fn build_script(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("contrib/image/build"))
        .args(args)
        .env("DOCKER", DOCKER.program)
        .env("CARGO", env!("CARGO"))
        .output()
        .expect("contrib/image/build");
    assert!(
        out.status.success(),
        "contrib/image/build {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().last().unwrap_or_default().to_string()
}

/// An image the test tagged, removed when dropped.
struct Tagged(String);

impl Drop for Tagged {
    fn drop(&mut self) {
        let _ = Command::new(DOCKER.program)
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

/// A directory bind-mounted on itself and made shared, as systemd makes
/// every mount at boot: Bidirectional propagation needs the host side
/// shared. Detached (with whatever was mounted below it) when dropped.
struct SharedDir {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

impl SharedDir {
    fn new() -> SharedDir {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("run");
        fs::create_dir(&path).unwrap();
        mount(&["--bind", path.to_str().unwrap(), path.to_str().unwrap()]);
        let shared = SharedDir {
            _parent: parent,
            path,
        };
        mount(&["--make-shared", shared.path.to_str().unwrap()]);
        shared
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        detach(&self.path);
    }
}

fn mount(args: &[&str]) {
    let status = Command::new("mount").args(args).status().unwrap();
    assert!(status.success(), "mount {args:?}");
}

/// Whether the topmost mount at `path` is shared ("shared:N" among
/// mountinfo's optional fields).
fn is_shared_mount(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .rfind(|fields| fields.len() > 6 && fields[4] == path)
        .is_some_and(|fields| {
            fields[6..]
                .iter()
                .take_while(|f| **f != "-")
                .any(|f| f.starts_with("shared:"))
        })
}

/// Makes a host mount shared for the test's duration (a host without
/// systemd leaves them private), and private again after, if it was.
struct MadeShared(Option<&'static str>);

impl MadeShared {
    fn ensure(path: &'static str) -> MadeShared {
        if is_shared_mount(path) {
            return MadeShared(None);
        }
        mount(&["--make-shared", path]);
        MadeShared(Some(path))
    }
}

impl Drop for MadeShared {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = Command::new("mount")
                .args(["--make-private", path])
                .status();
        }
    }
}

/// A directory the test created for an untyped hostPath that the host
/// lacks (the runtime would create it), removed when dropped.
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// `docker run` options for `securityContext.privileged: true`. Docker's
/// `--privileged` grants every capability it knows and runc fails to start
/// the container where the host's own bounding set lacks one (a sandboxed
/// host): there the same grant comes without those, and the test says so.
fn privileged_options() -> Vec<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let missing: Vec<&str> = (0..=last)
        .filter(|cap| bounding & (1 << cap) == 0)
        .map(|cap| CAPABILITY_NAMES.get(cap as usize).copied().unwrap_or("?"))
        .collect();
    if missing.is_empty() {
        return vec!["--privileged".into()];
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "this host's bounding set lacks {missing:?}: the container gets everything \
         --privileged grants except those"
    );
    let mut options: Vec<String> = [
        "--cap-add=ALL",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--security-opt=systempaths=unconfined",
        "--device-cgroup-rule=c *:* rwm",
        "--device-cgroup-rule=b *:* rwm",
    ]
    .map(String::from)
    .into();
    options.extend(missing.iter().map(|cap| format!("--cap-drop={cap}")));
    options
}

/// Capability names by number, as `docker run --cap-drop` takes them.
const CAPABILITY_NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{DAEMONSET}: {what} is not a string: {value}"))
}

#[test]
fn the_image_run_as_the_daemonset_shows_the_host_its_containers() {
    require!("dockerd", "python3", "mount");
    let spec = pod_spec();
    let containers = spec["containers"].as_array().unwrap();
    let daemon = containers
        .iter()
        .find(|c| c["name"] == "cgmetric")
        .expect("the DaemonSet's cgmetric container");
    assert_eq!(
        text(&daemon["image"], "image"),
        build_script(&["--print-tag"]),
        "the DaemonSet runs the image under the name contrib/image/build tags"
    );
    assert_eq!(spec["hostPID"], true, "`self` needs the host's pids");
    assert_eq!(daemon["securityContext"]["privileged"], true);

    // The host side, as a node has it: the tree's parent (the host's /run)
    // is a directory of the test's, shared; bpffs is shared.
    let run = SharedDir::new();
    let state = tempfile::tempdir().unwrap();
    let _bpffs_shared = MadeShared::ensure("/sys/fs/bpf");
    let host_path = |path: &str| -> PathBuf {
        if path == "/var/lib/cgmetric" {
            return state.path().to_path_buf();
        }
        match Path::new(path).strip_prefix("/run") {
            Ok(below) => run.path.join(below),
            Err(_) => PathBuf::from(path),
        }
    };
    let mut created = Created(Vec::new());
    let volumes: Vec<&Value> = spec["volumes"].as_array().unwrap().iter().collect();
    // Kubelet makes every DirectoryOrCreate volume of the pod, mounted or
    // not, before any container starts: the tree's directory among them.
    for volume in &volumes {
        let path = host_path(text(&volume["hostPath"]["path"], "hostPath"));
        if volume["hostPath"]["type"] == "DirectoryOrCreate" && !path.exists() {
            fs::create_dir_all(&path).unwrap();
            created.0.push(path);
        }
    }
    // The host's /run/cgmetric, as the DaemonSet's `tree` volume names it.
    let tree = volumes
        .iter()
        .find(|v| v["name"] == "tree")
        .map(|v| host_path(text(&v["hostPath"]["path"], "tree")))
        .unwrap();
    assert!(tree.starts_with(&run.path), "the tree is below /run");
    assert!(tree.is_dir(), "{} made for the tree", tree.display());

    let mut options: Vec<String> = privileged_options();
    options.push("--pid=host".into());
    for env in daemon["env"].as_array().into_iter().flatten() {
        options.push(format!(
            "--env={}={}",
            text(&env["name"], "env name"),
            text(&env["value"], "env value")
        ));
    }
    for mount in daemon["volumeMounts"].as_array().unwrap() {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for {mount}"));
        let source = host_path(text(&volume["hostPath"]["path"], "hostPath"));
        match volume["hostPath"]["type"].as_str() {
            // An untyped hostPath the host lacks: the runtime creates it.
            None | Some("") if !source.exists() => {
                fs::create_dir_all(&source).unwrap();
                created.0.push(source.clone());
            }
            _ => assert!(source.exists(), "{} is on the host", source.display()),
        }
        let mut option = format!(
            "--mount=type=bind,source={},target={}",
            source.display(),
            text(&mount["mountPath"], "mountPath")
        );
        if mount["readOnly"] == true {
            option.push_str(",readonly");
        }
        match mount["mountPropagation"].as_str() {
            Some("Bidirectional") => option.push_str(",bind-propagation=rshared"),
            Some("HostToContainer") => option.push_str(",bind-propagation=rslave"),
            Some(other) => panic!("mountPropagation {other}"),
            None => {}
        }
        options.push(option);
    }

    let _engine = Dockerd::acquire();
    let tagged = Tagged(format!("{}:test", name("image")));
    assert_eq!(build_script(&["--tag", &tagged.0]), tagged.0);
    assert_eq!(
        cli(
            DOCKER,
            &[
                "image",
                "inspect",
                "-f",
                "{{len .RootFS.Layers}}",
                &tagged.0
            ]
        ),
        "1",
        "the image is one imported layer, on no base image"
    );

    // A container of the host's, running before the daemon starts.
    let host_container = name("host");
    let _host_container =
        Container::run(DOCKER, &["--name", &host_container, IMAGE, "sleep", "600"]);

    // The daemon's own pins; the DaemonSet's arguments after it.
    let bpf = BpfDir::new();
    let daemon_name = name("daemonset");
    let mut run_args: Vec<String> = vec!["--name".into(), daemon_name.clone()];
    run_args.extend(options);
    run_args.push(tagged.0.clone());
    run_args.extend(["--bpf-dir".to_string(), bpf.arg().to_string()]);
    for arg in daemon["args"].as_array().unwrap() {
        run_args.push(text(arg, "args").to_string());
    }
    let args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let cgmetric = Container::run(DOCKER, &args);
    let logs = || {
        let out = Command::new(DOCKER.program)
            .args(["logs", &cgmetric.id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // The host sees the mount made in the container, and in it the host's
    // container by its Docker name.
    assert!(
        eventually(Duration::from_secs(15), || is_live(&tree)),
        "the host does not see the tree at {}:\n{}",
        tree.display(),
        logs()
    );
    let name_file = tree.join(&host_container).join("name");
    assert!(
        eventually(Duration::from_secs(5), || name_file.exists()),
        "{} is not in the tree the host sees:\n{}",
        host_container,
        logs()
    );
    assert_eq!(
        fs::read_to_string(&name_file).unwrap(),
        format!("{host_container}\n")
    );

    // The readiness probe, as the kubelet runs it, in the container.
    let probe: Vec<&str> = daemon["readinessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| text(a, "readinessProbe"))
        .collect();
    cgmetric.exec(&probe);

    // A container given the host's tree reads its own directory as `self`
    // (the daemon sees its pid: hostPID).
    let reader = name("reader");
    let reading = format!("{}:/run/cgmetric:ro", tree.display());
    let reader_container = Container::run(
        DOCKER,
        &["--name", &reader, "-v", &reading, IMAGE, "sleep", "600"],
    );
    assert_eq!(
        reader_container.exec(&["cat", "/run/cgmetric/self/name"]),
        reader
    );

    // docker stop (SIGTERM) unmounts, and the host sees that too.
    cli(DOCKER, &["stop", "-t", "10", &cgmetric.id]);
    assert_eq!(
        cgmetric.inspect("{{.State.ExitCode}}"),
        "0",
        "SIGTERM ends the daemon with 0:\n{}",
        logs()
    );
    assert!(
        !is_mounted(&tree),
        "the tree stays mounted on the host after docker stop:\n{}",
        logs()
    );
    drop(reader_container);
    drop(cgmetric);
}
