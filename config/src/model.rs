//! The validated configuration: types that cannot hold an invalid state.
//!
//! Everything here has already been checked by `validate`: addresses parsed, programs resolved,
//! users looked up, limits in range. The superserver never sees a raw TOML value.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

/// A whole, valid configuration: the main file and its drop-ins.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Settings of the superserver itself (`[superserver]` table of the main file).
    pub global: Global,
    /// The services, enabled or not, in the order they appear in the main file, then in each
    /// drop-in in the order of [`files`](Config::files).
    pub services: Vec<Service>,
    /// Every file read: the main file first, then each drop-in (`include` patterns in order,
    /// each pattern's matches in lexical order, then `LoadOptions::config_dirs`). A drop-in
    /// matched twice, or matching the main file, is read once and listed once.
    pub files: Vec<PathBuf>,
}

/// Settings of the superserver process itself (the optional `[superserver]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// How long SIGTERM waits for children before SIGKILL (`shutdown_grace`, default 10s).
    pub shutdown_grace: Duration,
    /// Default listen backlog for every socket (`backlog`, default `SOMAXCONN`, 4096).
    pub backlog: u32,
    /// First delay of the restart back-off for a wait-mode service that dies without
    /// accepting (`restart_backoff_min`, default 100ms).
    pub restart_backoff_min: Duration,
    /// Cap of that back-off (`restart_backoff_max`, default 30s).
    pub restart_backoff_max: Duration,
    /// The control socket (`control`).
    pub control: Control,
    /// A group whose members may read `status` (`control_group`).
    pub control_group: Option<u32>,
    /// Where Prometheus metrics are served (`metrics`, off by default).
    pub metrics: Option<SocketAddr>,
    /// Where HAProxy's `agent-check` is answered (`agent`, off by default).
    pub agent: Option<SocketAddr>,
}

/// Where the control socket is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Control {
    /// `/run/superserver/control` when root, `$XDG_RUNTIME_DIR/superserver/control` otherwise.
    #[default]
    Default,
    /// `control = false`: none.
    Off,
    /// `control = "/path"`.
    Path(PathBuf),
}

/// How the service is handed its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Hand every listening socket to one long-lived process (systemd `Accept=no`, inetd `wait`).
    Wait,
    /// Accept here and start one process per connection (systemd `Accept=yes`, inetd `nowait`).
    Nowait,
}

/// One address to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    /// A TCP listener (`tcp://host:port` or bare `host:port`).
    Tcp(SocketAddr),
    /// A UDP socket (`udp://host:port`).
    Udp(SocketAddr),
    /// A Unix stream listener (`unix:/path`). Shared: the superserver's socket and every copy
    /// of the definition point at one path.
    Unix(Arc<Path>),
}

impl ListenAddr {
    /// True for stream sockets (TCP and Unix stream), which can be accepted on.
    pub fn is_stream(&self) -> bool {
        !matches!(self, ListenAddr::Udp(_))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Udp(a) => write!(f, "udp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One socket of a service: its fd name (`LISTEN_FDNAMES`) and address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listen {
    /// The fd name handed to the service in `LISTEN_FDNAMES` (default: the service name).
    pub name: String,
    /// Where to listen.
    pub addr: ListenAddr,
}

/// What to do with a new connection when `max_instances` children are running (nowait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Stop accepting; clients wait in the kernel backlog until a child exits (default).
    Hold,
    /// Accept and close at once, logged.
    Close,
}

/// How a nowait child receives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionPassing {
    /// On stdin and stdout (inetd, systemd `StandardInput=socket`; default).
    Stdio,
    /// As fd 3 with `LISTEN_FDS=1`, `LISTEN_FDNAMES=connection` (systemd `Accept=yes` alone).
    ListenFds,
}

/// How a wait-mode service receives its listening sockets (`handoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handoff {
    /// As fd 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` (systemd `Accept=no`; default, and
    /// the value of every nowait service).
    #[default]
    ListenFds,
    /// The one listening socket on stdin and stdout (inetd/xinetd `wait`): validated to be
    /// exactly one `tcp://` or `udp://` socket.
    Stdin,
}

/// How a peer's address appears in the superserver's log lines (`log_peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogPeer {
    /// The address and port as they are (default).
    #[default]
    Full,
    /// The network only, see [`mask_peer`]: IPv4 /24, IPv6 /48; no port.
    Masked,
    /// No peer address at all.
    None,
}

