//! SIGHUP: read the whole configuration again and apply it as a diff; a service that did not
//! change keeps its sockets and processes.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mio::Token;
use superserver_config::{Config, ListenAddr, Mode};

use crate::daemon::*;
use crate::limits::TokenBucket;
use crate::notify;
use crate::sockets::{self, Pool};
use crate::spawn::Template;
use crate::state::*;

/// What a reload did: applied as a diff (the names in each group), or rejected with every
/// error (the running configuration stays).
pub(crate) enum Reloaded {
    Applied {
        kept: Vec<String>,
        added: Vec<String>,
        changed: Vec<String>,
        removed: Vec<String>,
    },
    Rejected(Vec<String>),
}

/// The event loop's token for "the background read of a reload is done".
pub(crate) const RELOADED: Token = Token(usize::MAX - 2);

/// A configuration read, checked and with its programs prepared, or every error; and how long
/// that took.
type Prepared = (Result<(Config, Vec<Template>), Vec<String>>, Duration);

/// Read, parse and validate the whole configuration and prepare every service's program: all
/// of a reload that does not touch the running state, so it may run on any thread.
fn load_and_prepare<S: Source>(source: &S) -> Prepared {
    let started = Instant::now();
    let origin = source.origin();
    let loaded = source
        .load()
        .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>());
    let prepared = loaded.and_then(|config| {
        crate::spawn::prepare_all(&config.services)
            .map(|templates| (config, templates))
            .map_err(|errors| errors.iter().map(|e| format!("{origin}: {e}")).collect())
    });
    (prepared, started.elapsed())
}

/// A SIGHUP's reload in progress: a thread reads and checks the file while the loop serves,
/// hands the result over on a channel and wakes the loop ([`RELOADED`]); the loop applies it.
/// A SIGHUP that arrives meanwhile is remembered, and the file read again once this one is
/// applied (the change that signal announces may have come after the thread read the file).
#[derive(Default)]
pub(crate) struct Background {
    /// Made at the first SIGHUP (an eventfd registered with the poll; it never fires idle).
    waker: Option<Arc<mio::Waker>>,
    running: Option<(std::thread::JoinHandle<()>, mpsc::Receiver<Prepared>)>,
    again: bool,
    /// Control clients whose `reload` the read now running answers.
    answer: Vec<Token>,
    /// Control clients that asked while a read was running: the next read answers them (the
    /// running one may have read the file before the change they announce).
    next: Vec<Token>,
}

impl<S: Source> Daemon<S> {
    /// SIGHUP: read the whole file again on a thread of its own; [`Daemon::reload_loaded`]
    /// applies it as a diff when all of it is valid. Services keep serving meanwhile.
    pub(crate) fn reload_in_background(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        if self.background.running.is_some() {
            self.background.again = true;
            return;
        }
        notify::reloading();
        log::info!("reload: reading the configuration");
        self.background.answer = std::mem::take(&mut self.background.next);
        let waker = match &self.background.waker {
            Some(w) => Ok(w.clone()),
            None => mio::Waker::new(self.poll.registry(), RELOADED).map(Arc::new),
        };
        let waker = match waker {
            Ok(w) => w,
            Err(e) => {
                log::warn!("reload: cannot make a waker ({e}); reading in the event loop");
                let prepared = load_and_prepare(&self.source);
                self.finish_and_answer(prepared);
                return;
            }
        };
        self.background.waker = Some(waker.clone());
        let source = self.source.clone();
        let (tx, rx) = mpsc::channel();
        let spawned = spawn_quiet("reload", move || {
            let _ = tx.send(load_and_prepare(&source));
            let _ = waker.wake();
        });
        match spawned {
            Ok(handle) => self.background.running = Some((handle, rx)),
            Err(e) => {
                log::warn!("reload: cannot start a thread ({e}); reading in the event loop");
                let prepared = load_and_prepare(&self.source);
                self.finish_and_answer(prepared);
            }
        }
    }

    /// The background read is done ([`RELOADED`]): apply it, or keep the running
    /// configuration; then read again if a SIGHUP came meanwhile.
    pub(crate) fn reload_loaded(&mut self) {
        let Some((handle, rx)) = self.background.running.take() else {
            return;
        };
        let prepared = match rx.try_recv() {
            Ok(p) => p,
            Err(mpsc::TryRecvError::Empty) => {
                self.background.running = Some((handle, rx));
                return;
            }
            // The thread ended without an answer (it panicked: with panic = "abort" it cannot).
            Err(mpsc::TryRecvError::Disconnected) => (
                Err(vec!["reading the configuration failed".into()]),
                Duration::ZERO,
            ),
        };
        let _ = handle.join();
        if self.shutdown_deadline.is_some() {
            log::info!("reload: the superserver is stopping; keeping the running configuration");
            self.background.again = false;
            let mut waiting = std::mem::take(&mut self.background.answer);
            waiting.append(&mut self.background.next);
            let stopping = Reloaded::Rejected(vec!["the superserver is stopping".into()]);
            self.reload_answered(waiting, &stopping);
            return;
        }
        self.finish_and_answer(prepared);
        if std::mem::take(&mut self.background.again) {
            self.reload_in_background();
        }
    }

