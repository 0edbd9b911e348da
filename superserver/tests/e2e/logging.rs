//! Logging: a reader of stderr that stops reading never stalls the services; the lines that
//! could not be kept are counted and reported once it reads again.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// How long an answer may take while the log reader is stalled ("promptly").
const PROMPT: Duration = Duration::from_secs(3);

/// Kill and reap the superserver however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn echo_within(addr: SocketAddr, line: &str, limit: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out)?;
    Ok(out.trim_end().to_string())
}

#[test]
fn a_stalled_log_reader_never_stalls_the_services_and_drops_are_reported() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("superserver.toml");
    std::fs::write(
        &config,
        format!(
            "[service.echo]\nmode = \"nowait\"\nexec = [\"{}\", \"--inetd\", \"echo\"]\n\
             listen = \"{addr}\"\nallow_root = true\n\
             env = {{ RUST_LOG = \"off\" }}\n",
            small_services_bin().display()
        ),
    )
    .unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh fds owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(superserver_bin())
        .arg("--config")
        .arg(&config)
        .env("SUPERSERVER_CONTROL", dir.path().join("ctl"))
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(w));
    hand_over(&mut cmd, vec![std::os::fd::AsRawFd::as_raw_fd(&l)]);
    let _server = Reaped(cmd.spawn().expect("starting superserver"));
    drop(cmd); // closes our copy of the pipe's write end
    drop(l);

    // The children share this stderr: the echo service is told not to log (a service that
    // logs to a stalled stderr blocks in its own write, which no superserver can prevent).

    // Read until it is ready, then stop reading: the pipe (64 KiB) fills up.
    let mut log = BufReader::new(File::from(r));
    let mut line = String::new();
    let deadline = Instant::now() + WAIT;
    while !line.contains("ready") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "superserver exited");
        assert!(Instant::now() < deadline, "no ready line");
    }

    // Each connection logs two lines of about 90 bytes (its start at debug level, its exit;
    // refusals would be one line a second): 1500 of them are about 270 KB, far more than the
    // pipe and the logger's backlog hold together.
    let mut slowest = Duration::ZERO;
    for i in 0..1500 {
        drop(connect_from("127.0.0.2", addr).unwrap());
        if i % 250 == 249 {
            let start = Instant::now();
            let answer = echo_within(addr, &format!("ping {i}"), PROMPT);
            assert_eq!(
                answer.as_deref().ok(),
                Some(format!("ping {i}").as_str()),
                "no prompt answer after {} connections with the log reader stalled: {answer:?}",
                i + 1
            );
            slowest = slowest.max(start.elapsed());
        }
    }
    eprintln!("slowest answer with the log reader stalled: {slowest:?}");

    // The reader resumes: the backlog comes out, then the notice. (New lines are logged while
    // we wait, in case the loop only flushes when it logs.)
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in log.lines() {
            let Ok(l) = l else { break };
            sink.lock().unwrap().push(l);
        }
    });
    wait_until("a lines-dropped notice", || {
        drop(connect_from("127.0.0.2", addr));
        std::thread::sleep(Duration::from_millis(20));
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("lines dropped"))
    });
    let lines = lines.lock().unwrap();
    let notice = lines.iter().find(|l| l.contains("lines dropped")).unwrap();
    assert!(
        notice.contains(" WARN  logging: ")
            && notice.ends_with(" lines dropped (log reader too slow)"),
        "{notice}"
    );
    let dropped: u64 = notice.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(dropped > 100, "{notice}");
    assert_eq!(
        echo_within(addr, "after", PROMPT).unwrap(),
        "after",
        "still serving"
    );
}

/// One format on one stream: the superserver's lines and its services' lines (which share its
/// stderr) read alike, a wait-mode start is one line however many sockets it gets, and a
/// stop does not claim to watch sockets again.
#[test]
fn one_format_one_line_per_event() {
    let (a, a_addr) = tcp_listener("127.0.0.1");
    let (b, b_addr) = tcp_listener("127.0.0.1");
    let config = format!(
        "[service.small]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\"]\nlisten = {{ echo = \"{a_addr}\", daytime = \"{b_addr}\" }}\nuser_if_root = \"nobody\"\n"
    );
    let mut server = Server::start_with(&config, vec![a, b], &[("RUST_LOG", "info")]);
    assert_eq!(echo(a_addr, "x").unwrap(), "x");
    read_line(b_addr).unwrap();
    server.wait_log("serving 2 socket(s): echo, daytime");
    server.signal(libc::SIGTERM);
    server.wait_exit();
    let log = server.log.lock().unwrap().clone();
    let shape = |l: &str| {
        let mut f = l.splitn(3, ' ');
        let (ts, level) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        ts.len() == 24
            && ts.ends_with('Z')
            && ts.as_bytes()[10] == b'T'
            && ["INFO", "WARN", "ERROR", "DEBUG"].contains(&level)
    };
    for line in &log {
        assert!(
            shape(line),
            "a line in another format: {line:?}\n{}",
            log.join("\n")
        );
    }
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("serving 2 socket(s)"))
            .count(),
        1,
        "{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("listening: echo (echo)")),
        "per-socket lines are debug"
    );
    assert!(
        !log.iter().any(|l| l.contains("watching its sockets again")),
        "a stop does not re-arm: {}",
        log.join("\n")
    );
}
