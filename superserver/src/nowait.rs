//! Nowait mode: accept, check access and limits before any fork, start one process per
//! connection with the peer in its environment, end children that overrun `max_duration`.

use std::cmp::Reverse;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use ipnet::IpNet;
use superserver_config::{ConnectionPassing, ListenAddr, LogPeer, Overflow};

use crate::children::{self, Child, Exit, Kind};
use crate::daemon::*;
use crate::limits::{self};
use crate::proxy::Via;
use crate::spawn::{Env, Fds};

impl<S: Source> Daemon<S> {
    /// Nowait: accept the pending connections the limits allow, at most [`ACCEPT_BATCH`] per
    /// turn of the loop: under steady load the queue never empties, and reaping, timers, the
    /// control socket and the agent must get their turn. A listener with more to take is
    /// noted in `more`, and the loop polls again without sleeping (mio is edge-triggered: no
    /// new event would come for what is already queued).
    pub(crate) fn accept_all(&mut self, i: usize, slot: usize) {
        for _ in 0..ACCEPT_BATCH {
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
                    svc.lim_mut().pause_until = Some(at);
                    let id = svc.id;
                    self.add_timer(at, Timer::Service(id));
                    self.rearm(i);
                    return;
                }
            };
            self.connection(i, slot, conn, peer.as_socket());
        }
        let id = self.services[i].id;
        if !self.more.contains(&(id, slot)) {
            self.more.push((id, slot));
        }
    }

    /// Listeners that had more queued at the end of their batch: take the next batch.
    pub(crate) fn accept_more(&mut self) {
        for (id, slot) in std::mem::take(&mut self.more) {
            if let Some(i) = self.find(id)
                && self.services[i].armed
                && self.services[i].def.mode == superserver_config::Mode::Nowait
            {
                self.accept_all(i, slot);
            }
        }
    }

    /// A connection accepted for service `i`: counted, then served, or first its PROXY
    /// header read (see [`crate::proxy`]).
    pub(crate) fn connection(
        &mut self,
        i: usize,
        slot: usize,
        conn: socket2::Socket,
        peer: Option<SocketAddr>,
    ) {
        self.services[i].counters.accepted += 1;
        if self.services[i].def.proxy.is_some() {
            self.proxy_accepted(i, slot, conn, peer);
        } else {
            self.handle_connection(i, slot, conn, peer, None);
        }
    }

    /// Check access and limits for the client `peer`, then start its process. `via` is set
    /// when a balancer relayed the connection (PROXY protocol): `peer` is then the client it
    /// named.
    pub(crate) fn handle_connection(
        &mut self,
        i: usize,
        slot: usize,
        conn: socket2::Socket,
        peer: Option<SocketAddr>,
        via: Option<Via>,
    ) {
        let svc = &mut self.services[i];
        let mut peer_str = peer_label(peer, svc.def.log_peer);
        if let Some(via) = via {
            peer_str.push_str(" via ");
            peer_str.push_str(&peer_label(Some(via.balancer), svc.def.log_peer));
        }
        let refusal = if let Some(p) = peer
            && !svc.def.extra().access.is_empty()
            && !svc.def.extra().access.permits(p.ip())
        {
            svc.counters.refused_deny += 1;
            Some("denied by allow/deny".to_string())
        } else if svc.at_capacity() {
            // Only reachable with overflow = "close".
            svc.counters.refused_overflow += 1;
            Some(format!("max_instances ({}) reached", svc.def.max_instances))
        } else {
            None
        };
        let mut source = None;
        let refusal = refusal.or_else(|| match (svc.def.extra().per_source, peer) {
            (Some(limit), Some(p)) => {
                let key = limits::source_key(p.ip(), &limit);
                let sources = svc.lim_mut().sources.get_or_insert_with(Default::default);
                if sources.try_add(key, limit.max) {
                    source = Some(key);
                    None
                } else {
                    svc.counters.refused_per_source += 1;
                    Some(format!("has {} connections (max_per_source)", limit.max))
                }
            }
            _ => None,
        });
        if let Some(why) = refusal {
            if let Some(more) = svc.lim_mut().refusals.allow(Instant::now()) {
                let more = if more > 0 {
                    format!(" (and {more} more refused since the last such line)")
                } else {
                    String::new()
                };
                log::warn!("{}: {peer_str} {why}; closed{more}", svc.def.name);
            }
            return;
        }
        if let Some(bucket) = svc.limited.as_deref_mut().and_then(|l| l.bucket.as_mut()) {
            bucket.try_take(Instant::now());
        }
        let local = match (via, svc.def.listen.get(slot)) {
            (Some(via), _) => Some(via.destination),
            (None, Some(listen)) => local_addr(&listen.addr, &conn),
            (None, None) => conn.local_addr().ok().and_then(|a| a.as_socket()),
        };
        let mut env = Env::with_capacity(256);
        peer_env(&mut env, peer, local);
        if let Some(via) = via {
            env.set("PROXY_ADDR", via.balancer.ip());
            env.set("PROXY_PORT", via.balancer.port());
        }
        let fds = match svc.def.connection {
            ConnectionPassing::Stdio => Fds::Stdio(conn.as_raw_fd()),
            ConnectionPassing::ListenFds => {
                env.set("LISTEN_FDS", "1");
                env.set("LISTEN_FDNAMES", "connection");
                Fds::Fd3(conn.as_raw_fd())
            }
        };
        let listen_pid = svc.def.connection == ConnectionPassing::ListenFds;
        match svc.template.spawn(
            &svc.def.argv,
            fds,
            &env,
            listen_pid,
            self.devnull.as_raw_fd(),
        ) {
            Ok(pid) => {
                svc.counters.spawned += 1;
                svc.running += 1;
                log::debug!("{}: {peer_str} → pid {pid}", svc.def.name);
                let started = Instant::now();
                if let Some(limit) = svc.def.extra().max_duration {
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
                        proxied: via.is_some(),
                    },
                };
                self.children.insert(pid, child);
            }
            Err(e) => {
                svc.counters.spawn_failures += 1;
                log::error!(
                    "{}: {peer_str}: cannot start {}: {e}; closed",
                    svc.def.name,
                    svc.template.what()
                );
                if let Some(key) = source {
                    if let Some(sources) =
                        svc.limited.as_deref_mut().and_then(|l| l.sources.as_mut())
                    {
                        sources.remove(&key);
                    }
                }
            }
        }
        // `conn` is closed here: the child has its own copy.
    }

    /// A nowait child ran for its `max_duration`: SIGTERM to its process group, and SIGKILL
    /// after the shutdown grace period if it is still there.
    pub(crate) fn overrun(&mut self, pid: i32, started: Instant, kill: bool, now: Instant) {
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

    /// A nowait child ended: one log line, and its slot (and its source's) is free again.
    pub(crate) fn connection_exited(&mut self, exit: &Exit, peer: &str, source: &Option<IpNet>) {
        let i = self.find(exit.child.svc_id);
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
            if let Some(sources) = svc.limited.as_deref_mut().and_then(|l| l.sources.as_mut()) {
                sources.remove(key);
            }
        }
        if svc.holding && !svc.at_capacity() {
            svc.holding = false;
            log::info!("{}: below max_instances, accepting again", svc.def.name);
        }
        self.rearm(i);
    }
}

