//! Upgrading in place: `superserver upgrade` (and SIGUSR2) re-execute a new binary in the same
//! process: no connection refused while clients keep coming, the children stay its children,
//! the counters carry on; a new binary that fails its pre-flight leaves the old one serving
//! and the command says why within 2 s.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn an_upgrade_under_load_refuses_nobody_and_keeps_the_children() {
    let (w, wait_addr) = tcp_listener("127.0.0.1");
    let (n, nowait_addr) = tcp_listener("127.0.0.1");
    let (s, slow_addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\n\
         [service.day]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\", \"--protocol\", \"daytime\"]\nlisten = \"{wait_addr}\"\n\
         [service.echo]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"x\"]\nlisten = \"{nowait_addr}\"\n\
         [service.slow]\nmode = \"nowait\"\nexec = [\"/bin/sh\", \"-c\", \"sleep 1; echo late\"]\nlisten = \"{slow_addr}\"\n"
    );
    let server = Server::start(&config, vec![w, n, s]);
    let control = server.dir.path().join("ctl");
    read_line(wait_addr).unwrap();
    let wait_pid = server.wait_log("day: started pid");
    // A nowait child that is still running when the exec happens.
    let mut slow = TcpStream::connect(slow_addr).unwrap();
    server.wait_log("slow: 127.0.0.1:");
    // A copy of the binary: "the new version".
    let new = server.dir.path().join("superserver-new");
    std::fs::copy(superserver_bin(), &new).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = [nowait_addr, wait_addr]
        .into_iter()
        .map(|addr| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match read_line(addr) {
                        Ok((l, _)) if !l.is_empty() => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    wait_until("load", || ok.load(Ordering::Relaxed) > 20);
    let out = ctl(&["upgrade", "--binary", new.to_str().unwrap()], &control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("pid {} (unchanged: true)", server.pid)),
        "{said}"
    );
    let after = ok.load(Ordering::Relaxed);
    wait_until("load after the upgrade", || {
        ok.load(Ordering::Relaxed) > after + 20
    });
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "connections failed during the upgrade"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", server.pid)).unwrap(),
        new,
        "the same process runs the new binary"
    );
    let st = status_json(&control);
    assert_eq!(st["upgrades"], 1);
    let day = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "day")
        .unwrap();
    let pid_text = wait_pid.split("started pid ").nth(1).unwrap();
    let pid: i64 = pid_text.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(
        day["pids"][0], pid,
        "the wait-mode child is still known: {day}"
    );
    assert!(day["counters"]["activations"].as_u64().unwrap() >= 1);
    // The nowait child that lived through the exec is reaped and logged by the new image.
    let mut late = String::new();
    slow.read_to_string(&mut late).unwrap();
    assert_eq!(late.trim(), "late");
    server.wait_log_all(&["slow: 127.0.0.1:", "exited 0"]);
    assert!(server.zombie_children().is_empty());
}

#[test]
fn a_bad_new_binary_leaves_the_old_one_serving() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\n[service.echo]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"x\"]\nlisten = \"{addr}\"\n"
    );
    let server = Server::start(&config, vec![l]);
    let control = server.dir.path().join("ctl");
    // Missing, failing, crashing, and one that rejects the configuration.
    let crash = server.dir.path().join("crash.sh");
    std::fs::write(&crash, "#!/bin/sh\nkill -SEGV $$\n").unwrap();
    let reject = server.dir.path().join("reject.sh");
    std::fs::write(
        &reject,
        "#!/bin/sh\necho 'superserver.toml:1:1: no, thanks' >&2\nexit 3\n",
    )
    .unwrap();
    let hang = server.dir.path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&crash, &reject, &hang] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nonexistent = server.dir.path().join("nonexistent");
    for (binary, why) in [
        (nonexistent.as_path(), "No such file"),
        (Path::new("/bin/false"), "exited 1"),
        (crash.as_path(), "killed by signal 11"),
        (reject.as_path(), "no, thanks"),
        (hang.as_path(), "did not answer within 2s"),
    ] {
        let t0 = Instant::now();
        let out = ctl(&["upgrade", "--binary", binary.to_str().unwrap()], &control);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", binary.display());
        assert!(err.contains(why), "{}: {err}", binary.display());
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        assert_eq!(read_line(addr).unwrap().0.trim(), "x", "still serving");
    }
    assert_eq!(status_json(&control)["upgrades"], 0);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", server.pid)).unwrap(),
        superserver_bin().canonicalize().unwrap()
    );
}

