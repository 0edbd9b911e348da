//! Taking over an inetd host: classic inetd programs (Debian's `in.tftpd` in wait mode with the
//! socket on stdin, fetched with tftp-hpa's client; `git daemon --inetd` cloned with `git
//! clone git://`), drop-in files, `enable = false`, several wait-mode instances,
//! `max_duration` and `log_peer`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn have(program: &str) -> bool {
    Path::new(program).exists()
}

/// `in.tftpd` from tftpd-hpa is a UDP *wait* service: it reads the first request from the
/// socket on its stdin. Two files fetched with tftp-hpa's client, the second by the same or a
/// new process, byte for byte.
#[test]
fn tftpd_serves_files_through_the_socket_on_stdin() {
    assert!(
        have("/usr/sbin/in.tftpd") && have("/usr/bin/tftp"),
        "tftpd-hpa and tftp-hpa are needed (scripts/test installs them)"
    );
    let (sock, addr) = udp_socket("127.0.0.1");
    let config = format!(
        "[service.tftp]\nhandoff = \"stdin\"\nexec = [\"/usr/sbin/in.tftpd\", \"--user\", \"nobody\", \"--secure\", \"--timeout\", \"2\", \"{{DIR}}/srv\"]\nlisten = \"udp://{addr}\"\n"
    );
    let server = Server::start(&config, vec![sock]);
    let srv = server.dir.path().join("srv");
    std::fs::create_dir(&srv).unwrap();
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(srv.join("boot.img"), &payload).unwrap();
    std::fs::write(srv.join("motd"), "hello over tftp\n").unwrap();
    for f in ["boot.img", "motd"] {
        std::fs::set_permissions(srv.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = server.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for name in ["boot.img", "motd"] {
        let dest = out.join(name);
        let status = Command::new("/usr/bin/tftp")
            .args([
                "-m",
                "binary",
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .args(["-c", "get", name])
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success(), "tftp get {name}");
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(srv.join(name)).unwrap(),
            "{name} byte for byte"
        );
    }
    let started = server.wait_log("tftp: started pid");
    assert!(started.contains("with 1 socket(s)"), "{started}");
    // No LISTEN_* for an inetd program; it exits after its --timeout and is started again.
    server.wait_log("tftp: pid ");
    let dest = out.join("again");
    let status = Command::new("/usr/bin/tftp")
        .args([
            "-m",
            "binary",
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .args(["-c", "get", "motd"])
        .arg(&dest)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "hello over tftp\n");
}

/// `git daemon --inetd` is a nowait service; `git clone git://` gets the repository.
#[test]
fn git_daemon_serves_a_clone_in_nowait_mode() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.git]\nmode = \"nowait\"\nuser = \"nobody\"\nexec = [\"/usr/bin/git\", \"daemon\", \"--inetd\", \"--export-all\", \"--base-path={{DIR}}/git\", \"{{DIR}}/git\"]\nlisten = \"{addr}\"\nenv = {{ HOME = \"/tmp\" }}\n"
    );
    let server = Server::start(&config, vec![l]);
    let dir = server.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let out = Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "served by the superserver\n").unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    std::fs::create_dir(dir.join("git")).unwrap();
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            "git/repo.git",
        ],
        dir,
    );
    // The daemon runs as nobody: the repository must be nobody's (git refuses another
    // owner's repository).
    Command::new("chown")
        .args(["-R", "nobody:", dir.join("git").to_str().unwrap()])
        .status()
        .unwrap();
    let url = format!("git://{addr}/repo.git");
    git(&["clone", "-q", &url, "clone"], dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("clone/README")).unwrap(),
        "served by the superserver\n"
    );
    server.wait_log_all(&["git: 127.0.0.1:", "exited 0"]);
}

