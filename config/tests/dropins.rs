//! Drop-in files: `include` patterns and `LoadOptions::config_dirs`, read from temporary
//! directories with [`load`] (and once with [`parse_str`]).

use std::fs;
use std::path::{Path, PathBuf};

use superserver_config::*;

/// A `[service.NAME]` table on a TCP port of 127.0.0.1 that loads as root and as a user.
fn service(name: &str, port: u16) -> String {
    format!(
        "[service.{name}]\nexec = [\"cat\"]\nlisten = \"127.0.0.1:{port}\"\nuser_if_root = \"nobody\"\n\n"
    )
}

fn write(path: &Path, text: &str) -> PathBuf {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn opts() -> LoadOptions {
    LoadOptions {
        running_as_root: nix::unistd::geteuid().is_root(),
        ..Default::default()
    }
}

fn names(config: &Config) -> Vec<&str> {
    config.services.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn drop_ins_are_read_in_pattern_then_lexical_order_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let main = write(
        &d.join("superserver.toml"),
        &format!(
            "[superserver]\ninclude = [\"conf.d/*.toml\", \"{}/*.toml\", \"*.toml\", \"none/*.toml\"]\n\n{}",
            d.join("abs").display(),
            service("main", 7400)
        ),
    );
    let b = write(&d.join("conf.d/b.toml"), &service("b", 7402));
    let a = write(
        &d.join("conf.d/a.toml"),
        &(service("a1", 7401) + &service("a2", 7403)),
    );
    // Not matched: another extension, and a hidden file (an editor's lock or backup file).
    write(&d.join("conf.d/c.toml.bak"), "garbage");
    write(&d.join("conf.d/.#a.toml"), "garbage");
    let abs = write(&d.join("abs/z.toml"), &service("z", 7404));
    // Matched twice (a pattern and a config dir): read once. `*.toml` matches the main file
    // itself, which is not read again.
    let extra = write(&d.join("extra/x.toml"), &service("x", 7405));
    let empty = write(&d.join("extra/y.toml"), "# nothing here yet\n");
    let opts = LoadOptions {
        config_dirs: vec![d.join("extra"), d.join("conf.d"), d.join("no-such-dir")],
        ..opts()
    };
    let config = load(&main, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.files,
        [
            main.clone(),
            a.clone(),
            b.clone(),
            abs.clone(),
            extra,
            empty
        ]
    );
    assert_eq!(names(&config), ["main", "a1", "a2", "b", "z", "x"]);
    let file_of = |n: &str| config.service(n).unwrap().file.to_path_buf();
    assert_eq!(file_of("main"), main);
    assert_eq!(file_of("a2"), a);
    assert_eq!(file_of("b"), b);
    assert_eq!(file_of("z"), abs);
}

#[test]
fn services_only_in_drop_ins_and_the_no_services_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let main = write(
        &d.join("main.toml"),
        "[superserver]\ninclude = [\"d/*.toml\"]\n",
    );
    // No drop-in yet: the usual error on the main file.
    let err = load(&main, &opts()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: no [service.NAME] table: ", main.display())),
        "{err}"
    );
    // A service in a drop-in is enough.
    write(&d.join("d/one.toml"), &service("one", 7410));
    let config = load(&main, &opts()).unwrap();
    assert_eq!(names(&config), ["one"]);
    // Disabled everywhere: no enabled service.
    write(
        &d.join("d/one.toml"),
        &service("one", 7410).replace("exec", "enable = false\nexec"),
    );
    let err = load(&main, &opts()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: no enabled service: ", main.display())),
        "{err}"
    );
    // ... unless the main file allows it; the disabled service is still listed.
    write(
        &d.join("main.toml"),
        "[superserver]\ninclude = [\"d/*.toml\"]\nallow_no_services = true\n",
    );
    let config = load(&main, &opts()).unwrap();
    assert_eq!(names(&config), ["one"]);
    assert!(!config.services[0].enabled);
}

