//! Taking sockets a launcher passed in (`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`, fds from 3) and checking what each one really is.
//!
//! The contract, in the order [`take_all_from_env`] applies it:
//!
//! 1. `LISTEN_FDS` unset: nothing was passed, `Ok(vec![])`.
//! 2. `LISTEN_PID` set and not our pid (or `LISTEN_PIDFDID` set and not the inode of our
//!    pidfd): the variables were meant for another process, `Ok(vec![])`, and the fds are left
//!    alone. A **missing or empty `LISTEN_PID` is accepted** on purpose: that is what
//!    `systemfd --no-pid` and watchers that restart their child send.
//! 3. Every fd `3..3+LISTEN_FDS` is marked close-on-exec, whether it is then taken or not, so
//!    none of them leaks into a child.
//! 4. `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` and `LISTEN_PIDFDID` are removed from the
//!    environment in every case (also on error), like `sd_listen_fds(1)`.
//! 5. Each fd is checked with `fstat`, `SO_TYPE`, the address family and `SO_ACCEPTCONN` and
//!    classified as a [`SocketKind`]. An fd that is closed or is not a socket is an
//!    [`ActivationError`] naming the fd number and its name; the binary exits with code 3 for it.
//!
//! Names come from `LISTEN_FDNAMES` (colon-separated). A missing name is `unknown`, the name
//! systemd itself uses; names beyond `LISTEN_FDS` are ignored.
//!
//! Taking fds and the pid check go through `listenfd` (which also honours its own
//! `LISTEN_FDS_FIRST_FD` extension); `LISTEN_FDNAMES`, `LISTEN_PIDFDID`, close-on-exec for
//! untaken fds and the listening-state check are done here, because `listenfd` does not.
//!
//! **Thread safety:** [`take_all_from_env`] edits the process environment. Call it at the top of
//! `main`, before any thread is started (the binary does).

use std::env;
use std::fmt;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

use socket2::{Domain, SockAddr, Socket, Type};

/// The environment variables of the protocol, all removed by [`take_all_from_env`].
pub const ACTIVATION_VARS: [&str; 4] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
];

/// The name systemd gives an fd that has none.
pub const UNKNOWN_NAME: &str = "unknown";

/// What an inherited fd turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// An IPv4 or IPv6 stream socket in the listening state.
    TcpListener,
    /// An IPv4 or IPv6 datagram socket.
    UdpSocket,
    /// An `AF_UNIX` stream socket in the listening state.
    UnixListener,
    /// An `AF_UNIX` datagram socket.
    UnixDatagram,
    /// A connected stream socket (TCP or `AF_UNIX`): one client, as systemd `Accept=yes` and
    /// inetd `nowait` hand over (`LISTEN_FDNAMES=connection`).
    ConnectedStream,
    /// Some other socket: seqpacket, raw, netlink, or a stream socket neither listening nor
    /// connected.
    Other,
}

impl SocketKind {
    /// A short human name, used in messages.
    pub fn describe(self) -> &'static str {
        match self {
            SocketKind::TcpListener => "TCP listener",
            SocketKind::UdpSocket => "UDP socket",
            SocketKind::UnixListener => "unix stream listener",
            SocketKind::UnixDatagram => "unix datagram socket",
            SocketKind::ConnectedStream => "connected stream socket",
            SocketKind::Other => "socket of another type",
        }
    }
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// One fd a launcher passed in, already checked and marked close-on-exec.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The socket. Dropping it closes our copy only; the launcher keeps its own.
    pub fd: OwnedFd,
    /// Its name from `LISTEN_FDNAMES`, or `unknown`.
    pub name: String,
    /// The fd number it had when the process started (3, 4, ...), for messages.
    pub number: i32,
    /// What it is.
    pub kind: SocketKind,
}

