//! xinetd: `defaults { }`, `service NAME { attr = value … }`, `include` and `includedir`,
//! with `+=` and `-=` on list attributes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::services::Services;
use super::{ImportError, Service, rooted, socket_url, toml_out};

#[derive(Debug, Clone)]
struct Attr {
    name: String,
    values: Vec<String>,
    /// Set in `defaults` and not changed by the service.
    from_defaults: bool,
}

#[derive(Debug)]
struct Block {
    name: String,
    origin: String,
    attrs: Vec<Attr>,
}

impl Block {
    fn get(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }

    fn apply(&mut self, name: &str, op: &str, values: Vec<String>) {
        let pos = self.attrs.iter().position(|a| a.name == name);
        match (op, pos) {
            ("+=", Some(i)) => {
                self.attrs[i].values.extend(values);
                self.attrs[i].from_defaults = false;
            }
            ("-=", Some(i)) => {
                self.attrs[i].values.retain(|v| !values.contains(v));
                self.attrs[i].from_defaults = false;
            }
            ("-=", None) => {}
            (_, Some(i)) => {
                self.attrs[i].values = values;
                self.attrs[i].from_defaults = false;
            }
            (_, None) => self.attrs.push(Attr {
                name: name.to_string(),
                values,
                from_defaults: false,
            }),
        }
    }
}

struct Reader<'a> {
    root: Option<&'a Path>,
    defaults: Vec<Attr>,
    blocks: Vec<Block>,
    /// Files being read, to refuse an include loop.
    stack: Vec<PathBuf>,
}

