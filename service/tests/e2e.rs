//! End-to-end tests: the real `small-services` binary, real sockets, real launchers.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use small_services::protocols::{self, BUILTIN_QUOTES};
use util::*;

fn daytime_ok(reply: &[u8]) {
    let text = String::from_utf8(reply.to_vec()).unwrap();
    let now = SystemTime::now();
    let ok = (-3i64..=1).any(|d| {
        let t = if d < 0 {
            now - Duration::from_secs((-d) as u64)
        } else {
            now + Duration::from_secs(d as u64)
        };
        protocols::daytime_reply(t) == text
    });
    assert!(ok, "daytime reply {text:?} is not now");
    assert!(text.ends_with("-UTC\r\n"), "{text:?}");
}

fn time_ok(reply: &[u8]) {
    assert_eq!(reply.len(), 4, "time reply {reply:?}");
    let secs = u32::from_be_bytes(reply.try_into().unwrap()) as i64;
    assert!(
        (secs - now_1900()).abs() <= 2,
        "time {secs} vs clock {}",
        now_1900()
    );
}

fn chargen_ok(reply: &[u8]) {
    let mut expect = vec![0; reply.len()];
    protocols::chargen_fill(0, &mut expect);
    assert_eq!(reply, &expect[..]);
    assert_eq!(
        &reply[..74],
        b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"
    );
}

#[test]
fn every_protocol_over_tcp_with_named_fds() {
    let ls: Vec<_> = (0..6).map(|_| tcp_listener()).collect();
    let mut launch = Launch::service().names("echo:discard:chargen:daytime:time:qotd");
    for l in &ls {
        launch = launch.fd(l);
    }
    let _child = launch.spawn();
    let addr = |i: usize| ls[i].local_addr().unwrap();

    assert_eq!(request(addr(0), b"hello\r\nworld"), b"hello\r\nworld");
    assert_eq!(request(addr(1), b"thrown away"), b"");
    let mut c = connect(addr(2));
    let mut buf = vec![0; 3000];
    c.read_exact(&mut buf).unwrap();
    chargen_ok(&buf);
    drop(c);
    daytime_ok(&request(addr(3), b""));
    time_ok(&request(addr(4), b""));
    let q = request(addr(5), b"");
    assert!(
        q.len() < 512 && BUILTIN_QUOTES.iter().any(|b| b.as_bytes() == q),
        "{q:?}"
    );
}

#[test]
fn every_protocol_over_udp() {
    let names = ["echo", "discard", "chargen", "daytime", "time", "qotd"];
    let socks: Vec<_> = names
        .iter()
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut launch = Launch::service().names(&names.join(":"));
    for s in &socks {
        launch = launch.fd(s);
    }
    let child = launch.spawn();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let ask = |i: usize, data: &[u8]| -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 2048];
        loop {
            client
                .send_to(data, socks[i].local_addr().unwrap())
                .unwrap();
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                return buf[..n].to_vec();
            }
            assert!(
                Instant::now() < deadline,
                "no reply from {}; stderr:\n{}",
                names[i],
                child.stderr()
            );
        }
    };
    assert_eq!(ask(0, b"ping"), b"ping");
    let block = ask(2, b"");
    assert!(!block.is_empty() && block.len() < 512 && block.ends_with(b"\r\n"));
    daytime_ok(&ask(3, b""));
    time_ok(&ask(4, b""));
    assert!(ask(5, b"").len() < 512);
    // discard answers nothing: the next echo still works and only the echo comes back.
    client
        .send_to(b"x", socks[1].local_addr().unwrap())
        .unwrap();
    assert_eq!(ask(0, b"after"), b"after");
}

