//! The control socket and the metrics endpoint: `superserver status|reload|stop` ask the
//! running superserver over a Unix stream socket, Prometheus scrapes `/metrics` over TCP. Both
//! are served by the event loop and bounded: a request is one short line, every client has a
//! deadline and a cap on what it may send, answers are written without blocking, and at most
//! [`MAX_CLIENTS`] are served at once, so no client can stall the loop or the others.
//!
//! The protocol, version 1: the client sends one line `superserver/1 COMMAND [ARG…]` and reads
//! one JSON document (then the connection closes). Commands: `status [SERVICE…]`, `reload`,
//! `stop [GRACE]`. Every answer has `"version": 1` and `"ok"`; a refusal has `"error"`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde::Serialize;
use serde_json::json;
use socket2::{Domain, Socket, Type};
use std::borrow::Cow;
use superserver_config::{ListenAddr, Mode, UnixSocketOptions};

use crate::children;
use crate::daemon::{Daemon, Source, Timer};
use crate::reload::Reloaded;
use crate::sockets::{self, Bound};
use crate::state::{State, Svc};

pub(crate) const CONTROL: Token = Token(usize::MAX);
pub(crate) const METRICS: Token = Token(usize::MAX - 1);
pub(crate) const AGENT: Token = Token(usize::MAX - 3); // MAX - 2: the reload thread's waker
/// Client tokens count up from here, far above the services' tokens.
const CLIENT_BASE: usize = usize::MAX / 2;
pub(crate) const MAX_CLIENTS: usize = 32;
/// A request longer than this is refused.
const MAX_REQUEST: usize = 4096;
/// A client has this long to send its request and take its answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// An agent client that has sent no line by then is answered for the whole host (HAProxy
/// without `agent-send` sends nothing and waits).
const AGENT_WAIT: Duration = Duration::from_millis(500);
pub(crate) const PROTOCOL: &str = "superserver/1";

/// The default control socket: `$SUPERSERVER_CONTROL` when set, else
/// `/run/superserver/control` for root and `$XDG_RUNTIME_DIR/superserver/control` otherwise
/// (`None` without `XDG_RUNTIME_DIR`). The `control` key overrides it.
pub(crate) fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SUPERSERVER_CONTROL").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/run/superserver/control"));
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")?;
    Some(Path::new(&runtime).join("superserver/control"))
}

/// Who is on the other end of a control connection (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
}

enum Kind {
    Control(Peer),
    Metrics,
    Agent,
}

struct Client {
    socket: Socket,
    kind: Kind,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// The answer is ready: only writing is left.
    answered: bool,
    /// A `reload` waiting for the background read of the file ([`Daemon::reload_answered`]).
    deferred: bool,
}

/// The control and metrics listeners and their clients.
#[derive(Default)]
pub(crate) struct Control {
    socket: Option<Bound>,
    metrics: Option<Socket>,
    agent: Option<Socket>,
    clients: HashMap<Token, Client>,
    next: usize,
    /// `control_group`: members may read `status`.
    group: Option<u32>,
    /// The default directory this process created for the socket, removed (if empty) at exit.
    made_dir: Option<PathBuf>,
}

