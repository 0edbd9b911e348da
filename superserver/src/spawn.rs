//! Starting a service process: everything is prepared in the parent, the child only calls
//! async-signal-safe system calls (fd moves, privileges, limits) and `execve`.
//!
//! Why not `std::process::Command`: systemd's protocol wants `LISTEN_PID` to be the *child's*
//! pid, which only exists after `fork`, and std fixes the environment before its `pre_exec`
//! hooks run (a `setenv` there is silently lost once `.env()` was used). So we start the child
//! and `execve` by hand: the parent builds argv and envp as C strings, including a
//! `LISTEN_PID=` buffer with room for the digits; the child writes its own pid into that buffer
//! (no allocation), moves the fds into place and execs. Nothing in the child allocates, locks
//! or logs; a failed step is recorded in memory the parent reads once the child has exited
//! (`_exit(127)`), and the parent logs it with the service's name.
//!
//! The child is started the way glibc's `posix_spawn` does it: `clone(CLONE_VM | CLONE_VFORK)`
//! on a small separate stack. The child shares the parent's memory until it execs (no page
//! tables copied, no copy-on-write faults) and the parent sleeps until then: this is most of
//! what a process per connection costs the superserver. All signals are blocked around the
//! clone; the child resets the handlers it inherited to their defaults before unblocking, and
//! changes credentials with raw system calls (glibc's wrappers would try to synchronise the
//! parent's threads through shared memory).

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use superserver_config::{Limits, MAX_WAIT_SOCKETS, Service};

use crate::program::{Exec, Identity, Program};

/// The most sockets one wait-mode service can be handed (the child moves them with a fixed,
/// allocation-free table); the configuration refuses more.
const MAX_FDS: usize = MAX_WAIT_SOCKETS;

/// What a spawned child gets as file descriptors.
pub enum Fds<'a> {
    /// Wait mode: the listening sockets at fd 3, 4, … in order; stdin is `/dev/null`.
    Listeners(&'a [RawFd]),
    /// Nowait, inetd style: the connection on stdin and stdout.
    Stdio(RawFd),
    /// Nowait, systemd `Accept=yes` style: the connection at fd 3; stdin is `/dev/null`.
    Fd3(RawFd),
    /// Wait, inetd style: the one listening socket on stdin and stdout; stderr stays ours
    /// (inetd puts the socket on fd 2 too, where a program's messages would be lost).
    StdinListener(RawFd),
}

/// The step of the child's set-up that failed, reported to the parent through the memory it
/// shares with the child until `execve` (no pipe needed: the parent sleeps until the child
/// has exec'd or exited, so the value is final when `clone` returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Fds = 1,
    RlimitNofile,
    RlimitNproc,
    Chdir,
    Setgroups,
    Setgid,
    Setuid,
    NoNewPrivs,
    Exec,
}

impl Step {
    fn from_u8(v: u8) -> Option<Step> {
        Some(match v {
            1 => Step::Fds,
            2 => Step::RlimitNofile,
            3 => Step::RlimitNproc,
            4 => Step::Chdir,
            5 => Step::Setgroups,
            6 => Step::Setgid,
            7 => Step::Setuid,
            8 => Step::NoNewPrivs,
            9 => Step::Exec,
            _ => return None,
        })
    }
}