/// One datagram from one of our own echo sockets to another used to start an endless
/// echo-to-echo ping-pong (100% CPU, never idle). Now it is dropped, and the idle exit comes.
#[test]
fn udp_datagram_from_our_own_socket_does_not_loop() {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut child = Launch::service()
        .fd(&a)
        .fd(&b)
        .names("echo:echo")
        .args(["--idle-timeout", "500ms"])
        .spawn();
    child.wait_line("idle exit: 500ms", DEADLINE);
    // What a spoofed datagram does: source is our own echo socket `b` (the test holds a copy).
    b.send_to(b"loop?", a.local_addr().unwrap()).unwrap();
    child.assert_exit(0, DEADLINE);
    let stderr = child.stderr();
    assert!(stderr.contains("idle for"), "{stderr}");
    assert!(stderr.contains("dropped datagram from"), "{stderr}");
}

/// A datagram from another small service's port (chargen at 7019 here) is not answered: two
/// small services, on one host or two, would otherwise answer each other forever.
#[test]
fn udp_datagram_from_a_small_service_port_is_not_answered() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _child = Launch::service().fd(&echo).names("echo").spawn();
    // A loopback address of our own for the source, so no other test's port 7019 is in the way.
    let spoof = (1..=250u8)
        .find_map(|i| UdpSocket::bind(("127.19.7.".to_owned() + &i.to_string(), 7019)).ok())
        .expect("a free 127.19.7.x:7019");
    spoof
        .send_to(b"chargen says hi", echo.local_addr().unwrap())
        .unwrap();
    // A real client after it: datagrams are served in order, so once its echo is back any
    // answer to the first one would already be queued at `spoof`.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.send_to(b"real", echo.local_addr().unwrap()).unwrap();
    let mut buf = [0; 64];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"real");
    spoof.set_nonblocking(true).unwrap();
    let answered = spoof.recv(&mut buf);
    assert!(
        answered.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the datagram from port 7019 was answered"
    );
}

#[test]
fn pipe_at_fd3_is_rejected_with_fd_and_name() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let mut child = Launch::service().fd(&r).names("echo").spawn();
    child.assert_exit(3, DEADLINE);
    let err = child.wait_line("error:", DEADLINE);
    assert!(
        err.contains("fd 3") && err.contains("\"echo\"") && err.contains("not a socket"),
        "{err}"
    );
}

#[test]
fn unix_datagram_and_unconnected_sockets_are_rejected() {
    let (d, _e) = UnixDatagram::pair().unwrap();
    let l = tcp_listener();
    let mut child = Launch::service()
        .fd(&l)
        .fd(&d)
        .names("echo:daytime")
        .spawn();
    child.assert_exit(3, DEADLINE);
    let err = child.wait_line("error:", DEADLINE);
    assert!(
        err.contains("fd 4") && err.contains("\"daytime\"") && err.contains("unix datagram"),
        "{err}"
    );

    let fresh = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let mut child = Launch::service().fd(&fresh).names("echo").spawn();
    child.assert_exit(3, DEADLINE);
    assert!(child.stderr().contains("fd 3"), "{}", child.stderr());
}

#[test]
fn closed_fd3_is_rejected() {
    let mut child = Launch::service()
        .pid(Pid::Own)
        .listen_fds("1")
        .close_fd3()
        .names("echo")
        .spawn();
    child.assert_exit(3, DEADLINE);
    let err = child.wait_line("error:", DEADLINE);
    assert!(err.contains("fd 3") && err.contains("not open"), "{err}");
}

#[test]
fn name_that_is_no_protocol_needs_protocol_flag() {
    let l = tcp_listener();
    let mut child = Launch::service().fd(&l).names("web").spawn();
    child.assert_exit(3, DEADLINE);
    let err = child.wait_line("error:", DEADLINE);
    assert!(
        err.contains("fd 3") && err.contains("\"web\"") && err.contains("--protocol"),
        "{err}"
    );

    let _child = Launch::service()
        .fd(&l)
        .names("web")
        .args(["--protocol", "echo"])
        .spawn();
    assert_eq!(request(l.local_addr().unwrap(), b"ok"), b"ok");
}

