//! The event loop: one thread, one `mio::Poll` over every listening socket and the signals.
//! It owns the services' run-time state (armed or not, running children, back-off, limits),
//! spawns on readiness, reaps on SIGCHLD, reloads on SIGHUP and drains on SIGTERM.
//!
//! A service is *armed* when its listeners are registered with the poll. Every decision about
//! whether it should be is taken in one place, [`Svc::wants_armed`]: a wait-mode service is
//! disarmed while its process runs, during back-off and while rate-limited; a nowait service
//! at `max_instances` with `overflow = "hold"` or rate-limited. Disarmed listeners are not
//! polled, so clients wait in the kernel backlog; registering an fd that is already readable
//! reports it at once, so nothing is missed on re-arm. Nothing polls on a timer: when no
//! deadline is pending the loop sleeps in `epoll_wait` without a timeout.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use superserver_config::{
    Config, ConfigErrors, ConnectionPassing, Global, Handoff, Listen, ListenAddr, LogPeer, Mode,
    Overflow, Service,
};

use crate::children::{self, Child, Children, Exit, Kind};
use crate::limits::{self, SourceCounts, TokenBucket};
use crate::sockets::{self, Bound, Pool};
use crate::spawn::{Fds, Template};
use crate::{filter, logging, notify, plan};

const SIGNALS: Token = Token(0);
/// A wait-mode child that ends this quickly, leaving its socket readable, did not do its job.
const QUICK_EXIT: Duration = Duration::from_secs(1);
/// Pause accepting after `EMFILE`/`ENFILE` rather than spinning on a readable listener.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Where the configuration comes from, so that SIGHUP can read it again.
pub trait Source {
    fn load(&self) -> Result<Config, ConfigErrors>;
    /// The file name used in messages.
    fn origin(&self) -> String;
}

/// A fatal start-up problem: cannot bind, or inherited fds that do not fit the config.
#[derive(Debug)]
pub struct StartError(pub String);

/// One socket of a service, in the order of `def.listen` (which says what it is for).
struct Slot {
    bound: Option<Bound>,
    token: Token,
}

/// A service's run-time state.
struct Svc {
    /// Unique per instance: children and tokens refer to it.
    id: u64,
    def: Service,
    template: Template,
    slots: Vec<Slot>,
    armed: bool,
    /// Wait mode: the process holding the sockets.
    /// Wait mode: the processes holding the sockets (at most `instances`).
    wait_children: Vec<i32>,
    /// Consecutive failed activations (wait mode), for the back-off.
    failures: u32,
    backoff_until: Option<Instant>,
    /// Nowait: running connection processes.
    running: u32,
    /// Only with `max_per_source` (boxed: most services have no limit and should not pay).
    sources: Option<Box<SourceCounts>>,
    bucket: Option<Box<TokenBucket>>,
    rate_until: Option<Instant>,
    /// A stretch of time during which the rate limit kept suspending the service: when it
    /// began, the last suspension, and how many there were (logged once at each end).
    rate_episode: Option<Box<(Instant, Instant, u32)>>,
    /// Per-connection refusals (allow/deny, max_per_source, overflow = "close"), logged at
    /// most once a second with a count of the ones not logged.
    refusals: limits::LogLimiter,
    pause_until: Option<Instant>,
    holding: bool,
    /// Sockets that could not be bound at reload, retried with back-off.
    bind_retry: Option<(Instant, Duration)>,
}

impl Svc {
    fn wants_armed(&self, shutting_down: bool) -> bool {
        if shutting_down
            || self.rate_until.is_some()
            || self.pause_until.is_some()
            || self.backoff_until.is_some()
        {
            return false;
        }
        match self.def.mode {
            Mode::Wait => self.wait_children.len() < self.def.instances as usize,
            Mode::Nowait => {
                self.running < self.def.max_instances || self.def.overflow == Overflow::Close
            }
        }
    }

    fn at_capacity(&self) -> bool {
        self.running >= self.def.max_instances
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Something of service `id` may be due: back-off end, rate resume, accept pause, rebind.
    Service(u64),
    /// The shutdown grace period is over.
    Shutdown,
    /// A nowait child may have run for its service's `max_duration` (SIGTERM), or for the
    /// grace period after that (SIGKILL). `started` tells it from a later child with the
    /// same pid.
    Overrun {
        pid: i32,
        started: Instant,
        kill: bool,
    },
}

/// The running superserver.
pub struct Daemon<S: Source> {
    poll: Poll,
    signals: Signals,
    source: S,
    global: Global,
    services: Vec<Svc>,
    tokens: HashMap<Token, (u64, usize)>,
    next_token: usize,
    next_id: u64,
    children: Children,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    devnull: OwnedFd,
    shutdown_deadline: Option<Instant>,
}

impl<S: Source> Daemon<S> {
    /// Bind (or adopt) every socket of `config` and get ready to serve. `inherited` are the
    /// sockets this process was started with (`LISTEN_FDS`): each must match a configured
    /// address, and a configured address with no inherited fd is bound here.
    pub fn start(
        config: Config,
        templates: Vec<Template>,
        source: S,
        inherited: Vec<(String, RawFd, OwnedFd)>,
    ) -> Result<Daemon<S>, StartError> {
        let poll = Poll::new().map_err(|e| StartError(format!("cannot create poll: {e}")))?;
        let mut signals = Signals::new([SIGCHLD, SIGHUP, SIGTERM, SIGINT])
            .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| StartError(format!("cannot poll signals: {e}")))?;
        let devnull = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| StartError(format!("cannot open /dev/null: {e}")))?
            .into();

