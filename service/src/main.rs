//! `small-services`: echo, discard, chargen, daytime, time and qotd, socket-activatable.
//! See `--help` for where sockets come from and the exit codes.

use std::process::ExitCode;

use clap::Parser;
use small_services::{activation, app, cli};

fn main() -> ExitCode {
    // First, while the process has one thread: take passed-in sockets and remove LISTEN_* from
    // the environment (errors are reported once logging is up).
    let inherited = activation::take_from_env();
    let args = cli::Args::parse();
    let quiet = app::stderr_is_client();
    app::init_logging(quiet);
    match app::run(args, inherited) {
        Ok(_) => ExitCode::from(cli::exit::OK),
        Err(e) => {
            if !quiet {
                eprintln!("small-services: error: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    eprintln!("  caused by: {cause}");
                    source = cause.source();
                }
            }
            ExitCode::from(e.exit_code())
        }
    }
}
