//! Skip gates: whether a test can run here (root, /dev/fuse, a cgroup
//! layout, the programs it drives), and what happens when it cannot.
//! [`require!`](crate::require) opens every test.

use std::path::Path;
use std::process::{Command, Stdio};

use cgmetric::cgroup::Layout;

/// Set by `.ci/run`: a test that cannot run fails instead of skipping.
pub const REQUIRE_ENV: &str = "CGMETRIC_REQUIRE_PRIVILEGED";

/// Whether the privileged tests can run here. When they cannot, says why on
/// stderr and returns false, or panics when [`REQUIRE_ENV`] is set.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if let Err(e) = Layout::detect(Path::new("/sys/fs/cgroup")) {
        Some(e.to_string())
    } else {
        None
    };
    skip_unless(test, missing)
}

/// Like [`privileged`], for an external program the test drives.
pub fn tool(test: &str, program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    skip_unless(
        test,
        (!found).then(|| format!("{program} is not installed")),
    )
}

/// Like [`privileged`], for something else the test needs of the host
/// (a kernel feature, a file): `missing` says what is lacking, or is `None`.
pub fn host(test: &str, missing: Option<String>) -> bool {
    skip_unless(test, missing)
}

fn skip_unless(test: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else { return true };
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{test} cannot run: {why} ({REQUIRE_ENV}=1 makes this a failure)");
    }
    // Straight to the process's stderr: libtest captures eprintln! and would
    // hide the skip of a test that then counts as passed.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

#[macro_export]
macro_rules! require {
    ($($tool:literal),*) => {
        // The enclosing test's path, from a function nested in it.
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        let test = name.strip_suffix("::here").unwrap_or(name);
        if !$crate::support::privileged(test) { return; }
        $(if !$crate::support::tool(test, $tool) { return; })*
    };
}

/// After [`require!`](crate::require): skips (or fails, under
/// [`REQUIRE_ENV`]) when `missing`, an `Option<String>` saying what the host
/// lacks, is `Some`.
#[macro_export]
macro_rules! require_host {
    ($missing:expr) => {
        fn here_host() {}
        let name = std::any::type_name_of_val(&here_host);
        let test = name.strip_suffix("::here_host").unwrap_or(name);
        if !$crate::support::gate::host(test, $missing) {
            return;
        }
    };
}