/// A peer address reduced to its network for logs (`log_peer = "masked"`): IPv4 to its /24
/// network address, IPv6 to its /48, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) to the
/// IPv4 /24 (as an IPv4 address).
pub fn mask_peer(ip: IpAddr) -> IpAddr {
    let v4 = |a: Ipv4Addr| IpAddr::V4(Ipv4Addr::from(u32::from(a) & 0xffff_ff00));
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => v4(m),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !(u128::MAX >> 48))),
        },
    }
}

/// A token-bucket rate: at most `count` events per `per`, with a burst of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens per period, also the bucket size (burst).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

/// Allow/deny lists. Precedence: the most specific matching prefix wins; on a tie, deny
/// wins; an address that matches nothing is allowed when `allow` is empty, denied otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessRules {
    /// Addresses and prefixes allowed (`allow`).
    pub allow: Vec<IpNet>,
    /// Addresses and prefixes denied (`deny`).
    pub deny: Vec<IpNet>,
}

impl AccessRules {
    /// True when no rule is configured (everything is allowed, nothing to check).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Decide whether `peer` may connect. IPv4-mapped IPv6 peers are matched as IPv4.
    pub fn permits(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        let best = |list: &[IpNet]| {
            list.iter()
                .filter(|net| net.contains(&peer))
                .map(|net| net.prefix_len())
                .max()
        };
        match (best(&self.allow), best(&self.deny)) {
            (None, None) => self.allow.is_empty(),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(d)) => a > d,
        }
    }
}

/// The identity a service runs as, resolved when the config was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name as written (or the name of the numeric uid), for logs and `USER`/`LOGNAME`.
    pub user: String,
    /// Numeric uid.
    pub uid: u32,
    /// Primary gid: `group` if given, else the user's primary group.
    pub gid: u32,
    /// Supplementary groups of the user (from the group database), including `gid`.
    pub groups: Vec<u32>,
    /// The user's home directory (for `HOME`).
    pub home: PathBuf,
}

