//! What `--check` can know about the host beyond the file: whether each address can be bound
//! right now, and if not, who holds it. A port another program listens on is an error; one
//! held by a running superserver (this file's, about to be reloaded) or by systemd (which
//! passes it on through socket activation) is fine and said so, as is a holder this process
//! cannot see (not root, or in a sandbox without access to other processes' descriptors).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, SockAddr, Socket, Type};
use superserver_config::{Config, ListenAddr};

/// Programs that may hold our addresses when the check runs: a running superserver keeps its
/// sockets across a reload, and systemd hands them over (`superserver.socket`).
const FRIENDLY: &[&str] = &["superserver", "systemd"];

/// Try every TCP and UDP address of `config`. Returns (errors, notes), one line each, with
/// the service's key first.
///
/// `upgrading`: the check runs for the superserver that holds the addresses (whatever its
/// binary is called), which with its children is then friendly too.
pub fn check_addresses(config: &Config, upgrading: bool) -> (Vec<String>, Vec<String>) {
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    // First the binds; who holds the busy addresses is looked up once for all of them (a
    // table of a thousand services held by a running superserver is the usual case).
    let mut busy = Vec::new();
    for svc in config.services.iter().filter(|s| s.enabled) {
        for listen in &svc.listen {
            let (sa, ty) = match &listen.addr {
                ListenAddr::Tcp(sa) => (*sa, Type::STREAM),
                ListenAddr::Udp(sa) => (*sa, Type::DGRAM),
                ListenAddr::Unix(_) => continue,
            };
            let Err(e) = try_bind(sa, ty) else { continue };
            let key = format!("service.{}.listen: {}", svc.name, listen.addr);
            if e.raw_os_error() != Some(libc::EADDRINUSE) {
                errors.push(format!("{key}: cannot be bound: {e}"));
                continue;
            }
            busy.push((key, sa, ty == Type::STREAM));
        }
    }
    if busy.is_empty() {
        return (errors, notes);
    }
    let index = Holders::read();
    for (key, sa, tcp) in busy {
        let holders = index.of(sa, tcp);
        if holders.is_empty() {
            // Not visible from here (not root, or sandboxed): not a certain failure.
            notes.push(format!(
                "{key}: in use, by a process this check cannot see (fine if it is systemd \
                 or a running superserver; run --check as root to see which)"
            ));
        } else if holders.iter().all(|h| friendly(h, &holders, upgrading)) {
            notes.push(format!(
                "{key}: held by {} (fine: kept or passed on)",
                list(&holders)
            ));
        } else {
            errors.push(format!(
                "{key}: in use by {}; stop it or choose another address",
                list(&holders)
            ));
        }
    }
    (errors, notes)
}

/// A holder that is a superserver or systemd, or a service one of them started with the
/// socket (a running wait-mode service holds it too).
fn friendly(h: &(i32, String), all: &[(i32, String)], upgrading: bool) -> bool {
    // The superserver that runs this check (an upgrade's pre-flight), whatever its binary is
    // called, and what it started.
    let parent = if upgrading {
        nix::unistd::getppid().as_raw()
    } else {
        -1
    };
    let is = |comm: &str| FRIENDLY.contains(&comm);
    if is(&h.1) || h.0 == parent {
        return true;
    }
    let ppid = std::fs::read_to_string(format!("/proc/{}/stat", h.0))
        .ok()
        .and_then(|stat| {
            // The command may hold spaces and parentheses: the fields follow the last ')'.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<i32>().ok()
        });
    ppid.is_some_and(|pp| {
        pp == 1 || pp == parent || all.iter().any(|(pid, comm)| *pid == pp && is(comm))
    })
}

fn list(holders: &[(i32, String)]) -> String {
    holders
        .iter()
        .map(|(pid, comm)| format!("{comm} (pid {pid})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bind a throw-away socket the way the superserver would (TCP with `SO_REUSEADDR`).
fn try_bind(sa: SocketAddr, ty: Type) -> std::io::Result<()> {
    let s = Socket::new(Domain::for_address(sa), ty, None)?;
    if ty == Type::STREAM {
        s.set_reuse_address(true)?;
    }
    if sa.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&SockAddr::from(sa))
}

/// Who holds which socket, read once from `/proc/net` and `/proc/*/fd` (complete only when
/// run as root).
struct Holders {
    /// (tcp, local address, socket inode) of every TCP listener and UDP socket.
    sockets: Vec<(bool, SocketAddr, u64)>,
    /// The processes holding each socket inode, with their command names.
    by_inode: HashMap<u64, Vec<(i32, String)>>,
}

impl Holders {
    fn read() -> Holders {
        let mut sockets = Vec::new();
        for (file, tcp) in [
            ("/proc/net/tcp", true),
            ("/proc/net/tcp6", true),
            ("/proc/net/udp", false),
            ("/proc/net/udp6", false),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 10 || (tcp && f[3] != "0A") {
                    continue;
                }
                if let (Some(local), Ok(inode)) = (parse_proc_addr(f[1]), f[9].parse()) {
                    sockets.push((tcp, local, inode));
                }
            }
        }
        let mut by_inode: HashMap<u64, Vec<(i32, String)>> = HashMap::new();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                    continue;
                };
                let mut comm = None;
                let mut seen = HashSet::new();
                for fd in fds.flatten() {
                    let Ok(target) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    let target = target.to_string_lossy();
                    let Some(inode) = target
                        .strip_prefix("socket:[")
                        .and_then(|t| t.strip_suffix(']'))
                        .and_then(|t| t.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    if !seen.insert(inode) {
                        continue;
                    }
                    let comm = comm.get_or_insert_with(|| {
                        std::fs::read_to_string(p.path().join("comm"))
                            .map(|c| c.trim().to_string())
                            .unwrap_or_else(|_| "?".into())
                    });
                    by_inode.entry(inode).or_default().push((pid, comm.clone()));
                }
            }
        }
        Holders { sockets, by_inode }
    }

    /// Processes holding a socket that conflicts with `sa` (same port and family; the same
    /// IP or either a wildcard).
    fn of(&self, sa: SocketAddr, tcp: bool) -> Vec<(i32, String)> {
        let mut out: Vec<(i32, String)> = Vec::new();
        for (t, local, inode) in &self.sockets {
            let overlaps =
                local.ip() == sa.ip() || local.ip().is_unspecified() || sa.ip().is_unspecified();
            if *t != tcp
                || local.is_ipv4() != sa.is_ipv4()
                || local.port() != sa.port()
                || !overlaps
            {
                continue;
            }
            for h in self.by_inode.get(inode).into_iter().flatten() {
                if !out.contains(h) {
                    out.push(h.clone());
                }
            }
        }
        out
    }
}

/// `0100007F:1F4F` (IPv4) or 32 hex digits and a port (IPv6), as `/proc/net/*` writes them:
/// each 32-bit word in host (little-endian) order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints the address's bytes read as native-endian 32-bit words.
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_are_read_as_the_kernel_writes_them() {
        assert_eq!(
            parse_proc_addr("0100007F:1F4F"),
            Some("127.0.0.1:8015".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
    }

    #[test]
    fn a_port_another_program_listens_on_is_an_error_naming_it() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let holders = Holders::read().of(addr, true);
        let me = std::process::id() as i32;
        assert!(holders.iter().any(|(pid, _)| *pid == me), "{holders:?}");
        assert!(try_bind(addr, Type::STREAM).is_err());
    }
}
