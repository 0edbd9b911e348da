//! What the `small-services` binary does between parsing flags and exiting: pick where the sockets come from, map each to a protocol, run the loop, and map failures to exit codes.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::activation::{self, ActivationError, InheritedSocket, Passed, SocketKind};
use crate::bind::{self, BindError};
use crate::cli::{Args, exit};
use crate::protocols::{Protocol, Quotes};
use crate::server::{self, Connection, Listener, Outcome};

/// Default `--idle-timeout` when a launcher that starts us again is evident (see [`Relaunch`]).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(8);

/// Whether someone will start us again after an idle exit, which decides the default
/// `--idle-timeout`: exiting when idle is only a saving if the next client brings us back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relaunch {
    /// `LISTEN_PID` is our pid (systemd, the superserver): the launcher started this very
    /// process for its sockets, keeps them, and starts us again on the next client.
    ListenPidIsOurs,
    /// A listening or UDP socket on stdin: inetd/xinetd `wait` re-arms it when we exit.
    InetdWait,
    /// Sockets passed without `LISTEN_PID` (`systemfd --no-pid`): nothing says anyone re-arms
    /// them, and systemfd does not; an idle exit would end a development loop.
    Unknown,
    /// We bound the sockets ourselves: nobody holds them after we exit.
    Nobody,
}

impl Relaunch {
    /// The idle timeout when `--idle-timeout` is not given.
    pub fn default_idle_timeout(self) -> Option<Duration> {
        match self {
            Relaunch::ListenPidIsOurs | Relaunch::InetdWait => Some(DEFAULT_IDLE_TIMEOUT),
            Relaunch::Unknown | Relaunch::Nobody => None,
        }
    }

    /// Why, for the startup log line.
    pub fn reason(self) -> &'static str {
        match self {
            Relaunch::ListenPidIsOurs => "LISTEN_PID is ours: the launcher starts us again",
            Relaunch::InetdWait => "listening socket on stdin: inetd starts us again",
            Relaunch::Unknown => {
                "LISTEN_PID not set (systemfd --no-pid): nobody is known to start us again"
            }
            Relaunch::Nobody => "we bound the sockets ourselves",
        }
    }
}

/// The idle timeout in effect, and the startup log text that says it and why: an explicit
/// `--idle-timeout` (0 = never) always wins over the default of `relaunch`.
pub fn idle_timeout(explicit: Option<Duration>, relaunch: Relaunch) -> (Option<Duration>, String) {
    let (timeout, why) = match explicit {
        Some(t) => (Some(t), "--idle-timeout".to_owned()),
        None => (
            relaunch.default_idle_timeout(),
            format!("default: {}", relaunch.reason()),
        ),
    };
    let timeout = timeout.filter(|d| !d.is_zero());
    let shown = match timeout {
        Some(t) => humantime::format_duration(t).to_string(),
        None => "never".to_owned(),
    };
    (timeout, format!("idle exit: {shown} ({why})"))
}

/// Why the binary stops with a non-zero exit code.
#[derive(Debug)]
pub enum AppError {
    /// Exit 2.
    Usage(String),
    /// Exit 3.
    Activation(ActivationError),
    /// Exit 3: a socket whose name is not a protocol, and no `--protocol`.
    NoProtocol { number: i32, name: String },
    /// Exit 4.
    Bind(BindError),
    /// Exit 1.
    Runtime {
        context: &'static str,
        source: io::Error,
    },
}