    /// Apply a read configuration and answer the control clients that waited for it.
    fn finish_and_answer(&mut self, prepared: Prepared) {
        let waiting = std::mem::take(&mut self.background.answer);
        // The control socket's answer lists the kept services; a SIGHUP's log line counts them.
        let done = self.finish_reload(prepared, !waiting.is_empty());
        self.reload_answered(waiting, &done);
    }

    /// The control socket's `reload` from client `token`: read on the reload thread like a
    /// SIGHUP's (after any read already running, which may predate the change the client
    /// announces). `Some` is an answer at once (the superserver is stopping); `None`: the
    /// client is answered when the read is applied.
    pub(crate) fn reload_for(&mut self, token: Token) -> Option<Reloaded> {
        if self.shutdown_deadline.is_some() {
            return Some(Reloaded::Rejected(vec![
                "the superserver is stopping".into(),
            ]));
        }
        self.background.next.push(token);
        if self.background.running.is_some() {
            self.background.again = true;
        } else {
            self.reload_in_background();
        }
        None
    }

    /// Apply a read configuration, or log why it is refused and keep the running one.
    /// (`names_kept`: see [`Daemon::apply`].)
    fn finish_reload(&mut self, (prepared, read): Prepared, names_kept: bool) -> Reloaded {
        match prepared {
            Ok((config, templates)) => {
                // (The heap is given back by the thread that frees the old table.)
                let done = self.apply(config, templates, read, names_kept);
                notify::ready(&format!("serving {} service(s)", self.services.len()));
                done
            }
            Err(errors) => {
                for e in &errors {
                    log::error!("reload: {e}");
                }
                log::error!(
                    "reload: {} error(s); keeping the running configuration",
                    errors.len()
                );
                notify::ready("reload failed; running the previous configuration");
                Reloaded::Rejected(errors)
            }
        }
    }

