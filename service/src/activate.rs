//! Make any server socket-activatable: take its sockets from whatever launched it, by name,
//! count its connections, and exit when idle without losing a client.
//!
//! * [`Sockets::from_env_or_bind`] takes the sockets a launcher passed (`LISTEN_FDS`: systemd,
//!   `systemd-socket-activate`, `systemfd --no-pid`, the superserver), else a listening socket on
//!   stdin (inetd/xinetd `wait`), else binds the addresses you give it. Every check of
//!   [`crate::activation`] applies: `LISTEN_PID`/`LISTEN_PIDFDID`, type checks, close-on-exec,
//!   the `LISTEN_*` variables removed.
//! * Take them by fd name (`LISTEN_FDNAMES`) or index: [`Sockets::take_listener`],
//!   [`Sockets::take_tcp`], [`Sockets::take_unix`], [`Sockets::take_udp`],
//!   [`Sockets::take_listeners`].
//! * [`Acceptor`] (std, for thread pools) and, with feature `tokio`,
//!   `tokio::TokioAcceptor` and `tokio::serve_http` (hyper/axum over several TCP and unix
//!   listeners) accept until the idle timeout passes with no connection open, then **stop
//!   accepting first** and return: a client that connects after that decision waits in the kernel
//!   queue of the launcher's copy of the socket for the next activation. On SIGTERM/SIGINT they
//!   stop accepting and let open connections finish within [`Options::shutdown_grace`].
//!   `sd_notify` `READY=1` is sent when accepting starts and `STOPPING=1` when it stops.
//!
//! Passed sockets are never `shutdown(2)` and their unix socket files are never removed;
//! dropping a listener closes only this process' copy of the fd.
//!
//! ```no_run
//! use small_services::activate::{Acceptor, Options, Sockets};
//! use std::io::{Read, Write};
//!
//! let mut sockets = Sockets::from_env_or_bind(["echo=tcp://127.0.0.1:7007"])?;
//! let options = Options::from_env(&sockets);
//! let mut acceptor = Acceptor::new(sockets.take_listeners()?, options)?;
//! while let Some(mut conn) = acceptor.accept() {
//!     std::thread::spawn(move || {
//!         let mut buf = [0; 4096];
//!         while let Ok(n @ 1..) = conn.read(&mut buf) {
//!             if conn.write_all(&buf[..n]).is_err() {
//!                 break;
//!             }
//!         }
//!     });
//! }
//! std::process::exit(acceptor.finish().exit_code());
//! # Ok::<(), small_services::activate::Error>(())
//! ```
//!
//! **Call [`Sockets::from_env`] / [`Sockets::from_env_or_bind`] before starting any thread**
//! (before building a multi-threaded tokio runtime): it edits the environment.

#![deny(missing_docs)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::activation::{self, ActivationError, SocketKind};
use crate::bind::{self, BindError, ListenSpec};
use crate::notify;

#[cfg(feature = "tokio")]
pub mod tokio;

