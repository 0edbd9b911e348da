//! The table of running children and reaping: `waitpid(WNOHANG)` until nothing is left, and
//! how each child ended, in words.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Why a child was started.
#[derive(Debug, Clone)]
pub enum Kind {
    /// The wait-mode process holding a service's listening sockets.
    Wait,
    /// A nowait process serving one connection.
    Connection {
        /// The client, for the log line.
        peer: String,
        /// The key it was counted under for `max_per_source`.
        source: Option<IpNet>,
        /// It came through a balancer (PROXY protocol).
        proxied: bool,
    },
}

/// A running child.
#[derive(Debug, Clone)]
pub struct Child {
    /// Name of the service that started it (it may since have been removed by a reload).
    pub service: String,
    /// Identity of the service instance that started it, for its counters.
    pub svc_id: u64,
    pub started: Instant,
    pub kind: Kind,
}

/// A reaped child and how it ended.
#[derive(Debug)]
pub struct Exit {
    pub pid: i32,
    pub child: Child,
    pub runtime: Duration,
    /// `Ok(code)` for a normal exit, `Err(signal)` when killed by a signal.
    pub status: Result<i32, i32>,
}

impl Exit {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == Ok(0)
    }

    /// "exited 0", "exited 3", "killed by SIGSEGV (core dumped)".
    pub fn describe(&self) -> String {
        match self.status {
            Ok(code) => format!("exited {code}"),
            Err(sig) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                format!("killed by {name}")
            }
        }
    }
}

/// Every child this superserver started and has not reaped yet.
#[derive(Debug, Default)]
pub struct Children {
    map: HashMap<i32, Child>,
}

impl Children {
    pub fn insert(&mut self, pid: i32, child: Child) {
        self.map.insert(pid, child);
    }

    /// Pids of the running children, by the service instance that started them.
    pub fn pids_by_service(&self) -> HashMap<u64, Vec<i32>> {
        let mut by: HashMap<u64, Vec<i32>> = HashMap::new();
        for (&pid, c) in &self.map {
            by.entry(c.svc_id).or_default().push(pid);
        }
        by
    }

    /// Every running child.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &Child)> {
        self.map.iter().map(|(&pid, c)| (pid, c))
    }

    pub fn get(&self, pid: i32) -> Option<&Child> {
        self.map.get(&pid)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Pids of all children (to signal them).
    pub fn pids(&self) -> Vec<i32> {
        self.map.keys().copied().collect()
    }

    /// Reap every child that has ended, without blocking (or, with `blocking`, until none is
    /// left). Children that are not ours (none should exist) are reaped and dropped too: no
    /// zombies, ever. With `sweep`, each child's process group gets SIGKILL just before the
    /// child is reaped: while the child is a zombie its pid, hence its group id, cannot have
    /// been reused, so only what it left behind is hit.
    pub fn reap(&mut self, blocking: bool, sweep: bool) -> Vec<Exit> {
        let mut out = Vec::new();
        loop {
            let mut target = -1;
            if sweep {
                // SAFETY: waitid(2) with WNOWAIT only peeks at an exited child; kill(2) on
                // the group of that still unreaped child.
                unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    let flags =
                        libc::WEXITED | libc::WNOWAIT | if blocking { 0 } else { libc::WNOHANG };
                    if libc::waitid(libc::P_ALL, 0, &mut info, flags) != 0 || info.si_pid() <= 0 {
                        break;
                    }
                    target = info.si_pid();
                    libc::kill(-target, libc::SIGKILL);
                }
            }
            let mut status = 0;
            let flags = if blocking { 0 } else { libc::WNOHANG };
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(target, &mut status, flags) };
            if pid <= 0 {
                break; // 0: children still running; -1 ECHILD: none left.
            }
            let Some(child) = self.map.remove(&pid) else {
                continue;
            };
            let status = if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Err(libc::WTERMSIG(status))
            };
            out.push(Exit {
                pid,
                runtime: child.started.elapsed(),
                child,
                status,
            });
            if blocking && self.map.is_empty() {
                break;
            }
        }
        out
    }
}

/// Durations in log lines: "850ms", "12.3s".
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
