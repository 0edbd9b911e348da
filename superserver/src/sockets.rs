//! Listening sockets: binding them with socket2, adopting the ones inherited from systemd or
//! systemfd, and the pool that lets a reload keep every socket whose address did not change.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};
use superserver_config::{Listen, ListenAddr, UnixSocketOptions};

/// A socket the superserver holds for its whole life (or until a reload removes its address).
pub struct Bound {
    /// The address this socket is bound to (as configured).
    pub addr: ListenAddr,
    /// The socket.
    pub socket: Socket,
    /// A Unix socket file this process created and must remove when it closes the socket.
    /// `None` for IP sockets and for inherited Unix sockets (whose file belongs to the launcher).
    owned_path: Option<PathBuf>,
}

impl Bound {
    /// The raw fd, for polling and handing over.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for Bound {
    /// Closing a socket we bound to a path removes the file (only if it is still a socket).
    fn drop(&mut self) {
        if let Some(path) = &self.owned_path
            && is_socket_file(path)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn is_socket_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// A failure to bind one address.
#[derive(Debug)]
pub struct BindError {
    pub addr: ListenAddr,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.source)
    }
}

/// Bind and listen on `addr`: `SO_REUSEADDR`, `IPV6_V6ONLY` for IPv6 (so that IPv4 and IPv6
/// are separate sockets), close-on-exec (socket2 creates sockets with `SOCK_CLOEXEC`).
/// A stale Unix socket file is removed first, but only if it is a socket.
pub fn bind(addr: &ListenAddr, backlog: u32, unix: &UnixSocketOptions) -> Result<Bound, BindError> {
    let fail = |source: io::Error| BindError {
        addr: addr.clone(),
        source,
    };
    let backlog = backlog.min(i32::MAX as u32) as i32;
    match addr {
        ListenAddr::Tcp(sa) | ListenAddr::Udp(sa) => {
            let ty = if matches!(addr, ListenAddr::Tcp(_)) {
                Type::STREAM
            } else {
                Type::DGRAM
            };
            let socket = Socket::new(Domain::for_address(*sa), ty, None).map_err(fail)?;
            socket.set_reuse_address(true).map_err(fail)?;
            if sa.is_ipv6() {
                socket.set_only_v6(true).map_err(fail)?;
            }
            socket.bind(&SockAddr::from(*sa)).map_err(fail)?;
            if ty == Type::STREAM {
                socket.listen(backlog).map_err(fail)?;
            }
            Ok(Bound {
                addr: addr.clone(),
                socket,
                owned_path: None,
            })
        }
        ListenAddr::Unix(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(fail)?,
                Ok(_) => {
                    return Err(fail(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket; refusing to remove it",
                    )));
                }
                Err(_) => {}
            }
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
            socket
                .bind(&SockAddr::unix(path).map_err(fail)?)
                .map_err(fail)?;
            let bound = Bound {
                addr: addr.clone(),
                socket,
                owned_path: Some(path.clone()),
            };
            if let Some(mode) = unix.mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(fail)?;
            }
            if unix.uid.is_some() || unix.gid.is_some() {
                std::os::unix::fs::lchown(path, unix.uid, unix.gid).map_err(fail)?;
            }
            bound.socket.listen(backlog).map_err(fail)?;
            Ok(bound)
        }
    }
}

/// The address an inherited socket is bound to, read with `getsockname` and `SO_TYPE`.
fn address_of(socket: &Socket) -> io::Result<Option<ListenAddr>> {
    let local = socket.local_addr()?;
    let ty = socket.r#type()?;
    if let Some(sa) = local.as_socket() {
        return Ok(match ty {
            Type::STREAM => Some(ListenAddr::Tcp(sa)),
            Type::DGRAM => Some(ListenAddr::Udp(sa)),
            _ => None,
        });
    }
    if let Some(path) = local.as_pathname()
        && ty == Type::STREAM
    {
        return Ok(Some(ListenAddr::Unix(path.to_path_buf())));
    }
    Ok(None)
}

/// Sockets available for (re)use, keyed by address: the previous configuration's sockets during
/// a reload, or the sockets inherited at start-up.
#[derive(Default)]
pub struct Pool {
    sockets: HashMap<ListenAddr, Bound>,
    /// Inherited sockets whose address did not match by itself, with their `LISTEN_FDNAMES`
    /// name, kept for matching by name.
    by_name: Vec<(String, Bound)>,
}