/// Reads an xinetd.conf or an includedir-style directory. Returns the services and the
/// `defaults` attributes that were not imported (for the header).
pub fn read(
    path: &Path,
    root: Option<&Path>,
    services: &Services,
) -> Result<(Vec<Service>, Vec<String>), ImportError> {
    let mut r = Reader {
        root,
        defaults: Vec::new(),
        blocks: Vec::new(),
        stack: Vec::new(),
    };
    if path.is_dir() {
        r.dir(path)?;
    } else {
        r.file(path)?;
    }
    let mut header = Vec::new();
    for a in &r.defaults {
        if !MAPPED_DEFAULTS.contains(&a.name.as_str()) {
            header.push(format!(
                "defaults: {} = {} ({})",
                a.name,
                a.values.join(" "),
                why_not(&a.name)
            ));
        }
    }
    let enabled = r
        .defaults
        .iter()
        .find(|a| a.name == "enabled")
        .map(|a| a.values.clone());
    let disabled = r
        .defaults
        .iter()
        .find(|a| a.name == "disabled")
        .map(|a| a.values.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for b in &r.blocks {
        let mut s = map(b, services).map_err(|m| {
            let (file, line) = b.origin.rsplit_once(':').unwrap_or((&b.origin, "0"));
            ImportError::at(Path::new(file), line.parse().unwrap_or(0), m)
        })?;
        let id = b
            .get("id")
            .and_then(|a| a.values.first())
            .unwrap_or(&b.name);
        if disabled.contains(id) || enabled.as_ref().is_some_and(|e| !e.contains(id)) {
            s.enable = false;
            s.comments.push(format!(
                "disabled by the defaults' enabled/disabled lists ({id})"
            ));
        }
        out.push(s);
    }
    Ok((out, header))
}

/// Attributes of `defaults` that are applied to each service (or read above).
const MAPPED_DEFAULTS: &[&str] = &[
    "only_from",
    "no_access",
    "instances",
    "per_source",
    "cps",
    "passenv",
    "env",
    "bind",
    "interface",
    "umask",
    "enabled",
    "disabled",
    "groups",
];

impl Reader<'_> {
    fn dir(&mut self, dir: &Path) -> Result<(), ImportError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| ImportError::file(dir, format!("cannot read directory: {e}")))?;
        let mut names: Vec<PathBuf> = Vec::new();
        for e in entries {
            let e = e.map_err(|e| ImportError::file(dir, format!("cannot read directory: {e}")))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // xinetd skips names with a dot or ending in `~` (backups, dpkg leftovers).
            if name.contains('.') || name.ends_with('~') {
                continue;
            }
            names.push(e.path());
        }
        names.sort();
        for p in names {
            if p.is_file() {
                self.file(&p)?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &Path) -> Result<(), ImportError> {
        if self.stack.iter().any(|p| p == path) {
            return Err(ImportError::file(path, "included from itself"));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
        self.stack.push(path.to_path_buf());
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let mut i = 0;
        while i < lines.len() {
            let (n, line) = lines[i];
            let err = |m: String| ImportError::at(path, n, m);
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[0] {
                "include" | "includedir" if words.len() == 2 => {
                    // Absolute: under --root; relative: next to the including file.
                    let named = Path::new(words[1]);
                    let target = if named.is_absolute() {
                        rooted(self.root, named)
                    } else {
                        path.parent().unwrap_or(Path::new(".")).join(named)
                    };
                    if words[0] == "include" {
                        self.file(&target)?;
                    } else {
                        self.dir(&target)?;
                    }
                    i += 1;
                }
                "service" | "defaults" => {
                    let (name, brace_here) = match (words[0], &words[1..]) {
                        ("defaults", []) => (String::new(), false),
                        ("defaults", ["{"]) => (String::new(), true),
                        ("service", [name]) => (name.to_string(), false),
                        ("service", [name, "{"]) => (name.to_string(), true),
                        _ => {
                            return Err(err(format!(
                                "expected `service NAME` or `defaults`, found {line:?}"
                            )));
                        }
                    };
                    i += 1;
                    if !brace_here {
                        match lines.get(i) {
                            Some((_, "{")) => i += 1,
                            _ => return Err(err(format!("expected `{{` after {line:?}"))),
                        }
                    }
                    let mut block = Block {
                        name: name.clone(),
                        origin: format!("{}:{n}", path.display()),
                        attrs: if words[0] == "service" {
                            self.defaults
                                .iter()
                                .cloned()
                                .map(|mut a| {
                                    a.from_defaults = true;
                                    a
                                })
                                .collect()
                        } else {
                            Vec::new()
                        },
                    };
                    let mut closed = false;
                    while let Some(&(an, aline)) = lines.get(i) {
                        i += 1;
                        if aline == "}" {
                            closed = true;
                            break;
                        }
                        let (attr, op, values) =
                            attribute(aline).map_err(|m| ImportError::at(path, an, m))?;
                        if words[0] == "defaults" {
                            let mut d = Block {
                                name: String::new(),
                                origin: String::new(),
                                attrs: std::mem::take(&mut self.defaults),
                            };
                            d.apply(&attr, op, values);
                            self.defaults = d.attrs;
                        } else {
                            block.apply(&attr, op, values);
                        }
                    }
                    if !closed {
                        return Err(err(format!(
                            "{line:?}: no closing `}}` before the end of the file"
                        )));
                    }
                    if words[0] == "service" {
                        self.blocks.push(block);
                    }
                }
                _ => {
                    return Err(err(format!(
                        "expected `service NAME`, `defaults`, `include FILE` or `includedir DIR`, \
                         found {line:?}"
                    )));
                }
            }
        }
        self.stack.pop();
        Ok(())
    }
}

/// `name = v…`, `name += v…`, `name -= v…`.
fn attribute(line: &str) -> Result<(String, &'static str, Vec<String>), String> {
    let eq = line
        .find('=')
        .ok_or_else(|| format!("expected `attribute = value`, found {line:?}"))?;
    let (mut name, op) = (line[..eq].trim_end(), "=");
    let op = if let Some(n) = name.strip_suffix('+') {
        name = n.trim_end();
        "+="
    } else if let Some(n) = name.strip_suffix('-') {
        name = n.trim_end();
        "-="
    } else {
        op
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("expected `attribute = value`, found {line:?}"));
    }
    let values = line[eq + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Ok((name.to_string(), op, values))
}

fn why_not(attr: &str) -> &'static str {
    match attr {
        "log_type" | "log_on_success" | "log_on_failure" => {
            "the superserver logs every start and end to stderr or the journal"
        }
        "access_times" => "no time-of-day access rules",
        "banner" | "banner_success" | "banner_fail" => "no banners",
        "redirect" => "no TCP forwarding",
        "nice" => "no nice setting",
        "max_load" => "no load-average limit",
        "libwrap" => "TCP wrappers are not read; write allow/deny",
        "mdns" => "no mDNS announcements",
        "deny_time" | "SENSOR" => "no sensor mode",
        "v6only" => "IPv6 sockets are always IPV6_V6ONLY",
        "rlimit_as" | "rlimit_cpu" | "rlimit_data" | "rlimit_rss" | "rlimit_stack" => {
            "only limit_nofile and limit_nproc exist"
        }
        "groups" => "supplementary groups of the user are always set",
        "rpc_version" | "rpc_number" => "no RPC",
        _ => "no equivalent",
    }
}

