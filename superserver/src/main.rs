//! superserver: bind a TOML table of services and start them on demand.

mod agent;
mod children;
mod cli;
mod control;
mod ctl;
mod daemon;
mod filter;
mod import;
mod limits;
mod logging;
mod metrics;
mod notify;
mod nowait;
mod plan;
mod preflight;
mod program;
mod proxy;
mod reload;
mod signals;
mod sockets;
mod source;
mod spawn;
mod state;
mod upgrade;
mod wait;

use std::process::ExitCode;

use clap::Parser;

use crate::daemon::{Daemon, Source};
use crate::source::ConfigSource;

/// Why the superserver stopped, mapped to the documented exit codes.
enum Failure {
    Runtime(String),
    Config(String),
    Startup(String),
    Usage(String),
    /// A control command: its own exit code, its message already printed.
    Control(u8),
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
        Err(Failure::Usage(e)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(Failure::Control(code)) => ExitCode::from(code),
    }
}

fn run(args: cli::Args) -> Result<(), Failure> {
    match args.command {
        Some(cli::Command::Status(a)) => return ctl::status(a).map_err(Failure::Control),
        Some(cli::Command::Reload(a)) => return ctl::reload(a).map_err(Failure::Control),
        Some(cli::Command::Stop(a)) => return ctl::stop(a).map_err(Failure::Control),
        Some(cli::Command::Upgrade(a)) => return ctl::upgrade(a).map_err(Failure::Control),
        Some(cli::Command::Drain(a)) => return ctl::drain(a, true).map_err(Failure::Control),
        Some(cli::Command::Undrain(a)) => return ctl::drain(a, false).map_err(Failure::Control),
        _ => {}
    }
    if let Some(cli::Command::Import(import)) = args.command {
        let request = import::Request {
            from: import.from,
            root: import.root,
            paths: import.paths,
        };
        let toml = import::run(&request).map_err(|e| match e.usage {
            true => Failure::Usage(format!("error: {e}")),
            false => Failure::Config(e.to_string()),
        })?;
        stdout(&toml);
        return Ok(());
    }
    if args.print_default {
        stdout(source::DEFAULT);
        return Ok(());
    }
    if let Some(check) = args.check {
        let path = check.or(args.config);
        let source = ConfigSource::new(path, args.config_dir);
        let config = source.load_reported().map_err(Failure::Config)?;
        spawn::prepare_all(&config.services).map_err(|e| templates_failed(&source, e))?;
        if args.upgrade_check {
            upgrade::check_stdin().map_err(Failure::Config)?;
        }
        // An upgrade's pre-flight runs while the superserver that asks holds every address:
        // there is nothing to learn from trying them.
        let (busy, notes) = if args.upgrade_check {
            (Vec::new(), Vec::new())
        } else {
            preflight::check_addresses(&config, false)
        };
        if !busy.is_empty() {
            return Err(templates_failed(&source, busy));
        }
        stdout(&format!("{}: valid; the plan:\n", source.origin()));
        if config.files.len() > 1 {
            let files: Vec<String> = config
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            stdout(&format!("  files read: {}\n", files.join(", ")));
        }
        stdout(&plan::describe(&config));
        for note in notes {
            stdout(&format!("note: {note}\n"));
        }
        return Ok(());
    }
    source::ensure_std_fds();
    // Before any thread starts: every thread inherits the block (see signals.rs).
    signals::block();
    // The signals a child must set back, read now that the dispositions are final.
    spawn::not_default();
    spawn::raise_nofile_limit();
    let source = ConfigSource::new(args.config, args.config_dir);
    let config = source.load_reported().map_err(Failure::Config)?;
    let templates =
        spawn::prepare_all(&config.services).map_err(|e| templates_failed(&source, e))?;
    let inherited = source::inherited_sockets().map_err(Failure::Startup)?;
    // The new image of an in-place upgrade: the old one's state (its sockets are open here).
    let saved = match upgrade::take_saved() {
        Some(Ok(saved)) => {
            log::info!(
                "upgrade: this is the new binary ({}), carrying on {} socket(s) and {} child(ren)",
                upgrade::current_binary().unwrap_or_default().display(),
                saved.sockets.len(),
                saved.children.len()
            );
            Some(saved)
        }
        Some(Err(e)) => {
            log::error!("{e}; starting afresh");
            None
        }
        None => None,
    };
    let try_line = plan::try_line(&config);
    let mut daemon = Daemon::start(config, templates, source, inherited, saved)
        .map_err(|e| Failure::Startup(e.0))?;
    logging::coalesce(true);
    for line in daemon.describe() {
        log::info!("listening: {line}");
    }
    logging::coalesce(false);
    match try_line {
        Some(line) => log::info!("ready; try: {line}"),
        None => log::info!("ready"),
    }
    notify::ready("serving");
    daemon
        .run()
        .map_err(|e| Failure::Runtime(format!("event loop failed: {e}")))
}

/// Problems found beyond the file (a program its user cannot run, an address in use): a
/// configuration error, one line each.
fn templates_failed(source: &ConfigSource, errors: Vec<String>) -> Failure {
    let origin = source.origin();
    let lines: Vec<String> = errors.iter().map(|e| format!("{origin}: {e}")).collect();
    Failure::Config(lines.join("\n"))
}

/// Write to stdout; a reader that went away (`--check | head`) ends the output quietly
/// instead of a panic.
fn stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}
