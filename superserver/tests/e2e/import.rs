//! `superserver import`: Debian's shipped inetd and xinetd files and typical third-party
//! entries, turned into TOML by the real binary; errors with file:line and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

/// `superserver import --root fixtures/root ARGS…`, with the fixture directory as cwd.
fn import(args: &[&str]) -> Output {
    Command::new(superserver_bin())
        .current_dir(fixtures())
        .args(["import", "--root", "root"])
        .args(args)
        .output()
        .unwrap()
}

/// The TOML of a successful import.
fn imported(args: &[&str]) -> String {
    let out = import(args);
    success_stdout(out)
}

/// The lines of table `[service.NAME]` up to the next blank line, `None` when absent.
fn table(toml: &str, name: &str) -> Option<String> {
    let head = format!("\n[service.{name}]\n");
    let start = toml.find(&head)? + 1;
    let body = &toml[start..];
    Some(body[..body.find("\n\n").unwrap_or(body.len())].to_string())
}

/// The comment lines right above table NAME.
fn comments_of(toml: &str, name: &str) -> String {
    let head = format!("\n[service.{name}]\n");
    let start = toml.find(&head).expect("table present") + 1;
    let before = &toml[..start];
    let from = before.rfind("\n\n").map_or(0, |i| i + 2);
    before[from..].to_string()
}

/// `superserver --check` on `toml` written to a temp file.
fn check(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imported.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(superserver_bin());
    cmd.arg("--check").arg(&path);
    // small-services is found next to the superserver, or on PATH.
    let dir_of_small = small_services_bin().parent().unwrap().to_path_buf();
    let path_var = format!(
        "{}:{}",
        dir_of_small.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path_var).output().unwrap()
}

#[test]
fn debian_xinetd_files_become_one_disabled_small_services_table() {
    let shipped = std::fs::read_dir(fixtures().join("root/etc/xinetd.d"))
        .unwrap()
        .count();
    assert_eq!(shipped, 12, "Debian's xinetd ships 12 files in xinetd.d");
    let toml = imported(&["root/etc/xinetd.conf"]);
    assert_eq!(toml.matches("[service.").count(), 1, "{toml}");
    let small = table(&toml, "small").expect(&toml);
    for line in [
        "enable = false",
        "mode = \"wait\"",
        "exec = [\"small-services\"]",
        "user_if_root = \"nobody\"",
        "echo = [\"tcp://0.0.0.0:7\", \"udp://0.0.0.0:7\"]",
        "discard = [\"tcp://0.0.0.0:9\", \"udp://0.0.0.0:9\"]",
        "daytime = [\"tcp://0.0.0.0:13\", \"udp://0.0.0.0:13\"]",
        "chargen = [\"tcp://0.0.0.0:19\", \"udp://0.0.0.0:19\"]",
        "time = [\"tcp://0.0.0.0:37\", \"udp://0.0.0.0:37\"]",
    ] {
        assert!(small.contains(line), "{line} in {toml}");
    }
    assert!(
        !small.contains("handoff"),
        "small-services takes LISTEN_FDS: {toml}"
    );
    assert!(
        toml.contains("# not imported: internal service servers"),
        "{toml}"
    );
    assert!(
        toml.contains("# not imported: internal service services"),
        "{toml}"
    );
    assert!(toml.contains("superserver --check"), "{toml}");

    // The includedir alone (a directory is xinetd) gives the same table.
    let from_dir = imported(&["root/etc/xinetd.d"]);
    assert_eq!(table(&from_dir, "small"), Some(small), "{from_dir}");
}

#[test]
fn debian_default_inetd_conf_has_no_service_enabled() {
    let toml = imported(&["root/etc/inetd.conf"]);
    assert!(!toml.contains("[service."), "{toml}");
    assert!(toml.contains("no services found"), "{toml}");
    assert!(
        toml.contains("(inetd.conf)"),
        "detected as inetd.conf: {toml}"
    );
}

