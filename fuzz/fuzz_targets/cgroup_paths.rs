//! Runtime classification, display names and globs on arbitrary cgroup
//! paths and patterns.
#![no_main]

use std::path::Path;

use cgmetric::containers::discovery::{display_name, Globs};
use cgmetric::containers::runtime::classify;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    let (pattern, path) = data.split_once('\n').unwrap_or(("*", data));
    let path = Path::new(path);
    if let Some((_, id)) = classify(path) {
        assert!(!id.is_empty());
    }
    let name = display_name(path);
    assert!(!name.contains('/') && !name.contains('\n'));
    let _ = Globs::new(&[pattern.to_string()]);
});
