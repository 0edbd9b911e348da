//! Test harness: build and start the real binaries, hand them sockets the test bound itself,
//! relay and search their logs, and kill and reap them in `Drop`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn superserver_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_superserver"))
}

/// The `small-services` binary of this workspace, built once per test run (cargo sets
/// `CARGO_BIN_EXE_*` only for the package under test, so the other binary is built by escargot
/// into the same target directory, next to the superserver).
pub fn small_services_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let run = escargot::CargoBuild::new()
            .package("small-services")
            .bin("small-services")
            .current_release()
            .run()
            .expect("building small-services");
        run.path().to_path_buf()
    })
}

/// A Python 3 from the system (with python3-systemd), not a pyenv shim.
pub const PYTHON: &str = "/usr/bin/python3";

/// A test service in Python: wait mode takes its sockets with libsystemd's `sd_listen_fds`
/// (python3-systemd), answers each connection with a JSON report of what it was given, and
/// exits when idle; `--inetd` reports on stdout for a nowait connection.
pub const REPORTER: &str = r#"
import json, os, socket, sys, select
env = {k: os.environ.get(k) for k in os.environ}
def fds():
    out = []
    for f in os.listdir('/proc/self/fd'):
        try:
            os.readlink('/proc/self/fd/' + f)
            out.append(int(f))
        except OSError:
            pass
    return sorted(out)
import resource
def report(extra):
    r = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
         "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
         "groups": sorted(os.getgroups()), "env": env, "cwd": os.getcwd(), "umask": 0}
    m = os.umask(0); os.umask(m); r["umask"] = m
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("SigBlk", "SigIgn"):
            r[k.lower()] = int(v.strip(), 16)
    r.update(extra)
    return (json.dumps(r) + "\n").encode()
if len(sys.argv) > 1 and sys.argv[1] == "--inetd":
    before = fds()
    sys.stdout.buffer.write(report({"fds": before}))
    sys.stdout.flush()
    sys.stdin.buffer.read(1)
    sys.exit(0)
before = fds()
from systemd import daemon
listen = daemon.listen_fds()
socks = [socket.socket(fileno=fd) for fd in listen]
idle = float(os.environ.get("IDLE", "1"))
while True:
    r, _, _ = select.select(socks, [], [], idle)
    if not r:
        sys.exit(0)
    for s in r:
        if s.type == socket.SOCK_DGRAM:
            data, peer = s.recvfrom(2048)
            s.sendto(report({"fds": before, "listen_fds": listen}), peer)
        else:
            c, _ = s.accept()
            c.sendall(report({"fds": before, "listen_fds": listen}))
            c.close()
"#;

/// A listening TCP socket on `ip`, port chosen by the kernel, for handing to a superserver.
pub fn tcp_listener(ip: &str) -> (Socket, SocketAddr) {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.bind(&SockAddr::from(addr)).unwrap();
    s.listen(1024).unwrap();
    let local = s.local_addr().unwrap().as_socket().unwrap();
    (s, local)
}

/// A bound UDP socket on `ip` (kernel-chosen port).
pub fn udp_socket(ip: &str) -> (Socket, SocketAddr) {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None).unwrap();
    s.bind(&SockAddr::from(addr)).unwrap();
    let local = s.local_addr().unwrap().as_socket().unwrap();
    (s, local)
}

/// A port that was free a moment ago on `ip`: only for sockets the superserver must bind
/// itself after start-up (reload tests), on an address no other test uses.
pub fn probe_port(ip: &str) -> u16 {
    let (s, a) = tcp_listener(ip);
    drop(s);
    a.port()
}

/// A running superserver with its log.
pub struct Server {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub pid: i32,
}

impl Server {
    /// Write `config` (where `{SMALL}` is replaced by the small-services path and `{DIR}` by a
    /// private temporary directory) and start the superserver with `handed` as its inherited
    /// sockets (`LISTEN_FDS`, `LISTEN_PID` = its pid). Waits until it logs that it is ready.
    pub fn start(config: &str, handed: Vec<Socket>) -> Server {
        Server::start_with(config, handed, &[]).expect_ready()
    }

    /// Like `start`, but do not wait for readiness; `env` is added to its environment.
    pub fn start_with(config: &str, handed: Vec<Socket>, env: &[(&str, &str)]) -> Server {
        Server::start_after("", config, handed, env)
    }

