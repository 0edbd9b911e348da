//! Describing a configuration in words: the plan printed by `--check` and at start-up, and
//! the one line a newcomer can try.

use superserver_config::{Config, ListenAddr, Mode, Service};

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
    format!(
        "{} ({mode}): {} → {}",
        s.name,
        sockets.join(", "),
        s.argv.join(" ")
    )
}

/// The whole plan, one service per line.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    for s in &config.services {
        out.push_str("  ");
        out.push_str(&service_line(s));
        out.push('\n');
    }
    out
}

/// A command that talks to one of the services: daytime if there is one (it answers without
/// input), else the first TCP or Unix stream socket.
pub fn try_line(config: &Config) -> Option<String> {
    let listens = || config.services.iter().flat_map(|s| s.listen.iter());
    let pick = listens()
        .find(|l| l.name == "daytime" && l.addr.is_stream())
        .or_else(|| listens().find(|l| l.addr.is_stream()))?;
    Some(match &pick.addr {
        ListenAddr::Tcp(a) => format!("nc {} {}", a.ip(), a.port()),
        ListenAddr::Unix(p) => format!("nc -U {}", p.display()),
        ListenAddr::Udp(a) => format!("nc -u {} {}", a.ip(), a.port()),
    })
}
