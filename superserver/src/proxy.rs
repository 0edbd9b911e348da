//! PROXY protocol on nowait services: the header a trusted balancer puts before the client's
//! bytes is read here, in the event loop, before any process starts. A connection from an
//! untrusted address, a malformed header, or one not complete in `proxy_timeout` is closed
//! and logged and costs no process; a v2 `LOCAL` connection (the balancer's health check) is
//! closed without one. Then the connection is handled as if the client had connected
//! directly: allow/deny, `max_per_source`, the logs and the child's environment see the
//! client. The rules and the parsing are the library's ([`small_services::proxy`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use small_services::proxy::{self, Header, Step, Version};
use superserver_config::ProxyVersion;

use crate::daemon::{Daemon, Source, Timer};

/// Tokens of connections waiting for their header count up from here: above the services'
/// tokens, below the control clients'.
const HEADER_BASE: usize = usize::MAX / 4;

/// A connection whose header has not all arrived.
struct Waiting {
    svc_id: u64,
    slot: usize,
    conn: socket2::Socket,
    balancer: SocketAddr,
    due: Instant,
}

/// A connection waiting for its header, across an in-place upgrade: its descriptor stays
/// open through the exec, and the new image goes on waiting for the rest of its time.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SavedHeader {
    pub(crate) fd: i32,
    pub(crate) service: String,
    pub(crate) slot: usize,
    pub(crate) balancer: SocketAddr,
    pub(crate) left_ms: u64,
}

/// The connections waiting for their header (each also counts in its service's `waiting`,
/// so that `max_instances` bounds them).
#[derive(Default)]
pub(crate) struct Headers {
    waiting: HashMap<Token, Waiting>,
    next: usize,
}

impl Headers {
    pub(crate) fn is_header(token: Token) -> bool {
        (HEADER_BASE..usize::MAX / 2).contains(&token.0)
    }
}

/// Where a proxied connection came from: the balancer, and the address the client reached.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Via {
    pub(crate) balancer: SocketAddr,
    pub(crate) destination: SocketAddr,
}

pub(crate) fn version(v: ProxyVersion) -> Version {
    match v {
        ProxyVersion::V1 => Version::V1,
        ProxyVersion::V2 => Version::V2,
        ProxyVersion::Any => Version::Any,
    }
}

impl<S: Source> Daemon<S> {
    /// A connection accepted on service `i`, which speaks the PROXY protocol: refuse it if it
    /// does not come from a trusted balancer, serve it if its header is already here, else
    /// wait for the rest (within the timeout).
    pub(crate) fn proxy_accepted(
        &mut self,
        i: usize,
        slot: usize,
        conn: socket2::Socket,
        peer: Option<SocketAddr>,
    ) {
        let svc = &mut self.services[i];
        let Some(rules) = svc.def.proxy.as_deref() else {
            return;
        };
        let Some(balancer) = peer else { return };
        if !proxy::trusted(&rules.from, balancer.ip()) {
            let why = format!("{} is not in proxy_from", balancer.ip());
            self.proxy_refused(i, &balancer, &why);
            return;
        }
        if svc.at_capacity() {
            // overflow = "close" (a holding service does not accept at capacity).
            svc.counters.refused_overflow += 1;
            let why = format!("max_instances ({}) reached", svc.def.max_instances);
            self.proxy_refused(i, &balancer, &why);
            return;
        }
        let (svc_id, timeout) = (svc.id, rules.timeout);
        // Peeked at without blocking the loop; the child gets it back in blocking mode.
        if let Err(e) = conn.set_nonblocking(true) {
            log::error!(
                "{}: {balancer}: cannot set O_NONBLOCK: {e}; closed",
                svc.def.name
            );
            return;
        }
        let step = self.read_step(i, &conn);
        if !matches!(step, Step::More) {
            self.header_done(i, slot, conn, balancer, step);
            return;
        }
        // Not all here: watch the connection until the header is complete or too late.
        let waiting = Waiting {
            svc_id,
            slot,
            conn,
            balancer,
            due: Instant::now() + timeout,
        };
        if let Err(e) = self.wait_for_header(i, waiting) {
            log::error!(
                "{}: cannot watch a connection: {e}; closed",
                self.services[i].def.name
            );
        }
    }

