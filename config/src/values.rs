//! Parsers and checks for single values: listen addresses, rates, CIDRs, programs, users,
//! groups and names. Each returns the value or one actionable sentence; `validate` adds the place.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use nix::unistd::{Gid, Group, Uid, User};

use crate::model::{ListenAddr, Rate};
use crate::raw::NameOrId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clash {
    Same,
    Overlap,
}

/// Where a wildcard and a specific address would collide: protocol (UDP?), family (IPv4?),
/// port. `None` for unix paths, which only clash with themselves.
type PortSlot = (bool, bool, u16);

/// The slot of an IP address, and whether it is the wildcard of its family.
fn port_slot(addr: &ListenAddr) -> Option<(PortSlot, bool)> {
    let (udp, a) = match addr {
        ListenAddr::Tcp(a) => (false, a),
        ListenAddr::Udp(a) => (true, a),
        ListenAddr::Unix(_) => return None,
    };
    Some(((udp, a.is_ipv4(), a.port()), a.ip().is_unspecified()))
}

/// For each address, the first earlier one that binding it next to would fail, and how: the
/// same address, or a wildcard and a specific address of one family on one port and protocol.
/// IPv4 and IPv6 never clash (the superserver sets `IPV6_V6ONLY`), nor do TCP and UDP.
///
/// Linear in the number of addresses (hash lookups, no pairwise comparison).
pub(crate) fn first_clashes(addrs: &[&ListenAddr]) -> Vec<Option<(usize, Clash)>> {
    let mut exact: HashMap<&ListenAddr, usize> = HashMap::with_capacity(addrs.len());
    // First use of each slot by a wildcard, and by a specific address.
    let mut wildcard: HashMap<PortSlot, usize> = HashMap::new();
    let mut specific: HashMap<PortSlot, usize> = HashMap::new();
    let mut out = Vec::with_capacity(addrs.len());
    for (i, &addr) in addrs.iter().enumerate() {
        let mut first = exact.get(addr).map(|&j| (j, Clash::Same));
        let slot = port_slot(addr);
        if let Some((slot, wild)) = slot {
            let other = if wild { &specific } else { &wildcard };
            if let Some(&j) = other.get(&slot) {
                if first.is_none_or(|(f, _)| j < f) {
                    first = Some((j, Clash::Overlap));
                }
            }
        }
        out.push(first);
        exact.entry(addr).or_insert(i);
        if let Some((slot, wild)) = slot {
            let firsts = if wild { &mut wildcard } else { &mut specific };
            firsts.entry(slot).or_insert(i);
        }
    }
    out
}

/// The pairwise definition [`first_clashes`] must agree with.
#[cfg(test)]
fn clash(a: &ListenAddr, b: &ListenAddr) -> Option<Clash> {
    if a == b {
        return Some(Clash::Same);
    }
    let (a, b) = match (a, b) {
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) | (ListenAddr::Udp(a), ListenAddr::Udp(b)) => {
            (a, b)
        }
        _ => return None,
    };
    let overlap = a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip().is_unspecified() != b.ip().is_unspecified());
    overlap.then_some(Clash::Overlap)
}

/// Parse one listen address: `tcp://HOST:PORT`, `udp://HOST:PORT`, `unix:/abs/path`, or a bare
/// `HOST:PORT` (TCP). HOST must be an IP literal: names are never looked up.
///
/// A unix path is returned normalised lexically (see [`normalize_path`]), so two spellings of one
/// path compare equal; symlinks are not resolved and nothing is read from disk. An IPv4-mapped
/// IPv6 host (`[::ffff:127.0.0.1]`) is refused: IPv6 sockets are `IPV6_V6ONLY`, so it could never
/// be bound; the message names the IPv4 address to write instead.
pub fn parse_listen_addr(text: &str) -> Result<ListenAddr, String> {
    if let Some(written) = text.strip_prefix("unix:") {
        if !written.starts_with('/') {
            return Err(format!(
                "unix socket path {written:?} must be absolute, e.g. unix:/run/superserver/echo.sock"
            ));
        }
        let path = normalize_path(written);
        if path == "/" {
            return Err(format!(
                "unix socket path {written:?} names the root directory, not a socket file"
            ));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if path.len() > 107 || path.contains('\0') {
            return Err(format!(
                "unix socket path {written:?} is longer than 107 bytes or contains NUL"
            ));
        }
        return Ok(ListenAddr::Unix(Path::new(&path).into()));
    }
    if let Some(rest) = text.strip_prefix("tcp://") {
        return parse_host_port(rest).map(ListenAddr::Tcp);
    }
    if let Some(rest) = text.strip_prefix("udp://") {
        return parse_host_port(rest).map(ListenAddr::Udp);
    }
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(format!(
            "unknown address type {:?}; use tcp://HOST:PORT, udp://HOST:PORT or unix:/path",
            format!("{scheme}://")
        ));
    }
    parse_host_port(text).map(ListenAddr::Tcp)
}

