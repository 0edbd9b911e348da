//! superserver: bind a TOML table of services and start them on demand.

mod children;
mod cli;
mod daemon;
mod filter;
mod limits;
mod logging;
mod notify;
mod plan;
mod sockets;
mod source;
mod spawn;

use std::process::ExitCode;

use clap::Parser;

use crate::daemon::Daemon;
use crate::source::ConfigSource;

/// Why the superserver stopped, mapped to the documented exit codes.
enum Failure {
    Runtime(String),
    Config(String),
    Startup(String),
}

fn main() -> ExitCode {
    source::cloexec_inherited_fds();
    let args = cli::Args::parse();
    logging::init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Runtime(e)) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
        Err(Failure::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
        Err(Failure::Startup(e)) => {
            log::error!("{e}");
            ExitCode::from(4)
        }
    }
}

fn run(args: cli::Args) -> Result<(), Failure> {
    if args.print_default {
        print!("{}", source::DEFAULT);
        return Ok(());
    }
    if let Some(check) = args.check {
        let path = check.or(args.config);
        let source = ConfigSource::new(path);
        let config = source.load_reported().map_err(Failure::Config)?;
        println!("{}: valid; the plan:", source.origin());
        print!("{}", plan::describe(&config));
        return Ok(());
    }
    source::ensure_std_fds();
    let source = ConfigSource::new(args.config);
    let config = source.load_reported().map_err(Failure::Config)?;
    let inherited = source::inherited_sockets().map_err(Failure::Startup)?;
    let try_line = plan::try_line(&config);
    let mut daemon = Daemon::start(config, source, inherited).map_err(|e| Failure::Startup(e.0))?;
    for line in daemon.describe() {
        log::info!("listening: {line}");
    }
    match try_line {
        Some(line) => log::info!("ready; try: {line}"),
        None => log::info!("ready"),
    }
    notify::ready("serving");
    daemon
        .run()
        .map_err(|e| Failure::Runtime(format!("event loop failed: {e}")))
}