impl AppError {
    /// The exit code documented in `--help` and the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Usage(_) => exit::USAGE,
            AppError::Activation(_) | AppError::NoProtocol { .. } => exit::BAD_INHERITED_FDS,
            AppError::Bind(_) => exit::CANNOT_BIND,
            AppError::Runtime { .. } => exit::FAILURE,
        }
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppError::Usage(m) => f.write_str(m),
            AppError::Activation(e) => e.fmt(f),
            AppError::NoProtocol { number, name } => write!(
                f,
                "fd {number} (name {name:?}): the name is not a protocol ({}) and no --protocol was given",
                Protocol::ALL.map(Protocol::name).join(", ")
            ),
            AppError::Bind(e) => e.fmt(f),
            AppError::Runtime { context, .. } => f.write_str(context),
        }
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AppError::Activation(e) => e.source(),
            AppError::Bind(e) => Some(&e.source),
            AppError::Runtime { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether stderr is the client's socket (inetd dup2s the connection onto 0, 1 and 2): then
/// nothing must be written to it.
pub fn stderr_is_client() -> bool {
    let stdin = io::stdin();
    let stderr = io::stderr();
    matches!(activation::classify(stdin.as_fd()), Ok(Some(_)))
        && activation::same_file(stdin.as_fd(), stderr.as_fd())
}

/// env_logger on stderr, one line per event in the superserver's format, level from
/// `RUST_LOG` (default info): `2026-12-05T16:40:01.123Z INFO  message`, or under journald
/// (`JOURNAL_STREAM`) `<6>message` with the syslog priority so journald keeps the level. Off
/// when stderr is the client's socket.
pub fn init_logging(quiet: bool) {
    use std::io::Write;
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    } else {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        });
    }
    if quiet {
        builder.filter_level(log::LevelFilter::Off);
    }
    builder.init();
}

