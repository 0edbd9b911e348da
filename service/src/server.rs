//! The single-threaded mio event loop: accept, serve each connection as a small state machine, time out, idle-exit and drain.
//!
//! What it guarantees:
//! * **Bounded:** at most `max_connections` open connections. At the cap the stream listeners
//!   are deregistered, so new clients wait in the kernel backlog, and re-registered when a slot
//!   frees.
//! * **No slot held forever:** a connection that neither reads nor writes a byte for
//!   `connection_timeout` is closed. Deadlines live in a heap keyed by the time a connection was
//!   last checked; activity only stamps the connection, and the loop sleeps until the earliest
//!   deadline (no periodic ticking while idle).
//! * **Fair:** each wake-up serves a bounded amount per connection/listener, then yields to the
//!   others; per-connection memory is a few hundred bytes plus only the unsent part of a reply.
//! * **Idle exit without losing clients:** when `idle_timeout` passes with no connection open
//!   and none accepted (no datagram for UDP), the listeners are deregistered *first*, then
//!   `STOPPING=1` is sent and the loop returns. Nothing is accepted after that decision, so a
//!   client that connects meanwhile stays in the kernel queue of the (shared) listening socket
//!   for the next activation. Passed sockets are never `shutdown(2)` or unlinked.
//! * **SIGTERM/SIGINT:** the same stop, then open connections get `shutdown_grace` to finish; a
//!   second signal ends at once.
//! * **No datagram loops:** a UDP datagram whose source port is one of our own UDP sockets'
//!   ports, a small-service port (7, 9, 13, 17, 19, 37 and those plus 7000) or 0 is dropped
//!   unanswered (counted, logged at debug at most once a second). Otherwise one spoofed
//!   datagram makes two echo (or echo and chargen) sockets answer each other forever, here or
//!   between hosts; BSD inetd's `check_loop` drops the same for its internal services.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::protocols::{self, Protocol, Quotes};
use crate::proxy;

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Exit after this long without connections or datagrams; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Close a connection after this long without progress.
    pub connection_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time open connections get after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// What qotd says.
    pub quotes: Quotes,
    /// Stream connections start with a PROXY protocol header from these balancers.
    pub proxy: Option<proxy::Rules>,
}

/// A socket clients arrive on.
#[derive(Debug)]
pub struct Listener {
    /// The socket's name (fd name or `--listen` name), for logs.
    pub name: String,
    pub protocol: Protocol,
    pub fd: OwnedFd,
    /// Stream listener (accept) or datagram socket (recv).
    pub datagram: bool,
    /// Where it listens and which fd it came from, for logs.
    pub describe: String,
    /// A unix socket file we created and remove when we stop; never set for passed sockets.
    pub unlink_on_stop: Option<PathBuf>,
}

/// One connection that exists before the loop starts (inetd stdin/stdout, `Accept=yes` fd 3).
#[derive(Debug)]
pub struct Connection {
    pub name: String,
    pub protocol: Protocol,
    /// Where bytes come from and go to: one socket, or two fds (stdin, stdout).
    pub read: OwnedFd,
    pub write: Option<OwnedFd>,
    /// Who the client is, for logs.
    pub peer: String,
}

/// Why [`run`] returned (all are clean ends: exit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Idle timeout passed.
    Idle,
    /// SIGTERM/SIGINT, connections drained (or the grace period ended).
    Signalled,
    /// There were no listeners and the given connections are done.
    ConnectionsDone,
}

