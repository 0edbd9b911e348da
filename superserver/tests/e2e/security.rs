//! Attacks and faults the superserver defends against, each reproduced against the real
//! binary: a symlink raced over a Unix socket, peers denied in the kernel, UDP ports another
//! socket would share, process groups left behind, a second instance, a narrowed wildcard,
//! inherited ignored signals, per-connection variables set from the configuration.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::harness::*;

/// Send `line` to the Unix socket at `path` and read one line back.
fn unix_echo(path: &Path, line: &str) -> std::io::Result<String> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(WAIT))?;
    (&s).write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    BufReader::new(&s).read_line(&mut out)?;
    Ok(out.trim_end().to_string())
}

/// The file's permission bits, without following a symlink at `path`.
fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Run `act` at every system call stop (entry and exit) of the process `pid`, as its tracer,
/// until `stop` is set and the process makes one more stop (send it a signal it ignores to
/// make sure); then detach. This lets an "attacker" act between any two system calls of the
/// superserver, which no timing race can. The returned receiver gets `Ok` once attached, or
/// the error when ptrace is not permitted; the thread returns the number of stops.
fn between_every_syscall(
    pid: i32,
    stop: Arc<AtomicBool>,
    mut act: impl FnMut() + Send + 'static,
) -> (
    mpsc::Receiver<std::io::Result<()>>,
    std::thread::JoinHandle<usize>,
) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let null = std::ptr::null_mut::<libc::c_void>();
        let opts = libc::PTRACE_O_TRACESYSGOOD as usize as *mut libc::c_void;
        // SAFETY: ptrace(2) on our own child; every request below names that pid.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, pid, null, opts) != 0
                || libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) != 0
            {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                return 0;
            }
        }
        let _ = tx.send(Ok(()));
        let mut stops = 0;
        loop {
            let mut st = 0;
            // SAFETY: waitpid(2) into a local int.
            if unsafe { libc::waitpid(pid, &mut st, libc::__WALL) } != pid || !libc::WIFSTOPPED(st)
            {
                return stops; // gone
            }
            let sig = libc::WSTOPSIG(st);
            let syscall = sig == libc::SIGTRAP | 0x80;
            if syscall {
                stops += 1;
                act();
            }
            // A signal on its way to the process goes on; syscall and event stops carry none.
            let inject = if syscall || st >> 16 != 0 { 0 } else { sig };
            let data = inject as usize as *mut libc::c_void;
            let request = if stop.load(Ordering::Relaxed) {
                libc::PTRACE_DETACH
            } else {
                libc::PTRACE_SYSCALL
            };
            // SAFETY: as above; the process is in a ptrace stop.
            unsafe { libc::ptrace(request, pid, null, data) };
            if request == libc::PTRACE_DETACH {
                return stops;
            }
        }
    });
    (rx, thread)
}