        let mut pool = Pool::default();
        let wanted: Vec<Listen> = config
            .services
            .iter()
            .filter(|s| s.enabled)
            .flat_map(|s| s.listen.iter().cloned())
            .collect();
        pool.adopt(inherited, &wanted).map_err(StartError)?;

        let mut daemon = Daemon {
            poll,
            signals,
            source,
            global: config.global.clone(),
            // Sized once: growing by doubling would leave the smaller copies behind as holes.
            services: Vec::with_capacity(config.services.len()),
            tokens: HashMap::with_capacity(wanted.len()),
            next_token: 1,
            next_id: 1,
            children: Children::default(),
            timers: BinaryHeap::new(),
            devnull,
            shutdown_deadline: None,
        };
        let enabled = config.services.into_iter().zip(templates);
        for (def, template) in enabled.filter(|(def, _)| def.enabled) {
            let mut svc = daemon.new_svc(def, template);
            for i in 0..svc.slots.len() {
                let listen = svc.def.listen[i].clone();
                let bound = match pool.take(&listen) {
                    Some(b) => b,
                    None => sockets::bind(&listen.addr, svc.def.backlog, &svc.def.unix_socket)
                        .map_err(|e| StartError(format!("{}: {e}", svc.def.name)))?,
                };
                svc.slots[i].bound = Some(bound);
            }
            prepare_sockets(&mut svc);
            daemon.services.push(svc);
        }
        let leftovers = pool.drain();
        if !leftovers.is_empty() {
            let list: Vec<String> = leftovers
                .iter()
                .map(|b| sockets::describe_unmatched(&b.addr, &wanted))
                .collect();
            return Err(StartError(format!(
                "inherited sockets that match no configured address: {}",
                list.join("; ")
            )));
        }
        for i in 0..daemon.services.len() {
            daemon.rearm(i);
        }
        give_back_heap();
        Ok(daemon)
    }

    fn new_svc(&mut self, def: Service, template: Template) -> Svc {
        let id = self.next_id;
        self.next_id += 1;
        let bucket = def
            .rate
            .map(|r| Box::new(TokenBucket::new(r, Instant::now())));
        let slots = def
            .listen
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let token = Token(self.next_token);
                self.next_token += 1;
                self.tokens.insert(token, (id, i));
                Slot { bound: None, token }
            })
            .collect();
        Svc {
            id,
            def,
            template,
            slots,
            armed: false,
            wait_children: Vec::new(),
            failures: 0,
            backoff_until: None,
            running: 0,
            sources: None,
            bucket,
            rate_until: None,
            rate_episode: None,
            refusals: limits::LogLimiter::default(),
            pause_until: None,
            holding: false,
            bind_retry: None,
        }
    }

    /// What is listening, for the start-up log.
    pub fn describe(&self) -> Vec<String> {
        self.services
            .iter()
            .map(|s| plan::service_line(&s.def))
            .collect()
    }

    /// Serve until SIGTERM/SIGINT and the drain that follows. Returns when every child is gone.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let mut timeout = self
                .timers
                .peek()
                .map(|Reverse((at, _))| at.saturating_duration_since(Instant::now()));
            // Log lines the reader has not taken yet are retried without ever blocking.
            if logging::pending() {
                let t = logging::FLUSH_INTERVAL;
                timeout = Some(timeout.map_or(t, |d| d.min(t)));
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        let pending: Vec<i32> = self.signals.pending().collect();
                        for sig in pending {
                            self.on_signal(sig);
                        }
                    }
                    token => self.on_readable(token),
                }
            }
            self.fire_timers();
            logging::flush();
            if self.shutdown_deadline.is_some() && self.children.is_empty() {
                log::info!("all children have exited; bye");
                logging::flush();
                return Ok(());
            }
        }
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGCHLD => self.reap(),
            SIGHUP => self.reload(),
            SIGTERM | SIGINT => self.shutdown(sig),
            _ => {}
        }
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.services.iter().position(|s| s.id == id)
    }

    // ---------------------------------------------------------------- arming

    /// Register or deregister service `i`'s listeners to match [`Svc::wants_armed`].
    fn rearm(&mut self, i: usize) {
        let shutting = self.shutdown_deadline.is_some();
        let svc = &mut self.services[i];
        let want = svc.wants_armed(shutting);
        if want == svc.armed {
            return;
        }
        for slot in &svc.slots {
            let Some(bound) = &slot.bound else { continue };
            let fd = bound.fd();
            let registry = self.poll.registry();
            let result = if want {
                registry.register(&mut SourceFd(&fd), slot.token, Interest::READABLE)
            } else {
                registry.deregister(&mut SourceFd(&fd))
            };
            if let Err(e) = result {
                log::error!("{}: cannot (de)register a socket: {e}", svc.def.name);
            }
        }
        svc.armed = want;
    }

    fn disarm(&mut self, i: usize) {
        deregister(self.poll.registry(), &mut self.services[i]);
    }

    fn add_timer(&mut self, at: Instant, timer: Timer) {
        self.timers.push(Reverse((at, timer)));
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Shutdown => self.kill_remaining(),
                Timer::Overrun { pid, started, kill } => self.overrun(pid, started, kill, now),
                Timer::Service(id) => {
                    if let Some(i) = self.find(id) {
                        self.service_timer(i, now);
                    }
                }
            }
        }
    }

    fn service_timer(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        if svc.backoff_until.is_some_and(|t| t <= now) {
            svc.backoff_until = None;
            log::info!(
                "{}: back-off over, watching its sockets again",
                svc.def.name
            );
        }
        if svc.rate_until.is_some_and(|t| t <= now) {
            svc.rate_until = None;
            // The episode ends once a whole period passes without a suspension.
            if let Some(per) = svc.def.rate.map(|r| r.per) {
                let id = svc.id;
                self.timers.push(Reverse((now + per, Timer::Service(id))));
            }
        }
        let svc = &mut self.services[i];
        if let (Some(ep), None, Some(rate)) = (&svc.rate_episode, svc.rate_until, svc.def.rate)
            && now.saturating_duration_since(ep.1) >= rate.per
        {
            log::info!(
                "{}: rate limit no longer reached; it held new clients back {} time(s) over {}",
                svc.def.name,
                ep.2,
                children::human(ep.1 - ep.0)
            );
            svc.rate_episode = None;
        }
        if svc.pause_until.is_some_and(|t| t <= now) {
            svc.pause_until = None;
        }
        if svc.bind_retry.is_some_and(|(t, _)| t <= now) {
            self.retry_binds(i);
        }
        self.rearm(i);
    }

    /// A nowait child ran for its `max_duration`: SIGTERM to its process group, and SIGKILL
    /// after the shutdown grace period if it is still there.
    fn overrun(&mut self, pid: i32, started: Instant, kill: bool, now: Instant) {
        let Some(child) = self.children.get(pid) else {
            return;
        };
        if child.started != started {
            return;
        }
        let name = child.service.clone();
        let ran = children::human(now - started);
        if kill {
            log::warn!("{name}: pid {pid} still running {ran} after max_duration; SIGKILL");
            signal_group(pid, libc::SIGKILL);
        } else {
            log::warn!("{name}: pid {pid} ran for {ran} (max_duration); SIGTERM");
            signal_group(pid, libc::SIGTERM);
            let timer = Timer::Overrun {
                pid,
                started,
                kill: true,
            };
            self.add_timer(now + self.global.shutdown_grace, timer);
        }
    }

    // ---------------------------------------------------------------- readiness

    fn on_readable(&mut self, token: Token) {
        let Some(&(id, slot)) = self.tokens.get(&token) else {
            return;
        };
        let Some(i) = self.find(id) else { return };
        if !self.services[i].armed {
            return;
        }
        match self.services[i].def.mode {
            Mode::Wait => self.activate(i),
            Mode::Nowait => self.accept_all(i, slot),
        }
    }

    /// Take one token of the service's rate, or suspend it until the next one (logged once).
    fn rate_allows(&mut self, i: usize, take: bool) -> bool {
        let now = Instant::now();
        let svc = &mut self.services[i];
        let Some(bucket) = svc.bucket.as_mut() else {
            return true;
        };
        let ok = if take {
            bucket.try_take(now)
        } else {
            bucket.has_token(now)
        };
        if !ok {
            let at = bucket.next_token_at(now);
            svc.rate_until = Some(at);
            match svc.rate_episode.as_deref_mut() {
                Some(ep) => {
                    ep.1 = now;
                    ep.2 += 1;
                }
                None => {
                    log::warn!(
                        "{}: rate limit {}/{} reached; new clients wait in the backlog (one \
                         line when it ends)",
                        svc.def.name,
                        svc.def.rate.map(|r| r.count).unwrap_or(0),
                        children::human(svc.def.rate.map(|r| r.per).unwrap_or_default()),
                    );
                    svc.rate_episode = Some(Box::new((now, now, 1)));
                }
            }
            let id = svc.id;
            self.add_timer(at, Timer::Service(id));
            self.rearm(i);
        }
        ok
    }

    /// Wait mode: a socket became readable, start the service with all its sockets (one
    /// more process, up to `instances`).
    fn activate(&mut self, i: usize) {
        let svc = &self.services[i];
        if svc.wait_children.len() >= svc.def.instances as usize || !self.rate_allows(i, true) {
            return;
        }
        let svc = &self.services[i];
        let fds: Vec<RawFd> = svc
            .slots
            .iter()
            .filter_map(|s| s.bound.as_ref().map(|b| b.fd()))
            .collect();
        let names: Vec<&str> = svc
            .slots
            .iter()
            .zip(&svc.def.listen)
            .filter(|(s, _)| s.bound.is_some())
            .map(|(_, l)| l.name.as_str())
            .collect();
        let nfds = fds.len().to_string();
        let fdnames = names.join(":");
        let result = match svc.def.handoff {
            // systemd's protocol: fd 3… with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES.
            Handoff::ListenFds => {
                let env = [
                    ("LISTEN_FDS", OsStr::new(&nfds)),
                    ("LISTEN_FDNAMES", OsStr::new(&fdnames)),
                ];
                svc.template
                    .spawn(Fds::Listeners(&fds), &env, true, self.devnull.as_raw_fd())
            }
            // inetd's protocol: the one listening socket on stdin and stdout.
            Handoff::Stdin => match fds.first() {
                Some(&fd) => {
                    svc.template
                        .spawn(Fds::StdinListener(fd), &[], false, self.devnull.as_raw_fd())
                }
                None => return,
            },
        };
        let (name, id) = (svc.def.name.clone(), svc.id);
        match result {
            Ok(pid) => {
                log::info!("{name}: started pid {pid} with {nfds} socket(s) ({fdnames})");
                self.children.insert(
                    pid,
                    Child {
                        service: name,
                        svc_id: id,
                        started: Instant::now(),
                        kind: Kind::Wait,
                    },
                );
                self.services[i].wait_children.push(pid);
                self.rearm(i);
            }
            Err(e) => {
                let what = svc.template.what();
                let backoff = self.failed_activation(i);
                log::error!("{name}: cannot start {what}: {e}; {backoff}");
            }
        }
    }

    /// Schedule the next attempt of a wait-mode service that did not take its connections:
    /// exponential back-off from `restart_backoff_min` to `restart_backoff_max`.
    fn failed_activation(&mut self, i: usize) -> String {
        let (min, max) = (
            self.global.restart_backoff_min,
            self.global.restart_backoff_max,
        );
        let svc = &mut self.services[i];
        svc.failures += 1;
        let factor = 1u32 << (svc.failures - 1).min(20);
        let delay = min.saturating_mul(factor).min(max);
        let at = Instant::now() + delay;
        svc.backoff_until = Some(at);
        let line = format!(
            "back-off: next start in {} ({} failure(s) in a row)",
            children::human(delay),
            svc.failures
        );
        let id = svc.id;
        self.add_timer(at, Timer::Service(id));
        self.rearm(i);
        line
    }

    /// Nowait: accept every pending connection the limits allow.
    fn accept_all(&mut self, i: usize, slot: usize) {
        loop {
            if !self.services[i].armed {
                return;
            }
            let svc = &mut self.services[i];
            if svc.at_capacity() && svc.def.overflow == Overflow::Hold {
                if !svc.holding {
                    svc.holding = true;
                    log::warn!(
                        "{}: max_instances ({}) reached; new clients wait in the backlog",
                        svc.def.name,
                        svc.def.max_instances
                    );
                }
                self.rearm(i);
                return;
            }
            if !self.rate_allows(i, false) {
                return;
            }
            let svc = &mut self.services[i];
            let Some(bound) = svc.slots.get(slot).and_then(|s| s.bound.as_ref()) else {
                return;
            };
            let (conn, peer) = match bound.socket.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: pause instead of spinning.
                    log::error!("{}: accept failed: {e}; pausing", svc.def.name);
                    let at = Instant::now() + ACCEPT_PAUSE;
                    svc.pause_until = Some(at);
                    let id = svc.id;
                    self.add_timer(at, Timer::Service(id));
                    self.rearm(i);
                    return;
                }
            };
            let peer = peer.as_socket();
            self.handle_connection(i, slot, conn, peer);
        }
    }

    fn handle_connection(
        &mut self,
        i: usize,
        slot: usize,
        conn: socket2::Socket,
        peer: Option<SocketAddr>,
    ) {
        let svc = &mut self.services[i];
        let peer_str = peer_label(peer, svc.def.log_peer);
        let refusal = if let Some(p) = peer
            && !svc.def.access.is_empty()
            && !svc.def.access.permits(p.ip())
        {
            Some("denied by allow/deny".to_string())
        } else if svc.at_capacity() {
            // Only reachable with overflow = "close".
            Some(format!("max_instances ({}) reached", svc.def.max_instances))
        } else {
            None
        };
        let mut source = None;
        let refusal = refusal.or_else(|| match (svc.def.per_source, peer) {
            (Some(limit), Some(p)) => {
                let key = limits::source_key(p.ip(), &limit);
                let sources = svc.sources.get_or_insert_with(Default::default);
                if sources.try_add(key, limit.max) {
                    source = Some(key);
                    None
                } else {
                    Some(format!("has {} connections (max_per_source)", limit.max))
                }
            }
            _ => None,
        });
        if let Some(why) = refusal {
            if let Some(more) = svc.refusals.allow(Instant::now()) {
                let more = if more > 0 {
                    format!(" (and {more} more refused since the last such line)")
                } else {
                    String::new()
                };
                log::warn!("{}: {peer_str} {why}; closed{more}", svc.def.name);
            }
            return;
        }
        if let Some(bucket) = svc.bucket.as_mut() {
            bucket.try_take(Instant::now());
        }
        let local = local_addr(&svc.def.listen[slot].addr, &conn);
        let env_owned = peer_env(peer, local);
        let mut env: Vec<(&str, &OsStr)> =
            env_owned.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
        let fds = match svc.def.connection {
            ConnectionPassing::Stdio => Fds::Stdio(conn.as_raw_fd()),
            ConnectionPassing::ListenFds => {
                env.push(("LISTEN_FDS", OsStr::new("1")));
                env.push(("LISTEN_FDNAMES", OsStr::new("connection")));
                Fds::Fd3(conn.as_raw_fd())
            }
        };
        let listen_pid = svc.def.connection == ConnectionPassing::ListenFds;
        match svc
            .template
            .spawn(fds, &env, listen_pid, self.devnull.as_raw_fd())
        {
            Ok(pid) => {
                svc.running += 1;
                log::debug!("{}: {peer_str} → pid {pid}", svc.def.name);
                let started = Instant::now();
                if let Some(limit) = svc.def.max_duration {
                    let timer = Timer::Overrun {
                        pid,
                        started,
                        kill: false,
                    };
                    self.timers.push(Reverse((started + limit, timer)));
                }
                let child = Child {
                    service: svc.def.name.clone(),
                    svc_id: svc.id,
                    started,
                    kind: Kind::Connection {
                        peer: peer_str,
                        source,
                    },
                };
                self.children.insert(pid, child);
            }
            Err(e) => {
                log::error!(
                    "{}: {peer_str}: cannot start {}: {e}; closed",
                    svc.def.name,
                    svc.template.what()
                );
                if let Some(key) = source {
                    if let Some(sources) = svc.sources.as_mut() {
                        sources.remove(&key);
                    }
                }
            }
        }
        // `conn` is closed here: the child has its own copy.
    }

    // ---------------------------------------------------------------- reaping

    fn reap(&mut self) {
        // While stopping, what a service's process leaves behind in its process group (a
        // background job of a shell script, say) is killed as that process is reaped.
        let sweep = self.shutdown_deadline.is_some();
        for exit in self.children.reap(false, sweep) {
            self.on_exit(exit);
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let i = self.find(exit.child.svc_id);
        match &exit.child.kind {
            Kind::Connection { peer, source } => {
                log::info!(
                    "{}: {peer} pid {} {} after {}",
                    exit.child.service,
                    exit.pid,
                    exit.describe(),
                    children::human(exit.runtime)
                );
                let Some(i) = i else { return };
                let svc = &mut self.services[i];
                svc.running = svc.running.saturating_sub(1);
                if let Some(key) = source {
                    if let Some(sources) = svc.sources.as_mut() {
                        sources.remove(key);
                    }
                }
                if svc.holding && !svc.at_capacity() {
                    svc.holding = false;
                    log::info!("{}: below max_instances, accepting again", svc.def.name);
                }
                self.rearm(i);
            }
            Kind::Wait => {
                let ended = |why: &str| {
                    log::info!(
                        "{}: pid {} ({why}) {} after {}",
                        exit.child.service,
                        exit.pid,
                        exit.describe(),
                        children::human(exit.runtime)
                    );
                };
                let Some(i) = i else {
                    ended("service removed");
                    return;
                };
                let svc = &mut self.services[i];
                let Some(pos) = svc.wait_children.iter().position(|&p| p == exit.pid) else {
                    // A process replaced after a reload changed its sockets.
                    ended("replaced by a reload");
                    return;
                };
                svc.wait_children.swap_remove(pos);
                let others = !svc.wait_children.is_empty();
                let fds: Vec<RawFd> = svc
                    .slots
                    .iter()
                    .filter_map(|s| s.bound.as_ref().map(|b| b.fd()))
                    .collect();
                let pending = any_readable(&fds);
                // Quick and leaving connections queued that no other instance will take: it
                // did not do its job.
                let failed = !exit.success() || (exit.runtime < QUICK_EXIT && pending && !others);
                let head = format!(
                    "{}: pid {} {} after {}",
                    svc.def.name,
                    exit.pid,
                    exit.describe(),
                    children::human(exit.runtime)
                );
                if self.shutdown_deadline.is_some() {
                    log::info!("{head}");
                    return;
                }
                if failed {
                    let why = if exit.success() {
                        "it left its connections waiting"
                    } else {
                        "it failed"
                    };
                    let backoff = self.failed_activation(i);
                    log::warn!("{head}; {why}; {backoff}");
                } else {
                    let recovered = if svc.failures > 0 {
                        "; recovered, back-off reset"
                    } else {
                        ""
                    };
                    log::info!(
                        "{head}{recovered}; {}",
                        if pending {
                            "connections are waiting: starting it again"
                        } else {
                            "watching its sockets again"
                        }
                    );
                    svc.failures = 0;
                    self.rearm(i);
                }
            }
        }
    }

    // ---------------------------------------------------------------- reload

    /// SIGHUP: read the whole file again; apply it as a diff only if all of it is valid.
    fn reload(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        notify::reloading();
        log::info!("reload: reading the configuration");
        let config = match self.source.load() {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    log::error!("reload: {e}");
                }
                log::error!(
                    "reload: {} error(s); keeping the running configuration",
                    errors.0.len()
                );
                notify::ready("reload failed; running the previous configuration");
                return;
            }
        };
        let templates = match crate::spawn::prepare_all(&config.services) {
            Ok(t) => t,
            Err(errors) => {
                let origin = self.source.origin();
                for e in &errors {
                    log::error!("reload: {origin}: {e}");
                }
                log::error!(
                    "reload: {} error(s); keeping the running configuration",
                    errors.len()
                );
                notify::ready("reload failed; running the previous configuration");
                return;
            }
        };
        self.apply(config, templates);
        give_back_heap();
        notify::ready(&format!("serving {} service(s)", self.services.len()));
    }

    fn apply(&mut self, config: Config, templates: Vec<Template>) {
        self.global = config.global;
        let mut old: HashMap<String, Svc> = std::mem::take(&mut self.services)
            .into_iter()
            .map(|s| (s.def.name.clone(), s))
            .collect();
        let mut pool = Pool::default();
        let (mut kept, mut added, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let mut next: Vec<(Svc, bool)> = Vec::new(); // (service, needs sockets)

        // A disabled service (`enable = false`) is not served: one that ran is removed.
        let enabled = config.services.into_iter().zip(templates);
        for (def, template) in enabled.filter(|(def, _)| def.enabled) {
            let Some(mut svc) = old.remove(&def.name) else {
                added.push(def.name.clone());
                let svc = self.new_svc(def, template);
                next.push((svc, true));
                continue;
            };
            // Every service gets the fresh template: `pass_env` values and the program's
            // check are as of this reload.
            svc.template = template;
            if svc.def == def {
                kept.push(def.name.clone());
                next.push((svc, false));
                continue;
            }
            changed.push(def.name.clone());
            let sockets_changed = svc.def.listen != def.listen
                || svc.def.backlog != def.backlog
                || svc.def.unix_socket != def.unix_socket
                || svc.def.mode != def.mode;
            if svc.def.rate != def.rate {
                svc.bucket = def
                    .rate
                    .map(|r| Box::new(TokenBucket::new(r, Instant::now())));
                svc.rate_until = None;
            }
            if svc.def.mode != def.mode || svc.def.per_source != def.per_source {
                svc.holding = false;
            }
            if sockets_changed {
                deregister(self.poll.registry(), &mut svc);
                for slot in svc.slots.drain(..) {
                    self.tokens.remove(&slot.token);
                    if let Some(b) = slot.bound {
                        pool.put(b);
                    }
                }
                // A running wait-mode process holds the old set of sockets: ask it to drain
                // and exit, and let the next connection start a new one with the new set
                // right away (the old one stops accepting on SIGTERM; what it accepted it
                // serves). Connections queued on an address that stays are not lost.
                for pid in std::mem::take(&mut svc.wait_children) {
                    log::info!(
                        "{}: its sockets changed; SIGTERM to pid {pid} to drain, the next \
                         connection starts it with the new set",
                        def.name
                    );
                    signal_group(pid, libc::SIGTERM);
                }
                svc.def = def;
                for j in 0..svc.def.listen.len() {
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    self.tokens.insert(token, (svc.id, j));
                    svc.slots.push(Slot { bound: None, token });
                }
                next.push((svc, true));
            } else {
                svc.def = def;
                // allow/deny may have changed. The blocking mode stays: a running wait-mode
                // process shares it (O_NONBLOCK belongs to the open socket, not to our fd),
                // and switching its non-blocking listeners to blocking would hang its accept.
                attach_filters(&mut svc);
                next.push((svc, false));
            }
        }

        // Removed services: close their sockets (unless a new service takes the address) and
        // ask their wait-mode process to drain.
        let mut removed: Vec<String> = old.keys().cloned().collect();
        removed.sort();
        for (_, mut svc) in old {
            deregister(self.poll.registry(), &mut svc);
            for &pid in &svc.wait_children {
                log::info!("{}: removed; SIGTERM to pid {pid}", svc.def.name);
                signal_group(pid, libc::SIGTERM);
            }
            for slot in svc.slots {
                self.tokens.remove(&slot.token);
                if let Some(b) = slot.bound {
                    pool.put(b);
                }
            }
        }

        // What no service wants any more retires: it stays open until the new addresses
        // are bound beside it (a narrowed 0.0.0.0:P -> 127.0.0.1:P shares the port for a
        // moment) and what it queued is accepted, so the narrowing refuses nobody.
        let wanted: std::collections::HashSet<&ListenAddr> = next
            .iter()
            .flat_map(|(svc, _)| svc.def.listen.iter().map(|l| &l.addr))
            .collect();
        pool.retire_unwanted(|addr| wanted.contains(addr));

        for (mut svc, needs) in next {
            if needs {
                self.fill_slots(&mut svc, &mut pool);
                prepare_sockets(&mut svc);
            }
            self.services.push(svc);
        }
        let retiring = pool.take_retiring();
        drop(pool.drain()); // closes what nobody took (and removes our Unix socket files)
        for i in 0..self.services.len() {
            self.rearm(i);
        }
        for old in retiring {
            self.accept_retiring(old);
        }
        log::info!(
            "reload: {} kept, {} added{}, {} changed{}, {} removed{}",
            kept.len(),
            added.len(),
            list_names(&added),
            changed.len(),
            list_names(&changed),
            removed.len(),
            list_names(&removed)
        );
    }

    /// A nowait listener that no service wants any more: connections the kernel completed on
    /// it before its replacement was bound are accepted and served by the service that now
    /// listens on their address (closed if none does), then the socket is closed. A
    /// wait-mode socket is left to the process that holds it.
    fn accept_retiring(&mut self, old: sockets::Bound) {
        if !old.addr.is_stream() || !old.is_nonblocking() {
            return;
        }
        loop {
            let (conn, peer) = match old.socket.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock: the queue is empty
            };
            let local = conn.local_addr().ok().and_then(|a| a.as_socket());
            let owner = local.and_then(|local| {
                self.services.iter().enumerate().find_map(|(i, svc)| {
                    if svc.def.mode != Mode::Nowait {
                        return None;
                    }
                    svc.def
                        .listen
                        .iter()
                        .position(|l| match &l.addr {
                            ListenAddr::Tcp(a) => {
                                a.port() == local.port()
                                    && (a.ip() == local.ip() || a.ip().is_unspecified())
                            }
                            _ => false,
                        })
                        .map(|slot| (i, slot))
                })
            });
            match owner {
                Some((i, slot)) => self.handle_connection(i, slot, conn, peer.as_socket()),
                None => log::info!(
                    "reload: a connection queued on {} (no longer served) closed",
                    old.addr
                ),
            }
        }
    }

    /// Give every empty slot a socket: from the pool when its address was already bound, else
    /// a new bind. A failed bind is logged and retried with back-off; the service serves on
    /// the sockets it has.
    fn fill_slots(&mut self, svc: &mut Svc, pool: &mut Pool) {
        let mut failed = false;
        let empty = svc.slots.iter_mut().zip(&svc.def.listen);
        for (slot, listen) in empty.filter(|(s, _)| s.bound.is_none()) {
            slot.bound = match pool.take(listen) {
                Some(b) => {
                    // A kept socket gets this service's current backlog and file mode/owner.
                    if let Err(e) = sockets::reapply(&b, svc.def.backlog, &svc.def.unix_socket) {
                        log::error!("{}: {e}", svc.def.name);
                    }
                    Some(b)
                }
                None => match pool.bind(&listen.addr, svc.def.backlog, &svc.def.unix_socket) {
                    Ok(b) => {
                        log::info!("{}: listening on {}", svc.def.name, listen.addr);
                        Some(b)
                    }
                    Err(e) => {
                        log::error!("{}: {e}; will retry", svc.def.name);
                        failed = true;
                        None
                    }
                },
            };
        }
        if failed {
            let delay = match svc.bind_retry {
                Some((_, d)) => (d * 2).min(self.global.restart_backoff_max),
                None => self
                    .global
                    .restart_backoff_min
                    .max(Duration::from_millis(500)),
            };
            let at = Instant::now() + delay;
            svc.bind_retry = Some((at, delay));
            self.add_timer(at, Timer::Service(svc.id));
        } else {
            svc.bind_retry = None;
        }
    }

    fn retry_binds(&mut self, i: usize) {
        self.disarm(i);
        let mut svc = self.services.remove(i);
        let mut pool = Pool::default();
        self.fill_slots(&mut svc, &mut pool);
        prepare_sockets(&mut svc);
        self.services.insert(i, svc);
    }

    // ---------------------------------------------------------------- shutdown

    /// SIGTERM/SIGINT: stop listening, SIGTERM every child, SIGKILL what is left after the
    /// grace period. A second signal skips the grace period.
    fn shutdown(&mut self, sig: i32) {
        if self.shutdown_deadline.is_some() {
            log::warn!("second stop signal: killing the remaining children now");
            self.kill_remaining();
            return;
        }
        notify::stopping();
        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
        log::info!(
            "{name}: closing listeners, SIGTERM to {} child(ren), grace {}",
            self.children.len(),
            children::human(self.global.shutdown_grace)
        );
        let deadline = Instant::now() + self.global.shutdown_grace;
        self.shutdown_deadline = Some(deadline);
        for i in 0..self.services.len() {
            self.disarm(i);
            for slot in &mut self.services[i].slots {
                slot.bound = None;
            }
        }
        for pid in self.children.pids() {
            signal_group(pid, libc::SIGTERM);
        }
        self.add_timer(deadline, Timer::Shutdown);
    }

    fn kill_remaining(&mut self) {
        let pids = self.children.pids();
        if pids.is_empty() {
            return;
        }
        log::warn!("SIGKILL to {} child(ren) still running", pids.len());
        for pid in pids {
            signal_group(pid, libc::SIGKILL);
        }
        for exit in self.children.reap(true, true) {
            self.on_exit(exit);
        }
    }
}