#[test]
fn bad_listen_fds_value_is_rejected() {
    let mut child = Launch::service().pid(Pid::Own).listen_fds("two").spawn();
    child.assert_exit(3, DEADLINE);
    assert!(child.stderr().contains("LISTEN_FDS"), "{}", child.stderr());
}

/// `LISTEN_FDS=2147483647` used to allocate until the OOM killer came: now refused at once,
/// naming the variable, before anything proportional to the count is allocated.
#[test]
fn absurd_listen_fds_is_refused_at_once() {
    for pid in [Pid::Own, Pid::Unset] {
        let t0 = Instant::now();
        let mut child = Launch::service().pid(pid).listen_fds("2147483647").spawn();
        child.assert_exit(3, DEADLINE);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        let stderr = child.stderr();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("error: inherited sockets: LISTEN_FDS=2147483647")
                && stderr.contains("RLIMIT_NOFILE"),
            "{stderr}"
        );
    }
}

/// The default idle exit needs a launcher that starts us again: `LISTEN_PID` naming us
/// (systemd, the superserver). Without it (systemfd --no-pid) the default is never; an
/// explicit --idle-timeout wins.
#[test]
fn idle_default_depends_on_listen_pid() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let child = Launch::service()
        .fd(&l)
        .pid(Pid::Unset)
        .names("echo")
        .spawn();
    let line = child.wait_line("idle exit:", DEADLINE);
    assert!(
        line.contains("idle exit: never (default: LISTEN_PID not set"),
        "{line}"
    );
    assert_eq!(request(addr, b"no pid"), b"no pid");
    drop(child);

    let child = Launch::service().fd(&l).names("echo").spawn();
    let line = child.wait_line("idle exit:", DEADLINE);
    assert!(
        line.contains("idle exit: 8s (default: LISTEN_PID is ours"),
        "{line}"
    );
    drop(child);

    let child = Launch::service()
        .fd(&l)
        .pid(Pid::Unset)
        .names("echo")
        .args(["--idle-timeout", "3s"])
        .spawn();
    let line = child.wait_line("idle exit:", DEADLINE);
    assert!(line.contains("idle exit: 3s (--idle-timeout)"), "{line}");
}

#[test]
fn listen_pid_of_another_process_is_ignored() {
    let l = tcp_listener();
    // Not for us and nothing else to serve: usage error.
    let mut child = Launch::service()
        .fd(&l)
        .names("echo")
        .pid(Pid::Value("1".into()))
        .spawn();
    child.assert_exit(2, DEADLINE);
    assert!(
        child.stderr().contains("nothing to serve"),
        "{}",
        child.stderr()
    );
    // With --listen it binds its own socket instead.
    let child = Launch::service()
        .fd(&l)
        .names("echo")
        .pid(Pid::Value("1".into()))
        .args(["--listen", "echo=tcp://127.0.0.1:0"])
        .spawn();
    let addr = child.listening_addr("echo");
    assert_ne!(addr, l.local_addr().unwrap());
    assert_eq!(request(addr, b"bound"), b"bound");
}

#[test]
fn missing_listen_pid_is_accepted() {
    let l = tcp_listener();
    let _child = Launch::service()
        .fd(&l)
        .pid(Pid::Unset)
        .names("time")
        .spawn();
    time_ok(&request(l.local_addr().unwrap(), b""));
}

#[test]
fn binds_itself_from_flags_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qotd.sock");
    let child = Launch::service()
        .args([
            "--listen",
            "echo=tcp://127.0.0.1:0",
            "--listen",
            "daytime=udp://127.0.0.1:0",
        ])
        .args(["--listen", &format!("qotd=unix:{}", sock.display())])
        .spawn();
    assert_eq!(request(child.listening_addr("echo"), b"e"), b"e");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(DEADLINE)).unwrap();
    udp.send_to(b"", child.listening_addr("daytime")).unwrap();
    let mut buf = [0; 100];
    let n = udp.recv(&mut buf).unwrap();
    daytime_ok(&buf[..n]);
    child.wait_line("listening: qotd", DEADLINE);
    let mut u = UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    assert!(!read_to_eof(&mut u).is_empty());
    drop(child);

    let child = Launch::service()
        .env(
            "SMALL_SERVICES_LISTEN",
            "time=127.0.0.1:0, echo=tcp://[::1]:0",
        )
        .spawn();
    time_ok(&request(child.listening_addr("time"), b""));
    child.wait_line("listening: echo", DEADLINE);
}

