//! A new user's first run, as the README tells it: `target/release/superserver` with no
//! arguments, from a checkout in a private home (mode 0700), as root and as an ordinary user;
//! and every configuration the README shows passes `--check` for both and serves.
//!
//! The default configuration listens on fixed ports (7007, 7013, ...), so each run happens in
//! a private network namespace of its own (`unshare --net`, loopback only), which also keeps
//! it clear of anything else on the machine. Needs root (as CI runs the tests).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A "checkout" in a private home owned by `owner`: `HOME/x/target/release/{superserver,
/// small-services}`, the home at mode 0700 as `/root` is.
fn private_checkout(owner: u32) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = top.path().join("home");
    let release = home.join("x/target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(superserver_bin(), release.join("superserver")).unwrap();
    std::fs::copy(small_services_bin(), release.join("small-services")).unwrap();
    for dir in [
        home.join("x/target/release"),
        home.join("x/target"),
        home.join("x"),
    ] {
        std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).unwrap();
    }
    std::os::unix::fs::chown(&home, Some(owner), Some(owner)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    (top, release)
}

/// Run `script` with `sh` in a new network namespace (loopback up), optionally as `uid`
/// for the superserver only; returns (exit code, stdout, stderr).
fn in_netns(script: &str) -> (Option<i32>, String, String) {
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        // The control socket in the test's own place, never the host's /run/superserver.
        .arg(format!(
            "ip link set lo up\nexport SUPERSERVER_CONTROL=\"$(mktemp -u /tmp/superserver-test-ctl.XXXXXX)\"\n{script}"
        ))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The README's first command and its first tries, from `release`, as `uid` (None: root).
fn readme_first_command(release: &Path, uid: Option<u32>) {
    let prefix = match uid {
        Some(u) => format!("setpriv --reuid={u} --regid={u} --clear-groups "),
        None => String::new(),
    };
    let script = format!(
        r#"
cd {release}/../..
{prefix}target/release/superserver 2>server.log &
pid=$!
for i in $(seq 200); do grep -q 'ready; try' server.log 2>/dev/null && break; sleep 0.05; done
echo "daytime: $(nc -w 5 127.0.0.1 7013 </dev/null)"
echo "echo: $(echo hello | nc -q1 -w 5 127.0.0.1 7007)"
kill -TERM $pid
wait $pid
echo "exit: $?"
cat server.log >&2
"#,
        release = release.display()
    );
    let (code, out, err) = in_netns(&script);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let year = chrono_year();
    assert!(
        out.lines()
            .any(|l| l.starts_with("daytime: ") && l.contains(&year)),
        "daytime answered:\n{out}\n--- log:\n{err}"
    );
    assert!(out.contains("echo: hello"), "{out}\n--- log:\n{err}");
    assert!(out.contains("exit: 0"), "{out}\n--- log:\n{err}");
    assert!(
        !err.contains("cannot start") && !err.contains("errno"),
        "{err}"
    );
}

/// This year, as daytime (RFC 867) prints it.
fn chrono_year() -> String {
    let out = Command::new("date").arg("-u").arg("+%Y").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_first_command_serves_for_root_from_a_private_home() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (_top, release) = private_checkout(0);
    readme_first_command(&release, None);
}

#[test]
fn the_first_command_serves_for_an_ordinary_user_from_their_home() {
    if !is_root() {
        eprintln!("skipped: needs root (to become another user)");
        return;
    }
    let (_top, release) = private_checkout(NOBODY);
    readme_first_command(&release, Some(NOBODY));
}

/// A root superserver cannot hand nobody a *script* that nobody cannot reach: `--check` says
/// which directory stops which user, before any client arrives.
#[test]
fn check_names_the_directory_that_stops_the_user() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (top, _) = private_checkout(0);
    let script = top.path().join("home/x/serve.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = top.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[service.s]\nmode = \"nowait\"\nexec = [\"{}\"]\nlisten = \"127.0.0.1:7999\"\nuser = \"nobody\"\n",
            script.display()
        ),
    )
    .unwrap();
    let out = Command::new(superserver_bin())
        .arg("--check")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let home = top.path().join("home");
    assert!(
        err.contains(&format!(
            "service.s.exec: cannot start {} as nobody: nobody may not search {} (mode 0700, owner root:root)",
            script.display(),
            home.display()
        )),
        "{err}"
    );
}

