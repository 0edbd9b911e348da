//! The PROXY protocol on nowait services, through the real binary: the child, the rules and
//! the limits see the client a trusted balancer names (v1 and v2, headers in pieces, long
//! TLVs); an untrusted balancer, a malformed header, a silent connection and a v2 LOCAL
//! health check cost no process; exact counters.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A child that reports what it was told about its client, then echoes what follows.
const WHO: &str = r#"exec = ["/bin/sh", "-c", "echo $REMOTE_ADDR $REMOTE_PORT $TCPREMOTEIP $TCPLOCALIP $TCPLOCALPORT $PROXY_ADDR; exec cat"]"#;

fn v1(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let fam = if src.contains(':') { "TCP6" } else { "TCP4" };
    format!("PROXY {fam} {src} {dst} {sport} {dport}\r\n").into_bytes()
}

/// A v2 PROXY header for IPv4 addresses, with `tlv_len` bytes of NOOP TLV.
fn v2(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, tlv_len: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&src);
    body.extend_from_slice(&dst);
    body.extend_from_slice(&sport.to_be_bytes());
    body.extend_from_slice(&dport.to_be_bytes());
    if tlv_len > 0 {
        body.push(0x04); // PP2_TYPE_NOOP
        body.extend_from_slice(&(tlv_len as u16).to_be_bytes());
        body.extend(std::iter::repeat_n(0u8, tlv_len));
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// Connect from `from`, send `header` (in `pieces` writes), then "data\n"; the child's report
/// line and the echo of "data".
fn through(from: &str, addr: SocketAddr, header: &[u8], pieces: usize) -> (String, String) {
    let mut s = connect_from(from, addr).unwrap();
    let step = header.len().div_ceil(pieces);
    for chunk in header.chunks(step) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    s.write_all(b"data\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (report, rest) = all.split_once('\n').unwrap_or((&all, ""));
    (report.to_string(), rest.to_string())
}

fn counters(server: &Server, name: &str) -> serde_json::Value {
    let status = status_json(&server.dir.path().join("ctl"));
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()["counters"]
        .clone()
}

/// v1 and v2 (`any`), whole and in pieces, a v2 header longer than the first peek: the child
/// sees the client, the address it reached and the balancer, and gets exactly the bytes that
/// followed the header.
#[test]
fn the_child_sees_the_client_the_balancer_named() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.who]\nmode = \"nowait\"\n{WHO}\nlisten = \"{addr}\"\nproxy_protocol = \"any\"\nproxy_from = [\"127.0.0.2\"]\n"
    );
    let server = Server::start(&config, vec![l]);
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        (
            v1("203.0.113.7", 40112, "192.0.2.1", 80),
            1,
            "203.0.113.7 40112 203.0.113.7 192.0.2.1 80 127.0.0.2",
        ),
        (
            v1("203.0.113.8", 1, "192.0.2.1", 80),
            7,
            "203.0.113.8 1 203.0.113.8 192.0.2.1 80 127.0.0.2",
        ),
        (
            v1("2001:db8::7", 443, "2001:db8::1", 8443),
            3,
            "2001:db8::7 443 2001:db8::7 2001:db8::1 8443 127.0.0.2",
        ),
        (
            v2([198, 51, 100, 9], 5555, [192, 0, 2, 1], 443, 0),
            1,
            "198.51.100.9 5555 198.51.100.9 192.0.2.1 443 127.0.0.2",
        ),
        (
            v2([198, 51, 100, 10], 5556, [192, 0, 2, 1], 443, 0),
            28,
            "198.51.100.10 5556 198.51.100.10 192.0.2.1 443 127.0.0.2",
        ),
        (
            v2([198, 51, 100, 11], 5557, [192, 0, 2, 2], 25, 2000),
            2,
            "198.51.100.11 5557 198.51.100.11 192.0.2.2 25 127.0.0.2",
        ),
    ];
    let n = cases.len() as u64;
    for (header, pieces, want) in cases {
        let (report, rest) = through("127.0.0.2", addr, &header, pieces);
        assert_eq!(report, want, "header {header:?} in {pieces} piece(s)");
        assert_eq!(
            rest, "data\n",
            "the bytes after the header reach the child, once"
        );
    }
    server.wait_log("198.51.100.11:5557 via 127.0.0.2:");
    wait_until("every child reaped", || {
        counters(&server, "who")["exits"]["ok"] == n
    });
    let c = counters(&server, "who");
    assert_eq!(
        (c["accepted"].as_u64(), c["spawned"].as_u64()),
        (Some(n), Some(n)),
        "{c}"
    );
}

