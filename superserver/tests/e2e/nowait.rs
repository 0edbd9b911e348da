//! Nowait mode: one process per connection, with the peer in its environment, limits, access
//! rules and privileges applied before any fork.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;

fn nowait(extra: &str, addr: SocketAddr) -> String {
    format!(
        "[service.rep]\nmode = \"nowait\"\nexec = [\"{{PYTHON}}\", \"{{DIR}}/reporter.py\", \"--inetd\"]\nlisten = \"{addr}\"\n{extra}\n"
    )
}

#[test]
fn each_connection_gets_a_process_with_the_peer_in_its_environment() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start(&nowait("", addr), vec![l]);
    let a = connect_from("127.0.0.2", addr).unwrap();
    let b = connect_from("127.0.0.3", addr).unwrap();
    let (ra, rb) = (json(&line_of(&a).unwrap()), json(&line_of(&b).unwrap()));
    assert_ne!(ra["pid"], rb["pid"], "one process per connection");
    let env = &ra["env"];
    assert_eq!(env["PROTO"], "TCP");
    assert_eq!(env["TCPREMOTEIP"], "127.0.0.2");
    assert_eq!(env["REMOTE_ADDR"], "127.0.0.2");
    let port = a.local_addr().unwrap().port().to_string();
    assert_eq!(env["TCPREMOTEPORT"], port);
    assert_eq!(env["REMOTE_PORT"], port);
    assert_eq!(env["TCPLOCALIP"], "127.0.0.1");
    assert_eq!(env["TCPLOCALPORT"], addr.port().to_string());
    assert!(env.get("LISTEN_FDS").is_none());
    assert_eq!(
        ra["fds"],
        serde_json::json!([0, 1, 2]),
        "the connection on stdin/stdout only"
    );
    assert_eq!(rb["env"]["TCPREMOTEIP"], "127.0.0.3");
    drop((a, b));
    server.wait_log_n("exited 0", 2);
    server.wait_log_all(&["rep: 127.0.0.2:", " pid ", "exited 0 after"]);
}

#[test]
fn connection_passed_as_fd3_with_listen_fds() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.echo]\nmode = \"nowait\"\nconnection = \"listen-fds\"\nexec = [\"{{SMALL}}\", \"--protocol\", \"echo\"]\nlisten = \"{addr}\"\n"
    );
    let _server = Server::start(&config, vec![l]);
    assert_eq!(echo(addr, "via fd 3").unwrap(), "via fd 3");
}

#[test]
fn echo_and_daytime_through_nowait_with_nc() {
    let (l1, echo_addr) = tcp_listener("127.0.0.1");
    let (l2, day_addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.echo]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = \"{echo_addr}\"\n\
         [service.daytime]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"daytime\"]\nlisten = \"{day_addr}\"\n"
    );
    let _server = Server::start(&config, vec![l1, l2]);
    let out = std::process::Command::new("nc")
        .args([
            "-q",
            "1",
            "-w",
            "5",
            "127.0.0.1",
            &echo_addr.port().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"hello nc\n")?;
            c.wait_with_output()
        })
        .expect("nc (netcat-openbsd) is needed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello nc\n");
    let out = std::process::Command::new("nc")
        .args(["-d", "-w", "5", "127.0.0.1", &day_addr.port().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\r\n") && text.len() > 10,
        "daytime: {text:?}"
    );
}

#[test]
fn max_instances_hold_keeps_the_next_client_waiting_until_one_exits() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start(&nowait("max_instances = 2", addr), vec![l]);
    let a = connect_from("127.0.0.1", addr).unwrap();
    let b = connect_from("127.0.0.1", addr).unwrap();
    line_of(&a).unwrap();
    line_of(&b).unwrap();
    let c = connect_from("127.0.0.1", addr).unwrap(); // completes in the kernel backlog
    server.wait_log("max_instances (2) reached; new clients wait");
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(line_of(&c).is_err(), "no answer while at the cap");
    c.set_read_timeout(Some(WAIT)).unwrap();
    drop(a);
    let r = json(&line_of(&c).unwrap());
    assert!(r["pid"].as_i64().is_some(), "served once a slot freed");
    server.wait_log("below max_instances, accepting again");
}

