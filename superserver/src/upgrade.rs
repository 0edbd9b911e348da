//! Upgrading in place: the running superserver re-executes a new binary in the same process,
//! so every child stays its child, `LISTEN_PID` and systemd's `MainPID` stay true, and no
//! second supervisor races to re-arm a socket (HAProxy's master does the same).
//!
//! First a pre-flight: the new binary is run with the same arguments plus `--check
//! --upgrade-check`, reading the state it would inherit on stdin; only if it says yes within
//! [`PREFLIGHT`] does the exec happen, so a missing, crashing or disagreeing binary leaves the
//! old one serving. Then every listening socket crosses the exec at its fd number (not
//! close-on-exec for that exec only), the rest of the state (children, counters, back-off, the
//! wait-mode processes) in a memfd named by [`STATE_ENV`]; all signals are blocked across the
//! exec, so a SIGCHLD or SIGTERM that arrives meanwhile stays pending for the new image.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::children::{Child, Kind};
use crate::daemon::{Daemon, Source};
use crate::state::{Counters, LastExit};

/// The environment variable that names the memfd holding the state, in the new image.
pub const STATE_ENV: &str = "SUPERSERVER_UPGRADE_STATE";
/// How long the new binary's pre-flight may take.
pub const PREFLIGHT: Duration = Duration::from_secs(2);
const VERSION: u32 = 1;

/// Everything that crosses the exec besides the sockets themselves.
#[derive(Debug, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// How many upgrades this process has been through (this one included).
    pub upgrades: u32,
    pub started_unix_ms: u64,
    pub sockets: Vec<SavedSocket>,
    pub services: Vec<SavedService>,
    pub children: Vec<SavedChild>,
    pub retired: Vec<(String, Counters)>,
    #[serde(default)]
    pub drained_all: bool,
    /// Connections waiting for their PROXY header (their descriptors cross the exec).
    #[serde(default)]
    pub headers: Vec<crate::proxy::SavedHeader>,
}

/// A listening socket: its fd number (open across the exec) and what it is.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedSocket {
    pub fd: RawFd,
    pub addr: String,
    /// A Unix socket file we created: its path, device and inode.
    pub owned: Option<(PathBuf, u64, u64)>,
    pub nonblocking: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedService {
    pub name: String,
    pub counters: Counters,
    pub failures: u32,
    pub wait_children: Vec<i32>,
    pub last_exit: Option<(i32, Result<i32, i32>, u64, u64)>,
    /// The rate's bucket: tokens left, and the rate they were counted for.
    #[serde(default)]
    pub tokens: Option<(f64, u32, u64)>,
    /// Time left of a back-off or a rate suspension, in milliseconds.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    #[serde(default)]
    pub rate_ms: Option<u64>,
    /// `superserver drain`.
    #[serde(default)]
    pub drained: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedChild {
    pub pid: i32,
    pub service: String,
    pub wait: bool,
    pub peer: String,
    pub source: Option<String>,
    #[serde(default)]
    pub proxied: bool,
    pub ran_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Read the state the old image left, if this process is the new image of an upgrade; the
/// variable is removed so that no child sees it.
pub fn take_saved() -> Option<Result<Saved, String>> {
    let fd: RawFd = std::env::var(STATE_ENV).ok()?.parse().ok()?;
    // SAFETY: removing a variable while single-threaded, before any thread starts.
    unsafe { std::env::remove_var(STATE_ENV) };
    // SAFETY: the old image left this memfd open for us at this number; we own it now.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    Some(read_saved(file))
}

fn read_saved(mut file: impl Read) -> Result<Saved, String> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("upgrade state: {e}"))?;
    let saved: Saved = serde_json::from_str(&text).map_err(|e| format!("upgrade state: {e}"))?;
    if saved.version != VERSION {
        return Err(format!(
            "upgrade state version {} (this binary reads {VERSION})",
            saved.version
        ));
    }
    Ok(saved)
}

/// `--check --upgrade-check`: the state on stdin must be readable by this binary.
pub fn check_stdin() -> Result<(), String> {
    read_saved(std::io::stdin().lock()).map(|_| ())
}

/// The binary now at the running one's path: after a package upgrade the running image is
/// deleted and a new file stands at its path.
pub fn current_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