    /// Apply `config` as a diff (`read`: how long reading and checking it took, for the log).
    ///
    /// When the enabled services are the running ones, in the same order (a reload that
    /// changes some services), each is updated where it is; otherwise the table is rebuilt in
    /// the new order first. Either way nothing is moved or freed per kept service: the
    /// definitions and templates a reload replaces are swapped into the new configuration's
    /// vectors, which a thread of their own frees afterwards. `kept` in the answer is filled
    /// only when `names_kept` asks for it (the control socket's answer lists them; ten
    /// thousand names are not copied for a SIGHUP's log line, which counts them).
    pub(crate) fn apply(
        &mut self,
        config: Config,
        templates: Vec<Template>,
        read: Duration,
        names_kept: bool,
    ) -> Reloaded {
        let started = Instant::now();
        let started_cpu = thread_cpu_time();
        self.global = config.global;
        let mut defs = config.services;
        // (An in-place collect: `Option<Template>` is no larger.)
        let mut templates: Vec<Option<Template>> = templates.into_iter().map(Some).collect();
        // A disabled service (`enable = false`) is not served: one that ran is removed.
        let enabled: Vec<usize> = (0..defs.len()).filter(|&k| defs[k].enabled).collect();
        let same = enabled.len() == self.services.len()
            && enabled
                .iter()
                .zip(&self.services)
                .all(|(&k, svc)| defs[k].name == svc.def.name);
        let mut pool = Pool::default();
        let (mut kept, mut added, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let mut kept_count = 0;
        // Services that need sockets; `fresh`: added by this reload (nothing to compare).
        let mut needs: Vec<usize> = Vec::new();
        let mut fresh = vec![false; enabled.len()];
        let mut gone: Vec<Svc> = Vec::new();
        if !same {
            let mut old: Vec<Option<Svc>> = std::mem::take(&mut self.services)
                .into_iter()
                .map(Some)
                .collect();
            let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(enabled.len());
            for (i, &k) in enabled.iter().enumerate() {
                by_name.insert(defs[k].name.as_str(), i);
            }
            // Where each running service goes in the new table (None: removed).
            let mut place: Vec<Option<Svc>> = Vec::with_capacity(enabled.len());
            place.resize_with(enabled.len(), || None);
            for svc in old.iter_mut() {
                let to = svc.as_ref().and_then(|s| by_name.get(s.def.name.as_str()));
                if let Some(&i) = to {
                    place[i] = svc.take();
                }
            }
            drop(by_name);
            gone = old.into_iter().flatten().collect();
            self.services.reserve_exact(enabled.len());
            for (i, svc) in place.into_iter().enumerate() {
                let svc = match svc {
                    Some(svc) => svc,
                    None => {
                        let k = enabled[i];
                        added.push(defs[k].name.clone());
                        fresh[i] = true;
                        needs.push(i);
                        let template = templates[k].take().expect("one template per service");
                        self.new_svc(defs[k].clone(), template)
                    }
                };
                self.services.push(svc);
            }
            self.reindex();
        }

        for (i, &k) in enabled.iter().enumerate() {
            if fresh[i] {
                continue;
            }
            let Daemon {
                services,
                poll,
                next_generation,
                ..
            } = self;
            let svc = &mut services[i];
            // Every service gets the fresh template: `pass_env` values and the program's
            // check are as of this reload.
            let template = templates[k].as_mut().expect("one template per service");
            std::mem::swap(&mut svc.template, template);
            let def = &mut defs[k];
            if svc.def == *def {
                kept_count += 1;
                if names_kept {
                    kept.push(def.name.clone());
                }
                continue;
            }
            changed.push(def.name.clone());
            let sockets_changed = svc.def.listen != def.listen
                || svc.def.backlog != def.backlog
                || svc.def.extra().unix_socket != def.extra().unix_socket
                || svc.def.mode != def.mode;
            if svc.def.extra().rate != def.extra().rate {
                let bucket = def
                    .extra()
                    .rate
                    .map(|r| TokenBucket::new(r, Instant::now()));
                if bucket.is_some() || svc.limited.is_some() {
                    let l = svc.lim_mut();
                    l.bucket = bucket;
                    l.rate_until = None;
                }
            }
            if svc.def.mode != def.mode || svc.def.extra().per_source != def.extra().per_source {
                svc.holding = false;
            }
            if sockets_changed {
                deregister(poll.registry(), svc);
                for slot in std::mem::take(&mut svc.slots) {
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
                std::mem::swap(&mut svc.def, def);
                let generation = *next_generation;
                *next_generation = generation.wrapping_add(1);
                svc.slots = (0..svc.def.listen.len())
                    .map(|j| Slot {
                        bound: None,
                        token: crate::state::slot_token(svc.id, generation, j),
                    })
                    .collect();
                needs.push(i);
            } else {
                std::mem::swap(&mut svc.def, def);
                // allow/deny may have changed. The blocking mode stays: a running wait-mode
                // process shares it (O_NONBLOCK belongs to the open socket, not to our fd),
                // and switching its non-blocking listeners to blocking would hang its accept.
                attach_filters(svc);
            }
        }
        // What the new table replaced, freed off the loop once it is applied.
        let garbage = (templates, defs);

        // Removed services: close their sockets (unless a new service takes the address) and
        // ask their wait-mode process to drain.
        let mut removed: Vec<String> = gone.iter().map(|s| s.def.name.clone()).collect();
        removed.sort();
        for mut svc in gone {
            deregister(self.poll.registry(), &mut svc);
            for &pid in &svc.wait_children {
                log::info!("{}: removed; SIGTERM to pid {pid}", svc.def.name);
                signal_group(pid, libc::SIGTERM);
            }
            self.retired.insert(svc.def.name.clone(), svc.counters);
            for slot in svc.slots {
                if let Some(b) = slot.bound {
                    pool.put(b);
                }
            }
        }

        // What no service wants any more retires: it stays open until the new addresses
        // are bound beside it (a narrowed 0.0.0.0:P -> 127.0.0.1:P shares the port for a
        // moment) and what it queued is accepted, so the narrowing refuses nobody.
        // (Nothing to look up when no socket was put back: the common reload.)
        if !pool.is_empty() {
            let mut wanted: std::collections::HashSet<&ListenAddr> =
                std::collections::HashSet::with_capacity(self.services.len());
            wanted.extend(
                self.services
                    .iter()
                    .flat_map(|svc| svc.def.listen.iter().map(|l| &l.addr)),
            );
            pool.retire_unwanted(|addr| wanted.contains(addr));
        }

        for i in needs {
            self.fill_slots(i, &mut pool);
            prepare_sockets(&mut self.services[i]);
        }
        let retiring = pool.take_retiring();
        // Closes what nobody took (and removes our Unix socket files), and takes it out of
        // systemd's fd store.
        for gone in pool.drain().iter().chain(&retiring) {
            if let Some(name) = sockets::store_name(&gone.addr) {
                notify::unstore_fd(&name);
            }
        }
        for i in 0..self.services.len() {
            self.rearm(i);
        }
        for old in retiring {
            self.accept_retiring(old);
        }
        log::info!(
            "reload: {} kept, {} added{}, {} changed{}, {} removed{} (read in {:.1} ms, \
             applied in {:.1} ms, {:.1} ms of CPU)",
            kept_count,
            added.len(),
            list_names(&added),
            changed.len(),
            list_names(&changed),
            removed.len(),
            list_names(&removed),
            read.as_secs_f64() * 1000.0,
            started.elapsed().as_secs_f64() * 1000.0,
            thread_cpu_time().saturating_sub(started_cpu).as_secs_f64() * 1000.0
        );
        drop_off_the_loop(garbage);
        Reloaded::Applied {
            kept,
            added,
            changed,
            removed,
        }
    }

    /// A nowait listener that no service wants any more: connections the kernel completed on
    /// it before its replacement was bound are accepted and served by the service that now
    /// listens on their address (closed if none does), then the socket is closed. A
    /// wait-mode socket is left to the process that holds it.
    pub(crate) fn accept_retiring(&mut self, old: sockets::Bound) {
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
                Some((i, slot)) => self.connection(i, slot, conn, peer.as_socket()),
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
    pub(crate) fn fill_slots(&mut self, i: usize, pool: &mut Pool) {
        let Daemon {
            services,
            global,
            timers,
            ..
        } = self;
        let svc = &mut services[i];
        let mut failed = false;
        let empty = svc.slots.iter_mut().zip(&svc.def.listen);
        for (slot, listen) in empty.filter(|(s, _)| s.bound.is_none()) {
            slot.bound = match pool.take(listen) {
                Some(b) => {
                    // A kept socket gets this service's current backlog and file mode/owner.
                    if let Err(e) =
                        sockets::reapply(&b, svc.def.backlog, &svc.def.extra().unix_socket)
                    {
                        log::error!("{}: {e}", svc.def.name);
                    }
                    Some(b)
                }
                None => {
                    match pool.bind(&listen.addr, svc.def.backlog, &svc.def.extra().unix_socket) {
                        Ok(b) => {
                            log::info!("{}: listening on {}", svc.def.name, listen.addr);
                            store(&b);
                            Some(b)
                        }
                        Err(e) => {
                            log::error!("{}: {e}; will retry", svc.def.name);
                            failed = true;
                            None
                        }
                    }
                }
            };
        }
        if failed {
            let delay = match svc.lim().bind_retry {
                Some((_, d)) => (d * 2).min(global.restart_backoff_max),
                None => global.restart_backoff_min.max(Duration::from_millis(500)),
            };
            let at = Instant::now() + delay;
            svc.lim_mut().bind_retry = Some((at, delay));
            timers.push(std::cmp::Reverse((at, Timer::Service(svc.id))));
        } else {
            if let Some(l) = svc.limited.as_deref_mut() {
                l.bind_retry = None;
            }
        }
    }

    pub(crate) fn retry_binds(&mut self, i: usize) {
        self.disarm(i);
        let mut pool = Pool::default();
        self.fill_slots(i, &mut pool);
        prepare_sockets(&mut self.services[i]);
    }
}

/// Free what a reload replaced (the old programs' templates, the definitions not kept) on a
/// thread of its own, and then give the memory back to the system, while the loop serves: ten
/// thousand of them take milliseconds to free.
fn drop_off_the_loop(garbage: impl Send + 'static) {
    let spawned = spawn_quiet("reload-free", move || {
        drop(garbage);
        give_back_heap();
    });
    // Without a thread, it was freed here (the closure is dropped): give the heap back now.
    if let Err(e) = spawned {
        log::debug!("reload: cannot start a thread to free the old table ({e})");
        give_back_heap();
    }
}

/// Start a helper thread with every signal blocked, so that signals keep going to the event
/// loop's thread (whose handlers wake the loop, and which blocks them itself across an
/// in-place upgrade's exec). They are blocked around the spawn, so the thread starts with them
/// blocked and none can land in between. The thread runs at the lowest priority (nice 19):
/// when it shares a CPU with the loop (a busy or single-CPU machine, a superserver pinned to
/// one CPU), the loop runs first and its services do not wait for the reading.
fn spawn_quiet<F: FnOnce() + Send + 'static>(
    name: &str,
    f: F,
) -> io::Result<std::thread::JoinHandle<()>> {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old));
    let spawned = std::thread::Builder::new().name(name.into()).spawn(|| {
        // SAFETY: gettid(2) and setpriority(2) on this thread's own id change only its nice
        // value (Linux gives each thread its own); a failure leaves it at the loop's.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS as _, tid, 19);
        }
        f()
    });
    if blocked.is_ok() {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    spawned
}

/// The CPU time this thread has used: what applying a reload cost the loop, apart from the
/// time a busy machine gave other processes meanwhile.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into the valid, owned `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn list_names(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}