/// Resource limits set in the child before exec (soft and hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// `RLIMIT_NOFILE` (`limit_nofile`).
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC` (`limit_nproc`).
    pub nproc: Option<u64>,
}

/// Owner and mode of the service's Unix socket files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnixSocketOptions {
    /// `socket_mode`, e.g. 0o660 (default: left to the umask).
    pub mode: Option<u32>,
    /// `socket_user`, resolved to a uid.
    pub uid: Option<u32>,
    /// `socket_group`, resolved to a gid.
    pub gid: Option<u32>,
}

/// Per-source concurrency limit (nowait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSource {
    /// Maximum concurrent connections from one source (`max_per_source`).
    pub max: u32,
    /// IPv4 sources are grouped by this prefix length (`source_prefix_v4`, default 32).
    pub prefix_v4: u8,
    /// IPv6 sources are grouped by this prefix length (`source_prefix_v6`, default 128).
    pub prefix_v6: u8,
}

/// One service, valid and resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The table name (`[service.NAME]`), used first in every log line.
    pub name: String,
    /// The file the service was defined in (the main file or a drop-in), for messages; one
    /// copy shared by all the services of a file.
    pub file: Arc<Path>,
    /// `enable` (default `true`). A disabled service is validated like any other and kept
    /// here, but its addresses take no part in the clash checks and it must not be started.
    pub enabled: bool,
    /// wait or nowait.
    pub mode: Mode,
    /// The resolved program to execute (absolute path; one copy shared by the services
    /// that run it).
    pub program: Arc<Path>,
    /// argv as written, `argv[0]` included (never passed through a shell).
    pub argv: Box<[String]>,
    /// Sockets in config order; in wait mode they become fd 3, 4, … in this order.
    pub listen: Box<[Listen]>,
    /// Listen backlog (`backlog`, default from `[superserver]`).
    pub backlog: u32,
    /// Maximum concurrent children (`max_instances`; nowait default 64, wait always 1).
    pub max_instances: u32,
    /// wait: how many long-running children share the listening sockets (`instances`,
    /// 1..=256, default 1). Always 1 for nowait.
    pub instances: u32,
    /// At the `max_instances` cap (`overflow`).
    pub overflow: Overflow,
    /// `user` / `group`; `None` means run as the superserver's own user. (Boxed: most
    /// services have none, and a thousand services should not each carry the space.)
    pub credentials: Option<Box<Credentials>>,
    /// `allow_root = true` lets a root superserver run this service as root.
    pub allow_root: bool,
    /// `no_new_privs = true`: the child runs with `PR_SET_NO_NEW_PRIVS`, so neither it nor
    /// anything it executes can gain privileges (setuid/setgid bits and file capabilities
    /// are ignored).
    pub no_new_privs: bool,
    /// Variables copied from the superserver's environment when set (`pass_env`,
    /// default `["PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG"]`).
    pub pass_env: Arc<[String]>,
    /// nowait: stdio (default) or fd 3 (`connection`).
    pub connection: ConnectionPassing,
    /// wait: the sockets as `LISTEN_FDS` (default) or the one socket on stdin/stdout
    /// (`handoff`). Always `ListenFds` for nowait.
    pub handoff: Handoff,
    /// How the peer address appears in log lines (`log_peer`, default `Full`).
    pub log_peer: LogPeer,
    /// The settings most services leave at their defaults, out of line: `None` when all are
    /// (read them with [`Service::extra`]).
    pub(crate) extra: Option<Box<Extra>>,
    /// nowait: connections start with a PROXY protocol header from a trusted balancer
    /// (`proxy_protocol`, `proxy_from`, `proxy_timeout`). Boxed: most services have none.
    pub proxy: Option<Box<ProxyProtocol>>,
}

/// The settings of a service that most services leave at their defaults, kept out of line so
/// that a service setting none of them carries one null pointer instead of some 200 bytes
/// (a table of ten thousand services is mostly such services).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extra {
    /// nowait: a child still running after this long is sent SIGTERM (`max_duration`, at most
    /// one day). Always `None` for wait.
    pub max_duration: Option<Duration>,
    /// Per-source limit (`max_per_source`), nowait only.
    pub per_source: Option<PerSource>,
    /// Rate limit on accepted connections (nowait) or activations (wait) (`rate`).
    pub rate: Option<Rate>,
    /// `allow` / `deny`.
    pub access: AccessRules,
    /// Variables set for the child (`env`).
    pub env: BTreeMap<String, String>,
    /// `working_directory` (default `/`).
    pub working_directory: Option<PathBuf>,
    /// `umask`, e.g. 0o022 (default: inherited).
    pub umask: Option<u32>,
    /// `limit_nofile`, `limit_nproc`.
    pub limits: Limits,
    /// `socket_mode`, `socket_user`, `socket_group` for `unix:` listeners.
    pub unix_socket: UnixSocketOptions,
}

static DEFAULTS: Extra = Extra {
    max_duration: None,
    per_source: None,
    rate: None,
    access: AccessRules {
        allow: Vec::new(),
        deny: Vec::new(),
    },
    env: BTreeMap::new(),
    working_directory: None,
    umask: None,
    limits: Limits {
        nofile: None,
        nproc: None,
    },
    unix_socket: UnixSocketOptions {
        mode: None,
        uid: None,
        gid: None,
    },
};

impl Extra {
    /// Kept only when something differs from the defaults.
    pub(crate) fn boxed(self) -> Option<Box<Extra>> {
        (self != DEFAULTS).then(|| Box::new(self))
    }
}

impl Service {
    /// `max_duration`, `max_per_source`, `rate`, `allow`/`deny`, `env`,
    /// `working_directory`, `umask`, the limits and the Unix socket options.
    pub fn extra(&self) -> &Extra {
        self.extra.as_deref().unwrap_or(&DEFAULTS)
    }
}

/// Which PROXY protocol header versions a service accepts (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
    Any,
}

/// The PROXY protocol on a nowait service: the header is read before any process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    pub version: ProxyVersion,
    /// The balancers trusted to send it (`proxy_from`): a connection from anywhere else is
    /// refused.
    pub from: Vec<IpNet>,
    /// How long a balancer has to send the whole header (`proxy_timeout`, default 3s).
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_peers_keep_only_the_network() {
        let m = |s: &str| mask_peer(s.parse().unwrap()).to_string();
        assert_eq!(m("192.0.2.77"), "192.0.2.0");
        assert_eq!(m("10.1.2.255"), "10.1.2.0");
        assert_eq!(m("2001:db8:abcd:1234:5678::1"), "2001:db8:abcd::");
        assert_eq!(m("2001:db8:ab:ffff::"), "2001:db8:ab::");
        assert_eq!(
            m("::ffff:198.51.100.9"),
            "198.51.100.0",
            "v4-mapped: the IPv4 /24"
        );
        assert_eq!(m("::1"), "::");
    }
}
