//! Every cgroupfs parser on arbitrary file contents: a value or a clear
//! error, never a panic.
#![no_main]

use cgmetric::cgroup::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = parse::single(text);
    let _ = parse::limit(text);
    let _ = parse::keyed(
        text,
        [
            "anon",
            "file",
            "usage_usec",
            "nr_throttled",
            "rss",
            "oom_kill",
            "high",
        ],
    );
    let _ = parse::cpu_max(text);
    let (quota, period) = text.split_once('\n').unwrap_or((text, text));
    let _ = parse::cfs_quota(quota, period);
    let _ = parse::io_stat(text);
    let _ = parse::blkio_throttle(text);
    let _ = parse::pressure(text);
});
