//! Starting a service process: everything is prepared in the parent, the child only calls
//! async-signal-safe system calls (fd moves, privileges, limits) and `execve`.
//!
//! Why not `std::process::Command`: systemd's protocol wants `LISTEN_PID` to be the *child's*
//! pid, which only exists after `fork`, and std fixes the environment before its `pre_exec`
//! hooks run (a `setenv` there is silently lost once `.env()` was used). So we start the child
//! and `execve` by hand: the parent builds argv and envp as C strings, including a
//! `LISTEN_PID=` buffer with room for the digits; the child writes its own pid into that buffer
//! (no allocation), moves the fds into place and execs. Nothing in the child allocates, locks
//! or logs; a failure is reported with `write(2)` and `_exit(127)`.
//!
//! The child is started the way glibc's `posix_spawn` does it: `clone(CLONE_VM | CLONE_VFORK)`
//! on a small separate stack. The child shares the parent's memory until it execs (no page
//! tables copied, no copy-on-write faults) and the parent sleeps until then: this is most of
//! what a process per connection costs the superserver. All signals are blocked around the
//! clone; the child resets the handlers it inherited to their defaults before unblocking, and
//! changes credentials with raw system calls (glibc's wrappers would try to synchronise the
//! parent's threads through shared memory).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::rc::{Rc, Weak};

use superserver_config::{Limits, Service};

/// The most sockets one wait-mode service can be handed (the child moves them with a fixed,
/// allocation-free table).
const MAX_FDS: usize = 256;

/// What a spawned child gets as file descriptors.
pub enum Fds<'a> {
    /// Wait mode: the listening sockets at fd 3, 4, … in order; stdin is `/dev/null`.
    Listeners(&'a [RawFd]),
    /// Nowait, inetd style: the connection on stdin and stdout.
    Stdio(RawFd),
    /// Nowait, systemd `Accept=yes` style: the connection at fd 3; stdin is `/dev/null`.
    Fd3(RawFd),
}

/// Everything about a service's process that does not change from one spawn to the next,
/// computed once when the configuration is loaded (no work between accept and fork that could
/// be done earlier).
pub struct Template {
    program: Rc<[CString]>,
    argv: Rc<[CString]>,
    base_env: Rc<[CString]>,
    creds: Option<Box<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>>,
    limits: Limits,
    umask: Option<libc::mode_t>,
    /// `None` means `/`.
    cwd: Option<CString>,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

impl Template {
    /// Prepare the parts of the child's process that come from the service definition.
    /// `pass_env` values are read from the superserver's environment now (at load or reload).
    pub fn new(svc: &Service) -> io::Result<Template> {
        let program = intern(vec![cstring(svc.program.as_os_str().as_bytes())?]);
        let argv = intern(
            svc.argv
                .iter()
                .map(|a| cstring(a.as_bytes()))
                .collect::<io::Result<Vec<_>>>()?,
        );
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut set = |k: &[u8], v: &[u8]| {
            env.retain(|(name, _)| name != k);
            env.push((k.to_vec(), v.to_vec()));
        };
        for name in svc.pass_env.iter() {
            if let Some(value) = std::env::var_os(name) {
                set(name.as_bytes(), value.as_bytes());
            }
        }
        if let Some(c) = &svc.credentials {
            set(b"USER", c.user.as_bytes());
            set(b"LOGNAME", c.user.as_bytes());
            set(b"HOME", c.home.as_os_str().as_bytes());
        }
        for (k, v) in &svc.env {
            set(k.as_bytes(), v.as_bytes());
        }
        let base_env = intern(
            env.into_iter()
                .map(|(k, v)| cstring(&[&k[..], b"=", &v[..]].concat()))
                .collect::<io::Result<Vec<_>>>()?,
        );
        let creds = svc
            .credentials
            .as_ref()
            .map(|c| Box::new((c.uid, c.gid, c.groups.clone())));
        let cwd = match &svc.working_directory {
            Some(dir) => Some(cstring(dir.as_os_str().as_bytes())?),
            None => None,
        };
        Ok(Template {
            program,
            argv,
            base_env,
            creds,
            limits: svc.limits,
            umask: svc.umask.map(|m| m as libc::mode_t),
            cwd,
        })
    }