fn parse_host_port(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = SocketAddr::from_str(text) {
        if addr.port() == 0 {
            return Err(format!(
                "{text:?}: port 0 is not allowed; choose a port 1..=65535"
            ));
        }
        if let Some(v4) = mapped_v4(addr.ip()) {
            return Err(format!(
                "{text:?} is an IPv4-mapped IPv6 address, which cannot be bound (IPv6 sockets \
                 are IPV6_V6ONLY); write the IPv4 address: {v4}:{}",
                addr.port()
            ));
        }
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} has no port; write HOST:PORT, e.g. 127.0.0.1:7000"
        ));
    };
    if host.parse::<Ipv6Addr>().is_ok() || text.parse::<Ipv6Addr>().is_ok() {
        return Err(format!(
            "{text:?}: put IPv6 addresses in brackets, e.g. [::1]:7000"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?}: invalid port {port:?}, must be 1..=65535"
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{text:?} is not a valid address; write e.g. 127.0.0.1:7000 or [::1]:7000"
        ));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Err(format!(
            "{host:?} is not an IP address (names are never looked up); write 127.0.0.1 or [::1]"
        ));
    }
    Err(format!(
        "{host:?} is not an IP address (names are never looked up); write an IP such as \
         127.0.0.1, 0.0.0.0 or [::]"
    ))
}

/// The longest `rate` period (one day): longer periods are refused rather than overflowing a
/// deadline computed from them later.
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Parse a rate: `N/s`, `N/m`, `N/min`, `N/h` or `N/<duration>` (e.g. `100/10s`); the period is
/// more than 0 and at most [`MAX_RATE_PERIOD`].
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!(
            "invalid rate {text:?}; write COUNT/PERIOD, e.g. \"50/s\", \"600/min\" or \"100/10s\""
        )
    };
    let (count, per) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if !(1..=1_000_000).contains(&count) {
        return Err(format!(
            "rate {text:?}: count must be between 1 and 1000000"
        ));
    }
    let per = per.trim();
    let per = match per {
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => humantime::parse_duration(per)
            .or_else(|_| humantime::parse_duration(&format!("1{per}")))
            .map_err(|_| bad())?,
    };
    if per.is_zero() {
        return Err(format!("rate {text:?}: the period must be longer than 0"));
    }
    if per > MAX_RATE_PERIOD {
        return Err(format!(
            "rate {text:?}: the period must be at most {}",
            humantime::format_duration(MAX_RATE_PERIOD)
        ));
    }
    Ok(Rate { count, per })
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), else `None`.
fn mapped_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

/// Parse an `allow`/`deny` item: an IP (a /32 or /128) or a CIDR without host bits.
///
/// An IPv4-mapped IPv6 item (`::ffff:10.0.0.1`, `::ffff:10.0.0.0/104`) is refused with the IPv4
/// form to write instead: mapped peers are matched as IPv4 (see [`AccessRules::permits`]), so
/// such a rule would never match anything.
///
/// [`AccessRules::permits`]: crate::AccessRules::permits
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let net = parse_net_as_written(text)?;
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let suggestion = if v6.prefix_len() == 128 {
                v4.to_string()
            } else {
                format!("{v4}/{}", v6.prefix_len() - 96)
            };
            return Err(format!(
                "{text:?} is an IPv4-mapped IPv6 address, and mapped peers are matched as IPv4; \
                 write {suggestion:?}"
            ));
        }
    }
    Ok(net)
}

fn parse_net_as_written(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        let net = IpNet::from_str(text).map_err(|_| {
            format!("invalid CIDR {text:?}; write e.g. \"127.0.0.0/8\" or \"fd00::/8\"")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set; did you mean \"{}\"?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    IpAddr::from_str(text).map(IpNet::from).map_err(|_| {
        format!("invalid address {text:?}; write an IP or CIDR such as \"127.0.0.1\" or \"10.0.0.0/8\" (names are never looked up)")
    })
}