#[test]
fn third_party_inetd_lines_map_to_tables() {
    let toml = imported(&["third-party.inetd.conf"]);

    let small = table(&toml, "small").expect(&toml);
    assert!(
        small.contains(
            "listen = { echo = [\"tcp://0.0.0.0:7\", \"udp://0.0.0.0:7\"], daytime = [\"tcp://0.0.0.0:13\", \"udp://0.0.0.0:13\"] }"
        ),
        "{toml}"
    );
    assert!(!small.contains("enable"), "{toml}");

    // inetd's argv starts with argv[0]; exec[0] is the server path.
    let tftp = table(&toml, "tftp").expect(&toml);
    assert!(
        tftp.contains("exec = [\"/usr/sbin/in.tftpd\", \"-s\", \"/srv/tftp\"]"),
        "{toml}"
    );
    for line in [
        "mode = \"wait\"",
        "listen = \"udp://0.0.0.0:69\"",
        "handoff = \"stdin\"",
        "user = \"root\"",
        "allow_root = true",
    ] {
        assert!(tftp.contains(line), "{line}: {toml}");
    }
    assert!(comments_of(&toml, "tftp").contains("ran as root"), "{toml}");

    // The tcp and tcp6 lines of git are one nowait table with two addresses.
    let git = table(&toml, "git").expect(&toml);
    assert!(
        git.contains("exec = [\"/usr/bin/git\", \"daemon\", \"--inetd\", \"--base-path=/srv/git\", \"/srv/git\"]"),
        "{toml}"
    );
    assert!(
        git.contains("listen = [\"tcp://0.0.0.0:9418\", \"tcp://[::]:9418\"]"),
        "{toml}"
    );
    assert!(git.contains("user = \"nobody\""), "{toml}");
    assert!(!git.contains("handoff"), "{toml}");
    assert_eq!(toml.matches("[service.git").count(), 1, "{toml}");

    let rsync = table(&toml, "rsync").expect(&toml);
    assert!(
        rsync.contains("exec = [\"/usr/bin/rsync\", \"--daemon\"]"),
        "{toml}"
    );
    assert!(
        comments_of(&toml, "rsync").contains("# not imported: argv[0] = rsyncd"),
        "{toml}"
    );

    // host prefix, nowait.max, user:group
    let cat = table(&toml, "7100").expect(&toml);
    for line in [
        "listen = \"tcp://127.0.0.1:7100\"",
        "rate = \"40/60s\"",
        "user = \"nobody\"",
        "group = \"nogroup\"",
    ] {
        assert!(cat.contains(line), "{line}: {toml}");
    }

    let ident = table(&toml, "ident").expect(&toml);
    assert!(ident.contains("listen = \"tcp://[::]:113\""), "{toml}");
    assert!(ident.contains("handoff = \"stdin\""), "{toml}");

    // A nowait datagram service cannot run here: written commented out, with the reason.
    assert!(table(&toml, "talk").is_none(), "{toml}");
    assert!(toml.contains("# [service.talk]"), "{toml}");
    assert!(toml.contains("nowait dgram"), "{toml}");
}

