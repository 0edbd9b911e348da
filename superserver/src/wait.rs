//! Wait mode: hand the listening sockets to the service on readiness (up to `instances`
//! processes), watch them again when it exits, back off when it fails.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use superserver_config::{Handoff, Mode};

use crate::children::{self, Child, Exit, Kind};
use crate::daemon::*;
use crate::spawn::{Env, Fds};

/// How long a queue may wait for the running wait-mode processes before one more starts
/// (`instances` > 1).
const SCALE_CHECK: Duration = Duration::from_millis(50);

impl<S: Source> Daemon<S> {
    /// Wait mode: a socket became readable, start the service with all its sockets (one
    /// more process, up to `instances`).
    pub(crate) fn activate(&mut self, i: usize) {
        let svc = &self.services[i];
        if svc.wait_children.len() >= svc.def.instances as usize || !self.rate_allows(i, true) {
            return;
        }
        let svc = &self.services[i];
        let fds: Vec<RawFd> = svc.fds();
        let names: Vec<&str> = svc
            .slots
            .iter()
            .zip(&svc.def.listen)
            .filter(|(s, _)| s.bound.is_some())
            .map(|(_, l)| l.name.as_str())
            .collect();
        let fdnames = names.join(":");
        let result = match svc.def.handoff {
            // systemd's protocol: fd 3… with LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES.
            Handoff::ListenFds => {
                let mut env = Env::default();
                env.set("LISTEN_FDS", fds.len());
                env.set("LISTEN_FDNAMES", fdnames.as_str());
                svc.template.spawn(
                    &svc.def.argv,
                    Fds::Listeners(&fds),
                    &env,
                    true,
                    self.devnull.as_raw_fd(),
                )
            }
            // inetd's protocol: the one listening socket on stdin and stdout.
            Handoff::Stdin => match fds.first() {
                Some(&fd) => svc.template.spawn(
                    &svc.def.argv,
                    Fds::StdinListener(fd),
                    &Env::default(),
                    false,
                    self.devnull.as_raw_fd(),
                ),
                None => return,
            },
        };
        let (name, id) = (svc.def.name.clone(), svc.id);
        match result {
            Ok(pid) => {
                let counters = &mut self.services[i].counters;
                counters.activations += 1;
                counters.spawned += 1;
                log::info!(
                    "{name}: started pid {pid} with {} socket(s) ({fdnames})",
                    fds.len()
                );
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
                // With `instances` > 1: look again shortly; a backlog that the running
                // processes have not taken by then starts one more.
                let svc = &self.services[i];
                if svc.wait_children.len() < svc.def.instances as usize {
                    let id = svc.id;
                    self.add_timer(Instant::now() + SCALE_CHECK, Timer::Service(id));
                }
            }
            Err(e) => {
                let what = svc.template.what();
                let counters = &mut self.services[i].counters;
                counters.activations += 1;
                counters.spawn_failures += 1;
                let backoff = self.failed_activation(i);
                log::error!("{name}: cannot start {what}: {e}; {backoff}");
            }
        }
    }

    /// `instances` > 1: while connections stay queued that the running processes do not take,
    /// start one more (the readiness of a listener is an edge: a queue that was already there
    /// when the first process started reports nothing new).
    pub(crate) fn scale_up(&mut self, i: usize) {
        let svc = &self.services[i];
        if svc.def.mode != Mode::Wait
            || svc.wait_children.is_empty()
            || svc.wait_children.len() >= svc.def.instances as usize
            || !svc.armed
        {
            return;
        }
        let fds: Vec<RawFd> = svc.fds();
        if any_readable(&fds) {
            self.activate(i);
        }
    }

    /// Schedule the next attempt of a wait-mode service that did not take its connections:
    /// exponential back-off from `restart_backoff_min` to `restart_backoff_max`.
    pub(crate) fn failed_activation(&mut self, i: usize) -> String {
        let (min, max) = (
            self.global.restart_backoff_min,
            self.global.restart_backoff_max,
        );
        let svc = &mut self.services[i];
        svc.lim_mut().failures += 1;
        let factor = 1u32 << (svc.lim().failures - 1).min(20);
        let delay = min.saturating_mul(factor).min(max);
        let at = Instant::now() + delay;
        svc.lim_mut().backoff_until = Some(at);
        let line = format!(
            "back-off: next start in {} ({} failure(s) in a row)",
            children::human(delay),
            svc.lim().failures
        );
        let id = svc.id;
        self.add_timer(at, Timer::Service(id));
        self.rearm(i);
        line
    }

    /// A wait-mode process ended: whether it did its job (then its sockets are watched again)
    /// or failed (then the back-off), in one log line.
    pub(crate) fn wait_exited(&mut self, exit: &Exit) {
        let i = self.find(exit.child.svc_id);
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
        let fds: Vec<RawFd> = svc.fds();
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
            let recovered = if svc.lim().failures > 0 {
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
            if let Some(l) = svc.limited.as_deref_mut() {
                l.failures = 0;
            }
            self.rearm(i);
        }
    }
}
