//! `mount.cgmetric`, the helper mount(8) runs for `mount -t cgmetric`.
//!
//! Not built out yet: the option translation, waiting for the tree and
//! `umount` ending the daemon come with the operations work. Until then it
//! refuses clearly instead of pretending to mount.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("mount.cgmetric: mounting through mount(8) is not supported yet; run `cgmetric [OPTIONS] MOUNTPOINT` instead");
    ExitCode::from(32) // mount(8)'s "mount failure"
}