/// Send `sig` to a child's whole process group (every child leads its own session, so its
/// pgid is its pid): what it started, a shell's background jobs included, gets it too.
fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the process group of a child we started and have not reaped (its
    // pid, hence its pgid, cannot have been reused).
    unsafe { libc::kill(-pid, sig) };
}

/// Stop polling a service's listeners (clients then wait in the kernel backlog).
fn deregister(registry: &mio::Registry, svc: &mut Svc) {
    if !svc.armed {
        return;
    }
    for bound in svc.slots.iter().filter_map(|s| s.bound.as_ref()) {
        let _ = registry.deregister(&mut SourceFd(&bound.fd()));
    }
    svc.armed = false;
}

/// Set each socket up for how it will be used. Blocking mode: nowait listeners are accepted
/// on here and must not block; wait-mode sockets are handed to services, which expect
/// blocking sockets as systemd passes them (`O_NONBLOCK` is shared by every copy of the
/// socket). Access rules: a wait-mode socket carries them as a kernel socket filter, since
/// the service, not the superserver, accepts (nowait checks each peer after `accept`, so its
/// sockets carry none). A socket whose filter cannot be attached is closed rather than handed
/// over unfiltered.
fn prepare_sockets(svc: &mut Svc) {
    let wait = svc.def.mode == Mode::Wait;
    for (slot, listen) in svc.slots.iter_mut().zip(&svc.def.listen) {
        let Some(b) = &mut slot.bound else { continue };
        if let Err(e) = b.set_nonblocking(!wait) {
            log::warn!(
                "{}: {}: cannot set O_NONBLOCK: {e}",
                svc.def.name,
                listen.addr
            );
        }
    }
    attach_filters(svc);
}