#[test]
fn max_instances_close_closes_the_extra_client_at_once() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start(
        &nowait("max_instances = 1\noverflow = \"close\"", addr),
        vec![l],
    );
    let a = connect_from("127.0.0.1", addr).unwrap();
    line_of(&a).unwrap();
    let b = connect_from("127.0.0.1", addr).unwrap();
    assert_eq!(line_of(&b).unwrap(), "", "closed without an answer");
    server.wait_log("max_instances (1) reached; closed");
}

#[test]
fn max_per_source_limits_each_client_address() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start(&nowait("max_per_source = 1", addr), vec![l]);
    let a = connect_from("127.0.0.2", addr).unwrap();
    line_of(&a).unwrap();
    let a2 = connect_from("127.0.0.2", addr).unwrap();
    assert_eq!(
        line_of(&a2).unwrap(),
        "",
        "second connection from the same source closed"
    );
    server.wait_log("(max_per_source); closed");
    let b = connect_from("127.0.0.3", addr).unwrap();
    assert!(
        json(&line_of(&b).unwrap())["pid"].as_i64().is_some(),
        "another source is served"
    );
    drop(a);
    server.wait_log_all(&["rep: 127.0.0.2:", "exited"]);
    let a3 = connect_from("127.0.0.2", addr).unwrap();
    assert!(
        json(&line_of(&a3).unwrap())["pid"].as_i64().is_some(),
        "the slot came back"
    );
}

#[test]
fn rate_suspends_the_service_and_it_recovers_by_itself() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start(&nowait("rate = \"2/1s\"", addr), vec![l]);
    let first: Vec<_> = (0..2)
        .map(|_| connect_from("127.0.0.1", addr).unwrap())
        .collect();
    for c in &first {
        line_of(c).unwrap();
    }
    let third = connect_from("127.0.0.1", addr).unwrap();
    server.wait_log("rate limit 2/1.0s reached");
    let r = json(&line_of(&third).unwrap());
    assert!(r["pid"].as_i64().is_some(), "served after the pause");
    server.wait_log("rate limit no longer reached");
}

#[test]
fn a_denied_peer_is_closed_without_spawning_anything() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let rules = "allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.66/32\"]";
    let server = Server::start(&nowait(rules, addr), vec![l]);
    let ok = connect_from("127.0.0.2", addr).unwrap();
    line_of(&ok).unwrap();
    for _ in 0..5 {
        let denied = connect_from("127.0.0.66", addr).unwrap();
        assert_eq!(line_of(&denied).unwrap(), "", "denied: closed at once");
    }
    // A flood of refusals is one line a second, with a count of the rest.
    server.wait_log("127.0.0.66");
    std::thread::sleep(Duration::from_millis(1100));
    let denied = connect_from("127.0.0.66", addr).unwrap();
    assert_eq!(line_of(&denied).unwrap(), "");
    server.wait_log("denied by allow/deny; closed (and 4 more refused since the last such line)");
    assert_eq!(server.count_log("denied by allow/deny"), 2);
    assert_eq!(
        server.count_log(" → pid "),
        1,
        "only the allowed client cost a process"
    );
}