    /// Watch a connection of service `i` until its header is complete or `due` (it counts
    /// against `max_instances` meanwhile). On error the connection is closed.
    fn wait_for_header(&mut self, i: usize, waiting: Waiting) -> std::io::Result<()> {
        let token = Token(HEADER_BASE + self.headers.next);
        self.headers.next = (self.headers.next + 1) % (usize::MAX / 4 - 1);
        self.poll.registry().register(
            &mut SourceFd(&waiting.conn.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        let due = waiting.due;
        self.services[i].waiting += 1;
        self.headers.waiting.insert(token, waiting);
        self.add_timer(due, Timer::Header(token.0));
        self.rearm(i);
        Ok(())
    }

    /// What an in-place upgrade carries of the connections waiting for their header.
    pub(crate) fn save_headers(&self) -> Vec<SavedHeader> {
        let now = Instant::now();
        self.headers
            .waiting
            .values()
            .filter_map(|w| {
                let svc = &self.services[self.find(w.svc_id)?];
                Some(SavedHeader {
                    fd: w.conn.as_raw_fd(),
                    service: svc.def.name.clone(),
                    slot: w.slot,
                    balancer: w.balancer,
                    left_ms: w.due.saturating_duration_since(now).as_millis() as u64,
                })
            })
            .collect()
    }

    /// The new image takes the waiting connections over (one whose service is gone closes).
    pub(crate) fn restore_headers(&mut self, saved: Vec<SavedHeader>) {
        for h in saved {
            // SAFETY: the old image left this connection open at this number for us.
            let conn = unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(h.fd) };
            let Some(i) = self.services.iter().position(|s| s.def.name == h.service) else {
                continue;
            };
            if self.services[i].def.proxy.is_none() {
                continue;
            }
            let waiting = Waiting {
                svc_id: self.services[i].id,
                slot: h.slot,
                conn,
                balancer: h.balancer,
                due: Instant::now() + std::time::Duration::from_millis(h.left_ms),
            };
            let _ = self.wait_for_header(i, waiting); // on error it is closed
        }
    }

    /// A connection waiting for its header is readable.
    pub(crate) fn header_readable(&mut self, token: Token) {
        let Some(waiting) = self.headers.waiting.get(&token) else {
            return;
        };
        let step = match self.find(waiting.svc_id) {
            Some(i) => self.read_step(i, &waiting.conn),
            None => Step::Invalid(String::new()), // its service was removed
        };
        if matches!(step, Step::More) {
            return; // still incomplete: same token, same deadline
        }
        let Some(w) = self.stop_waiting(token) else {
            return;
        };
        if let Some(i) = self.find(w.svc_id) {
            self.header_done(i, w.slot, w.conn, w.balancer, step);
        }
    }

    /// A header's deadline: whatever has not completed is refused.
    pub(crate) fn header_deadline(&mut self, token: usize) {
        let Some(waiting) = self.stop_waiting(Token(token)) else {
            return;
        };
        if let Some(i) = self.find(waiting.svc_id) {
            let timeout = self.services[i]
                .def
                .proxy
                .as_ref()
                .map(|p| p.timeout)
                .unwrap_or_default();
            let why = format!(
                "sent no complete PROXY header in {}",
                crate::children::human(timeout)
            );
            self.proxy_refused(i, &waiting.balancer, &why);
        }
    }

    /// Forget a waiting connection (deregistered; its service's count goes down).
    fn stop_waiting(&mut self, token: Token) -> Option<Waiting> {
        let waiting = self.headers.waiting.remove(&token)?;
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&waiting.conn.as_raw_fd()));
        if let Some(i) = self.find(waiting.svc_id) {
            let svc = &mut self.services[i];
            svc.waiting = svc.waiting.saturating_sub(1);
            self.rearm(i);
        }
        Some(waiting)
    }

    /// Peek at what arrived on a connection of service `i` (and consume a complete header).
    fn read_step(&self, i: usize, conn: &socket2::Socket) -> Step {
        let Some(rules) = self.services[i].def.proxy.as_deref() else {
            return Step::Invalid("the service no longer speaks the PROXY protocol".into());
        };
        match proxy::try_read(conn, version(rules.version)) {
            Ok(step) => step,
            Err(e) => Step::Invalid(format!("reading its PROXY header failed: {e}")),
        }
    }

    /// A header is complete (or will never be): serve, or refuse.
    fn header_done(
        &mut self,
        i: usize,
        slot: usize,
        conn: socket2::Socket,
        balancer: SocketAddr,
        step: Step,
    ) {
        if matches!(step, Step::Done { .. }) && conn.set_nonblocking(false).is_err() {
            return; // a child must not get a non-blocking connection it did not ask for
        }
        match step {
            Step::More => {}
            Step::Invalid(why) => self.proxy_refused(i, &balancer, &why),
            Step::Done {
                header: Header::Local,
                ..
            } => {
                // The balancer's own connection (its health check): it reached us, which is
                // all it asks; no process.
                self.services[i].counters.proxy_local += 1;
                log::debug!(
                    "{}: {balancer}: PROXY LOCAL (a health check); closed",
                    self.services[i].def.name
                );
            }
            Step::Done {
                header: Header::Unknown,
                ..
            } => {
                // The spec: use the connection's own addresses.
                self.handle_connection(i, slot, conn, Some(balancer), None);
            }
            Step::Done {
                header:
                    Header::Proxied {
                        source,
                        destination,
                    },
                ..
            } => {
                let via = Via {
                    balancer,
                    destination,
                };
                self.handle_connection(i, slot, conn, Some(source), Some(via));
            }
        }
    }

    /// Close a connection refused before its header was read: counted, and logged at most
    /// once a second per service.
    fn proxy_refused(&mut self, i: usize, balancer: &SocketAddr, why: &str) {
        let svc = &mut self.services[i];
        svc.counters.refused_proxy += 1;
        if let Some(more) = svc.lim_mut().refusals.allow(Instant::now()) {
            let more = if more > 0 {
                format!(" (and {more} more refused since the last such line)")
            } else {
                String::new()
            };
            log::warn!(
                "{}: {} {why}; closed{more}",
                svc.def.name,
                crate::nowait::peer_label(Some(*balancer), svc.def.log_peer)
            );
        }
    }
}