/// Why a child could not be started.
#[derive(Debug)]
pub struct SpawnError(String);

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The superserver's own `RLIMIT_NOFILE` soft limit as it started, restored in every child
/// (the superserver raises its own to the hard limit: it holds every socket of a large
/// table, while programs that use `select(2)` break above 1024). `u64::MAX`: not raised.
static NOFILE_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raise this process's descriptor soft limit to its hard limit, remembering the original
/// for the children. Call once at start-up.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            // Raised: children get the original back (left at u64::MAX, nothing to do).
            NOFILE_SOFT.store(lim.rlim_cur, Ordering::Relaxed);
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
        }
    }
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)` as one system call (musl's wrapper follows it with an
/// `F_SETFD` for kernels older than 2.6.24). Async-signal-safe.
fn dup_cloexec(fd: RawFd, min: RawFd) -> RawFd {
    // SAFETY: fcntl(2) on descriptors of this process; no memory is passed.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, min) as RawFd }
}

/// Everything about a service's process that does not change from one spawn to the next,
/// computed once when the configuration is loaded (no work between accept and fork that could
/// be done earlier).
pub struct Template {
    program: Arc<Program>,
    base_env: CStrings,
    /// `None` when the service sets no user, limit, umask or working directory (most do not).
    setup: Option<Box<Setup>>,
    /// `PR_SET_NO_NEW_PRIVS` before exec.
    no_new_privs: bool,
}

/// What a child sets up when its service asks for it.
#[derive(Default, PartialEq)]
struct Setup {
    /// `Some` only when the child's credentials differ from the superserver's own: a
    /// superserver that runs a service as itself changes nothing (and needs no privilege).
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    limits: Limits,
    umask: Option<libc::mode_t>,
    /// `None` means `/`.
    cwd: Option<CString>,
}

/// A list of C strings in one allocation, each NUL-terminated, back to back: an environment,
/// shared between the services that have the same one.
#[derive(Clone, PartialEq, Eq, Hash)]
struct CStrings(Arc<[u8]>);

impl std::borrow::Borrow<[u8]> for CStrings {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

/// How many C strings a buffer of NUL-terminated strings holds.
fn nul_count(buf: &[u8]) -> usize {
    buf.iter().filter(|&&b| b == 0).count()
}

/// A pointer to each NUL-terminated string in `buf`, for argv or envp.
fn c_pointers(buf: &[u8]) -> impl Iterator<Item = *const libc::c_char> + '_ {
    buf.split_inclusive(|&b| b == 0).map(|s| s.as_ptr().cast())
}

/// Variables for one child on top of its service's (`LISTEN_*`, `REMOTE_*`, `TCP*`), built
/// in one buffer: `NAME=value` strings back to back, each NUL-terminated (a process per
/// connection should not cost a dozen small allocations).
#[derive(Default)]
pub struct Env {
    buf: Vec<u8>,
    /// How many variables were set: a value with a NUL byte in it shows as one more string.
    count: usize,
}

impl Env {
    pub fn with_capacity(bytes: usize) -> Env {
        Env {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// `name=value`.
    pub fn set(&mut self, name: &str, value: impl EnvValue) {
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'=');
        value.put(&mut self.buf);
        self.buf.push(0);
        self.count += 1;
    }

    /// An error naming the variable whose value holds a NUL byte, if one does.
    fn check(&self) -> Result<(), String> {
        if nul_count(&self.buf) == self.count {
            return Ok(());
        }
        let bad = self
            .buf
            .split(|&b| b == 0)
            .find(|s| !s.contains(&b'='))
            .unwrap_or_default();
        Err(format!(
            "an environment value contains a NUL byte (near {:?})",
            String::from_utf8_lossy(bad)
        ))
    }
}

/// A value [`Env::set`] writes straight into its buffer: the formatting machinery was a tenth
/// of the superserver's own time per connection (an address and two ports, every time).
pub trait EnvValue {
    fn put(&self, out: &mut Vec<u8>);
}

impl EnvValue for &str {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl EnvValue for u16 {
    fn put(&self, out: &mut Vec<u8>) {
        put_decimal(out, u64::from(*self));
    }
}

impl EnvValue for usize {
    fn put(&self, out: &mut Vec<u8>) {
        put_decimal(out, *self as u64);
    }
}

/// An address as the child's environment shows it: an IPv4-mapped IPv6 address as IPv4.
impl EnvValue for std::net::IpAddr {
    fn put(&self, out: &mut Vec<u8>) {
        put_ip(out, *self);
    }
}

/// `n` in decimal.
pub(crate) fn put_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 21];
    let len = write_decimal(&mut digits, n);
    out.extend_from_slice(&digits[..len]);
}

/// `ip` as text (IPv4-mapped IPv6 as IPv4), IPv4 without the formatting machinery.
pub(crate) fn put_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_decimal(out, u64::from(octet));
            }
        }
        v6 => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// `items` as C strings back to back, or what is wrong with one.
fn cstrings(items: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(cstring(item.as_ref())?.as_bytes_with_nul());
    }
    Ok(out)
}

fn cstring(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| {
        format!(
            "{:?} contains a NUL byte",
            String::from_utf8_lossy(bytes).into_owned()
        )
    })
}

/// Whether this process may switch to another user and group: root, or the capabilities
/// `CAP_SETUID` and `CAP_SETGID` in its effective set (a unit with `AmbientCapabilities=`).
fn may_change_credentials() -> bool {
    if Identity::current().uid == 0 {
        return true;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const SETGID: u64 = 1 << 6;
    const SETUID: u64 = 1 << 7;
    eff & (SETGID | SETUID) == SETGID | SETUID
}

impl Template {
    /// Prepare the parts of the child's process that come from the service definition, and
    /// check that they can work: the program is opened and checked for the service's user,
    /// and a change of user or group is possible. The error is one line that says what
    /// stops the service and what to do.
    /// `pass_env` values are read from the superserver's environment now (at load or reload).
    /// Argv and environment lists are shared with the templates `interned` already prepared.
    fn new(svc: &Service, interned: &mut Interner) -> Result<Template, String> {
        let me = Identity::current();
        let who = match &svc.credentials {
            Some(c) => {
                let mut groups = c.groups.clone();
                groups.sort_unstable();
                groups.dedup();
                std::borrow::Cow::Owned(Identity {
                    name: c.user.clone(),
                    uid: c.uid,
                    gid: c.gid,
                    groups,
                })
            }
            None => std::borrow::Cow::Borrowed(me),
        };
        // The primary group counts as a member of the supplementary list or not: the same
        // access either way.
        let others = |id: &Identity| -> Vec<libc::gid_t> {
            id.groups.iter().copied().filter(|g| *g != id.gid).collect()
        };
        let change = who.uid != me.uid || who.gid != me.gid || others(&who) != others(me);
        if change && !may_change_credentials() {
            let what = if who.uid != me.uid {
                format!("user {} (uid {})", who.name, who.uid)
            } else {
                format!(
                    "group {} with supplementary groups {:?}",
                    who.gid,
                    others(&who)
                )
            };
            return Err(format!(
                "cannot run as {what}: the superserver runs as {} (uid {}) and may not change \
                 user or group; run the superserver as root, or remove `user`/`group` from \
                 this service",
                me.name, me.uid
            ));
        }
        let program = interned.program(&svc.program, &who)?;
        // Checked here; built at each start from the service's own argv (one copy in memory).
        cstrings(svc.argv.iter())?;
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut set = |k: &[u8], v: &[u8]| {
            env.retain(|(name, _)| name != k);
            env.push((k.to_vec(), v.to_vec()));
        };
        for name in svc.pass_env.iter() {
            if let Some(value) = interned.env(name) {
                set(name.as_bytes(), value.as_bytes());
            }
        }
        if let Some(c) = &svc.credentials {
            set(b"USER", c.user.as_bytes());
            set(b"LOGNAME", c.user.as_bytes());
            set(b"HOME", c.home.as_os_str().as_bytes());
        }
        for (k, v) in &svc.extra().env {
            set(k.as_bytes(), v.as_bytes());
        }
        // Lines the child writes to our stderr keep their priority under journald.
        if crate::logging::journald()
            && let Some(stream) = std::env::var_os("JOURNAL_STREAM")
        {
            set(b"JOURNAL_STREAM", stream.as_bytes());
        }
        let base_env = interned.intern(cstrings(
            env.iter().map(|(k, v)| [&k[..], b"=", &v[..]].concat()),
        )?);
        let setup = Setup {
            creds: change.then(|| (who.uid, who.gid, who.groups.clone())),
            limits: svc.extra().limits,
            umask: svc.extra().umask.map(|m| m as libc::mode_t),
            cwd: match &svc.extra().working_directory {
                Some(dir) => Some(cstring(dir.as_os_str().as_bytes())?),
                None => None,
            },
        };
        Ok(Template {
            program,
            base_env,
            setup: (setup != Setup::default()).then(|| Box::new(setup)),
            no_new_privs: svc.no_new_privs,
        })
    }

    /// The child's working directory.
    fn cwd(&self) -> &CStr {
        self.setup
            .as_deref()
            .and_then(|s| s.cwd.as_deref())
            .unwrap_or(c"/")
    }

    /// "/usr/bin/x as nobody", for log lines.
    pub fn what(&self) -> String {
        format!(
            "{} as {}",
            self.program.path().to_string_lossy(),
            self.program.who().name
        )
    }

    /// Start one child running `argv` (its service's, checked when this template was made).
    /// `extra_env` is added to the service's environment (LISTEN_*,
    /// REMOTE_*, TCP*) and wins over a variable of the same name; with `listen_pid` the child
    /// also gets `LISTEN_PID=<its own pid>`. `devnull` is an open `/dev/null`.
    ///
    /// Returns the child's pid once it has exec'd. When any step before the program runs
    /// fails (open, descriptors, limits, chdir, credentials, exec), the child is reaped here
    /// and the error names the step and the system's reason.
    pub fn spawn(
        &self,
        argv: &[String],
        fds: Fds<'_>,
        extra_env: &Env,
        listen_pid: bool,
        devnull: RawFd,
    ) -> Result<libc::pid_t, SpawnError> {
        if let Fds::Listeners(list) = fds
            && list.len() > MAX_FDS
        {
            return Err(SpawnError(format!(
                "{} sockets; at most {MAX_FDS} can be handed over",
                list.len()
            )));
        }
        extra_env.check().map_err(SpawnError)?;
        let exec = self.program.open().map_err(SpawnError)?;
        // Everything the child reads is built here, in the parent.
        // "LISTEN_PID=" followed by room for 20 digits and a NUL, filled in by the child.
        const PID_PREFIX: &[u8] = b"LISTEN_PID=";
        let mut pid_buf = [0u8; 32];
        pid_buf[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
        // The per-connection variables come first: getenv(3) returns the first match.
        let mut envp: Vec<*const libc::c_char> =
            Vec::with_capacity(nul_count(&self.base_env.0) + extra_env.count + 2);
        if listen_pid {
            envp.push(pid_buf.as_ptr().cast());
        }
        envp.extend(c_pointers(&extra_env.buf));
        envp.extend(c_pointers(&self.base_env.0));
        envp.push(std::ptr::null());
        let mut argv_buf = Vec::with_capacity(argv.iter().map(|a| a.len() + 1).sum());
        for a in argv {
            argv_buf.extend_from_slice(a.as_bytes());
            argv_buf.push(0);
        }
        let mut argv: Vec<*const libc::c_char> = c_pointers(&argv_buf).collect();
        argv.push(std::ptr::null());
        let groups: &[libc::gid_t] = self
            .setup
            .as_deref()
            .and_then(|s| s.creds.as_ref())
            .map_or(&[], |c| &c.2[..]);

        let failure = AtomicI64::new(0);
        let args = ChildArgs {
            template: self,
            fds: &fds,
            devnull,
            program_fd: match &exec {
                Exec::Fd(fd) => fd.as_raw_fd(),
                Exec::Path => -1,
            },
            pid_slot: if listen_pid {
                pid_buf[PID_PREFIX.len()..].as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            argv: &argv,
            envp: &envp,
            groups,
            nofile_soft: NOFILE_SOFT.load(Ordering::Relaxed),
            failure: &failure,
            not_default: not_default(),
        };
        let pid = STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            // SAFETY: the stack grows down from its 16-byte aligned top; the child runs on it
            // only until execve or _exit, while this thread sleeps (CLONE_VFORK), so nothing
            // else uses the buffer meanwhile. `args` outlives the child's use of it for the
            // same reason. All signals are blocked so no handler of ours runs in the child.
            unsafe {
                let top = stack.as_mut_ptr().add(stack.len());
                let top = top.sub(top as usize % 16);
                let mut all: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
                let pid = libc::clone(
                    child_entry,
                    top.cast(),
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    (&args as *const ChildArgs<'_>).cast_mut().cast(),
                );
                let err = io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                if pid == -1 { Err(err) } else { Ok(pid) }
            }
        });
        let pid = pid.map_err(|e| SpawnError(format!("cannot create a process: {e}")))?;
        drop(exec);
        let failed = failure.load(Ordering::Acquire);
        if failed == 0 {
            return Ok(pid);
        }
        // The child has already called _exit (CLONE_VFORK): reap it now.
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let step = Step::from_u8((failed >> 32) as u8);
        let errno = io::Error::from_raw_os_error(failed as i32);
        let reason = match step {
            Some(Step::Fds) => format!("moving descriptors into place: {errno}"),
            Some(Step::RlimitNofile) => format!("setrlimit RLIMIT_NOFILE: {errno}"),
            Some(Step::RlimitNproc) => format!("setrlimit RLIMIT_NPROC: {errno}"),
            Some(Step::Chdir) => format!("chdir {}: {errno}", self.cwd().to_string_lossy()),
            Some(Step::Setgroups) => format!("setgroups: {errno}"),
            Some(Step::Setgid) => format!("setgid: {errno}"),
            Some(Step::Setuid) => format!("setuid: {errno}"),
            Some(Step::NoNewPrivs) => format!("prctl PR_SET_NO_NEW_PRIVS: {errno}"),
            Some(Step::Exec) | None => format!("exec: {errno}"),
        };
        Err(SpawnError(reason))
    }

    /// The child side: set up and exec, or record the failed step and `_exit(127)`.
    ///
    /// # Safety
    /// Must only be called in the child started by `spawn`, with every signal blocked.
    unsafe fn child_exec(&self, a: &ChildArgs<'_>) -> ! {
        let (fds, devnull, groups) = (a.fds, a.devnull, a.groups);
        let fail = |step: Step| -> ! {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            a.failure.store(
                ((step as i64) << 32) | (errno as u32 as i64),
                Ordering::Release,
            );
            // SAFETY: _exit(2) is async-signal-safe.
            unsafe { libc::_exit(127) }
        };
        // SAFETY: all calls below are async-signal-safe system calls operating on memory
        // prepared by the parent before clone; see the function's contract.
        unsafe {
            // Every signal back to its default disposition before unblocking: a handler is
            // inherited (the table is copied, not shared), and an ignored signal would stay
            // ignored through exec (SIGPIPE is ignored by Rust's runtime; whatever our own
            // launcher ignored, SIGQUIT or SIGUSR1, would be too). Only the signals that are
            // not at their default here need it (see `not_default`), a few system calls
            // instead of 62. The raw system call, because glibc's wrapper refuses its two
            // internal real-time signals. An all-zero kernel `sigaction` is SIG_DFL with no
            // flags and an empty mask, whatever the architecture's field order; the buffer is
            // larger than any architecture's.
            let dfl = [0u64; 8];
            for &sig in a.not_default {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Own session (and process group): a Ctrl-C meant for the superserver does not
            // hit the services, and the superserver signals the whole group when it stops.
            libc::setsid();

            // The program's descriptor goes above every target first, like the sockets.
            let low = match *fds {
                Fds::Listeners(list) => 3 + list.len() as RawFd,
                Fds::Stdio(_) | Fds::StdinListener(_) => 3,
                Fds::Fd3(_) => 4,
            };
            let mut program_fd = -1;
            if a.program_fd >= 0 {
                program_fd = dup_cloexec(a.program_fd, low);
                if program_fd < 0 {
                    fail(Step::Fds);
                }
            }
            let ok = match *fds {
                Fds::Listeners(list) => {
                    let n = list.len() as RawFd;
                    // First move every source above the target range, so that moving one
                    // socket into place can never overwrite another that is still to be moved.
                    let mut ok = true;
                    let mut tmp = [0 as RawFd; MAX_FDS];
                    for (i, &fd) in list.iter().enumerate().take(tmp.len()) {
                        tmp[i] = dup_cloexec(fd, 3 + n);
                        ok &= tmp[i] >= 0;
                    }
                    ok &= libc::dup2(devnull, 0) == 0 && libc::dup2(2, 1) == 1;
                    for (i, &t) in tmp.iter().enumerate().take(list.len()) {
                        // dup2 clears FD_CLOEXEC on the new descriptor.
                        ok &= libc::dup2(t, 3 + i as RawFd) == 3 + i as RawFd;
                    }
                    ok
                }
                Fds::Stdio(conn) | Fds::StdinListener(conn) => {
                    libc::dup2(conn, 0) == 0 && libc::dup2(conn, 1) == 1
                }
                Fds::Fd3(conn) => {
                    let tmp = dup_cloexec(conn, 4);
                    tmp >= 0
                        && libc::dup2(devnull, 0) == 0
                        && libc::dup2(2, 1) == 1
                        && libc::dup2(tmp, 3) == 3
                }
            };
            if !ok {
                fail(Step::Fds);
            }
            // Nothing above the handed-over fds survives exec but the program's own
            // descriptor, which is close-on-exec.
            let close = |from: RawFd, to: libc::c_uint| {
                if from as libc::c_uint <= to {
                    libc::syscall(
                        libc::SYS_close_range,
                        from as libc::c_uint,
                        to,
                        0 as libc::c_uint,
                    );
                }
            };
            if program_fd >= 0 {
                close(low, program_fd as libc::c_uint - 1);
                close(program_fd + 1, libc::c_uint::MAX);
            } else {
                close(low, libc::c_uint::MAX);
            }
            if !a.pid_slot.is_null() {
                let slot = std::slice::from_raw_parts_mut(a.pid_slot, 21);
                write_decimal(slot, libc::getpid() as u64);
            }
            static NONE: Setup = Setup {
                creds: None,
                limits: Limits {
                    nofile: None,
                    nproc: None,
                },
                umask: None,
                cwd: None,
            };
            let setup = self.setup.as_deref().unwrap_or(&NONE);
            let limits = [
                (
                    libc::RLIMIT_NOFILE,
                    Step::RlimitNofile,
                    setup.limits.nofile.map(|n| (n, n)),
                ),
                (
                    libc::RLIMIT_NPROC,
                    Step::RlimitNproc,
                    setup.limits.nproc.map(|n| (n, n)),
                ),
            ];
            for (resource, step, value) in limits {
                let value = match value {
                    Some(v) => Some(v),
                    // The superserver raised its own soft limit; the child gets the original.
                    None if resource == libc::RLIMIT_NOFILE && a.nofile_soft != u64::MAX => {
                        let mut cur = libc::rlimit {
                            rlim_cur: 0,
                            rlim_max: 0,
                        };
                        libc::getrlimit(resource, &mut cur);
                        (cur.rlim_cur != a.nofile_soft).then_some((a.nofile_soft, cur.rlim_max))
                    }
                    None => None,
                };
                if let Some((soft, hard)) = value {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        fail(step);
                    }
                }
            }
            if let Some(mask) = setup.umask {
                libc::umask(mask);
            }
            // Privileges last, in the only safe order: groups, gid, uid; and only when they
            // change something.
            if let Some(&(uid, gid, _)) = setup.creds.as_ref() {
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                    fail(Step::Setgroups);
                }
                if libc::syscall(libc::SYS_setgid, gid) != 0 {
                    fail(Step::Setgid);
                }
                if libc::syscall(libc::SYS_setuid, uid) != 0 {
                    fail(Step::Setuid);
                }
            }
            // The working directory is entered as the service's user: a directory it may not
            // enter is an error, not a way in.
            if libc::chdir(self.cwd().as_ptr()) != 0 {
                fail(Step::Chdir);
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(Step::NoNewPrivs);
            }
            if program_fd >= 0 {
                libc::syscall(
                    libc::SYS_execveat,
                    program_fd,
                    c"".as_ptr(),
                    a.argv.as_ptr(),
                    a.envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            } else {
                libc::execve(
                    self.program.path().as_ptr(),
                    a.argv.as_ptr(),
                    a.envp.as_ptr(),
                );
            }
            fail(Step::Exec)
        }
    }
}

/// A template for each service, in order, or one line per service that cannot start:
/// `service.NAME.exec: cannot start PROG as USER: REASON`. Used by `--check`, at start-up and
/// on every reload, so a program its user cannot run is reported before a client arrives.
pub fn prepare_all<'a>(
    services: impl IntoIterator<Item = &'a Service>,
) -> Result<Vec<Template>, Vec<String>> {
    let services = services.into_iter();
    let mut templates = Vec::with_capacity(services.size_hint().0);
    let mut errors = Vec::new();
    let mut interned = Interner::default();
    for svc in services {
        match Template::new(svc, &mut interned) {
            Ok(t) => templates.push(t),
            Err(e) => {
                let who = svc
                    .credentials
                    .as_ref()
                    .map_or(Identity::current().name.as_str(), |c| c.user.as_str());
                errors.push(format!(
                    "service.{}.exec: cannot start {} as {who}: {e}",
                    svc.name,
                    svc.program.display()
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(templates)
    } else {
        Err(errors)
    }
}

/// Everything the child needs, passed through `clone`'s argument pointer.
struct ChildArgs<'a> {
    template: &'a Template,
    fds: &'a Fds<'a>,
    devnull: RawFd,
    /// Where to write the child's pid digits (`LISTEN_PID=` value), or null.
    pid_slot: *mut u8,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    groups: &'a [libc::gid_t],
    /// The program opened by the parent (close-on-exec), or -1 to exec by path.
    program_fd: RawFd,
    /// `RLIMIT_NOFILE` soft limit to restore, or `u64::MAX`.
    nofile_soft: u64,
    /// Set by the child when a step fails: `step << 32 | errno`.
    failure: &'a AtomicI64,
    /// The signals to set back to their default disposition (see [`not_default`]).
    not_default: &'a [libc::c_int],
}

/// The signals whose disposition in this process is not the default (a handler, or ignored):
/// the only ones a child has to set back before exec. Read once: nothing in the superserver
/// changes a disposition after it started (its signals are read from a signalfd, with no
/// handler; Rust's runtime set its own before `main`).
pub(crate) fn not_default() -> &'static [libc::c_int] {
    static SET: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        (1..=64)
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                let mut old = [0u64; 8];
                // SAFETY: rt_sigaction(2) only reads the disposition into a buffer larger
                // than the kernel's struct; a signal number it refuses reads as default.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        std::ptr::null::<u64>(),
                        old.as_mut_ptr(),
                        8usize,
                    )
                };
                // Anything but an all-zero entry (SIG_DFL, no flags, empty mask) is reset.
                r == 0 && old.iter().any(|&w| w != 0)
            })
            .collect()
    })
}

thread_local! {
    /// The stack children run on between clone and execve (one is enough: the parent waits).
    static STACK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 128 * 1024]);
}

/// What loading one configuration already prepared: environment lists (services that
/// share one, a thousand services with the same pass-list say, share one copy) and programs
/// checked for a user (the next service with the same program and user shares it instead of
/// opening and reading the file again). Found by hash, so a table of ten thousand services
/// costs linear time.
#[derive(Default)]
struct Interner {
    lists: HashSet<CStrings>,
    /// By path, then by user (a program is rarely run as more than one or two users).
    programs: std::collections::HashMap<Arc<std::path::Path>, Vec<Arc<Program>>>,
    /// The superserver's variables `pass_env` asked for so far (each read once per load).
    env: std::collections::HashMap<String, Option<std::ffi::OsString>>,
}

impl Interner {
    /// The superserver's variable `name`, as of this load.
    fn env(&mut self, name: &str) -> Option<std::ffi::OsString> {
        if let Some(v) = self.env.get(name) {
            return v.clone();
        }
        let v = std::env::var_os(name);
        self.env.insert(name.to_owned(), v.clone());
        v
    }

    /// `path` opened and checked for `who`, or the one an earlier service with the same
    /// program and user has.
    fn program(
        &mut self,
        path: &Arc<std::path::Path>,
        who: &Identity,
    ) -> Result<Arc<Program>, String> {
        let known = self.programs.entry(path.clone()).or_default();
        if let Some(p) = known.iter().find(|p| p.who() == who) {
            return Ok(p.clone());
        }
        let program = Arc::new(Program::new(path, who.clone())?);
        known.push(program.clone());
        Ok(program)
    }

    /// One shared copy of each distinct list of C strings.
    fn intern(&mut self, list: Vec<u8>) -> CStrings {
        if let Some(shared) = self.lists.get(&list[..]) {
            return shared.clone();
        }
        let shared = CStrings(list.into());
        self.lists.insert(shared.clone());
        shared
    }
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `spawn` keeps alive until we exec or exit.
    let a = unsafe { &*(arg as *const ChildArgs<'_>) };
    // SAFETY: we are the child started by `spawn`, with every signal blocked.
    unsafe { a.template.child_exec(a) }
}

/// Write `n` in decimal followed by a NUL into `buf`, without allocating. Returns the number
/// of digits.
fn write_decimal(buf: &mut [u8], mut n: u64) -> usize {
    let mut tmp = [0u8; 20];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = tmp[len - 1 - i];
    }
    buf[len] = 0;
    len
}

#[cfg(test)]
mod tests {
    use super::{Step, put_decimal, put_ip, write_decimal};

    #[test]
    fn numbers_and_addresses_read_as_their_display() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..10_000 {
            let n = next() >> (next() % 64);
            let mut out = Vec::new();
            put_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            let v4 = std::net::Ipv4Addr::from((next() >> 32) as u32);
            for ip in [
                std::net::IpAddr::V4(v4),
                std::net::IpAddr::V6(v4.to_ipv6_mapped()),
            ] {
                let mut out = Vec::new();
                put_ip(&mut out, ip);
                assert_eq!(out, v4.to_string().as_bytes(), "{ip}: mapped IPv6 as IPv4");
            }
            let v6 = std::net::Ipv6Addr::from(u128::from(next()) << 64 | u128::from(next()));
            let mut out = Vec::new();
            put_ip(&mut out, v6.into());
            assert_eq!(out, v6.to_canonical().to_string().as_bytes());
        }
    }

    #[test]
    fn every_step_survives_the_trip_through_shared_memory() {
        for step in [
            Step::Fds,
            Step::RlimitNofile,
            Step::RlimitNproc,
            Step::Chdir,
            Step::Setgroups,
            Step::Setgid,
            Step::Setuid,
            Step::NoNewPrivs,
            Step::Exec,
        ] {
            assert_eq!(Step::from_u8(step as u8), Some(step));
        }
        assert_eq!(Step::from_u8(0), None);
    }

    #[test]
    fn decimal_digits_are_written_in_place() {
        let mut buf = [0xffu8; 24];
        assert_eq!(write_decimal(&mut buf, 0), 1);
        assert_eq!(&buf[..2], b"0\0");
        assert_eq!(write_decimal(&mut buf, 4194304), 7);
        assert_eq!(&buf[..8], b"4194304\0");
    }
}
