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
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::signals::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2, Signals};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use superserver_config::{Config, ConfigErrors, Global, Listen, ListenAddr, Mode, Service};

use crate::children::{self, Children, Exit, Kind};
use crate::control::{AGENT, CONTROL, Control, METRICS};
use crate::limits::TokenBucket;
use crate::proxy::Headers;
use crate::sockets::{self, Pool};
use crate::spawn::Template;
use crate::state::{Slot, Svc, Tally};
use crate::{filter, logging, notify, plan};

pub(crate) const SIGNALS: Token = Token(0);
/// A wait-mode child that ends this quickly, leaving its socket readable, did not do its job.
pub(crate) const QUICK_EXIT: Duration = Duration::from_secs(1);
/// Pause accepting after `EMFILE`/`ENFILE` rather than spinning on a readable listener.
pub(crate) const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Connections a nowait listener accepts per turn of the loop before the others (signals,
/// reaping, timers, other services, the control socket) get theirs.
pub(crate) const ACCEPT_BATCH: usize = 16;

/// Where the configuration comes from, so that SIGHUP can read it again (on a thread of its
/// own: a copy of it goes there).
pub trait Source: Clone + Send + 'static {
    fn load(&self) -> Result<Config, ConfigErrors>;
    /// The file name used in messages.
    fn origin(&self) -> String;
}

/// A fatal start-up problem: cannot bind, or inherited fds that do not fit the config.
#[derive(Debug)]
pub struct StartError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Something of service `id` may be due: back-off end, rate resume, accept pause, rebind.
    Service(u64),
    /// The shutdown grace period is over.
    Shutdown,
    /// A control or metrics client's deadline (its token).
    Client(usize),
    /// A nowait child may have run for its service's `max_duration` (SIGTERM), or for the
    /// grace period after that (SIGKILL). `started` tells it from a later child with the
    /// same pid.
    Overrun {
        pid: i32,
        started: Instant,
        kill: bool,
    },
    /// A connection's PROXY header is due (its token).
    Header(usize),
}