/// Why inherited fds cannot be used. Every variant names the fd number and its name when there
/// is one. The `small-services` binary exits with code 3 for all of them.
#[derive(Debug)]
pub enum ActivationError {
    /// A `LISTEN_*` variable does not parse (e.g. `LISTEN_FDS=abc`).
    BadVariable { var: &'static str, value: String },
    /// `LISTEN_FDS` names more fds than this process can hold: fd `first + count - 1` would lie
    /// at or above `limit` (the larger of the soft and hard `RLIMIT_NOFILE`), so the count is
    /// wrong. Refused before anything proportional to `count` is allocated.
    TooManyFds {
        count: u64,
        first: RawFd,
        limit: u64,
    },
    /// The fd is not open (e.g. `LISTEN_FDS=1` but fd 3 closed).
    NotOpen { number: i32, name: String },
    /// The fd is open but is not a socket (a pipe, a file, a tty).
    NotASocket { number: i32, name: String },
    /// A system call on the fd failed.
    Io {
        number: i32,
        name: String,
        source: io::Error,
    },
    /// The fd is a socket, but not the kind the caller needs.
    WrongKind {
        number: i32,
        name: String,
        found: SocketKind,
        expected: String,
    },
}

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationError::BadVariable { var, value } => {
                write!(f, "inherited sockets: {var}={value:?} is not valid")
            }
            ActivationError::TooManyFds {
                count,
                first,
                limit,
            } => write!(
                f,
                "inherited sockets: LISTEN_FDS={count} names more fds than this process can have \
                 open (fds {first} to {}, but RLIMIT_NOFILE is {limit})",
                (*first as u64 + *count).saturating_sub(1)
            ),
            ActivationError::NotOpen { number, name } => {
                write!(f, "inherited fd {number} (name {name:?}) is not open")
            }
            ActivationError::NotASocket { number, name } => {
                write!(f, "inherited fd {number} (name {name:?}) is not a socket")
            }
            ActivationError::Io { number, name, .. } => {
                write!(
                    f,
                    "inherited fd {number} (name {name:?}) cannot be inspected"
                )
            }
            ActivationError::WrongKind {
                number,
                name,
                found,
                expected,
            } => write!(
                f,
                "inherited fd {number} (name {name:?}) is a {found}, expected {expected}"
            ),
        }
    }
}

impl std::error::Error for ActivationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ActivationError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a launcher passed: the sockets, and whether it named this very process.
#[derive(Debug, Default)]
pub struct Passed {
    /// One entry per fd, in fd order, each close-on-exec; empty when nothing was for us.
    pub sockets: Vec<InheritedSocket>,
    /// `LISTEN_PID` was set and is our pid: the launcher started this process itself for these
    /// sockets (systemd, the superserver, `systemd-socket-activate`). False when it was missing
    /// or empty (`systemfd --no-pid`), which is accepted but says nothing about who started us
    /// or whether anyone will start us again.
    pub pid_is_ours: bool,
}

/// Takes every socket passed through `LISTEN_FDS`, checked and classified.
///
/// * `Ok(vec![])`: nothing was passed, or the variables name another process (`LISTEN_PID`).
/// * `Ok(sockets)`: one entry per fd, in fd order, each close-on-exec.
/// * `Err(e)`: a variable does not parse, `LISTEN_FDS` names more fds than the process can hold
///   (refused before allocating anything for them), or an fd is closed or not a socket; `e`
///   names it.
///
/// Whatever the outcome, the `LISTEN_*` variables are gone afterwards, and every fd that was
/// meant for us is close-on-exec. Sockets are returned as they were passed: blocking or not,
/// never `shutdown(2)`, never unlinked. Call before starting threads (see the module docs).
pub fn take_all_from_env() -> Result<Vec<InheritedSocket>, ActivationError> {
    take_from_env().map(|p| p.sockets)
}

