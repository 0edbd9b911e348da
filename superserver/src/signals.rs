//! The signals the daemon acts on (SIGCHLD, SIGHUP, SIGTERM, SIGINT, SIGUSR2), read from a
//! signalfd the event loop polls. They are blocked in every thread from before the first
//! thread starts, so none runs a handler or interrupts a system call: a child's exit costs one
//! `read` of the signalfd per turn of the loop (there is no handler, no self-pipe write, no
//! `sigreturn`), and signals that arrive while the daemon starts wait for it.
//!
//! Children must not inherit the block: `spawn.rs` gives every child an empty signal mask
//! (and `std::process::Command` does so too).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{
    SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, pthread_sigmask, sigaction,
};
use nix::sys::signalfd::{SfdFlags, SignalFd};

pub use libc::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2};

const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR2,
];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Block the daemon's signals in this thread and every thread it starts later, and set them to
/// their default disposition: one ignored by whoever started us would survive the exec, and an
/// ignored SIGCHLD means the kernel reaps children itself and `waitpid` never sees them
/// (blocked, the others would still reach the signalfd, but a default is what `status`
/// reasoning and the children expect). Call it on the main thread before any other thread
/// exists.
pub fn block() {
    // Cannot fail with a valid `how` and set.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in HANDLED {
        // SAFETY: installing SIG_DFL runs no code of ours in a signal context.
        let _ = unsafe { sigaction(sig, &default) };
    }
}

/// Block exactly the daemon's signals: after an in-place upgrade the old image blocked every
/// signal across the exec; the others are unblocked now, and ours that came meanwhile wait in
/// the signalfd.
pub fn block_only_ours() {
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&handled()), None);
}

/// The daemon's signals as a pollable descriptor.
pub struct Signals(SignalFd);

impl Signals {
    /// Block the signals (see [`block`]) and open the signalfd.
    pub fn new() -> io::Result<Signals> {
        block();
        let fd = SignalFd::with_flags(&handled(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals(fd))
    }

    /// The signals that arrived since the last call, in order; a signal that came several
    /// times while pending is there once (the kernel merges them, as it does for handlers).
    pub fn pending(&mut self) -> Vec<i32> {
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.0.read_signal() {
            let sig = info.ssi_signo as i32;
            if !out.contains(&sig) {
                out.push(sig);
            }
        }
        out
    }
}

impl Source for Signals {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.0.as_fd().as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.0.as_fd().as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.0.as_fd().as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_signal_is_read_from_the_descriptor_not_delivered() {
        let mut signals = Signals::new().unwrap();
        // SAFETY: raise(3) sends a signal to this thread; it is blocked, so it only waits.
        unsafe { libc::raise(SIGUSR2) };
        unsafe { libc::raise(SIGUSR2) };
        assert_eq!(signals.pending(), [SIGUSR2], "pending once, merged");
        assert!(signals.pending().is_empty(), "read");
    }
}
