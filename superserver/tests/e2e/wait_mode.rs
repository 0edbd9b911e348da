//! Wait mode: hand the listening sockets to one process on the first connection, re-arm when
//! it exits, back off when it fails, reload, inherit, shut down.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn first_connection_starts_the_service_with_the_systemd_protocol() {
    let (a, a_addr) = tcp_listener("127.0.0.1");
    let (b, b_addr) = tcp_listener("127.0.0.1");
    let (u, u_addr) = udp_socket("127.0.0.1");
    let config = format!(
        r#"
        [service.report]
        exec = ["{{PYTHON}}", "{{DIR}}/reporter.py"]
        env = {{ IDLE = "1" }}
        listen = {{ web = "tcp://{a_addr}", admin = ["tcp://{b_addr}", "udp://{u_addr}"] }}
        "#
    );
    let server = Server::start(&config, vec![a, b, u]);
    assert_eq!(
        server.count_log("started pid"),
        0,
        "nothing runs before a connection"
    );

    let (line, conn) = read_line(b_addr).unwrap();
    let r = json(&line);
    let pid = r["pid"].as_i64().unwrap();
    assert_eq!(
        r["env"]["LISTEN_PID"],
        pid.to_string(),
        "LISTEN_PID is the child's own pid"
    );
    assert_eq!(r["env"]["LISTEN_FDS"], "3");
    assert_eq!(r["env"]["LISTEN_FDNAMES"], "web:admin:admin");
    assert_eq!(
        r["listen_fds"],
        serde_json::json!([3, 4, 5]),
        "libsystemd accepts them"
    );
    assert_eq!(
        r["fds"],
        serde_json::json!([0, 1, 2, 3, 4, 5]),
        "no other fd leaks"
    );
    // A clean environment: the service's env, the pass-list, LISTEN_*, nothing else.
    let keys: HashSet<String> = r["env"].as_object().unwrap().keys().cloned().collect();
    let allowed: HashSet<String> = [
        "IDLE",
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "RUST_LOG",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LC_CTYPE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        keys.is_subset(&allowed),
        "unexpected variables: {:?}",
        keys.difference(&allowed)
    );
    drop(conn);

    // The same process answers on the other sockets, UDP included.
    let r2 = json(&read_line(a_addr).unwrap().0);
    assert_eq!(r2["pid"].as_i64().unwrap(), pid);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    udp.send_to(b"hi", u_addr).unwrap();
    let mut buf = [0u8; 65536];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(
        json(std::str::from_utf8(&buf[..n]).unwrap())["pid"]
            .as_i64()
            .unwrap(),
        pid
    );
    assert_eq!(server.count_log("started pid"), 1);
}

#[test]
fn a_burst_on_a_cold_socket_is_fully_answered() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [service.small]
        exec = ["{SMALL}", "--idle-timeout=5s"]
        listen = { echo = "ADDR" }
        "#
    .replace("ADDR", &addr.to_string());
    let server = Server::start(&config, vec![l]);
    let clients: Vec<_> = (0..200)
        .map(|i| std::thread::spawn(move || echo(addr, &format!("hello {i}"))))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), format!("hello {i}"));
    }
    assert_eq!(
        server.count_log("started pid"),
        1,
        "one process served the burst"
    );
}

#[test]
fn idle_exit_rearms_and_the_next_connection_starts_a_new_process() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [service.report]
        exec = ["{PYTHON}", "{DIR}/reporter.py"]
        env = { IDLE = "0.2" }
        listen = "ADDR"
        "#
    .replace("ADDR", &addr.to_string());
    let server = Server::start(&config, vec![l]);
    let mut pids = HashSet::new();
    for n in 1..=4 {
        let r = json(&read_line(addr).unwrap().0);
        pids.insert(r["pid"].as_i64().unwrap());
        server.wait_log_n("exited 0", n);
    }
    assert_eq!(pids.len(), 4, "each activation is a new process");
    assert_eq!(server.count_log("back-off"), 0);
    wait_until("no zombies", || server.zombie_children().is_empty());
    assert!(children_of(server.pid).is_empty(), "every child was reaped");
}

#[test]
fn a_crash_loop_backs_off_cheaply_and_recovers_when_the_program_is_fixed() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [superserver]
        restart_backoff_min = "50ms"
        restart_backoff_max = "400ms"
        [service.flaky]
        exec = ["{DIR}/flaky.sh"]
        listen = { echo = "ADDR" }
        "#
    .replace("ADDR", &addr.to_string());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("flaky.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = config.replace("{DIR}/flaky.sh", &script.display().to_string());
    let server = Server::start(&config, vec![l]);

    // A client waits in the backlog while the service keeps failing.
    let client = std::thread::spawn(move || echo(addr, "still there?"));
    server.wait_log_n("back-off", 6);
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    server.wait_log_n("back-off", 9);
    let share = (server.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.05,
        "superserver used {:.1}% CPU while backing off",
        share * 100.0
    );
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("next start in 400ms")),
        "the delay doubles up to the cap"
    );

    // Fix the program: the next attempt serves the waiting client.
    let fixed = format!(
        "#!/bin/sh\nexec {} --idle-timeout=1s\n",
        small_services_bin().display()
    );
    let tmp = dir.path().join("flaky.new");
    std::fs::write(&tmp, fixed).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &script).unwrap();
    assert_eq!(client.join().unwrap().unwrap(), "still there?");
    server.wait_log("recovered");
    wait_until("no zombies", || server.zombie_children().is_empty());
}