#[test]
fn sigusr2_upgrades_to_the_binary_at_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("superserver");
    std::fs::copy(superserver_bin(), &bin).unwrap();
    let (l, addr) = tcp_listener("127.0.0.1");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[superserver]\ncontrol = \"{}/ctl\"\n[service.echo]\nallow_root = true\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"x\"]\nlisten = \"{addr}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    drop(l);
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let control = dir.path().join("ctl");
    wait_until("control socket", || control.exists());
    // A package upgrade replaces the file: the running image is now "(deleted)".
    let tmp = dir.path().join("superserver.new");
    std::fs::copy(superserver_bin(), &tmp).unwrap();
    std::fs::rename(&tmp, &bin).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) };
    wait_until("the upgrade", || {
        ctl(&["status", "--json"], &control)
            .stdout
            .windows(13)
            .any(|w| w == b"\"upgrades\":1,")
    });
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
    assert_eq!(
        exe, bin,
        "runs the file now at its path, not the deleted one"
    );
    assert_eq!(read_line(addr).unwrap().0.trim(), "x");
    let _ = child.kill();
    let _ = child.wait();
}

/// Upgrades in a row, alternating two builds, while 64 nowait sessions opened before the first
/// one stay open, a source sits at its `max_per_source`, and clients keep using a nowait
/// service, a wait-mode TCP echo and a wait-mode UDP echo: nothing refused or unanswered, each
/// session reaped and logged exactly once, the limit still enforced, counters never backwards.
#[test]
fn upgrades_in_a_row_keep_sessions_limits_and_every_client() {
    let (n, nowait_addr) = tcp_listener("127.0.0.1");
    let (s, sess_addr) = tcp_listener("127.0.0.1");
    let (w, wait_addr) = tcp_listener("127.0.0.1");
    let (u, udp_addr) = udp_socket("127.0.0.1");
    let config = format!(
        "[superserver]\ncontrol = \"{{DIR}}/ctl\"\n\
         [service.quick]\nmode = \"nowait\"\nexec = [\"/bin/echo\", \"q\"]\nlisten = \"{nowait_addr}\"\n\
         [service.sess]\nmode = \"nowait\"\nmax_per_source = 64\nmax_instances = 100\nexec = [\"/bin/cat\"]\nlisten = \"{sess_addr}\"\n\
         [service.echo]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\"]\nlisten = {{ echo = [\"tcp://{wait_addr}\", \"udp://{udp_addr}\"] }}\n"
    );
    let server = Server::start(&config, vec![n, s, w, u]);
    let control = server.dir.path().join("ctl");
    let sessions: Vec<TcpStream> = (0..64)
        .map(|_| connect_from("127.0.0.5", sess_addr).unwrap())
        .collect();
    server.wait_log_n("sess: 127.0.0.5:", 64);
    let builds = [server.dir.path().join("a"), server.dir.path().join("b")];
    for b in &builds {
        std::fs::copy(superserver_bin(), b).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for k in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let good = match k {
                    0 => read_line(nowait_addr)
                        .map(|(l, _)| l.trim() == "q")
                        .unwrap_or(false),
                    1 => echo(wait_addr, "t").map(|l| l == "t").unwrap_or(false),
                    _ => {
                        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        c.send_to(b"u", udp_addr).unwrap();
                        let mut buf = [0u8; 8];
                        matches!(c.recv(&mut buf), Ok(1))
                    }
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    wait_until("load", || ok.load(Ordering::Relaxed) > 30);
    let rounds = 12;
    let mut last_accepted = 0;
    for round in 0..rounds {
        let t0 = Instant::now();
        let out = ctl(
            &["upgrade", "--binary", builds[round % 2].to_str().unwrap()],
            &control,
        );
        assert_eq!(out.status.code(), Some(0), "round {round}: {out:?}");
        // The limit holds right after: the 65th session from the same source is refused.
        let extra = connect_from("127.0.0.5", sess_addr).unwrap();
        assert_eq!(
            line_of(&extra).unwrap(),
            "",
            "round {round}: max_per_source"
        );
        let st = status_json(&control);
        assert_eq!(st["upgrades"], round as u64 + 1);
        let quick = st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "quick")
            .unwrap();
        let accepted = quick["counters"]["accepted"].as_u64().unwrap();
        assert!(accepted >= last_accepted, "counters never go backwards");
        last_accepted = accepted;
        std::thread::sleep(Duration::from_millis(250).saturating_sub(t0.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed during {rounds} upgrades"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    drop(sessions);
    wait_until("64 sessions reaped", || {
        server.count_log("sess: 127.0.0.5:") >= 64 + 64
    });
    std::thread::sleep(Duration::from_millis(300));
    let ends = server.count_log("sess: 127.0.0.5:") - 64 - rounds;
    assert_eq!(ends, 64, "each session's end logged exactly once");
    assert!(server.zombie_children().is_empty());
}