    /// Like `start_with`, the launching shell (bash) running `prelude` first (`trap '' CHLD`,
    /// say: what a launcher does to the superserver's process before it execs).
    pub fn start_after(
        prelude: &str,
        config: &str,
        handed: Vec<Socket>,
        env: &[(&str, &str)],
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("superserver.toml");
        std::fs::write(&path, expand(config, dir.path())).unwrap();
        std::fs::write(dir.path().join("reporter.py"), REPORTER).unwrap();
        // bash for a prelude: dash's `trap '' CHLD` does not reach what it execs.
        let mut cmd = Command::new(if prelude.is_empty() {
            "/bin/sh"
        } else {
            "/bin/bash"
        });
        cmd.arg("-c")
            .arg(format!(
                r#"{prelude}
[ -n "$LISTEN_FDS" ] && export LISTEN_PID=$$; exec "$0" "$@""#
            ))
            .arg(superserver_bin())
            .arg("--config")
            .arg(&path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env("RUST_LOG", "debug")
            // Never the host's /run/superserver: each test's own control socket.
            .env("SUPERSERVER_CONTROL", dir.path().join("ctl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if !handed.is_empty() {
            cmd.env("LISTEN_FDS", handed.len().to_string());
            hand_over(&mut cmd, handed.iter().map(|s| s.as_raw_fd()).collect());
        }
        let mut child = cmd.spawn().expect("starting superserver");
        drop(handed);
        let pid = child.id() as i32;
        let log = Arc::new(Mutex::new(Vec::new()));
        relay(child.stderr.take().unwrap(), log.clone());
        relay(child.stdout.take().unwrap(), log.clone());
        Server {
            child,
            log,
            dir,
            config: path,
            pid,
        }
    }

    pub fn expect_ready(self) -> Server {
        self.wait_log("ready");
        self
    }

    /// Wait until a log line contains `needle`; return it.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_n(needle, 1)
    }

    /// Wait until a log line contains every one of `needles`; return it.
    pub fn wait_log_all(&self, needles: &[&str]) -> String {
        let mut found = String::new();
        wait_until(&format!("a log line with {needles:?}"), || {
            let log = self.log.lock().unwrap();
            match log.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                Some(l) => {
                    found = l.clone();
                    true
                }
                None => false,
            }
        });
        found
    }

    /// Wait until `n` log lines contain `needle`; return the n-th.
    pub fn wait_log_n(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let log = self.log.lock().unwrap();
                let hits: Vec<&String> = log.iter().filter(|l| l.contains(needle)).collect();
                if hits.len() >= n {
                    return hits[n - 1].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {n}× log line with {needle:?}; log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0);
    }

    /// Replace the config file (same placeholders as `start`) and send SIGHUP; wait until
    /// the reload is logged as done (applied or refused).
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, expand(config, self.dir.path())).unwrap();
        let n = self.count_log("reload: reading the configuration") + 1;
        self.signal(libc::SIGHUP);
        wait_until("the reload to finish", || {
            let log = self.log.lock().unwrap();
            log.iter()
                .filter(|l| l.contains(" kept, ") || l.contains("keeping the running"))
                .count()
                >= n
        });
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "superserver did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids of the superserver's children that are zombies.
    pub fn zombie_children(&self) -> Vec<i32> {
        children_of(self.pid)
            .into_iter()
            .filter(|&p| proc_state(p) == Some('Z'))
            .collect()
    }

    /// Seconds of CPU (user + system) the superserver has used.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let kids = children_of(self.pid);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for k in kids {
            // SAFETY: kill(2); the pid may already be gone.
            unsafe { libc::kill(k, libc::SIGKILL) };
        }
    }
}

/// Fill in the placeholders. The tests run as root in CI: a service without `user` gets
/// `allow_root = true` (the refusal itself is tested in the config crate).
fn expand(config: &str, dir: &Path) -> String {
    let mut text = String::new();
    for line in config.lines() {
        text.push_str(line.trim_start());
        text.push('\n');
        let has_user = config.lines().any(|l| l.trim_start().starts_with("user ="));
        if line.trim_start().starts_with("[service.") && !has_user {
            text.push_str("allow_root = true\n");
        }
    }
    text.replace("{SMALL}", &small_services_bin().display().to_string())
        .replace("{DIR}", &dir.display().to_string())
        .replace("{PYTHON}", PYTHON)
}

/// In the child before exec: move `fds` to 3, 4, … (first out of the way, then into place).
pub fn hand_over(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: only fcntl/dup2 between fork and exec, on fds the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            let n = fds.len() as RawFd;
            let mut moved = [0 as RawFd; 16];
            for (i, &fd) in fds.iter().enumerate() {
                moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + n);
                if moved[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in moved.iter().enumerate().take(fds.len()) {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn relay<R: Read + Send + 'static>(r: R, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            eprintln!("[superserver] {line}");
            log.lock().unwrap().push(line);
        }
    });
}

pub fn children_of(pid: i32) -> Vec<i32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

/// Connect (bounded), send `line` plus newline, read one line back.
pub fn echo(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)?;
    Ok(out.trim_end().to_string())
}

/// Connect from `src` (an address on lo such as 127.0.0.2) to `addr`.
pub fn connect_from(src: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.bind(&SockAddr::from(SocketAddr::new(src.parse().unwrap(), 0)))?;
    s.connect_timeout(&SockAddr::from(addr), WAIT)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(WAIT))?;
    Ok(s)
}

/// Read one line from a stream (bounded by its read timeout). Empty at EOF.
pub fn line_of(s: &TcpStream) -> std::io::Result<String> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut out = String::new();
    r.read_line(&mut out)?;
    Ok(out)
}

/// Connect and read until the server closes (bounded).
pub fn read_all(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Connect and read one line (bounded), keeping the connection open in the returned stream.
pub fn read_line(addr: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut out = String::new();
    r.read_line(&mut out)?;
    Ok((out, s))
}

/// Parse a JSON report line from the reporter into (key → raw JSON) with a tiny extractor.
pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"))
}

/// Wait until `f` is true (bounded).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A control command (`status`, `reload`, `stop`, `upgrade`) against the socket at `control`.
pub fn ctl(args: &[&str], control: &Path) -> std::process::Output {
    Command::new(superserver_bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap()
}

/// `superserver status --json`, which must answer.
pub fn status_json(control: &Path) -> serde_json::Value {
    let out = ctl(&["status", "--json"], control);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The stdout of a command that must have exited 0 (its output is the failure message).
pub fn success_stdout(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