const SIGNAL_TOKEN: Token = Token(usize::MAX);
/// Connection tokens start here; listener tokens are their index.
const CONN_BASE: usize = 1 << 32;
/// Bytes read or written per call (one shared buffer).
const SCRATCH: usize = 64 * 1024;
/// Most bytes read per call: bounds what an echo client that does not read can make us hold.
const READ_CHUNK: usize = 16 * 1024;
/// Calls per connection/listener per wake-up before yielding to others.
const BUDGET: usize = 16;
/// After EMFILE/ENFILE, wait this long before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// `SO_SNDBUF` of a chargen connection. chargen always has more to send, so a client that does
/// not read fills whatever send buffer it has: with the kernel's autotuning that is up to
/// `tcp_wmem` max (4 MiB by default) of kernel memory per connection, 64 GiB at the default
/// `--max-connections`. 16 KiB (the kernel doubles it to 32 KiB for its bookkeeping) is one
/// chargen write (`READ_CHUNK`), so each writable wake-up still moves a full chunk; a reading
/// client gets about 32 KiB per round trip (fast on loopback and a LAN, some hundred KB/s across
/// a continent: plenty for a test service); a non-reader pins about 48 KiB (`ss -tm`: `w`)
/// instead of 4 MiB. Setting it also turns off send-buffer autotuning for that socket.
const CHARGEN_SNDBUF: usize = 16 * 1024;
/// At most one log line per this interval about dropped (looping) datagrams.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

enum Io {
    Socket(OwnedFd),
    Split { read: OwnedFd, write: OwnedFd },
}

impl Io {
    fn read_fd(&self) -> &OwnedFd {
        match self {
            Io::Socket(fd) | Io::Split { read: fd, .. } => fd,
        }
    }
    fn write_fd(&self) -> &OwnedFd {
        match self {
            Io::Socket(fd) | Io::Split { write: fd, .. } => fd,
        }
    }
}

struct Conn {
    io: Io,
    /// Index into `Server::names`.
    source: usize,
    protocol: Protocol,
    peer: String,
    started: Instant,
    last_progress: Instant,
    generation: u32,
    bytes_in: u64,
    bytes_out: u64,
    /// Unsent bytes: an echo the client has not read yet, or a one-shot reply.
    pending: Vec<u8>,
    sent: usize,
    read_eof: bool,
    /// Waiting for its PROXY header until then: nothing is served before it.
    header_due: Option<Instant>,
}

enum Step {
    /// Blocked on the kernel; an event will come.
    Wait,
    /// Budget used up; drive again on the next turn.
    Yield,
    /// Finished (or failed); close with this reason.
    Close(CloseReason),
}

#[derive(Debug)]
enum CloseReason {
    Done,
    TimedOut,
    Error(io::Error),
    ShutdownGraceOver,
    /// Its PROXY header was refused (why).
    Proxy(String),
    /// A PROXY v2 LOCAL connection: the balancer's health check, closed.
    ProxyLocal,
}

/// Whether a read or write failed because the client went away (reset, closed its end, the
/// connection was aborted on its behalf, or TCP gave up on it): logged at info, not as a
/// server problem.
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
    )
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Done => f.write_str("done"),
            CloseReason::TimedOut => f.write_str("timed out"),
            CloseReason::Error(e) if is_hang_up(e) => write!(f, "client went away: {e}"),
            CloseReason::Error(e) => write!(f, "error: {e}"),
            CloseReason::ShutdownGraceOver => f.write_str("closed: shutdown grace period over"),
            CloseReason::Proxy(why) => write!(f, "closed unserved: {why}"),
            CloseReason::ProxyLocal => f.write_str("PROXY LOCAL (a health check): closed"),
        }
    }
}