/// A non-root superserver runs a service whose `user` is its own user: nothing to change,
/// so no setgroups (which would fail with EPERM). Another user is refused at load.
#[test]
fn an_unprivileged_superserver_runs_services_as_itself() {
    if !is_root() {
        eprintln!("skipped: needs root (to become another user)");
        return;
    }
    let (top, release) = private_checkout(NOBODY);
    let cfg = |user: &str| {
        format!(
            "[service.day]\nexec = [\"{}/small-services\"]\nlisten = {{ daytime = \"127.0.0.1:7013\" }}\nuser = \"{user}\"\n",
            release.display()
        )
    };
    let dir = top.path().join("home/x");
    std::fs::write(dir.join("own.toml"), cfg("nobody")).unwrap();
    std::fs::write(dir.join("other.toml"), cfg("root")).unwrap();
    for f in ["own.toml", "other.toml"] {
        std::os::unix::fs::chown(dir.join(f), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let script = format!(
        r#"
cd {dir}
setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups target/release/superserver --config own.toml 2>server.log &
pid=$!
for i in $(seq 200); do grep -q 'ready' server.log 2>/dev/null && break; sleep 0.05; done
echo "daytime: $(nc -w 5 127.0.0.1 7013 </dev/null)"
kill -TERM $pid; wait $pid
setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups target/release/superserver --check other.toml
echo "check other: $?"
cat server.log >&2
"#,
        dir = dir.display()
    );
    let (_, out, err) = in_netns(&script);
    assert!(out.contains(&chrono_year()), "{out}\n{err}");
    assert!(out.contains("check other: 3"), "{out}\n{err}");
    assert!(
        err.contains("cannot run as user root (uid 0): the superserver runs as nobody (uid 65534) and may not change user or group"),
        "{err}"
    );
}

/// A step that fails in the child is reported by the parent with the service, the program,
/// the user, the step and the system's words; the back-off line repeats it.
#[test]
fn a_failed_spawn_names_the_step_and_the_reason() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (l, addr) = tcp_listener("127.0.0.1");
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = format!(
        "[service.small]\nexec = [\"{{SMALL}}\", \"--protocol\", \"daytime\"]\nlisten = \"{addr}\"\nuser = \"nobody\"\nworking_directory = \"{}\"\n",
        private.path().display()
    );
    let server = Server::start(&config, vec![l]);
    let _c = std::net::TcpStream::connect(addr).unwrap();
    let line = server.wait_log("small: cannot start ");
    assert!(
        line.contains(&format!(
            "as nobody: chdir {}: Permission denied (os error 13); back-off: next start in",
            private.path().display()
        )),
        "{line}"
    );
}

/// `--check FILE | head -c 10` ends quietly: a reader that went away is not a crash.
#[test]
fn check_into_a_closed_pipe_exits_quietly() {
    for flag in ["--check", "--print-default"] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read); // every write now fails with EPIPE
        let out = Command::new(superserver_bin())
            .arg(flag)
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{flag}: {err}");
        assert!(!err.contains("panicked"), "{flag}: {err}");
    }
}

/// Every TOML block of the README passes `--check` as root and as an ordinary user, and
/// serves for both (started in a private network namespace, it reports ready and stops
/// cleanly).
#[test]
fn every_config_the_readme_shows_checks_and_serves_as_root_and_not() {
    if !is_root() {
        eprintln!("skipped: needs root (to become another user)");
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    assert!(!blocks.is_empty(), "the README shows no configuration");
    let (top, release) = private_checkout(NOBODY);
    let dir = top.path().join("home/x");
    for (n, text) in blocks.iter().enumerate() {
        let file = dir.join(format!("readme-{n}.toml"));
        std::fs::write(&file, text).unwrap();
        std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).unwrap();
        for uid in [None, Some(NOBODY)] {
            let prefix = match uid {
                Some(u) => format!("setpriv --reuid={u} --regid={u} --clear-groups "),
                None => String::new(),
            };
            let script = format!(
                r#"
cd {dir}
{prefix}{bin} --check {file} >check.out 2>&1; echo "check: $?"
{prefix}{bin} --config {file} 2>server.log &
pid=$!
for i in $(seq 200); do grep -q 'ready' server.log 2>/dev/null && break; sleep 0.05; done
grep -q 'ready' server.log && echo serving
kill -TERM $pid; wait $pid; echo "exit: $?"
cat check.out server.log >&2
"#,
                dir = dir.display(),
                bin = release.join("superserver").display(),
                file = file.display()
            );
            let (_, out, err) = in_netns(&script);
            let who = if uid.is_some() { "nobody" } else { "root" };
            assert!(
                out.contains("check: 0") && out.contains("serving") && out.contains("exit: 0"),
                "README block {n} as {who}:\n{text}\n{out}\n{err}"
            );
        }
    }
}
