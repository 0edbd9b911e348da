//! Command-line flags (clap), with the environment as a fallback for each.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::import::Format;

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
/// A running superserver answers `superserver status`, `reload`, `stop`, `upgrade`, `drain`
/// and `undrain` on its control socket (/run/superserver/control for root,
/// $XDG_RUNTIME_DIR/superserver/control otherwise).
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

    /// Also read DIR/*.toml (drop-in files holding [service.NAME] tables), after the
    /// configuration's own `include` patterns. May be given more than once.
    #[arg(long, value_name = "DIR")]
    pub config_dir: Vec<PathBuf>,

    /// Validate the configuration (FILE, or --config, or the embedded default), print the plan
    /// and exit: 0 when valid, 3 with every error otherwise.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    #[allow(clippy::option_option)]
    pub check: Option<Option<PathBuf>>,

    /// With --check: also read the state a running superserver would hand over in an
    /// in-place upgrade (JSON on stdin). Used by `superserver upgrade`'s pre-flight.
    #[arg(long, hide = true, requires = "check")]
    pub upgrade_check: bool,

    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read an inetd.conf or xinetd configuration and print the equivalent superserver TOML
    /// on stdout (check it with --check before use). Service names are resolved from
    /// /etc/services only; host names are never looked up. Exit codes: 0 written; 2 bad usage;
    /// 3 a file could not be read or parsed (FILE:LINE: message).
    Import(ImportArgs),
    /// Ask the running superserver what each service is doing: its state and why, its
    /// processes, sockets and accept queues, its last exit and its counters since start.
    /// Exit codes: 0 answered; 1 the superserver refused (permission, unknown service);
    /// 5 no superserver answers on the control socket.
    Status(StatusArgs),
    /// Reload the running superserver's configuration and say what changed, or every error
    /// (the running configuration then stays). Exit codes: 0 applied; 3 rejected; 1 refused;
    /// 5 no superserver answers.
    Reload(ControlArgs),
    /// Stop the running superserver: close the listeners, SIGTERM every service, wait up to
    /// the grace period. Exit codes: 0 stopping; 1 refused; 5 no superserver answers.
    Stop(StopArgs),
    /// Upgrade the running superserver in place: it runs the new binary's pre-flight (the
    /// configuration and the state it would inherit), then re-executes it in the same process:
    /// every socket stays open (no connection refused), every child stays its child. Without
    /// --binary, the binary now at the running one's path. Exit codes: 0 upgraded; 1 refused
    /// or the pre-flight said no (the old binary keeps serving); 5 no superserver answers.
    Upgrade(UpgradeArgs),
    /// Tell the load balancer to send no new connections to these services (all of them
    /// without a name): HAProxy's agent-check ([superserver] agent) then answers `drain`.
    /// Connections already open, and clients that connect directly, are still served. Exit
    /// codes: 0 done; 1 refused (permission, unknown service); 5 no superserver answers.
    Drain(DrainArgs),
    /// Undo `drain` for these services (all of them without a name): the agent answers `up`
    /// again. Exit codes as for drain.
    Undrain(DrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// The services (default: every service, and any added later).
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The new binary (absolute path).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    #[command(flatten)]
    pub control: ControlArgs,
}

/// Where the running superserver's control socket is.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The control socket. Default: /run/superserver/control for root,
    /// $XDG_RUNTIME_DIR/superserver/control otherwise (the superserver's `control` key).
    #[arg(long, env = "SUPERSERVER_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only these services.
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,

    /// The whole status as JSON (stable; documented in the README).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// How long services get to finish before SIGKILL (default: the configured
    /// shutdown_grace), e.g. 5s.
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,

    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The format; without it each path is detected: a directory, or a file with
    /// `service NAME {`, is xinetd; anything else is inetd.conf.
    #[arg(long, value_enum)]
    pub from: Option<Format>,

    /// Read absolute paths inside the files (include, includedir) and /etc/services under
    /// this directory: the configuration of another system, mounted.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// inetd.conf, xinetd.conf, an xinetd service file, or an includedir directory.
    #[arg(required = true, value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
}