/// Environment variable: addresses to bind when nothing was passed, replacing those given to
/// [`Sockets::from_env_or_bind`] (comma-separated `NAME=ADDRESS`).
pub const LISTEN_VAR: &str = "ACTIVATION_LISTEN";
/// Environment variable: idle timeout (`200ms`, `8s`, `0` = never) for [`Options::from_env`].
pub const IDLE_TIMEOUT_VAR: &str = "ACTIVATION_IDLE_TIMEOUT";
/// Environment variable: how long open connections may finish after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE_VAR: &str = "ACTIVATION_SHUTDOWN_GRACE";
/// Test-only environment variable: `1` selects the deliberately wrong idle exit (see
/// [`Options::naive_idle_exit`]), to show what the right one prevents.
#[doc(hidden)]
pub const NAIVE_IDLE_EXIT_VAR: &str = "ACTIVATION_TEST_NAIVE_IDLE_EXIT";
/// Test-only environment variable: [`Options::test_stop_delay`].
#[doc(hidden)]
pub const STOP_DELAY_VAR: &str = "ACTIVATION_TEST_STOP_DELAY";
/// Environment variable: [`Options::http_keep_alive_timeout`] (`0` = never).
pub const KEEP_ALIVE_TIMEOUT_VAR: &str = "ACTIVATION_KEEP_ALIVE_TIMEOUT";
/// Default [`Options::http_keep_alive_timeout`].
pub const DEFAULT_HTTP_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle timeout when a launcher will start us again and none was configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Default [`Options::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why sockets could not be taken.
#[derive(Debug)]
pub enum Error {
    /// The passed fds are wrong (not open, not sockets, bad variables), or a socket is not the
    /// kind asked for ([`ActivationError::WrongKind`]).
    Activation(ActivationError),
    /// A fallback address does not parse.
    BadSpec(String),
    /// A fallback address cannot be bound.
    Bind(BindError),
    /// No socket has that name or index (or it was already taken).
    NotFound {
        /// The name or index asked for.
        key: String,
        /// The names still available.
        available: Vec<String>,
    },
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Activation(e) => e.fmt(f),
            Error::BadSpec(e) => write!(f, "listen address {e}"),
            Error::Bind(e) => write!(f, "{e}: {}", e.source),
            Error::NotFound { key, available } => write!(
                f,
                "no socket {key} was passed or bound (available: {})",
                if available.is_empty() {
                    "none".to_owned()
                } else {
                    available.join(", ")
                }
            ),
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Activation(e) => Some(e),
            Error::Bind(e) => Some(e),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ActivationError> for Error {
    fn from(e: ActivationError) -> Self {
        Error::Activation(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Where the sockets came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `LISTEN_FDS`. `pid_is_ours`: `LISTEN_PID` named this process (systemd, the superserver,
    /// `systemd-socket-activate`); false when it was missing (`systemfd --no-pid`).
    Launcher {
        /// `LISTEN_PID` was set and is our pid.
        pid_is_ours: bool,
    },
    /// A listening or UDP socket on stdin (inetd/xinetd `wait`), named `stdin`.
    InetdStdin,
    /// Bound by this process from the fallback addresses.
    Bound,
    /// Nothing was passed and nothing was bound.
    Nothing,
}

/// Which socket to take: its fd name or its position (0-based, in `LISTEN_FDS` order or in the
/// order of the fallback addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// The first not yet taken socket with this name.
    Name(&'a str),
    /// The socket at this position.
    Index(usize),
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(name: &'a str) -> Self {
        Key::Name(name)
    }
}

impl From<usize> for Key<'_> {
    fn from(index: usize) -> Self {
        Key::Index(index)
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Name(n) => write!(f, "named {n:?}"),
            Key::Index(i) => write!(f, "at index {i}"),
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    number: i32,
    kind: SocketKind,
    fd: Option<OwnedFd>,
}

/// The sockets this process serves, taken from a launcher or bound, each close-on-exec.
///
/// Keep it alive while serving: dropping it removes the unix socket files it created by
/// binding (never those of passed sockets). Sockets not taken are closed when it drops.
#[derive(Debug)]
pub struct Sockets {
    slots: Vec<Slot>,
    origin: Origin,
    created_paths: Vec<PathBuf>,
}

impl Sockets {
    /// The sockets a launcher passed through `LISTEN_FDS`, else a listening/UDP socket on
    /// stdin, else none ([`Origin::Nothing`]). Call before starting threads.
    pub fn from_env() -> Result<Sockets, Error> {
        let passed = activation::take_from_env()?;
        if !passed.sockets.is_empty() {
            return Ok(Sockets {
                slots: passed
                    .sockets
                    .into_iter()
                    .map(|s| Slot {
                        name: s.name,
                        number: s.number,
                        kind: s.kind,
                        fd: Some(s.fd),
                    })
                    .collect(),
                origin: Origin::Launcher {
                    pid_is_ours: passed.pid_is_ours,
                },
                created_paths: Vec::new(),
            });
        }
        let stdin = io::stdin();
        let kind = activation::classify(stdin.as_fd()).ok().flatten();
        if let Some(
            kind @ (SocketKind::TcpListener
            | SocketKind::UnixListener
            | SocketKind::UdpSocket
            | SocketKind::UnixDatagram),
        ) = kind
        {
            // Our own close-on-exec copy; fd 0 itself stays open until we exit.
            let fd = stdin.as_fd().try_clone_to_owned()?;
            return Ok(Sockets {
                slots: vec![Slot {
                    name: "stdin".to_owned(),
                    number: 0,
                    kind,
                    fd: Some(fd),
                }],
                origin: Origin::InetdStdin,
                created_paths: Vec::new(),
            });
        }
        Ok(Sockets {
            slots: Vec::new(),
            origin: Origin::Nothing,
            created_paths: Vec::new(),
        })
    }

    /// [`Sockets::from_env`], and when nothing was passed, binds `specs` instead:
    /// `NAME=tcp://IP:PORT`, `NAME=udp://IP:PORT`, `NAME=unix:/path` or `IP:PORT` (TCP), IP
    /// literals only (see [`crate::bind`]). `ACTIVATION_LISTEN` (the same, comma-separated)
    /// replaces `specs` when set. Call before starting threads.
    pub fn from_env_or_bind<I, S>(specs: I) -> Result<Sockets, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let specs: Vec<ListenSpec> = specs
            .into_iter()
            .map(|s| s.as_ref().parse().map_err(Error::BadSpec))
            .collect::<Result<_, _>>()?;
        let specs = match std::env::var(LISTEN_VAR) {
            Ok(list) => bind::parse_list(&list).map_err(Error::BadSpec)?,
            Err(_) => specs,
        };
        let sockets = Sockets::from_env()?;
        if sockets.origin != Origin::Nothing || specs.is_empty() {
            return Ok(sockets);
        }
        let bound = bind::bind_all(&specs).map_err(Error::Bind)?;
        let mut created_paths = Vec::new();
        let slots = bound
            .into_iter()
            .map(|b| {
                log::info!("listening: {} {}", b.name, b.local);
                created_paths.extend(b.created_path);
                Slot {
                    name: b.name,
                    number: -1,
                    kind: b.kind,
                    fd: Some(b.fd),
                }
            })
            .collect();
        Ok(Sockets {
            slots,
            origin: Origin::Bound,
            created_paths,
        })
    }

    /// Where the sockets came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Whether whoever started us will start us again when a client comes after we exit
    /// (`LISTEN_PID` named us, or inetd `wait`): then an idle exit is safe by default.
    pub fn relaunched(&self) -> bool {
        matches!(
            self.origin,
            Origin::Launcher { pid_is_ours: true } | Origin::InetdStdin
        )
    }

    /// How many sockets there are (taken or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none at all.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The names of the sockets not yet taken, in order.
    pub fn names(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.fd.is_some())
            .map(|s| s.name.as_str())
            .collect()
    }

    /// What the socket under `key` is, if it is there and not taken.
    pub fn kind<'k>(&self, key: impl Into<Key<'k>>) -> Option<SocketKind> {
        self.find(key.into()).map(|i| self.slots[i].kind)
    }

    fn find(&self, key: Key<'_>) -> Option<usize> {
        match key {
            Key::Name(n) => self
                .slots
                .iter()
                .position(|s| s.name == n && s.fd.is_some()),
            Key::Index(i) => self.slots.get(i).and_then(|s| s.fd.as_ref()).map(|_| i),
        }
    }

    fn take_slot(&mut self, key: Key<'_>, want: &[SocketKind]) -> Result<OwnedFd, Error> {
        let Some(i) = self.find(key) else {
            return Err(Error::NotFound {
                key: key.to_string(),
                available: self.names().iter().map(|s| s.to_string()).collect(),
            });
        };
        let slot = &mut self.slots[i];
        if !want.contains(&slot.kind) {
            let expected: Vec<&str> = want.iter().map(|k| k.describe()).collect();
            return Err(ActivationError::WrongKind {
                number: slot.number,
                name: slot.name.clone(),
                found: slot.kind,
                expected: expected.join(" or "),
            }
            .into());
        }
        Ok(slot.fd.take().expect("found only untaken slots"))
    }

    /// The TCP or unix stream listener under `key`.
    pub fn take_listener<'k>(&mut self, key: impl Into<Key<'k>>) -> Result<Listener, Error> {
        let key = key.into();
        let kind = self.kind(key);
        let fd = self.take_slot(key, &[SocketKind::TcpListener, SocketKind::UnixListener])?;
        Ok(match kind {
            Some(SocketKind::TcpListener) => Listener::Tcp(fd.into()),
            _ => Listener::Unix(fd.into()),
        })
    }

    /// Every stream listener not yet taken, in order; an error if any socket left is of
    /// another kind (take UDP sockets first with [`Sockets::take_udp`]).
    pub fn take_listeners(&mut self) -> Result<Vec<Listener>, Error> {
        let indices: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].fd.is_some())
            .collect();
        indices.into_iter().map(|i| self.take_listener(i)).collect()
    }

    /// The TCP listener under `key`.
    pub fn take_tcp<'k>(&mut self, key: impl Into<Key<'k>>) -> Result<TcpListener, Error> {
        Ok(self
            .take_slot(key.into(), &[SocketKind::TcpListener])?
            .into())
    }

    /// The unix stream listener under `key`.
    pub fn take_unix<'k>(&mut self, key: impl Into<Key<'k>>) -> Result<UnixListener, Error> {
        Ok(self
            .take_slot(key.into(), &[SocketKind::UnixListener])?
            .into())
    }

    /// The UDP socket under `key`.
    pub fn take_udp<'k>(&mut self, key: impl Into<Key<'k>>) -> Result<UdpSocket, Error> {
        Ok(self.take_slot(key.into(), &[SocketKind::UdpSocket])?.into())
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        for path in &self.created_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A stream listener: TCP or unix. Dropping it closes this process' copy of the fd only.
#[derive(Debug)]
pub enum Listener {
    /// TCP over IPv4 or IPv6.
    Tcp(TcpListener),
    /// `AF_UNIX` stream.
    Unix(UnixListener),
}

impl Listener {
    /// Accepts one connection (blocking or not, as the socket is set).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// Sets `O_NONBLOCK` (shared with the launcher's copy, like systemd's `NonBlocking=yes`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nonblocking),
            Listener::Unix(l) => l.set_nonblocking(nonblocking),
        }
    }

    /// Where it listens, for messages: `tcp://IP:PORT` or `unix:PATH`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_owned(),
            },
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:(unnamed)".to_owned(),
            },
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