#[test]
fn a_symlink_swapped_over_the_socket_never_redirects_chmod() {
    // The attacker's playground: a world-writable directory without the sticky bit.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The file the attacker wants root to chmod.
    let secret_dir = tempfile::tempdir().unwrap();
    let target = secret_dir.path().join("shadow");
    std::fs::write(&target, "secret").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A decoy for the private directory: its `s` points at the target.
    let decoy = secret_dir.path().join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    std::os::unix::fs::symlink(&target, decoy.join("s")).unwrap();

    let config = |path: &Path, mode: &str| {
        format!(
            "[service.u]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\n\
             listen = \"unix:{}\"\nsocket_mode = \"{mode}\"\n",
            path.display()
        )
    };
    let (a, b) = (d.join("a.sock"), d.join("b.sock"));
    let server = Server::start(&config(&a, "0666"), vec![]);
    assert_eq!(mode_of(&a), 0o666);

    // The attack, run between every two system calls of the superserver (or, where ptrace is
    // not permitted, as fast as it can in a loop): a socket that appears at a or b is
    // replaced by a symlink to the target (made in advance, so only a rename is left), and
    // now and then a private directory is moved away and a symlink to the decoy put there.
    let (swaps, stolen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let act = {
        let (swaps, stolen) = (swaps.clone(), stolen.clone());
        let (d, a, b, target) = (d.clone(), a.clone(), b.clone(), target.clone());
        let tmp = d.join(".evil");
        let mut n = 0u64;
        move || {
            n += 1;
            for path in [&a, &b] {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::os::unix::fs::symlink(&target, &tmp);
                    if std::fs::rename(&tmp, path).is_ok() {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if n % 16 != 0 {
                return;
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                return;
            };
            for e in entries.flatten() {
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && e.file_name().to_string_lossy().starts_with(".superserver-") {
                    let away = d.join(format!("stolen-{n}"));
                    if std::fs::rename(e.path(), &away).is_ok() {
                        let _ = std::os::unix::fs::symlink(&decoy, e.path());
                        stolen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (attached, tracer) = between_every_syscall(server.pid, stop.clone(), act.clone());
    let racer = match attached.recv().unwrap() {
        Ok(()) => None,
        Err(e) => {
            eprintln!("ptrace not permitted ({e}); racing the superserver instead");
            let stop = stop.clone();
            let mut act = act;
            Some(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    act();
                }
            }))
        }
    };

    // Each reload either binds a fresh socket (the path changes; the attacker's symlink from
    // last time is cleared first so that the bind goes ahead) or re-applies a new mode to the
    // kept socket, whose path the attacker has replaced by a symlink meanwhile.
    let plan = [(&a, "0660"), (&b, "0666"), (&b, "0660"), (&a, "0666")];
    for i in 0..200 {
        let (path, mode) = plan[i % plan.len()];
        if i % 2 == 1 && std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path).unwrap();
        }
        server.reload(&config(path, mode));
        assert_eq!(
            mode_of(&target),
            0o600,
            "reload {i} changed the mode of the attacker's target"
        );
    }
    stop.store(true, Ordering::Relaxed);
    server.signal(libc::SIGWINCH); // ignored; wakes the tracer to detach
    let stops = tracer.join().unwrap();
    if let Some(racer) = racer {
        racer.join().unwrap();
    }
    eprintln!(
        "attacker: {stops} syscall stops, {} sockets replaced, {} private directories stolen",
        swaps.load(Ordering::Relaxed),
        stolen.load(Ordering::Relaxed)
    );
    assert!(
        swaps.load(Ordering::Relaxed) > 0,
        "the attacker never got to replace a socket; the test proves nothing"
    );
    assert_eq!(mode_of(&target), 0o600);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret");
    if stops > 0 {
        // Re-applying the mode found the symlink and left it alone.
        server.wait_log("the file is no longer the socket we bound; not changing it");
    }

    // Once the attacker is gone the service still binds and answers, with its mode.
    let last = d.join("final.sock");
    server.reload(&config(&last, "0666"));
    server.wait_log(&format!("u: listening on unix:{}", last.display()));
    assert_eq!(mode_of(&last), 0o666);
    assert_eq!(unix_echo(&last, "still here").unwrap(), "still here");
    assert_eq!(mode_of(&target), 0o600);
}

/// Connect from `src` to `addr`, giving up after `timeout`.
fn try_connect(src: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.bind(&SockAddr::from(SocketAddr::new(src.parse().unwrap(), 0)))?;
    s.connect_timeout(&SockAddr::from(addr), timeout)?;
    Ok(s)
}

/// A datagram from `src` to `addr`; the answer, if one comes within `timeout`.
fn udp_ask(src: &str, addr: SocketAddr, timeout: Duration) -> Option<Vec<u8>> {
    let c = UdpSocket::bind((src, 0)).unwrap();
    c.set_read_timeout(Some(timeout)).unwrap();
    c.send_to(b"ping", addr).unwrap();
    let mut buf = [0u8; 2048];
    c.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn wait_mode_allow_deny_is_enforced_by_the_kernel() {
    let (t, t_addr) = tcp_listener("127.0.0.1");
    let (u, u_addr) = udp_socket("127.0.0.1");
    let config = format!(
        r#"
        [service.tcp]
        exec = ["{{SMALL}}", "--idle-timeout=30s"]
        listen = {{ echo = "tcp://{t_addr}" }}
        deny = ["127.0.0.66/32"]
        [service.udp]
        exec = ["{{SMALL}}", "--idle-timeout=30s"]
        listen = {{ echo = "udp://{u_addr}" }}
        deny = ["127.0.0.66/32"]
        "#
    );
    let server = Server::start(&config, vec![t, u]);
    let short = Duration::from_millis(700);

    // TCP: the denied peer's SYN is dropped, so its connect times out (no reset, no accept),
    // and no process is started for it; an allowed peer is served.
    let denied = try_connect("127.0.0.66", t_addr, short);
    assert_eq!(
        denied.as_ref().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::TimedOut),
        "a denied peer must not complete a connection"
    );
    assert_eq!(server.count_log("tcp: started pid"), 0);
    let mut ok = connect_from("127.0.0.2", t_addr).unwrap();
    ok.write_all(b"allowed\n").unwrap();
    assert_eq!(line_of(&ok).unwrap(), "allowed\n");
    // Still dropped while the service holds the socket.
    let denied = try_connect("127.0.0.66", t_addr, short);
    assert!(
        denied.is_err(),
        "denied peer connected to the running service"
    );

    // UDP: the denied datagram never reaches the service; an allowed one is answered.
    assert_eq!(udp_ask("127.0.0.66", u_addr, short), None);
    assert_eq!(
        udp_ask("127.0.0.2", u_addr, WAIT).as_deref(),
        Some(&b"ping"[..])
    );
    assert_eq!(
        udp_ask("127.0.0.66", u_addr, short),
        None,
        "denied datagram answered by the running service"
    );
}

#[test]
fn udp_ports_cannot_be_co_bound_by_another_socket() {
    // The superserver binds this UDP address itself (not handed over).
    let probe = UdpSocket::bind("127.0.0.81:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let config = format!(
        "[service.u]\nexec = [\"{{SMALL}}\", \"--idle-timeout=30s\"]\nlisten = {{ echo = \"udp://{addr}\" }}\n"
    );
    let _server = Server::start(&config, vec![]);

    // As root, with SO_REUSEADDR and with SO_REUSEPORT: both refused.
    for reuseport in [false, true] {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(reuseport).unwrap();
        let err = s.bind(&SockAddr::from(addr)).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EADDRINUSE),
            "reuseport {reuseport}: {err}"
        );
    }

    // As an unprivileged user; the same program on a free port shows that it can bind.
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
        try:\n    s.bind((sys.argv[1], int(sys.argv[2]))); print('bound')\n\
        except OSError as e:\n    print(e.errno)\n";
    let as_nobody = |port: u16| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON])
            .args(["-c", script, "127.0.0.81", &port.to_string()])
            .output()
            .expect("setpriv");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(as_nobody(addr.port()), libc::EADDRINUSE.to_string());
    assert_eq!(as_nobody(0), "bound");

    // The service still gets its datagrams.
    assert_eq!(
        udp_ask("127.0.0.1", addr, WAIT).as_deref(),
        Some(&b"ping"[..])
    );
}

