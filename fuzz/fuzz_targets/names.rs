//! Container names and Prometheus label values from untrusted metadata:
//! a name is one safe path component and one line; a label value escapes
//! exactly and reverses.
#![no_main]

use cgmetric::containers::discovery::sanitize;
use cgmetric::render::escape_label;
use libfuzzer_sys::fuzz_target;

/// The exposition format's unescaping of a label value.
fn unescape(escaped: &str) -> String {
    let mut out = String::new();
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => panic!("dangling backslash in {escaped:?}"),
            },
            c => out.push(c),
        }
    }
    out
}

fuzz_target!(|name: &str| {
    let safe = sanitize(name);
    assert!(!safe.contains('/'), "{safe:?}");
    assert!(!safe
        .chars()
        .any(|c| c.is_control() || (c.is_whitespace() && c != ' ')));
    assert!(safe != "." && safe != "..");
    assert_eq!(safe.chars().count(), name.chars().count());

    let escaped = escape_label(name);
    assert!(!escaped.contains('\n'));
    // Every quote is escaped: the value cannot end the label early.
    let bytes = escaped.as_bytes();
    let mut backslashes = 0;
    for &b in bytes {
        if b == b'"' {
            assert!(backslashes % 2 == 1, "unescaped quote in {escaped:?}");
        }
        backslashes = if b == b'\\' { backslashes + 1 } else { 0 };
    }
    assert_eq!(unescape(&escaped), name);
});