/// allow/deny and max_per_source act on the client the header names, not on the balancer.
#[test]
fn rules_and_limits_see_the_client() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.who]\nmode = \"nowait\"\n{WHO}\nlisten = \"{addr}\"\nproxy_protocol = \"v1\"\nproxy_from = [\"127.0.0.0/8\"]\nallow = [\"203.0.113.0/24\"]\nmax_per_source = 1\n"
    );
    let server = Server::start(&config, vec![l]);
    // Denied: the client is outside allow (the balancer, 127.0.0.2, is not in it either,
    // and must not matter).
    let mut s = connect_from("127.0.0.2", addr).unwrap();
    s.write_all(&v1("198.51.100.7", 1000, "192.0.2.1", 80))
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty(), "a denied client gets nothing: {out:?}");
    server.wait_log("198.51.100.7:1000 via 127.0.0.2:");
    // Two clients of the same address through one balancer: the second is over its limit;
    // a third client through the same balancer is served.
    let mut first = connect_from("127.0.0.2", addr).unwrap();
    first
        .write_all(&v1("203.0.113.7", 1001, "192.0.2.1", 80))
        .unwrap();
    assert!(line_of(&first).unwrap().starts_with("203.0.113.7 1001"));
    let mut second = connect_from("127.0.0.2", addr).unwrap();
    second
        .write_all(&v1("203.0.113.7", 1002, "192.0.2.1", 80))
        .unwrap();
    let mut out = Vec::new();
    let _ = second.read_to_end(&mut out);
    assert!(out.is_empty(), "over max_per_source: {out:?}");
    let (report, _) = through(
        "127.0.0.3",
        addr,
        &v1("203.0.113.8", 1003, "192.0.2.1", 80),
        1,
    );
    assert!(report.starts_with("203.0.113.8 1003"), "{report}");
    drop(first);
    wait_until("the children reaped", || {
        counters(&server, "who")["exits"]["ok"] == 2
    });
    let c = counters(&server, "who");
    assert_eq!(c["refused"]["deny"], 1, "{c}");
    assert_eq!(c["refused"]["per_source"], 1, "{c}");
    assert_eq!(c["spawned"], 2, "{c}");
}

/// An untrusted balancer, a malformed header, a wrong version, a connection that sends
/// nothing and a v2 LOCAL health check: each closed, none costs a process; the counters say
/// which, exactly; a service without the PROXY protocol beside it keeps answering while
/// silent connections wait out their timeout.
#[test]
fn refusals_cost_no_process() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let (l2, plain) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.who]\nmode = \"nowait\"\n{WHO}\nlisten = \"{addr}\"\nproxy_protocol = \"v2\"\nproxy_from = [\"127.0.0.2\"]\nproxy_timeout = \"700ms\"\n\n[service.plain]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"plain\"]\nlisten = \"{plain}\"\n"
    );
    let server = Server::start(&config, vec![l, l2]);
    let closed = |mut s: TcpStream, bytes: &[u8]| {
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "{out:?}");
    };
    let good = v2([203, 0, 113, 7], 1, [192, 0, 2, 1], 80, 0);
    closed(connect_from("127.0.0.9", addr).unwrap(), &good); // untrusted
    server.wait_log("127.0.0.9 is not in proxy_from");
    std::thread::sleep(Duration::from_millis(1100)); // one refusal line a second
    closed(
        connect_from("127.0.0.2", addr).unwrap(),
        b"GET / HTTP/1.0\r\n\r\n",
    );
    server.wait_log("not a PROXY v2 header");
    closed(
        connect_from("127.0.0.2", addr).unwrap(),
        &v1("203.0.113.7", 1, "192.0.2.1", 80),
    ); // v1 where only v2 is accepted
    closed(connect_from("127.0.0.2", addr).unwrap(), V2_LOCAL);
    // Silent connections: held until the timeout, while the plain service answers at once.
    let silent: Vec<TcpStream> = (0..5)
        .map(|_| connect_from("127.0.0.2", addr).unwrap())
        .collect();
    let t = Instant::now();
    assert_eq!(echo(plain, "").unwrap(), "plain");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    for s in silent {
        let t = Instant::now();
        closed(s, b"");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "closed at the timeout"
        );
    }
    let c = counters(&server, "who");
    assert_eq!(c["accepted"], 9, "{c}");
    assert_eq!(c["refused"]["proxy"], 8, "{c}");
    assert_eq!(c["proxy_local"], 1, "{c}");
    assert_eq!(c["spawned"], 0, "{c}");
    let metrics_like = status_json(&server.dir.path().join("ctl"));
    assert_eq!(metrics_like["version"], 1);
}