#[test]
fn sigterm_stops_listening_terminates_children_and_exits_0() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [superserver]
        shutdown_grace = "5s"
        [service.small]
        exec = ["{SMALL}", "--idle-timeout=60s"]
        listen = { echo = "ADDR" }
        "#
    .replace("ADDR", &addr.to_string());
    let mut server = Server::start(&config, vec![l]);
    assert_eq!(echo(addr, "one").unwrap(), "one");
    let child = children_of(server.pid);
    assert_eq!(child.len(), 1);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0));
    assert!(proc_state(child[0]).is_none() || proc_state(child[0]) == Some('Z'));
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [superserver]
        shutdown_grace = "300ms"
        [service.stubborn]
        exec = ["/bin/sh", "-c", "trap '' TERM; echo started >&2; while :; do sleep 1; done"]
        listen = "ADDR"
        "#
    .replace("ADDR", &addr.to_string());
    let mut server = Server::start(&config, vec![l]);
    let _client = std::net::TcpStream::connect(addr).unwrap();
    server.wait_log("started pid");
    server.wait_log_all(&["started"]);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0));
    server.wait_log("SIGKILL to 1 child(ren) still running");
    server.wait_log_all(&["stubborn: pid", "killed by SIGKILL"]);
}

#[test]
fn sockets_are_adopted_from_systemd_socket_activate() {
    let port = probe_port("127.0.0.9");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        format!(
            "[service.small]\nallow_root = true\nexec = [\"{}\"]\nlisten = {{ echo = \"127.0.0.9:{port}\" }}\n",
            small_services_bin().display()
        ),
    )
    .unwrap();
    // systemd-socket-activate binds, waits for the first connection, then execs the
    // superserver with LISTEN_FDS=1 and its own pid as LISTEN_PID.
    let mut ssa = std::process::Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.9:{port}"),
            "--fdname=echo",
            "-E",
            "RUST_LOG=info",
            "-E",
            &format!(
                "SUPERSERVER_CONTROL={}",
                path.with_extension("ctl").display()
            ),
        ])
        .arg(superserver_bin())
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd) is needed");
    let addr = format!("127.0.0.9:{port}").parse().unwrap();
    wait_until("systemd-socket-activate to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    assert_eq!(echo(addr, "through systemd").unwrap(), "through systemd");
    assert_eq!(echo(addr, "again").unwrap(), "again");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(ssa.id() as i32, libc::SIGTERM) };
    let status = ssa.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(ssa.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{err}");
    assert!(err.contains("adopted inherited fd 3"), "log:\n{err}");
}

#[test]
fn inherited_sockets_that_do_not_fit_the_config_are_an_error() {
    // A UDP socket handed over where the config says TCP on the same address.
    let (u, u_addr) = udp_socket("127.0.0.1");
    let config = format!(
        "[service.small]\nexec = [\"{{SMALL}}\"]\nlisten = {{ echo = \"tcp://{u_addr}\" }}\n"
    );
    let mut server = Server::start_with(&config, vec![u], &[]);
    assert_eq!(server.wait_exit().code(), Some(4));
    let line = server.wait_log("has the wrong type");
    assert!(
        line.contains(&format!("udp://{u_addr} has the wrong type")),
        "{line}"
    );

    // A socket nobody asked for.
    let (extra, extra_addr) = tcp_listener("127.0.0.1");
    let (mine, mine_addr) = tcp_listener("127.0.0.1");
    let config =
        format!("[service.small]\nexec = [\"{{SMALL}}\"]\nlisten = {{ echo = \"{mine_addr}\" }}\n");
    let mut server = Server::start_with(&config, vec![mine, extra], &[]);
    assert_eq!(server.wait_exit().code(), Some(4));
    server.wait_log(&format!("tcp://{extra_addr}"));
}

#[test]
fn a_port_that_cannot_be_bound_fails_start_up_and_is_retried_at_reload() {
    let (held, held_addr) = tcp_listener("127.0.0.81");
    let config =
        format!("[service.busy]\nexec = [\"{{SMALL}}\"]\nlisten = {{ echo = \"{held_addr}\" }}\n");
    let mut server = Server::start_with(&config, vec![], &[]);
    assert_eq!(
        server.wait_exit().code(),
        Some(4),
        "cannot bind: exit code 4"
    );
    let line = server.wait_log("cannot listen on");
    assert!(
        line.contains("busy") && line.contains(&held_addr.to_string()),
        "{line}"
    );

    // At reload, the same failure is logged and retried while the rest keeps serving.
    let (l, addr) = tcp_listener("127.0.0.1");
    let base = format!(
        "[service.ok]\nexec = [\"{{SMALL}}\", \"--idle-timeout=30s\"]\nlisten = {{ echo = \"{addr}\" }}\n"
    );
    let server = Server::start(&base, vec![l]);
    server.reload(&format!(
        "{base}[service.busy]\nexec = [\"{{SMALL}}\"]\nlisten = {{ echo = \"{held_addr}\" }}\n"
    ));
    server.wait_log("will retry");
    assert_eq!(echo(addr, "others serve").unwrap(), "others serve");
    drop(held);
    server.wait_log(&format!("busy: listening on tcp://{held_addr}"));
    assert_eq!(echo(held_addr, "bound at last").unwrap(), "bound at last");
}

#[test]
fn a_rate_limit_applies_to_activations() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = r#"
        [service.once]
        exec = ["{PYTHON}", "{DIR}/reporter.py"]
        env = { IDLE = "0.05" }
        rate = "1/2s"
        listen = "ADDR"
        "#
    .replace("ADDR", &addr.to_string());
    let server = Server::start(&config, vec![l]);
    json(&read_line(addr).unwrap().0);
    server.wait_log("exited 0");
    // The second activation waits for the next token instead of starting at once.
    let r = json(&read_line(addr).unwrap().0);
    assert!(r["pid"].as_i64().is_some());
    server.wait_log("rate limit 1/2.0s reached");
    assert_eq!(server.count_log("started pid"), 2);
}