/// [`take_all_from_env`], also saying whether `LISTEN_PID` named us ([`Passed::pid_is_ours`]).
pub fn take_from_env() -> Result<Passed, ActivationError> {
    let fds_var = env::var("LISTEN_FDS").ok();
    let pid_var = env::var("LISTEN_PID").ok();
    let names_var = env::var("LISTEN_FDNAMES").ok();
    let pidfdid_var = env::var("LISTEN_PIDFDID").ok();
    let first_fd_var = env::var("LISTEN_FDS_FIRST_FD").ok();
    let result = take_from(
        fds_var.as_deref(),
        pid_var.as_deref(),
        names_var.as_deref(),
        pidfdid_var.as_deref(),
        first_fd_var.as_deref(),
    );
    for var in ACTIVATION_VARS {
        // SAFETY: documented precondition of this function: it runs before any other thread
        // exists, so nothing reads the environment concurrently.
        unsafe { env::remove_var(var) };
    }
    result
}

fn take_from(
    fds_var: Option<&str>,
    pid_var: Option<&str>,
    names_var: Option<&str>,
    pidfdid_var: Option<&str>,
    first_fd_var: Option<&str>,
) -> Result<Passed, ActivationError> {
    let Some(fds_value) = fds_var else {
        return Ok(Passed::default());
    };
    let count: u64 = fds_value
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadVariable {
            var: "LISTEN_FDS",
            value: fds_value.to_owned(),
        })?;
    let pid_is_ours = match pid_var.map(str::trim) {
        None | Some("") => false,
        Some(pid) => {
            let pid: u32 = pid.parse().map_err(|_| ActivationError::BadVariable {
                var: "LISTEN_PID",
                value: pid.to_owned(),
            })?;
            if pid != std::process::id() {
                log::debug!(
                    "LISTEN_PID={pid} is not our pid {}: ignoring LISTEN_FDS",
                    std::process::id()
                );
                return Ok(Passed::default());
            }
            true
        }
    };
    if let Some(id) = pidfdid_var.map(str::trim).filter(|v| !v.is_empty()) {
        let id: u64 = id.parse().map_err(|_| ActivationError::BadVariable {
            var: "LISTEN_PIDFDID",
            value: id.to_owned(),
        })?;
        // Kernels without pidfds cannot check this; systemd then does not set it either.
        if let Some(ours) = own_pidfd_inode()
            && ours != id
        {
            log::debug!("LISTEN_PIDFDID={id} is not our pidfd {ours}: ignoring LISTEN_FDS");
            return Ok(Passed::default());
        }
    }
    let first = match first_fd_var {
        Some(first) => first
            .trim()
            .parse::<RawFd>()
            .ok()
            .filter(|&n| n >= 0)
            .ok_or_else(|| ActivationError::BadVariable {
                var: "LISTEN_FDS_FIRST_FD",
                value: first.to_owned(),
            })?,
        None => 3,
    };
    // Before anything proportional to `count` (listenfd's table, names, the loops below).
    let count = check_count(count, first, fd_limit())?;

    // listenfd re-reads LISTEN_FDS/LISTEN_PID (still set: we remove them after this returns),
    // applies the same pid rule, and gives us the fd numbers to take.
    let mut listen = listenfd::ListenFd::from_env();
    if listen.len() != count {
        // Only possible if the environment changed under us.
        return Err(ActivationError::BadVariable {
            var: "LISTEN_FDS",
            value: fds_value.to_owned(),
        });
    }
    let mut names: Vec<String> = names_var
        .filter(|n| !n.is_empty())
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if names.len() > count {
        log::warn!(
            "LISTEN_FDNAMES has {} names for {count} fds: ignoring the extra ones",
            names.len()
        );
    }
    names.resize(count, UNKNOWN_NAME.to_owned());

    let mut numbers = Vec::with_capacity(count);
    for idx in 0..count {
        let number = listen
            .take_raw_fd(idx)
            .ok()
            .flatten()
            .expect("listenfd yields each raw fd once");
        numbers.push(number);
    }
    // Close-on-exec for all of them first, so an error on one fd leaks none of the others.
    let open: Vec<bool> = numbers.iter().map(|&n| set_cloexec(n)).collect();

    let mut sockets = Vec::with_capacity(count);
    let mut first_error = None;
    for ((number, name), is_open) in numbers.into_iter().zip(names).zip(open) {
        if !is_open {
            first_error.get_or_insert(ActivationError::NotOpen { number, name });
            continue;
        }
        // SAFETY: the launcher passed `number` to us (LISTEN_FDS, pid checked), it is open
        // (F_SETFD succeeded) and listenfd handed it out once, so this is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(number) };
        match classify(fd.as_fd()) {
            Ok(Some(kind)) => sockets.push(InheritedSocket {
                fd,
                name,
                number,
                kind,
            }),
            Ok(None) => {
                first_error.get_or_insert(ActivationError::NotASocket { number, name });
            }
            Err(source) => {
                first_error.get_or_insert(ActivationError::Io {
                    number,
                    name,
                    source,
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(Passed {
            sockets,
            pid_is_ours,
        }),
    }
}

/// `count` as a `usize` if fds `first..first + count` can all exist in this process, else
/// [`ActivationError::TooManyFds`]. An fd number at or above the `RLIMIT_NOFILE` in force can
/// never have been opened, so a larger count is a wrong variable, not a reason to allocate
/// (`LISTEN_FDS=2147483647` used to allocate until the OOM killer came). `limit` is the larger
/// of the soft and hard limits: a launcher may place fds and then lower the soft limit (systemd
/// gives services a soft limit of 1024), and the hard limit is itself capped by `fs.nr_open`.
fn check_count(count: u64, first: RawFd, limit: u64) -> Result<usize, ActivationError> {
    let end = first as u64 + count;
    if end > limit {
        return Err(ActivationError::TooManyFds {
            count,
            first,
            limit,
        });
    }
    // `end <= limit` and an rlimit fits a usize on every platform with fds: no truncation.
    Ok(count as usize)
}

/// The largest number of fds this process can hold: max(soft, hard) `RLIMIT_NOFILE`, or a
/// conservative 1024 if it cannot be read.
fn fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => soft.max(hard),
        Err(_) => 1024,
    }
}

/// Sets `FD_CLOEXEC`; false if the fd is not open.
fn set_cloexec(fd: RawFd) -> bool {
    // SAFETY: fcntl on an integer fd touches no memory; on a closed fd it fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return false;
    }
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) >= 0 }
}

