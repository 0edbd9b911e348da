//! Fixture tests: every file in `tests/fixtures/invalid` fails with exactly its `.expected`
//! output, every file in `tests/fixtures/valid` loads, and the example's values are checked.
//!
//! `BLESS=1 cargo test -p superserver-config` rewrites the `.expected` files (review the diff).

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use superserver_config::*;

const MIN_INVALID_FIXTURES: usize = 40;
const MIN_VALID_FIXTURES: usize = 3;

/// The fixture files in `dir` (relative to the package), sorted.
fn fixtures(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| Path::new(dir).join(p.file_name().unwrap()))
        .collect();
    files.sort();
    files
}

/// Parse a fixture (as bytes: one is not UTF-8); errors name it by its path relative to the
/// package, so they are stable.
fn parse(rel: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap();
    parse_bytes(&bytes, rel, opts)
}

/// A temporary directory holding an executable `small-services`, used as `exe_dir`.
fn exe_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("small-services");
    std::fs::write(&exe, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn invalid_fixtures_fail_with_the_expected_errors() {
    let files = fixtures("tests/fixtures/invalid");
    assert!(
        files.len() >= MIN_INVALID_FIXTURES,
        "found {} invalid fixtures, expected at least {MIN_INVALID_FIXTURES}",
        files.len()
    );
    let bless = std::env::var_os("BLESS").is_some();
    let path_env = std::env::var("PATH").unwrap_or_default();
    let mut failures = Vec::new();
    for rel in &files {
        let errors = match parse(rel, &LoadOptions::default()) {
            Ok(_) => {
                failures.push(format!("{}: loaded, but should fail", rel.display()));
                continue;
            }
            Err(e) => e,
        };
        assert!(
            !errors.0.is_empty(),
            "{}: Err with no errors",
            rel.display()
        );
        let mut actual = errors.to_string() + "\n";
        if !path_env.is_empty() {
            actual = actual.replace(&format!("({path_env})"), "($PATH)");
        }
        let expected_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(rel)
            .with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        if actual != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}",
                rel.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Valid whoever runs them: CI may run the tests as root, where a service without `user` or
/// `allow_root` is refused.
#[test]
fn valid_fixtures_load_as_root_and_as_a_user() {
    let files = fixtures("tests/fixtures/valid");
    assert!(
        files.len() >= MIN_VALID_FIXTURES,
        "found only {} valid fixtures",
        files.len()
    );
    let dir = exe_dir();
    for running_as_root in [false, true] {
        let opts = LoadOptions {
            exe_dir: Some(dir.path().to_path_buf()),
            running_as_root,
            ..Default::default()
        };
        for rel in &files {
            if let Err(e) = parse(rel, &opts) {
                panic!("{} (as root: {running_as_root}): {e}", rel.display());
            }
        }
    }
}

#[test]
fn no_services_is_valid_only_when_allowed() {
    let origin = Path::new("empty.toml");
    let opts = LoadOptions::default();
    for text in [
        "",
        "  \n\t\n",
        "# nothing yet\n",
        "[superserver]\nbacklog = 10\n",
    ] {
        let err = parse_str(text, origin, &opts).unwrap_err().to_string();
        assert!(
            err.starts_with("empty.toml: no [service.NAME] table: ")
                && err.contains("allow_no_services = true"),
            "{text:?}: {err}"
        );
    }
    let err = parse_str("service = {}\n", origin, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("empty.toml:1:11: service: no service defined: "),
        "{err}"
    );

    let config = parse_str("[superserver]\nallow_no_services = true\n", origin, &opts).unwrap();
    assert!(config.services.is_empty());
}

#[test]
fn unix_paths_are_stored_normalised() {
    let text = "[service.a]\nexec = [\"cat\"]\nlisten = \"unix:/tmp//./x/../a.sock\"\n";
    let config = parse_str(text, Path::new("n.toml"), &LoadOptions::default()).unwrap();
    assert_eq!(
        config.services[0].listen[0].addr,
        ListenAddr::Unix(Path::new("/tmp/a.sock").into()),
        "a reload that only re-spells the path compares equal"
    );
}

#[test]
fn not_utf8_is_placed_by_line_and_column() {
    let err = parse_bytes(
        b"# ok\nx = \"\xc3\xa9\xff\"\n",
        Path::new("b.toml"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "b.toml:2:7: not valid UTF-8 (byte 0xff); the file must be UTF-8 text"
    );
}

#[test]
fn load_reads_the_file_and_names_it() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    let config = load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(config.services.len(), 1);

    let missing = Path::new("/no/such/superserver.toml");
    let err = load(missing, &LoadOptions::default()).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        err.to_string()
            .starts_with("/no/such/superserver.toml: cannot read: "),
        "{err}"
    );
}

#[test]
fn minimal_fixture_gets_the_defaults() {
    let as_root = LoadOptions {
        exe_dir: None,
        running_as_root: true,
        ..Default::default()
    };
    let config = parse(Path::new("tests/fixtures/valid/minimal.toml"), &as_root).unwrap();
    assert_eq!(
        config.global,
        Global {
            shutdown_grace: Duration::from_secs(10),
            backlog: 4096,
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            control: superserver_config::Control::Default,
            control_group: None,
            metrics: None,
            agent: None,
        }
    );
    let [s] = &config.services[..] else {
        panic!("one service")
    };
    assert_eq!(s.name, "echo");
    assert_eq!(s.mode, Mode::Wait);
    assert!(
        s.program.is_absolute() && s.program.ends_with("cat"),
        "{:?}",
        s.program
    );
    assert_eq!(*s.argv, ["cat"]);
    assert_eq!(
        *s.listen,
        [Listen {
            name: "echo".into(),
            addr: ListenAddr::Tcp("127.0.0.1:7007".parse().unwrap()),
        }]
    );
    assert_eq!(s.backlog, 4096);
    assert_eq!(s.max_instances, 1);
    assert_eq!(s.extra().per_source, None);
    assert_eq!(s.overflow, Overflow::Hold);
    assert_eq!(s.extra().rate, None);
    assert!(s.extra().access.is_empty());
    let creds = s.credentials.as_ref().expect("minimal.toml sets user");
    assert_eq!(creds.user, "nobody");
    assert!(!s.allow_root);
    assert!(s.extra().env.is_empty());
    assert_eq!(*s.pass_env, *DEFAULT_PASS_ENV);
    assert_eq!(s.extra().working_directory, None);
    assert_eq!(s.extra().umask, None);
    assert_eq!(s.extra().limits, Limits::default());
    assert_eq!(s.connection, ConnectionPassing::Stdio);
    assert_eq!(s.extra().unix_socket, UnixSocketOptions::default());
    assert!(s.enabled);
    assert_eq!(s.instances, 1);
    assert_eq!(s.extra().max_duration, None);
    assert_eq!(s.handoff, Handoff::ListenFds);
    assert_eq!(s.log_peer, LogPeer::Full);
    assert_eq!(*s.file, *Path::new("tests/fixtures/valid/minimal.toml"));
    assert_eq!(config.files, [s.file.to_path_buf()]);
}

#[test]
fn example_fixture_values() {
    let dir = exe_dir();
    let opts = LoadOptions {
        exe_dir: Some(dir.path().to_path_buf()),
        running_as_root: true,
        ..Default::default()
    };
    let config = parse(Path::new("tests/fixtures/valid/example.toml"), &opts).unwrap();
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["small", "cat", "unix-cat", "udp-echo", "old-cat"],
        "file order, not sorted"
    );

    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();

    // [service.small]: wait mode, named sockets in file order.
    let small = config.service("small").unwrap();
    assert_eq!(small.mode, Mode::Wait);
    assert_eq!(*small.program, *dir.path().join("small-services"));
    assert_eq!(*small.argv, ["small-services", "--idle-timeout=8s"]);
    let listen: Vec<(&str, String)> = small
        .listen
        .iter()
        .map(|l| (l.name.as_str(), l.addr.to_string()))
        .collect();
    assert_eq!(
        listen,
        [
            ("echo", "tcp://127.0.0.1:7007".to_owned()),
            ("echo", "udp://127.0.0.1:7007".to_owned()),
            ("daytime", "tcp://127.0.0.1:7013".to_owned()),
        ]
    );
    assert!(matches!(small.listen[1].addr, ListenAddr::Udp(_)));
    assert_eq!(small.backlog, 128);
    assert_eq!(small.max_instances, 1);
    assert_eq!(
        small.extra().rate,
        Some(Rate {
            count: 50,
            per: Duration::from_secs(1)
        })
    );
    let permits = |ip: &str| small.extra().access.permits(ip.parse::<IpAddr>().unwrap());
    assert!(permits("127.0.0.1"));
    assert!(!permits("127.0.0.66"));
    assert!(
        !permits("::ffff:127.0.0.66"),
        "v4-mapped peers are matched as IPv4"
    );
    assert!(permits("::ffff:127.0.0.1"));
    assert!(permits("::1"));
    assert!(!permits("10.0.0.1"));
    let creds = small.credentials.as_ref().unwrap();
    assert_eq!(creds.user, "nobody");
    assert_eq!(creds.uid, nobody.uid.as_raw());
    assert_eq!(creds.gid, nogroup.gid.as_raw());
    assert_eq!(creds.groups[0], creds.gid);
    assert_eq!(creds.home, nobody.dir);
    assert_eq!(
        small.extra().env.get("LANG").map(String::as_str),
        Some("C.UTF-8")
    );
    assert_eq!(*small.pass_env, ["PATH", "LANG"]);
    assert_eq!(
        small.extra().working_directory.as_deref(),
        Some(Path::new("/"))
    );
    assert_eq!(small.extra().umask, Some(0o022));
    assert_eq!(
        small.extra().limits,
        Limits {
            nofile: Some(1024),
            nproc: Some(64)
        }
    );

    // [service.cat]: nowait with every nowait key; a bare name found on PATH.
    let cat = config.service("cat").unwrap();
    assert_eq!(cat.mode, Mode::Nowait);
    assert!(cat.program.is_absolute() && cat.program.ends_with("cat"));
    assert_eq!(
        cat.listen.iter().map(|l| &l.addr).collect::<Vec<_>>(),
        [
            &ListenAddr::Tcp("127.0.0.1:7100".parse().unwrap()),
            &ListenAddr::Tcp("[::1]:7113".parse().unwrap()),
        ]
    );
    assert!(cat.listen.iter().all(|l| l.name == "cat"));
    assert_eq!(cat.backlog, 4096, "falls back to [superserver] backlog");
    assert_eq!(cat.max_instances, 40);
    assert_eq!(
        cat.extra().per_source,
        Some(PerSource {
            max: 4,
            prefix_v4: 24,
            prefix_v6: 64
        })
    );
    assert_eq!(cat.overflow, Overflow::Close);
    assert_eq!(cat.connection, ConnectionPassing::ListenFds);
    assert_eq!(
        cat.extra().rate,
        Some(Rate {
            count: 100,
            per: Duration::from_secs(10)
        })
    );
    let creds = cat.credentials.as_ref().unwrap();
    assert_eq!((creds.user.as_str(), creds.uid), ("nobody", 65534));
    assert_eq!(creds.gid, nobody.gid.as_raw(), "the user's primary group");

    // [service.unix-cat]: a unix socket with owner and mode.
    let unix = config.service("unix-cat").unwrap();
    assert_eq!(*unix.program, *Path::new("/bin/cat"));
    assert_eq!(
        unix.listen[0].addr,
        ListenAddr::Unix(Path::new("/run/superserver-cat.sock").into())
    );
    assert_eq!(
        unix.extra().unix_socket,
        UnixSocketOptions {
            mode: Some(0o660),
            uid: Some(nobody.uid.as_raw()),
            gid: Some(nogroup.gid.as_raw()),
        }
    );
    assert_eq!(unix.max_instances, 64);
    assert!(unix.allow_root, "runs as root with allow_root = true");

    // [service.cat] also has max_duration and log_peer.
    assert_eq!(cat.extra().max_duration, Some(Duration::from_secs(300)));
    assert_eq!(cat.log_peer, LogPeer::Masked);
    assert_eq!(cat.handoff, Handoff::ListenFds, "nowait: always ListenFds");
    assert_eq!(cat.instances, 1, "nowait: always 1");

    // [service.udp-echo]: the inetd wait protocol, two children.
    let udp = config.service("udp-echo").unwrap();
    assert_eq!(udp.mode, Mode::Wait);
    assert_eq!(udp.handoff, Handoff::Stdin);
    assert_eq!(udp.instances, 2);
    assert_eq!(udp.max_instances, 1);
    assert_eq!(udp.log_peer, LogPeer::None);
    assert_eq!(udp.extra().max_duration, None);

    // [service.old-cat]: disabled, kept, sharing cat's port without a clash.
    let old = config.service("old-cat").unwrap();
    assert!(!old.enabled);
    assert_eq!(old.listen[0].addr, cat.listen[0].addr);
    assert!(
        config
            .services
            .iter()
            .filter(|s| s.name != "old-cat")
            .all(|s| s.enabled)
    );
    assert!(config.services.iter().all(|s| *s.file == *config.files[0]));
    assert_eq!(
        config.files,
        [Path::new("tests/fixtures/valid/example.toml")]
    );
}

