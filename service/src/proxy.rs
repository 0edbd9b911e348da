//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, v1 text and v2 binary): read the
//! header a trusted load balancer puts before a client's bytes, by the spec's rules.
//!
//! The rules, the same for the superserver (before it forks) and for a server using this
//! library (per connection):
//! * the header is only accepted from the balancers in [`Rules::from`]; a connection from
//!   anywhere else is refused, never served with a guessed address;
//! * a connection is never guessed to have a header or not: when the protocol is on, every
//!   connection must start with one ([`Version::Any`] accepts either version, telling them
//!   apart by the signature, as the spec allows);
//! * exactly the header's bytes are consumed: what the client sent after it stays in the
//!   socket for the server (the header is found with `MSG_PEEK`, then read by its length);
//! * a header that is not complete within [`Rules::timeout`] (default 3 s, the spec's
//!   minimum) is a refusal; so is a malformed one.
//!
//! [`try_read`] is the non-blocking step an event loop calls whenever the connection is
//! readable; [`read_blocking`] is the whole exchange for a thread-per-connection server.
//!
//! ```
//! use small_services::proxy::{self, Header, Step, Version};
//!
//! let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40112 80\r\nGET / HTTP/1.0\r\n\r\n";
//! match proxy::parse(Version::Any, v1) {
//!     Step::Done { len, header: Header::Proxied { source, .. } } => {
//!         assert_eq!(source.to_string(), "203.0.113.7:40112");
//!         assert_eq!(&v1[len..len + 3], b"GET"); // the client's bytes start here
//!     }
//!     other => panic!("{other:?}"),
//! }
//! assert!(matches!(proxy::parse(Version::V1, b"PROXY TCP4 203.0"), Step::More));
//! assert!(matches!(proxy::parse(Version::V1, b"GET / HTTP/1.0\r\n"), Step::Invalid(_)));
//! ```

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::time::{Duration, Instant};

pub use ipnet::IpNet;

/// How long a balancer has to send the whole header (the spec asks receivers to wait at
/// least 3 seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest v1 header, CRLF included.
pub const MAX_V1: usize = 107;
/// The longest v2 header accepted. The format allows 16 + 65535 bytes; balancers send the
/// addresses and a few TLVs (HAProxy's SSL and unique-id TLVs included, well under 1 KiB).
/// The bound matters because an incomplete header is peeked again on every readable event:
/// a trusted balancer trickling a 64 KiB header byte by byte would cost gigabytes of copying
/// within its timeout, a 4 KiB one at most 16 MB.
pub const MAX_V2: usize = 4096;
/// What is peeked first: the spec's recommended buffer, enough for v1 and for v2 with the
/// usual TLVs; a longer v2 header is peeked again at its announced length.
const FIRST_PEEK: usize = 536;

/// Which header versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text header (`PROXY TCP4 … \r\n`): HAProxy's `send-proxy`.
    V1,
    /// The binary header: HAProxy's `send-proxy-v2`.
    V2,
    /// Either, told apart by the v2 signature.
    Any,
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            "any" => Ok(Version::Any),
            other => Err(format!(
                "{other:?} is not a PROXY protocol version: v1, v2 or any"
            )),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::Any => "any",
        })
    }
}

/// One trusted balancer or network, as written on a command line: `10.0.0.2`, `10.0.0.0/24`,
/// `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted(pub IpNet);

impl FromStr for Trusted {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net = if s.contains('/') {
            s.parse::<IpNet>().map_err(|e| format!("{s:?}: {e}"))?
        } else {
            IpNet::from(s.parse::<IpAddr>().map_err(|e| format!("{s:?}: {e}"))?)
        };
        Ok(Trusted(net.trunc()))
    }
}

/// Who may send a header, which versions, and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub version: Version,
    /// The trusted balancers. Empty trusts nobody.
    pub from: Vec<IpNet>,
    pub timeout: Duration,
}

impl Rules {
    /// May `peer` (the connection's own source) send a header? IPv4-mapped IPv6 peers are
    /// matched as IPv4.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        trusted(&self.from, peer)
    }
}