/// An accepted connection: TCP or unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// `AF_UNIX` stream.
    Unix(UnixStream),
}

impl Stream {
    /// Sets `O_NONBLOCK`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

#[derive(Debug)]
struct TrackerState {
    open: usize,
    /// When the last connection closed (or the tracker was made).
    idle_since: Instant,
    /// When the last connection was accepted.
    last_accept: Instant,
}

/// Counts the connections open right now; shared by the accept loop and every
/// [`ConnectionGuard`] (clones share the count).
#[derive(Debug, Clone)]
pub struct Tracker(Arc<(Mutex<TrackerState>, Condvar)>);

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Tracker {
    /// A count of zero, idle since now.
    pub fn new() -> Tracker {
        let now = Instant::now();
        Tracker(Arc::new((
            Mutex::new(TrackerState {
                open: 0,
                idle_since: now,
                last_accept: now,
            }),
            Condvar::new(),
        )))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more open connection until the guard drops.
    pub fn track(&self) -> ConnectionGuard {
        let mut s = self.state();
        s.open += 1;
        s.last_accept = Instant::now();
        ConnectionGuard(self.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state().open
    }

    /// How long no connection has been open; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        let s = self.state();
        (s.open == 0).then(|| s.idle_since.elapsed())
    }

    /// How long ago the last connection was accepted (or the tracker made), open or not.
    pub fn since_last_accept(&self) -> Duration {
        self.state().last_accept.elapsed()
    }

    /// Blocks until no connection is open (true) or `timeout` passes (false).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state();
        while s.open > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .0
                .1
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// One open connection in a [`Tracker`]'s count; dropping it closes the count.
#[derive(Debug)]
pub struct ConnectionGuard(Tracker);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.open -= 1;
        if s.open == 0 {
            s.idle_since = Instant::now();
            self.0.0.1.notify_all();
        }
    }
}

/// A connection counted as open until it is dropped (a keep-alive HTTP connection counts until
/// it closes). Reads and writes go to the inner stream; `Deref` reaches it too.
#[derive(Debug)]
pub struct Tracked<S> {
    stream: S,
    guard: ConnectionGuard,
}

impl<S> Tracked<S> {
    /// Wraps `stream`, counted by `guard`.
    pub fn new(stream: S, guard: ConnectionGuard) -> Self {
        Tracked { stream, guard }
    }