#[test]
fn root_is_refused_unless_allowed() {
    let text = r#"
[service.asroot]
exec = ["cat"]
listen = "127.0.0.1:7007"

[service.rootuser]
exec = ["cat"]
listen = "127.0.0.1:7008"
user = "root"

[service.allowed]
exec = ["cat"]
listen = "127.0.0.1:7009"
allow_root = true

[service.nobody]
exec = ["cat"]
listen = "127.0.0.1:7010"
user = "nobody"
"#;
    let origin = Path::new("root.toml");
    let as_root = LoadOptions {
        exe_dir: None,
        running_as_root: true,
        ..Default::default()
    };
    let err = parse_str(text, origin, &as_root).unwrap_err().to_string();
    let hint = "refusing to run service as root; set user = \"nobody\" (or another user), user_if_root = \"nobody\" (that user when the superserver is root, itself otherwise) or allow_root = true";
    assert_eq!(
        err,
        format!(
            "root.toml:2:10: service.asroot: {hint}\nroot.toml:9:8: service.rootuser.user: {hint}"
        )
    );
    // Not root: no service can become root, and another user is accepted at load.
    let config = parse_str(text, origin, &LoadOptions::default()).unwrap();
    assert_eq!(config.services.len(), 4);
}

#[test]
fn user_if_root_is_the_user_for_root_and_nobody_else() {
    let text = r#"
[service.small]
exec = ["cat"]
listen = "127.0.0.1:7007"
user_if_root = "nobody"
"#;
    let origin = Path::new("u.toml");
    let as_root = LoadOptions {
        exe_dir: None,
        running_as_root: true,
        ..Default::default()
    };
    let root = parse_str(text, origin, &as_root).unwrap();
    let creds = root.services[0]
        .credentials
        .as_ref()
        .expect("runs as nobody");
    assert_eq!(creds.user, "nobody");
    let user = parse_str(text, origin, &LoadOptions::default()).unwrap();
    assert!(user.services[0].credentials.is_none(), "runs as itself");
    let both = format!("{text}user = \"nobody\"\n");
    let err = parse_str(&both, origin, &as_root).unwrap_err().to_string();
    assert!(
        err.contains("service.small.user_if_root: user and user_if_root exclude each other"),
        "{err}"
    );
}