/// Wait until `path` holds a pid; return it.
fn pid_in(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(&format!("a pid in {}", path.display()), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid > 0
    });
    pid
}

/// A process the test left behind if the superserver failed to kill it: killed on drop if it
/// still is our `sleep 300`.
struct Leftover(i32);

impl Drop for Leftover {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if cmdline == b"/bin/sleep\x00300\x00" {
            // SAFETY: kill(2) on a process this test started (checked just above).
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// Gone, or a zombie nobody has reaped yet (dead either way).
fn dead(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

#[test]
fn stopping_kills_the_whole_process_group() {
    // 1. Child and grandchild both ignore SIGTERM: the SIGKILL after the grace period must
    //    reach the grandchild too.
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        r#"
        [superserver]
        shutdown_grace = "300ms"
        [service.stubborn]
        mode = "nowait"
        exec = ["/bin/sh", "-c", "trap '' TERM; /bin/sleep 300 & echo $! > {{DIR}}/gc.pid; wait"]
        listen = "{addr}"
        "#
    );
    let mut server = Server::start(&config, vec![l]);
    let _client = std::net::TcpStream::connect(addr).unwrap();
    let grandchild = pid_in(&server.dir.path().join("gc.pid"));
    let _leftover = Leftover(grandchild);
    assert!(!dead(grandchild));
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0));
    server.wait_log("SIGKILL to 1 child(ren) still running");
    wait_until("the grandchild to be killed", || dead(grandchild));

    // 2. The child dies of SIGTERM at once, its background job ignores it: the job is
    //    killed as the child is reaped, long before the grace period ends.
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        r#"
        [superserver]
        shutdown_grace = "60s"
        [service.leaver]
        mode = "nowait"
        exec = ["/bin/sh", "-c", "(trap '' TERM; exec /bin/sleep 300) & echo $! > {{DIR}}/gc.pid; wait"]
        listen = "{addr}"
        "#
    );
    let mut server = Server::start(&config, vec![l]);
    let _client = std::net::TcpStream::connect(addr).unwrap();
    let grandchild = pid_in(&server.dir.path().join("gc.pid"));
    let _leftover = Leftover(grandchild);
    wait_until("the job to ignore SIGTERM", || {
        std::fs::read_to_string(format!("/proc/{grandchild}/status"))
            .is_ok_and(|s| s.contains("Name:\tsleep"))
    });
    let t0 = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0));
    server.wait_log_all(&["leaver:", "killed by SIGTERM"]);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "waited for the grace period"
    );
    assert_eq!(server.count_log("SIGKILL to"), 0, "no grace-period kill");
    wait_until("the left-behind job to be killed", || dead(grandchild));
}

