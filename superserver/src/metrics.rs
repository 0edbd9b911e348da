//! The services' counters and states in Prometheus' text exposition format (version 0.0.4):
//! counters end in `_total`, gauges do not, every metric has `# HELP` and `# TYPE`.

use std::fmt::Write;

use superserver_config::Mode;

use crate::state::{Counters, Svc};

/// Label value escaping: backslash, double quote and newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its help, type and one sample per service (and label set).
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    kind: &'a str,
    samples: Vec<(String, f64)>,
}

impl Family<'_> {
    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, v) in &self.samples {
            let _ = writeln!(out, "{}{{{labels}}} {v}", self.name);
        }
    }
}

/// The whole exposition for `services`.
pub fn render(services: &[Svc], stopping: bool) -> String {
    let svc = |s: &Svc| format!("service=\"{}\"", label(&s.def.name));
    let counter = |name, help, get: fn(&Counters) -> u64| Family {
        name,
        help,
        kind: "counter",
        samples: services
            .iter()
            .map(|s| (svc(s), get(&s.counters) as f64))
            .collect(),
    };
    let mut families = vec![
        counter(
            "superserver_connections_accepted_total",
            "Connections the superserver accepted (nowait services).",
            |c| c.accepted,
        ),
        counter(
            "superserver_activations_total",
            "Times a wait-mode service's sockets became readable and a process was started.",
            |c| c.activations,
        ),
        counter("superserver_spawned_total", "Processes started.", |c| {
            c.spawned
        }),
        counter(
            "superserver_spawn_failures_total",
            "Processes that could not be started.",
            |c| c.spawn_failures,
        ),
        counter(
            "superserver_proxy_local_total",
            "PROXY protocol LOCAL connections (a balancer's health checks), closed without a \
             process.",
            |c| c.proxy_local,
        ),
        counter(
            "superserver_rate_limited_total",
            "Times the rate limit held a connection or an activation back.",
            |c| c.rate_limited,
        ),
    ];
    let mut exits = Family {
        name: "superserver_exits_total",
        help: "Processes that ended, by outcome (ok: exit 0; failed: other exit status; signal).",
        kind: "counter",
        samples: Vec::new(),
    };
    let mut refused = Family {
        name: "superserver_refused_total",
        help: "Connections closed without a process, by reason.",
        kind: "counter",
        samples: Vec::new(),
    };
    let mut live = Family {
        name: "superserver_instances",
        help: "Processes running now.",
        kind: "gauge",
        samples: Vec::new(),
    };
    let mut cap = Family {
        name: "superserver_instances_max",
        help: "The most processes the service may run at once.",
        kind: "gauge",
        samples: Vec::new(),
    };
    let mut state = Family {
        name: "superserver_service_state",
        help: "1 for the state the service is in (see superserver status).",
        kind: "gauge",
        samples: Vec::new(),
    };
    let mut queue = Family {
        name: "superserver_accept_queue",
        help: "Connections waiting in a TCP listener's accept queue.",
        kind: "gauge",
        samples: Vec::new(),
    };
    for s in services {
        let c = &s.counters;
        for (outcome, n) in [
            ("ok", c.exits_ok),
            ("failed", c.exits_failed),
            ("signal", c.exits_signaled),
        ] {
            exits
                .samples
                .push((format!("{},outcome=\"{outcome}\"", svc(s)), n as f64));
        }
        for (reason, n) in [
            ("deny", c.refused_deny),
            ("per_source", c.refused_per_source),
            ("overflow", c.refused_overflow),
            ("proxy", c.refused_proxy),
        ] {
            refused
                .samples
                .push((format!("{},reason=\"{reason}\"", svc(s)), n as f64));
        }
        let mode = match s.def.mode {
            Mode::Wait => "wait",
            Mode::Nowait => "nowait",
        };
        live.samples
            .push((format!("{},mode=\"{mode}\"", svc(s)), s.live() as f64));
        cap.samples
            .push((format!("{},mode=\"{mode}\"", svc(s)), s.cap() as f64));
        state.samples.push((
            format!("{},state=\"{}\"", svc(s), s.state(stopping).name()),
            1.0,
        ));
        for (slot, l) in s.slots.iter().zip(&s.def.listen) {
            if let Some(n) = slot.bound.as_ref().and_then(crate::control::accept_queue) {
                queue.samples.push((
                    format!("{},address=\"{}\"", svc(s), label(&l.addr.to_string())),
                    f64::from(n),
                ));
            }
        }
    }
    families.extend([exits, refused, live, cap, state, queue]);
    let mut out = String::new();
    for f in &families {
        f.write(&mut out);
    }
    out
}