struct ListenerState {
    l: Listener,
    /// The UDP socket, for datagram listeners.
    udp: Option<UdpSocket>,
    registered: bool,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Serves `listeners` and `connections` until idle, signalled, or (with no listeners) the
/// connections are done. `Err` is a failure of the event loop itself (exit code 1); errors of
/// single connections are logged and close only that connection.
pub fn run(
    listeners: Vec<Listener>,
    connections: Vec<Connection>,
    config: Config,
) -> io::Result<Outcome> {
    let mut server = Server::new(listeners, config)?;
    for c in connections {
        server.adopt(c);
    }
    server.start()?;
    let outcome = server.event_loop();
    server.unlink_created();
    outcome
}

struct Server {
    poll: Poll,
    listeners: Vec<ListenerState>,
    /// Names by source index: listeners first, then adopted connections.
    names: Vec<String>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    generations: Vec<u32>,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    /// Connections and listeners to serve again without waiting for an event.
    again_conns: Vec<usize>,
    again_listeners: Vec<usize>,
    /// False once we stopped for good (idle or signal).
    accepting: bool,
    /// Stream listeners paused because of the cap or EMFILE.
    paused: bool,
    backoff_until: Option<Instant>,
    draining_until: Option<Instant>,
    idle_exit: bool,
    last_activity: Instant,
    signals: Signals,
    scratch: Vec<u8>,
    replies: u64,
    /// Ports of our own UDP sockets: datagrams from them are never answered.
    own_udp_ports: Vec<u16>,
    /// Datagrams dropped as loops, and when that was last logged.
    dropped: u64,
    dropped_logged: Option<Instant>,
    config: Config,
}

impl Server {
    fn new(listeners: Vec<Listener>, config: Config) -> io::Result<Server> {
        let poll = Poll::new()?;
        let signals = Signals::new([SIGTERM, SIGINT])?;
        let names = listeners.iter().map(|l| l.name.clone()).collect();
        let listeners = listeners
            .into_iter()
            .map(|l| -> io::Result<ListenerState> {
                let socket = socket2::SockRef::from(&l.fd);
                socket.set_nonblocking(true)?;
                let udp = if l.datagram {
                    Some(UdpSocket::from(l.fd.try_clone()?))
                } else {
                    None
                };
                Ok(ListenerState {
                    l,
                    udp,
                    registered: false,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let own_udp_ports = listeners
            .iter()
            .filter_map(|st| st.udp.as_ref()?.local_addr().ok())
            .map(|a| a.port())
            .collect();
        Ok(Server {
            poll,
            listeners,
            names,
            conns: Vec::new(),
            free: Vec::new(),
            open: 0,
            generations: Vec::new(),
            deadlines: BinaryHeap::new(),
            again_conns: Vec::new(),
            again_listeners: Vec::new(),
            accepting: true,
            paused: false,
            backoff_until: None,
            draining_until: None,
            idle_exit: false,
            last_activity: Instant::now(),
            signals,
            scratch: vec![0; SCRATCH],
            replies: 0,
            own_udp_ports,
            dropped: 0,
            dropped_logged: None,
            config,
        })
    }

    fn start(&mut self) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut self.signals, SIGNAL_TOKEN, Interest::READABLE)?;
        for i in 0..self.listeners.len() {
            self.register_listener(i)?;
            let l = &self.listeners[i].l;
            log::debug!("listening: {} ({}) on {}", l.name, l.protocol, l.describe);
        }
        // One line per start, not one per socket: a wait-mode service starts often.
        let names: Vec<&str> = self.listeners.iter().map(|l| l.l.name.as_str()).collect();
        log::info!(
            "serving {} socket(s): {}",
            self.listeners.len(),
            names.join(", ")
        );
        crate::notify::ready();
        log::debug!("ready");
        Ok(())
    }

    fn register_listener(&mut self, i: usize) -> io::Result<()> {
        let st = &mut self.listeners[i];
        if !st.registered {
            let fd = st.l.fd.as_raw_fd();
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), Token(i), Interest::READABLE)?;
            st.registered = true;
        }
        Ok(())
    }

    fn deregister_listener(&mut self, i: usize) {
        let st = &mut self.listeners[i];
        if st.registered {
            let fd = st.l.fd.as_raw_fd();
            if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
                log::warn!("{}: stop polling: {e}", st.l.name);
            }
            st.registered = false;
        }
        self.again_listeners.retain(|&j| j != i);
    }

    /// Stream listeners stop (cap reached, EMFILE) or resume; datagram ones are unaffected.
    fn set_paused(&mut self, paused: bool) {
        if self.paused == paused {
            return;
        }
        self.paused = paused;
        for i in 0..self.listeners.len() {
            if self.listeners[i].l.datagram {
                continue;
            }
            if paused {
                self.deregister_listener(i);
            } else if let Err(e) = self.register_listener(i) {
                log::error!("{}: resume polling: {e}", self.listeners[i].l.name);
            }
        }
    }

    /// Stops for good: no listener is polled or accepted on after this.
    fn stop_listening(&mut self) {
        self.accepting = false;
        for i in 0..self.listeners.len() {
            self.deregister_listener(i);
        }
        self.again_listeners.clear();
        crate::notify::stopping();
    }