#[test]
fn one_bad_drop_in_rejects_the_set_and_every_file_reports_its_own_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let main = write(
        &d.join("main.toml"),
        &format!(
            "[superserver]\ninclude = [\"d/*.toml\"]\n\n{}[service.bad]\nexec = []\nlisten = \"127.0.0.1:7421\"\nuser_if_root = \"nobody\"\n",
            service("main", 7420)
        ),
    );
    let one = write(
        &d.join("d/1.toml"),
        &format!(
            "{}\n[superserver]\nbacklog = 1\n",
            service("main", 7422).replace("7422", "7420")
        ),
    );
    let two = write(&d.join("d/2.toml"), &service("two", 7423));
    let three = d.join("d/3.toml");
    fs::write(&three, b"[service.x]\nexec = [\"\xff\"]\n").unwrap();
    let err = load(&main, &opts()).unwrap_err();
    let (m, o, t) = (main.display(), one.display(), three.display());
    let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            format!(
                "{m}:10:8: service.bad.exec: must not be empty: give the program and its \
                 arguments, e.g. exec = [\"/bin/cat\"]"
            ),
            format!(
                "{o}:1:10: service.main: service \"main\" is already defined in {m}:4; service \
                 names are unique across the main file and its drop-ins"
            ),
            format!(
                "{o}:3:10: service.main.listen: tcp://127.0.0.1:7420 is already used by \
                 service \"main\" ({m}:6)"
            ),
            format!(
                "{o}:7:2: superserver: only the main file may have a [superserver] table; a \
                 drop-in holds [service.NAME] tables only (move these settings to {m})"
            ),
            format!("{t}:2:10: not valid UTF-8 (byte 0xff); the file must be UTF-8 text"),
        ],
        "{err}"
    );
    // The valid drop-in between them changes nothing.
    assert!(!err.to_string().contains(&two.display().to_string()));
}

#[test]
fn patterns_that_match_a_directory_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("d/dir.toml")).unwrap();
    let main = write(
        &d.join("main.toml"),
        &format!(
            "[superserver]\ninclude = [\"missing/*.toml\", \"d/*.toml\"]\n\n{}",
            service("s", 7430)
        ),
    );
    let err = load(&main, &opts()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:2:30: superserver.include: {}: not a regular file; a drop-in must be a TOML file",
            main.display(),
            d.join("d/dir.toml").display()
        )
    );

    // A config dir that is a file is an error naming it; one that does not exist adds nothing.
    let main = write(&d.join("main2.toml"), &service("s", 7430));
    let opts = LoadOptions {
        config_dirs: vec![d.join("nothing"), main.clone()],
        ..opts()
    };
    let err = load(&main, &opts).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: not a directory (given as a configuration directory)",
            main.display()
        )
    );
}

#[test]
fn a_disabled_drop_in_service_may_share_a_port_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let main = write(
        &d.join("main.toml"),
        &format!(
            "[superserver]\ninclude = [\"d/*.toml\"]\n\n{}",
            service("on", 7440)
        ),
    );
    write(
        &d.join("d/off.toml"),
        &service("off", 7440).replace("exec", "enable = false\nexec"),
    );
    let config = load(&main, &opts()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&config), ["on", "off"]);
    assert!(config.services[0].enabled && !config.services[1].enabled);
}

#[test]
fn parse_str_resolves_includes_next_to_its_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(&d.join("d/x.toml"), &service("x", 7450));
    let text = "[superserver]\ninclude = [\"d/*.toml\"]\n";
    let config =
        parse_str(text, &d.join("virtual.toml"), &opts()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&config), ["x"]);
    assert_eq!(config.files, [d.join("virtual.toml"), d.join("d/x.toml")]);
}

#[test]
fn mask_peer_is_exported_for_log_lines() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(mask_peer(ip("203.0.113.99")), ip("203.0.113.0"));
    assert_eq!(mask_peer(ip("2001:db8:1:2::3")), ip("2001:db8:1::"));
    assert_eq!(mask_peer(ip("::ffff:203.0.113.99")), ip("203.0.113.0"));
}
