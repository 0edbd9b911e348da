//! HAProxy's `agent-check` (`[superserver] agent`): one line per check saying whether a
//! service should get new connections from the balancer, and the operator's
//! `superserver drain` / `undrain` that steer it.
//!
//! HAProxy connects, sends its `agent-send` string (here: a service name and a newline, or
//! nothing) and reads one line: `up ready maxconn:N` (N: the service's `max_instances` less
//! the processes serving clients that did not come through a balancer), `drain` while an
//! operator drains it, `down#REASON` while it backs off, is rate-suspended, cannot bind, or
//! the superserver is stopping. Without a name the line is about the whole host.

use crate::children::Kind;
use crate::daemon::{Daemon, Source};
use superserver_config::Mode;

impl<S: Source> Daemon<S> {
    /// The agent's answer line for `request` (a service name, or empty for the host).
    pub(crate) fn agent_answer(&self, request: &str) -> String {
        let name = request.trim();
        let stopping = self.shutdown_deadline.is_some();
        if name.is_empty() {
            return if stopping {
                "down#stopping\n".into()
            } else if self.drained_all {
                "drain\n".into()
            } else {
                "up ready\n".into()
            };
        }
        let Some(svc) = self.services.iter().find(|s| s.def.name == name) else {
            // The name comes from the balancer's configuration: never echo it unfiltered.
            let shown: String = name
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            return format!("down#no service {shown}\n");
        };
        if stopping {
            return "down#stopping\n".into();
        }
        if svc.drained || self.drained_all {
            return "drain\n".into();
        }
        let mut slots = svc.slots.iter().zip(&svc.def.listen);
        if let Some((_, l)) = slots.find(|(s, _)| s.bound.is_none()) {
            return format!("down#cannot bind {}\n", l.addr);
        }
        if svc.lim().backoff_until.is_some() {
            return format!("down#backing off after {} failure(s)\n", svc.lim().failures);
        }
        if svc.lim().rate_until.is_some() {
            return "down#rate limited\n".into();
        }
        if svc.lim().pause_until.is_some() {
            return "down#out of descriptors\n".into();
        }
        match svc.def.mode {
            Mode::Wait => "up ready\n".into(),
            Mode::Nowait => {
                // The balancer counts its own connections against maxconn: report the slots
                // that are not taken by clients that came some other way (HAProxy reads
                // maxconn:0 as "no limit", so never less than 1).
                let direct = self
                    .children
                    .iter()
                    .filter(|(_, c)| {
                        c.svc_id == svc.id
                            && matches!(c.kind, Kind::Connection { proxied: false, .. })
                    })
                    .count() as u32;
                let free = svc.def.max_instances.saturating_sub(direct).max(1);
                format!("up ready maxconn:{free}\n")
            }
        }
    }

    /// `drain`/`undrain` (`on`) of `names`, or of the whole host when empty. Returns the
    /// services now drained, or the names that are not services.
    pub(crate) fn drain(&mut self, names: &[&str], on: bool) -> Result<Vec<String>, String> {
        let unknown: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.services.iter().any(|s| s.def.name == *n))
            .collect();
        if !unknown.is_empty() {
            return Err(format!("no such service: {}", unknown.join(", ")));
        }
        if names.is_empty() {
            self.drained_all = on;
            if !on {
                for svc in &mut self.services {
                    svc.drained = false;
                }
            }
            log::info!(
                "agent: {} every service",
                if on { "draining" } else { "no longer draining" }
            );
        } else {
            for svc in &mut self.services {
                if names.contains(&svc.def.name.as_str()) {
                    svc.drained = on;
                    log::info!(
                        "{}: {}",
                        svc.def.name,
                        if on {
                            "draining (the agent answers drain)"
                        } else {
                            "no longer draining"
                        }
                    );
                }
            }
        }
        Ok(self.drained())
    }

    /// The services the agent reports as draining.
    pub(crate) fn drained(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.drained || self.drained_all)
            .map(|s| s.def.name.clone())
            .collect()
    }
}