/// Serves until a clean end (exit 0) or fails with an [`AppError`].
/// `inherited` is the result of [`activation::take_from_env`], taken first thing in `main`.
pub fn run(args: Args, inherited: Result<Passed, ActivationError>) -> Result<Outcome, AppError> {
    let quotes = match &args.quote_file {
        Some(path) => Quotes::from_file(path)
            .map_err(|e| AppError::Usage(format!("--quote-file {}: {e}", path.display())))?,
        None => Quotes::default(),
    };
    let stdin_kind = activation::classify(io::stdin().as_fd()).ok().flatten();
    let stdin_serves_as_listener = matches!(
        stdin_kind,
        Some(SocketKind::TcpListener | SocketKind::UnixListener | SocketKind::UdpSocket)
    );

    let (listeners, connections, relaunch) = if let Some(protocol) = args.inetd {
        if stdin_serves_as_listener {
            (vec![stdin_listener(protocol)?], vec![], Relaunch::InetdWait)
        } else {
            // No listener: the loop ends with the connection, the idle timeout plays no part.
            (vec![], vec![stdio_connection(protocol)?], Relaunch::Nobody)
        }
    } else {
        let passed = inherited.map_err(AppError::Activation)?;
        if !passed.sockets.is_empty() {
            if !args.listen.is_empty() {
                log::info!("sockets were passed in: ignoring --listen/SMALL_SERVICES_LISTEN");
            }
            let (l, c) = from_inherited(passed.sockets, args.protocol)?;
            let relaunch = if passed.pid_is_ours {
                Relaunch::ListenPidIsOurs
            } else {
                Relaunch::Unknown
            };
            (l, c, relaunch)
        } else if !args.listen.is_empty() {
            (bound(&args)?, vec![], Relaunch::Nobody)
        } else if stdin_serves_as_listener {
            let protocol = args.protocol.ok_or(AppError::NoProtocol {
                number: 0,
                name: "stdin".to_owned(),
            })?;
            (vec![stdin_listener(protocol)?], vec![], Relaunch::InetdWait)
        } else {
            return Err(AppError::Usage(
                "nothing to serve: no sockets passed in (LISTEN_FDS), no --listen, no --inetd, and stdin is not a \
                 listening socket (see --help)"
                    .to_owned(),
            ));
        }
    };

    let fd_limit = server::raise_fd_limit().unwrap_or_else(|e| {
        log::warn!("cannot raise RLIMIT_NOFILE: {e}");
        1024
    });
    let mut max_connections = args.max_connections as usize;
    // Each connection needs one fd (two on stdin/stdout); keep some for listeners and logs.
    let usable = (fd_limit as usize)
        .saturating_sub(listeners.len() + 16)
        .max(1);
    if max_connections > usable {
        log::warn!(
            "--max-connections {max_connections} exceeds the fd limit {fd_limit}: using {usable}"
        );
        max_connections = usable;
    }
    let proxy = args.proxy_protocol.map(|version| crate::proxy::Rules {
        version,
        from: args.proxy_from.iter().map(|t| t.0).collect(),
        timeout: args.proxy_timeout,
    });
    if let Some(p) = &proxy {
        if !connections.is_empty() {
            return Err(AppError::Usage(
                "--proxy-protocol applies to the connections small-services accepts, not to one                  handed over on stdin or fd 3 (for a nowait service, give the superserver's                  service proxy_protocol and proxy_from instead)"
                    .into(),
            ));
        }
        log::info!(
            "PROXY protocol {} from {}: every TCP connection must start with its header",
            p.version,
            args.proxy_from
                .iter()
                .map(|t| t.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (idle_timeout, idle_line) = idle_timeout(args.idle_timeout, relaunch);
    if !listeners.is_empty() {
        log::info!("{idle_line}");
    }
    let config = server::Config {
        idle_timeout,
        connection_timeout: args.connection_timeout,
        max_connections,
        shutdown_grace: args.shutdown_grace,
        quotes,
        proxy,
    };
    let outcome =
        server::run(listeners, connections, config).map_err(|source| AppError::Runtime {
            context: "event loop",
            source,
        })?;
    log::debug!("exit: {outcome:?}");
    Ok(outcome)
}

fn protocol_for(number: i32, name: &str, fallback: Option<Protocol>) -> Result<Protocol, AppError> {
    protocol_or_port(number, name, fallback, None)
}

/// The protocol of a socket: its name, else `--protocol`, else (for an IP socket) its port
/// (see [`Protocol::from_port`]), else an error naming the fd.
fn protocol_or_port(
    number: i32,
    name: &str,
    fallback: Option<Protocol>,
    port: Option<u16>,
) -> Result<Protocol, AppError> {
    Protocol::from_fd_name(name)
        .or(fallback)
        .or_else(|| {
            let by_port = port.and_then(Protocol::from_port);
            if let (Some(p), Some(port)) = (by_port, port) {
                log::info!("fd {number} (name {name:?}): no protocol name; port {port} means {p}");
            }
            by_port
        })
        .ok_or_else(|| AppError::NoProtocol {
            number,
            name: name.to_owned(),
        })
}

fn from_inherited(
    inherited: Vec<InheritedSocket>,
    fallback: Option<Protocol>,
) -> Result<(Vec<Listener>, Vec<Connection>), AppError> {
    let mut listeners = Vec::new();
    let mut connections = Vec::new();
    for s in inherited {
        let port = s.local_addr().and_then(|a| a.as_socket()).map(|a| a.port());
        let port = if s.kind == SocketKind::ConnectedStream {
            None
        } else {
            port
        };
        let protocol = protocol_or_port(s.number, &s.name, fallback, port)?;
        match s.kind {
            SocketKind::TcpListener | SocketKind::UnixListener | SocketKind::UdpSocket => {
                let describe = format!(
                    "{} {} (fd {}, name {:?})",
                    if s.kind == SocketKind::UdpSocket {
                        "udp"
                    } else {
                        "stream"
                    },
                    server::describe_local(&s.fd),
                    s.number,
                    s.name
                );
                listeners.push(Listener {
                    name: s.name,
                    protocol,
                    datagram: s.kind == SocketKind::UdpSocket,
                    fd: s.fd,
                    describe,
                    unlink_on_stop: None,
                });
            }
            SocketKind::ConnectedStream => {
                let peer = peer_of(s.fd.as_fd());
                log::debug!("fd {} ({}): one connection from {peer}", s.number, s.name);
                set_nonblocking(s.fd.as_fd())?;
                connections.push(Connection {
                    name: s.name,
                    protocol,
                    read: s.fd,
                    write: None,
                    peer,
                });
            }
            SocketKind::UnixDatagram | SocketKind::Other => {
                return Err(AppError::Activation(s.wrong_kind(
                    "a TCP/unix stream listener, a UDP socket or a connected stream socket",
                )));
            }
        }
    }
    Ok((listeners, connections))
}

fn bound(args: &Args) -> Result<Vec<Listener>, AppError> {
    for spec in &args.listen {
        // Check names before binding anything.
        protocol_for(-1, &spec.name, args.protocol).map_err(|_| {
            AppError::Usage(format!(
                "--listen {spec}: {:?} is not a protocol name ({}) and no --protocol was given",
                spec.name,
                Protocol::ALL.map(Protocol::name).join(", ")
            ))
        })?;
    }
    let bound = bind::bind_all(&args.listen).map_err(AppError::Bind)?;
    bound
        .into_iter()
        .map(|b| {
            Ok(Listener {
                protocol: protocol_for(-1, &b.name, args.protocol)?,
                datagram: b.kind == SocketKind::UdpSocket,
                describe: b.local,
                name: b.name,
                fd: b.fd,
                unlink_on_stop: b.created_path,
            })
        })
        .collect()
}

/// Takes fd 0 (a listening or UDP socket: inetd/xinetd `wait`) as a listener.
fn stdin_listener(protocol: Protocol) -> Result<Listener, AppError> {
    let fd = take_stdio(0)?;
    let kind = activation::classify(fd.as_fd()).ok().flatten();
    let describe = format!(
        "{} {} (stdin)",
        if kind == Some(SocketKind::UdpSocket) {
            "udp"
        } else {
            "stream"
        },
        server::describe_local(&fd)
    );
    Ok(Listener {
        name: "stdin".to_owned(),
        protocol,
        datagram: kind == Some(SocketKind::UdpSocket),
        fd,
        describe,
        unlink_on_stop: None,
    })
}

/// One connection on stdin (read) and stdout (write): a socket, or a pipe pair.
fn stdio_connection(protocol: Protocol) -> Result<Connection, AppError> {
    let read = take_stdio(0)?;
    let write = take_stdio(1)?;
    let peer = peer_of(read.as_fd());
    set_nonblocking(read.as_fd())?;
    set_nonblocking(write.as_fd())?;
    Ok(Connection {
        name: "inetd".to_owned(),
        protocol,
        read,
        write: Some(write),
        peer,
    })
}

/// Takes over fd 0 or 1: returns our own (close-on-exec) duplicate and points the standard
/// fd at /dev/null, so that closing our copy really ends the connection for a pipe peer and
/// the standard fd number is never free for something else.
fn take_stdio(number: RawFd) -> Result<OwnedFd, AppError> {
    let runtime = |context| move |source| AppError::Runtime { context, source };
    // SAFETY: 0 and 1 stay open for the whole life of the process: below they are only ever
    // replaced atomically by dup2, never closed.
    let original = unsafe { BorrowedFd::borrow_raw(number) };
    let ours = original
        .try_clone_to_owned()
        .map_err(runtime("dup stdin/stdout"))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(runtime("open /dev/null"))?;
    // SAFETY: dup2 with two valid fds; it replaces `number` atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), number) } < 0 {
        return Err(runtime("dup2 /dev/null")(io::Error::last_os_error()));
    }
    Ok(ours)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), AppError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| AppError::Runtime {
        context: "fcntl",
        source: e.into(),
    })?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| AppError::Runtime {
        context: "fcntl",
        source: e.into(),
    })?;
    Ok(())
}