impl Drop for Control {
    fn drop(&mut self) {
        drop(self.socket.take()); // removes the socket file first
        if let Some(dir) = &self.made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Control {
    /// Open the control socket and the metrics listener as configured. Neither is fatal: a
    /// control path a live superserver holds, or a metrics address in use, is logged once and
    /// the superserver serves without it.
    pub(crate) fn open(global: &superserver_config::Global, registry: &Registry) -> Control {
        let mut control = Control::default();
        control.group = global.control_group;
        let path = match &global.control {
            superserver_config::Control::Off => None,
            superserver_config::Control::Path(p) => Some(p.clone()),
            superserver_config::Control::Default => {
                let p = default_path();
                if p.is_none() {
                    log::info!("control: no XDG_RUNTIME_DIR, so no control socket");
                }
                let from_env = std::env::var_os("SUPERSERVER_CONTROL").is_some();
                if let Some(dir) = p.as_deref().and_then(Path::parent).filter(|_| !from_env) {
                    // The default directory is ours to make; a path given in the file is not.
                    let mode = if nix::unistd::geteuid().is_root() {
                        0o755
                    } else {
                        0o700
                    };
                    if std::fs::DirBuilder::new()
                        .mode_compat(mode)
                        .create(dir)
                        .is_ok()
                    {
                        control.made_dir = Some(dir.to_path_buf());
                    }
                }
                p
            }
        };
        if let Some(path) = path {
            let opts = UnixSocketOptions {
                mode: Some(if control.group.is_some() {
                    0o660
                } else {
                    0o600
                }),
                uid: None,
                gid: control.group,
            };
            match sockets::bind(&ListenAddr::Unix(path.as_path().into()), 64, &opts) {
                Ok(bound) => {
                    let registered = bound.socket.set_nonblocking(true).and_then(|()| {
                        registry.register(&mut SourceFd(&bound.fd()), CONTROL, Interest::READABLE)
                    });
                    match registered {
                        Ok(()) => {
                            log::info!("control: listening on {}", path.display());
                            control.socket = Some(bound);
                        }
                        Err(e) => log::error!("control: {}: {e}", path.display()),
                    }
                }
                Err(e) => log::warn!(
                    "control: {e}; running without a control socket (give this superserver a \
                     path of its own with [superserver] control = \"PATH\")"
                ),
            }
        }
        control.metrics = global.metrics.and_then(|addr| {
            let s = listen_registered(addr, registry, METRICS, "metrics", "no metrics")?;
            log::info!("metrics: serving http://{addr}/metrics");
            Some(s)
        });
        control.agent = global.agent.and_then(|addr| {
            let s = listen_registered(addr, registry, AGENT, "agent", "no agent")?;
            log::info!("agent: answering HAProxy's agent-check on {addr}");
            Some(s)
        });
        control
    }

    pub(crate) fn is_client(token: Token) -> bool {
        token.0 >= CLIENT_BASE && token != CONTROL && token != METRICS && token != AGENT
    }
}

/// `DirBuilder` with a mode, without pulling the Unix extension trait into every caller.
trait ModeCompat {
    fn mode_compat(&mut self, mode: u32) -> &mut Self;
}

impl ModeCompat for std::fs::DirBuilder {
    fn mode_compat(&mut self, mode: u32) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(mode)
    }
}

/// A TCP listener on `addr` polled under `token`, or `None` with a warning (`what: cannot
/// listen on ADDR: why; without`).
fn listen_registered(
    addr: SocketAddr,
    registry: &Registry,
    token: Token,
    what: &str,
    without: &str,
) -> Option<Socket> {
    let registered = listen_tcp(addr).and_then(|s| {
        registry
            .register(&mut SourceFd(&s.as_raw_fd()), token, Interest::READABLE)
            .map(|()| s)
    });
    registered
        .map_err(|e| log::warn!("{what}: cannot listen on {addr}: {e}; {without}"))
        .ok()
}

fn listen_tcp(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(64)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn peer_of(fd: RawFd) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) SO_PEERCRED into a ucred of the given length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Is the process `pid` (primary group `gid`) a member of `group`? Supplementary groups come
/// from `/proc/PID/status`.
fn in_group(pid: i32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(group)))
        })
        .unwrap_or(false)
}