fn yes(v: &[String]) -> bool {
    v.first().is_some_and(|v| v.eq_ignore_ascii_case("yes"))
}

/// One xinetd service block in terms of the schema. `Err` for what xinetd itself refuses.
fn map(b: &Block, services: &Services) -> Result<Service, String> {
    let attr = |n: &str| b.get(n).map(|a| a.values.clone());
    let one = |n: &str| b.get(n).and_then(|a| a.values.first().cloned());
    let id = one("id").unwrap_or_else(|| b.name.clone());
    let mut s = Service {
        origin: b.origin.clone(),
        name: id.clone(),
        enable: true,
        ..Service::default()
    };
    let types: Vec<String> = attr("type").unwrap_or_default();
    let flags: Vec<String> = attr("flags").unwrap_or_default();
    let socket_type =
        one("socket_type").ok_or_else(|| format!("service {}: socket_type is required", b.name))?;
    let proto = one("protocol").unwrap_or_else(|| {
        if socket_type == "dgram" {
            "udp".into()
        } else {
            "tcp".into()
        }
    });
    s.proto = proto.clone();
    let wait = one("wait").ok_or_else(|| format!("service {}: wait is required", b.name))?;
    s.wait = yes(&[wait]);
    s.user = one("user");
    s.group = one("group");
    if let Some(d) = attr("disable") {
        s.enable = !yes(&d);
    }
    if types.iter().any(|t| t == "INTERNAL") {
        s.internal = Some(b.name.clone());
    }
    match socket_type.as_str() {
        "stream" | "dgram" => {}
        t => {
            s.unusable = Some(format!(
                "socket_type = {t} (superserver has stream and dgram only)"
            ))
        }
    }
    if types.iter().any(|t| t == "RPC") {
        s.unusable = Some("type = RPC (no portmapper support)".into());
    }
    if types.iter().any(|t| t.starts_with("TCPMUX")) {
        s.unusable = Some("type = TCPMUX (no TCPMUX support)".into());
    }
    if !s.wait && socket_type == "dgram" && s.unusable.is_none() {
        s.unusable =
            Some("wait = no on dgram (nowait mode accepts stream connections only)".into());
    }

    // the socket
    let scheme = if proto == "udp" { "udp" } else { "tcp" };
    if proto != "tcp" && proto != "udp" {
        s.unusable = Some(format!("protocol = {proto} (tcp and udp only)"));
    }
    let port = match one("port") {
        Some(p) => services.port(&p, scheme)?,
        None => services
            .port(&b.name, scheme)
            .map_err(|e| format!("service {}: no port and {e}", b.name))?,
    };
    let v6 = flags.iter().any(|f| f == "IPv6");
    let bind = one("bind").or_else(|| one("interface"));
    let ip = match bind {
        Some(h) => match h.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                s.unusable = Some(format!(
                    "bind = {h} is a name (names are never looked up; write its IP address)"
                ));
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }
        },
        None if v6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    s.listen = vec![socket_url(scheme, ip, port)];

    // the program
    if s.internal.is_none() && s.unusable.is_none() {
        let server =
            one("server").ok_or_else(|| format!("service {}: server is required", b.name))?;
        let args = attr("server_args").unwrap_or_default();
        s.exec = if flags.iter().any(|f| f == "NAMEINARGS") {
            if let Some(a0) = args.first()
                && Some(a0.as_str()) != server.rsplit('/').next()
            {
                s.note(format!(
                    "argv[0] = {a0} (NAMEINARGS; exec[0] is both the program and its argv[0])"
                ));
            }
            std::iter::once(server)
                .chain(args.into_iter().skip(1))
                .collect()
        } else {
            std::iter::once(server).chain(args).collect()
        };
    } else if let Some(server) = one("server") {
        s.exec = vec![server];
    }

    for a in &b.attrs {
        let v = &a.values;
        let joined = v.join(" ");
        match a.name.as_str() {
            "socket_type" | "protocol" | "wait" | "user" | "group" | "disable" | "type" | "id"
            | "server" | "server_args" | "port" | "bind" | "interface" => {}
            "flags" => {
                for f in v {
                    if !matches!(f.as_str(), "IPv4" | "IPv6" | "NAMEINARGS") {
                        s.note(format!("flags {f} ({})", flag_why(f)));
                    }
                }
            }
            "instances" | "per_source" => {
                let key = if a.name == "instances" {
                    "max_instances"
                } else {
                    "max_per_source"
                };
                if joined.eq_ignore_ascii_case("UNLIMITED") {
                    continue;
                }
                match (s.wait, joined.parse::<u32>()) {
                    (true, _) => s.note(format!(
                        "{} = {joined} (a wait service is one process)",
                        a.name
                    )),
                    (false, Ok(n)) if (1..=65536).contains(&n) => s.key(key, n.to_string()),
                    _ => s.note(format!("{} = {joined} (not a number in 1..=65536)", a.name)),
                }
            }
            "cps" => match v.first().map(|r| r.parse::<u32>()) {
                Some(Ok(r)) if (1..=1_000_000).contains(&r) => {
                    s.key("rate", toml_out::string(&format!("{r}/1s")));
                    s.note(format!(
                        "cps = {joined}: the {}-second pause (rate is a token bucket: excess \
                         connections wait or are refused, the service is never switched off)",
                        v.get(1).map_or("?", String::as_str)
                    ));
                }
                _ => s.note(format!("cps = {joined} (not a rate in 1..=1000000)")),
            },
            "only_from" | "no_access" => {
                let key = if a.name == "only_from" {
                    "allow"
                } else {
                    "deny"
                };
                let (nets, dropped) = addresses(v);
                if !dropped.is_empty() {
                    s.note(format!(
                        "{} = {} (names, /etc/networks entries and other forms are not matched)",
                        a.name,
                        dropped.join(" ")
                    ));
                }
                if key == "allow" && nets.is_empty() {
                    // An empty only_from (or one of names only) lets nobody in; allow = [] would
                    // let everybody in.
                    s.comments.push(if joined.is_empty() {
                        "only_from is empty: xinetd let no address in; so does deny".to_string()
                    } else {
                        format!(
                            "only_from = {joined}: no address is left to allow; deny everything"
                        )
                    });
                    s.key(
                        "deny",
                        toml_out::array(&["0.0.0.0/0".into(), "::/0".into()]),
                    );
                } else if !nets.is_empty() {
                    s.key(key, toml_out::array(&nets));
                }
            }
            "env" => {
                let mut pairs = Vec::new();
                for kv in v {
                    match kv.split_once('=') {
                        Some((k, val)) => {
                            pairs.push(format!("{} = {}", toml_out::key(k), toml_out::string(val)))
                        }
                        None => s.note(format!("env {kv} (not NAME=VALUE)")),
                    }
                }
                if !pairs.is_empty() {
                    s.key("env", format!("{{ {} }}", pairs.join(", ")));
                }
            }
            "passenv" => s.key("pass_env", toml_out::array(v)),
            "umask" => s.key("umask", toml_out::string(&joined)),
            "rlimit_files" => match joined.parse::<u64>() {
                Ok(n) if n > 0 => s.key("limit_nofile", n.to_string()),
                _ => s.note(format!("rlimit_files = {joined} (only a number is mapped)")),
            },
            "groups" if yes(v) => {}
            name if a.from_defaults => {
                let _ = name; // reported once in the header
            }
            name => s.note(format!("{name} = {joined} ({})", why_not(name))),
        }
    }
    // type = UNLISTED only says the port is not in /etc/services: `port` is read above.
    Ok(s)
}