#[test]
fn xinetd_defaults_includedir_and_list_operators() {
    let toml = imported(&["xinetd.conf"]);
    assert!(
        toml.contains("# not imported: defaults: log_type = SYSLOG daemon info"),
        "{toml}"
    );

    // defaults' instances = 30 applies; += extends the defaults' only_from; the factorized
    // form with its braces at the end is expanded.
    let cat = table(&toml, "cat").expect(&toml);
    for line in [
        "mode = \"nowait\"",
        "exec = [\"/bin/cat\"]",
        "listen = \"tcp://127.0.0.1:7101\"",
        "max_instances = 8",
        "max_per_source = 2",
        "allow = [\"10.0.0.0/8\", \"192.168.1.0/24\", \"192.168.2.0/24\", \"127.0.0.0/8\"]",
        "deny = [\"127.0.0.9\"]",
        "env = { GREETING = \"hello\", LANG = \"C.UTF-8\" }",
        "pass_env = [\"PATH\", \"TZ\"]",
    ] {
        assert!(cat.contains(line), "{line}: {toml}");
    }
    let notes = comments_of(&toml, "cat");
    assert!(notes.contains("# not imported: flags KEEPALIVE"), "{toml}");
    assert!(
        notes.contains("# not imported: log_on_success = DURATION"),
        "{toml}"
    );

    // id names the table; flags = IPv6 binds [::]; an empty only_from lets nobody in.
    let v6 = table(&toml, "cat-v6").expect(&toml);
    assert!(v6.contains("listen = \"tcp://[::]:7101\""), "{toml}");
    assert!(v6.contains("max_instances = 30"), "{toml}");
    assert!(v6.contains("deny = [\"0.0.0.0/0\", \"::/0\"]"), "{toml}");
    assert!(!v6.contains("allow"), "{toml}");

    let tftp = table(&toml, "tftp").expect(&toml);
    for line in [
        "enable = false",
        "mode = \"wait\"",
        "exec = [\"/usr/sbin/in.tftpd\", \"-s\", \"/srv/tftp\"]",
        "listen = \"udp://0.0.0.0:69\"",
        "handoff = \"stdin\"",
        "allow_root = true",
        "allow = [\"127.0.0.1\", \"10.1.0.0/16\"]",
        "rate = \"100/1s\"",
    ] {
        assert!(tftp.contains(line), "{line}: {toml}");
    }
    let notes = comments_of(&toml, "tftp");
    assert!(
        notes.contains("# not imported: only_from = bootserver.example.org"),
        "{toml}"
    );
    assert!(notes.contains("# not imported: per_source = 11"), "{toml}");
    assert!(notes.contains("2-second pause"), "{toml}");
}

#[test]
fn an_imported_nowait_service_passes_check() {
    let toml = imported(&["--from", "xinetd", "xinetd.d/cat"]);
    let mut toml = toml.replace("7101", &probe_port("127.0.0.1").to_string());
    if nix::unistd::geteuid().as_raw() != 0 {
        // An ordinary user can only run services as itself.
        toml = toml.replace("user = \"nobody\"\n", "");
    }
    let out = check(&toml);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{toml}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn imported_wait_and_internal_services_pass_check() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root (users, ports below 1024)");
        return;
    }
    // The programs of the fixtures that this machine may lack become /bin/cat.
    let mut toml = imported(&["third-party.inetd.conf"]);
    for missing in [
        "/usr/sbin/in.tftpd",
        "/usr/bin/rsync",
        "/usr/sbin/identd",
        "/usr/bin/git",
    ] {
        toml = toml.replace(&format!("\"{missing}\""), "\"/bin/cat\"");
    }
    toml = toml.replace("user = \"identd\"", "user = \"nobody\"");
    let out = check(&toml);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{toml}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(&imported(&["root/etc/xinetd.conf"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_malformed_entry_is_reported_with_file_and_line_and_exit_3() {
    let out = import(&["bad.inetd.conf"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is written on an error");
    assert!(
        stderr.starts_with("bad.inetd.conf:3: expected wait or nowait, found \"nowiat\""),
        "{stderr}"
    );

    let out = import(&["--from", "xinetd", "bad.xinetd"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.starts_with("bad.xinetd:1: "), "{stderr}");
    assert!(stderr.contains("closing `}`"), "{stderr}");

    let out = import(&["no-such-file"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.starts_with("no-such-file: cannot read"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let out = import(&[]);
    assert_eq!(out.status.code(), Some(2), "no path");
    let out = import(&["--from", "inetd", "xinetd.d"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    let out = import(&["--from", "bsd", "xinetd.conf"]);
    assert_eq!(out.status.code(), Some(2));
}