impl<S: Source> Daemon<S> {
    /// The control or metrics listener is readable: take the new clients.
    pub(crate) fn control_accept(&mut self, token: Token) {
        loop {
            let listener = match token {
                CONTROL => self.control.socket.as_ref().map(|b| &b.socket),
                AGENT => self.control.agent.as_ref(),
                _ => self.control.metrics.as_ref(),
            };
            let Some(listener) = listener else { return };
            let socket = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock, or out of descriptors: try at the next event
            };
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            let kind = match token {
                CONTROL => match peer_of(socket.as_raw_fd()) {
                    Ok(p) => Kind::Control(p),
                    Err(_) => continue,
                },
                AGENT => Kind::Agent,
                _ => Kind::Metrics,
            };
            if self.control.clients.len() >= MAX_CLIENTS {
                // Best effort, never blocking: a short refusal, then close.
                let refusal = match kind {
                    Kind::Control(_) => answer_error("busy: too many control clients; retry"),
                    Kind::Metrics => b"HTTP/1.0 503 Service Unavailable\r\n\r\n".to_vec(),
                    // Not an error to HAProxy: it keeps the server's state until the next check.
                    Kind::Agent => Vec::new(),
                };
                let _ = (&socket).write(&refusal);
                log::warn!("control: {MAX_CLIENTS} clients already; one refused");
                continue;
            }
            let t = Token(CLIENT_BASE + self.control.next);
            self.control.next = (self.control.next + 1) % (CLIENT_BASE - 2);
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&socket.as_raw_fd()), t, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            let deadline = match kind {
                Kind::Agent => AGENT_WAIT,
                _ => CLIENT_DEADLINE,
            };
            self.control.clients.insert(
                t,
                Client {
                    socket,
                    kind,
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    answered: false,
                    deferred: false,
                },
            );
            self.add_timer(Instant::now() + deadline, Timer::Client(t.0));
        }
    }

    /// A client is readable or writable: read its request, answer, write the answer.
    pub(crate) fn control_client(&mut self, token: Token) {
        let Some(client) = self.control.clients.get_mut(&token) else {
            return;
        };
        if client.deferred {
            return; // its answer comes when the reload is done
        }
        if !client.answered {
            let mut buf = [0u8; 1024];
            loop {
                match (&client.socket).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        client.input.extend_from_slice(&buf[..n]);
                        if client.input.len() > MAX_REQUEST {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.drop_client(token);
                        return;
                    }
                }
            }
            let complete = match client.kind {
                Kind::Control(_) | Kind::Agent => client.input.contains(&b'\n'),
                Kind::Metrics => client.input.windows(4).any(|w| w == b"\r\n\r\n"),
            };
            if !complete && client.input.len() <= MAX_REQUEST {
                return; // more to come, within the deadline
            }
            let t0 = Instant::now();
            let answer = if client.input.len() > MAX_REQUEST {
                match client.kind {
                    Kind::Agent => b"down#request too long\n".to_vec(),
                    _ => answer_error("request too long"),
                }
            } else {
                let input = std::mem::take(&mut client.input);
                match client.kind {
                    Kind::Control(peer) => self.control_request(peer, &input, token),
                    Kind::Metrics => self.metrics_answer(&input),
                    Kind::Agent => self.agent_line(&input),
                }
            };
            let Some(client) = self.control.clients.get_mut(&token) else {
                return;
            };
            if client.deferred {
                return;
            }
            log::debug!(
                "control: answered {} bytes in {:?}",
                answer.len(),
                t0.elapsed()
            );
            // Room for the whole answer at once, so that a large status is one write.
            let _ = client
                .socket
                .set_send_buffer_size(answer.len().min(4 << 20));
            client.output = answer;
            client.answered = true;
        }
        self.write_client(token);
    }

    fn write_client(&mut self, token: Token) {
        let Some(client) = self.control.clients.get_mut(&token) else {
            return;
        };
        while client.written < client.output.len() {
            match (&client.socket).write(&client.output[client.written..]) {
                Ok(n) => client.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Wait for room, within the same deadline.
                    let fd = client.socket.as_raw_fd();
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&fd),
                        token,
                        Interest::WRITABLE,
                    );
                    return;
                }
                Err(_) => break,
            }
        }
        self.drop_client(token);
    }

    pub(crate) fn drop_client(&mut self, token: Token) {
        if let Some(client) = self.control.clients.remove(&token) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&client.socket.as_raw_fd()));
        }
    }

    /// A client's deadline passed: whatever it did not finish, it is closed.
    pub(crate) fn client_deadline(&mut self, token: usize) {
        let token_ = Token(token);
        if let Some(client) = self.control.clients.get_mut(&token_)
            && matches!(client.kind, Kind::Agent)
            && !client.answered
        {
            // HAProxy sent no name (or not all of it): answer with what came.
            let input = std::mem::take(&mut client.input);
            let answer = self.agent_line(&input);
            if let Some(client) = self.control.clients.get_mut(&token_) {
                client.output = answer;
                client.answered = true;
            }
            self.write_client(token_);
            return;
        }
        if self
            .control
            .clients
            .get(&token_)
            .is_some_and(|c| c.deferred)
        {
            // Waiting for a reload, which always ends: not the client's fault.
            self.add_timer(Instant::now() + CLIENT_DEADLINE, Timer::Client(token));
            return;
        }
        if self.control.clients.contains_key(&Token(token)) {
            log::debug!("control: a client took too long; closed");
            self.drop_client(Token(token));
        }
    }

    /// One request line from a control client: check who asks, then do it.
    /// Answer the `reload` requests of `waiting` control clients with `done`.
    pub(crate) fn reload_answered(&mut self, waiting: Vec<Token>, done: &Reloaded) {
        if waiting.is_empty() {
            return;
        }
        let answer = reload_answer(done);
        for token in waiting {
            if let Some(client) = self.control.clients.get_mut(&token) {
                client.deferred = false;
                client.answered = true;
                client.output = answer.clone();
                self.write_client(token);
            }
        }
    }

    fn control_request(&mut self, peer: Peer, input: &[u8], token: Token) -> Vec<u8> {
        let line = String::from_utf8_lossy(input);
        let line = line.lines().next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some(PROTOCOL) {
            return answer_error(&format!(
                "not a {PROTOCOL} request (the first word must be {PROTOCOL})"
            ));
        }
        let command = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        let me = nix::unistd::geteuid().as_raw();
        let may_steer = peer.uid == 0 || peer.uid == me;
        let may_read = may_steer
            || self
                .control
                .group
                .is_some_and(|g| in_group(peer.pid, peer.gid, g));
        let allowed = match command {
            "status" => may_read,
            _ => may_steer,
        };
        if !allowed {
            log::warn!(
                "control: uid {} (pid {}) may not {command:?}; refused",
                peer.uid,
                peer.pid
            );
            return answer_error(&format!(
                "permission denied: uid {} may not {command} (root and uid {me} may steer{})",
                peer.uid,
                if self.control.group.is_some() {
                    "; members of control_group may read status"
                } else {
                    ""
                }
            ));
        }
        match command {
            "status" => {
                let unknown: Vec<&&str> = args
                    .iter()
                    .filter(|a| !self.services.iter().any(|s| s.def.name == ***a))
                    .collect();
                if !unknown.is_empty() {
                    let unknown: Vec<&str> = unknown.iter().map(|s| **s).collect();
                    return answer_error(&format!("no such service: {}", unknown.join(", ")));
                }
                self.status_answer(&args)
            }
            "reload" => {
                log::info!(
                    "control: reload asked by uid {} (pid {})",
                    peer.uid,
                    peer.pid
                );
                // Read on the reload thread like a SIGHUP's, so the loop keeps serving; the
                // answer is written when it is applied (or refused).
                if let Some(client) = self.control.clients.get_mut(&token) {
                    client.deferred = true;
                }
                if let Some(done) = self.reload_for(token) {
                    if let Some(client) = self.control.clients.get_mut(&token) {
                        client.deferred = false;
                    }
                    return reload_answer(&done);
                }
                Vec::new()
            }
            "upgrade" => {
                let binary = args.first().map(PathBuf::from);
                log::info!(
                    "control: upgrade asked by uid {} (pid {})",
                    peer.uid,
                    peer.pid
                );
                self.pending_upgrade = Some(binary);
                to_line(&json!({"version": 1, "ok": true, "preflight": "pending"}))
            }
            "drain" | "undrain" => {
                let on = command == "drain";
                log::info!(
                    "control: {command} {args:?} asked by uid {} (pid {})",
                    peer.uid,
                    peer.pid
                );
                match self.drain(&args, on) {
                    Ok(drained) => to_line(&json!({
                        "version": 1, "ok": true, "drained": drained,
                        "drained_all": self.drained_all,
                        "agent": self.global.agent.map(|a| a.to_string()),
                    })),
                    Err(e) => answer_error(&e),
                }
            }
            "stop" => {
                if let Some(g) = args.first() {
                    match humantime::parse_duration(g) {
                        Ok(d) if d <= superserver_config::MAX_SHUTDOWN_GRACE => {
                            self.global.shutdown_grace = d
                        }
                        _ => return answer_error(&format!("bad grace {g:?}: write e.g. 5s")),
                    }
                }
                log::info!("control: stop asked by uid {} (pid {})", peer.uid, peer.pid);
                let grace = self.global.shutdown_grace;
                let children = self.children.len();
                self.shutdown(libc::SIGTERM);
                to_line(&json!({
                    "version": 1, "ok": true, "stopping": true,
                    "children": children, "grace_s": grace.as_secs_f64(),
                }))
            }
            other => answer_error(&format!(
                "unknown command {other:?}; commands: status [SERVICE…], reload, stop [GRACE], \
                 upgrade [BINARY], drain [SERVICE…], undrain [SERVICE…]"
            )),
        }
    }

    /// The status answer (one line of JSON): every service (or the ones named), its state and
    /// why, its processes, sockets, last exit and counters. Serialised straight from borrowed
    /// data into one buffer sized up front: one small allocation per service, so that even
    /// with a slow allocator (musl's) a thousand services take a few milliseconds.
    pub(crate) fn status_answer(&self, only: &[&str]) -> Vec<u8> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let stopping = self.shutdown_deadline.is_some();
        let by_service = self.children.pids_by_service();
        let services: Vec<ServiceDoc<'_>> = self
            .services
            .iter()
            .filter(|s| only.is_empty() || only.contains(&s.def.name.as_str()))
            .map(|s| service_doc(s, now, wall, stopping, &by_service))
            .collect();
        let mut out = JsonBuf(Vec::with_capacity(256 + services.len() * 512));
        let doc = StatusDoc {
            version: 1,
            ok: true,
            upgrades: self.upgrades,
            last_upgrade_error: self.last_upgrade_error.as_deref(),
            drained_all: self.drained_all,
            pid: std::process::id(),
            uptime_s: wall
                .duration_since(self.started)
                .unwrap_or_default()
                .as_secs(),
            stopping,
            services,
        };
        let _ = serde_json::to_writer(&mut out, &doc);
        out.0.push(b'\n');
        out.0
    }

    /// `GET /metrics`: the counters and states in Prometheus' text format.
    /// An agent-check request: the first line, a service name or nothing.
    fn agent_line(&self, input: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(input);
        let name = text.lines().next().unwrap_or("");
        self.agent_answer(name).into_bytes()
    }

    fn metrics_answer(&self, input: &[u8]) -> Vec<u8> {
        let first = input.split(|&b| b == b'\n').next().unwrap_or(b"");
        let first = String::from_utf8_lossy(first);
        let mut parts = first.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method != "GET" || (path != "/metrics" && !path.starts_with("/metrics?")) {
            return b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nonly GET /metrics\n"
                .to_vec();
        }
        let body = crate::metrics::render(&self.services, self.shutdown_deadline.is_some());
        let mut out = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

fn to_line(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

pub(crate) fn answer_error(message: &str) -> Vec<u8> {
    to_line(&json!({"version": 1, "ok": false, "error": message}))
}

/// `superserver status --json`, version 1 (documented in the README).
#[derive(Serialize)]
pub(crate) struct StatusDoc<'a> {
    version: u32,
    ok: bool,
    /// In-place upgrades this process has been through.
    upgrades: u32,
    /// Why the last upgrade attempt failed, if it did.
    last_upgrade_error: Option<&'a str>,
    pid: u32,
    uptime_s: u64,
    stopping: bool,
    /// `superserver drain` without a service: the agent answers `drain` for every one.
    drained_all: bool,
    services: Vec<ServiceDoc<'a>>,
}

#[derive(Serialize)]
struct ServiceDoc<'a> {
    name: &'a str,
    mode: &'static str,
    state: &'static str,
    why: Cow<'static, str>,
    until_s: Option<f64>,
    failures: u32,
    live: u32,
    cap: u32,
    pids: &'a [i32],
    bind_failing: bool,
    /// `superserver drain SERVICE`: the agent answers `drain`.
    drained: bool,
    listeners: Vec<ListenerDoc<'a>>,
    last_exit: Option<LastExitDoc>,
    counters: CountersDoc,
}