/// A UDP socket we bind has no SO_REUSEADDR, so nobody can co-bind it (with SO_REUSEADDR of
/// their own) and take part of its datagrams. TCP keeps it (TIME_WAIT), which is harmless there:
/// a listening TCP port cannot be co-bound that way.
#[test]
fn udp_sockets_we_bind_cannot_be_co_bound() {
    use socket2::{Domain, Socket, Type};
    let child = Launch::service()
        .args([
            "--listen",
            "echo=udp://127.0.0.1:0",
            "--listen",
            "discard=tcp://127.0.0.1:0",
        ])
        .spawn();
    for (name, ty) in [("echo", Type::DGRAM), ("discard", Type::STREAM)] {
        let addr = child.listening_addr(name);
        let thief = Socket::new(Domain::IPV4, ty, None).unwrap();
        thief.set_reuse_address(true).unwrap();
        let err = thief
            .bind(&addr.into())
            .expect_err("a second socket with SO_REUSEADDR co-bound our port");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{name}: {err}");
    }
}

#[test]
fn bad_address_is_usage_error_and_busy_port_cannot_bind() {
    let mut child = Launch::service()
        .args(["--listen", "echo=localhost:7"])
        .spawn();
    child.assert_exit(2, DEADLINE);
    let busy = tcp_listener();
    let spec = format!("echo=tcp://{}", busy.local_addr().unwrap());
    let mut child = Launch::service().args(["--listen", &spec]).spawn();
    child.assert_exit(4, DEADLINE);
    assert!(
        child
            .stderr()
            .contains("cannot listen on echo=tcp://127.0.0.1"),
        "{}",
        child.stderr()
    );
}

#[test]
fn help_documents_fd_protocol_and_exit_codes() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "--inetd",
        "Exit codes",
        "--idle-timeout",
        "3  inherited fds invalid",
        "systemfd --no-pid: nobody re-arms",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
}

/// The idle race: clients that connect around the moment of the idle exit are all served,
/// by this process or by the next one started on the same (still held) listener.
#[test]
fn idle_exit_loses_no_client() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let notify = Notify::new();
    let mut first = Launch::service()
        .fd(&l)
        .names("daytime")
        .args(["--idle-timeout", "700ms"])
        .env("NOTIFY_SOCKET", notify.path())
        .spawn();
    notify.wait_for("READY=1");
    daytime_ok(&request(addr, b""));
    notify.wait_for("STOPPING=1");
    // Right at the exit: connect a burst (the kernel completes the handshakes from the backlog).
    let mut burst: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
    first.assert_exit(0, DEADLINE);
    assert!(first.stderr().contains("idle"), "{}", first.stderr());
    // After the exit, before the next activation.
    burst.extend((0..20).map(|_| connect(addr)));
    let mut second = Launch::service()
        .fd(&l)
        .names("daytime")
        .args(["--idle-timeout", "700ms"])
        .spawn();
    for s in &mut burst {
        daytime_ok(&read_to_eof(s));
    }
    second.assert_exit(0, DEADLINE);
}

#[test]
fn max_connections_makes_the_next_client_wait() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let _child = Launch::service()
        .fd(&l)
        .names("echo")
        .args(["--max-connections", "2"])
        .spawn();
    let mut a = connect(addr);
    let mut b = connect(addr);
    for s in [&mut a, &mut b] {
        s.write_all(b"x").unwrap();
        let mut buf = [0; 1];
        s.read_exact(&mut buf).unwrap();
    }
    let mut c = connect(addr);
    c.write_all(b"waiting").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut buf = [0; 7];
    let early = c.read(&mut buf);
    assert!(
        early.is_err(),
        "third client was served while two were open: {early:?}"
    );
    drop(a);
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"waiting");
}