fn flag_why(f: &str) -> &'static str {
    match f {
        "REUSE" => "SO_REUSEADDR is always set on TCP listeners",
        "NOLIBWRAP" => "TCP wrappers are never read",
        "KEEPALIVE" | "NODELAY" => "socket options of the connection are the service's",
        "INTERCEPT" | "SENSOR" | "IDONLY" | "NORETRY" | "LABELED" => "no equivalent",
        _ => "unknown flag",
    }
}

/// `only_from`/`no_access` items as IPs and CIDRs: xinetd's trailing zeros are wildcards
/// (`10.0.0.0` = `10.0.0.0/8`), `a.b.{c,d}` is expanded. Returns the nets and what was dropped.
fn addresses(items: &[String]) -> (Vec<String>, Vec<String>) {
    let mut nets = Vec::new();
    let mut dropped = Vec::new();
    for item in items {
        match address(item) {
            Some(list) => {
                for n in list {
                    if !nets.contains(&n) {
                        nets.push(n);
                    }
                }
            }
            None => dropped.push(item.clone()),
        }
    }
    (nets, dropped)
}

fn address(item: &str) -> Option<Vec<String>> {
    if let Some((prefix, rest)) = item.split_once('{') {
        let inner = rest.strip_suffix('}')?;
        let prefix = prefix.strip_suffix('.')?;
        return inner
            .split(',')
            .map(|c| dotted(&format!("{prefix}.{}", c.trim())))
            .collect();
    }
    if item.contains('/') {
        let net: IpNet = item.parse().ok()?;
        return Some(vec![plain(net.trunc())]);
    }
    if let Ok(IpAddr::V6(a)) = item.parse::<IpAddr>() {
        return Some(vec![a.to_string()]);
    }
    dotted(item).map(|n| vec![n])
}

