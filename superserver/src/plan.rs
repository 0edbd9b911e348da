//! Describing a configuration in words: the plan printed by `--check` and at start-up, and
//! the one line a newcomer can try.

use superserver_config::{Config, Handoff, ListenAddr, LogPeer, Mode, Service};

/// "small (wait): echo tcp://127.0.0.1:7007, echo udp://127.0.0.1:7007 → /usr/bin/small-services"
pub fn service_line(s: &Service) -> String {
    let mode = match s.mode {
        Mode::Wait => "wait".to_string(),
        Mode::Nowait => format!("nowait, max {}", s.max_instances),
    };
    let sockets: Vec<String> = s
        .listen
        .iter()
        .map(|l| format!("{} {}", l.name, l.addr))
        .collect();
    let mode = match (s.enabled, s.handoff, s.instances) {
        (false, ..) => format!("{mode}, disabled: nothing bound"),
        (true, Handoff::Stdin, _) => format!("{mode}, socket on stdin"),
        (true, _, n) if n > 1 => format!("{mode}, {n} instances"),
        _ => mode,
    };
    format!(
        "{} ({mode}): {} → {}",
        s.name,
        sockets.join(", "),
        s.argv.join(" ")
    )
}

/// How a service's processes run: "runs /usr/bin/x as nobody (uid 65534, gid 65534); rate
/// 50/1.0s; max_per_source 4; nofile 1024". The superserver's own user is named as such.
pub fn run_line(s: &Service) -> String {
    let who = match &s.credentials {
        Some(c) => format!("{} (uid {}, gid {})", c.user, c.uid, c.gid),
        None => format!(
            "the superserver's user ({})",
            crate::program::Identity::current().name
        ),
    };
    let mut parts = vec![format!("runs {} as {who}", s.program.display())];
    if let Some(r) = s.extra().rate {
        parts.push(format!(
            "rate {}/{}",
            r.count,
            crate::children::human(r.per)
        ));
    }
    if let Some(p) = s.extra().per_source {
        parts.push(format!("max_per_source {}", p.max));
    }
    if let Some(n) = s.extra().limits.nofile {
        parts.push(format!("limit_nofile {n}"));
    }
    if let Some(n) = s.extra().limits.nproc {
        parts.push(format!("limit_nproc {n}"));
    }
    if let Some(m) = s.extra().umask {
        parts.push(format!("umask {m:03o}"));
    }
    if let Some(d) = &s.extra().working_directory {
        parts.push(format!("in {}", d.display()));
    }
    if let Some(d) = s.extra().max_duration {
        parts.push(format!("max_duration {}", crate::children::human(d)));
    }
    match s.log_peer {
        LogPeer::Full => {}
        LogPeer::Masked => parts.push("client addresses masked in logs".into()),
        LogPeer::None => parts.push("no client address in logs".into()),
    }
    if s.no_new_privs {
        parts.push("no_new_privs".to_string());
    }
    if !s.extra().access.is_empty() {
        parts.push("allow/deny rules".to_string());
    }
    if let Some(p) = &s.proxy {
        let from: Vec<String> = p.from.iter().map(ToString::to_string).collect();
        let version = match p.version {
            superserver_config::ProxyVersion::V1 => "v1",
            superserver_config::ProxyVersion::V2 => "v2",
            superserver_config::ProxyVersion::Any => "v1 or v2",
        };
        parts.push(format!(
            "PROXY {version} from {} within {}",
            from.join(", "),
            crate::children::human(p.timeout)
        ));
    }
    parts.join("; ")
}

/// The whole plan: one line per service, and one on how its processes run.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    for s in &config.services {
        out.push_str("  ");
        out.push_str(&service_line(s));
        out.push_str("\n      ");
        out.push_str(&run_line(s));
        out.push('\n');
    }
    out
}

/// A command that talks to one of the services: daytime if there is one (it answers without
/// input), else the first TCP or Unix stream socket.
pub fn try_line(config: &Config) -> Option<String> {
    let listens = || {
        config
            .services
            .iter()
            .filter(|s| s.enabled)
            .flat_map(|s| s.listen.iter())
    };
    let pick = listens()
        .find(|l| l.name == "daytime" && l.addr.is_stream())
        .or_else(|| listens().find(|l| l.addr.is_stream()))?;
    Some(match &pick.addr {
        ListenAddr::Tcp(a) => format!("nc {} {}", a.ip(), a.port()),
        ListenAddr::Unix(p) => format!("nc -U {}", p.display()),
        ListenAddr::Udp(a) => format!("nc -u {} {}", a.ip(), a.port()),
    })
}
