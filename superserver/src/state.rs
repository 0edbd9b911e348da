//! A service's run-time state: its sockets, its processes, its limits, and the one decision
//! whether its sockets are watched ([`Svc::wants_armed`]); what `status` reports is read from
//! the same fields ([`Svc::state`]), with the counters of what happened to it.

use std::time::{Duration, Instant, SystemTime};

use mio::Token;
use superserver_config::{Mode, Overflow, Service};

use crate::limits::{self, SourceCounts, TokenBucket};
use crate::sockets::Bound;
use crate::spawn::Template;

/// A listening socket's poll token: its service's id, a generation (an event still queued
/// for a socket a reload replaced is not taken for the one now in its slot), and its slot.
/// Always below `usize::MAX / 4`, where the other tokens start (ids stay below 2^38).
pub(crate) fn slot_token(id: u64, generation: u8, slot: usize) -> Token {
    const _: () = assert!(usize::BITS == 64, "poll tokens need a 64-bit usize");
    debug_assert!(slot <= 0xffff && id < 1 << 38);
    Token(((id as usize) << 24) | (usize::from(generation) << 16) | slot)
}

/// The service id and slot a [`slot_token`] names.
pub(crate) fn token_slot(token: Token) -> (u64, usize) {
    ((token.0 >> 24) as u64, token.0 & 0xffff)
}

/// One socket of a service, in the order of `def.listen` (which says what it is for).
pub(crate) struct Slot {
    pub(crate) bound: Option<Bound>,
    pub(crate) token: Token,
}

/// A service's run-time state.
pub(crate) struct Svc {
    /// Unique per instance: children and tokens refer to it.
    pub(crate) id: u64,
    pub(crate) def: Service,
    pub(crate) template: Template,
    pub(crate) slots: Box<[Slot]>,
    pub(crate) armed: bool,
    /// Wait mode: the processes holding the sockets (at most `instances`).
    pub(crate) wait_children: Vec<i32>,
    /// Nowait: running connection processes.
    pub(crate) running: u32,
    /// Nowait with the PROXY protocol: connections whose header has not all arrived (they
    /// count against `max_instances`, as the processes they will become).
    pub(crate) waiting: u32,
    /// An operator drained it (`superserver drain`): the agent answers `drain`.
    pub(crate) drained: bool,
    pub(crate) holding: bool,
    /// Back-off, rate limit and suspension, paused accepts, refusals, bind retries, per-source
    /// counts: allocated the first time the service needs any (read with [`Svc::lim`]).
    pub(crate) limited: Option<Box<Limited>>,
    /// What happened to it since the superserver started (kept across reloads).
    pub(crate) counters: Tally,
    /// How its last process ended.
    pub(crate) last_exit: Option<Box<LastExit>>,
}

/// What a service that met a limit or failed keeps: most services never do, and a table of
/// ten thousand should not carry a hundred bytes each for it.
#[derive(Debug, Default)]
pub(crate) struct Limited {
    /// Consecutive failed activations (wait mode), for the back-off.
    pub(crate) failures: u32,
    pub(crate) backoff_until: Option<Instant>,
    pub(crate) rate_until: Option<Instant>,
    /// A stretch of time during which the rate limit kept suspending the service: when it
    /// began, the last suspension, and how many there were (logged once at each end).
    pub(crate) rate_episode: Option<(Instant, Instant, u32)>,
    /// Per-connection refusals (allow/deny, max_per_source, overflow = "close"), logged at
    /// most once a second with a count of the ones not logged.
    pub(crate) refusals: limits::LogLimiter,
    /// `accept` failed (out of descriptors): not watched before then.
    pub(crate) pause_until: Option<Instant>,
    /// Sockets that could not be bound at reload, retried with back-off.
    pub(crate) bind_retry: Option<(Instant, Duration)>,
    /// Only with `max_per_source`.
    pub(crate) sources: Option<SourceCounts>,
    /// Only with `rate`.
    pub(crate) bucket: Option<TokenBucket>,
}

static CALM: Limited = Limited {
    failures: 0,
    backoff_until: None,
    rate_until: None,
    rate_episode: None,
    refusals: limits::LogLimiter::NEW,
    pause_until: None,
    bind_retry: None,
    sources: None,
    bucket: None,
};

impl Svc {
    /// Its limits and troubles (all clear when it never had any).
    pub(crate) fn lim(&self) -> &Limited {
        self.limited.as_deref().unwrap_or(&CALM)
    }

    /// The same, to change (allocated on first use).
    pub(crate) fn lim_mut(&mut self) -> &mut Limited {
        self.limited.get_or_insert_with(Default::default)
    }

    pub(crate) fn wants_armed(&self, shutting_down: bool) -> bool {
        if shutting_down
            || self.lim().rate_until.is_some()
            || self.lim().pause_until.is_some()
            || self.lim().backoff_until.is_some()
        {
            return false;
        }
        match self.def.mode {
            Mode::Wait => self.wait_children.len() < self.def.instances as usize,
            Mode::Nowait => {
                self.running + self.waiting < self.def.max_instances
                    || self.def.overflow == Overflow::Close
            }
        }
    }