#[test]
fn sigterm_drains_in_flight_connections() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let notify = Notify::new();
    let mut child = Launch::service()
        .fd(&l)
        .names("echo")
        .args(["--shutdown-grace", "10s"])
        .env("NOTIFY_SOCKET", notify.path())
        .spawn();
    notify.wait_for("READY=1");
    let mut s = connect(addr);
    s.write_all(b"before").unwrap();
    let mut buf = [0; 6];
    s.read_exact(&mut buf).unwrap();
    child.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    s.write_all(b"during the drain").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s), b"during the drain");
    child.assert_exit(0, DEADLINE);
}

#[test]
fn shutdown_grace_ends_stuck_connections() {
    let l = tcp_listener();
    let mut child = Launch::service()
        .fd(&l)
        .names("discard")
        .args(["--shutdown-grace", "300ms"])
        .spawn();
    let _held = connect(l.local_addr().unwrap());
    child.wait_line("accepted", DEADLINE);
    child.signal(libc::SIGINT);
    child.assert_exit(0, DEADLINE);
    assert!(
        child.stderr().contains("grace period over"),
        "{}",
        child.stderr()
    );
}

#[test]
fn silent_client_times_out_and_misbehaving_clients_do_not_disturb_others() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let _child = Launch::service()
        .fd(&l)
        .names("echo")
        .args(["--connection-timeout", "500ms"])
        .spawn();
    // Silent: closed by the server.
    let mut silent = connect(addr);
    assert_eq!(read_to_eof(&mut silent), b"");
    // 1 MiB without a newline while not reading; another client meanwhile.
    let mut big = connect(addr);
    let writer = std::thread::spawn(move || {
        let data = vec![b'a'; 1 << 20];
        let _ = big.write_all(&data);
        big
    });
    assert_eq!(request(addr, b"still fine"), b"still fine");
    // Reset in the middle of a reply.
    let mut rst = connect(addr);
    rst.write_all(&vec![b'b'; 256 * 1024]).unwrap();
    socket2::SockRef::from(&rst)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(rst);
    assert_eq!(request(addr, b"after reset"), b"after reset");
    let big = writer.join().unwrap();
    drop(big.shutdown(Shutdown::Both));
}

