//! The command line of `small-services` (flags, their environment variables, `--help`) and its exit codes.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::bind::ListenSpec;
use crate::protocols::Protocol;

/// Exit codes of `small-services`.
pub mod exit {
    /// Clean end: idle exit, drained after SIGTERM/SIGINT, inetd connection done.
    pub const OK: u8 = 0;
    /// Any other runtime failure (event loop, signal setup, ...).
    pub const FAILURE: u8 = 1;
    /// Usage error: bad flag or value (clap), unreadable `--quote-file`, nothing to serve.
    pub const USAGE: u8 = 2;
    /// Inherited fds invalid: `LISTEN_*` unparsable, `LISTEN_FDS` beyond `RLIMIT_NOFILE`, fd
    /// closed, not a socket, a socket of a kind we cannot serve, or a name that is no protocol
    /// and no `--protocol` given.
    pub const BAD_INHERITED_FDS: u8 = 3;
    /// Cannot bind a `--listen` address.
    pub const CANNOT_BIND: u8 = 4;
}

const AFTER_HELP: &str = "\
Where the sockets come from (first match wins):
  1. --inetd PROTO: one connection on stdin/stdout (a socket, or a pipe pair), served, then exit.
     If stdin is instead a listening or datagram socket, it is served like case 4.
  2. Sockets passed by a launcher (systemd, systemd-socket-activate, systemfd, superserver):
     LISTEN_FDS=N     fds 3..3+N are ours; N beyond RLIMIT_NOFILE is refused (exit 3)
     LISTEN_PID=PID   must be our pid, else the variables are ignored (as if unset);
                      missing or empty is accepted (systemfd --no-pid)
     LISTEN_FDNAMES=a:b:...  one name per fd; the name picks the protocol (echo, discard,
                      chargen, daytime, time, qotd, optionally with .socket); any other name
                      (unknown, connection, ...) uses --protocol, else the port of a listening
                      IP socket: 7 echo, 9 discard, 13 daytime, 17 qotd, 19 chargen, 37 time,
                      or those plus 7000 (so `systemfd -s tcp::7013` serves daytime)
     LISTEN_PIDFDID   checked when set (systemd 259+)
     Accepted: TCP and unix stream listeners, UDP sockets, and a connected stream socket
     (systemd Accept=yes, LISTEN_FDNAMES=connection): that one is served, then exit.
     All passed fds become close-on-exec and the LISTEN_* variables are removed.
  3. --listen / SMALL_SERVICES_LISTEN: bind ourselves.
  4. stdin is a listening TCP/unix socket or a UDP socket (inetd/xinetd `wait` services):
     serve it with --protocol.
  Otherwise: usage error.

Idle exit: after --idle-timeout with no connection open and none new (UDP: no datagram), stop
polling the listeners first, then exit 0. Connections that arrive meanwhile stay in the kernel
queue for the next activation; a passed socket is never shut down or unlinked.
Exiting only saves something if the next client starts us again, so the default depends on
who started us (the startup line `idle exit: ...` says which applies):
  8s     LISTEN_PID is our pid (systemd, the superserver re-arm the socket), or a listening
         socket on stdin (inetd/xinetd `wait`)
  never  LISTEN_PID unset (systemfd --no-pid: nobody re-arms, an exit ends the dev loop),
         sockets bound with --listen, or one connection (--inetd, Accept=yes)
  An explicit --idle-timeout always wins. systemd-socket-activate sets LISTEN_PID but starts
  us only once: give it --idle-timeout 0 to keep serving.
SIGTERM/SIGINT: stop accepting, let open connections finish for --shutdown-grace, exit 0
(a second signal exits at once). With NOTIFY_SOCKET set, sends READY=1 and STOPPING=1.

Logging: one line per connection on stderr; level from RUST_LOG (default info); no timestamps
when JOURNAL_STREAM is set; nothing when stderr is the client's socket (inetd).

Exit codes:
  0  clean: idle exit, drained after SIGTERM/SIGINT, inetd connection done
  1  other runtime failure
  2  usage error (bad flag or value, unreadable --quote-file, nothing to serve)
  3  inherited fds invalid (bad LISTEN_* value, LISTEN_FDS more than RLIMIT_NOFILE allows,
     fd closed / not a socket / unsupported kind, name that is no protocol without
     --protocol); the message names the variable, or the fd number and name
  4  cannot bind a --listen address";