    pub(crate) fn at_capacity(&self) -> bool {
        self.running + self.waiting >= self.def.max_instances
    }
}

/// What a service is doing, and why, as `status` shows it. The first that applies wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Stopping: the superserver is draining.
    Stopping,
    /// A wait-mode service that failed: not started again before `until`.
    BackingOff { until: Instant, failures: u32 },
    /// Its `rate` ran out: sockets not watched before `until`.
    RateSuspended { until: Instant },
    /// `accept` failed (out of descriptors): paused until `until`.
    Paused { until: Instant },
    /// At `max_instances` with `overflow = "hold"`: new clients wait in the backlog.
    Held,
    /// Processes running (wait: holding the sockets, and not watched unless more instances
    /// may start; nowait: serving connections, still accepting).
    Running,
    /// Watching its sockets, nothing running.
    Listening,
}

impl State {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            State::Stopping => "stopping",
            State::BackingOff { .. } => "backing-off",
            State::RateSuspended { .. } => "rate-suspended",
            State::Paused { .. } => "paused",
            State::Held => "held",
            State::Running => "running",
            State::Listening => "listening",
        }
    }
}

/// Counts of what happened to a service since the superserver started; never reset by a
/// reload (a removed service's counters are kept for its name).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)] // an upgrade from an image without a counter starts it at 0
pub(crate) struct Counters {
    /// nowait: connections accepted (whatever became of them).
    pub(crate) accepted: u64,
    /// wait: times the sockets became readable and a process was started for them.
    pub(crate) activations: u64,
    pub(crate) spawned: u64,
    pub(crate) spawn_failures: u64,
    pub(crate) exits_ok: u64,
    pub(crate) exits_failed: u64,
    pub(crate) exits_signaled: u64,
    pub(crate) refused_deny: u64,
    pub(crate) refused_per_source: u64,
    pub(crate) refused_overflow: u64,
    /// PROXY protocol: from an untrusted address, malformed, or not complete in time.
    pub(crate) refused_proxy: u64,
    /// PROXY protocol: v2 LOCAL connections (the balancer's health checks), closed.
    pub(crate) proxy_local: u64,
    /// Times a connection (nowait) or an activation (wait) found no token and had to wait.
    pub(crate) rate_limited: u64,
}

/// A service's [`Counters`], allocated at its first event: a service nobody has used yet costs
/// no memory for them (a table of ten thousand mostly idle services, say). Reads as the
/// counters (all zero until then); a write allocates.
#[derive(Debug, Default)]
pub(crate) struct Tally(Option<Box<Counters>>);

static ZERO: Counters = Counters {
    accepted: 0,
    activations: 0,
    spawned: 0,
    spawn_failures: 0,
    exits_ok: 0,
    exits_failed: 0,
    exits_signaled: 0,
    refused_deny: 0,
    refused_per_source: 0,
    refused_overflow: 0,
    refused_proxy: 0,
    proxy_local: 0,
    rate_limited: 0,
};

impl From<Counters> for Tally {
    fn from(c: Counters) -> Tally {
        Tally((c != ZERO).then(|| Box::new(c)))
    }
}

impl std::ops::Deref for Tally {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        self.0.as_deref().unwrap_or(&ZERO)
    }
}

impl std::ops::DerefMut for Tally {
    fn deref_mut(&mut self) -> &mut Counters {
        self.0.get_or_insert_with(Box::default)
    }
}

/// How a service's last process ended.
#[derive(Debug, Clone)]
pub(crate) struct LastExit {
    pub(crate) pid: i32,
    /// `Ok(code)` or `Err(signal)`.
    pub(crate) status: Result<i32, i32>,
    pub(crate) at: SystemTime,
    pub(crate) ran: Duration,
}

impl Svc {
    /// What the service is doing now (see [`State`]).
    pub(crate) fn state(&self, stopping: bool) -> State {
        if stopping {
            return State::Stopping;
        }
        if let Some(until) = self.lim().backoff_until {
            return State::BackingOff {
                until,
                failures: self.lim().failures,
            };
        }
        if let Some(until) = self.lim().rate_until {
            return State::RateSuspended { until };
        }
        if let Some(until) = self.lim().pause_until {
            return State::Paused { until };
        }
        if self.def.mode == Mode::Nowait
            && self.at_capacity()
            && self.def.overflow == Overflow::Hold
        {
            return State::Held;
        }
        if self.live() > 0 {
            State::Running
        } else {
            State::Listening
        }
    }

    /// The descriptors of its bound sockets, in config order (what a wait-mode process is
    /// handed, and what is polled for a waiting connection).
    pub(crate) fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.slots
            .iter()
            .filter_map(|s| s.bound.as_ref().map(|b| b.fd()))
            .collect()
    }

    /// Processes running now.
    pub(crate) fn live(&self) -> u32 {
        match self.def.mode {
            Mode::Wait => self.wait_children.len() as u32,
            Mode::Nowait => self.running,
        }
    }

    /// The most processes it may run at once.
    pub(crate) fn cap(&self) -> u32 {
        match self.def.mode {
            Mode::Wait => self.def.instances,
            Mode::Nowait => self.def.max_instances,
        }
    }
}