/// Find the program of `exec`: an absolute path as it is; a bare name in `exe_dir`, then in
/// each absolute directory of `path` (the superserver's `PATH`). A relative path with a `/` is
/// refused (it would depend on the working directory).
pub fn resolve_program(
    program: &str,
    exe_dir: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program (exec[0]) is empty".to_owned());
    }
    if program.contains('/') {
        if !program.starts_with('/') {
            return Err(format!(
                "relative program path {program:?} is not allowed; write an absolute path, or a \
                 bare name to look up next to the superserver and on PATH"
            ));
        }
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) => Err(format!("program {program:?}: {}", lower_io(&e))),
            Ok(m) if !m.is_file() => Err(format!("program {program:?} is not a regular file")),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                Err(format!("program {program:?} is not executable"))
            }
            Ok(_) => Ok(p),
        };
    }
    let dirs = exe_dir
        .map(Path::to_path_buf)
        .into_iter()
        .chain(
            path.map(|p| std::env::split_paths(p).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .filter(|d| d.is_absolute());
    for dir in dirs {
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    let on_path = match path {
        Some(p) => format!("on PATH ({})", p.to_string_lossy()),
        None => "on PATH (PATH is not set)".to_owned(),
    };
    Err(match exe_dir {
        Some(dir) => format!(
            "program {program:?} not found next to the superserver (in {}) or {on_path}",
            dir.display()
        ),
        None => format!("program {program:?} not found {on_path}"),
    })
}

pub(crate) fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn check_directory(dir: &str) -> Result<PathBuf, String> {
    if !dir.starts_with('/') {
        return Err(format!("{dir:?} must be an absolute path"));
    }
    match std::fs::metadata(dir) {
        Err(e) => Err(format!("{dir:?}: {}", lower_io(&e))),
        Ok(m) if !m.is_dir() => Err(format!("{dir:?} is not a directory")),
        Ok(_) => Ok(PathBuf::from(dir)),
    }
}

/// The directory of a `unix:` socket must exist (the superserver creates the socket file,
/// never directories). `path` is normalised and absolute.
pub(crate) fn check_socket_directory(path: &Path) -> Result<(), String> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let shown = dir.to_string_lossy();
    match std::fs::metadata(dir) {
        Err(e) => Err(format!(
            "the socket's directory {shown:?} {}; create it first (systemd: \
             RuntimeDirectory=) or choose a path in an existing directory",
            lower_io(&e)
        )),
        Ok(m) if !m.is_dir() => Err(format!(
            "the socket's directory {shown:?} is not a directory"
        )),
        Ok(_) => Ok(()),
    }
}

/// An io::Error as a short lowercase phrase ("does not exist"), without "(os error 2)".
fn lower_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

pub(crate) fn resolve_user(u: &NameOrId) -> Result<User, String> {
    let found = match u {
        NameOrId::Name(n) => User::from_name(n),
        NameOrId::Id(i) => User::from_uid(Uid::from_raw(*i)),
    };
    match (found, u) {
        (Ok(Some(pw)), _) => Ok(pw),
        (Ok(None), NameOrId::Name(n)) => Err(format!("user {n:?} does not exist")),
        (Ok(None), NameOrId::Id(i)) => Err(format!("uid {i} does not exist (no passwd entry)")),
        (Err(e), _) => Err(format!("cannot look up user {u}: {e}")),
    }
}

pub(crate) fn resolve_group(g: &NameOrId) -> Result<Gid, String> {
    let found = match g {
        NameOrId::Name(n) => Group::from_name(n),
        NameOrId::Id(i) => Group::from_gid(Gid::from_raw(*i)),
    };
    match (found, g) {
        (Ok(Some(gr)), _) => Ok(gr.gid),
        (Ok(None), NameOrId::Name(n)) => Err(format!("group {n:?} does not exist")),
        (Ok(None), NameOrId::Id(i)) => Err(format!("gid {i} does not exist (no group entry)")),
        (Err(e), _) => Err(format!("cannot look up group {g}: {e}")),
    }
}

pub(crate) fn check_service_name(name: &str) -> Result<(), String> {
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if name.is_empty() || name.len() > 64 || !ok {
        return Err(format!(
            "invalid service name {name:?}: use 1 to 64 letters, digits, '_', '.' or '-'"
        ));
    }
    Ok(())
}

/// systemd's rules for `LISTEN_FDNAMES` entries.
pub(crate) fn check_fd_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "invalid fd name {name:?}: must be 1 to 255 characters"
        ));
    }
    if name.contains(':') {
        return Err(format!(
            "invalid fd name {name:?}: ':' separates names in LISTEN_FDNAMES and cannot be used"
        ));
    }
    if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(format!(
            "invalid fd name \"{}\": only printable ASCII characters are allowed",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// Variables the superserver sets itself for a service's process, so `env` and `pass_env` may
/// not name them: the per-connection peer identity (UCSPI and systemd style) and
/// `JOURNAL_STREAM`. Every `LISTEN_*` name is reserved as well (socket activation), by prefix.
pub const RESERVED_ENV_NAMES: &[&str] = &[
    "PROTO",
    "TCPREMOTEIP",
    "TCPREMOTEPORT",
    "TCPLOCALIP",
    "TCPLOCALPORT",
    "TCPREMOTEHOST",
    "TCPLOCALHOST",
    "TCPREMOTEINFO",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "REMOTE_HOST",
    "PROXY_ADDR",
    "PROXY_PORT",
    "JOURNAL_STREAM",
];

/// The prefix of the socket-activation variables (`LISTEN_FDS`, `LISTEN_PID`, …), all reserved.
pub const RESERVED_ENV_PREFIX: &str = "LISTEN_";

/// True when `env`/`pass_env` may not name `name`: it is in [`RESERVED_ENV_NAMES`] or starts
/// with [`RESERVED_ENV_PREFIX`].
pub fn is_reserved_env_name(name: &str) -> bool {
    name.starts_with(RESERVED_ENV_PREFIX) || RESERVED_ENV_NAMES.contains(&name)
}

pub(crate) fn check_env_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!(
            "invalid variable name \"{}\": use letters, digits and '_', not starting with a digit",
            name.escape_debug()
        ));
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "{name:?}: LISTEN_* variables are set by the superserver for socket activation; \
             choose another name"
        ));
    }
    if RESERVED_ENV_NAMES.contains(&name) {
        return Err(format!(
            "{name:?} is set by the superserver for each connection (or by systemd), so a \
             service cannot set or pass it; choose another name"
        ));
    }
    Ok(())
}