impl Pool {
    /// Put a socket back for possible reuse.
    pub fn put(&mut self, bound: Bound) {
        self.sockets.insert(bound.addr.clone(), bound);
    }

    /// Take the socket for `listen`, if the pool holds one for its address (or, for inherited
    /// sockets, one whose distinct fd name is `listen.name` and whose type matches).
    pub fn take(&mut self, listen: &Listen) -> Option<Bound> {
        if let Some(b) = self.sockets.remove(&listen.addr) {
            return Some(b);
        }
        let same_kind =
            |a: &ListenAddr| std::mem::discriminant(a) == std::mem::discriminant(&listen.addr);
        let pos = self
            .by_name
            .iter()
            .position(|(name, b)| *name == listen.name && same_kind(&b.addr))?;
        let (_, mut b) = self.by_name.remove(pos);
        log::warn!(
            "inherited fd named {:?} is bound to {} but the config says {}; using it by name",
            listen.name,
            b.addr,
            listen.addr
        );
        b.addr = listen.addr.clone();
        Some(b)
    }

    /// What is left over (sockets nobody took), emptying the pool.
    pub fn drain(&mut self) -> Vec<Bound> {
        let mut v: Vec<Bound> = self.sockets.drain().map(|(_, b)| b).collect();
        v.extend(self.by_name.drain(..).map(|(_, b)| b));
        v
    }

    /// Adopt the sockets this process inherited (`LISTEN_FDS`), keyed by the address each is
    /// bound to. Names from `LISTEN_FDNAMES` are used only where they are distinct: systemd
    /// gives every socket of one `.socket` unit the same name, so names alone cannot tell them
    /// apart; an inherited fd is matched by name only when its address matches nothing in
    /// `wanted` and no other inherited fd has that name.
    pub fn adopt(
        &mut self,
        inherited: Vec<(String, RawFd, OwnedFd)>,
        wanted: &[Listen],
    ) -> Result<(), String> {
        let mut unmatched = Vec::new();
        for (name, number, fd) in inherited {
            let socket = Socket::from(fd);
            let addr = address_of(&socket)
                .map_err(|e| format!("inherited fd {number} ({name:?}): {e}"))?
                .ok_or_else(|| {
                    format!(
                        "inherited fd {number} ({name:?}) is not a TCP, UDP or Unix stream socket"
                    )
                })?;
            if matches!(addr, ListenAddr::Tcp(_) | ListenAddr::Unix(_))
                && !socket.is_listener().unwrap_or(false)
            {
                return Err(format!(
                    "inherited fd {number} ({name:?}) on {addr} is a stream socket that is not listening"
                ));
            }
            log::info!("adopted inherited fd {number} ({name:?}) bound to {addr}");
            let bound = Bound {
                addr: addr.clone(),
                socket,
                owned_path: None,
            };
            if wanted.iter().any(|l| l.addr == addr) {
                self.sockets.insert(addr, bound);
            } else {
                unmatched.push((name, number, bound));
            }
        }
        for (name, number, bound) in unmatched {
            let distinct = self.by_name.iter().all(|(n, _)| *n != name)
                && wanted.iter().filter(|l| l.name == name).count() == 1;
            if !distinct {
                return Err(format!(
                    "inherited fd {number} ({name:?}) does not match a configured address: {}",
                    describe_unmatched(&bound.addr, wanted)
                ));
            }
            self.by_name.push((name, bound));
        }
        Ok(())
    }
}

/// Why an inherited socket fits nothing: the wrong type for a configured address, or an
/// address no service listens on.
pub fn describe_unmatched(addr: &ListenAddr, wanted: &[Listen]) -> String {
    let same_place = wanted.iter().find(|l| match (&l.addr, addr) {
        (ListenAddr::Tcp(a), ListenAddr::Udp(b)) | (ListenAddr::Udp(a), ListenAddr::Tcp(b)) => {
            a == b
        }
        _ => false,
    });
    match same_place {
        Some(l) => format!("{addr} has the wrong type (the config says {})", l.addr),
        None => format!("{addr}, which no service listens on"),
    }
}