/// A client that goes away (ECONNRESET, or ECONNABORTED when its connection is killed) is
/// logged at info, not as a warning or error: it is the client's business.
#[test]
fn client_hang_ups_are_not_logged_as_errors() {
    let ss = tool("ss");
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let child = Launch::service().fd(&l).names("discard").spawn();
    let close_line = |c: &TcpStream| {
        let peer = format!("peer {} ", c.local_addr().unwrap());
        child.wait_line(&format!("accepted {}", c.local_addr().unwrap()), DEADLINE);
        peer
    };

    // ECONNABORTED: the server's side of the connection is destroyed (`ss -K`, as an admin or
    // a firewall daemon would), the next read fails with "Software caused connection abort".
    let aborted = connect(addr);
    let peer = close_line(&aborted);
    let out = Command::new(&ss)
        .args(["-K", "-tn", "src", &addr.to_string(), "dst"])
        .arg(aborted.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = child.wait_line(&peer, DEADLINE);
    assert!(
        line.contains("client went away") && line.contains(" INFO "),
        "{line}"
    );

    // ECONNRESET: the client closes with SO_LINGER 0, which sends a RST.
    let reset = connect(addr);
    let peer = close_line(&reset);
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    let line = child.wait_line(&peer, DEADLINE);
    assert!(
        line.contains("client went away") && line.contains(" INFO "),
        "{line}"
    );

    for bad in [" WARN ", " ERROR "] {
        assert!(!child.stderr().contains(bad), "{}", child.stderr());
    }
}

#[test]
fn chargen_only_generates_while_the_client_reads() {
    let l = tcp_listener();
    let child = Launch::service().fd(&l).names("chargen").spawn();
    let mut c = connect(l.local_addr().unwrap());
    let mut buf = vec![0; 74 * 10];
    c.read_exact(&mut buf).unwrap();
    chargen_ok(&buf);
    // Not reading: the server fills the socket buffers and then stops; its memory stays small.
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = rss();
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(
        rss() < before + 4096,
        "RSS grew from {before} kB to {} kB",
        rss()
    );
}

/// A chargen client that does not read used to pin ~4 MiB of kernel memory (the autotuned send
/// buffer, full); now the server's side of the connection holds at most its small SO_SNDBUF.
#[test]
fn chargen_non_reader_pins_little_kernel_memory() {
    let ss = tool("ss");
    let l = tcp_listener();
    let _child = Launch::service().fd(&l).names("chargen").spawn();
    let mut c = connect(l.local_addr().unwrap());
    let mut line = [0; 74];
    c.read_exact(&mut line).unwrap();
    // From now on the client does not read. The server's side runs from the listener to us.
    let (src, dst) = (
        l.local_addr().unwrap().to_string(),
        c.local_addr().unwrap().to_string(),
    );
    // skmem's `w` is the send queue's kernel memory (sk_wmem_queued), `tb` the send buffer size.
    let skmem = |field: &str| -> Option<u64> {
        let out = Command::new(&ss)
            .args(["-tmnH", "src", &src, "dst", &dst])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let inner = text.split("skmem:(").nth(1)?.split(')').next()?;
        inner.split(',').find_map(|kv| {
            let v = kv.strip_prefix(field)?;
            v.parse().ok()
        })
    };
    // Wait until the server has filled what it may and stopped (three equal samples).
    let deadline = Instant::now() + DEADLINE;
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        samples.push(skmem("w").unwrap_or(0));
        let n = samples.len();
        if n >= 3 && samples[n - 1] > 0 && samples[n - 3..].iter().all(|&w| w == samples[n - 1]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = samples.iter().copied().max().unwrap_or(0);
    let sndbuf = skmem("tb").expect("ss shows the server's side of the connection");
    assert!(
        queued > 0 && queued <= 128 * 1024 && sndbuf <= 64 * 1024,
        "server side of a non-reading chargen client holds {queued} bytes (send buffer {sndbuf})"
    );
    drop(c);
}

#[test]
fn inetd_mode_on_a_socketpair_and_on_pipes() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs2 = theirs.try_clone().unwrap();
    let mut child = Launch::service()
        .args(["--inetd", "echo"])
        .stdin(OwnedFd::from(theirs))
        .stdout(OwnedFd::from(theirs2))
        .spawn();
    let mut ours = ours;
    ours.set_read_timeout(Some(DEADLINE)).unwrap();
    ours.write_all(b"over a socketpair").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut ours), b"over a socketpair");
    child.assert_exit(0, DEADLINE);

    let mut child = Command::new(BIN)
        .args(["--inetd", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"over pipes")
        .unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(out, b"over pipes");
    assert_eq!(child.wait().unwrap().code(), Some(0));

    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs2 = theirs.try_clone().unwrap();
    let mut child = Launch::service()
        .args(["--inetd", "time"])
        .stdin(OwnedFd::from(theirs))
        .stdout(OwnedFd::from(theirs2))
        .spawn();
    let mut ours = ours;
    ours.set_read_timeout(Some(DEADLINE)).unwrap();
    time_ok(&read_to_eof(&mut ours));
    child.assert_exit(0, DEADLINE);
}

