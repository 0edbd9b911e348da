//! The command line: --check, --help, exit codes, the embedded default.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::harness::*;

/// `superserver --check` on a file holding `text`; the file's path is returned for messages.
fn check(text: &str) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("superserver.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(superserver_bin())
        .arg("--check")
        .arg(&path)
        .output()
        .unwrap();
    (out, path, dir)
}

#[test]
fn check_prints_the_plan_of_a_valid_file_and_exits_0() {
    let (out, _, _dir) = check(
        "[service.echo]\nallow_root = true\nmode = \"nowait\"\nexec = [\"/bin/cat\"]\nlisten = \"127.0.0.1:7107\"\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("echo (nowait, max 64): echo tcp://127.0.0.1:7107 → /bin/cat"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_error_with_file_line_and_key_and_exits_3() {
    let (out, path, _dir) = check(
        "[service.a]\nallow_root = true\nexec = []\nlisten = \"127.0.0.1:7\"\n\n[service.b]\nallow_root = true\nexec = [\"/bin/cat\"]\nmode = \"nowait\"\nlisten = \"udp://127.0.0.1:9\"\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "both errors reported: {stderr}");
    assert!(
        lines[0].starts_with(&format!("{}:3:", path.display())),
        "{stderr}"
    );
    assert!(lines[0].contains("service.a.exec"), "{stderr}");
    assert!(stderr.contains("service.b.listen"), "{stderr}");
}

#[test]
fn help_documents_exit_codes_and_signals() {
    let out = Command::new(superserver_bin())
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    for needle in [
        "--config",
        "--check",
        "SIGHUP",
        "Exit codes",
        "3 invalid configuration",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    let bad = Command::new(superserver_bin())
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn the_embedded_default_serves_the_small_services() {
    // The default config launches small-services from next to the superserver binary.
    let next_to = superserver_bin().with_file_name("small-services");
    assert_eq!(
        small_services_bin(),
        next_to,
        "built into the same target directory"
    );
    let out = Command::new(superserver_bin())
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for port in ["7007", "7009", "7013", "7017", "7019", "7037"] {
        assert!(stdout.contains(&format!("127.0.0.1:{port}")), "{stdout}");
    }
}

/// `--check` tries every address: one another program listens on is an error that names the
/// program; one held by a running superserver (the reload case) is fine and said so.
#[test]
fn check_names_the_program_holding_a_port_and_accepts_a_running_superserver() {
    let (l, addr) = tcp_listener("127.0.0.1");
    // A plain process (this test) holds the port.
    let text = format!(
        "[service.echo]\nmode = \"nowait\"\nexec = [\"/bin/cat\"]\nlisten = \"{addr}\"\nuser_if_root = \"nobody\"\n"
    );
    let (out, _, _dir) = check(&text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("service.echo.listen: tcp://{addr}: in use by "))
            && stderr.contains(&format!("(pid {})", std::process::id())),
        "{stderr}"
    );
    // A superserver serving the same file: --check passes (as before `systemctl reload`).
    let server = Server::start(&text, vec![l]);
    let stdout = check_passes_while_serving(&server);
    assert!(stdout.contains("held by superserver (pid "), "{stdout}");
}

/// The same while a wait-mode service runs: it holds the sockets too, as the superserver's
/// child, and that is fine.
#[test]
fn check_accepts_a_port_held_by_a_running_wait_service() {
    let (l, addr) = tcp_listener("127.0.0.1");
    let text = format!(
        "[service.day]\nexec = [\"{{SMALL}}\", \"--idle-timeout=60s\", \"--protocol\", \"daytime\"]\nlisten = \"{addr}\"\nuser_if_root = \"nobody\"\n"
    );
    let server = Server::start(&text, vec![l]);
    read_line(addr).unwrap();
    server.wait_log("day: started pid");
    let stdout = check_passes_while_serving(&server);
    assert!(stdout.contains("small-services (pid "), "{stdout}");
}

/// `--check` on the file a running superserver serves: it must pass; returns its output.
fn check_passes_while_serving(server: &Server) -> String {
    let out = Command::new(superserver_bin())
        .arg("--check")
        .arg(server.dir.path().join("superserver.toml"))
        .output()
        .unwrap();
    success_stdout(out)
}
