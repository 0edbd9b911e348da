//! SIGHUP: read the whole configuration again and apply it as a diff; a service that did not
//! change keeps its sockets and processes.

use std::collections::HashMap;
use std::io;
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

impl<S: Source> Daemon<S> {
    /// SIGHUP: read the whole file again; apply it as a diff only if all of it is valid.
    pub(crate) fn reload(&mut self) -> Reloaded {
        if self.shutdown_deadline.is_some() {
            return Reloaded::Rejected(vec!["the superserver is stopping".into()]);
        }
        notify::reloading();
        log::info!("reload: reading the configuration");
        let origin = self.source.origin();
        let loaded = self
            .source
            .load()
            .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>());
        let prepared = loaded.and_then(|config| {
            crate::spawn::prepare_all(&config.services)
                .map(|templates| (config, templates))
                .map_err(|errors| errors.iter().map(|e| format!("{origin}: {e}")).collect())
        });
        match prepared {
            Ok((config, templates)) => {
                let done = self.apply(config, templates);
                give_back_heap();
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

    pub(crate) fn apply(&mut self, config: Config, templates: Vec<Template>) -> Reloaded {
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
            self.retired.insert(svc.def.name.clone(), svc.counters);
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
            "reload: {} kept, {} added{}, {} changed{}, {} removed{}",
            kept.len(),
            added.len(),
            list_names(&added),
            changed.len(),
            list_names(&changed),
            removed.len(),
            list_names(&removed)
        );
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
    pub(crate) fn fill_slots(&mut self, svc: &mut Svc, pool: &mut Pool) {
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
                        store(&b);
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

    pub(crate) fn retry_binds(&mut self, i: usize) {
        self.disarm(i);
        let mut svc = self.services.remove(i);
        let mut pool = Pool::default();
        self.fill_slots(&mut svc, &mut pool);
        prepare_sockets(&mut svc);
        self.services.insert(i, svc);
    }
}

pub(crate) fn list_names(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}
