//! The tree on a real container: every catalogue file, well-formed values,
//! snapshots at open, live discovery, and a filesystem nobody can write.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use cgmetric::cgroup::Controller;
use cgmetric::metrics::METRICS;

use crate::require;
use crate::support::{fd_targets, Cgroup, Daemon};

/// The root of a tree with no containers, sorted.
const ROOT: [&str; 5] = ["cgroup", "exited", "metric", "metrics.prom", "self"];

/// The entries of `dir`, sorted, without other tests' runtime containers:
/// the discovery tests create `docker/<id>` cgroups that every daemon finds
/// and, lacking their metadata, names by their 12-digit short id.
fn listing(daemon: &Daemon, dir: &str) -> Vec<String> {
    let foreign = |name: &str| name.len() == 12 && name.bytes().all(|b| b.is_ascii_hexdigit());
    let mut names: Vec<String> = fs::read_dir(daemon.path(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !foreign(name))
        .collect();
    names.sort();
    names
}

#[test]
fn every_catalogue_file_exists_with_a_well_formed_value() {
    require!();
    let parent = Cgroup::parent("tree");
    let mut web = parent.child("web");
    web.spawn(Command::new("sleep").arg("600"));
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);

    let v1_memory = web.is_v1(Controller::Memory);
    let memory = web.dir(Controller::Memory);
    let v2_swap = memory.join("memory.swap.current").exists();
    // What this kernel provides: memory.peak since 5.19, oom_group_kill
    // since 5.17 (v1 has neither, but has max_usage_in_bytes), pressure
    // files in the v2 tree when PSI is on, a cgroup CPU `full` since 5.13.
    let peak = memory
        .join(match v1_memory {
            true => "memory.max_usage_in_bytes",
            false => "memory.peak",
        })
        .exists();
    let group_kills = !v1_memory
        && web
            .read(Controller::Memory, "memory.events")
            .contains("oom_group_kill ");
    let provided = |file: &str| match file {
        "memory_pgpgin" | "memory_pgpgout" => v1_memory,
        "memory_swap" => v1_memory || v2_swap,
        "memory_peak" => peak,
        "memory_low_events" | "memory_high_events" | "memory_oom_events" => !v1_memory,
        "memory_oom_group_kills" => group_kills,
        _ => match file.split_once("_pressure_") {
            Some((resource, rest)) => {
                let line = rest.strip_suffix("_usec").unwrap();
                web.pressure(&format!("{resource}.pressure"), line)
                    .is_some()
            }
            None => true,
        },
    };
    let mut expected: Vec<String> = METRICS
        .iter()
        .filter(|m| provided(m.file))
        .map(|m| m.file.to_string())
        .chain(["metrics", "name", "id", "cgroup", "runtime"].map(String::from))
        .collect();
    expected.sort();
    assert_eq!(listing(&daemon, "web"), expected);

    for file in METRICS
        .iter()
        .map(|m| m.file)
        .filter(|f| expected.iter().any(|e| e == f))
    {
        let text = daemon.read(&format!("web/{file}"));
        let value = text
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{file}: no newline: {text:?}"));
        assert!(
            value == "max" || value.parse::<u64>().is_ok(),
            "{file}: {text:?}"
        );
    }
    assert_eq!(daemon.read("web/name"), "web\n");
    assert_eq!(
        daemon.read("web/cgroup"),
        format!("/{}/web\n", parent.relative)
    );
    assert_eq!(daemon.read("web/runtime"), "cgroup\n");
    assert!(daemon.read("web/id").trim().parse::<u64>().is_ok());

    // `metrics` and the root `metric` list the same files.
    let metrics = daemon.read("web/metrics");
    let metric = daemon.read("metric");
    assert_eq!(metrics.lines().count(), expected.len() - 5);
    for line in metrics.lines() {
        let file = line.split(' ').next().unwrap();
        assert!(
            metric
                .lines()
                .any(|l| l.starts_with(&format!("web_{file} "))),
            "{file}"
        );
    }
}

#[test]
fn a_handle_keeps_the_snapshot_of_its_open() {
    require!();
    let parent = Cgroup::parent("snap");
    let mut box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);

    let mut held = fs::File::open(daemon.path("box1/pids_current")).unwrap();
    let mut whole = fs::File::open(daemon.path("metric")).unwrap();
    box1.spawn(Command::new("sleep").arg("600"));
    let mut text = String::new();
    held.read_to_string(&mut text).unwrap();
    assert_eq!(text, "0\n", "a read returns the state at open");
    assert_eq!(
        daemon.read("box1/pids_current"),
        "1\n",
        "a new open sees the new state"
    );

    // Reading in 1-byte pieces stitches one consistent snapshot together.
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while whole.read(&mut byte).unwrap() == 1 {
        bytes.push(byte[0]);
    }
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains("box1_pids_current 0\n"), "{text}");
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap();
        assert!(key.starts_with("box1_"));
        assert!(value == "max" || value.parse::<u64>().is_ok(), "{line}");
    }
}

