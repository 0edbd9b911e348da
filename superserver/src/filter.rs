//! `allow`/`deny` in the kernel for wait mode: a classic BPF socket filter, built from the
//! access rules, on each listening socket handed to a service.
//!
//! The filter runs on every packet that reaches the socket, with the packet data at the
//! transport header; the program reads the IP header through the `SKF_NET_OFF` window. It
//! decides exactly as [`AccessRules::permits`] does: the most specific matching prefix wins,
//! deny wins a tie, and a peer that matches nothing is allowed when `allow` is empty and
//! dropped otherwise; an IPv4-mapped IPv6 source (`::ffff:a.b.c.d`) is matched as IPv4.
//!
//! What a denied peer sees differs from nowait mode: there the superserver accepts and closes
//! (the client sees a connection that opens and ends at once), here its TCP SYN is dropped
//! before a connection exists, so the client retransmits and finally sees a connect timeout,
//! never a reset; a denied UDP datagram is simply never received. Accepted connections inherit
//! the filter from the listener, which lets all their packets through (a few instructions per
//! packet).

use std::io;
use std::os::fd::RawFd;

use ipnet::IpNet;
use superserver_config::AccessRules;

/// The verdict that keeps the whole packet.
const ACCEPT: u32 = u32::MAX;
/// The verdict that drops the packet.
const DROP: u32 = 0;