/// Drop-in files: a file added to the directory and a SIGHUP start its service, a removed
/// one stops it, a bad one leaves the running set untouched; `enable = false` binds nothing.
#[test]
fn drop_in_files_come_and_go_with_a_reload() {
    let (l, main_addr) = tcp_listener("127.0.0.1");
    let extra = probe_port("127.0.0.1");
    let off = probe_port("127.0.0.1");
    let main = format!(
        "[superserver]\ninclude = [\"superserver.d/*.toml\"]\n[service.main]\nmode = \"nowait\"\nexec = [\"{{SMALL}}\", \"--inetd\", \"echo\"]\nlisten = \"{main_addr}\"\n"
    );
    let server = Server::start(&main, vec![l]);
    let dropins = server.dir.path().join("superserver.d");
    std::fs::create_dir(&dropins).unwrap();
    let extra_addr: SocketAddr = format!("127.0.0.1:{extra}").parse().unwrap();
    let off_addr: SocketAddr = format!("127.0.0.1:{off}").parse().unwrap();
    std::fs::write(
        dropins.join("50-extra.toml"),
        format!(
            "[service.extra]\nmode = \"nowait\"\nuser_if_root = \"nobody\"\nexec = [\"{}\", \"--inetd\", \"echo\"]\nlisten = \"{extra_addr}\"\n\n[service.off]\nenable = false\nmode = \"nowait\"\nuser_if_root = \"nobody\"\nexec = [\"/bin/cat\"]\nlisten = \"{off_addr}\"\n",
            small_services_bin().display()
        ),
    )
    .unwrap();
    server.signal(libc::SIGHUP);
    server.wait_log("reload: 1 kept, 1 added (extra)");
    assert_eq!(
        echo(extra_addr, "from a drop-in").unwrap(),
        "from a drop-in"
    );
    assert!(
        TcpStream::connect(off_addr).is_err(),
        "a disabled service binds nothing"
    );
    // A bad drop-in: the whole set is rejected and everything keeps serving.
    std::fs::write(
        dropins.join("60-bad.toml"),
        "[service.bad]\nexec = \"cat\"\n",
    )
    .unwrap();
    server.signal(libc::SIGHUP);
    let line = server.wait_log("60-bad.toml:");
    assert!(line.contains("service.bad"), "{line}");
    server.wait_log("keeping the running configuration");
    assert_eq!(echo(extra_addr, "still").unwrap(), "still");
    std::fs::remove_file(dropins.join("60-bad.toml")).unwrap();
    std::fs::remove_file(dropins.join("50-extra.toml")).unwrap();
    server.signal(libc::SIGHUP);
    server.wait_log("1 removed (extra)");
    assert!(
        TcpStream::connect(extra_addr).is_err(),
        "removed with its file"
    );
    assert_eq!(echo(main_addr, "main").unwrap(), "main");
}

/// A wait-mode program that serves one connection at a time: its pid, then a pause.
const ONE_AT_A_TIME: &str = r#"
import os, socket, time
listener = socket.socket(fileno=3)
listener.settimeout(3)
while True:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        break
    conn.sendall(b"%d\n" % os.getpid())
    time.sleep(0.6)
    conn.close()
"#;

/// `instances = 3`: concurrent clients are served by up to three processes sharing the
/// listening socket, never more.
#[test]
fn several_wait_instances_share_the_socket() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.pool]\ninstances = 3\nexec = [\"{{PYTHON}}\", \"{{DIR}}/one.py\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&config, vec![l]);
    std::fs::write(server.dir.path().join("one.py"), ONE_AT_A_TIME).unwrap();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out.trim().to_string()
            })
        })
        .collect();
    let pids: std::collections::HashSet<String> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(pids.len() >= 2, "served by more than one process: {pids:?}");
    assert!(pids.len() <= 3, "at most `instances` processes: {pids:?}");
    assert!(server.count_log("pool: started pid") <= 3);
}

/// `max_duration`: a nowait child that runs too long gets SIGTERM, and the client is let go.
#[test]
fn max_duration_ends_a_hung_child() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.hang]\nmode = \"nowait\"\nmax_duration = \"300ms\"\nexec = [\"/bin/sleep\", \"60\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&config, vec![l]);
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    server.wait_log("(max_duration); SIGTERM");
    server.wait_log_all(&["hang: ", "killed by SIGTERM"]);
}

/// `log_peer = "none"`: no client address in any of the superserver's lines, refusals
/// included; `"masked"` shows the /24.
#[test]
fn log_peer_keeps_client_addresses_out_of_the_log() {
    for (how, shown) in [("none", None), ("masked", Some("127.0.0.0/24"))] {
        let (l, addr) = tcp_listener("127.0.0.1");
        let config = format!(
            "[service.quiet]\nmode = \"nowait\"\nlog_peer = \"{how}\"\nexec = [\"/bin/echo\", \"hi\"]\nlisten = \"{addr}\"\ndeny = [\"127.0.0.66\"]\n"
        );
        let mut server = Server::start(&config, vec![l]);
        let (line, _c) = read_line(addr).unwrap();
        assert_eq!(line.trim(), "hi");
        let mut denied = connect_from("127.0.0.66", addr).unwrap();
        let _ = denied.write_all(b"x");
        server.wait_log("denied by allow/deny");
        server.wait_log("quiet: ");
        server.wait_log_all(&["quiet:", "exited 0"]);
        server.signal(libc::SIGTERM);
        server.wait_exit();
        let log = server.log.lock().unwrap().join("\n");
        let after_ready = log.split("ready").nth(1).unwrap_or("");
        assert!(
            !after_ready.contains("127.0.0.1:") && !after_ready.contains("127.0.0.66"),
            "{how}: a client address in the log:\n{log}"
        );
        if let Some(shown) = shown {
            assert!(log.contains(shown), "{how}: {log}");
        }
    }
}
