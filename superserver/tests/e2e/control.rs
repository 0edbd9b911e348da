//! The control socket and the metrics endpoint, through the real binary: `superserver status`,
//! `reload` and `stop`; counters checked against what the clients counted; peers that may not
//! steer; hostile clients; a second superserver on the same path; `promtool` on the metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn service<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// A config with a control socket in the test's directory.
fn with_control(rest: &str) -> String {
    format!("[superserver]\ncontrol = \"{{DIR}}/ctl\"\n{rest}")
}

/// N connections of which D come from a denied address: `status` says N accepted, D denied,
/// N - D spawned and exited 0, exactly; the counters survive a reload.
#[test]
fn counters_equal_what_the_clients_counted() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = with_control(&format!(
        "[service.cat]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"hi\"]\nlisten = \"{addr}\"\ndeny = [\"127.0.0.66\"]\n"
    ));
    let server = Server::start(&config, vec![l]);
    let control = server.dir.path().join("ctl");
    let (n, d) = (30u64, 7u64);
    for k in 0..n {
        let from = if k < d { "127.0.0.66" } else { "127.0.0.2" };
        let mut s = connect_from(from, addr).unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
    }
    wait_until("every child reaped", || {
        service(&status_json(&control), "cat")["counters"]["exits"]["ok"] == n - d
    });
    let status = status_json(&control);
    let c = &service(&status, "cat")["counters"];
    assert_eq!(c["accepted"], n, "{c}");
    assert_eq!(c["refused"]["deny"], d, "{c}");
    assert_eq!(c["spawned"], n - d, "{c}");
    assert_eq!(c["exits"]["failed"], 0);
    assert_eq!(status["version"], 1);
    // A reload keeps them.
    let out = ctl(&["reload"], &control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded: 1 (cat) kept"));
    let again = status_json(&control);
    assert_eq!(service(&again, "cat")["counters"]["accepted"], n);
}

/// The human table, a service's detail, a wait-mode service's state and pids.
#[test]
fn status_tells_state_processes_and_sockets() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = with_control(&format!(
        "[service.day]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\", \"--protocol\", \"daytime\"]\nlisten = \"{addr}\"\n"
    ));
    let server = Server::start(&config, vec![l]);
    let control = server.dir.path().join("ctl");
    let before = status_json(&control);
    assert_eq!(service(&before, "day")["state"], "listening");
    read_line(addr).unwrap();
    server.wait_log("day: started pid");
    let after = status_json(&control);
    let day = service(&after, "day");
    assert_eq!(day["state"], "running");
    assert_eq!(day["live"], 1);
    assert_eq!(day["pids"].as_array().unwrap().len(), 1);
    assert_eq!(day["counters"]["activations"], 1);
    assert_eq!(day["listeners"][0]["address"], format!("tcp://{addr}"));
    let out = ctl(&["status", "day"], &control);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(text.contains("day      wait  running  1/1"), "{text}");
    assert!(
        text.contains(&format!("tcp://{addr} (day), 0 queued")),
        "{text}"
    );
    let out = ctl(&["status", "nosuch"], &control);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such service"));
}

/// `reload` answers: what changed, or every error with file and line (exit 3, the running
/// configuration stays); `stop` drains and the superserver exits 0.
#[test]
fn reload_answers_and_stop_drains() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let base = format!(
        "[service.a]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"a\"]\nlisten = \"{addr}\"\n"
    );
    let mut server = Server::start(&with_control(&base), vec![l]);
    let control = server.dir.path().join("ctl");
    let extra = probe_port("127.0.0.1");
    std::fs::write(
        &server.config,
        format!(
            "[superserver]\ncontrol = \"{}\"\n{}allow_root = true\n[service.b]\nallow_root = true\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"b\"]\nlisten = \"127.0.0.1:{extra}\"\n",
            control.display(),
            base.replace("\"a\"", "\"a2\"")
        ),
    )
    .unwrap();
    let out = ctl(&["reload"], &control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 (b) added"), "{said}");
    assert!(said.contains("1 (a) changed"), "{said}");
    std::fs::write(&server.config, "[service.broken]\nexec = \"cat\"\n").unwrap();
    let out = ctl(&["reload"], &control);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("superserver.toml:2:8: service.broken.exec"),
        "{err}"
    );
    assert!(err.contains("the running configuration stays"), "{err}");
    let (line, _) = read_line(addr).unwrap();
    assert_eq!(line.trim(), "a2", "still serving, as reloaded");
    // Reloads asked at once, with a SIGHUP among them: the file is read on the reload
    // thread, and every control client gets its answer.
    std::fs::write(
        &server.config,
        format!(
            "[superserver]\ncontrol = \"{}\"\n{base}allow_root = true\n",
            control.display()
        ),
    )
    .unwrap();
    let asks: Vec<_> = (0..4)
        .map(|_| {
            let control = control.clone();
            std::thread::spawn(move || ctl(&["reload"], &control))
        })
        .collect();
    server.signal(libc::SIGHUP);
    for ask in asks {
        let out = ask.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("reloaded:"));
    }
    let (line, _) = read_line(addr).unwrap();
    assert_eq!(line.trim(), "a", "reloaded back");
    let out = ctl(&["stop", "--grace", "2s"], &control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(!control.exists(), "the control socket is removed at exit");
}