    fn unlink_created(&mut self) {
        for st in &self.listeners {
            if let Some(path) = &st.l.unlink_on_stop
                && let Err(e) = std::fs::remove_file(path)
            {
                log::warn!("{}: remove {}: {e}", st.l.name, path.display());
            }
        }
    }

    fn adopt(&mut self, c: Connection) {
        let source = self.names.len();
        self.names.push(c.name);
        let io = match c.write {
            Some(write) => Io::Split {
                read: c.read,
                write,
            },
            None => Io::Socket(c.read),
        };
        self.insert(io, source, c.protocol, c.peer, false);
    }

    /// Serve a new connection; `header`: it must first send a PROXY header.
    fn insert(&mut self, io: Io, source: usize, protocol: Protocol, peer: String, header: bool) {
        let now = Instant::now();
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.generations.push(0);
                self.conns.len() - 1
            }
        };
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        let generation = self.generations[idx];
        let token = Token(CONN_BASE + idx);
        let interest = Interest::READABLE | Interest::WRITABLE;
        for fd in [io.read_fd(), io.write_fd()] {
            let raw = fd.as_raw_fd();
            let res = self
                .poll
                .registry()
                .register(&mut SourceFd(&raw), token, interest);
            match res {
                // Regular files cannot be polled but never block either; the same fd twice
                // (stdin == stdout) is already registered.
                Err(e)
                    if e.raw_os_error() == Some(libc::EPERM)
                        || e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => log::warn!("{peer}: poll registration: {e}"),
                Ok(()) => {}
            }
        }
        if protocol == Protocol::Chargen {
            // Pipes (inetd over pipes) have no SO_SNDBUF: ENOTSOCK, nothing to bound.
            let _ = socket2::SockRef::from(io.write_fd()).set_send_buffer_size(CHARGEN_SNDBUF);
        }
        let mut pending = Vec::new();
        let header_due = header
            .then(|| self.config.proxy.as_ref().map(|p| now + p.timeout))
            .flatten();
        if protocol.is_one_shot() && header_due.is_none() {
            pending = self.one_shot_reply(protocol);
        }
        self.conns[idx] = Some(Conn {
            io,
            source,
            protocol,
            peer,
            started: now,
            last_progress: now,
            generation,
            bytes_in: 0,
            bytes_out: 0,
            pending,
            sent: 0,
            read_eof: false,
            header_due,
        });
        self.open += 1;
        if let Some(due) = header_due {
            self.deadlines.push(Reverse((due, idx, generation)));
        }
        self.deadlines.push(Reverse((
            now + self.config.connection_timeout,
            idx,
            generation,
        )));
        self.again_conns.push(idx);
    }

    fn one_shot_reply(&mut self, protocol: Protocol) -> Vec<u8> {
        match protocol {
            Protocol::Daytime => protocols::daytime_reply(SystemTime::now()).into_bytes(),
            Protocol::Time => protocols::time_reply(SystemTime::now()).to_vec(),
            Protocol::Qotd => {
                self.replies += 1;
                self.config.quotes.pick(self.replies - 1).to_vec()
            }
            _ => Vec::new(),
        }
    }

    fn close(&mut self, idx: usize, reason: CloseReason) {
        let Some(conn) = self.conns[idx].take() else {
            return;
        };
        for fd in [conn.io.read_fd(), conn.io.write_fd()] {
            let raw = fd.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        if matches!(reason, CloseReason::Done) {
            // Read what the client sent but we did not need, so closing does not turn into
            // a RST that could discard our reply on its side; then send FIN.
            for _ in 0..BUDGET {
                match nix::unistd::read(conn.io.read_fd(), &mut self.scratch) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            let _ = socket2::SockRef::from(conn.io.write_fd()).shutdown(std::net::Shutdown::Write);
        }
        let line = format!(
            "{} ({}): peer {} in={} out={} duration={:?}: {}",
            self.names[conn.source],
            conn.protocol,
            conn.peer,
            conn.bytes_in,
            conn.bytes_out,
            conn.started.elapsed(),
            reason
        );
        // A client that resets or goes away is the client's business, not a server problem.
        let client_side = matches!(&reason, CloseReason::Error(e) if is_hang_up(e));
        match reason {
            CloseReason::Done => log::info!("{line}"),
            _ if client_side => log::info!("{line}"),
            _ => log::warn!("{line}"),
        }
        drop(conn);
        self.free.push(idx);
        self.open -= 1;
        self.last_activity = Instant::now();
        if self.paused
            && self.accepting
            && self.open < self.config.max_connections
            && self.backoff_until.is_none()
        {
            self.set_paused(false);
        }
    }

    fn event_loop(&mut self) -> io::Result<Outcome> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Some(outcome) = self.finished() {
                return Ok(outcome);
            }
            let now = Instant::now();
            let timeout = if !self.again_conns.is_empty() || !self.again_listeners.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut listeners_now = std::mem::take(&mut self.again_listeners);
            let mut conns_now = std::mem::take(&mut self.again_conns);
            for event in events.iter() {
                match event.token() {
                    SIGNAL_TOKEN => {
                        if self.on_signals() {
                            return Ok(Outcome::Signalled);
                        }
                    }
                    Token(t) if t >= CONN_BASE => conns_now.push(t - CONN_BASE),
                    Token(i) => listeners_now.push(i),
                }
            }
            for i in listeners_now {
                if self.listeners[i].registered {
                    self.serve_listener(i);
                }
            }
            conns_now.sort_unstable();
            conns_now.dedup();
            for idx in conns_now {
                self.drive_and_handle(idx);
            }
            self.expire(Instant::now());
        }
    }

    fn finished(&mut self) -> Option<Outcome> {
        if self.idle_exit {
            return Some(Outcome::Idle);
        }
        if self.draining_until.is_some() && self.open == 0 {
            return Some(Outcome::Signalled);
        }
        if self.listeners.is_empty() && self.open == 0 {
            return Some(Outcome::ConnectionsDone);
        }
        None
    }

    fn idle_deadline(&self) -> Option<Instant> {
        match self.config.idle_timeout {
            Some(t)
                if !t.is_zero()
                    && self.accepting
                    && self.open == 0
                    && !self.listeners.is_empty() =>
            {
                Some(self.last_activity + t)
            }
            _ => None,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.deadlines.peek().map(|Reverse((t, _, _))| *t),
            self.idle_deadline(),
            self.draining_until,
            self.backoff_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Acts on every deadline that passed; may end the loop through `finished`.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((t, idx, generation))) = self.deadlines.peek() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            let Some(conn) = self.conns[idx]
                .as_ref()
                .filter(|c| c.generation == generation)
            else {
                continue;
            };
            if let Some(header_due) = conn.header_due {
                if header_due <= now {
                    let timeout = self.config.proxy.as_ref().map(|p| p.timeout);
                    let why = format!(
                        "no complete PROXY header in {:?}",
                        timeout.unwrap_or_default()
                    );
                    self.close(idx, CloseReason::Proxy(why));
                }
                continue; // a connection timeout is set once the header is read
            }
            let due = conn.last_progress + self.config.connection_timeout;
            if due <= now {
                self.close(idx, CloseReason::TimedOut);
            } else {
                self.deadlines.push(Reverse((due, idx, generation)));
            }
        }
        if let Some(t) = self.backoff_until
            && t <= now
        {
            self.backoff_until = None;
            if self.accepting && self.open < self.config.max_connections {
                self.set_paused(false);
            }
        }
        if let Some(t) = self.idle_deadline()
            && t <= now
        {
            log::info!(
                "idle for {:?}: stop listening and exit",
                self.config.idle_timeout.unwrap_or_default()
            );
            self.stop_listening();
            // `finished` sees no listener polled and nothing open: leave through Idle.
            self.draining_until = None;
            self.idle_exit = true;
        }
        if let Some(t) = self.draining_until
            && t <= now
        {
            let open: Vec<usize> = (0..self.conns.len())
                .filter(|&i| self.conns[i].is_some())
                .collect();
            log::warn!(
                "shutdown grace period over: closing {} connection(s)",
                open.len()
            );
            for idx in open {
                self.close(idx, CloseReason::ShutdownGraceOver);
            }
        }
    }

    /// Handles pending signals; true means leave now.
    fn on_signals(&mut self) -> bool {
        let mut leave = false;
        for signal in self.signals.pending() {
            let name = if signal == SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            if self.draining_until.is_some() {
                log::warn!(
                    "{name} again: exit now, closing {} connection(s)",
                    self.open
                );
                leave = true;
            } else {
                log::info!(
                    "{name}: stop accepting, draining {} connection(s)",
                    self.open
                );
                self.stop_listening();
                self.draining_until = Some(Instant::now() + self.config.shutdown_grace);
            }
        }
        if leave {
            let open: Vec<usize> = (0..self.conns.len())
                .filter(|&i| self.conns[i].is_some())
                .collect();
            for idx in open {
                self.close(idx, CloseReason::ShutdownGraceOver);
            }
        }
        leave
    }

    fn serve_listener(&mut self, i: usize) {
        if self.listeners[i].l.datagram {
            self.serve_datagrams(i);
        } else {
            self.accept(i);
        }
    }

    fn accept(&mut self, i: usize) {
        for _ in 0..BUDGET * 4 {
            if self.open >= self.config.max_connections {
                log::debug!(
                    "at --max-connections {}: new clients wait in the backlog",
                    self.config.max_connections
                );
                self.set_paused(true);
                return;
            }
            let socket = socket2::SockRef::from(&self.listeners[i].l.fd);
            match socket.accept4(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) {
                Ok((stream, addr)) => {
                    self.last_activity = Instant::now();
                    let peer = match addr.as_socket() {
                        Some(a) => a.to_string(),
                        None => addr
                            .as_pathname()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "unix".to_owned()),
                    };
                    let protocol = self.listeners[i].l.protocol;
                    log::debug!("{}: accepted {peer}", self.listeners[i].l.name);
                    if let Some(rules) = &self.config.proxy
                        && !addr.as_socket().is_some_and(|a| rules.trusts(a.ip()))
                    {
                        log::warn!(
                            "{} ({protocol}): peer {peer}: closed unserved: not in --proxy-from",
                            self.listeners[i].l.name
                        );
                        continue;
                    }
                    let header = self.config.proxy.is_some();
                    self.insert(Io::Socket(OwnedFd::from(stream)), i, protocol, peer, header);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    log::warn!(
                        "{}: accept: {e}; pausing {:?}",
                        self.listeners[i].l.name,
                        ACCEPT_BACKOFF
                    );
                    self.set_paused(true);
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    log::warn!("{}: accept: {e}", self.listeners[i].l.name);
                    return;
                }
            }
        }
        self.again_listeners.push(i);
    }

    fn serve_datagrams(&mut self, i: usize) {
        let st = &self.listeners[i];
        let Some(udp) = st.udp.as_ref() else { return };
        let protocol = st.l.protocol;
        for _ in 0..BUDGET * 4 {
            let (n, peer) = match udp.recv_from(&mut self.scratch) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. ECONNREFUSED from an earlier reply's ICMP: per datagram, not fatal.
                    log::debug!("{}: recv: {e}", st.l.name);
                    continue;
                }
            };
            if let Some(why) = loop_risk(peer, &self.own_udp_ports) {
                // Not activity either: a loop must not keep us from the idle exit.
                self.dropped += 1;
                let now = Instant::now();
                if self
                    .dropped_logged
                    .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
                {
                    self.dropped_logged = Some(now);
                    log::debug!(
                        "{} ({protocol}): dropped datagram from {peer}: {why} ({} dropped so far)",
                        st.l.name,
                        self.dropped
                    );
                }
                continue;
            }
            self.last_activity = Instant::now();
            let reply: Vec<u8> = match protocol {
                Protocol::Echo => self.scratch[..n].to_vec(),
                Protocol::Discard => Vec::new(),
                Protocol::Chargen => {
                    let lines = protocols::CHARGEN_UDP_LINES;
                    let mut block =
                        vec![0; (lines * (protocols::CHARGEN_LINE as u64 + 2)) as usize];
                    // A different start line per datagram, like the RFC's rotating pattern.
                    self.replies += 1;
                    protocols::chargen_fill(
                        (self.replies - 1) % 95 * (protocols::CHARGEN_LINE as u64 + 2),
                        &mut block,
                    );
                    block
                }
                Protocol::Daytime => protocols::daytime_reply(SystemTime::now()).into_bytes(),
                Protocol::Time => protocols::time_reply(SystemTime::now()).to_vec(),
                Protocol::Qotd => {
                    self.replies += 1;
                    self.config.quotes.pick(self.replies - 1).to_vec()
                }
            };
            let sent = if reply.is_empty() {
                Ok(0)
            } else {
                udp.send_to(&reply, peer)
            };
            match sent {
                Ok(out) => log::debug!(
                    "{} ({protocol}): datagram from {peer} in={n} out={out}",
                    st.l.name
                ),
                Err(e) => log::debug!("{} ({protocol}): reply to {peer}: {e}", st.l.name),
            }
        }
        self.again_listeners.push(i);
    }

    fn drive_and_handle(&mut self, idx: usize) {
        if self.conns[idx]
            .as_ref()
            .is_some_and(|c| c.header_due.is_some())
            && !self.read_header(idx)
        {
            return;
        }
        let Some(conn) = self.conns[idx].as_mut() else {
            return;
        };
        match drive(conn, &mut self.scratch) {
            Step::Wait => {}
            Step::Yield => self.again_conns.push(idx),
            Step::Close(reason) => self.close(idx, reason),
        }
    }
}