/// The local address of a connection: the configured one unless it is a wildcard.
pub(crate) fn local_addr(listen: &ListenAddr, conn: &socket2::Socket) -> Option<SocketAddr> {
    match listen {
        ListenAddr::Tcp(a) if !a.ip().is_unspecified() => Some(*a),
        ListenAddr::Tcp(_) => conn.local_addr().ok().and_then(|a| a.as_socket()),
        _ => None,
    }
}

/// The peer's identity for the child: UCSPI (`PROTO`, `TCPREMOTEIP`, …) and systemd's
/// `REMOTE_ADDR`/`REMOTE_PORT`.
pub(crate) fn peer_env(env: &mut Env, peer: Option<SocketAddr>, local: Option<SocketAddr>) {
    let Some(peer) = peer else {
        env.set("PROTO", "UNIX");
        return;
    };
    // (IPv4-mapped IPv6 shows as IPv4.)
    env.set("PROTO", "TCP");
    env.set("TCPREMOTEIP", peer.ip());
    env.set("TCPREMOTEPORT", peer.port());
    env.set("REMOTE_ADDR", peer.ip());
    env.set("REMOTE_PORT", peer.port());
    if let Some(local) = local {
        env.set("TCPLOCALIP", local.ip());
        env.set("TCPLOCALPORT", local.port());
    }
}

/// The client as a log line shows it (`log_peer`): "203.0.113.7:40112", "203.0.113.0/24",
/// or no address at all.
pub(crate) fn peer_label(peer: Option<SocketAddr>, how: LogPeer) -> String {
    let Some(peer) = peer else {
        return "unix".into();
    };
    match how {
        LogPeer::Full if peer.is_ipv4() => {
            // "203.0.113.7:40112", without the formatting machinery (once per connection).
            let mut label = Vec::with_capacity(21);
            crate::spawn::put_ip(&mut label, peer.ip());
            label.push(b':');
            crate::spawn::put_decimal(&mut label, u64::from(peer.port()));
            String::from_utf8(label).unwrap_or_default()
        }
        LogPeer::Full => peer.to_string(),
        LogPeer::Masked => {
            let masked = superserver_config::mask_peer(peer.ip());
            let bits = if masked.is_ipv4() { 24 } else { 48 };
            format!("{masked}/{bits}")
        }
        LogPeer::None => "a client".into(),
    }
}
