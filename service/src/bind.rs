//! Binding our own sockets from `NAME=ADDRESS` specs when a launcher passed none (twelve-factor: flags or env).
//!
//! Address syntax (IP literals only, names are never resolved):
//! `tcp://127.0.0.1:7007`, `udp://[::1]:7007`, `unix:/run/echo.sock`, and a bare
//! `127.0.0.1:7013` or `[::1]:7013`, which means TCP. The `NAME=` part is optional; without it
//! the socket is named `unknown` and needs `--protocol`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::activation::{SocketKind, UNKNOWN_NAME};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Udp(a) => write!(f, "udp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One `--listen NAME=ADDRESS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub addr: ListenAddr,
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.addr)
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // A name never contains ':' or '/', an address before '=' always does.
        let (name, addr) = match s.split_once('=') {
            Some((name, addr)) if !name.contains([':', '/']) => (name, addr),
            _ => (UNKNOWN_NAME, s),
        };
        if name.is_empty() {
            return Err(format!("{s:?}: empty name before '='"));
        }
        let addr = if let Some(rest) = addr.strip_prefix("tcp://") {
            ListenAddr::Tcp(parse_ip_port(rest)?)
        } else if let Some(rest) = addr.strip_prefix("udp://") {
            ListenAddr::Udp(parse_ip_port(rest)?)
        } else if let Some(rest) = addr.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(format!("{addr:?}: empty unix socket path"));
            }
            ListenAddr::Unix(PathBuf::from(path))
        } else if addr.contains("://") {
            return Err(format!(
                "{addr:?}: unknown scheme (use tcp://, udp:// or unix:)"
            ));
        } else {
            ListenAddr::Tcp(parse_ip_port(addr)?)
        };
        Ok(ListenSpec {
            name: name.to_owned(),
            addr,
        })
    }
}

fn parse_ip_port(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?}: expected IP:PORT with an IP literal (IPv6 in brackets: [::1]:7007); names are not resolved")
    })
}

/// Parses a comma-separated list, as in `SMALL_SERVICES_LISTEN`.
pub fn parse_list(s: &str) -> Result<Vec<ListenSpec>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

/// A socket we bound ourselves.
#[derive(Debug)]
pub struct BoundSocket {
    pub fd: OwnedFd,
    pub name: String,
    pub kind: SocketKind,
    /// The address actually bound (port 0 resolved), for messages.
    pub local: String,
    /// The unix socket file we created, to remove on exit; never set for inherited sockets.
    pub created_path: Option<PathBuf>,
}

/// Why a spec could not be bound. The binary exits with code 4.
#[derive(Debug)]
pub struct BindError {
    pub spec: ListenSpec,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot listen on {}", self.spec)
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Binds every spec: close-on-exec, `SO_REUSEADDR` for TCP only (on UDP it would let another
/// socket co-bind the port and steal datagrams), `IPV6_V6ONLY` for IPv6 addresses, backlog
/// `SOMAXCONN`. A stale unix socket file (nobody accepting on it) is replaced; a live one is an
/// error. Stops at the first failure.
pub fn bind_all(specs: &[ListenSpec]) -> Result<Vec<BoundSocket>, BindError> {
    specs
        .iter()
        .map(|spec| {
            bind_one(spec).map_err(|source| BindError {
                spec: spec.clone(),
                source,
            })
        })
        .collect()
}

fn bind_one(spec: &ListenSpec) -> io::Result<BoundSocket> {
    let (socket, kind, created_path) = match &spec.addr {
        ListenAddr::Tcp(addr) | ListenAddr::Udp(addr) => {
            let udp = matches!(spec.addr, ListenAddr::Udp(_));
            let ty = if udp { Type::DGRAM } else { Type::STREAM };
            // Socket::new sets SOCK_CLOEXEC.
            let socket = Socket::new(Domain::for_address(*addr), ty, None)?;
            if !udp {
                // TCP: rebind at once over the TIME_WAIT connections of the last run. Never on
                // UDP: there it lets any local user bind the same address too and take a share
                // of our datagrams.
                socket.set_reuse_address(true)?;
            }
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&SockAddr::from(*addr))?;
            if udp {
                (socket, SocketKind::UdpSocket, None)
            } else {
                socket.listen(libc::SOMAXCONN)?;
                (socket, SocketKind::TcpListener, None)
            }
        }
        ListenAddr::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            socket.listen(libc::SOMAXCONN)?;
            (socket, SocketKind::UnixListener, Some(path.clone()))
        }
    };
    let local = match &spec.addr {
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
        ListenAddr::Tcp(_) => format!("tcp://{}", local_ip_port(&socket)),
        ListenAddr::Udp(_) => format!("udp://{}", local_ip_port(&socket)),
    };
    Ok(BoundSocket {
        fd: socket.into(),
        name: spec.name.clone(),
        kind,
        local,
        created_path,
    })
}

fn local_ip_port(socket: &Socket) -> String {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".to_owned())
}

/// Removes `path` if it is a socket nobody accepts on; `AddrInUse` if somebody does.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a server is accepting on it",
                )),
                Err(_) => std::fs::remove_file(path),
            }
        }
        // Not a socket (bind reports EADDRINUSE) or absent: let bind decide.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s: ListenSpec = "echo=tcp://127.0.0.1:7007".parse().unwrap();
        assert_eq!(s.name, "echo");
        assert_eq!(s.addr, ListenAddr::Tcp("127.0.0.1:7007".parse().unwrap()));
        let s: ListenSpec = "echo=udp://[::1]:7007".parse().unwrap();
        assert_eq!(s.addr, ListenAddr::Udp("[::1]:7007".parse().unwrap()));
        let s: ListenSpec = "daytime=127.0.0.1:7013".parse().unwrap();
        assert_eq!(s.addr, ListenAddr::Tcp("127.0.0.1:7013".parse().unwrap()));
        let s: ListenSpec = "qotd=unix:/tmp/q.sock".parse().unwrap();
        assert_eq!(s.addr, ListenAddr::Unix("/tmp/q.sock".into()));
        let s: ListenSpec = "[::1]:9".parse().unwrap();
        assert_eq!(s.name, "unknown");
        assert!("echo=localhost:7".parse::<ListenSpec>().is_err());
        assert!("echo=sctp://1.2.3.4:5".parse::<ListenSpec>().is_err());
        assert!("=1.2.3.4:5".parse::<ListenSpec>().is_err());
        let l = parse_list("echo=tcp://127.0.0.1:7007, daytime=127.0.0.1:7013,").unwrap();
        assert_eq!(l.len(), 2);
    }
}
