//! Man pages and shell completions, generated from a program's own clap definition, so that
//! they can never disagree with its flags.
//!
//! The daemons carry none of it: a separate program, `superserver-docgen` (built with the
//! superserver, never installed), holds both programs' flag definitions and calls [`run`]:
//!
//! * `superserver-docgen PROGRAM --generate-man DIR`: write `DIR/PROGRAM.8` and
//!   `DIR/PROGRAM-SUBCOMMAND.8` for each subcommand, print their paths, exit 0.
//! * `superserver-docgen PROGRAM --completions SHELL`: print the completion script for SHELL
//!   (bash or zsh) on stdout, exit 0.
//!
//! The Debian package (`packaging/build-deb`) runs both for the binaries it packages. The
//! output holds no date, so it is the same on every build of the same source. (Man pages and
//! completions were once hidden flags of the daemons themselves: about 120 KiB of code in two
//! programs that should stay small in memory.)

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Generator;
use clap_complete::shells::{Bash, Zsh};
use clap_mangen::Man;

/// The hidden flag that writes the man pages.
pub const GENERATE_MAN: &str = "--generate-man";
/// The hidden flag that prints a completion script.
pub const COMPLETIONS: &str = "--completions";

/// If `args` are `--generate-man DIR` or `--completions SHELL`, do it for the program whose
/// flags `C` defines and return the exit code; otherwise `None` (a usage error for the caller).
pub fn run<C: CommandFactory>(args: &[OsString]) -> Option<ExitCode> {
    let [flag, value] = args else {
        return None;
    };
    let code = if flag == GENERATE_MAN {
        match man_pages(C::command(), Path::new(value)) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{GENERATE_MAN} {}: {e}", Path::new(value).display());
                ExitCode::from(1)
            }
        }
    } else if flag == COMPLETIONS {
        // Only the shells packaged: each generator linked in costs every binary its size.
        let shell: &dyn Fn(&mut Command, &mut Vec<u8>) = match value.to_str() {
            Some("bash") => &|cmd, out| complete(Bash, cmd, out),
            Some("zsh") => &|cmd, out| complete(Zsh, cmd, out),
            _ => {
                eprintln!("{COMPLETIONS}: unknown shell {value:?} (bash or zsh)");
                return Some(ExitCode::from(2));
            }
        };
        let mut cmd = C::command();
        let mut script = Vec::new();
        shell(&mut cmd, &mut script);
        // A reader that went away (`| head`) is not an error worth a panic.
        let _ = io::stdout().write_all(&script);
        ExitCode::SUCCESS
    } else {
        return None;
    };
    Some(code)
}

fn complete(shell: impl Generator, cmd: &mut Command, out: &mut Vec<u8>) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
}

/// Write the man page of `cmd` and one per visible subcommand into `dir` (section 8: both
/// programs are daemons); returns the paths written.
pub fn man_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    // clap's own `help` subcommand has no page of its own.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let root = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let mut written = Vec::new();

    let mut page = Vec::new();
    render(&cmd, &root, &version, &mut page)?;
    let subs: Vec<&Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    page.extend_from_slice(extra_sections(&root, &subs).as_bytes());
    written.push(write(dir, &format!("{root}.8"), &page)?);

    for sub in subs {
        let name = format!("{root}-{}", sub.get_name());
        let sub = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("{root} {}", sub.get_name()));
        let mut page = Vec::new();
        render(&sub, &root, &version, &mut page)?;
        page.extend_from_slice(format!(".SH \"SEE ALSO\"\n.BR {root} (8)\n").as_bytes());
        written.push(write(dir, &format!("{name}.8"), &page)?);
    }
    Ok(written)
}

fn render(cmd: &Command, root: &str, version: &str, out: &mut Vec<u8>) -> io::Result<()> {
    let man = Man::new(cmd.clone())
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("{root} {version}"));
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(out)?;
    }
    // The long after-help is laid out by hand (lists, aligned columns): keep its lines.
    if let Some(text) = cmd.get_after_long_help() {
        out.extend_from_slice(b".SH DETAILS\n.nf\n");
        for line in text.to_string().lines() {
            out.extend_from_slice(roff_line(line).as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(b".fi\n");
    }
    Ok(())
}

/// One line of text for no-fill mode: escapes and no control character at its start.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn write(dir: &Path, name: &str, page: &[u8]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(page)?;
    Ok(path)
}

/// FILES and SEE ALSO, which clap knows nothing about.
fn extra_sections(root: &str, subs: &[&Command]) -> String {
    let mut s = String::new();
    let see_sub: String = subs
        .iter()
        .map(|c| format!(".BR {root}\\-{} (8),\n", c.get_name()))
        .collect();
    match root {
        "superserver" => {
            s.push_str(
                ".SH FILES\n\
                 .TP\n\\fI/etc/superserver/superserver.toml\\fR\n\
                 The configuration read by \\fBsuperserver.service\\fR (\\fB\\-\\-config\\fR); \
                 its format is described in \\fBsuperserver.toml\\fR(5). Without \\fB\\-\\-config\\fR \
                 the embedded default is used (\\fB\\-\\-print\\-default\\fR shows it).\n\
                 .TP\n\\fI/etc/superserver/superserver.d/*.toml\\fR\n\
                 Drop-in files holding \\fB[service.\\fR\\fINAME\\fR\\fB]\\fR tables, read after the \
                 main file because it says \\fBinclude = [\"/etc/superserver/superserver.d/*.toml\"]\\fR; \
                 every reload reads the directory again.\n\
                 .TP\n\\fBsuperserver.socket\\fR, \\fBsuperserver.service\\fR\n\
                 The systemd units: systemd holds the listening sockets of the configuration and \
                 passes them to the superserver; \\fBsystemctl reload superserver\\fR checks the \
                 file and sends SIGHUP.\n",
            );
            s.push_str(".SH \"SEE ALSO\"\n");
            s.push_str(&see_sub);
            s.push_str(
                ".BR superserver.toml (5),\n.BR small\\-services (8),\n\
                 .BR systemd.socket (5),\n.BR inetd (8)\n",
            );
        }
        "small-services" => {
            s.push_str(
                ".SH \"SEE ALSO\"\n.BR superserver (8),\n.BR superserver.toml (5),\n\
                 .BR systemd.socket (5),\n.BR systemd\\-socket\\-activate (1)\n",
            );
        }
        _ => {}
    }
    s
}