#[derive(Serialize)]
struct ListenerDoc<'a> {
    address: Shown<'a, ListenAddr>,
    name: &'a str,
    bound: bool,
    queue: Option<u32>,
}

#[derive(Serialize)]
struct LastExitDoc {
    pid: i32,
    code: Option<i32>,
    signal: Option<i32>,
    ago_s: f64,
    ran_s: f64,
}

#[derive(Serialize)]
struct CountersDoc {
    accepted: u64,
    activations: u64,
    spawned: u64,
    spawn_failures: u64,
    exits: ExitsDoc,
    refused: RefusedDoc,
    rate_limited: u64,
    proxy_local: u64,
}

#[derive(Serialize)]
struct ExitsDoc {
    ok: u64,
    failed: u64,
    signaled: u64,
}

#[derive(Serialize)]
struct RefusedDoc {
    deny: u64,
    per_source: u64,
    overflow: u64,
    proxy: u64,
}

/// A growing buffer for serde_json that copies the many short pieces it writes (a quote, a
/// key, a number) byte by byte: musl's `memcpy` costs more per call than these copies, and
/// the static build spent most of a 1,000-service `status` in it.
pub(crate) struct JsonBuf(pub(crate) Vec<u8>);

impl io::Write for JsonBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if b.len() <= 32 {
            self.0.reserve(b.len());
            for &x in b {
                self.0.push(x);
            }
        } else {
            self.0.extend_from_slice(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A value serialised as its `Display` text, without a `String` in between.
struct Shown<'a, T>(&'a T);

impl<T: std::fmt::Display> Serialize for Shown<'_, T> {
    fn serialize<Z: serde::Serializer>(&self, z: Z) -> Result<Z::Ok, Z::Error> {
        z.collect_str(self.0)
    }
}

