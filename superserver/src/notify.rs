//! Telling a service manager how we are doing (`sd_notify`), a no-op without `NOTIFY_SOCKET`.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("sd_notify failed: {e}");
    }
}

/// Bound and serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload began (`RELOADING=1` with the monotonic timestamp systemd ≥ 253 wants).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Keep a listening socket we bound in systemd's file-descriptor store (the unit's
/// `FileDescriptorStoreMax=`), under a name that says its address: after a crash or a
/// `systemctl restart`, systemd hands it back and the connections queued on it are not lost.
/// A no-op without `NOTIFY_SOCKET`.
pub fn store_fd(fd: std::os::fd::BorrowedFd<'_>, name: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) =
        sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
    {
        log::debug!("sd_notify FDSTORE {name}: {e}");
    }
}

/// Drop a socket no service wants any more from systemd's store.
pub fn unstore_fd(name: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}
