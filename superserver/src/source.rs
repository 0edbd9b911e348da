//! Where the configuration and the inherited sockets come from: the file given with
//! `--config` or the embedded default, and `LISTEN_FDS` from systemd or systemfd.

use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use superserver_config::{Config, ConfigErrors, LoadOptions};

use crate::daemon::Source;

/// The embedded default configuration (see `--print-default`).
pub const DEFAULT: &str = include_str!("default.toml");
const DEFAULT_ORIGIN: &str = "<embedded default>";

/// The configuration file, or the embedded default when there is none.
#[derive(Clone)]
pub struct ConfigSource {
    path: Option<PathBuf>,
    options: LoadOptions,
}

impl ConfigSource {
    pub fn new(path: Option<PathBuf>, config_dirs: Vec<PathBuf>) -> ConfigSource {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        ConfigSource {
            path,
            options: LoadOptions {
                exe_dir,
                running_as_root: nix::unistd::geteuid().is_root(),
                config_dirs,
            },
        }
    }

    /// Load, and on failure render every error (one per line) plus a hint for the one mistake
    /// every newcomer makes: running the superserver before `small-services` was built.
    pub fn load_reported(&self) -> Result<Config, String> {
        self.load().map_err(|errors| {
            let mut text = errors.to_string();
            let missing_small = errors
                .0
                .iter()
                .any(|e| e.message.contains("small-services") && e.message.contains("not found"));
            if missing_small {
                text.push_str(
                    "\nhint: build both binaries with `cargo build --release` (`cargo run --bin \
                     superserver` builds only the superserver), then run target/release/superserver",
                );
            }
            text
        })
    }
}

impl Source for ConfigSource {
    fn origin(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => DEFAULT_ORIGIN.to_string(),
        }
    }

    fn load(&self) -> Result<Config, ConfigErrors> {
        match &self.path {
            Some(p) => superserver_config::load(p, &self.options),
            None => {
                let text = DEFAULT;
                superserver_config::parse_str(text, Path::new(DEFAULT_ORIGIN), &self.options)
            }
        }
    }
}

/// Sockets this process was started with (`LISTEN_FDS`), with their names and fd numbers.
/// Empty when nothing was inherited or `LISTEN_PID` names another process.
pub fn inherited_sockets() -> Result<Vec<(String, RawFd, OwnedFd)>, String> {
    let sockets = small_services::activation::take_all_from_env()
        .map_err(|e| format!("inherited sockets: {e}"))?;
    Ok(sockets
        .into_iter()
        .map(|s| (s.name, s.number, s.fd))
        .collect())
}

/// Mark every descriptor above stderr close-on-exec: whatever our own launcher leaked to us
/// (and the `LISTEN_FDS` sockets, which are adopted explicitly) must never reach a service.
pub fn cloexec_inherited_fds() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on open descriptors.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
}

/// Make sure fds 0, 1 and 2 are open (on `/dev/null` if not), so that no socket ever lands on
/// them and gets mistaken for stdin or stdout by a child.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: open(2) with a valid C string; the new fd is the lowest free one, `fd`.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}