/// The inode of a pidfd for this process, which `LISTEN_PIDFDID` names (systemd 259+).
fn own_pidfd_inode() -> Option<u64> {
    // SAFETY: pidfd_open(pid, flags) takes two integers and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: the syscall just returned this new fd to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    nix::sys::stat::fstat(&pidfd).ok().map(|st| st.st_ino)
}

/// What `fd` is: `Ok(None)` if it is open but not a socket, `Err` if `fstat` or a socket
/// query fails (e.g. the fd is closed).
pub fn classify(fd: BorrowedFd<'_>) -> io::Result<Option<SocketKind>> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(None);
    }
    let socket = socket2::SockRef::from(&fd);
    let domain = socket.domain()?;
    let ty = socket.r#type()?;
    let inet = domain == Domain::IPV4 || domain == Domain::IPV6;
    let unix = domain == Domain::UNIX;
    let kind = if ty == Type::DGRAM && inet {
        SocketKind::UdpSocket
    } else if ty == Type::DGRAM && unix {
        SocketKind::UnixDatagram
    } else if ty == Type::STREAM && (inet || unix) {
        if socket.is_listener()? {
            if inet {
                SocketKind::TcpListener
            } else {
                SocketKind::UnixListener
            }
        } else if socket.peer_addr().is_ok() {
            SocketKind::ConnectedStream
        } else {
            SocketKind::Other
        }
    } else {
        SocketKind::Other
    };
    Ok(Some(kind))
}

impl InheritedSocket {
    /// `Ok(self)` if it is of `kind`, else [`ActivationError::WrongKind`] naming fd and name.
    pub fn expect_kind(self, kind: SocketKind) -> Result<Self, ActivationError> {
        if self.kind == kind {
            Ok(self)
        } else {
            Err(self.wrong_kind(kind.describe()))
        }
    }