#[test]
fn user_nobody_and_process_settings_reach_the_child() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let extra =
        "user = \"nobody\"\nworking_directory = \"/tmp\"\numask = \"027\"\nlimit_nofile = 77";
    let server = Server::start(&nowait(extra, addr), vec![l]);
    // The reporter lives in the private temporary directory; let nobody read it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        server.dir.path().join("reporter.py"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let c = connect_from("127.0.0.1", addr).unwrap();
    let r = json(&line_of(&c).unwrap());
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(r["uid"].as_u64().unwrap(), u64::from(nobody.uid.as_raw()));
    assert_eq!(r["gid"].as_u64().unwrap(), u64::from(nobody.gid.as_raw()));
    assert_eq!(
        r["groups"],
        serde_json::json!([nobody.gid.as_raw()]),
        "supplementary groups of nobody"
    );
    assert_eq!(r["env"]["USER"], "nobody");
    assert_eq!(r["cwd"], "/tmp");
    assert_eq!(r["umask"].as_u64().unwrap(), 0o027);
    assert_eq!(r["nofile"].as_u64().unwrap(), 77);
}

#[test]
fn hostile_clients_do_not_disturb_others() {
    let (l1, nw_addr) = tcp_listener("127.0.0.1");
    let (l2, w_addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.nw]\nmode = \"nowait\"\nmax_instances = 50\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\", \"--connection-timeout=2s\"]\nlisten = \"{nw_addr}\"\n\
         [service.w]\nexec = [\"{{SMALL}}\", \"--idle-timeout=30s\", \"--connection-timeout=2s\"]\nlisten = {{ echo = \"{w_addr}\" }}\n"
    );
    let server = Server::start(&config, vec![l1, l2]);
    let mut hostile = Vec::new();
    for addr in [nw_addr, w_addr] {
        // Connects and never speaks.
        hostile.push(connect_from("127.0.0.5", addr).unwrap());
        // 1 MiB without a newline, not reading the echo.
        let mut big = connect_from("127.0.0.6", addr).unwrap();
        big.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = big.write_all(&vec![b'x'; 1 << 20]);
        hostile.push(big);
        // Resets in the middle of a reply.
        let s = connect_from("127.0.0.7", addr).unwrap();
        let _ = (&s).write_all(&vec![b'y'; 200_000]);
        let mut buf = [0u8; 10];
        let _ = (&s).read(&mut buf);
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    for i in 0..20 {
        assert_eq!(
            echo(nw_addr, &format!("nw {i}")).unwrap(),
            format!("nw {i}")
        );
        assert_eq!(echo(w_addr, &format!("w {i}")).unwrap(), format!("w {i}"));
    }
    drop(hostile);
    assert!(
        proc_state(server.pid).is_some_and(|s| s != 'Z'),
        "superserver alive"
    );
    wait_until("no zombies", || server.zombie_children().is_empty());
}

#[test]
fn signals_a_launcher_ignored_reach_neither_the_superserver_nor_its_children() {
    // A launcher that ignores SIGCHLD and SIGHUP passes that on through exec. Ignored, SIGCHLD
    // would have the kernel reap the children itself: the superserver would never see one
    // exit and, at max_instances = 1, would serve one client only.
    let (l, addr) = tcp_listener("127.0.0.1");
    let server = Server::start_after(
        "trap '' CHLD HUP",
        &nowait("max_instances = 1", addr),
        vec![l],
        &[],
    )
    .expect_ready();
    for n in 1..=3 {
        let c = connect_from("127.0.0.1", addr).unwrap();
        let r = json(&line_of(&c).unwrap());
        drop(c);
        assert_eq!(
            r["sigblk"], 0,
            "connection {n}: no signal blocked in the child"
        );
        let ign = r["sigign"].as_u64().unwrap();
        for (name, sig) in [("SIGHUP", libc::SIGHUP), ("SIGCHLD", libc::SIGCHLD)] {
            assert_eq!(
                ign & (1 << (sig - 1)),
                0,
                "connection {n}: {name} ignored in the child"
            );
        }
        server.wait_log_n("exited 0", n);
    }
    // Idle, it keeps no descriptor of the program open (each start opens it and closes it).
    let program_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().contains("python"))
            .count()
    };
    wait_until("the program's descriptor closed", || program_fds() == 0);
    // And SIGHUP reloads instead of being ignored.
    server.signal(libc::SIGHUP);
    server.wait_log("applied in");
}