    /// Fork and exec one child. `extra_env` is added to the service's environment (LISTEN_*,
    /// REMOTE_*, TCP*); with `listen_pid` the child also gets `LISTEN_PID=<its own pid>`.
    /// `devnull` is an open `/dev/null`. Returns the child's pid; the child never returns.
    pub fn spawn(
        &self,
        fds: Fds<'_>,
        extra_env: &[(&str, &OsStr)],
        listen_pid: bool,
        devnull: RawFd,
    ) -> io::Result<libc::pid_t> {
        if let Fds::Listeners(list) = fds
            && list.len() > MAX_FDS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} sockets; at most {MAX_FDS} can be handed over",
                    list.len()
                ),
            ));
        }
        // Everything the child reads is built here, in the parent.
        let mut env_strings: Vec<CString> = Vec::with_capacity(extra_env.len());
        for (k, v) in extra_env {
            env_strings.push(cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat())?);
        }
        // "LISTEN_PID=" followed by room for 20 digits and a NUL, filled in by the child.
        const PID_PREFIX: &[u8] = b"LISTEN_PID=";
        let mut pid_buf = [0u8; 32];
        pid_buf[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
        let mut envp: Vec<*const libc::c_char> =
            Vec::with_capacity(self.base_env.len() + env_strings.len() + 2);
        envp.extend(self.base_env.iter().map(|s| s.as_ptr()));
        envp.extend(env_strings.iter().map(|s| s.as_ptr()));
        if listen_pid {
            envp.push(pid_buf.as_ptr().cast());
        }
        envp.push(std::ptr::null());
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let groups: &[libc::gid_t] = self.creds.as_deref().map_or(&[], |c| &c.2[..]);

        let args = ChildArgs {
            template: self,
            fds: &fds,
            devnull,
            pid_slot: if listen_pid {
                pid_buf[PID_PREFIX.len()..].as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            argv: &argv,
            envp: &envp,
            groups,
        };
        STACK.with(|stack| {
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
        })
    }

    /// The child side: set up and exec, or report and `_exit(127)`.
    ///
    /// # Safety
    /// Must only be called in the child started by `spawn`, with every signal blocked.
    unsafe fn child_exec(&self, a: &ChildArgs<'_>) -> ! {
        let (fds, devnull, groups) = (a.fds, a.devnull, a.groups);
        // SAFETY: all calls below are async-signal-safe system calls operating on memory
        // prepared by the parent before clone; see the function's contract.
        unsafe {
            // Our handlers are inherited (the table is copied, not shared): back to defaults
            // before unblocking. SIGPIPE is ignored by Rust's runtime and would otherwise
            // stay ignored through exec.
            for sig in [
                libc::SIGCHLD,
                libc::SIGHUP,
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Own session: a Ctrl-C meant for the superserver does not hit the services, and
            // the superserver decides how they stop.
            libc::setsid();

            let ok = match *fds {
                Fds::Listeners(list) => {
                    let n = list.len() as RawFd;
                    // First move every source above the target range, so that moving one
                    // socket into place can never overwrite another that is still to be moved.
                    let mut ok = true;
                    let mut tmp = [0 as RawFd; MAX_FDS];
                    for (i, &fd) in list.iter().enumerate().take(tmp.len()) {
                        tmp[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + n);
                        ok &= tmp[i] >= 0;
                    }
                    ok &= libc::dup2(devnull, 0) == 0 && libc::dup2(2, 1) == 1;
                    for (i, &t) in tmp.iter().enumerate().take(list.len()) {
                        // dup2 clears FD_CLOEXEC on the new descriptor.
                        ok &= libc::dup2(t, 3 + i as RawFd) == 3 + i as RawFd;
                    }
                    ok
                }
                Fds::Stdio(conn) => libc::dup2(conn, 0) == 0 && libc::dup2(conn, 1) == 1,
                Fds::Fd3(conn) => {
                    let tmp = libc::fcntl(conn, libc::F_DUPFD_CLOEXEC, 4);
                    tmp >= 0
                        && libc::dup2(devnull, 0) == 0
                        && libc::dup2(2, 1) == 1
                        && libc::dup2(tmp, 3) == 3
                }
            };
            if !ok {
                self.die();
            }
            // Belt and braces: nothing above the handed-over fds survives exec.
            let first_free = match *fds {
                Fds::Listeners(list) => 3 + list.len() as libc::c_uint,
                Fds::Stdio(_) => 3,
                Fds::Fd3(_) => 4,
            };
            libc::syscall(
                libc::SYS_close_range,
                first_free,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            if !a.pid_slot.is_null() {
                let slot = std::slice::from_raw_parts_mut(a.pid_slot, 21);
                write_decimal(slot, libc::getpid() as u64);
            }
            let limits = [
                (libc::RLIMIT_NOFILE, self.limits.nofile),
                (libc::RLIMIT_NPROC, self.limits.nproc),
            ];
            for (resource, value) in limits {
                if let Some(n) = value {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        self.die();
                    }
                }
            }
            if let Some(mask) = self.umask {
                libc::umask(mask);
            }
            let cwd = self.cwd.as_deref().unwrap_or(c"/");
            if libc::chdir(cwd.as_ptr()) != 0 {
                self.die();
            }
            // Privileges last, in the only safe order: groups, gid, uid.
            if let Some(&(uid, gid, _)) = self.creds.as_deref()
                && (libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setgid, gid) != 0
                    || libc::syscall(libc::SYS_setuid, uid) != 0)
            {
                self.die();
            }
            libc::execve(self.program[0].as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
            self.die()
        }
    }

    /// Report errno on stderr with `write(2)` only, then `_exit(127)` (as a shell does).
    fn die(&self) -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut digits = [0u8; 24];
        let len = write_decimal(&mut digits, errno as u64);
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are valid.
        unsafe {
            let program = self.program[0].as_bytes();
            let parts: [&[u8]; 3] = [b"superserver: cannot execute ", program, b": errno "];
            for part in parts {
                libc::write(2, part.as_ptr().cast(), part.len());
            }
            libc::write(2, digits.as_ptr().cast(), len);
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(127)
        }
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
}

thread_local! {
    /// argv and environment lists already prepared for some service: services that share them
    /// (a thousand services with the same pass-list, say) share one copy.
    static INTERNED: std::cell::RefCell<Vec<Weak<[CString]>>> = const { std::cell::RefCell::new(Vec::new()) };

    /// The stack children run on between clone and execve (one is enough: the parent waits).
    static STACK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 128 * 1024]);
}

/// One shared copy of each distinct list of C strings.
fn intern(list: Vec<CString>) -> Rc<[CString]> {
    INTERNED.with(|cell| {
        let mut cache = cell.borrow_mut();
        cache.retain(|w| w.strong_count() > 0);
        if let Some(rc) = cache
            .iter()
            .filter_map(Weak::upgrade)
            .find(|rc| **rc == *list)
        {
            return rc;
        }
        let rc: Rc<[CString]> = list.into();
        cache.push(Rc::downgrade(&rc));
        rc
    })
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
    use super::write_decimal;

    #[test]
    fn decimal_digits_are_written_in_place() {
        let mut buf = [0xffu8; 24];
        assert_eq!(write_decimal(&mut buf, 0), 1);
        assert_eq!(&buf[..2], b"0\0");
        assert_eq!(write_decimal(&mut buf, 4194304), 7);
        assert_eq!(&buf[..8], b"4194304\0");
    }
}