/// Is `peer` in one of the balancer networks `from`? IPv4-mapped IPv6 peers are matched as
/// IPv4. ([`Rules::trusts`], for callers that keep the networks elsewhere.)
pub fn trusted(from: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    from.iter().any(|net| net.contains(&peer))
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A relayed TCP connection: `source` is the client, `destination` the address the client
    /// connected to (on the balancer).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 `LOCAL`: the balancer's own connection, such as its health check.
    Local,
    /// v1 `UNKNOWN`, or a v2 header for an address family other than IPv4/IPv6 (the spec: use
    /// the connection's own addresses).
    Unknown,
}

/// One look at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not complete yet: wait for more.
    More,
    /// A header of `len` bytes.
    Done { len: usize, header: Header },
    /// Not a valid header (the reason, for the log).
    Invalid(String),
}

/// Look at the first bytes of a connection (`buf` may hold more than the header).
pub fn parse(version: Version, buf: &[u8]) -> Step {
    match version {
        Version::V1 => v1(buf),
        Version::V2 => v2(buf),
        Version::Any => {
            // The v2 signature starts with "\r\n", which no v1 header does: the first byte
            // decides, and an empty buffer waits.
            match buf.first() {
                None => Step::More,
                Some(b'\r') => v2(buf),
                Some(_) => v1(buf),
            }
        }
    }
}

fn v1(buf: &[u8]) -> Step {
    use ppp::v1::{Addresses, Header as H};
    // A v1 header is judged whole, once its CRLF is there: the parser's view of a line cut
    // in the middle of a port is not reliable. Before that only the signature is checked, so
    // that a client speaking its own protocol is refused at once.
    let end = match buf.iter().position(|&b| b == b'\r') {
        Some(cr) if cr + 1 < buf.len() => cr + 2,
        Some(_) => return Step::More, // the LF is still to come
        None if buf.len() >= MAX_V1 => {
            return Step::Invalid(format!(
                "not a PROXY v1 header: no CRLF within its {MAX_V1} bytes"
            ));
        }
        None => {
            let n = buf.len().min(6);
            if buf[..n] != b"PROXY "[..n] {
                return Step::Invalid(
                    "not a PROXY v1 header: it must start with \"PROXY \"".into(),
                );
            }
            return Step::More;
        }
    };
    if end > MAX_V1 {
        return Step::Invalid(format!("not a PROXY v1 header: longer than {MAX_V1} bytes"));
    }
    match H::try_from(&buf[..end]) {
        Ok(h) => {
            let header = match h.addresses {
                Addresses::Tcp4(a) => proxied(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                Addresses::Tcp6(a) => proxied(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                Addresses::Unknown => Header::Unknown,
            };
            Step::Done { len: end, header }
        }
        Err(e) => Step::Invalid(format!("not a PROXY v1 header: {}", lower(&e.to_string()))),
    }
}

fn v2(buf: &[u8]) -> Step {
    use ppp::PartialResult;
    use ppp::v2::{Addresses, Command, Header as H, Protocol};
    match H::try_from(buf) {
        Ok(h) => {
            let len = h.len();
            let header = match (h.command, h.addresses) {
                (Command::Local, _) => Header::Local,
                (Command::Proxy, Addresses::IPv4(a)) if h.protocol == Protocol::Stream => proxied(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                (Command::Proxy, Addresses::IPv6(a)) if h.protocol == Protocol::Stream => proxied(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                (Command::Proxy, Addresses::IPv4(_) | Addresses::IPv6(_)) => {
                    return Step::Invalid(
                        "a PROXY v2 header for a datagram (UDP) client on a stream connection"
                            .into(),
                    );
                }
                (Command::Proxy, _) => Header::Unknown,
            };
            Step::Done { len, header }
        }
        Err(e) if e.is_incomplete() => Step::More,
        Err(e) => Step::Invalid(format!("not a PROXY v2 header: {}", lower(&e.to_string()))),
    }
}

fn proxied(source: IpAddr, sport: u16, destination: IpAddr, dport: u16) -> Header {
    Header::Proxied {
        source: SocketAddr::new(source, sport),
        destination: SocketAddr::new(destination, dport),
    }
}

/// ppp's messages are sentences; ours go after a colon.
fn lower(s: &str) -> String {
    let s = s.trim_end_matches('.');
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// How many bytes to look at, given what was seen: a v2 header announces its length after 16
/// bytes.
fn wanted(seen: &[u8]) -> usize {
    if seen.len() >= 16 && seen.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
        16 + usize::from(u16::from_be_bytes([seen[14], seen[15]]))
    } else {
        FIRST_PEEK
    }
}

/// Peek at what the connection has received and, once a header is complete, read exactly its
/// bytes. Non-blocking on a non-blocking socket: `Ok(Step::More)` when the header is not all
/// there yet (call again when readable), and [`Step::Invalid`] also when the peer closed or
/// shut down its side before the header was complete.
pub fn try_read(socket: &socket2::Socket, version: Version) -> io::Result<Step> {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); FIRST_PEEK];
    loop {
        let n = match socket.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::More),
            Err(e) => return Err(e),
        };
        // SAFETY: peek initialised the first n bytes.
        let seen: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
        if n == 0 {
            return Ok(Step::Invalid(
                "the connection closed before a complete PROXY header".into(),
            ));
        }
        let step = parse(version, seen);
        match step {
            Step::Done { len, .. } => {
                consume(socket, len)?;
                return Ok(step);
            }
            Step::More => {
                let want = wanted(seen);
                if want > MAX_V2 {
                    return Ok(Step::Invalid(format!(
                        "a PROXY v2 header of {want} bytes (at most {MAX_V2} are accepted)"
                    )));
                }
                if want > buf.len() && n == buf.len() {
                    // A long v2 header: look again at its whole length.
                    buf.resize(want, MaybeUninit::uninit());
                    continue;
                }
                return Ok(Step::More);
            }
            Step::Invalid(_) => return Ok(step),
        }
    }
}

