//! The mount table parser and layout detection on arbitrary mountinfo text.
#![no_main]

use std::path::Path;

use cgmetric::cgroup::Layout;
use cgmetric::mounts::{mount_at, parse_mountinfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mounts = parse_mountinfo(text);
    let _ = Layout::from_mounts(&mounts, Path::new("/sys/fs/cgroup"));
    let _ = mount_at(&mounts, Path::new("/run/cgmetric"));
});