#[test]
fn a_second_superserver_does_not_take_over_a_live_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let config = format!(
        "[service.n]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = \"unix:{}\"\n",
        path.display()
    );
    let mut a = Server::start(&config, vec![]);
    let inode = std::fs::symlink_metadata(&path).unwrap().ino();
    assert_eq!(unix_echo(&path, "A").unwrap(), "A");

    // B finds A's socket alive: it refuses to start and leaves the file alone.
    let mut b = Server::start_with(&config, vec![], &[]);
    assert_eq!(b.wait_exit().code(), Some(4), "cannot bind: exit code 4");
    b.wait_log_all(&[
        &path.display().to_string(),
        "another process accepts connections",
    ]);
    assert_eq!(std::fs::symlink_metadata(&path).unwrap().ino(), inode);
    assert_eq!(unix_echo(&path, "A again").unwrap(), "A again");

    // A removes its own file when it stops.
    a.signal(libc::SIGTERM);
    assert_eq!(a.wait_exit().code(), Some(0));
    assert!(std::fs::symlink_metadata(&path).is_err(), "file removed");

    // A superserver killed outright leaves a stale file; the next one replaces it.
    let mut c = Server::start(&config, vec![]);
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert!(unix_echo(&path, "anyone?").is_err(), "stale");
    let _d = Server::start(&config, vec![]);
    assert_eq!(unix_echo(&path, "D").unwrap(), "D");
}

/// What clients of a service on `0.0.0.0:P` saw while it was narrowed to `127.0.0.1:P`, five
/// times over (each time on a fresh port): connections refused, connections reset, and the
/// superserver's log lines about failed binds. After each round the narrowed address answers
/// and the wildcard is gone (127.0.0.2:P is refused).
fn narrow_five_times() -> (usize, usize, usize) {
    let config = |ip: &str, port: u16| {
        format!(
            "[service.n]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = \"{ip}:{port}\"\n"
        )
    };
    let first = probe_port("0.0.0.0");
    let server = Server::start(&config("0.0.0.0", first), vec![]);
    let (mut refused, mut reset) = (0, 0);
    for round in 0..5 {
        let port = match round {
            0 => first,
            _ => {
                let port = probe_port("0.0.0.0");
                server.reload(&config("0.0.0.0", port));
                port
            }
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (r, e) = narrow_under_load(&server, addr, &config("127.0.0.1", port));
        refused += r;
        reset += e;
        assert_eq!(echo(addr, "narrowed").unwrap(), "narrowed");
        let other: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        assert!(echo(other, "wildcard?").is_err(), "the wildcard is closed");
    }
    eprintln!("narrowing: {refused} refused, {reset} reset");
    let bind_failures = server.count_log("will retry") + server.count_log("cannot listen");
    (refused, reset, bind_failures)
}

/// The narrower address is bound beside the retiring wildcard at once (no "will retry", no
/// gap of a back-off period).
#[test]
fn narrowing_a_wildcard_on_reload_binds_at_once() {
    let (_, _, bind_failures) = narrow_five_times();
    assert_eq!(bind_failures, 0, "a bind failed");
}

/// Closing the wildcard before binding the narrower address refused the clients that arrived
/// in between and reset those the kernel had queued on it (1 to 3 resets and a few refusals
/// per five reloads were seen). Now the two share the port for a moment and the wildcard's
/// queue is accepted and served before it closes: nobody is refused or reset.
#[test]
fn narrowing_a_wildcard_on_reload_refuses_nobody() {
    let (refused, reset, _) = narrow_five_times();
    assert_eq!(
        (refused, reset),
        (0, 0),
        "(refused, reset) during the reloads"
    );
}

/// Keep two clients connecting to `addr` while the service is reloaded to `narrowed`; return
/// how many connections were refused, and how many failed otherwise (reset).
fn narrow_under_load(server: &Server, addr: SocketAddr, narrowed: &str) -> (usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = || Arc::new(AtomicUsize::new(0));
    let (ok, refused, failed) = (counters(), counters(), counters());
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, refused, failed) =
                (stop.clone(), ok.clone(), refused.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match echo(addr, "x") {
                        Ok(l) if l == "x" => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(l) => panic!("echo answered {l:?}"),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    wait_until("some load", || ok.load(Ordering::Relaxed) > 10);
    server.reload(narrowed);
    let after = ok.load(Ordering::Relaxed);
    wait_until("load after the reload", || {
        ok.load(Ordering::Relaxed) > after + 10
    });
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    (
        refused.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    )
}

#[test]
fn children_get_default_signal_dispositions() {
    let (probe, addr) = tcp_listener("127.0.0.1");
    drop(probe);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("superserver.toml");
    std::fs::write(
        &path,
        format!(
            "[service.sig]\nallow_root = true\nmode = \"nowait\"\n\
             exec = [\"/bin/grep\", \"-E\", \"^Sig(Ign|Blk):\", \"/proc/self/status\"]\n\
             listen = \"{addr}\"\n"
        ),
    )
    .unwrap();
    // The superserver's launcher ignores SIGUSR1 and SIGQUIT (and Rust ignores SIGPIPE).
    let mut child = Command::new("env")
        .arg("--ignore-signal=USR1,QUIT,USR2,ALRM")
        .arg(superserver_bin())
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("SUPERSERVER_CONTROL", dir.path().join("ctl"))
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let child = Kill(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[superserver] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("superserver ready");
        if line.contains("ready") {
            break;
        }
    }
    let sig_ign = |status: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with("SigIgn:"))
            .expect("SigIgn line");
        u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).unwrap()
    };
    let bit = |sig: i32| 1u64 << (sig - 1);
    let own = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let mask = sig_ign(&own);
    assert_eq!(
        mask & (bit(libc::SIGUSR1) | bit(libc::SIGQUIT) | bit(libc::SIGPIPE)),
        bit(libc::SIGUSR1) | bit(libc::SIGQUIT) | bit(libc::SIGPIPE),
        "the superserver itself ignores them: {mask:x}"
    );

    let mut s = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    // Every signal is back to its default, glibc's two internal ones (32, 33) included,
    // which its signal(3) would refuse to touch.
    assert_eq!(sig_ign(&out), 0, "the child ignores signals:\n{out}");
    assert!(
        out.contains("SigBlk:\t0000000000000000"),
        "the child blocks signals:\n{out}"
    );
    drop(child);
}