#[test]
fn listening_socket_on_stdin_is_served_until_idle() {
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let mut child = Launch::service()
        .args(["--protocol", "daytime", "--idle-timeout", "500ms"])
        .stdin(OwnedFd::from(l.try_clone().unwrap()))
        .spawn();
    daytime_ok(&request(addr, b""));
    child.assert_exit(0, DEADLINE);
    assert!(child.stderr().contains("(stdin)"), "{}", child.stderr());
}

#[test]
fn connected_socket_at_fd3_is_one_connection() {
    let l = tcp_listener();
    let mut client = connect(l.local_addr().unwrap());
    let (conn, _) = l.accept().unwrap();
    let mut child = Launch::service()
        .fd(&conn)
        .names("connection")
        .args(["--protocol", "echo"])
        .spawn();
    drop(conn);
    client.write_all(b"accept=yes").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client), b"accept=yes");
    child.assert_exit(0, DEADLINE);
}

#[test]
fn systemd_socket_activate_starts_it() {
    let ssa = tool("systemd-socket-activate");
    let l = tcp_listener();
    // systemd-socket-activate passes inherited LISTEN_FDS through to the command it execs.
    let _child = Launch::program(&ssa)
        .fd(&l)
        .args(["--fdname=daytime", BIN])
        .spawn();
    daytime_ok(&request(l.local_addr().unwrap(), b""));

    // --accept: one process per connection, the connection at fd 3 (no LISTEN_FDNAMES in 252).
    let l = tcp_listener();
    let _child = Launch::program(&ssa)
        .fd(&l)
        .group()
        .args(["--accept", BIN, "--protocol", "echo"])
        .spawn();
    assert_eq!(
        request(l.local_addr().unwrap(), b"per connection"),
        b"per connection"
    );

    // --accept --inetd: the connection on stdin/stdout.
    let l = tcp_listener();
    let _child = Launch::program(&ssa)
        .fd(&l)
        .group()
        .args(["--accept", "--inetd", BIN, "--inetd", "echo"])
        .spawn();
    assert_eq!(
        request(l.local_addr().unwrap(), b"inetd style"),
        b"inetd style"
    );
}

#[test]
fn systemfd_starts_it() {
    let systemfd = tool("systemfd");
    let child = Launch::program(&systemfd)
        .group()
        .args([
            "--no-pid",
            "-s",
            "tcp::127.0.0.1:0",
            "--",
            BIN,
            "--protocol",
            "echo",
            "--idle-timeout",
            "0",
        ])
        .spawn();
    let line = child.wait_line("listening: unknown (echo)", DEADLINE);
    let addr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("address in listening line");
    assert_eq!(request(addr, b"via systemfd"), b"via systemfd");
}

#[test]
fn systemfd_without_names_serves_by_port() {
    // The README's command: no fd name, no --protocol, no --idle-timeout; port 7013 means
    // daytime, and without LISTEN_PID nobody re-arms the socket, so no idle exit by default.
    let systemfd = tool("systemfd");
    let child = Launch::program(&systemfd)
        .group()
        .args(["--no-pid", "-s", "tcp::127.0.0.113:7013", "--", BIN])
        .spawn();
    child.wait_line("listening: unknown (daytime)", DEADLINE);
    let line = child.wait_line("idle exit:", DEADLINE);
    assert!(
        line.contains("idle exit: never (default: LISTEN_PID not set"),
        "{line}"
    );
    let reply = request("127.0.0.113:7013".parse().unwrap(), b"");
    assert!(
        reply.ends_with(b"\r\n") && reply.len() > 10,
        "daytime: {reply:?}"
    );
}