fn service_doc<'a>(
    s: &'a Svc,
    now: Instant,
    wall: SystemTime,
    stopping: bool,
    pids_by_service: &'a HashMap<u64, Vec<i32>>,
) -> ServiceDoc<'a> {
    let state = s.state(stopping);
    let left = |t: Instant| children::human(t.saturating_duration_since(now));
    let why: Cow<'static, str> = match &state {
        State::Stopping => "the superserver is stopping".into(),
        State::BackingOff { until, failures } => format!(
            "failed {failures} time(s) in a row; next start in {}",
            left(*until)
        )
        .into(),
        State::RateSuspended { until } => format!(
            "rate limit reached; watching its sockets again in {}",
            left(*until)
        )
        .into(),
        State::Paused { until } => format!(
            "accept failed (out of descriptors?); again in {}",
            left(*until)
        )
        .into(),
        State::Held => format!(
            "at max_instances ({}): new clients wait in the backlog",
            s.def.max_instances
        )
        .into(),
        State::Running => match s.def.mode {
            Mode::Wait => "its process holds the sockets".into(),
            Mode::Nowait => "serving connections".into(),
        },
        State::Listening => "waiting for a connection".into(),
    };
    let until_s = match state {
        State::BackingOff { until, .. }
        | State::RateSuspended { until }
        | State::Paused { until } => Some(until.saturating_duration_since(now).as_secs_f64()),
        _ => None,
    };
    let pids: &[i32] = match s.def.mode {
        Mode::Wait => &s.wait_children,
        Mode::Nowait => pids_by_service.get(&s.id).map_or(&[], Vec::as_slice),
    };
    let listeners = s
        .slots
        .iter()
        .zip(&s.def.listen)
        .map(|(slot, l)| ListenerDoc {
            address: Shown(&l.addr),
            name: &l.name,
            bound: slot.bound.is_some(),
            queue: slot.bound.as_ref().and_then(accept_queue),
        })
        .collect();
    let last_exit = s.last_exit.as_ref().map(|e| LastExitDoc {
        pid: e.pid,
        code: e.status.ok(),
        signal: e.status.err(),
        ago_s: wall.duration_since(e.at).unwrap_or_default().as_secs_f64(),
        ran_s: e.ran.as_secs_f64(),
    });
    let c = &s.counters;
    ServiceDoc {
        name: &s.def.name,
        mode: match s.def.mode {
            Mode::Wait => "wait",
            Mode::Nowait => "nowait",
        },
        state: state.name(),
        why,
        until_s,
        failures: s.lim().failures,
        live: s.live(),
        cap: s.cap(),
        pids,
        bind_failing: s.lim().bind_retry.is_some(),
        drained: s.drained,
        listeners,
        last_exit,
        counters: CountersDoc {
            accepted: c.accepted,
            activations: c.activations,
            spawned: c.spawned,
            spawn_failures: c.spawn_failures,
            exits: ExitsDoc {
                ok: c.exits_ok,
                failed: c.exits_failed,
                signaled: c.exits_signaled,
            },
            refused: RefusedDoc {
                deny: c.refused_deny,
                per_source: c.refused_per_source,
                overflow: c.refused_overflow,
                proxy: c.refused_proxy,
            },
            rate_limited: c.rate_limited,
            proxy_local: c.proxy_local,
        },
    }
}

/// The control socket's answer to `reload`.
fn reload_answer(done: &Reloaded) -> Vec<u8> {
    match done {
        Reloaded::Applied {
            kept,
            added,
            changed,
            removed,
        } => to_line(&json!({
            "version": 1, "ok": true, "applied": true,
            "kept": kept, "added": added, "changed": changed, "removed": removed,
        })),
        Reloaded::Rejected(errors) => to_line(&json!({
            "version": 1, "ok": false, "applied": false, "errors": errors,
            "error": format!("{} error(s); the running configuration stays", errors.len()),
        })),
    }
}

/// Connections waiting in a TCP listener's accept queue (`TCP_INFO`'s `tcpi_unacked` on a
/// listening socket); `None` for other sockets.
pub(crate) fn accept_queue(b: &Bound) -> Option<u32> {
    if !matches!(b.addr, ListenAddr::Tcp(_)) {
        return None;
    }
    // SAFETY: getsockopt(2) TCP_INFO into a zeroed tcp_info of the given length.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            b.fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        (r == 0).then_some(info.tcpi_unacked)
    }
}
