//! inetd.conf (OpenBSD, Debian): `service socktype proto wait|nowait[.max] user[:group] server
//! argv0 args…`, one service per line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::services::Services;
use super::{ImportError, Service, socket_url, toml_out};

/// Reads one inetd.conf. `Err` names the line of the first entry that cannot be parsed.
pub fn read(path: &Path, services: &Services) -> Result<Vec<Service>, ImportError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    // The host prefix a `host:` line sets for the lines after it; `*` = every address.
    let mut default_host = String::from("*");
    for (line_no, line) in logical_lines(&text) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let err = |m: String| ImportError::at(path, line_no, m);
        if fields.len() == 1 && fields[0].ends_with(':') {
            default_host = fields[0].trim_end_matches(':').to_string();
            continue;
        }
        if fields.len() < 6 {
            return Err(err(format!(
                "expected `service socktype proto wait|nowait user server [argv0 args…]`, \
                 found {} field(s)",
                fields.len()
            )));
        }
        let origin = format!("{}:{line_no}", path.display());
        out.push(entry(&fields, &default_host, origin, services).map_err(err)?);
    }
    Ok(out)
}

/// The entries of the file with their first line numbers: comments and blank lines dropped,
/// lines starting with a blank joined to the one before.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut open = false;
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            open = false;
            continue;
        }
        if open && raw.starts_with([' ', '\t']) {
            let last = out.last_mut().expect("open means a line before");
            last.1.push(' ');
            last.1.push_str(t);
        } else {
            out.push((i + 1, t.to_string()));
            open = true;
        }
    }
    out
}

fn entry(
    f: &[&str],
    default_host: &str,
    origin: String,
    services: &Services,
) -> Result<Service, String> {
    let (svc_field, socktype, proto_field, wait_field, user_field, server) =
        (f[0], f[1], f[2], f[3], f[4], f[5]);
    let mut s = Service {
        origin,
        enable: true,
        ..Service::default()
    };

    // protocol, with Debian's `,sndbuf=N` / `,rcvbuf=N` suffixes
    let mut proto_parts = proto_field.split(',');
    let proto = proto_parts.next().unwrap_or("");
    for extra in proto_parts {
        s.note(format!(
            "{extra} on protocol {proto_field} (socket buffer sizes are not configurable)"
        ));
    }
    s.proto = proto.to_string();
    let (scheme, family6, family46) = match proto {
        "tcp" | "tcp4" => ("tcp", false, false),
        "udp" | "udp4" => ("udp", false, false),
        "tcp6" => ("tcp", true, false),
        "udp6" => ("udp", true, false),
        "tcp46" => ("tcp", true, true),
        "udp46" => ("udp", true, true),
        "unix" => ("unix", false, false),
        p if p.starts_with("rpc/") => ("rpc", false, false),
        p => {
            return Err(format!(
                "unknown protocol {p:?} (expected tcp, udp, tcp6, udp6 or unix)"
            ));
        }
    };
    match (socktype, scheme) {
        ("stream", "tcp" | "unix" | "rpc") | ("dgram", "udp" | "unix" | "rpc") => {}
        ("stream" | "dgram", _) => {
            return Err(format!(
                "socket type {socktype} does not go with protocol {proto}"
            ));
        }
        ("raw" | "rdm" | "seqpacket", _) => {
            s.unusable = Some(format!(
                "socket type {socktype} (superserver has stream and dgram only)"
            ));
        }
        (t, _) => {
            return Err(format!(
                "unknown socket type {t:?} (expected stream or dgram)"
            ));
        }
    }
    if family46 {
        s.note(format!(
            "{proto} (one IPv4-mapped socket): imported as IPv6 only, sockets here are IPV6_V6ONLY; \
             add a {scheme}://0.0.0.0 address for IPv4"
        ));
    }

    // wait|nowait[.max]
    let (mode, max) = match wait_field.split_once('.') {
        Some((m, n)) => (m, Some(n)),
        None => (wait_field, None),
    };
    s.wait = match mode {
        "wait" => true,
        "nowait" => false,
        m => return Err(format!("expected wait or nowait, found {m:?}")),
    };
    if let Some(n) = max {
        match n.parse::<u32>() {
            Ok(n) if (1..=1_000_000).contains(&n) => {
                s.key("rate", toml_out::string(&format!("{n}/60s")));
                s.comments.push(format!(
                    "{wait_field}: inetd's limit of {n} starts a minute became a token bucket"
                ));
            }
            _ => {
                return Err(format!(
                    "{wait_field}: the rate after the dot must be 1..=1000000"
                ));
            }
        }
    }
    if !s.wait && socktype == "dgram" && s.unusable.is_none() {
        s.unusable = Some(
            "nowait dgram (superserver's nowait mode accepts stream connections only; \
             a datagram service is wait mode)"
                .into(),
        );
    }

    // user[:group] or user.group
    let (user, group) = match user_field
        .split_once(':')
        .or_else(|| user_field.split_once('.'))
    {
        Some((u, g)) => (u, Some(g)),
        None => (user_field, None),
    };
    s.user = Some(user.to_string());
    s.group = group.map(str::to_string);

    // [host:]service
    let (host, svc) = split_host(svc_field, default_host);
    s.name = svc.to_string();
    if server == "internal" {
        s.internal = Some(svc.to_string());
    } else {
        exec(&mut s, server, &f[6..]);
    }
    match scheme {
        "unix" => {
            s.listen = vec![format!("unix:{svc}")];
            s.name = Path::new(svc)
                .file_name()
                .map_or("unix".into(), |n| n.to_string_lossy().into_owned());
            s.key("socket_mode", toml_out::string("0666"));
            s.comments
                .push("inetd made unix sockets mode 0666 (socket_mode)".to_string());
            if socktype == "dgram" {
                s.unusable =
                    Some("unix dgram socket (superserver's unix sockets are stream)".into());
            }
        }
        "rpc" => {
            s.unusable = Some(format!(
                "RPC service {svc} over {proto} (no portmapper support)"
            ));
            s.listen = vec![format!("{proto}:{svc}")];
        }
        _ => {
            let port = services.port(svc, scheme)?;
            for h in host.split(',') {
                match parse_host(h, family6) {
                    Ok(ip) => s.listen.push(socket_url(scheme, ip, port)),
                    Err(why) => {
                        s.unusable = Some(why);
                        s.listen.push(format!("{scheme}://{h}:{port}"));
                    }
                }
            }
        }
    }
    Ok(s)
}

