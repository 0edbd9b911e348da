//! superserver-docgen: the man pages and shell completions of `superserver` and
//! `small-services`, generated from their own clap definitions (the very files the daemons are
//! built from), for `packaging/build-deb`. Never installed: the daemons carry none of it.
//!
//! usage: superserver-docgen superserver|small-services --generate-man DIR
//!        superserver-docgen superserver|small-services --completions bash|zsh

use std::ffi::OsString;
use std::process::ExitCode;

// Only the flag definitions are used here (and the import format they name).
#[allow(dead_code)]
#[path = "cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "import/mod.rs"]
mod import;

const USAGE: &str = "usage: superserver-docgen superserver|small-services --generate-man DIR\n       \
                     superserver-docgen superserver|small-services --completions bash|zsh";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let done = match program.to_str() {
        Some("superserver") => superserver_docgen::run::<cli::Args>(rest),
        Some("small-services") => superserver_docgen::run::<small_services::cli::Args>(rest),
        _ => None,
    };
    done.unwrap_or_else(|| {
        eprintln!("{USAGE}");
        ExitCode::from(2)
    })
}