/// Put the service's allow/deny rules on its wait-mode sockets as a kernel socket filter (and
/// none on nowait sockets, whose peers the superserver checks itself). A socket whose filter
/// cannot be attached is closed rather than served unfiltered.
fn attach_filters(svc: &mut Svc) {
    let none = superserver_config::AccessRules::default();
    let rules = if svc.def.mode == Mode::Wait {
        &svc.def.access
    } else {
        &none
    };
    for (slot, listen) in svc.slots.iter_mut().zip(&svc.def.listen) {
        let Some(b) = &slot.bound else { continue };
        if let Err(e) = filter::attach(b.fd(), rules) {
            log::error!(
                "{}: {}: cannot attach the allow/deny socket filter: {e}; not serving this \
                 socket",
                svc.def.name,
                listen.addr
            );
            slot.bound = None;
        }
    }
}

/// Return the memory freed after parsing a configuration (the TOML document, raw values) to
/// the system: glibc keeps freed heap pages otherwise, and an idle superserver should hold only
/// what it uses.
fn give_back_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// True when any of `fds` has something to read right now.
fn any_readable(fds: &[RawFd]) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll(2) on a valid array of pollfd with a zero timeout.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
    n > 0
}

/// The local address of a connection: the configured one unless it is a wildcard.
fn local_addr(listen: &ListenAddr, conn: &socket2::Socket) -> Option<SocketAddr> {
    match listen {
        ListenAddr::Tcp(a) if !a.ip().is_unspecified() => Some(*a),
        ListenAddr::Tcp(_) => conn.local_addr().ok().and_then(|a| a.as_socket()),
        _ => None,
    }
}