impl Server {
    /// Look for connection `idx`'s PROXY header; true once it is read and the connection may
    /// be served (false: wait for more, or it was closed).
    fn read_header(&mut self, idx: usize) -> bool {
        let Some(version) = self.config.proxy.as_ref().map(|p| p.version) else {
            return true;
        };
        let Some(conn) = self.conns[idx].as_mut() else {
            return false;
        };
        let socket = socket2::SockRef::from(conn.io.read_fd());
        let step = match proxy::try_read(&socket, version) {
            Ok(step) => step,
            Err(e) => {
                self.close(idx, CloseReason::Error(e));
                return false;
            }
        };
        match step {
            proxy::Step::More => false,
            proxy::Step::Invalid(why) => {
                self.close(idx, CloseReason::Proxy(why));
                false
            }
            proxy::Step::Done {
                header: proxy::Header::Local,
                ..
            } => {
                self.close(idx, CloseReason::ProxyLocal);
                false
            }
            proxy::Step::Done { header, .. } => {
                conn.header_due = None;
                let now = Instant::now();
                conn.last_progress = now;
                let generation = conn.generation;
                self.deadlines.push(Reverse((
                    now + self.config.connection_timeout,
                    idx,
                    generation,
                )));
                if let proxy::Header::Proxied { source, .. } = header {
                    conn.peer = format!("{source} via {}", conn.peer);
                }
                let protocol = conn.protocol;
                if protocol.is_one_shot() {
                    let reply = self.one_shot_reply(protocol);
                    if let Some(conn) = self.conns[idx].as_mut() {
                        conn.pending = reply;
                    }
                }
                true
            }
        }
    }
}