/// Put the filter for `rules` on the socket `fd`, replacing any filter it had; with no rules,
/// remove any filter instead. A socket that is neither `AF_INET` nor `AF_INET6` is left
/// alone (`Ok`): access rules apply to IP peers only, as in nowait mode.
///
/// `Err` when the rules need more instructions than the kernel accepts (`BPF_MAXINSNS`,
/// `InvalidInput`, with the counts in the message) or a system call failed (`EPERM` if a
/// locked filter is already attached: see [`lock`]). The filter is not locked.
pub fn attach(fd: RawFd, rules: &AccessRules) -> io::Result<()> {
    let domain = sockopt_int(fd, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Ok(());
    }
    if rules.is_empty() {
        let none = 0 as libc::c_int;
        // SAFETY: setsockopt(2) with a valid int; SO_DETACH_FILTER ignores the value.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DETACH_FILTER,
                (&raw const none).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let err = io::Error::last_os_error();
        return match r {
            0 => Ok(()),
            _ if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            _ => Err(err),
        };
    }
    let mut prog = program(rules);
    let max = libc::BPF_MAXINSNS as usize;
    if prog.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} allow/deny rules need {} socket filter instructions; the kernel takes at \
                 most {max} (merge prefixes or use nowait mode)",
                rules.allow.len() + rules.deny.len(),
                prog.len()
            ),
        ));
    }
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, alive across the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lock the socket's filter (`SO_LOCK_FILTER`) so the service cannot replace or remove it.
/// Irreversible for the life of the socket, and inherited by accepted connections: after it,
/// neither the service nor the superserver can change the filter (a reload that changes the
/// rules must then bind a new socket), and a service that attaches filters of its own gets
/// `EPERM`. Not used by default.
#[cfg(test)]
pub fn lock(fd: RawFd) -> io::Result<()> {
    let one = 1 as libc::c_int;
    // SAFETY: setsockopt(2) with a valid int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LOCK_FILTER,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `v`.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Offsets of the IP header fields, in the `SKF_NET_OFF` window.
fn net(offset: u32) -> u32 {
    (libc::SKF_NET_OFF as u32).wrapping_add(offset)
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const LD_W: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const LD_B: u32 = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
const RSH: u32 = libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K;
const AND: u32 = libc::BPF_ALU | libc::BPF_AND | libc::BPF_K;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JA: u32 = libc::BPF_JMP | libc::BPF_JA;
const RET: u32 = libc::BPF_RET | libc::BPF_K;
const TAX: u32 = libc::BPF_MISC | libc::BPF_TAX;
const TXA: u32 = libc::BPF_MISC | libc::BPF_TXA;

/// The rules of one family as (network words, prefix length, verdict), most specific first,
/// deny before allow on a tie, without duplicates: the first match decides.
fn ordered(rules: &AccessRules, v6: bool) -> Vec<(Vec<u32>, u8, u32)> {
    let mut list: Vec<(u8, bool, IpNet)> = Vec::new();
    for (nets, deny) in [(&rules.deny, true), (&rules.allow, false)] {
        for net in nets.iter().filter(|n| matches!(n, IpNet::V6(_)) == v6) {
            list.push((net.prefix_len(), deny, net.trunc()));
        }
    }
    // Longest prefix first; deny (true) before allow (false).
    list.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    list.dedup_by(|a, b| a.0 == b.0 && a.2 == b.2);
    list.into_iter()
        .map(|(len, deny, net)| {
            let words = match net {
                IpNet::V4(n) => vec![u32::from(n.network())],
                IpNet::V6(n) => {
                    let b = n.network().octets();
                    b.chunks(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
            };
            (words, len, if deny { DROP } else { ACCEPT })
        })
        .collect()
}

/// The mask of word `i` (32 bits each) for a prefix of `len` bits.
fn word_mask(len: u8, i: usize) -> u32 {
    let bits = (u32::from(len)).saturating_sub(32 * i as u32).min(32);
    if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    }
}

/// The classic BPF program that enforces `rules` on packets of either IP version.
///
/// Layout: dispatch on the version nibble; the IPv6 part (a v4-mapped source jumps to the
/// IPv4 rules), then the IPv4 part. Each rule compares masked words and returns its verdict
/// on a match; each family ends with the default verdict. Conditional jumps only skip within
/// one rule (their offsets are 8 bits); the long jumps use `ja`, whose offset is 32 bits.
pub fn program(rules: &AccessRules) -> Vec<libc::sock_filter> {
    let default = if rules.allow.is_empty() { ACCEPT } else { DROP };
    let mut v6 = Vec::new();
    // The IPv6 source is at net+8..24; ::ffff:0:0/96 goes to the IPv4 rules with A = net+20.
    for (i, want) in [0u32, 0, 0xffff].into_iter().enumerate() {
        v6.push(stmt(LD_W, net(8 + 4 * i as u32)));
        // On mismatch skip the rest of this check: the remaining loads and jeqs, then
        // the final load and ja (2 instructions).
        let rest = (2 - i as u8) * 2 + 2;
        v6.push(jump(JEQ, want, 0, rest));
    }
    v6.push(stmt(LD_W, net(20)));
    let ja_to_v4 = v6.len();
    v6.push(stmt(JA, 0)); // fixed up below
    for (words, len, verdict) in ordered(rules, true) {
        let mut rule = Vec::new();
        let checks: Vec<(usize, u32)> = (0..4)
            .map(|i| (i, word_mask(len, i)))
            .filter(|&(_, m)| m != 0)
            .collect();
        for (i, mask) in &checks {
            rule.push(stmt(LD_W, net(8 + 4 * *i as u32)));
            if *mask != u32::MAX {
                rule.push(stmt(AND, *mask));
            }
            rule.push(jump(JEQ, words[*i] & mask, 0, 0)); // jf fixed below
        }
        rule.push(stmt(RET, verdict));
        // Each jeq's jf skips to just after this rule's ret.
        let end = rule.len();
        for (at, ins) in rule.iter_mut().enumerate() {
            if ins.code == JEQ as u16 {
                ins.jf = (end - at - 1) as u8;
            }
        }
        let unconditional = checks.is_empty();
        v6.extend(rule);
        if unconditional {
            break;
        }
    }
    v6.push(stmt(RET, default));

    let mut v4 = vec![stmt(LD_W, net(12))];
    let v4_match = v4.len();
    v4.push(stmt(TAX, 0));
    for (words, len, verdict) in ordered(rules, false) {
        let mask = word_mask(len, 0);
        if mask == 0 {
            v4.push(stmt(RET, verdict));
            break;
        }
        v4.push(stmt(TXA, 0));
        if mask != u32::MAX {
            v4.push(stmt(AND, mask));
        }
        v4.push(jump(JEQ, words[0] & mask, 0, 1));
        v4.push(stmt(RET, verdict));
    }
    v4.push(stmt(RET, default));

    // Dispatch: version 6 falls through to the IPv6 part; otherwise ja to the version-4
    // check placed after it; neither version: not ours to judge.
    let mut prog = vec![
        stmt(LD_B, net(0)),
        stmt(RSH, 4),
        jump(JEQ, 6, 1, 0),
        stmt(JA, 0), // to v4_check, fixed below
    ];
    let v6_start = prog.len();
    prog.extend(v6);
    let v4_check = prog.len();
    prog.push(jump(JEQ, 4, 1, 0));
    prog.push(stmt(RET, ACCEPT));
    let v4_start = prog.len();
    prog.extend(v4);
    prog[3].k = (v4_check - 4) as u32;
    let ja = v6_start + ja_to_v4;
    prog[ja].k = (v4_start + v4_match - ja - 1) as u32;
    prog
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use socket2::{Domain, SockAddr, Socket, Type};

    /// A classic BPF interpreter for the instructions `program` emits, over a packet whose
    /// network header is `ip` (the transport header, where the real filter starts, is not
    /// read). Like the kernel, an out-of-range load ends the program with 0 (drop).
    fn run(prog: &[libc::sock_filter], ip: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |k: u32, size: usize| -> Option<u32> {
            let off = k.wrapping_sub(libc::SKF_NET_OFF as u32) as usize;
            let bytes = ip.get(off..off + size)?;
            Some(bytes.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
        };
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= prog.len(), "classic BPF only jumps forward");
            let ins = prog[pc];
            let code = u32::from(ins.code);
            pc += 1;
            match code {
                LD_W => match load(ins.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B => match load(ins.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                RSH => a >>= ins.k,
                AND => a &= ins.k,
                TAX => x = a,
                TXA => a = x,
                JA => pc += ins.k as usize,
                JEQ => pc += usize::from(if a == ins.k { ins.jt } else { ins.jf }),
                RET => return ins.k,
                _ => panic!("unexpected opcode {code:#x}"),
            }
        }
    }

    /// An IP header carrying `src` (an IPv4 header for IPv4, else IPv6).
    fn header(src: IpAddr) -> Vec<u8> {
        match src {
            IpAddr::V4(a) => {
                let mut h = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
                h.extend(a.octets());
                h.extend([127, 0, 0, 1]);
                h
            }
            IpAddr::V6(a) => {
                let mut h = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
                h.extend(a.octets());
                h.extend(Ipv6Addr::LOCALHOST.octets());
                h
            }
        }
    }

    fn verdict(rules: &AccessRules, src: IpAddr) -> bool {
        let prog = program(rules);
        run(&prog, &header(src)) != 0
    }

    fn rules(allow: &[&str], deny: &[&str]) -> AccessRules {
        let p = |l: &[&str]| {
            l.iter()
                .map(|s| superserver_config::parse_net(s).unwrap())
                .collect()
        };
        AccessRules {
            allow: p(allow),
            deny: p(deny),
        }
    }

    #[test]
    fn the_documented_precedence() {
        let r = rules(&["10.0.0.0/8", "::1"], &["10.1.0.0/16", "10.1.2.3"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(verdict(&r, ip("10.9.9.9")));
        assert!(!verdict(&r, ip("10.1.9.9")), "a longer deny wins");
        assert!(!verdict(&r, ip("10.1.2.3")));
        assert!(!verdict(&r, ip("192.168.1.1")), "allow is not empty");
        assert!(verdict(&r, ip("::1")));
        assert!(!verdict(&r, ip("::2")));
        assert!(verdict(&r, ip("::ffff:10.9.9.9")), "v4-mapped is IPv4");
        assert!(!verdict(&r, ip("::ffff:10.1.9.9")));
        let tie = rules(&["10.0.0.0/8"], &["10.0.0.0/8"]);
        assert!(!verdict(&tie, ip("10.0.0.1")), "deny wins a tie");
        let deny_only = rules(&[], &["127.0.0.2"]);
        assert!(verdict(&deny_only, ip("127.0.0.1")));
        assert!(!verdict(&deny_only, ip("127.0.0.2")));
        assert!(verdict(&deny_only, ip("::1")));
        let everything = rules(&["127.0.0.1"], &["0.0.0.0/0", "::/0"]);
        assert!(verdict(&everything, ip("127.0.0.1")));
        assert!(!verdict(&everything, ip("127.0.0.2")));
        assert!(!verdict(&everything, ip("fe80::1")));
        assert!(!verdict(&everything, ip("::ffff:127.0.0.2")));
        assert!(
            verdict(&everything, ip("::ffff:127.0.0.1")),
            "::/0 is not for v4-mapped"
        );
    }

    /// A small xorshift generator: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Addresses from a small pool (so rules and peers overlap) with random low bits.
    fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
        if v6 {
            let base: [u128; 3] = [0xfd00 << 112, 1, 0xffff_0000_0000 | 0x0a00_0000];
            let b = base[rng.below(3) as usize];
            let noise = u128::from(rng.next()) >> rng.below(64);
            let high = if rng.below(4) == 0 {
                u128::from(rng.next()) << 64
            } else {
                0
            };
            IpAddr::V6(Ipv6Addr::from(b ^ noise ^ high))
        } else {
            let base: [u32; 3] = [0x0a00_0000, 0x7f00_0000, 0xc0a8_0000];
            let b = base[rng.below(3) as usize];
            IpAddr::V4(Ipv4Addr::from(b ^ ((rng.next() as u32) >> rng.below(32))))
        }
    }

    fn random_net(rng: &mut Rng) -> IpNet {
        let v6 = rng.below(2) == 0;
        let addr = random_addr(rng, v6);
        let max = if v6 { 129 } else { 33 };
        // Favour long prefixes, sometimes short ones, now and then /0.
        let len = (max - 1 - rng.below(max).min(rng.below(max))) as u8;
        IpNet::new(addr, len).unwrap().trunc()
    }

    #[test]
    fn the_program_agrees_with_the_nowait_check_on_random_rules_and_peers() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut checked, mut admitted) = (0, 0);
        for _ in 0..300 {
            let r = AccessRules {
                allow: (0..rng.below(6)).map(|_| random_net(&mut rng)).collect(),
                deny: (0..rng.below(6)).map(|_| random_net(&mut rng)).collect(),
            };
            let prog = program(&r);
            let mut peers: Vec<IpAddr> = (0..40)
                .map(|_| {
                    let v6 = rng.below(2) == 0;
                    random_addr(&mut rng, v6)
                })
                .collect();
            // Each rule's own network and its neighbours, and v4-mapped forms of v4 peers.
            for net in r.allow.iter().chain(&r.deny) {
                peers.push(net.network());
                peers.push(net.broadcast());
            }
            let mapped: Vec<IpAddr> = peers
                .iter()
                .filter_map(|p| match p {
                    IpAddr::V4(a) => Some(IpAddr::V6(a.to_ipv6_mapped())),
                    _ => None,
                })
                .collect();
            peers.extend(mapped);
            for peer in peers {
                let bpf = run(&prog, &header(peer)) != 0;
                assert_eq!(bpf, r.permits(peer), "peer {peer} rules {r:?}");
                checked += 1;
                admitted += usize::from(bpf);
            }
        }
        assert!(checked > 10_000, "{checked}");
        // Both verdicts are well represented.
        assert!(
            admitted > checked / 5 && admitted < checked * 4 / 5,
            "{admitted}/{checked}"
        );
    }

    #[test]
    fn too_many_rules_are_a_clear_error() {
        let deny: Vec<IpNet> = (0..500u128)
            .map(|i| {
                IpNet::new(
                    IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | (i << 8))),
                    120,
                )
                .unwrap()
            })
            .collect();
        let r = AccessRules {
            allow: vec![],
            deny,
        };
        assert!(program(&r).len() > libc::BPF_MAXINSNS as usize);
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let e = attach(s.as_raw_fd(), &r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("most 4096"), "{e}");
        // 1000 IPv4 rules fit (4 instructions each).
        let many = AccessRules {
            allow: (0..1000u32)
                .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32).unwrap())
                .collect(),
            deny: vec![],
        };
        attach(s.as_raw_fd(), &many).unwrap();
    }

    fn listener(ip: &str) -> Option<(Socket, SocketAddr)> {
        let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.bind(&SockAddr::from(addr)).ok()?;
        s.listen(16).unwrap();
        let local = s.local_addr().unwrap().as_socket().unwrap();
        Some((s, local))
    }

    /// Connect from `src` without blocking; true if the handshake completes within `wait`.
    fn connects(src: &str, to: SocketAddr, wait: Duration) -> bool {
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        s.bind(&SockAddr::from(SocketAddr::new(src.parse().unwrap(), 0)))
            .unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&SockAddr::from(to));
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
        n == 1 && s.take_error().unwrap().is_none()
    }

    const SHORT: Duration = Duration::from_millis(700);

    #[test]
    fn a_denied_tcp_source_never_completes_a_handshake() {
        let (l, addr) = listener("127.0.0.1").unwrap();
        attach(l.as_raw_fd(), &rules(&[], &["127.0.0.2"])).unwrap();
        assert!(!connects("127.0.0.2", addr, SHORT), "denied: a timeout");
        assert!(connects("127.0.0.1", addr, SHORT));
        l.set_nonblocking(true).unwrap();
        let (c, peer) = l.accept().unwrap();
        assert_eq!(peer.as_socket().unwrap().ip().to_string(), "127.0.0.1");
        assert!(l.accept().is_err(), "nothing from the denied source");
        // The accepted connection inherits the filter, and carries data both ways.
        let mut c: std::net::TcpStream = c.into();
        use std::io::Write;
        c.write_all(b"hi").unwrap();
        // Removing the rules removes the filter.
        attach(l.as_raw_fd(), &AccessRules::default()).unwrap();
        assert!(connects("127.0.0.2", addr, SHORT));
    }

    #[test]
    fn an_allow_list_admits_only_its_sources() {
        let (l, addr) = listener("127.0.0.1").unwrap();
        attach(l.as_raw_fd(), &rules(&["127.0.0.0/24"], &["127.0.0.3"])).unwrap();
        assert!(connects("127.0.0.2", addr, SHORT));
        assert!(!connects("127.0.0.3", addr, SHORT));
        assert!(!connects("127.0.1.1", addr, SHORT));
    }

    #[test]
    fn a_denied_udp_source_is_never_received() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        attach(rx.as_raw_fd(), &rules(&[], &["127.0.0.2"])).unwrap();
        rx.set_read_timeout(Some(SHORT)).unwrap();
        let to = rx.local_addr().unwrap();
        UdpSocket::bind("127.0.0.2:0")
            .unwrap()
            .send_to(b"denied", to)
            .unwrap();
        let ok = UdpSocket::bind("127.0.0.1:0").unwrap();
        ok.send_to(b"allowed", to).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"allowed"[..], ok.local_addr().unwrap())
        );
        assert!(
            rx.recv_from(&mut buf).is_err(),
            "the denied datagram never arrives"
        );
    }

    #[test]
    fn ipv6_on_loopback() {
        let Some((l, addr)) = listener("[::1]") else {
            eprintln!("no IPv6 loopback here; skipped");
            return;
        };
        attach(l.as_raw_fd(), &rules(&[], &["::1"])).unwrap();
        assert!(!connects("::1", addr, SHORT));
        attach(l.as_raw_fd(), &rules(&["::1"], &["::/0"])).unwrap();
        assert!(connects("::1", addr, SHORT));
        attach(l.as_raw_fd(), &rules(&["127.0.0.1"], &[])).unwrap();
        assert!(
            !connects("::1", addr, SHORT),
            "an IPv4 allow list denies IPv6 peers"
        );
    }

    #[test]
    fn a_unix_socket_is_left_alone() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        attach(a.as_raw_fd(), &rules(&["127.0.0.1"], &[])).unwrap();
        a.send(b"x").unwrap();
    }

    #[test]
    fn a_locked_filter_cannot_be_replaced_even_by_us() {
        let (l, addr) = listener("127.0.0.1").unwrap();
        attach(l.as_raw_fd(), &rules(&[], &["127.0.0.2"])).unwrap();
        lock(l.as_raw_fd()).unwrap();
        let e = attach(l.as_raw_fd(), &AccessRules::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = attach(l.as_raw_fd(), &rules(&[], &["127.0.0.3"])).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Listening and accepting still work; the accepted socket is locked too.
        assert!(connects("127.0.0.1", addr, SHORT));
        assert!(!connects("127.0.0.2", addr, SHORT));
        let (c, _) = l.accept().unwrap();
        let e = attach(c.as_raw_fd(), &rules(&[], &["127.0.0.9"])).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }
}