/// Silent connections count against max_instances (they will become processes): a balancer
/// cannot make the superserver hold more descriptors than the service's cap.
#[test]
fn waiting_headers_count_against_max_instances() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.who]\nmode = \"nowait\"\n{WHO}\nlisten = \"{addr}\"\nproxy_protocol = \"v1\"\nproxy_from = [\"127.0.0.2\"]\nproxy_timeout = \"30s\"\nmax_instances = 3\n"
    );
    let server = Server::start(&config, vec![l]);
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| connect_from("127.0.0.2", addr).unwrap())
        .collect();
    wait_until("the service holds", || {
        let status = status_json(&server.dir.path().join("ctl"));
        status["services"][0]["state"] == "held"
    });
    // The fourth waits in the backlog; it is served once a silent one gives up.
    let mut fourth = connect_from("127.0.0.2", addr).unwrap();
    fourth
        .write_all(&v1("203.0.113.7", 7, "192.0.2.1", 80))
        .unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(fourth.read(&mut buf).is_err(), "held in the backlog");
    drop(silent);
    fourth.set_read_timeout(Some(WAIT)).unwrap();
    let line = line_of(&fourth).unwrap();
    assert!(line.starts_with("203.0.113.7 7"), "{line}");
}

/// One agent-check exchange: send `request` (nothing at all for ""), read the one line.
fn agent(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// HAProxy's agent-check: `up ready maxconn:N` (N less the processes of clients that came
/// directly, never those of the balancer's own connections), `drain` after `superserver
/// drain` (for one service, or all), `up` again after `undrain`, `down#…` while a service
/// backs off or for a name it does not know; the drain survives an in-place upgrade.
#[test]
fn the_agent_tells_the_balancer_what_each_service_can_take() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let (w, wait_addr) = tcp_listener("127.0.0.1");
    let agent_addr: SocketAddr = format!("127.0.0.1:{}", probe_port("127.0.0.1"))
        .parse()
        .unwrap();
    let config = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\nagent = \"{agent_addr}\"\nrestart_backoff_min = \"2s\"\n\n\
         [service.web]\nmode = \"nowait\"\nexec = [\"/bin/sh\", \"-c\", \"read x; echo $x\"]\nlisten = \"{addr}\"\nmax_instances = 5\nproxy_protocol = \"v1\"\nproxy_from = [\"127.0.0.2\"]\n\n\
         [service.broken]\nexec = [\"/bin/false\"]\nlisten = \"{wait_addr}\"\n"
    );
    let server = Server::start(&config, vec![l, w]);
    let control = server.dir.path().join("ctl");
    assert_eq!(agent(agent_addr, "web\n"), "up ready maxconn:5\n");
    assert_eq!(agent(agent_addr, ""), "up ready\n", "no name: the host");
    assert_eq!(agent(agent_addr, "nope\n"), "down#no service nope\n");
    // Two clients through the balancer hold processes: maxconn stays 5 (HAProxy counts
    // those itself).
    let held: Vec<TcpStream> = (0..2)
        .map(|k| {
            let mut s = connect_from("127.0.0.2", addr).unwrap();
            s.write_all(&v1("203.0.113.7", 1000 + k, "192.0.2.1", 80))
                .unwrap();
            s
        })
        .collect();
    wait_until("two processes", || {
        status_json(&control)["services"][0]["live"] == 2
    });
    assert_eq!(agent(agent_addr, "web\n"), "up ready maxconn:5\n");
    // The wait-mode service that keeps failing backs off: down, with the reason.
    let _ = TcpStream::connect(wait_addr);
    server.wait_log_all(&["broken: pid", "back-off: next start"]);
    assert!(
        agent(agent_addr, "broken\n").starts_with("down#backing off"),
        "backing off"
    );
    // Drained: HAProxy hears drain; the sessions that are open go on.
    let out = success_stdout(ctl(&["drain", "web"], &control));
    assert!(out.contains("draining: web"), "{out}");
    assert_eq!(agent(agent_addr, "web\n"), "drain\n");
    for mut s in held {
        s.write_all(b"still served\n").unwrap();
        assert_eq!(line_of(&s).unwrap(), "still served\n");
    }
    let table = success_stdout(ctl(&["status"], &control));
    assert!(table.contains("(drained)"), "{table}");
    // An upgrade keeps the drain.
    let new = server.dir.path().join("superserver-new");
    std::fs::copy(superserver_bin(), &new).unwrap();
    success_stdout(ctl(
        &["upgrade", "--binary", new.to_str().unwrap()],
        &control,
    ));
    assert_eq!(agent(agent_addr, "web\n"), "drain\n");
    success_stdout(ctl(&["undrain", "web"], &control));
    assert_eq!(agent(agent_addr, "web\n"), "up ready maxconn:5\n");
    // The whole host.
    success_stdout(ctl(&["drain"], &control));
    assert_eq!(agent(agent_addr, ""), "drain\n");
    assert_eq!(agent(agent_addr, "web\n"), "drain\n");
    success_stdout(ctl(&["undrain"], &control));
    assert_eq!(agent(agent_addr, "web\n"), "up ready maxconn:5\n");
    let out = ctl(&["drain", "nope"], &control);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// A wait-mode service reads the header itself: small-services --proxy-protocol under the
