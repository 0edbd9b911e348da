//! Helpers for the end-to-end tests: start the real binary with sockets at fd 3.., relay its
//! stderr, wait with deadlines (never fixed sleeps), kill and reap in Drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_small-services");

/// Generous deadline for anything that should happen "now" on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// What `LISTEN_PID` the child gets.
#[derive(Clone)]
pub enum Pid {
    /// Its own pid (through an exec trampoline: `sh -c 'LISTEN_PID=$$ exec ...'`).
    Own,
    /// This literal value.
    Value(String),
    /// Not set (systemfd --no-pid).
    Unset,
}

/// How to start a program with fds at 3...
pub struct Launch {
    program: String,
    args: Vec<String>,
    fds: Vec<RawFd>,
    close_fd3: bool,
    names: Option<String>,
    listen_fds: Option<String>,
    pid: Pid,
    env: Vec<(String, String)>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    group: bool,
}

impl Launch {
    pub fn service() -> Launch {
        Launch::program(BIN)
    }

    pub fn program(program: &str) -> Launch {
        Launch {
            program: program.to_owned(),
            args: Vec::new(),
            fds: Vec::new(),
            close_fd3: false,
            names: None,
            listen_fds: None,
            pid: Pid::Unset,
            env: Vec::new(),
            stdin: None,
            stdout: None,
            group: false,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Passes `fd` at the next position (3, 4, ...) with LISTEN_FDS and LISTEN_PID=own pid.
    pub fn fd(mut self, fd: &impl AsRawFd) -> Self {
        self.fds.push(fd.as_raw_fd());
        self.pid = Pid::Own;
        self
    }

    pub fn names(mut self, names: &str) -> Self {
        self.names = Some(names.to_owned());
        self
    }

    /// Overrides LISTEN_FDS (e.g. 1 with fd 3 closed).
    pub fn listen_fds(mut self, value: &str) -> Self {
        self.listen_fds = Some(value.to_owned());
        self
    }

    pub fn close_fd3(mut self) -> Self {
        self.close_fd3 = true;
        self
    }

    pub fn pid(mut self, pid: Pid) -> Self {
        self.pid = pid;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn stdin(mut self, s: impl Into<Stdio>) -> Self {
        self.stdin = Some(s.into());
        self
    }

    pub fn stdout(mut self, s: impl Into<Stdio>) -> Self {
        self.stdout = Some(s.into());
        self
    }

    /// Own process group, killed as a whole in Drop (for launchers that fork the service).
    pub fn group(mut self) -> Self {
        self.group = true;
        self
    }

    pub fn spawn(self) -> Child {
        let mut cmd = match self.pid {
            Pid::Own => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
                    .arg(&self.program);
                c
            }
            _ => Command::new(&self.program),
        };
        cmd.args(&self.args);
        for var in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "LISTEN_PIDFDID",
            "LISTEN_FDS_FIRST_FD",
            "NOTIFY_SOCKET",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "debug");
        if let Pid::Value(v) = &self.pid {
            cmd.env("LISTEN_PID", v);
        }
        let listen_fds = self
            .listen_fds
            .clone()
            .or((!self.fds.is_empty()).then(|| self.fds.len().to_string()));
        if let Some(n) = listen_fds {
            cmd.env("LISTEN_FDS", n);
        }
        if let Some(names) = &self.names {
            cmd.env("LISTEN_FDNAMES", names);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(self.stdin.unwrap_or_else(Stdio::null));
        cmd.stdout(self.stdout.unwrap_or_else(Stdio::null));
        cmd.stderr(Stdio::piped());
        if self.group {
            cmd.process_group(0);
        }
        let fds = self.fds.clone();
        let close_fd3 = self.close_fd3;
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = Vec::with_capacity(fds.len());
                for &fd in &fds {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if close_fd3 {
                    libc::close(3);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn");
        Child::new(child, self.group)
    }
}

/// A running child whose stderr is relayed to the test output and kept for assertions.
pub struct Child {
    pub child: std::process::Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    group: bool,
    status: Option<ExitStatus>,
}

impl Child {
    fn new(mut child: std::process::Child, group: bool) -> Child {
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = lines.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[child {pid}] {line}");
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Child {
            child,
            lines,
            group,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a stderr line containing `needle`, returns it.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.0.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no stderr line containing {needle:?} within {timeout:?}; got:\n{}",
                lines.join("\n")
            );
            lines = self.lines.1.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// All stderr lines so far.
    pub fn stderr(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// The TCP/UDP address from the `listening:` line for `name`.
    pub fn listening_addr(&self, name: &str) -> SocketAddr {
        let line = self.wait_line(&format!("listening: {name} "), DEADLINE);
        line.split_whitespace()
            .find_map(|w| {
                w.strip_prefix("tcp://")
                    .or_else(|| w.strip_prefix("udp://"))
                    .or(Some(w))
                    .and_then(|w| w.parse().ok())
            })
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Waits for the exit, failing after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                // Let the relay catch up with the last lines.
                let _ = self.wait_line_quiet();
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "child did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_line_quiet(&self) -> Option<()> {
        // The relay thread ends at EOF of stderr; give it a moment bounded by a deadline.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut lines = self.lines.0.lock().unwrap();
        while Instant::now() < deadline {
            lines = self
                .lines
                .1
                .wait_timeout(lines, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        None
    }

    /// Waits for the exit and asserts its code.
    pub fn assert_exit(&mut self, code: i32, timeout: Duration) {
        let s = self.wait_exit(timeout);
        assert_eq!(
            s.code(),
            Some(code),
            "exit status {s:?}; stderr:\n{}",
            self.stderr()
        );
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            if self.group {
                // SAFETY: kill(2) on the process group we created for this child.
                unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            } else {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        } else if self.group {
            // SAFETY: as above; the launcher may have left its service behind.
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        }
    }
}

/// A listener on 127.0.0.1, port chosen by the kernel.
/// Backlog SOMAXCONN like systemd's sockets (std's 128 overflows under a burst, and the
/// kernel then drops SYNs that are retried only after a second).
pub fn tcp_listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .expect("bind");
    s.listen(libc::SOMAXCONN).expect("listen");
    s.into()
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Connects, sends `input`, half-closes, reads until EOF.
pub fn request(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(input).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut s)
}

pub fn read_to_eof(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read until EOF");
    out
}

/// Seconds since 1900 for now.
pub fn now_1900() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 2_208_988_800
}

/// A NOTIFY_SOCKET the test reads READY=1 / STOPPING=1 from.
pub struct Notify {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl Notify {
    pub fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { dir, path, sock }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Waits for a datagram containing `what`.
    pub fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} on NOTIFY_SOCKET within {DEADLINE:?}"
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).contains(what)
            {
                return;
            }
        }
    }
}

/// Finds a tool on PATH or in ~/.cargo/bin; panics (the test fails, it does not skip) if absent.
pub fn tool(name: &str) -> String {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed (needed by this test; see service/README.md)")
        })
        .to_string_lossy()
        .into_owned()
}

/// Turns a socket into an OwnedFd (for passing as stdin etc).
pub fn owned(fd: impl Into<OwnedFd>) -> OwnedFd {
    fd.into()
}