/// `exec` from the server path and inetd's argv (which starts with argv[0]); tcpd wrappers
/// are unwrapped to the daemon they name.
fn exec(s: &mut Service, server: &str, argv: &[&str]) {
    let argv0 = argv.first().copied();
    let rest: Vec<String> = argv.iter().skip(1).map(|a| a.to_string()).collect();
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let program = if base(server) == "tcpd" && argv0.is_some() {
        let daemon = argv0.unwrap_or_default();
        let real = if daemon.starts_with('/') {
            daemon.to_string()
        } else {
            format!("/usr/sbin/{daemon}")
        };
        s.note(format!(
            "{server} (TCP wrappers: hosts.allow and hosts.deny are not read; write allow/deny)"
        ));
        real
    } else {
        if let Some(a0) = argv0
            && a0 != base(server)
            && a0 != server
        {
            s.note(format!(
                "argv[0] = {a0} (exec[0] is both the program and its argv[0])"
            ));
        }
        server.to_string()
    };
    s.exec = std::iter::once(program).chain(rest).collect();
}

/// `host:service`, `[v6]:service` or `service` (with the default host).
fn split_host<'a>(field: &'a str, default_host: &'a str) -> (&'a str, &'a str) {
    if let Some(rest) = field.strip_prefix('[')
        && let Some((h, svc)) = rest.split_once("]:")
    {
        return (h, svc);
    }
    match field.rsplit_once(':') {
        Some((h, svc)) if !field.starts_with('/') => (h, svc),
        _ => (default_host, field),
    }
}

/// An IP literal or `*`; a name is an `Err` (never looked up).
fn parse_host(h: &str, v6: bool) -> Result<IpAddr, String> {
    let h = h.trim_start_matches('[').trim_end_matches(']');
    if h == "*" || h.is_empty() {
        return Ok(if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        });
    }
    h.parse::<IpAddr>().map_err(|_| {
        format!("bind host {h:?} is a name (names are never looked up; write its IP address)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_lines_join() {
        let l = logical_lines("# c\na b\n  c\n\nd e\n");
        assert_eq!(l, vec![(2, "a b c".to_string()), (5, "d e".to_string())]);
    }

    #[test]
    fn host_prefixes() {
        assert_eq!(split_host("127.0.0.1:echo", "*"), ("127.0.0.1", "echo"));
        assert_eq!(split_host("[::1]:echo", "*"), ("::1", "echo"));
        assert_eq!(split_host("echo", "*"), ("*", "echo"));
        assert!(parse_host("localhost", false).is_err());
    }
}