#[test]
fn errors_are_sorted_in_file_order_and_all_reported() {
    let err = parse(
        Path::new("tests/fixtures/invalid/many_errors.toml"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.0.len() >= 3, "{err}");
    let places: Vec<(usize, usize)> = err.0.iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = places.clone();
    sorted.sort();
    assert_eq!(places, sorted);
    assert!(
        err.0
            .iter()
            .all(|e| e.line > 0 && e.column > 0 && !e.key.is_empty())
    );
}

#[test]
fn access_rules_precedence() {
    let net = |s: &str| s.parse().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Empty allow: everything not denied is allowed.
    let rules = AccessRules {
        allow: vec![],
        deny: vec![net("10.0.0.0/8")],
    };
    assert!(rules.permits(ip("192.0.2.1")));
    assert!(!rules.permits(ip("10.1.2.3")));
    assert!(AccessRules::default().permits(ip("192.0.2.1")));
    // Most specific wins, both ways.
    let rules = AccessRules {
        allow: vec![net("10.0.0.0/8"), net("10.1.2.3/32")],
        deny: vec![net("10.1.0.0/16")],
    };
    assert!(rules.permits(ip("10.2.0.1")));
    assert!(!rules.permits(ip("10.1.0.1")));
    assert!(rules.permits(ip("10.1.2.3")));
    // A non-empty allow list denies what it does not match.
    assert!(!rules.permits(ip("192.0.2.1")));
    // Tie: deny wins.
    let rules = AccessRules {
        allow: vec![net("10.0.0.0/8")],
        deny: vec![net("10.0.0.0/8")],
    };
    assert!(!rules.permits(ip("10.0.0.1")));
}

#[test]
fn dropins_fixture_reads_its_directory() {
    let config = parse(
        Path::new("tests/fixtures/valid/dropins.toml"),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = Path::new("tests/fixtures/valid");
    assert_eq!(
        config.files,
        [
            dir.join("dropins.toml"),
            dir.join("dropins.d/10-echo.toml"),
            dir.join("dropins.d/20-off.toml"),
        ]
    );
    let summary: Vec<(&str, bool, &Path)> = config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.enabled, &*s.file))
        .collect();
    assert_eq!(
        summary,
        [
            ("main", true, config.files[0].as_path()),
            ("dropin-echo", true, config.files[1].as_path()),
            ("dropin-off", false, config.files[2].as_path()),
        ]
    );
    assert_eq!(config.services[1].log_peer, LogPeer::Masked);
}

#[test]
fn control_socket_and_metrics_keys() {
    let opts = LoadOptions::default();
    let base = "[service.a]\nexec = [\"/bin/cat\"]\nlisten = \"127.0.0.1:7000\"\n";
    let parse = |head: &str| parse_str(&format!("{head}\n{base}"), Path::new("c.toml"), &opts);
    let off = parse("[superserver]\ncontrol = false\nmetrics = \"127.0.0.1:9100\"").unwrap();
    assert_eq!(off.global.control, superserver_config::Control::Off);
    assert_eq!(off.global.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    let path = parse("[superserver]\ncontrol = \"/run/x//ctl\"").unwrap();
    assert_eq!(
        path.global.control,
        superserver_config::Control::Path("/run/x/ctl".into())
    );
    let err = parse("[superserver]\ncontrol = \"ctl\"\nmetrics = \"udp://127.0.0.1:9\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c.toml:2:11: superserver.control: \"ctl\" is not an absolute path"),
        "{err}"
    );
    assert!(err.contains("superserver.metrics: a TCP address"), "{err}");
}
