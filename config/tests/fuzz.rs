//! A bounded, deterministic fuzz test of parsing and validation: every fixture, valid and
//! invalid, mutated a few thousand times with a fixed-seed PRNG (byte flips, deletions, line
//! duplications, truncations, huge numbers, long strings, control characters, invalid UTF-8).
//!
//! For every input: no panic, every error is one line that starts with the file name, and the
//! input is handled within a time bound.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use superserver_config::*;

/// Mutated inputs in all.
const CASES: usize = 3000;
/// Per input, in a debug build on shared CPUs; a fixture takes well under a millisecond.
const PER_INPUT: Duration = Duration::from_secs(2);

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INSERTS: &[&[u8]] = &[
    b"99999999999999999999999999",
    b"-9223372036854775808",
    b"1e999",
    b"\"300000000000y\"",
    b"\n\n[service.x]\n",
    b"[[service]]",
    b"\x00",
    b"\x1b[31m",
    b"\r",
    b"\t",
    b"\xff\xfe",
    b"\xc3",
    b"\"",
    b"'''",
    b"{",
    b"]",
    b"=",
    b".",
    b"unix:/tmp/../",
    b"[::ffff:1.2.3.4]:1",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            2 => {
                // Duplicate one line, at a random place.
                let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
                let line = lines[rng.below(lines.len())].to_vec();
                let mut line = line;
                line.push(b'\n');
                v.splice(at..at, line);
            }
            3 => v.truncate(at),
            4 => {
                let piece = INSERTS[rng.below(INSERTS.len())];
                v.splice(at..at, piece.iter().copied());
            }
            5 => {
                let long = vec![b'a' + rng.below(26) as u8; 1 + rng.below(100_000)];
                v.splice(at..at, long);
            }
            _ => {
                let control = rng.below(32) as u8;
                v.insert(at, control);
            }
        }
    }
    v
}

fn all_fixtures() -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for dir in ["valid", "invalid"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn mutated_fixtures_never_panic_and_errors_stay_one_line() {
    let fixtures = all_fixtures();
    assert!(
        fixtures.len() >= 40,
        "found only {} fixtures",
        fixtures.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("small-services");
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = LoadOptions {
        exe_dir: Some(dir.path().to_path_buf()),
        running_as_root: true,
        ..Default::default()
    };
    let origin = Path::new("fuzz.toml");
    let mut rng = Rng(0x5eed_c0ff_ee15_600d);
    let (mut ok, mut failed) = (0, 0);
    let start = Instant::now();
    for case in 0..CASES {
        let (name, original) = &fixtures[case % fixtures.len()];
        let input = mutate(&mut rng, original);
        let began = Instant::now();
        let result = parse_bytes(&input, origin, &opts);
        let took = began.elapsed();
        let what = || {
            format!(
                "case {case}, from {}: {:?}",
                name.display(),
                String::from_utf8_lossy(&input[..input.len().min(2000)])
            )
        };
        assert!(took < PER_INPUT, "took {took:?}: {}", what());
        match result {
            Ok(_) => ok += 1,
            Err(errors) => {
                failed += 1;
                assert!(!errors.0.is_empty(), "Err without errors: {}", what());
                for e in &errors.0 {
                    let line = e.to_string();
                    assert!(
                        !line.contains('\n') && !line.contains('\r'),
                        "{line:?}: {}",
                        what()
                    );
                    assert!(
                        line.starts_with("fuzz.toml: ") || line.starts_with("fuzz.toml:"),
                        "{line:?}"
                    );
                }
                let text = errors.to_string();
                assert_eq!(text.lines().count(), errors.0.len(), "{}", what());
            }
        }
    }
    eprintln!(
        "{CASES} mutated inputs: {ok} valid, {failed} refused, in {:?}",
        start.elapsed()
    );
    assert!(
        failed > 0 && ok > 0,
        "mutations should both keep and break files"
    );
}

/// Drop-ins: every fixture, mutated, as the one drop-in of a valid main file. The errors name
/// the main file or the drop-in, never anything else, and stay one line each.
#[test]
fn mutated_drop_ins_never_panic_and_errors_name_their_file() {
    const DROP_IN_CASES: usize = 400;
    let fixtures = all_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("small-services");
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = LoadOptions {
        exe_dir: Some(dir.path().to_path_buf()),
        running_as_root: true,
        ..Default::default()
    };
    let main = dir.path().join("main.toml");
    std::fs::write(
        &main,
        "[superserver]\ninclude = [\"d/*.toml\"]\n\n[service.main-svc]\nexec = [\"cat\"]\n\
         listen = \"127.0.0.1:7999\"\nuser = \"nobody\"\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let drop_in = dir.path().join("d/x.toml");
    let prefixes = [
        format!("{}:", main.display()),
        format!("{}:", drop_in.display()),
    ];
    let mut rng = Rng(0xd20b_1a5e_0ff1_1e00);
    let (mut ok, mut failed) = (0, 0);
    for case in 0..DROP_IN_CASES {
        let (name, original) = &fixtures[case % fixtures.len()];
        let input = mutate(&mut rng, original);
        std::fs::write(&drop_in, &input).unwrap();
        let began = Instant::now();
        let result = load(&main, &opts);
        let took = began.elapsed();
        let what = || format!("case {case}, from {}", name.display());
        assert!(took < PER_INPUT, "took {took:?}: {}", what());
        match result {
            Ok(config) => {
                ok += 1;
                assert_eq!(config.files, [main.clone(), drop_in.clone()]);
            }
            Err(errors) => {
                failed += 1;
                assert!(!errors.0.is_empty(), "Err without errors: {}", what());
                for e in &errors.0 {
                    let line = e.to_string();
                    assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
                    assert!(
                        prefixes.iter().any(|p| line.starts_with(p.as_str())),
                        "{line:?}: {}",
                        what()
                    );
                }
            }
        }
    }
    eprintln!("{DROP_IN_CASES} mutated drop-ins: {ok} valid, {failed} refused");
    assert!(
        failed > 0 && ok > 0,
        "mutations should both keep and break drop-ins"
    );
}