    /// The stream and its guard; the connection counts as open until the guard drops.
    pub fn into_parts(self) -> (S, ConnectionGuard) {
        (self.stream, self.guard)
    }
}

impl<S> std::ops::Deref for Tracked<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.stream
    }
}

impl<S> std::ops::DerefMut for Tracked<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

impl<S: Read> Read for Tracked<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl<S: Write> Write for Tracked<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// When to stop.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long with no connection open; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// After SIGTERM/SIGINT, how long open connections may finish.
    pub shutdown_grace: Duration,
    /// Send `sd_notify` `READY=1`/`STOPPING=1` (only ever when `NOTIFY_SOCKET` is set).
    pub notify: bool,
    /// HTTP only (`tokio::serve_http`): close a keep-alive connection after this long without
    /// a byte in either direction, between requests only (never one with a request in
    /// progress), so a forgotten keep-alive connection cannot hold off the idle exit for ever.
    /// `None`: keep it open until the client closes it.
    pub http_keep_alive_timeout: Option<Duration>,
    /// **Test only, wrong on purpose:** decide "idle" from the time since the last *accept*,
    /// ignoring connections still open, and return while they are. Exists so the tests can
    /// show the requests this loses. Never set it in a real server.
    #[doc(hidden)]
    pub naive_idle_exit: bool,
    /// **Test only:** after an idle stop (listeners already closed), wait this long before
    /// returning, to widen the window in which clients arrive while the process is stopping.
    #[doc(hidden)]
    pub test_stop_delay: Option<Duration>,
}