#[test]
fn rdate_and_nc_are_real_clients() {
    let rdate = tool("rdate");
    let nc = tool("nc");
    let tcp = tcp_listener();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let day = tcp_listener();
    let _child = Launch::service()
        .fd(&tcp)
        .fd(&udp)
        .fd(&day)
        .names("time:time:daytime")
        .spawn();
    let year = protocols::daytime_reply(SystemTime::now())
        .split(", ")
        .nth(2)
        .unwrap()[..4]
        .to_owned();
    for extra in [&[][..], &["-u"][..]] {
        let port = if extra.is_empty() {
            tcp.local_addr()
        } else {
            udp.local_addr()
        }
        .unwrap()
        .port()
        .to_string();
        let out = Command::new(&rdate)
            .args(["-p", "-o", &port])
            .args(extra)
            .arg("127.0.0.1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&year),
            "rdate {extra:?}: {out:?}"
        );
    }
    let port = day.local_addr().unwrap().port().to_string();
    let out = Command::new(&nc)
        .args(["-N", "127.0.0.1", &port])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    daytime_ok(&out.stdout);
}

#[test]
fn ten_thousand_held_connections_are_cheap() {
    const N: usize = 10_000;
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    // Client and service are separate processes: each needs N fds plus a few.
    assert!(
        hard >= N as u64 + 200,
        "test needs RLIMIT_NOFILE hard >= {}, have {hard}",
        N + 200
    );
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let l = tcp_listener();
    let addr = l.local_addr().unwrap();
    let child = Launch::service()
        .fd(&l)
        .names("echo")
        .env("RUST_LOG", "warn")
        .args(["--connection-timeout", "5m"])
        .spawn();
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(N);
    for _ in 0..N {
        let s = TcpStream::connect(addr).expect("connect");
        // Reset on drop: no TIME_WAIT left behind to crowd the ephemeral ports of later runs.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        held.push(s);
    }
    eprintln!("connected {N} in {:?}", t0.elapsed());
    // All accepted and alive: the last one echoes.
    let last = held.last_mut().unwrap();
    last.set_read_timeout(Some(DEADLINE)).unwrap();
    last.write_all(b"!").unwrap();
    let mut b = [0; 1];
    last.read_exact(&mut b).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.pid()))
        .unwrap()
        .count();
    assert!(fds >= N, "only {fds} fds open in the service");
    assert!(rss_kb < 32 * 1024, "RSS {rss_kb} kB for {N} connections");
}

#[test]
fn unix_listener_passed_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = Launch::service()
        .fd(&l)
        .names("echo.socket")
        .args(["--idle-timeout", "500ms"])
        .spawn();
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"over unix").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s), b"over unix");
    child.assert_exit(0, DEADLINE);
    // A passed socket is never unlinked.
    assert!(path.exists());
}

#[test]
fn udp_idle_exit_after_the_last_datagram() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut child = Launch::service()
        .fd(&sock)
        .names("echo")
        .args(["--idle-timeout", "500ms"])
        .spawn();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.send_to(b"one", sock.local_addr().unwrap()).unwrap();
    let mut buf = [0; 16];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one");
    child.assert_exit(0, DEADLINE);
    assert!(child.stderr().contains("idle"), "{}", child.stderr());
}

#[test]
fn listening_socket_on_stdin_needs_a_protocol() {
    let l = tcp_listener();
    let mut child = Launch::service().stdin(OwnedFd::from(l)).spawn();
    child.assert_exit(3, DEADLINE);
    let err = child.wait_line("error:", DEADLINE);
    assert!(
        err.contains("fd 0") && err.contains("stdin") && err.contains("--protocol"),
        "{err}"
    );
}

#[test]
fn quote_file_is_used_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quotes");
    std::fs::write(&file, "Only this one.\n").unwrap();
    let l = tcp_listener();
    let _child = Launch::service()
        .fd(&l)
        .names("qotd")
        .args(["--quote-file", file.to_str().unwrap()])
        .spawn();
    assert_eq!(request(l.local_addr().unwrap(), b""), b"Only this one.\r\n");

    std::fs::write(&file, "x".repeat(600)).unwrap();
    let mut child = Launch::service()
        .fd(&l)
        .names("qotd")
        .args(["--quote-file", file.to_str().unwrap()])
        .spawn();
    child.assert_exit(2, DEADLINE);
    assert!(child.stderr().contains("512"), "{}", child.stderr());
}
