//! Podman (Debian's `podman`, cgroupfs manager): containers named from its
//! store, with their limits, renames and removal.

use std::time::Duration;

use crate::engine::{cli, import_image, name, Container, IMAGE, PODMAN};
use crate::require;
use crate::support::{eventually, Daemon};

#[test]
fn podman_containers_are_named_from_its_store() {
    require!("podman");
    import_image(PODMAN);
    let daemon = Daemon::start(&["--no-ebpf"]);
    let first = name("podman");
    let container = Container::run(
        PODMAN,
        &[
            "--name",
            &first,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "-m",
            "64m",
            IMAGE,
            "sleep",
            "600",
        ],
    );
    assert!(
        eventually(Duration::from_millis(100), || daemon.path(&first).exists()),
        "{first} is not in the tree"
    );
    assert_eq!(
        daemon.read(&format!("{first}/id")),
        format!("{}\n", container.id)
    );
    assert_eq!(daemon.read(&format!("{first}/runtime")), "podman\n");
    assert_eq!(daemon.read(&format!("{first}/memory_limit")), "67108864\n");
    assert_eq!(daemon.read(&format!("{first}/pids_current")), "1\n");
    // The image as Podman's store records the name it was asked for.
    let series = format!(
        "cgmetric_pids{{container=\"{first}\",name=\"{first}\",id=\"{}\",\
         image=\"{IMAGE}\",runtime=\"podman\"}} 1\n",
        container.id
    );
    let prom = daemon.read("metrics.prom");
    assert!(prom.contains(&series), "{series}not in\n{prom}");

    let renamed = name("podman-renamed");
    cli(PODMAN, &["rename", &first, &renamed]);
    assert!(
        eventually(Duration::from_secs(1), || daemon.path(&renamed).exists()
            && !daemon.path(&first).exists()),
        "podman rename not followed"
    );

    cli(PODMAN, &["rm", "-f", "-t", "0", &renamed]);
    assert!(
        eventually(Duration::from_millis(100), || !daemon
            .path(&renamed)
            .exists()),
        "{renamed} stayed after podman rm"
    );
}
