//! mount(8)'s arguments to the helper (NUL-separated here): a request or a
//! usage error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../mount-helper/src/options.rs"]
#[allow(dead_code)]
mod options;

fuzz_target!(|data: &str| {
    let args: Vec<String> = data.split('\0').map(str::to_string).collect();
    let _ = options::parse(&args);
});