impl<S: Source> Daemon<S> {
    /// The state to carry over.
    fn save(&mut self) -> Saved {
        let now = Instant::now();
        let left =
            |t: Option<Instant>| t.map(|t| t.saturating_duration_since(now).as_millis() as u64);
        let mut sockets = Vec::new();
        let mut services = Vec::new();
        for svc in &mut self.services {
            let bucket = svc.limited.as_deref_mut().and_then(|l| l.bucket.as_mut());
            let tokens = match (bucket, svc.def.extra().rate) {
                (Some(b), Some(r)) => Some((b.tokens(now), r.count, r.per.as_millis() as u64)),
                _ => None,
            };
            for slot in &svc.slots {
                if let Some(b) = &slot.bound {
                    sockets.push(SavedSocket {
                        fd: b.fd(),
                        addr: b.addr.to_string(),
                        owned: b.owned().map(|(p, (d, i))| (p.to_path_buf(), d, i)),
                        nonblocking: b.nonblocking_state(),
                    });
                }
            }
            services.push(SavedService {
                name: svc.def.name.clone(),
                counters: (*svc.counters).clone(),
                failures: svc.lim().failures,
                wait_children: svc.wait_children.clone(),
                last_exit: svc
                    .last_exit
                    .as_ref()
                    .map(|e| (e.pid, e.status, unix_ms(e.at), e.ran.as_millis() as u64)),
                tokens,
                backoff_ms: left(svc.lim().backoff_until),
                rate_ms: left(svc.lim().rate_until),
                drained: svc.drained,
            });
        }
        let children = self
            .children
            .iter()
            .map(|(pid, c)| {
                let (wait, peer, source, proxied) = match &c.kind {
                    Kind::Wait => (true, String::new(), None, false),
                    Kind::Connection {
                        peer,
                        source,
                        proxied,
                    } => (false, peer.clone(), source.map(|s| s.to_string()), *proxied),
                };
                SavedChild {
                    pid,
                    service: c.service.clone(),
                    wait,
                    peer,
                    source,
                    proxied,
                    ran_ms: c.started.elapsed().as_millis() as u64,
                }
            })
            .collect();
        Saved {
            version: VERSION,
            upgrades: self.upgrades + 1,
            started_unix_ms: unix_ms(self.started),
            sockets,
            services,
            children,
            retired: self
                .retired
                .iter()
                .map(|(n, c)| (n.clone(), (**c).clone()))
                .collect(),
            drained_all: self.drained_all,
            headers: self.save_headers(),
        }
    }

    /// After start-up in the new image: the children, counters and back-off of the old one.
    pub(crate) fn restore(&mut self, saved: Saved) {
        self.upgrades = saved.upgrades;
        self.started = from_unix_ms(saved.started_unix_ms);
        self.drained_all = saved.drained_all;
        for (name, c) in saved.retired {
            self.retired.insert(name, c.into());
        }
        let by_name: HashMap<String, usize> = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.def.name.clone(), i))
            .collect();
        for s in saved.services {
            let Some(&i) = by_name.get(&s.name) else {
                self.retired.insert(s.name, s.counters.into());
                continue;
            };
            let now = Instant::now();
            let svc = &mut self.services[i];
            if let (Some((tokens, count, per_ms)), Some(rate)) = (s.tokens, svc.def.extra().rate)
                && rate.count == count
                && rate.per.as_millis() as u64 == per_ms
            {
                svc.lim_mut().bucket =
                    Some(crate::limits::TokenBucket::with_tokens(rate, tokens, now));
            }
            let id = svc.id;
            if let Some(ms) = s.backoff_ms {
                let at = now + Duration::from_millis(ms);
                svc.lim_mut().backoff_until = Some(at);
                self.timers
                    .push(std::cmp::Reverse((at, crate::daemon::Timer::Service(id))));
            }
            let svc = &mut self.services[i];
            if let Some(ms) = s.rate_ms {
                let at = now + Duration::from_millis(ms);
                svc.lim_mut().rate_until = Some(at);
                self.timers
                    .push(std::cmp::Reverse((at, crate::daemon::Timer::Service(id))));
            }
            let svc = &mut self.services[i];
            svc.counters = s.counters.into();
            if s.failures > 0 {
                svc.lim_mut().failures = s.failures;
            }
            svc.drained = s.drained;
            svc.wait_children = s.wait_children;
            svc.last_exit = s.last_exit.map(|(pid, status, at, ran)| {
                Box::new(LastExit {
                    pid,
                    status,
                    at: from_unix_ms(at),
                    ran: Duration::from_millis(ran),
                })
            });
        }
        let now = Instant::now();
        for c in saved.children {
            let i = by_name.get(&c.service).copied();
            let svc_id = i.map_or(0, |i| self.services[i].id);
            let kind = if c.wait {
                Kind::Wait
            } else {
                let source = c.source.and_then(|s| s.parse().ok());
                if let Some(i) = i {
                    let svc = &mut self.services[i];
                    svc.running += 1;
                    if let (Some(key), Some(limit)) = (source, svc.def.extra().per_source) {
                        let sources = svc.lim_mut().sources.get_or_insert_with(Default::default);
                        sources.try_add(key, limit.max.max(u32::MAX / 2));
                    }
                }
                Kind::Connection {
                    peer: c.peer,
                    source,
                    proxied: c.proxied,
                }
            };
            self.children.insert(
                c.pid,
                Child {
                    service: c.service,
                    svc_id,
                    started: now
                        .checked_sub(Duration::from_millis(c.ran_ms))
                        .unwrap_or(now),
                    kind,
                },
            );
        }
        self.restore_headers(saved.headers);
        for i in 0..self.services.len() {
            self.rearm(i);
        }
        // Children that ended during the exec: their SIGCHLD is pending, reap them now anyway.
        self.reap();
    }

    /// Re-execute `binary` in place, after its pre-flight. Returns only on failure, with the
    /// reason; the old image then keeps serving, unchanged.
    pub(crate) fn upgrade(&mut self, binary: Option<PathBuf>) -> Result<(), String> {
        let binary = match binary {
            Some(b) => b,
            None => current_binary()?,
        };
        if !binary.is_absolute() {
            return Err(format!("{}: give an absolute path", binary.display()));
        }
        let saved = self.save();
        let mut buf = crate::control::JsonBuf(Vec::with_capacity(64 * 1024));
        serde_json::to_writer(&mut buf, &saved).map_err(|e| format!("upgrade state: {e}"))?;
        let state = buf.0;
        preflight(&binary, &state)?;
        let memfd = memfd_with(&state)?;
        log::info!(
            "upgrade: {} passed its pre-flight; re-executing it in place (pid {}, {} socket(s), {} child(ren))",
            binary.display(),
            std::process::id(),
            saved.sockets.len(),
            saved.children.len()
        );
        crate::notify::reloading();
        crate::logging::flush();
        let fds: Vec<RawFd> = saved
            .sockets
            .iter()
            .map(|s| s.fd)
            .chain(saved.headers.iter().map(|h| h.fd))
            .collect();
        let err = exec_with(&binary, &fds, &memfd);
        // Still here: the exec failed. Everything is as it was.
        crate::notify::ready("upgrade failed; still running the old binary");
        Err(format!("exec {}: {err}", binary.display()))
    }
}