/// Why a datagram from `peer` must not be answered, or `None` if it may be. Answering a
/// small service (ours or another host's) or one of our own sockets starts a loop that never
/// ends (echo to echo, chargen to echo); no real client sends from those ports, and a reply to
/// port 0 cannot be delivered.
fn loop_risk(peer: SocketAddr, own_udp_ports: &[u16]) -> Option<&'static str> {
    let port = peer.port();
    if port == 0 {
        Some("source port 0")
    } else if own_udp_ports.contains(&port) {
        Some("source port is one of our own UDP ports (a loop)")
    } else if Protocol::from_port(port).is_some() {
        Some("source port is a small-service port (a loop)")
    } else {
        None
    }
}

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Serves one connection until it would block, its budget is used, or it is finished.
fn drive(conn: &mut Conn, scratch: &mut [u8]) -> Step {
    for _ in 0..BUDGET {
        // 1. Unsent bytes first: nothing new is read while a reply is waiting (back-pressure).
        if conn.sent < conn.pending.len() {
            match nix::unistd::write(conn.io.write_fd(), &conn.pending[conn.sent..]) {
                Ok(n) => {
                    conn.sent += n;
                    conn.bytes_out += n as u64;
                    conn.last_progress = Instant::now();
                    continue;
                }
                Err(nix::Error::EAGAIN) => return Step::Wait,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Step::Close(CloseReason::Error(io_err(e))),
            }
        }
        if !conn.pending.is_empty() {
            // Give the memory back: an idle connection holds no buffer.
            conn.pending = Vec::new();
            conn.sent = 0;
        }
        if conn.protocol.is_one_shot() || conn.read_eof {
            return Step::Close(CloseReason::Done);
        }
        // 2. Read what the client sent.
        let read = match nix::unistd::read(conn.io.read_fd(), &mut scratch[..READ_CHUNK]) {
            Ok(0) => {
                conn.read_eof = true;
                continue;
            }
            Ok(n) => {
                conn.bytes_in += n as u64;
                conn.last_progress = Instant::now();
                Some(n)
            }
            Err(nix::Error::EAGAIN) => None,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Step::Close(CloseReason::Error(io_err(e))),
        };
        match (conn.protocol, read) {
            (Protocol::Echo, Some(n)) => {
                match nix::unistd::write(conn.io.write_fd(), &scratch[..n]) {
                    Ok(w) => {
                        conn.bytes_out += w as u64;
                        if w < n {
                            conn.pending = scratch[w..n].to_vec();
                        }
                    }
                    Err(nix::Error::EAGAIN | nix::Error::EINTR) => {
                        conn.pending = scratch[..n].to_vec()
                    }
                    Err(e) => return Step::Close(CloseReason::Error(io_err(e))),
                }
            }
            (Protocol::Echo | Protocol::Discard, None) => return Step::Wait,
            (Protocol::Discard, Some(_)) => {}
            (Protocol::Chargen, _) => {
                // 3. chargen: generate only as much as the socket takes right now.
                let chunk = &mut scratch[..READ_CHUNK];
                protocols::chargen_fill(conn.bytes_out, chunk);
                match nix::unistd::write(conn.io.write_fd(), chunk) {
                    Ok(w) => {
                        conn.bytes_out += w as u64;
                        conn.last_progress = Instant::now();
                    }
                    Err(nix::Error::EAGAIN) => {
                        if read.is_none() {
                            return Step::Wait;
                        }
                    }
                    Err(nix::Error::EINTR) => {}
                    Err(e) => return Step::Close(CloseReason::Error(io_err(e))),
                }
            }
            (Protocol::Daytime | Protocol::Time | Protocol::Qotd, _) => {
                unreachable!("one-shot handled above")
            }
        }
    }
    Step::Yield
}

/// The local address of a socket, for logs: `127.0.0.1:7`, `unix:/path`, `unix` or `?`.
pub fn describe_local(fd: &OwnedFd) -> String {
    match socket2::SockRef::from(fd).local_addr() {
        Ok(a) => match a.as_socket() {
            Some(sa) => sa.to_string(),
            None => a
                .as_pathname()
                .map(|p| format!("unix:{}", p.display()))
                .unwrap_or_else(|| "unix".to_owned()),
        },
        Err(_) => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_that_would_loop() {
        let from = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [40_000, 7];
        for looping in [
            "127.0.0.1:40000",
            "[::1]:7",
            "192.0.2.1:19",
            "192.0.2.1:7019",
            "192.0.2.1:7013",
            "192.0.2.1:37",
            "127.0.0.1:0",
        ] {
            assert!(loop_risk(from(looping), &own).is_some(), "{looping}");
        }
        for client in [
            "127.0.0.1:40001",
            "[::1]:51234",
            "192.0.2.1:7000",
            "192.0.2.1:8",
        ] {
            assert!(loop_risk(from(client), &own).is_none(), "{client}");
        }
    }
}
