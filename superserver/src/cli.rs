//! Command-line flags (clap), with the environment as a fallback for each.

use std::path::PathBuf;

use clap::Parser;

/// Start network services on demand: bind a TOML table of ports, and on the first connection
/// hand the listening sockets to the service (wait mode, systemd Accept=no) or start one process
/// per connection (nowait mode, inetd / systemd Accept=yes).
///
/// Without --config it serves the classic small services (echo, discard, daytime, qotd,
/// chargen, time) on 127.0.0.1 ports 7000 + their RFC port, by launching small-services.
///
/// Signals: SIGHUP reloads the config (applied as a diff, sockets kept); SIGTERM or SIGINT
/// stop listening, send SIGTERM to every service and wait up to shutdown_grace.
///
/// Exit codes: 0 stopped cleanly (or --check passed); 1 runtime failure; 2 bad usage;
/// 3 invalid configuration; 4 a socket could not be bound or an inherited socket does not
/// fit the configuration.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    /// The configuration file (TOML). Default: the embedded small-services configuration.
    #[arg(short, long, env = "SUPERSERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration (FILE, or --config, or the embedded default), print the plan
    /// and exit: 0 when valid, 3 with every error otherwise.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    #[allow(clippy::option_option)]
    pub check: Option<Option<PathBuf>>,

    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default: bool,
}