/// A dotted IPv4 address of 1 to 4 numbers; trailing zeros (and missing parts) are wildcards.
fn dotted(s: &str) -> Option<String> {
    let parts: Vec<u8> = s
        .split('.')
        .map(|p| p.parse::<u8>().ok())
        .collect::<Option<Vec<u8>>>()?;
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    octets[..parts.len()].copy_from_slice(&parts);
    let significant = octets.iter().rposition(|&o| o != 0).map_or(0, |i| i + 1);
    let ip = Ipv4Addr::from(octets);
    Some(if significant == 4 {
        ip.to_string()
    } else {
        format!("{ip}/{}", significant * 8)
    })
}

/// A CIDR, or a bare IP when it is a single host.
fn plain(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xinetd_address_forms() {
        let items: Vec<String> = [
            "127.0.0.1",
            "10.0.0.0",
            "192.168.1.0/24",
            "10.1.1.7/16",
            "128.138.{12,13}",
            "1.2.3.{4,5}",
            "::1",
            "fe80::/10",
            "0.0.0.0",
            "example.org",
            ".local",
            "mynet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (nets, dropped) = addresses(&items);
        assert_eq!(
            nets,
            [
                "127.0.0.1",
                "10.0.0.0/8",
                "192.168.1.0/24",
                "10.1.0.0/16",
                "128.138.12.0/24",
                "128.138.13.0/24",
                "1.2.3.4",
                "1.2.3.5",
                "::1",
                "fe80::/10",
                "0.0.0.0/0"
            ]
        );
        assert_eq!(dropped, ["example.org", ".local", "mynet"]);
    }

    #[test]
    fn operators() {
        assert_eq!(attribute("only_from += 1.2.3.4 ::1").unwrap().1, "+=");
        assert_eq!(attribute("env -= A").unwrap().0, "env");
        assert_eq!(
            attribute("server_args = -s /srv").unwrap().2,
            ["-s", "/srv"]
        );
        assert!(attribute("what is this").is_err());
    }
}