/// Another uid cannot connect (mode 0600); with `control_group` its members may read
/// `status` but not steer: a clear answer and a log line.
#[test]
fn peers_that_may_not_steer_are_told_so() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let base =
        format!("[service.a]\nmode = \"nowait\"\nexec = [\"/bin/true\"]\nlisten = \"{addr}\"\n");
    let server = Server::start(&with_control(&base), vec![l]);
    let control = server.dir.path().join("ctl");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str], control: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(superserver_bin())
            .args(args)
            .arg("--control")
            .arg(control)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status"], &control);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    drop(server);

    let (l, addr) = tcp_listener("127.0.0.1");
    let base = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\ncontrol_group = \"nogroup\"\n[service.a]\nmode = \"nowait\"\nexec = [\"/bin/true\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&base, vec![l]);
    let control = server.dir.path().join("ctl");
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_nobody(&["status"], &control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = as_nobody(&["reload"], &control);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied: uid 65534 may not reload"),
        "{err}"
    );
    server.wait_log("control: uid 65534");
}

/// Clients that send nothing, send garbage, send too much, or never read cannot block the
/// loop: a well-behaved status still answers at once, and services keep serving.
#[test]
fn hostile_control_clients_cannot_stall_the_loop() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let base = format!(
        "[service.a]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"up\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&with_control(&base), vec![l]);
    let control = server.dir.path().join("ctl");
    let mut silent: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&control).unwrap())
        .collect();
    let mut garbage = UnixStream::connect(&control).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    garbage.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("not a superserver/1 request"), "{answer}");
    let mut flood = UnixStream::connect(&control).unwrap();
    let _ = flood.write_all(&vec![b'x'; 64 * 1024]);
    // Never reads its (large) answers.
    let mut deaf: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = UnixStream::connect(&control).unwrap();
            s.write_all(b"superserver/1 status\n").unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    let status = status_json(&control);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(status["ok"], true);
    let (line, _) = read_line(addr).unwrap();
    assert_eq!(line.trim(), "up");
    // Past the cap, a client is told the superserver is busy, not left hanging.
    let more: Vec<UnixStream> = (0..40)
        .filter_map(|_| UnixStream::connect(&control).ok())
        .collect();
    let mut last = UnixStream::connect(&control).unwrap();
    last.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut busy = String::new();
    let _ = last.read_to_string(&mut busy);
    assert!(busy.contains("busy"), "{busy:?}");
    drop((more, silent.drain(..), deaf.drain(..)));
    // The silent ones are dropped at their deadline; the loop was never idle-blocked.
    wait_until("status again", || {
        ctl(&["status"], &control).status.code() == Some(0)
    });
}

/// A second superserver whose control path a live one holds serves anyway, without a control
/// socket, and says so; a stale socket file of a killed one is replaced.
#[test]
fn a_second_superserver_and_a_stale_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let control: PathBuf = dir.path().join("ctl");
    let (l1, a1) = tcp_listener("127.0.0.1");
    let (l2, a2) = tcp_listener("127.0.0.1");
    let cfg = |addr| {
        format!(
            "[superserver]\ncontrol = \"{}\"\n[service.a]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"x\"]\nlisten = \"{addr}\"\n",
            control.display()
        )
    };
    let first = Server::start(&cfg(a1), vec![l1]);
    first.wait_log("control: listening on");
    let second = Server::start(&cfg(a2), vec![l2]);
    second.wait_log("running without a control socket");
    assert_eq!(
        read_line(a2).unwrap().0.trim(),
        "x",
        "the second one serves"
    );
    let pid = status_json(&control)["pid"].as_u64().unwrap();
    assert_eq!(
        pid as i32, first.pid,
        "the control socket is still the first one's"
    );
    drop(second);
    first.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        control.exists(),
        "a killed superserver leaves its socket file"
    );
    let (l3, a3) = tcp_listener("127.0.0.1");
    let third = Server::start(&cfg(a3), vec![l3]);
    third.wait_log("control: listening on");
    assert_eq!(
        status_json(&control)["pid"].as_u64().unwrap() as i32,
        third.pid
    );
}

/// `metrics`: Prometheus' text format, counters that match, and `promtool check metrics`
/// finds nothing to fix.
#[test]
fn metrics_pass_promtool() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let port = probe_port("127.0.0.1");
    let config = format!(
        "[superserver]\ncontrol = false\nmetrics = \"127.0.0.1:{port}\"\n[service.m]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"m\"]\nlisten = \"{addr}\"\ndeny = [\"127.0.0.66\"]\n"
    );
    let server = Server::start(&config, vec![l]);
    server.wait_log("metrics: serving");
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.66"] {
        let mut s = connect_from(from, addr).unwrap();
        let _ = s.read_to_string(&mut String::new());
    }
    server.wait_log_n("m: 127.0.0.2", 2);
    let scrape = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let text = scrape();
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap().to_string();
    assert!(
        body.contains("superserver_connections_accepted_total{service=\"m\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("superserver_refused_total{service=\"m\",reason=\"deny\"} 1"),
        "{body}"
    );
    let promtool = ["promtool", "../target/tools/prometheus/usr/bin/promtool"]
        .into_iter()
        .map(|p| {
            if p.contains('/') {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
            } else {
                PathBuf::from(p)
            }
        })
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .expect("promtool (scripts/test unpacks it into target/tools)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 404"), "{text}");
}