/// `path` with `.` and empty components removed and each `..` taking away the component before
/// it (never above the root), purely lexically: no symlink is resolved, nothing is read.
/// `/tmp//d/./../d/a.sock` becomes `/tmp/d/a.sock`. For absolute paths.
pub fn normalize_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let tcp = |s: &str| ListenAddr::Tcp(s.parse().unwrap());
        assert_eq!(parse_listen_addr("127.0.0.1:7"), Ok(tcp("127.0.0.1:7")));
        assert_eq!(parse_listen_addr("tcp://[::1]:7113"), Ok(tcp("[::1]:7113")));
        assert_eq!(
            parse_listen_addr("udp://0.0.0.0:53"),
            Ok(ListenAddr::Udp("0.0.0.0:53".parse().unwrap()))
        );
        assert_eq!(
            parse_listen_addr("unix:/run/x.sock"),
            Ok(ListenAddr::Unix(Path::new("/run/x.sock").into()))
        );
        for bad in [
            "localhost:7",
            "example.com:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:7",
            "unix:run/x",
            "http://1.2.3.4:80",
            "tcp://",
        ] {
            assert!(parse_listen_addr(bad).is_err(), "{bad}");
        }
        assert!(
            parse_listen_addr("localhost:7")
                .unwrap_err()
                .contains("127.0.0.1 or [::1]")
        );
    }

    #[test]
    fn rates() {
        let r = |c, s| {
            Ok(Rate {
                count: c,
                per: Duration::from_secs(s),
            })
        };
        assert_eq!(parse_rate("50/s"), r(50, 1));
        assert_eq!(parse_rate("600/min"), r(600, 60));
        assert_eq!(parse_rate("600/m"), r(600, 60));
        assert_eq!(parse_rate("5/h"), r(5, 3600));
        assert_eq!(parse_rate("100/10s"), r(100, 10));
        assert_eq!(parse_rate("1/1d"), r(1, 86400));
        for bad in [
            "0/s",
            "1000001/s",
            "x/s",
            "5",
            "5/",
            "5/0s",
            "5/parsec",
            "-1/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nets() {
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_net("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_net("127.0.0.1/8").unwrap_err(),
            "\"127.0.0.1/8\" has host bits set; did you mean \"127.0.0.0/8\"?"
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("localhost").is_err());
    }

    #[test]
    fn unix_paths_are_normalised_lexically() {
        assert_eq!(normalize_path("/tmp//d/./../d/a.sock"), "/tmp/d/a.sock");
        assert_eq!(normalize_path("/../a"), "/a");
        assert_eq!(
            parse_listen_addr("unix:/tmp/d/../d/a.sock"),
            parse_listen_addr("unix:/tmp/d/a.sock")
        );
        assert!(parse_listen_addr("unix:/tmp/..").is_err());
    }

    #[test]
    fn mapped_ipv4_is_refused_with_the_ipv4_form() {
        let err = parse_listen_addr("[::ffff:127.0.0.1]:7000").unwrap_err();
        assert!(
            err.ends_with("write the IPv4 address: 127.0.0.1:7000"),
            "{err}"
        );
        assert!(
            parse_net("::ffff:10.0.0.1")
                .unwrap_err()
                .ends_with("write \"10.0.0.1\"")
        );
        assert!(
            parse_net("::ffff:10.0.0.0/104")
                .unwrap_err()
                .ends_with("write \"10.0.0.0/8\"")
        );
        assert!(
            parse_net("::/0").is_ok(),
            "a v6 net that merely contains the mapped range"
        );
    }

    #[test]
    fn reserved_environment_names() {
        for name in RESERVED_ENV_NAMES
            .iter()
            .copied()
            .chain(["LISTEN_FDS", "LISTEN_X"])
        {
            assert!(is_reserved_env_name(name), "{name}");
            assert!(check_env_name(name).is_err(), "{name}");
        }
        assert!(check_env_name("TCPREMOTE").is_ok());
    }

    #[test]
    fn rate_period_is_capped() {
        assert!(parse_rate("1/1d").is_ok());
        assert!(parse_rate("1/2d").is_err());
        assert!(parse_rate("1/300000000000y").is_err());
    }

    #[test]
    fn hashed_clash_check_agrees_with_the_pairwise_definition() {
        let texts = [
            "0.0.0.0:7",
            "127.0.0.1:7",
            "[::]:7",
            "[::1]:7",
            "udp://127.0.0.1:7",
            "udp://0.0.0.0:7",
            "127.0.0.1:7",
            "127.0.0.2:7",
            "unix:/a",
            "unix:/b",
            "unix:/a",
            "0.0.0.0:8",
            "127.0.0.1:8",
            "[::1]:7",
        ];
        let addrs: Vec<ListenAddr> = texts
            .iter()
            .map(|t| parse_listen_addr(t).unwrap())
            .collect();
        let refs: Vec<&ListenAddr> = addrs.iter().collect();
        let pairwise: Vec<Option<(usize, Clash)>> = (0..addrs.len())
            .map(|i| (0..i).find_map(|j| clash(&addrs[i], &addrs[j]).map(|c| (j, c))))
            .collect();
        assert_eq!(first_clashes(&refs), pairwise);
    }

    #[test]
    fn clashes() {
        let a = |s: &str| parse_listen_addr(s).unwrap();
        assert!(clash(&a("0.0.0.0:7"), &a("127.0.0.1:7")).is_some());
        assert!(clash(&a("[::]:7"), &a("[::1]:7")).is_some());
        assert!(clash(&a("[::]:7"), &a("0.0.0.0:7")).is_none());
        assert!(clash(&a("[::]:7"), &a("127.0.0.1:7")).is_none());
        assert!(clash(&a("tcp://0.0.0.0:7"), &a("udp://127.0.0.1:7")).is_none());
        assert!(clash(&a("127.0.0.1:7"), &a("127.0.0.2:7")).is_none());
        assert!(clash(&a("unix:/a"), &a("unix:/a")).is_some());
        assert!(clash(&a("unix:/a"), &a("unix:/b")).is_none());
    }

    #[test]
    fn program_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = std::ffi::OsString::from("/bin:/usr/bin");

        // exe_dir comes before PATH.
        assert_eq!(
            resolve_program("tool", Some(dir.path()), Some(&path)),
            Ok(exe.clone())
        );
        assert!(resolve_program("cat", Some(dir.path()), Some(&path)).is_ok());
        assert!(resolve_program("plain", Some(dir.path()), None).is_err());
        assert!(
            resolve_program(plain.to_str().unwrap(), None, None)
                .unwrap_err()
                .contains("not executable")
        );
        assert!(
            resolve_program("./tool", Some(dir.path()), None)
                .unwrap_err()
                .contains("relative")
        );
        assert_eq!(
            resolve_program("nope", Some(Path::new("/x")), Some(&path)).unwrap_err(),
            "program \"nope\" not found next to the superserver (in /x) or on PATH (/bin:/usr/bin)"
        );
    }
}