    /// The error for "this fd is not what was wanted"; `expected` is free text.
    pub fn wrong_kind(&self, expected: &str) -> ActivationError {
        ActivationError::WrongKind {
            number: self.number,
            name: self.name.clone(),
            found: self.kind,
            expected: expected.to_owned(),
        }
    }

    /// The socket as a `socket2::Socket`, whatever its kind.
    pub fn into_socket(self) -> Socket {
        Socket::from(self.fd)
    }

    /// The local address, for messages (`None` if the kernel does not say).
    pub fn local_addr(&self) -> Option<SockAddr> {
        socket2::SockRef::from(&self.fd).local_addr().ok()
    }

    /// A TCP listener, or [`ActivationError::WrongKind`].
    pub fn into_tcp_listener(self) -> Result<TcpListener, ActivationError> {
        Ok(self.expect_kind(SocketKind::TcpListener)?.fd.into())
    }

    /// A UDP socket, or [`ActivationError::WrongKind`].
    pub fn into_udp_socket(self) -> Result<UdpSocket, ActivationError> {
        Ok(self.expect_kind(SocketKind::UdpSocket)?.fd.into())
    }

    /// A unix stream listener, or [`ActivationError::WrongKind`].
    pub fn into_unix_listener(self) -> Result<UnixListener, ActivationError> {
        Ok(self.expect_kind(SocketKind::UnixListener)?.fd.into())
    }

    /// A unix datagram socket, or [`ActivationError::WrongKind`].
    pub fn into_unix_datagram(self) -> Result<UnixDatagram, ActivationError> {
        Ok(self.expect_kind(SocketKind::UnixDatagram)?.fd.into())
    }

    /// A connected stream (TCP or unix), or [`ActivationError::WrongKind`].
    pub fn into_connected_stream(self) -> Result<OwnedFd, ActivationError> {
        Ok(self.expect_kind(SocketKind::ConnectedStream)?.fd)
    }
}

/// Whether `a` and `b` are the same open file (same device and inode), e.g. stderr being the
/// very socket inetd put on stdin.
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_means_nothing() {
        assert!(
            take_from(None, None, None, None, None)
                .unwrap()
                .sockets
                .is_empty()
        );
    }

    #[test]
    fn other_pid_means_nothing() {
        let other = (std::process::id() + 1).to_string();
        assert!(
            take_from(Some("1"), Some(&other), None, None, None)
                .unwrap()
                .sockets
                .is_empty()
        );
    }

    #[test]
    fn bad_count_is_an_error() {
        let e = take_from(Some("x"), None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("LISTEN_FDS"), "{e}");
    }

    #[test]
    fn count_beyond_the_fd_limit_is_refused() {
        assert_eq!(check_count(2, 3, 1024).unwrap(), 2);
        assert_eq!(check_count(1021, 3, 1024).unwrap(), 1021);
        let e = check_count(1022, 3, 1024).unwrap_err();
        assert!(matches!(e, ActivationError::TooManyFds { count: 1022, .. }));
        let e = check_count(i32::MAX as u64, 3, 1 << 20).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("LISTEN_FDS=2147483647") && text.contains("RLIMIT_NOFILE"),
            "{text}"
        );
        // Through the whole path, with the process' real limit.
        let e = take_from(Some("2147483647"), None, None, None, None).unwrap_err();
        assert!(matches!(e, ActivationError::TooManyFds { .. }), "{e}");
    }

    #[test]
    fn classify_kinds() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            classify(tcp.as_fd()).unwrap(),
            Some(SocketKind::TcpListener)
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(classify(udp.as_fd()).unwrap(), Some(SocketKind::UdpSocket));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            classify(a.as_fd()).unwrap(),
            Some(SocketKind::ConnectedStream)
        );
        let (d, _e) = UnixDatagram::pair().unwrap();
        assert_eq!(classify(d.as_fd()).unwrap(), Some(SocketKind::UnixDatagram));
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(classify(r.as_fd()).unwrap(), None);
        let fresh = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_eq!(classify(fresh.as_fd()).unwrap(), Some(SocketKind::Other));
    }
}
