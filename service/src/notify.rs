//! Telling a service manager about our state (`sd_notify` READY=1 / STOPPING=1), only when `NOTIFY_SOCKET` is set.

use sd_notify::NotifyState;

fn send(state: NotifyState<'_>, what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[state]) {
        log::warn!("sd_notify {what}: {e}");
    }
}

/// `READY=1`: every socket is being polled.
pub fn ready() {
    send(NotifyState::Ready, "READY=1");
}

/// `STOPPING=1`: we stopped accepting and are draining (idle exit or signal).
pub fn stopping() {
    send(NotifyState::Stopping, "STOPPING=1");
}