impl Default for Options {
    /// No idle exit, 5 s shutdown grace, `sd_notify` on, 60 s HTTP keep-alive timeout.
    fn default() -> Self {
        Options {
            idle_timeout: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            notify: true,
            http_keep_alive_timeout: Some(DEFAULT_HTTP_KEEP_ALIVE_TIMEOUT),
            naive_idle_exit: false,
            test_stop_delay: None,
        }
    }
}

impl Options {
    /// Options from the environment: `ACTIVATION_IDLE_TIMEOUT` (`200ms`, `8s`; `0` = never;
    /// default 8 s when [`Sockets::relaunched`], else never), `ACTIVATION_SHUTDOWN_GRACE`
    /// (default 5 s) and `ACTIVATION_KEEP_ALIVE_TIMEOUT` (default 60 s, `0` = never). A value that does not parse is logged and the default used.
    pub fn from_env(sockets: &Sockets) -> Options {
        let read = |var: &str| {
            std::env::var(var).ok().and_then(|v| {
                humantime::parse_duration(v.trim())
                    .or_else(|_| {
                        v.trim()
                            .parse::<u64>()
                            .map(Duration::from_secs)
                            .map_err(|_| ())
                    })
                    .map_err(|_| log::warn!("{var}={v:?} is not a duration, ignored"))
                    .ok()
            })
        };
        let idle_timeout = match read(IDLE_TIMEOUT_VAR) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => sockets.relaunched().then_some(DEFAULT_IDLE_TIMEOUT),
        };
        Options {
            idle_timeout,
            shutdown_grace: read(SHUTDOWN_GRACE_VAR).unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            notify: true,
            http_keep_alive_timeout: match read(KEEP_ALIVE_TIMEOUT_VAR) {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => Some(DEFAULT_HTTP_KEEP_ALIVE_TIMEOUT),
            },
            naive_idle_exit: std::env::var(NAIVE_IDLE_EXIT_VAR).is_ok_and(|v| v == "1"),
            test_stop_delay: read(STOP_DELAY_VAR),
        }
    }

    /// How long to wait before looking again, or `None` if it is time to stop (idle).
    fn idle_check(&self, tracker: &Tracker) -> Result<Option<Duration>, ()> {
        let Some(timeout) = self.idle_timeout else {
            return Ok(None);
        };
        let idle = if self.naive_idle_exit {
            Some(tracker.since_last_accept())
        } else {
            tracker.idle_for()
        };
        match idle {
            Some(d) if d >= timeout => Err(()),
            Some(d) => Ok(Some(timeout - d)),
            // Connections are open: look again a timeout later (they may close meanwhile).
            None => Ok(Some(timeout)),
        }
    }
}