/// The peer's identity for the child: UCSPI (`PROTO`, `TCPREMOTEIP`, …) and systemd's
/// `REMOTE_ADDR`/`REMOTE_PORT`.
fn peer_env(peer: Option<SocketAddr>, local: Option<SocketAddr>) -> Vec<(&'static str, String)> {
    let Some(peer) = peer else {
        return vec![("PROTO", "UNIX".to_string())];
    };
    let ip = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_else(|| v6.to_string()),
        v4 => v4.to_string(),
    };
    let mut env = vec![
        ("PROTO", "TCP".to_string()),
        ("TCPREMOTEIP", ip(peer.ip())),
        ("TCPREMOTEPORT", peer.port().to_string()),
        ("REMOTE_ADDR", ip(peer.ip())),
        ("REMOTE_PORT", peer.port().to_string()),
    ];
    if let Some(local) = local {
        env.push(("TCPLOCALIP", ip(local.ip())));
        env.push(("TCPLOCALPORT", local.port().to_string()));
    }
    env
}

/// The client as a log line shows it (`log_peer`): "203.0.113.7:40112", "203.0.113.0/24",
/// or no address at all.
fn peer_label(peer: Option<SocketAddr>, how: LogPeer) -> String {
    let Some(peer) = peer else {
        return "unix".into();
    };
    match how {
        LogPeer::Full => peer.to_string(),
        LogPeer::Masked => {
            let masked = superserver_config::mask_peer(peer.ip());
            let bits = if masked.is_ipv4() { 24 } else { 48 };
            format!("{masked}/{bits}")
        }
        LogPeer::None => "a client".into(),
    }
}

fn list_names(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}