fn peer_of(fd: BorrowedFd<'_>) -> String {
    if !matches!(activation::classify(fd), Ok(Some(_))) {
        return "stdin".to_owned();
    }
    match socket2::SockRef::from(&fd).peer_addr() {
        Ok(a) => match a.as_socket() {
            Some(sa) => sa.to_string(),
            None => a
                .as_pathname()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "unix".to_owned()),
        },
        Err(_) => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_default_needs_a_launcher_that_starts_us_again() {
        let eight = Some(DEFAULT_IDLE_TIMEOUT);
        assert_eq!(idle_timeout(None, Relaunch::ListenPidIsOurs).0, eight);
        assert_eq!(idle_timeout(None, Relaunch::InetdWait).0, eight);
        let (t, line) = idle_timeout(None, Relaunch::Unknown);
        assert_eq!(t, None);
        assert!(line.starts_with("idle exit: never (default:"), "{line}");
        assert_eq!(idle_timeout(None, Relaunch::Nobody).0, None);
        // Explicit wins either way; 0 means never.
        let two = Duration::from_secs(2);
        let (t, line) = idle_timeout(Some(two), Relaunch::Unknown);
        assert_eq!(
            (t, line.as_str()),
            (Some(two), "idle exit: 2s (--idle-timeout)")
        );
        assert_eq!(
            idle_timeout(Some(Duration::ZERO), Relaunch::ListenPidIsOurs).0,
            None
        );
    }
}