#[test]
fn per_connection_variables_win_over_the_environment() {
    let check = |text: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("superserver.toml");
        std::fs::write(&path, text).unwrap();
        Command::new(superserver_bin())
            .arg("--check")
            .arg(&path)
            .output()
            .unwrap()
    };
    let service = "[service.s]\nallow_root = true\nmode = \"nowait\"\nexec = [\"/bin/cat\"]\n\
                   listen = \"127.0.0.1:7107\"\n";
    for (key, line) in [
        ("env", "env = { REMOTE_ADDR = \"6.6.6.6\" }"),
        ("pass_env", "pass_env = [\"REMOTE_ADDR\"]"),
        ("env", "env = { LISTEN_FDS = \"9\" }"),
    ] {
        let out = check(&format!("{service}{line}\n"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{line}: {stderr}");
        let name = if line.contains("LISTEN_FDS") {
            "LISTEN_FDS"
        } else {
            "REMOTE_ADDR"
        };
        assert!(
            stderr.contains(key) && stderr.contains(name),
            "{line}: {stderr}"
        );
    }

    // At run time the connection's own values are what the service sees, whatever the
    // superserver's environment holds.
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.r]\nmode = \"nowait\"\nexec = [\"{{PYTHON}}\", \"{{DIR}}/reporter.py\", \"--inetd\"]\nlisten = \"{addr}\"\n"
    );
    let _server = Server::start_with(
        &config,
        vec![l],
        &[("REMOTE_ADDR", "6.6.6.6"), ("TCPREMOTEIP", "6.6.6.6")],
    );
    _server.wait_log("ready");
    let s = connect_from("127.0.0.2", addr).unwrap();
    let r = json(&line_of(&s).unwrap());
    assert_eq!(r["env"]["REMOTE_ADDR"], "127.0.0.2");
    assert_eq!(r["env"]["TCPREMOTEIP"], "127.0.0.2");
}

/// `no_new_privs = true` reaches the child (and nothing else changes without it).
#[test]
fn no_new_privs_is_set_when_asked() {
    let status_of = |extra: &str| {
        let (l, addr) = tcp_listener("127.0.0.1");
        let config = format!(
            "[service.nnp]\nmode = \"nowait\"\nexec = [\"/bin/grep\", \"^NoNewPrivs:\", \"/proc/self/status\"]\nlisten = \"{addr}\"\nuser_if_root = \"nobody\"\n{extra}"
        );
        let _server = Server::start(&config, vec![l]);
        let (line, _conn) = read_line(addr).unwrap();
        line
    };
    assert_eq!(status_of("no_new_privs = true\n").trim(), "NoNewPrivs:\t1");
    assert_eq!(status_of("").trim(), "NoNewPrivs:\t0");
}
