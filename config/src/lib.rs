//! The superserver's configuration: TOML parsed into raw serde types, then validated into a
//! [`Config`] that cannot hold an invalid state. Errors carry file, line, column and key.

mod error;
mod model;
mod raw;
mod validate;
mod values;

pub use error::{ConfigError, ConfigErrors};
pub use model::*;
pub use validate::{
    DEFAULT_PASS_ENV, MAX_RESTART_BACKOFF, MAX_SERVICE_DURATION, MAX_SHUTDOWN_GRACE,
    MAX_WAIT_INSTANCES, MAX_WAIT_SOCKETS,
};
pub use values::{
    MAX_RATE_PERIOD, RESERVED_ENV_NAMES, RESERVED_ENV_PREFIX, is_reserved_env_name, normalize_path,
    parse_listen_addr, parse_net, parse_rate, resolve_program,
};

use std::path::{Path, PathBuf};

/// What validation needs to know about the world it runs in.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Directory of the running superserver binary: a bare `exec` program name is looked up
    /// there first, then in each absolute directory of the superserver's `PATH` (see
    /// [`resolve_program`]). `None`: `PATH` only.
    pub exe_dir: Option<PathBuf>,
    /// The superserver runs as root: a service without `user` (or with `user = "root"`) needs
    /// `allow_root = true`.
    pub running_as_root: bool,
    /// Extra drop-in directories (`--config-dir`): each acts as one more `include` of
    /// `DIR/*.toml`, read after the main file's own `include` patterns, in order. A directory
    /// that does not exist adds nothing; a path that is not a directory is an error.
    pub config_dirs: Vec<PathBuf>,
}

/// Read and validate a configuration file and its drop-ins.
///
/// The drop-ins are the files matched by the `include` patterns of `[superserver]` (a
/// relative pattern is relative to the directory of `path`; each pattern's matches in lexical
/// order, patterns in order; a pattern that matches nothing adds nothing), then `DIR/*.toml`
/// for each of [`LoadOptions::config_dirs`]. A drop-in holds `[service.NAME]` tables only.
/// Service names and listen addresses are unique across all the files.
///
/// `Err` holds every problem found in every file (not only the first), each naming its file,
/// line, column and key path: the main file's first, then each drop-in's. Nothing is
/// partially applied: either every file is valid or the caller gets no `Config`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    match std::fs::read(path) {
        Ok(bytes) => parse_bytes(&bytes, path, opts),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])),
    }
}

/// Validate the bytes of a configuration file; `origin` is the file name used in errors.
///
/// Same contract as [`load`]. Bytes that are not UTF-8 are one error at the line and column
/// (in characters) where the first invalid byte is.
pub fn parse_bytes(
    bytes: &[u8],
    origin: &Path,
    opts: &LoadOptions,
) -> Result<Config, ConfigErrors> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_str(text, origin, opts),
        Err(e) => Err(ConfigErrors(vec![validate::not_utf8(bytes, origin, e)])),
    }
}

/// Validate configuration text; `origin` is the file name used in error messages.
///
/// Same contract as [`load`], `text` being the main file: its `include` patterns are resolved
/// relative to the directory of `origin` (the current directory for a bare name such as
/// `<embedded default>`) and the drop-ins they match are read, as are those of
/// [`LoadOptions::config_dirs`]. Nothing else is read from disk except what validation checks
/// (programs, `working_directory`) and the user and group databases.
pub fn parse_str(text: &str, origin: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    validate::parse(text, origin, opts)
}

impl LoadOptions {
    /// The options for the calling process: `exe_dir` is the directory of
    /// [`std::env::current_exe`] (`None` if it cannot be found), `running_as_root` is
    /// `geteuid() == 0`.
    pub fn for_current_process() -> Self {
        LoadOptions {
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf)),
            running_as_root: nix::unistd::geteuid().is_root(),
            config_dirs: Vec::new(),
        }
    }
}

impl Config {
    /// The service called `name`, if any.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}
