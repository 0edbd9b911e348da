//! Telling a service manager how we are doing (`sd_notify`), a no-op without `NOTIFY_SOCKET`.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use sd_notify::NotifyState;

thread_local! {
    /// The socket the fd-store messages go out on, connected once to `NOTIFY_SOCKET`:
    /// start-up with ten thousand sockets sends ten thousand of them, and a socket, a connect
    /// and a close for each were most of the cost.
    static STORE: RefCell<Option<UnixDatagram>> = const { RefCell::new(None) };
}

/// `NOTIFY_SOCKET` as the superserver was started with (read once: nothing here changes it).
fn notify_socket() -> Option<&'static OsString> {
    static PATH: std::sync::OnceLock<Option<OsString>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::var_os("NOTIFY_SOCKET"))
        .as_ref()
}

/// Send `msg` (with `fds`) to `NOTIFY_SOCKET` on the kept socket, connecting it first when
/// there is none. A no-op without `NOTIFY_SOCKET`.
fn send_kept(msg: &str, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    let Some(path) = notify_socket() else {
        return Ok(());
    };
    STORE.with(|cell| {
        let mut kept = cell.borrow_mut();
        if kept.is_none() {
            let sock = UnixDatagram::unbound()?;
            sock.connect(path)?;
            *kept = Some(sock);
        }
        let Some(sock) = kept.as_ref() else {
            unreachable!("connected above")
        };
        let iov = [IoSlice::new(msg.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs = if fds.is_empty() {
            &cmsg[..0]
        } else {
            &cmsg[..]
        };
        let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None);
        match sent {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "incomplete write",
            )),
            Err(e) => {
                // Reconnect next time (the manager may have gone and come back).
                *kept = None;
                Err(e.into())
            }
        }
    })
}

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
    if notify_socket().is_none() {
        return;
    }
    let msg = format!("{}\n{}\n", NotifyState::FdStore, NotifyState::FdName(name));
    if let Err(e) = send_kept(&msg, &[fd.as_raw_fd()]) {
        log::debug!("sd_notify FDSTORE {name}: {e}");
    }
}

/// Drop a socket no service wants any more from systemd's store.
pub fn unstore_fd(name: &str) {
    if notify_socket().is_none() {
        return;
    }
    let msg = format!(
        "{}\n{}\n",
        NotifyState::FdStoreRemove,
        NotifyState::FdName(name)
    );
    if let Err(e) = send_kept(&msg, &[]) {
        log::warn!("sd_notify failed: {e}");
    }
}