/// superserver serves the balancer's clients, refuses an untrusted peer and a garbage header
/// without serving them, and its log names the client.
#[test]
fn a_wait_service_reads_the_header_through_the_library() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.echo]\nexec = [\"{{SMALL}}\", \"--protocol\", \"echo\", \"--proxy-protocol\", \"any\", \"--proxy-from\", \"127.0.0.2\", \"--proxy-timeout\", \"500ms\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&config, vec![l]);
    let mut s = connect_from("127.0.0.2", addr).unwrap();
    s.write_all(&v2([203, 0, 113, 7], 4242, [192, 0, 2, 1], 7, 0))
        .unwrap();
    s.write_all(b"through the balancer\n").unwrap();
    assert_eq!(line_of(&s).unwrap(), "through the balancer\n");
    drop(s);
    server.wait_log("peer 203.0.113.7:4242 via 127.0.0.2:");
    // Untrusted, garbage, silent: nothing echoed.
    for (from, bytes) in [
        (
            "127.0.0.3",
            &b"PROXY TCP4 203.0.113.7 192.0.2.1 1 7\r\nhi\n"[..],
        ),
        ("127.0.0.2", &b"hi\n"[..]),
        ("127.0.0.2", &b""[..]),
    ] {
        let mut s = connect_from(from, addr).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "{from} {bytes:?}: {out:?}");
    }
    server.wait_log_all(&["127.0.0.3", "not in --proxy-from"]);
    server.wait_log("no complete PROXY header");
}

/// A connection whose header is half-sent when the superserver upgrades in place is carried
/// across the exec: the rest arrives at the new image and the client is served.
#[test]
fn a_header_in_flight_survives_an_upgrade() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\n\
         [service.who]\nmode = \"nowait\"\n{WHO}\nlisten = \"{addr}\"\nproxy_protocol = \"v2\"\nproxy_from = [\"127.0.0.2\"]\nproxy_timeout = \"20s\"\n"
    );
    let server = Server::start(&config, vec![l]);
    let control = server.dir.path().join("ctl");
    let header = v2([203, 0, 113, 7], 4242, [192, 0, 2, 1], 80, 0);
    let mut s = connect_from("127.0.0.2", addr).unwrap();
    s.write_all(&header[..10]).unwrap();
    wait_until("the header is waited for", || {
        status_json(&control)["services"][0]["counters"]["accepted"] == 1
    });
    let new = server.dir.path().join("superserver-new");
    std::fs::copy(superserver_bin(), &new).unwrap();
    success_stdout(ctl(
        &["upgrade", "--binary", new.to_str().unwrap()],
        &control,
    ));
    s.write_all(&header[10..]).unwrap();
    s.write_all(b"after the upgrade\n").unwrap();
    assert_eq!(
        line_of(&s).unwrap(),
        "203.0.113.7 4242 203.0.113.7 192.0.2.1 80 127.0.0.2\n"
    );
}