#[test]
fn containers_appear_and_vanish_with_their_cgroups() {
    require!();
    let parent = Cgroup::parent("live");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(listing(&daemon, ""), ROOT);

    let mut late = parent.child("late");
    // Resolved at lookup: no waiting for a poll.
    assert_eq!(daemon.read("late/pids_current"), "0\n");
    assert_eq!(
        listing(&daemon, ""),
        ["cgroup", "exited", "late", "metric", "metrics.prom", "self"]
    );
    let odd = parent.child("odd name\twith \"quotes\"");
    assert!(listing(&daemon, "").contains(&"odd name_with \"quotes\"".to_string()));

    let held = daemon.path("late/pids_current");
    late.remove();
    drop(odd);
    assert_eq!(listing(&daemon, ""), ROOT);
    let err = fs::read_to_string(&held).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(!daemon.read("metric").contains("late_"));
}

/// The daemon's descriptors open on files of `cgroup`'s children, by file
/// name. Descriptors on the directories themselves are left out: discovery
/// lists them now and then, and those are not kept files.
fn kept_files(daemon: &Daemon, cgroup: &Cgroup) -> Vec<String> {
    let below = format!("{}/", cgroup.relative);
    let mut names: Vec<String> = fd_targets(daemon.server_pid())
        .into_iter()
        .filter(|target| {
            let target = target.to_string_lossy();
            target
                .split_once(&below)
                .is_some_and(|(_, rest)| rest.contains('/'))
        })
        .map(|target| target.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn kept_cgroup_files_stay_live_within_their_budget_and_close_with_their_container() {
    require!();
    let parent = Cgroup::parent("kept");
    let mut box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    assert!(
        kept_files(&daemon, &parent).is_empty(),
        "nothing before a read"
    );

    assert_eq!(daemon.read("box1/pids_current"), "0\n");
    let kept = kept_files(&daemon, &parent);
    assert!(kept.contains(&"pids.current".to_string()), "{kept:?}");
    // Learning which files the container has opened them all; those the
    // cgroup walk answers for aggregates are kept only once read.
    for walked in ["memory.current", "memory.usage_in_bytes", "pids.max"] {
        assert!(!kept.contains(&walked.to_string()), "{walked}: {kept:?}");
    }
    // At most a container's files: 18 on a hybrid host (v1's 15 and the v2
    // tree's 3 pressure files), 14 on v2.
    assert!(kept.len() <= 18, "at most a container's files: {kept:?}");
    // Read again through the kept descriptor: the kernel renders it afresh.
    box1.spawn(Command::new("sleep").arg("600"));
    assert_eq!(daemon.read("box1/pids_current"), "1\n");
    box1.spawn(Command::new("sleep").arg("600"));
    assert!(daemon.read("metric").contains("box1_pids_current 2\n"));
    assert_eq!(kept_files(&daemon, &parent), kept, "nothing more is opened");

    // A budget of 3 keeps 3, and the rest are opened for every read.
    let small = Daemon::start(&["--cgroup", &glob, "--open-files", "3"]);
    let text = small.read("metric");
    assert!(text.contains("box1_pids_current 2\n"), "{text}");
    assert_eq!(small.read("box1/pids_current"), "2\n");
    assert_eq!(kept_files(&small, &parent).len(), 3);
    let none = Daemon::start(&["--cgroup", &glob, "--open-files", "0"]);
    assert_eq!(none.read("box1/pids_current"), "2\n");
    assert!(kept_files(&none, &parent).is_empty());

    // A container's files close when it goes.
    box1.remove();
    assert!(crate::support::eventually(
        std::time::Duration::from_secs(5),
        || kept_files(&daemon, &parent).is_empty() && kept_files(&small, &parent).is_empty()
    ));
}

/// Directories removed in reverse order on drop, whatever happens.
struct Dirs(Vec<std::path::PathBuf>);

impl Drop for Dirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_container_made_one_hierarchy_at_a_time_gains_every_file() {
    require!();
    use std::os::unix::fs::MetadataExt;
    let parent = Cgroup::parent("staged");
    parent.enable_controllers_below();
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let layout = crate::support::host_layout();
    let roots = layout.hierarchies();
    let relative = format!("{}/staged", parent.relative);
    let mut made = Dirs(Vec::new());
    // Runtimes create a container's cgroup hierarchy by hierarchy; a
    // reader may look in between. The last hierarchy first, the v2 tree
    // (whose inode is the container's id) last.
    let (first, rest) = roots.split_last().unwrap();
    let mkdir = |made: &mut Dirs, root: &std::path::Path| {
        let dir = root.join(&relative);
        fs::create_dir(&dir).unwrap();
        made.0.push(dir);
    };
    mkdir(&mut made, first);
    let first_id = fs::metadata(first.join(&relative)).unwrap().ino();
    assert_eq!(daemon.read("staged/id"), format!("{first_id}\n"));
    let before = listing(&daemon, "staged");
    for root in rest.iter().rev() {
        mkdir(&mut made, root);
    }
    let v2_id = fs::metadata(roots[0].join(&relative)).unwrap().ino();
    let waited = std::time::Instant::now();
    while daemon.read("staged/id") != format!("{v2_id}\n") {
        assert!(
            waited.elapsed().as_secs() < 5,
            "{}",
            daemon.read("staged/id")
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Every file the whole cgroup provides, as a daemon started now sees it.
    let fresh = Daemon::start(&["--cgroup", &glob]);
    assert_eq!(listing(&daemon, "staged"), listing(&fresh, "staged"));
    if roots.len() > 1 {
        assert_ne!(before, listing(&daemon, "staged"), "files were gained");
    }
    assert_eq!(daemon.read("staged/pids_current"), "0\n");
    drop(made);
    let waited = std::time::Instant::now();
    while daemon.path("staged").exists() {
        assert!(waited.elapsed().as_secs() < 5, "never vanished");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn nothing_can_be_written() {
    require!();
    let parent = Cgroup::parent("ro");
    let _box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let file = daemon.path("box1/memory_usage");
    let dir = daemon.path("box1");

    let refused = |what: &str, result: std::io::Result<()>| {
        let err = result.expect_err(what);
        let errno = err.raw_os_error().unwrap();
        assert!(
            [libc::EROFS, libc::EACCES, libc::EPERM].contains(&errno),
            "{what}: {err}"
        );
    };
    refused(
        "open for writing",
        OpenOptions::new().write(true).open(&file).map(drop),
    );
    refused(
        "open read-write",
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .map(drop),
    );
    refused(
        "truncate",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .map(drop),
    );
    refused(
        "append",
        OpenOptions::new().append(true).open(&file).map(drop),
    );
    refused("create", fs::write(dir.join("new"), "x"));
    refused("create at root", fs::write(daemon.path("new"), "x"));
    refused("mkdir", fs::create_dir(daemon.path("newdir")));
    refused("unlink", fs::remove_file(&file));
    refused("rmdir", fs::remove_dir(&dir));
    refused("rename", fs::rename(&file, dir.join("moved")));
    refused(
        "chmod",
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)),
    );
    refused("chown", std::os::unix::fs::chown(&file, Some(1), Some(1)));
    refused(
        "symlink",
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")),
    );
    refused("hard link", fs::hard_link(&file, dir.join("hard")));
    refused(
        "set times",
        fs::File::open(&file).and_then(|f| f.set_modified(std::time::SystemTime::now())),
    );
    let c_path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path and value buffers.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"user.x".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    refused(
        "setxattr",
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        },
    );
    let os_result = |rc: i32| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let c_dir = std::ffi::CString::new(dir.join("node").to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c_dir.as_ptr(), libc::S_IFIFO | 0o644, 0) };
    refused("mknod", os_result(rc));
    // SAFETY: valid NUL-terminated path and name.
    let rc = unsafe { libc::removexattr(c_path.as_ptr(), c"user.x".as_ptr()) };
    let err = os_result(rc).expect_err("removexattr");
    assert!(
        [
            libc::EROFS,
            libc::EACCES,
            libc::EPERM,
            libc::ENODATA,
            libc::ENOTSUP
        ]
        .contains(&err.raw_os_error().unwrap()),
        "removexattr: {err}"
    );
    // Still intact.
    assert_eq!(daemon.read("box1/name"), "box1\n");
}

#[test]
fn files_are_readable_by_everyone() {
    require!();
    let parent = Cgroup::parent("perm");
    let _box1 = parent.child("box1");
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob]);
    let mode = |p: &str| fs::metadata(daemon.path(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("box1"), 0o555);
    assert_eq!(mode("box1/memory_usage"), 0o444);
    assert_eq!(mode("metrics.prom"), 0o444);
    // An unprivileged user reads the tree.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(daemon.path("box1/pids_current"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
}

#[test]
fn private_directories_belong_to_their_cgroups_owner() {
    require!("useradd", "userdel", "setpriv");
    let user = crate::support::TestUser::new();
    let parent = Cgroup::parent("private");
    let mine = parent.child("mine");
    let _theirs = parent.child("theirs");
    mine.chown(user.uid, user.gid);
    let glob = format!("{}/*", parent.relative);
    let daemon = Daemon::start(&["--cgroup", &glob, "--private"]);
    let path = |p: &str| daemon.path(p).to_str().unwrap().to_string();

    let meta = fs::metadata(daemon.path("mine")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (user.uid, user.gid, 0o500)
    );
    assert_eq!(
        fs::metadata(daemon.path("mine/pids_current"))
            .unwrap()
            .mode()
            & 0o777,
        0o400
    );

    // The tenant reads its own numbers, and nobody else's.
    assert_eq!(
        user.run("cat", &[&path("mine/pids_current")]).unwrap(),
        "0\n"
    );
    assert!(user
        .run("ls", &[&path("mine")])
        .unwrap()
        .contains("memory_usage"));
    let refused = user
        .run("cat", &[&path("theirs/pids_current")])
        .unwrap_err();
    assert!(refused.contains("Permission denied"), "{refused}");
    let refused = user.run("cat", &[&path("metric")]).unwrap_err();
    assert!(refused.contains("Permission denied"), "{refused}");
    // Root still reads everything.
    assert_eq!(daemon.read("theirs/pids_current"), "0\n");
}