/// Read exactly `len` bytes that a peek showed are there.
fn consume(socket: &socket2::Socket, len: usize) -> io::Result<()> {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); len];
    let mut done = 0;
    while done < len {
        match socket.recv(&mut buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a connection was refused instead of served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The connection's source is not one of [`Rules::from`].
    Untrusted(IpAddr),
    /// Not a valid header, or the connection ended before one was complete.
    Invalid(String),
    /// No complete header within [`Rules::timeout`].
    Timeout,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Untrusted(ip) => write!(f, "{ip} is not in proxy_from"),
            Refused::Invalid(why) => f.write_str(why),
            Refused::Timeout => f.write_str("no complete PROXY header in time"),
        }
    }
}

/// The whole exchange on a connection a thread serves: check the balancer, wait (up to the
/// timeout) for the header, consume it. `peer` is the connection's own source. The socket's
/// blocking mode is left as it was found.
pub fn read_blocking<S: AsRawFd>(
    stream: &S,
    peer: SocketAddr,
    rules: &Rules,
) -> io::Result<Result<Header, Refused>> {
    if !rules.trusts(peer.ip()) {
        return Ok(Err(Refused::Untrusted(peer.ip())));
    }
    let fd = stream.as_raw_fd();
    // SAFETY: a borrowed view of the caller's descriptor, never closed here (ManuallyDrop).
    let socket = std::mem::ManuallyDrop::new(unsafe {
        <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let deadline = Instant::now() + rules.timeout;
    loop {
        match try_read(&socket, rules.version)? {
            Step::Done { header, .. } => return Ok(Ok(header)),
            Step::Invalid(why) => return Ok(Err(Refused::Invalid(why))),
            Step::More => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Err(Refused::Timeout));
        }
        // Wait for more bytes (or the deadline) without consuming anything.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // A v1 header that arrives in pieces leaves the socket readable with the same
        // bytes: wait a moment before peeking again rather than spinning.
        if r > 0 {
            std::thread::sleep(Duration::from_millis(1).min(left));
        }
    }
}

/// [`read_blocking`] for tokio (feature `tokio`): check the balancer, wait (up to the timeout,
/// without blocking the runtime) for the header, consume it.
///
/// ```no_run
/// # async fn f(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// use small_services::proxy::{self, Header, Rules, Version};
/// let rules = Rules {
///     version: Version::V2,
///     from: vec!["10.0.0.2/32".parse().unwrap()],
///     timeout: proxy::DEFAULT_TIMEOUT,
/// };
/// let (stream, peer) = listener.accept().await?;
/// let client = match proxy::read_async(&stream, peer, &rules).await? {
///     Ok(Header::Proxied { source, .. }) => source,
///     Ok(_) => peer, // LOCAL or UNKNOWN: the connection's own address
///     Err(refused) => return Ok(eprintln!("{peer}: {refused}")), // drop it unserved
/// };
/// # let _ = client; Ok(()) }
/// ```
#[cfg(feature = "tokio")]
pub async fn read_async(
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
    rules: &Rules,
) -> io::Result<Result<Header, Refused>> {
    if !rules.trusts(peer.ip()) {
        return Ok(Err(Refused::Untrusted(peer.ip())));
    }
    let version = rules.version;
    let read = async {
        loop {
            stream.readable().await?;
            // An incomplete header is reported as WouldBlock so that tokio forgets the
            // readiness and the next `readable` waits for more bytes instead of spinning.
            let step = stream.try_io(tokio::io::Interest::READABLE, || {
                match try_read(&socket2::SockRef::from(stream), version)? {
                    Step::More => Err(io::ErrorKind::WouldBlock.into()),
                    step => Ok(step),
                }
            });
            match step {
                Ok(Step::Done { header, .. }) => return Ok(Ok(header)),
                Ok(Step::Invalid(why)) => return Ok(Err(Refused::Invalid(why))),
                Ok(Step::More) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(rules.timeout, read).await {
        Ok(result) => result,
        Err(_) => Ok(Err(Refused::Timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: u8, fam: u8, addr: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(fam);
        h.extend_from_slice(&((addr.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h.extend_from_slice(tlvs);
        h
    }

    fn v4_addrs() -> Vec<u8> {
        let mut a = vec![203, 0, 113, 7, 192, 0, 2, 1];
        a.extend_from_slice(&40112u16.to_be_bytes());
        a.extend_from_slice(&80u16.to_be_bytes());
        a
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40112 443\r\nrest";
        let Step::Done { len, header } = parse(Version::V1, h) else {
            panic!()
        };
        assert_eq!(len, h.len() - 4);
        assert_eq!(
            header,
            Header::Proxied {
                source: "[2001:db8::7]:40112".parse().unwrap(),
                destination: "[2001:db8::1]:443".parse().unwrap()
            }
        );
        let u = b"PROXY UNKNOWN whatever follows\r\n";
        assert_eq!(
            parse(Version::Any, u),
            Step::Done {
                len: u.len(),
                header: Header::Unknown
            }
        );
    }

    #[test]
    fn v1_pieces_wait_and_garbage_is_refused() {
        let full = b"PROXY TCP4 203.0.113.7 192.0.2.1 40112 80\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(Version::V1, &full[..cut]), Step::More, "cut at {cut}");
        }
        assert!(matches!(parse(Version::V1, b"HELLO\r\n"), Step::Invalid(_)));
        assert!(matches!(
            parse(Version::V1, b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n"),
            Step::Invalid(_)
        ));
        // No CRLF within the 107 bytes a v1 header may take.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(Version::V1, &long), Step::Invalid(_)));
    }

    #[test]
    fn v2_proxy_local_and_pieces() {
        let tlv = [0x04, 0x00, 0x02, 0xaa, 0xbb]; // a NOOP TLV
        let h = v2_header(1, 0x11, &v4_addrs(), &tlv);
        for cut in 0..h.len() {
            assert_eq!(parse(Version::V2, &h[..cut]), Step::More, "cut at {cut}");
        }
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"client bytes");
        assert_eq!(
            parse(Version::Any, &with_data),
            Step::Done {
                len: h.len(),
                header: Header::Proxied {
                    source: "203.0.113.7:40112".parse().unwrap(),
                    destination: "192.0.2.1:80".parse().unwrap()
                }
            }
        );
        let local = v2_header(0, 0x00, &[], &[]);
        assert_eq!(
            parse(Version::V2, &local),
            Step::Done {
                len: 16,
                header: Header::Local
            }
        );
        // A v1 header where only v2 is accepted, and the other way round.
        assert!(matches!(
            parse(
                Version::V2,
                b"PROXY TCP4 203.0.113.7 192.0.2.1 40112 80\r\n"
            ),
            Step::Invalid(_)
        ));
        assert!(matches!(parse(Version::V1, &h), Step::Invalid(_)));
        // UDP over a stream connection is refused; a bad version too.
        assert!(matches!(
            parse(Version::V2, &v2_header(1, 0x12, &v4_addrs(), &[])),
            Step::Invalid(_)
        ));
        let mut bad = h.clone();
        bad[12] = 0x31;
        assert!(matches!(parse(Version::V2, &bad), Step::Invalid(_)));
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn read_async_waits_for_pieces_and_times_out() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let rules = Rules {
                version: Version::Any,
                from: vec!["127.0.0.0/8".parse().unwrap()],
                timeout: Duration::from_millis(300),
            };
            let client = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                let h = b"PROXY TCP4 203.0.113.7 192.0.2.1 40112 80\r\nafter";
                c.write_all(&h[..9]).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                c.write_all(&h[9..]).unwrap();
                c
            });
            let (s, peer) = l.accept().await.unwrap();
            let got = read_async(&s, peer, &rules).await.unwrap();
            assert_eq!(
                got,
                Ok(Header::Proxied {
                    source: "203.0.113.7:40112".parse().unwrap(),
                    destination: "192.0.2.1:80".parse().unwrap()
                })
            );
            let _c = client.join().unwrap();
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            let mut rest = [0u8; 5];
            (&s).read_exact(&mut rest).unwrap();
            assert_eq!(&rest, b"after");
            // Silent: refused at the timeout.
            let _silent = std::net::TcpStream::connect(addr).unwrap();
            let (s, peer) = l.accept().await.unwrap();
            assert_eq!(
                read_async(&s, peer, &rules).await.unwrap(),
                Err(Refused::Timeout)
            );
        });
    }

    #[test]
    fn an_oversized_v2_header_is_refused_before_it_is_all_there() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut h = v2_header(1, 0x11, &v4_addrs(), &[]);
        h[14..16].copy_from_slice(&60000u16.to_be_bytes()); // announces 60,000 bytes
        c.write_all(&h).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let s = socket2::Socket::from(s);
        s.set_nonblocking(true).unwrap();
        assert!(
            matches!(try_read(&s, Version::V2).unwrap(), Step::Invalid(ref why) if why.contains("60016 bytes")),
        );
    }

    #[test]
    fn trusted_balancers() {
        let rules = Rules {
            version: Version::Any,
            from: vec!["10.0.0.0/24".parse().unwrap(), "::1/128".parse().unwrap()],
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(rules.trusts("10.0.0.9".parse().unwrap()));
        assert!(rules.trusts("::ffff:10.0.0.9".parse().unwrap()));
        assert!(rules.trusts("::1".parse().unwrap()));
        assert!(!rules.trusts("10.0.1.9".parse().unwrap()));
    }

    #[test]
    fn try_read_consumes_exactly_the_header() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let tlv = vec![0x04u8, 0x03, 0x00]; // NOOP TLV of 768 bytes: longer than the first peek
        let mut tlv = tlv;
        tlv.extend(std::iter::repeat_n(0u8, 768));
        let h = v2_header(1, 0x11, &v4_addrs(), &tlv);
        c.write_all(&h[..10]).unwrap();
        let rules = Rules {
            version: Version::V2,
            from: vec!["127.0.0.0/8".parse().unwrap()],
            timeout: Duration::from_secs(5),
        };
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c.write_all(&h[10..]).unwrap();
            c.write_all(b"after").unwrap();
            c
        });
        let got = read_blocking(&s, peer, &rules).unwrap();
        assert!(matches!(got, Ok(Header::Proxied { .. })), "{got:?}");
        let _c = writer.join().unwrap();
        let mut rest = [0u8; 5];
        (&s).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"after");
        let untrusted = Rules {
            from: vec!["10.0.0.0/8".parse().unwrap()],
            ..rules
        };
        assert_eq!(
            read_blocking(&s, peer, &untrusted).unwrap(),
            Err(Refused::Untrusted(peer.ip()))
        );
    }
}