/// Raw command line, as clap parses it.
#[derive(Debug, Parser)]
#[command(
    name = "small-services",
    version,
    about = "The classic small services (echo, discard, chargen, daytime, time, qotd), socket-activatable",
    long_about = "The classic small services (RFC 862-868: echo, discard, chargen, daytime, time, qotd) \
over TCP, UDP and unix sockets, in one single-threaded event loop. Takes its sockets from systemd, \
systemd-socket-activate, systemfd, inetd or the superserver, or binds them itself.",
    after_long_help = AFTER_HELP,
    after_help = "Run with --help for the fd protocol, inetd modes and exit codes."
)]
pub struct Args {
    /// Bind NAME=ADDRESS when no socket is passed in (repeatable). ADDRESS is tcp://IP:PORT,
    /// udp://IP:PORT, unix:/PATH or bare IP:PORT (TCP); IPv6 as [::1]:PORT; IP literals only.
    /// NAME picks the protocol. The variable holds a comma-separated list.
    #[arg(
        long,
        value_name = "NAME=ADDRESS",
        env = "SMALL_SERVICES_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<ListenSpec>,

    /// Protocol for sockets whose name is not a protocol name (`unknown`, `connection`, stdin).
    #[arg(long, value_name = "PROTO", env = "SMALL_SERVICES_PROTOCOL")]
    pub protocol: Option<Protocol>,

    /// Serve one connection on stdin/stdout with PROTO, then exit (inetd `nowait`, systemd
    /// Accept=yes with StandardInput=socket, systemd-socket-activate --inetd).
    #[arg(long, value_name = "PROTO")]
    pub inetd: Option<Protocol>,

    /// Exit 0 after this long without connections or datagrams; 0 = never. Default: 8s when
    /// a launcher will start us again (LISTEN_PID is our pid, or a listening socket on stdin),
    /// else never (no LISTEN_PID, e.g. systemfd --no-pid; or sockets bound ourselves). Seconds
    /// or 500ms, 1m, ...
    #[arg(long, value_name = "DURATION", env = "SMALL_SERVICES_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Close a connection that makes no progress (reads or writes nothing) for this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", env = "SMALL_SERVICES_CONNECTION_TIMEOUT", value_parser = parse_duration)]
    pub connection_timeout: Duration,

    /// Most connections open at once; beyond that new clients wait in the kernel backlog.
    #[arg(long, value_name = "N", default_value_t = 16384, env = "SMALL_SERVICES_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// After SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "5s", env = "SMALL_SERVICES_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Every TCP connection starts with a PROXY protocol header (v1, v2 or any) from a load
    /// balancer in --proxy-from: the logs show the client it names. A connection from
    /// another address, a malformed header or none within --proxy-timeout is closed unserved.
    #[arg(
        long,
        value_name = "VERSION",
        env = "SMALL_SERVICES_PROXY_PROTOCOL",
        requires = "proxy_from"
    )]
    pub proxy_protocol: Option<crate::proxy::Version>,

    /// The load balancers trusted to send the PROXY header: IP or CIDR (repeatable; the
    /// variable holds a comma-separated list).
    #[arg(
        long,
        value_name = "CIDR",
        env = "SMALL_SERVICES_PROXY_FROM",
        value_delimiter = ',',
        requires = "proxy_protocol"
    )]
    pub proxy_from: Vec<crate::proxy::Trusted>,

    /// How long a balancer has to send the whole PROXY header.
    #[arg(long, value_name = "DURATION", default_value = "3s", env = "SMALL_SERVICES_PROXY_TIMEOUT", value_parser = parse_duration)]
    pub proxy_timeout: Duration,

    /// Quotes for qotd, separated by blank lines, each under 512 bytes (default: built in).
    #[arg(long, value_name = "PATH", env = "SMALL_SERVICES_QUOTE_FILE")]
    pub quote_file: Option<PathBuf>,
}

/// A duration: plain seconds (`8`, `0`) or humantime (`500ms`, `1m 30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (try 8s, 500ms, 1m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }
}
