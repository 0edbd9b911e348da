//! SIGHUP: a reload is a diff, applied only when the whole new file is valid, and never
//! refuses a connection to a service that did not change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::harness::*;

#[test]
fn reload_applies_a_diff_under_load_without_refusing_anyone() {
    let (steady, steady_addr) = tcp_listener("127.0.0.1");
    let (chg, chg_addr) = tcp_listener("127.0.0.1");
    let (mover, mover_addr) = tcp_listener("127.0.0.1");
    let (gone, gone_addr) = tcp_listener("127.0.0.1");
    let moved_port = probe_port("127.0.0.71");
    let new_port = probe_port("127.0.0.72");
    let before = format!(
        r#"
        [service.steady]
        exec = ["{{SMALL}}", "--idle-timeout=60s"]
        listen = {{ echo = "{steady_addr}" }}
        [service.chg]
        mode = "nowait"
        exec = ["{{SMALL}}", "--inetd", "echo"]
        listen = "{chg_addr}"
        [service.mover]
        mode = "nowait"
        exec = ["{{SMALL}}", "--inetd", "echo"]
        listen = "{mover_addr}"
        [service.gone]
        exec = ["{{SMALL}}", "--idle-timeout=60s"]
        listen = {{ echo = "{gone_addr}" }}
        "#
    );
    let after = format!(
        r#"
        [service.steady]
        exec = ["{{SMALL}}", "--idle-timeout=60s"]
        listen = {{ echo = "{steady_addr}" }}
        [service.chg]
        mode = "nowait"
        exec = ["{{SMALL}}", "--inetd", "daytime"]
        listen = "{chg_addr}"
        [service.mover]
        mode = "nowait"
        exec = ["{{SMALL}}", "--inetd", "echo"]
        listen = "127.0.0.71:{moved_port}"
        [service.new]
        mode = "nowait"
        exec = ["{{SMALL}}", "--inetd", "echo"]
        listen = "127.0.0.72:{new_port}"
        "#
    );
    let server = Server::start(&before, vec![steady, chg, mover, gone]);
    assert_eq!(echo(gone_addr, "activate").unwrap(), "activate");
    assert_eq!(echo(chg_addr, "echo before").unwrap(), "echo before");

    // Steady load on the unchanged service for the whole reload.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match echo(steady_addr, "load") {
                        Ok(l) if l == "load" => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    wait_until("some load", || ok.load(Ordering::Relaxed) > 50);

    server.reload(&after);
    let summary = server.wait_log("reload: 1 kept");
    assert!(summary.contains("1 added (new)"), "{summary}");
    assert!(summary.contains("2 changed (chg, mover)"), "{summary}");
    assert!(summary.contains("1 removed (gone)"), "{summary}");
    server.wait_log("gone: removed; SIGTERM to pid");

    // Changed exec applies at the next spawn; moved and added listen where they should.
    let daytime = read_all(chg_addr).unwrap();
    assert!(
        String::from_utf8_lossy(&daytime).contains(':'),
        "daytime, not echo: {daytime:?}"
    );
    let moved: SocketAddr = format!("127.0.0.71:{moved_port}").parse().unwrap();
    assert_eq!(echo(moved, "moved").unwrap(), "moved");
    assert!(
        echo(mover_addr, "old").is_err(),
        "the old address is closed"
    );
    assert!(
        echo(gone_addr, "gone?").is_err(),
        "a removed service's socket is closed"
    );
    let added: SocketAddr = format!("127.0.0.72:{new_port}").parse().unwrap();
    assert_eq!(echo(added, "added").unwrap(), "added");

    // A broken file changes nothing.
    server.reload("[service.steady]\nexec = []\nbogus = 1\n");
    server.wait_log("keeping the running configuration");
    assert_eq!(echo(added, "still").unwrap(), "still");

    let before_stop = ok.load(Ordering::Relaxed);
    wait_until("more load after the reloads", || {
        ok.load(Ordering::Relaxed) > before_stop + 20
    });
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no connection to the unchanged service failed"
    );
    assert_eq!(
        server.count_log("steady: started pid"),
        1,
        "the unchanged process kept running"
    );
}

/// A reload that adds an address to a running wait-mode service, and changes its socket
/// options, is in effect at once: the running process (busy with a client that stays) is
/// asked to drain, the next connection to the new address starts a new process with the new
/// set, the old client is still served, and the kept Unix socket gets its new mode.
#[test]
fn a_running_wait_service_gets_its_new_sockets_at_once() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    let (first, first_addr) = tcp_listener("127.0.0.1");
    let second_port = probe_port("127.0.0.73");
    let config = |extra: &str, mode: &str| {
        format!(
            "[service.echo]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\", \"--protocol\", \"echo\"]\nlisten = [\"{first_addr}\", \"unix:{{DIR}}/echo.sock\"{extra}]\nsocket_mode = \"{mode}\"\nbacklog = 128\n"
        )
    };
    let server = Server::start(&config("", "0600"), vec![first]);
    let sock = server.dir.path().join("echo.sock");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    // A client that stays connected keeps the first process busy.
    let mut busy = std::net::TcpStream::connect(first_addr).unwrap();
    busy.write_all(b"one\n").unwrap();
    let mut reader = BufReader::new(busy.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "one\n");
    let first_pid = server.wait_log("echo: started pid");

    server.reload(&config(&format!(", \"127.0.0.73:{second_port}\""), "0660"));
    server.wait_log("its sockets changed; SIGTERM to pid");
    let t0 = std::time::Instant::now();
    let second: SocketAddr = format!("127.0.0.73:{second_port}").parse().unwrap();
    assert_eq!(echo(second, "two").unwrap(), "two");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "the new address answered after {:?}",
        t0.elapsed()
    );
    assert_eq!(server.count_log("echo: started pid"), 2, "{first_pid}");
    assert_eq!(
        mode(&sock),
        0o660,
        "socket_mode re-applied to the kept socket"
    );
    // The old process still serves the client it had.
    busy.write_all(b"still\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "still\n");
}