/// Why accepting stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The idle timeout passed with no connection open.
    Idle,
    /// SIGTERM/SIGINT; `drained`: every open connection finished within the grace period.
    Signalled {
        /// All connections finished in time.
        drained: bool,
    },
}

impl Stopped {
    /// The exit code for it: 0 (an idle exit and a drain are both clean ends).
    pub fn exit_code(self) -> i32 {
        0
    }
}

/// Accepts on several stream listeners from one thread (poll(2)), counts connections, stops on
/// idle or SIGTERM/SIGINT. Hand each connection to a thread or a pool.
///
/// The idle decision and every `accept(2)` happen on the thread calling [`Acceptor::accept`],
/// so once it decides to stop, no connection is accepted: clients arriving then stay queued in
/// the listening socket, which the launcher still holds.
#[derive(Debug)]
pub struct Acceptor {
    listeners: Vec<Listener>,
    tracker: Tracker,
    options: Options,
    signals: UnixStream,
    sig_ids: Vec<signal_hook::SigId>,
    next: usize,
    stopped: Option<Stopped>,
    ready_sent: bool,
}

impl Acceptor {
    /// Sets the listeners non-blocking and catches SIGTERM and SIGINT.
    pub fn new(listeners: Vec<Listener>, options: Options) -> io::Result<Acceptor> {
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut sig_ids = Vec::new();
        for sig in [libc::SIGTERM, libc::SIGINT] {
            sig_ids.push(signal_hook::low_level::pipe::register(
                sig,
                write.try_clone()?,
            )?);
        }
        Ok(Acceptor {
            listeners,
            tracker: Tracker::new(),
            options,
            signals: read,
            sig_ids,
            next: 0,
            stopped: None,
            ready_sent: false,
        })
    }

