//! systemd's file descriptor store: under a unit with
//! `FileDescriptorStoreMax=`, the supervisor gives systemd a copy of the
//! FUSE connection, and a restart of the unit gets it back, so that
//! `systemctl restart` keeps the mount (and bind mounts of it in
//! containers) live: readers wait through the restart instead of failing.
//! The protocol is sd_notify(3) and sd_listen_fds(3).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

/// The name the connection is stored under.
pub const FD_NAME: &str = "cgmetric-fuse";

/// The connection systemd kept for this service, if it passed one.
pub fn stored_connection() -> Option<OwnedFd> {
    let fds = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds,
        Err(e) => {
            log::warn!("descriptors passed by systemd: {e}");
            return None;
        }
    };
    let mut connection = None;
    for (fd, name) in fds {
        if name == FD_NAME && connection.is_none() {
            // SAFETY: systemd passed this descriptor to this process alone.
            connection = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    connection
}

/// Whether systemd keeps descriptors for this service: it says so with
/// `$FDSTORE` (systemd 254+, when `FileDescriptorStoreMax=` is set).
pub fn keeps_descriptors() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE").is_ok_and(|max| max.parse::<u32>().is_ok_and(|max| max > 0))
}

/// Gives systemd a copy of `connection` to keep across restarts.
pub fn store(connection: &OwnedFd) {
    if !keeps_descriptors() {
        return;
    }
    let state = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(FD_NAME),
    ];
    if let Err(e) = sd_notify::notify_with_fds(&state, &[connection.as_fd()]) {
        log::warn!("cannot give systemd the FUSE connection to keep: {e}");
    }
}

/// Tells systemd the tree is served (`Type=notify`).
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("cannot tell systemd the tree is served: {e}");
    }
}