/// Run `BINARY <our arguments> --check --upgrade-check` with the state on stdin: it must exit
/// 0 within [`PREFLIGHT`].
fn preflight(binary: &Path, state: &[u8]) -> Result<(), String> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = std::process::Command::new(binary)
        .args(&args)
        .arg("--check")
        .arg("--upgrade-check")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state);
    }
    let deadline = Instant::now() + PREFLIGHT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{}: its pre-flight did not answer within {}s; not upgrading",
                    binary.display(),
                    PREFLIGHT.as_secs()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", binary.display())),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut why = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut why);
    }
    let why: Vec<&str> = why
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(5)
        .collect();
    let how = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => format!("exited {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "failed".into(),
    };
    Err(format!(
        "{} refused the upgrade in its pre-flight ({how}){}{}",
        binary.display(),
        if why.is_empty() { "" } else { ": " },
        why.join(" | ")
    ))
}

fn memfd_with(state: &[u8]) -> Result<OwnedFd, String> {
    // SAFETY: memfd_create(2) with a C string; the fd is owned by the returned value.
    let fd = unsafe { libc::memfd_create(c"superserver-upgrade".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
    file.write_all(state)
        .map_err(|e| format!("upgrade state: {e}"))?;
    // SAFETY: lseek(2) back to the start so the new image reads it whole.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    Ok(fd)
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl(2) on a descriptor we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

/// The exec itself: sockets and the memfd open across it, every signal blocked, the state's
/// fd in the environment. Returns the error if the exec fails, with everything restored.
fn exec_with(binary: &Path, sockets: &[RawFd], memfd: &OwnedFd) -> std::io::Error {
    let argv: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.into_vec()).unwrap_or_default())
        .collect();
    let Ok(path) = CString::new(binary.as_os_str().as_encoded_bytes()) else {
        return std::io::Error::other("NUL in path");
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{STATE_ENV}={}", memfd.as_raw_fd())).expect("no NUL"));
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    for &fd in sockets {
        set_cloexec(fd, false);
    }
    set_cloexec(memfd.as_raw_fd(), false);
    // SAFETY: sigprocmask(2) with local sets, then execve(2) with NUL-terminated arrays of
    // C strings that live until the call returns (it only returns on failure).
    let err = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old);
        libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
        let err = std::io::Error::last_os_error();
        libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        err
    };
    for &fd in sockets {
        set_cloexec(fd, true);
    }
    set_cloexec(memfd.as_raw_fd(), true);
    err
}