/// The running superserver.
pub struct Daemon<S: Source> {
    pub(crate) poll: Poll,
    pub(crate) signals: Signals,
    pub(crate) source: S,
    pub(crate) global: Global,
    pub(crate) services: Vec<Svc>,
    /// Where each service is in `services`, by id (see [`Daemon::find`]).
    pub(crate) index: HashMap<u64, usize>,
    /// The generation of the next sockets a reload gives a service (see `slot_token`).
    pub(crate) next_generation: u8,
    pub(crate) next_id: u64,
    pub(crate) children: Children,
    pub(crate) timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    pub(crate) devnull: OwnedFd,
    pub(crate) shutdown_deadline: Option<Instant>,
    /// Counters of services a reload removed, kept for their names: a counter never goes
    /// backwards, even across a remove and re-add.
    pub(crate) retired: HashMap<String, Tally>,
    /// When this superserver started, for `status`.
    pub(crate) started: std::time::SystemTime,
    /// The control socket, the metrics endpoint and their clients.
    pub(crate) control: crate::control::Control,
    /// In-place upgrades this process has been through.
    pub(crate) upgrades: u32,
    /// An upgrade asked for on the control socket, done once its answer is written.
    pub(crate) pending_upgrade: Option<Option<std::path::PathBuf>>,
    /// Why the last upgrade attempt failed (shown by `status`).
    pub(crate) last_upgrade_error: Option<String>,
    /// Connections waiting for their PROXY protocol header.
    pub(crate) headers: crate::proxy::Headers,
    /// `superserver drain` without a service: the agent answers `drain` for every one.
    pub(crate) drained_all: bool,
    /// Nowait listeners (service id, slot) that still had connections queued after a batch.
    pub(crate) more: Vec<(u64, usize)>,
    /// A SIGHUP's reload whose file is being read off the loop.
    pub(crate) background: crate::reload::Background,
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
        saved: Option<crate::upgrade::Saved>,
    ) -> Result<Daemon<S>, StartError> {
        let poll = Poll::new().map_err(|e| StartError(format!("cannot create poll: {e}")))?;
        let mut signals = Signals::new()
            .map_err(|e| StartError(format!("cannot read signals from a signalfd: {e}")))?;
        // After an in-place upgrade every signal arrives blocked: ours that came during the
        // exec wait in the signalfd; the others are unblocked.
        crate::signals::block_only_ours();
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
        // What inherited sockets are matched against (none inherited, nothing to match: ten
        // thousand addresses are not copied for nothing).
        let wanted: Vec<Listen> = match inherited.is_empty() {
            true => Vec::new(),
            false => config
                .services
                .iter()
                .filter(|s| s.enabled)
                .flat_map(|s| s.listen.iter().cloned())
                .collect(),
        };
        pool.adopt(inherited, &wanted).map_err(StartError)?;
        // The sockets an upgraded image kept open, by what the old image knew of them. One the
        // configuration no longer has is closed (and its file removed), not an error.
        let mut kept = Pool::default();
        for s in saved.iter().flat_map(|s| &s.sockets) {
            let Ok(addr) = superserver_config::parse_listen_addr(&s.addr) else {
                continue;
            };
            // SAFETY: the old image left this descriptor open for us; nothing else owns it.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s.fd) };
            // The file it made is the one at its address (an image that said otherwise is
            // not believed: nothing is removed on its word).
            let owned = s.owned.as_ref().and_then(|(p, d, i)| {
                matches!(&addr, ListenAddr::Unix(a) if **a == **p).then_some((*d, *i))
            });
            kept.put(sockets::Bound::restore(addr, fd, owned, s.nonblocking));
        }

        let mut daemon = Daemon {
            poll,
            signals,
            source,
            global: config.global.clone(),
            // Sized once: growing by doubling would leave the smaller copies behind as holes.
            services: Vec::with_capacity(config.services.len()),
            index: HashMap::new(),
            next_generation: 1,
            next_id: 1,
            children: Children::default(),
            timers: BinaryHeap::new(),
            devnull,
            shutdown_deadline: None,
            retired: HashMap::new(),
            started: std::time::SystemTime::now(),
            control: crate::control::Control::default(),
            upgrades: 0,
            pending_upgrade: None,
            last_upgrade_error: None,
            headers: Default::default(),
            drained_all: false,
            more: Vec::new(),
            background: Default::default(),
        };
        let enabled = config.services.into_iter().zip(templates);
        for (def, template) in enabled.filter(|(def, _)| def.enabled) {
            let mut svc = daemon.new_svc(def, template);
            for i in 0..svc.slots.len() {
                let listen = &svc.def.listen[i];
                let bound = match pool.take(listen).or_else(|| kept.take(listen)) {
                    Some(b) => b,
                    None => {
                        let b = sockets::bind(
                            &listen.addr,
                            svc.def.backlog,
                            &svc.def.extra().unix_socket,
                        )
                        .map_err(|e| StartError(format!("{}: {e}", svc.def.name)))?;
                        store(&b);
                        b
                    }
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
        daemon.reindex();
        for i in 0..daemon.services.len() {
            daemon.rearm(i);
        }
        daemon.control = Control::open(&daemon.global, daemon.poll.registry());
        if let Some(saved) = saved {
            daemon.restore(saved);
        }
        give_back_heap();
        Ok(daemon)
    }

    pub(crate) fn new_svc(&mut self, def: Service, template: Template) -> Svc {
        let id = self.next_id;
        self.next_id += 1;
        let name = def.name.clone();
        let limited = def.extra().rate.map(|r| {
            Box::new(crate::state::Limited {
                bucket: Some(TokenBucket::new(r, Instant::now())),
                ..Default::default()
            })
        });
        let slots = def
            .listen
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let token = crate::state::slot_token(id, 0, i);
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
            running: 0,
            waiting: 0,
            drained: false,
            holding: false,
            limited,
            counters: self.retired.remove(&name).unwrap_or_default(),
            last_exit: None,
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
            if !self.more.is_empty() {
                timeout = Some(Duration::ZERO); // a listener has more queued: no sleep
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
                        for sig in self.signals.pending() {
                            self.on_signal(sig);
                        }
                    }
                    CONTROL | METRICS | AGENT => self.control_accept(event.token()),
                    crate::reload::RELOADED => self.reload_loaded(),
                    token if Control::is_client(token) => self.control_client(token),
                    token if Headers::is_header(token) => self.header_readable(token),
                    token => self.on_readable(token),
                }
            }
            self.fire_timers();
            self.accept_more();
            if let Some(binary) = self.pending_upgrade.take() {
                self.last_upgrade_error = None;
                if let Err(e) = self.upgrade(binary) {
                    log::error!("upgrade: {e}; still serving with this binary");
                    self.last_upgrade_error = Some(e);
                }
            }
            logging::flush();
            if self.shutdown_deadline.is_some() && self.children.is_empty() {
                log::info!("all children have exited; bye");
                logging::flush();
                return Ok(());
            }
        }
    }

    pub(crate) fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGCHLD => self.reap(),
            SIGHUP => self.reload_in_background(),
            SIGTERM | SIGINT => self.shutdown(sig),
            // The binary now at our path, in place; the reason is logged if it cannot be.
            SIGUSR2 => self.pending_upgrade = Some(None),
            _ => {}
        }
    }

    /// Where service `id` is in `services`: by the index (kept by [`Daemon::reindex`]),
    /// checked, with a search as the fallback should the index ever be stale.
    pub(crate) fn find(&self, id: u64) -> Option<usize> {
        match self.index.get(&id) {
            Some(&i) if self.services.get(i).is_some_and(|s| s.id == id) => Some(i),
            _ => self.services.iter().position(|s| s.id == id),
        }
    }

    /// Rebuild the index after `services` changed (start-up, reload).
    pub(crate) fn reindex(&mut self) {
        self.index = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect();
    }

    // ---------------------------------------------------------------- arming

    /// Register or deregister service `i`'s listeners to match [`Svc::wants_armed`].
    pub(crate) fn rearm(&mut self, i: usize) {
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

    pub(crate) fn disarm(&mut self, i: usize) {
        deregister(self.poll.registry(), &mut self.services[i]);
    }

    pub(crate) fn add_timer(&mut self, at: Instant, timer: Timer) {
        self.timers.push(Reverse((at, timer)));
    }

    pub(crate) fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Shutdown => self.kill_remaining(),
                Timer::Client(token) => self.client_deadline(token),
                Timer::Header(token) => self.header_deadline(token),
                Timer::Overrun { pid, started, kill } => self.overrun(pid, started, kill, now),
                Timer::Service(id) => {
                    if let Some(i) = self.find(id) {
                        self.service_timer(i, now);
                    }
                }
            }
        }
    }

    pub(crate) fn service_timer(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        if svc.lim().backoff_until.is_some_and(|t| t <= now) {
            svc.lim_mut().backoff_until = None;
            log::info!(
                "{}: back-off over, watching its sockets again",
                svc.def.name
            );
        }
        if svc.lim().rate_until.is_some_and(|t| t <= now) {
            svc.lim_mut().rate_until = None;
            // The episode ends once a whole period passes without a suspension.
            if let Some(per) = svc.def.extra().rate.map(|r| r.per) {
                let id = svc.id;
                self.timers.push(Reverse((now + per, Timer::Service(id))));
            }
        }
        let svc = &mut self.services[i];
        if let (Some(ep), None, Some(rate)) = (
            &svc.lim().rate_episode,
            svc.lim().rate_until,
            svc.def.extra().rate,
        ) && now.saturating_duration_since(ep.1) >= rate.per
        {
            log::info!(
                "{}: rate limit no longer reached; it held new clients back {} time(s) over {}",
                svc.def.name,
                ep.2,
                children::human(ep.1 - ep.0)
            );
            svc.lim_mut().rate_episode = None;
        }
        if svc.lim().pause_until.is_some_and(|t| t <= now) {
            svc.lim_mut().pause_until = None;
        }
        if svc.lim().bind_retry.is_some_and(|(t, _)| t <= now) {
            self.retry_binds(i);
        }
        self.rearm(i);
        self.scale_up(i);
    }

    // ---------------------------------------------------------------- readiness

    pub(crate) fn on_readable(&mut self, token: Token) {
        let (id, slot) = crate::state::token_slot(token);
        let Some(i) = self.find(id) else { return };
        if self.services[i]
            .slots
            .get(slot)
            .is_none_or(|s| s.token != token)
        {
            return; // a socket a reload replaced
        }
        if !self.services[i].armed {
            return;
        }
        match self.services[i].def.mode {
            Mode::Wait => self.activate(i),
            Mode::Nowait => self.accept_all(i, slot),
        }
    }

    /// Take one token of the service's rate, or suspend it until the next one (logged once).
    pub(crate) fn rate_allows(&mut self, i: usize, take: bool) -> bool {
        let now = Instant::now();
        let svc = &mut self.services[i];
        let Some(bucket) = svc.limited.as_deref_mut().and_then(|l| l.bucket.as_mut()) else {
            return true;
        };
        let ok = if take {
            bucket.try_take(now)
        } else {
            bucket.has_token(now)
        };
        if !ok {
            svc.counters.rate_limited += 1;
            let at = bucket.next_token_at(now);
            svc.lim_mut().rate_until = Some(at);
            match svc.lim_mut().rate_episode.as_mut() {
                Some(ep) => {
                    ep.1 = now;
                    ep.2 += 1;
                }
                None => {
                    log::warn!(
                        "{}: rate limit {}/{} reached; new clients wait in the backlog (one \
                         line when it ends)",
                        svc.def.name,
                        svc.def.extra().rate.map(|r| r.count).unwrap_or(0),
                        children::human(svc.def.extra().rate.map(|r| r.per).unwrap_or_default()),
                    );
                    svc.lim_mut().rate_episode = Some((now, now, 1));
                }
            }
            let id = svc.id;
            self.add_timer(at, Timer::Service(id));
            self.rearm(i);
        }
        ok
    }

    // ---------------------------------------------------------------- reaping

    pub(crate) fn on_exit(&mut self, exit: Exit) {
        if let Some(i) = self.find(exit.child.svc_id) {
            let svc = &mut self.services[i];
            match exit.status {
                Ok(0) => svc.counters.exits_ok += 1,
                Ok(_) => svc.counters.exits_failed += 1,
                Err(_) => svc.counters.exits_signaled += 1,
            }
            svc.last_exit = Some(Box::new(crate::state::LastExit {
                pid: exit.pid,
                status: exit.status,
                at: std::time::SystemTime::now(),
                ran: exit.runtime,
            }));
        }
        match &exit.child.kind {
            Kind::Connection { peer, source, .. } => {
                let (peer, source) = (peer.clone(), *source);
                self.connection_exited(&exit, &peer, &source)
            }
            Kind::Wait => self.wait_exited(&exit),
        }
    }

    pub(crate) fn reap(&mut self) {
        // While stopping, what a service's process leaves behind in its process group (a
        // background job of a shell script, say) is killed as that process is reaped.
        let sweep = self.shutdown_deadline.is_some();
        for exit in self.children.reap(false, sweep) {
            self.on_exit(exit);
        }
    }

    // ---------------------------------------------------------------- reload

    // ---------------------------------------------------------------- shutdown

    /// SIGTERM/SIGINT: stop listening, SIGTERM every child, SIGKILL what is left after the
    /// grace period. A second signal skips the grace period.
    pub(crate) fn shutdown(&mut self, sig: i32) {
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

    pub(crate) fn kill_remaining(&mut self) {
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

/// Keep a socket we bound in systemd's fd store (see [`notify::store_fd`]).
pub(crate) fn store(b: &sockets::Bound) {
    if let Some(name) = sockets::store_name(&b.addr) {
        notify::store_fd(std::os::fd::AsFd::as_fd(&b.socket), &name);
    }
}

/// Send `sig` to a child's whole process group (every child leads its own session, so its
/// pgid is its pid): what it started, a shell's background jobs included, gets it too.
pub(crate) fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the process group of a child we started and have not reaped (its
    // pid, hence its pgid, cannot have been reused).
    unsafe { libc::kill(-pid, sig) };
}

/// Stop polling a service's listeners (clients then wait in the kernel backlog).
pub(crate) fn deregister(registry: &mio::Registry, svc: &mut Svc) {
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
pub(crate) fn prepare_sockets(svc: &mut Svc) {
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
pub(crate) fn attach_filters(svc: &mut Svc) {
    let none = superserver_config::AccessRules::default();
    let rules = if svc.def.mode == Mode::Wait {
        &svc.def.extra().access
    } else {
        &none
    };
    for (slot, listen) in svc.slots.iter_mut().zip(&svc.def.listen) {
        let Some(b) = &slot.bound else { continue };
        // Socket filters are for IP peers: a Unix socket has none to attach or detach.
        if let ListenAddr::Unix(_) = b.addr {
            continue;
        }
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
pub(crate) fn give_back_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// True when any of `fds` has something to read right now.
pub(crate) fn any_readable(fds: &[RawFd]) -> bool {
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