    /// The connection count (to share with workers, or to look at).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    fn stop(&mut self, why: Stopped) {
        if self.stopped.is_none() {
            announce_stop(&why, self.options.notify);
            self.stopped = Some(why);
            // Our copies only: the launcher's copies keep their queues.
            self.listeners.clear();
        }
    }

    /// The next connection, counted as open until dropped; `None` once it is time to stop
    /// (idle timeout with none open, or SIGTERM/SIGINT). Blocks until then.
    pub fn accept(&mut self) -> Option<Tracked<Stream>> {
        if !self.ready_sent {
            self.ready_sent = true;
            if self.options.notify {
                notify::ready();
            }
        }
        loop {
            if self.stopped.is_some() {
                return None;
            }
            let wait = match self.options.idle_check(&self.tracker) {
                Ok(w) => w,
                Err(()) => {
                    self.stop(Stopped::Idle);
                    return None;
                }
            };
            let mut fds: Vec<libc::pollfd> = self
                .listeners
                .iter()
                .map(|l| l.as_fd().as_raw_fd())
                .chain([self.signals.as_raw_fd()])
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = wait.map_or(-1, |w| w.as_millis().clamp(1, i32::MAX as u128) as i32);
            // SAFETY: `fds` is a valid array of that many pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds.last().is_some_and(|p| p.revents != 0) {
                self.stop(Stopped::Signalled { drained: false });
                return None;
            }
            let count = self.listeners.len();
            for k in 0..count {
                let i = (self.next + k) % count;
                if fds[i].revents == 0 {
                    continue;
                }
                match self.listeners[i].accept() {
                    Ok(stream) => {
                        self.next = i + 1;
                        // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure.
                        let _ = stream.set_nonblocking(false);
                        return Some(Tracked::new(stream, self.tracker.track()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e)
                        if e.raw_os_error() == Some(libc::EMFILE)
                            || e.raw_os_error() == Some(libc::ENFILE) =>
                    {
                        log::warn!("accept: {e}; waiting");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => log::debug!("accept: {e}"),
                }
            }
        }
    }

    /// After [`Acceptor::accept`] returned `None`: on a signal, waits up to
    /// [`Options::shutdown_grace`] for open connections to finish. Returns why it stopped.
    pub fn finish(mut self) -> Stopped {
        let why = self.stopped.unwrap_or(Stopped::Idle);
        self.stop(why);
        match why {
            Stopped::Idle => {
                if let Some(d) = self.options.test_stop_delay {
                    std::thread::sleep(d);
                }
                Stopped::Idle
            }
            Stopped::Signalled { .. } => Stopped::Signalled {
                drained: self.tracker.wait_closed(self.options.shutdown_grace),
            },
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        for id in self.sig_ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// One log line when an acceptor stops accepting, and `STOPPING=1` when asked (both the std
/// and the tokio acceptor).
pub(crate) fn announce_stop(why: &Stopped, notify: bool) {
    let word = match why {
        Stopped::Idle => "idle",
        Stopped::Signalled { .. } => "signalled",
    };
    log::info!("{word}: not accepting any more");
    if notify {
        notify::stopping();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_kinds() {
        let mut s = Sockets {
            slots: vec![
                Slot {
                    name: "web".into(),
                    number: 3,
                    kind: SocketKind::TcpListener,
                    fd: Some(TcpListener::bind("127.0.0.1:0").unwrap().into()),
                },
                Slot {
                    name: "dns".into(),
                    number: 4,
                    kind: SocketKind::UdpSocket,
                    fd: Some(UdpSocket::bind("127.0.0.1:0").unwrap().into()),
                },
            ],
            origin: Origin::Launcher { pid_is_ours: true },
            created_paths: vec![],
        };
        assert!(s.relaunched());
        assert_eq!(s.names(), ["web", "dns"]);
        let e = s.take_listener("dns").unwrap_err();
        assert!(e.to_string().contains("fd 4"), "{e}");
        assert!(s.take_udp(1).is_ok());
        assert!(matches!(s.take_udp("dns"), Err(Error::NotFound { .. })));
        assert!(s.take_listeners().unwrap().len() == 1);
        assert!(s.names().is_empty());
    }

    #[test]
    fn tracker_counts_and_idles() {
        let t = Tracker::new();
        let g = t.track();
        assert_eq!(t.open(), 1);
        assert_eq!(t.idle_for(), None);
        assert!(!t.wait_closed(Duration::from_millis(10)));
        drop(g);
        assert!(t.idle_for().is_some());
        assert!(t.wait_closed(Duration::ZERO));
    }
}
