//! Names no other test, run or process uses: for cgroups, pin directories
//! and containers.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A name no other test, run or process uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A 64-character hex id no other test uses, as runtimes name containers.
pub fn hex_id() -> String {
    use std::hash::{Hash, Hasher};
    let seed = unique("id");
    (0..4u8)
        .map(|round| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (round, &seed).hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        })
        .collect()
}
